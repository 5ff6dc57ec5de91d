"""What the host needs to run User-Mode-Linux guests, and whether they boot here.

The guest kernel is Debian's `user-mode-linux` package. `fix_uml` (run by `svcbench doctor
--fix`) installs it, lays out its module tree where `modprobe -d` finds it (CACHE_DIR, with
depmod's index), builds the FPU-state shim where the host's XSAVE area is larger than the
guest kernel knows (uml_xstate.c) and raises vm.max_map_count; `uml_missing`,
`boot_problems` and `map_count_problem` say, one sentence each, what stands in the way.
clusters/uml.py boots guests; clusters/uml_guest.py runs inside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from reports.results import cpuinfo_field, write_json

UML_KERNEL = "/usr/bin/linux.uml"
UML_MODULE_ROOT = "/usr/lib/uml/modules"  # the package's tree: <version>/kernel/...
CACHE_DIR = "/var/cache/svcbench/uml"  # `modprobe -d` root: lib/modules/<version> + depmod index
STAMP = ".svcbench-stamp"
XSTATE_SOURCE = str(Path(__file__).resolve().with_name("uml_xstate.c"))
UML_XSTATE_BYTES = 832  # the FPU state Debian's UML 6.1 keeps per task (struct _xstate)
MAP_COUNT = 1_048_576  # vm.max_map_count the guest wants; Fedora's default since Fedora 39
MAP_COUNT_FILE = "/proc/sys/vm/max_map_count"
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class UmlError(RuntimeError):
    """The guest kernel cannot be used or did not answer (the message says why and what to do)."""


def which(cmd: str) -> str | None:
    return shutil.which(cmd, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def module_version() -> str | None:
    """The version of the package's module tree, which is what the guest's `uname -r` says."""
    try:
        versions = [v for v in os.listdir(UML_MODULE_ROOT) if (Path(UML_MODULE_ROOT) / v / "kernel").is_dir()]
    except OSError:
        return None
    if not versions:
        return None
    return max(versions, key=lambda v: tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", v)))


def _stamp(version: str) -> str:
    """What the prepared tree was made from: a package upgrade makes it stale."""
    st = os.stat(UML_KERNEL)
    return f"{version} {st.st_size} {st.st_mtime_ns}\n"


def host_xstate_bytes() -> int | None:
    """The XSAVE area this host's ptrace reads and writes whole (NT_X86_XSTATE); None off x86."""
    if os.uname().machine != "x86_64" or os.geteuid() != 0:
        return None
    if _xstate_bytes:
        return _xstate_bytes[0]
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    ptrace_attach, ptrace_detach, ptrace_getregset, nt_x86_xstate = 16, 17, 0x4204, 0x202
    area = ctypes.create_string_buffer(65536)
    iov = (ctypes.c_void_p * 2)(ctypes.cast(area, ctypes.c_void_p), 65536)
    child = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL)
    size = None
    try:
        if libc.ptrace(ptrace_attach, child.pid, None, None) == 0:
            os.waitpid(child.pid, 0)
            if libc.ptrace(ptrace_getregset, child.pid, ctypes.c_void_p(nt_x86_xstate), iov) == 0:
                size = int(iov[1])
            libc.ptrace(ptrace_detach, child.pid, None, None)
    finally:
        child.kill()
        child.wait()
    _xstate_bytes.append(size)
    return size


_xstate_bytes: list[int | None] = []


def xstate_shim() -> str:
    """Where the build of uml_xstate.c lives; the name carries the source's hash."""
    digest = hashlib.sha256(Path(XSTATE_SOURCE).read_bytes()).hexdigest()[:12]
    return str(Path(CACHE_DIR) / f"uml_xstate-{digest}.so")


def _needs_xstate_shim() -> bool:
    size = host_xstate_bytes()
    return size is not None and size > UML_XSTATE_BYTES


def build_xstate_shim(echo: Callable[[str], None] = print) -> str:
    """Compile uml_xstate.c into CACHE_DIR (needs a C compiler)."""
    cc = which("cc") or which("gcc")
    if cc is None:
        raise UmlError("a C compiler is missing; apt-get install gcc libc6-dev")
    target = xstate_shim()
    os.makedirs(CACHE_DIR, exist_ok=True)
    argv = [cc, "-shared", "-fPIC", "-O2", "-o", target + ".tmp", XSTATE_SOURCE, "-ldl"]
    echo("$ " + " ".join(argv))
    subprocess.run(argv, check=True, capture_output=True, text=True)
    os.replace(target + ".tmp", target)
    return target


def map_count() -> int | None:
    try:
        return int(Path(MAP_COUNT_FILE).read_text())
    except (OSError, ValueError):
        return None


def map_count_problem() -> str | None:
    """Why a large guest process would be killed here, or None."""
    have = map_count()
    if have is None or have >= MAP_COUNT:
        return None
    return (f"vm.max_map_count is {have:,}: UML maps a guest process's pages piecemeal, so one "
            f"dies at about {have * 11 // 1000:,} MB (bench at 30,000 Services needs more); "
            f"svcbench doctor --fix raises it to {MAP_COUNT:,}")


def uml_missing() -> list[str]:
    """What `--kernel uml` lacks on this host, one sentence each; empty means usable."""
    problem = map_count_problem()
    return boot_problems() + ([problem] if problem else [])


def boot_problems() -> list[str]:
    """What keeps a guest from booting here (a low vm.max_map_count only limits its size)."""
    out = []
    if os.geteuid() != 0:
        out.append("guest kernels need root (run svcbench as root)")
    if not os.access(UML_KERNEL, os.X_OK):
        out.append(f"the User-Mode-Linux kernel {UML_KERNEL} is missing (apt-get install user-mode-linux)")
    for cmd in ("modprobe", "depmod"):
        if not which(cmd):
            out.append(f"{cmd} is missing (apt-get install kmod)")
    version = module_version()
    if os.access(UML_KERNEL, os.X_OK):
        if version is None:
            out.append(f"the guest's modules are missing from {UML_MODULE_ROOT} (apt-get install --reinstall user-mode-linux)")
        elif not _tree_fresh(version):
            tree = Path(CACHE_DIR) / "lib" / "modules" / version
            out.append(f"the guest's module tree {tree} is not prepared (svcbench doctor --fix runs depmod)")
    if os.access(UML_KERNEL, os.X_OK) and _needs_xstate_shim() and not os.path.exists(xstate_shim()):
        out.append(f"this CPU's XSAVE area is {host_xstate_bytes():,} bytes and the guest kernel keeps "
                   f"{UML_XSTATE_BYTES}, so it cannot start a process (AVX-512/AMX host); svcbench "
                   f"doctor --fix builds {Path(XSTATE_SOURCE).name}, which fills the gap (needs gcc)")
    if not out:
        refused = boot_refused()
        if refused:
            out.append(refused)
    return out


BOOT_CHECK = "boot-check.json"
BOOT_CHECK_TIMEOUT_S = 60.0
INIT_EXITED_CLEANLY = "Attempted to kill init! exitcode=0x00000000"
FP_REGS_FAILED = "ptrace set fp regs failed"


def _boot_key() -> str:
    """What decides whether the guest boots: its kernel build, the host kernel, the CPU."""
    st = os.stat(UML_KERNEL)
    digest = hashlib.sha256((cpuinfo_field("flags") or "").encode()).hexdigest()[:16]
    shim = f" {Path(xstate_shim()).name}" if _needs_xstate_shim() else ""
    return f"{st.st_size} {st.st_mtime_ns} {os.uname().release} {digest}{shim}"


def boot_refused() -> str | None:
    """None when the guest kernel boots on this host, else one sentence why not.

    Booted once (init=/bin/true, about 2 s) and remembered per guest kernel, host kernel
    and CPU. Debian's 6.1 guest kernel cannot restore a process's FPU state on hosts whose
    XSAVE area is larger than it knows (AVX-512, AMX): its first process dies at once.
    """
    cache = Path(CACHE_DIR) / BOOT_CHECK
    key = _boot_key()
    try:
        seen = json.loads(cache.read_text())
        if seen.get("key") == key:
            return seen.get("refused")
    except (OSError, ValueError):
        pass
    refused = _boot_once()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {"key": key, "refused": refused})
    except OSError:
        pass  # checked again next time
    return refused


def _boot_once() -> str | None:
    umid = f"svbcheck{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="svcbench-uml-check-") as scratch:
        argv = [UML_KERNEL, "mem=64M", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
                f"umid={umid}", f"uml_dir={scratch}", "con=null", "ssl=null", "con0=null,fd:1",
                "init=/bin/true"]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=BOOT_CHECK_TIMEOUT_S,
                                  start_new_session=True, cwd=scratch, env=uml_env())
        except subprocess.TimeoutExpired:
            return f"the guest kernel {UML_KERNEL} did not boot within {BOOT_CHECK_TIMEOUT_S:.0f} s here"
        console = done.stdout.decode("utf-8", "replace")
    if INIT_EXITED_CLEANLY in console:
        return None
    if FP_REGS_FAILED in console:
        return (f"the guest kernel {UML_KERNEL} cannot run processes on this CPU: it cannot "
                "restore their FPU state where the host's XSAVE area is larger than it knows "
                "(AVX-512, AMX; its console says 'ptrace set fp regs failed'), even with "
                f"{Path(XSTATE_SOURCE).name} preloaded")
    last = [ln.strip() for ln in console.splitlines() if ln.strip() and not ln.startswith(" [<")]
    return (f"the guest kernel {UML_KERNEL} does not boot here (its console ends with: "
            f"{last[-1][:160] if last else 'nothing'})")


def uml_env() -> dict[str, str]:
    """UML's environment: ours, with the FPU-state shim preloaded where the host needs it."""
    env = dict(os.environ)
    if _needs_xstate_shim():
        env["LD_PRELOAD"] = xstate_shim()
    return env


def _tree_fresh(version: str) -> bool:
    tree = Path(CACHE_DIR) / "lib" / "modules" / version
    try:
        return (tree / STAMP).read_text() == _stamp(version) and (tree / "modules.dep").exists()
    except OSError:
        return False


def prepare_modules(echo: Callable[[str], None] = print) -> str:
    """Lay out CACHE_DIR/lib/modules/<version> over the package's modules and run depmod there."""
    version = module_version()
    if version is None:
        raise UmlError(f"no module tree under {UML_MODULE_ROOT}; apt-get install user-mode-linux")
    src = Path(UML_MODULE_ROOT) / version
    tree = Path(CACHE_DIR) / "lib" / "modules" / version
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    # The .ko files stay in the package; depmod follows the link and writes only here.
    (tree / "kernel").symlink_to(src / "kernel")
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src / name).exists():
            shutil.copy2(src / name, tree / name)
    depmod = which("depmod")
    if depmod is None:
        raise UmlError("depmod is missing; apt-get install kmod")
    echo(f"$ depmod -b {CACHE_DIR} {version}")
    subprocess.run([depmod, "-b", CACHE_DIR, version], check=True, capture_output=True, text=True)
    (tree / STAMP).write_text(_stamp(version))
    return str(tree)


def fix_uml(echo: Callable[[str], None] = print) -> None:
    """Install user-mode-linux and kmod with apt-get when missing, prepare the module tree, build
    the FPU-state shim where the host needs it, and raise vm.max_map_count."""
    packages = []
    if not os.access(UML_KERNEL, os.X_OK) or module_version() is None:
        packages.append("user-mode-linux")
    if not which("modprobe") or not which("depmod"):
        packages.append("kmod")
    if _needs_xstate_shim() and not (which("cc") or which("gcc")):
        packages += ["gcc", "libc6-dev"]
    if packages:
        if os.geteuid() != 0 or not which("apt-get"):
            raise UmlError("installing " + " ".join(packages) + " needs root on Debian/Ubuntu (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        echo("$ apt-get update && apt-get install -y --no-install-recommends " + " ".join(packages))
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        # No recommends: uml-utilities would bring a daemon nobody here uses.
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                       check=True, env=env)
    version = module_version()
    if version is None or not _tree_fresh(version):  # a guest booting now reads the tree
        prepare_modules(echo)
    if _needs_xstate_shim() and not os.path.exists(xstate_shim()):
        build_xstate_shim(echo)
    if map_count_problem():
        echo(f"$ sysctl -w vm.max_map_count={MAP_COUNT}")
        Path(MAP_COUNT_FILE).write_text(f"{MAP_COUNT}\n")
