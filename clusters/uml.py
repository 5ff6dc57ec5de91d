"""svcbench inside a User-Mode-Linux guest kernel, for modes this host's kernel lacks (IPVS).

A guest is Debian's `user-mode-linux` kernel run as an ordinary process with the host's
filesystem as its root (hostfs): the same Python and repository, its own kernel (ip_vs and
netfilter modules loaded from the package's tree, every other module on demand through a
modprobe wrapper), and its own /run (tmpfs), so the guest's network namespaces and run
state never appear on the host. Files a guest command writes outside /run land on the host.

Two kinds of guest, each with a folder GUEST_DIR/<guest>/ holding its record (guest.json:
UML pid and start time, who booted it, the runs it holds), its job and its console log:

- one-shot (`run_in_guest`, `bench`/`conformance --kernel uml`): boot, run one command with
  its stdout and stderr on two raw guest consoles wired to pipes we copy to ours, power off.
- kept (`up --kernel uml`): the guest's runner serves requests from the folder, shared over
  hostfs: the host renames requests/<id>.json into place, the guest streams the command's
  output into responses/<id>.out|.err (fsync per chunk, so the host sees it as it comes)
  and finally writes responses/<id>.rc. `up` itself is the first request; later
  apply/delete/probe/status/down of its run are forwarded the same way; `down` of its last
  run powers it off. status.json, rewritten every HEARTBEAT_S, says the guest is alive and
  which of its runs are live, for owns_run and gc_guests.

Environment: SVCBENCH_UML_TIMEOUT (seconds a forwarded bench/conformance may run, default
4 h), SVCBENCH_UML_MEM (guest memory, default 4G for bench, 1024M otherwise),
SVCBENCH_UML_CONSOLE=1 (show the guest's console). Guest commands see SVCBENCH_KERNEL=uml.

Two host limits decide whether a guest runs at all, and how large a guest process may grow:
- Debian's UML 6.1 keeps 832 bytes of FPU state per task; a host with a larger XSAVE area
  (AVX-512, AMX) refuses that size, and the guest panics at its first process. The
  preloaded uml_xstate.c gives each task the whole area (`svcbench doctor --fix` builds it).
- UML maps every guest page into a task's host process on its own, so a guest process
  dies (SIGKILL, "UML ran out of memory on the host side") at about vm.max_map_count
  pages: some 700 MB at Debian's 65,530, less than `bench` needs at 30,000 Services.
  `svcbench doctor --fix` raises it to 1,048,576 (Fedora's default since Fedora 39).
A guest command killed by either, or by the guest's own OOM killer, exits 1 with the
reason, and a bench run folder it left "running" records it (`errors`, status failed).

UML system calls are slow: compare modes within one kernel, never across kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clusters.netns import proc_start, process_alive
from reports.results import cpuinfo_field, read_json, write_run_json

UML_KERNEL = "/usr/bin/linux.uml"
UML_MODULE_ROOT = "/usr/lib/uml/modules"  # the package's tree: <version>/kernel/...
CACHE_DIR = "/var/cache/svcbench/uml"  # `modprobe -d` root: lib/modules/<version> + depmod index
GUEST_DIR = "/var/lib/svcbench/uml"  # one folder per guest, readable by host and guest
REPO_ROOT = str(Path(__file__).resolve().parents[1])
INIT_SCRIPT = str(Path(__file__).resolve().with_name("uml_init.sh"))
GUEST_ID_RE = re.compile(r"^g[0-9a-f]{8}$")
EXIT_MARK = "svcbench-guest: exit "
STAMP = ".svcbench-stamp"

# Loaded at boot so the first sync does not wait for autoloading; anything else the
# kernel asks for (an xt match, an nft expression, an ipset type) loads on demand.
GUEST_MODULES = (
    "veth", "bridge", "dummy",
    "nf_conntrack", "nf_nat", "nf_conntrack_netlink", "nf_reject_ipv4",
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_wlc", "ip_vs_sh", "ip_vs_dh",
    "ip_vs_sed", "ip_vs_nq", "ip_vs_mh", "ip_vs_fo", "ip_vs_ovf", "ip_vs_lblc", "ip_vs_lblcr",
    "ip_tables", "iptable_filter", "iptable_nat", "iptable_mangle", "ipt_REJECT",
    "nf_tables", "nft_compat", "nft_ct", "nft_masq", "nft_reject", "nft_numgen", "nft_hash",
    "configs",  # /proc/config.gz: data planes read what this kernel was built with
    "xt_comment", "xt_mark", "xt_conntrack", "xt_addrtype", "xt_statistic", "xt_recent",
    "xt_MASQUERADE", "xt_nat", "xt_set", "xt_multiport",
    "ip_set", "ip_set_hash_ip", "ip_set_hash_ipport", "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet", "ip_set_hash_net", "ip_set_bitmap_port",
)  # fmt: skip

DEFAULT_MEM = "1024M"
BENCH_MEM = "4G"  # iptables at 30,000 Services: the bench and two iptables-restore runs at once
XSTATE_SOURCE = str(Path(__file__).resolve().with_name("uml_xstate.c"))
UML_XSTATE_BYTES = 832  # the FPU state Debian's UML 6.1 keeps per task (struct _xstate)
MAP_COUNT = 1_048_576  # vm.max_map_count the guest wants; Fedora's default since Fedora 39
MAP_COUNT_FILE = "/proc/sys/vm/max_map_count"
BOOT_TIMEOUT_S = 90.0  # boot, module loads and the runner's imports; UML is slow under load
HEARTBEAT_S = 2.0
STALE_AFTER_S = 60.0  # a kept guest that has not written status.json for this long is dead
POWEROFF_GRACE_S = 30.0
HOST_POLL_S = 0.05
GUEST_POLL_S = 0.1
FORWARD_TIMEOUT_S = 4 * 3600.0  # bench/conformance in a guest; SVCBENCH_UML_TIMEOUT overrides
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "COLUMNS", "LINES",
              "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TZ", "CI")  # fmt: skip
PASSED_ENV_PREFIXES = ("SVCBENCH_", "PYTEST_")
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class UmlError(RuntimeError):
    """The guest kernel cannot be used or did not answer (the message says why and what to do)."""


# --------------------------------------------------------------------------- prerequisites


def _which(cmd: str) -> str | None:
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
    cc = _which("cc") or _which("gcc")
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
        if not _which(cmd):
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
        _write_json(cache, {"key": key, "refused": refused})
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
                                  start_new_session=True, cwd=scratch, env=_uml_env())
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


def _uml_env() -> dict[str, str]:
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
    depmod = _which("depmod")
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
    if not _which("modprobe") or not _which("depmod"):
        packages.append("kmod")
    if _needs_xstate_shim() and not (_which("cc") or _which("gcc")):
        packages += ["gcc", "libc6-dev"]
    if packages:
        if os.geteuid() != 0 or not _which("apt-get"):
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


# --------------------------------------------------------------------------- processes


def _alive(proc: dict | None) -> bool:
    """A recorded {"pid", "start"} still runs (a start recorded as None never does)."""
    if not proc or proc.get("start", 0) is None:
        return False
    return process_alive(proc.get("pid"), proc.get("start"))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def _kill_group(pgid: int, timeout: float = 5.0) -> bool:
    """SIGKILL the UML process group (the kernel and its per-process helpers); True if any was left."""
    if not _group_members(pgid):
        return False
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


# UML processes this process started: reaped when they stop, so none lingers as a zombie.
_children: dict[int, subprocess.Popen] = {}


def _reap(pid: int) -> None:
    proc = _children.pop(pid, None)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------- the guest's record


def _write_json(path: Path, data: dict) -> None:
    """Atomic replace, so the other side never reads half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _owner() -> dict:
    return {"pid": os.getpid(), "start": proc_start(os.getpid())}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as fh:
            text = "".join(deque(fh, maxlen=lines))
    except OSError:
        return "(no console log)"
    return text.replace("\r", "").rstrip() or "(console log is empty)"


@dataclass
class Guest:
    """One guest kernel's folder and record (GUEST_DIR/<id>)."""

    id: str
    dir: Path
    record: dict

    @classmethod
    def new(cls, kind: str, base: str | None = None) -> Guest:
        base = base or GUEST_DIR
        os.makedirs(base, mode=0o700, exist_ok=True)
        while True:
            gid = "g" + secrets.token_hex(4)
            path = Path(base) / gid
            try:
                path.mkdir(mode=0o700)
                break
            except FileExistsError:
                continue
        for sub in ("requests", "responses", "uml"):
            (path / sub).mkdir()
        guest = cls(gid, path, {"id": gid, "kind": kind, "owner": _owner(), "created": time.time(),
                                "uml": None, "runs": []})
        guest.save()
        return guest

    @classmethod
    def load(cls, path: Path) -> Guest | None:
        record = _read_json(path / "guest.json")
        if record is None:
            return None
        return cls(path.name, path, record)

    def save(self) -> None:
        _write_json(self.dir / "guest.json", self.record)

    @property
    def kind(self) -> str:
        return self.record.get("kind", "")

    @property
    def runs(self) -> list[str]:
        return list(self.record.get("runs", []))

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    def uml_alive(self) -> bool:
        return _alive(self.record.get("uml"))

    def status(self) -> dict | None:
        """What the kept guest's runner last wrote, with its age in seconds by the host's clock."""
        path = self.dir / "status.json"
        data = _read_json(path)
        if data is None:
            return None
        try:
            data["age_s"] = time.time() - path.stat().st_mtime
        except OSError:
            return None
        return data

    # ------------------------------------------------------------------ boot and stop

    def boot(self, job: dict, mem: str, consoles: dict[int, int] | None = None,
             console_fd: int | None = None) -> subprocess.Popen:
        """Start UML on this folder's job; consoles maps a guest console number to a host fd."""
        job = dict(job, dir=str(self.dir))
        _write_json(self.dir / "job.json", job)
        params = {
            "SVCBENCH_JOB": str(self.dir / "job.json"),
            "SVCBENCH_PYTHON": sys.executable,
            "SVCBENCH_REPO": REPO_ROOT,
            "uml_dir": str(self.dir / "uml"),
        }
        for key, value in params.items():
            if any(c.isspace() for c in value):
                raise UmlError(f"{key} {value!r} contains whitespace, which a kernel command line cannot carry")
        argv = [UML_KERNEL, f"mem={mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
                "quiet", f"umid={self.id}", "con=null", "ssl=null", "con0=null,fd:1"]
        argv += [f"con{n}=null,fd:{fd}" for n, fd in sorted((consoles or {}).items())]
        argv += [f"{k}={v}" for k, v in params.items()]
        # init= is sh with the script as its argument, so the script needs no exec bit.
        argv += ["init=/bin/sh", "--", INIT_SCRIPT]
        if console_fd is None:
            log = open(self.console, "ab")
            console_fd = log.fileno()
        else:
            log = None
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console_fd, stderr=console_fd,
                pass_fds=tuple((consoles or {}).values()), start_new_session=True, cwd=str(self.dir),
                env=_uml_env(),
            )
        finally:
            if log is not None:
                log.close()
        _children[proc.pid] = proc
        self.record["uml"] = {"pid": proc.pid, "start": proc_start(proc.pid)}
        self.record["mem"] = mem
        self.save()
        return proc

    def kill(self) -> bool:
        """SIGKILL the UML process group; True when something was still running."""
        uml = self.record.get("uml") or {}
        pid = uml.get("pid")
        if not pid:
            return False
        # A pid whose start time changed is no longer our UML: its group is someone else's.
        if proc_start(pid) is not None and not _alive(uml):
            return False
        killed = _kill_group(pid)
        _reap(pid)
        return killed

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop(self, grace: float = POWEROFF_GRACE_S) -> str:
        """Power a kept guest off (kill it after `grace`), then remove its folder."""
        how = "was not running"
        if self.uml_alive():
            how = "powered off"
            if self.kind == "kept":
                self._send({"op": "poweroff"})
            else:
                grace = 0  # a one-shot guest has nobody to ask: its owner is gone
                how = "killed"
            deadline = time.monotonic() + grace
            while self.uml_alive() and time.monotonic() < deadline:
                time.sleep(HOST_POLL_S)
            if self.uml_alive():
                how = f"killed (no power-off within {grace:.0f} s)"
        self.kill()
        self.remove()
        return how

    # ------------------------------------------------------------------ kept guests

    def wait_ready(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status() is not None:
                return
            if not self.uml_alive():
                raise UmlError(f"guest {self.id} stopped while booting; its console ends with:\n"
                               f"{_tail(self.console)}")
            time.sleep(HOST_POLL_S)
        raise UmlError(f"guest {self.id} did not become ready within {timeout:.0f} s; its console "
                       f"ends with:\n{_tail(self.console)}")

    def _send(self, request: dict) -> str:
        rid = secrets.token_hex(8)
        _write_json(self.dir / "requests" / f"{rid}.json", dict(request, id=rid))
        return rid

    def request(self, argv: Sequence[str], *, stdin: bytes | None = None,
                timeout: float = FORWARD_TIMEOUT_S, env: dict[str, str] | None = None) -> dict:
        """Run `python -m svcbench ARGV` in this kept guest, streaming its output; the response."""
        req = {"op": "run", "argv": list(argv), "cwd": os.getcwd(), "env": _guest_env(env),
               "stdin": stdin.decode("latin-1") if stdin is not None else None}
        rid = self._send(req)
        responses = self.dir / "responses"
        streams = [(responses / f"{rid}.out", sys.stdout), (responses / f"{rid}.err", sys.stderr)]
        offsets = [0, 0]
        rc_path = responses / f"{rid}.rc"
        deadline = time.monotonic() + timeout
        try:
            while True:
                done = rc_path.exists()  # looked at first: output written before it is complete
                for i, (path, sink) in enumerate(streams):
                    offsets[i] = _copy_new(path, offsets[i], sink)
                if done:
                    response = _read_json(rc_path)
                    if response is None:
                        raise UmlError(f"guest {self.id} wrote an unreadable response to {argv[0]}")
                    return response
                if not self.uml_alive():
                    raise UmlError(f"guest {self.id} stopped while running {argv[0]}; its console "
                                   f"ends with:\n{_tail(self.console)}")
                if time.monotonic() > deadline:
                    raise UmlError(f"guest {self.id}: {argv[0]} did not finish within {timeout:.0f} s")
                time.sleep(HOST_POLL_S)
        finally:
            for path in (rc_path, *(p for p, _ in streams)):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass


def _copy_new(path: Path, offset: int, sink) -> int:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return offset
    if data:
        out = getattr(sink, "buffer", None)
        if out is not None:
            sink.flush()
            out.write(data)
            out.flush()
        else:
            sink.write(data.decode(errors="replace"))
            sink.flush()
    return offset + len(data)


def list_guests(base: str | None = None) -> list[Guest]:
    base = base or GUEST_DIR
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    guests = []
    for name in names:
        if GUEST_ID_RE.match(name):
            guest = Guest.load(Path(base) / name)
            if guest is not None:
                guests.append(guest)
            else:  # killed between mkdir and its first record: nothing can be running
                guests.append(Guest(name, Path(base) / name, {"id": name, "kind": "unknown"}))
    return guests


def _guest_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a guest command gets: the host's basics, never its secrets."""
    env = {k: v for k, v in os.environ.items() if k in PASSED_ENV or k.startswith(PASSED_ENV_PREFIXES)}
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PATH"] = os.pathsep.join([path, *(d for d in SBIN if d not in path.split(os.pathsep))])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env["TMPDIR"] = "/run/tmp"  # the guest's tmpfs: temp files never reach the host
    env["SVCBENCH_KERNEL"] = "uml"
    env.update(extra or {})
    return env


def _job(mode: str, argv: Sequence[str], *, module: str, env: dict[str, str] | None,
         timeout: float | None = None, stdout_tty: bool = False, stderr_tty: bool = False) -> dict:
    return {
        "mode": mode,
        "module": module,
        "argv": list(argv),
        "cwd": os.getcwd(),
        "env": _guest_env(env),
        "python": sys.executable,
        "modules_dir": CACHE_DIR,
        "modules": list(GUEST_MODULES),
        "timeout": timeout,
        "stdout_tty": stdout_tty,
        "stderr_tty": stderr_tty,
    }


# --------------------------------------------------------------------------- one-shot guests


def _pump(fd: int, sink, collect: list[bytes] | None = None) -> None:
    """Copy a pipe to a stream (and/or a list) until EOF: UML closes its end when it exits."""
    out = getattr(sink, "buffer", None) if sink is not None else None
    try:
        while data := os.read(fd, 65536):
            if collect is not None:
                collect.append(data)
            if out is not None:
                out.write(data)
                out.flush()
            elif sink is not None:
                sink.write(data.decode(errors="replace"))
                sink.flush()
    finally:
        os.close(fd)


def run_in_guest(argv: Sequence[str], *, timeout: float, mem: str = DEFAULT_MEM,
                 env: dict[str, str] | None = None, module: str = "svcbench",
                 out_dir: str = "runs") -> int:
    """Boot a guest, run `python -m MODULE ARGV` in it, stream its output here, power it off.

    Returns the command's exit status; 124 when the time limit killed the guest; 1, with
    the reason on stderr and in the run folders under `out_dir` it left "running"
    (`record_death`), when the
    command or the guest kernel died. Nothing stays behind: no UML process, no folder
    (results go where the command wrote them). SVCBENCH_UML_CONSOLE=1 also shows the
    guest's console (kernel and runner messages).
    """
    problems = boot_problems()
    if problems:
        raise UmlError("--kernel uml cannot run here: " + "; ".join(problems))
    job = _job("oneshot", argv, module=module, env=env, timeout=timeout,
               stdout_tty=sys.stdout.isatty(), stderr_tty=sys.stderr.isatty())
    guest = Guest.new("oneshot")
    console: list[bytes] = []
    show_console = sys.stderr if os.environ.get("SVCBENCH_UML_CONSOLE") else None
    readers: list[threading.Thread] = []
    ends: list[int] = []  # our copies of the write ends, closed once UML holds its own
    try:
        for sink, collect in ((show_console, console), (sys.stdout, None), (sys.stderr, None)):
            r, w = os.pipe()
            ends.append(w)
            readers.append(threading.Thread(target=_pump, args=(r, sink, collect), daemon=True,
                                            name=f"uml:{guest.id}:{len(readers)}"))
        booted = time.time()
        try:
            proc = guest.boot(job, mem, consoles={1: ends[1], 2: ends[2]}, console_fd=ends[0])
        finally:
            for w in ends:
                os.close(w)
            for t in readers:  # each closes its read end at EOF, which the close above ensures
                t.start()
        try:
            proc.wait(timeout=timeout + BOOT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            guest.kill()
            for t in readers:
                t.join(timeout=5)
            reason = f"the guest kernel ran out of its {timeout:.0f} s time limit and was killed"
            sys.stderr.write(f"svcbench: {reason}\n")
            record_death(out_dir, booted, reason)
            return 124
        for t in readers:
            t.join(timeout=10)
        text = b"".join(console).decode(errors="replace").replace("\r", "")
        found = re.findall(re.escape(EXIT_MARK) + r"(-?\d+)", text)
        if found and int(found[-1]) >= 0:
            return int(found[-1])
        if found:
            number = -int(found[-1])
            name = signal.Signals(number).name if number in signal.valid_signals() else number
            reason = f"{' '.join([module, *argv[:1]])} was killed by signal {name}"
        else:
            reason = f"the guest kernel stopped (UML exited {proc.returncode})"
        cause = death_cause(text, mem)
        reason = f"{reason}: {cause}" if cause else reason
        sys.stderr.write(f"svcbench: {reason}\n")
        if not cause:
            sys.stderr.write("svcbench: the guest's console ends with:\n"
                             + "\n".join(text.splitlines()[-25:]) + "\n")
        for folder in record_death(out_dir, booted, reason):
            sys.stderr.write(f"svcbench: recorded in {folder}/run.json\n")
        return 1
    finally:
        guest.kill()
        for t in readers:
            if t.is_alive():
                t.join(timeout=5)
        guest.remove()


def death_cause(console: str, mem: str) -> str | None:
    """Why the guest's console says a process or the guest died, with what to do; None if it
    does not say."""
    oom = re.findall(r"Out of memory: Killed process \d+ \(([^)]*)\).*?anon-rss:(\d+)kB", console)
    if oom:
        comm, kb = oom[-1]
        return (f"the guest kernel ran out of its memory (mem={mem}) and killed {comm} at "
                f"{int(kb) // 1024:,} MB; give it more with SVCBENCH_UML_MEM (such as 8G)")
    if "UML ran out of memory on the host side" in console:
        return (f"a guest process needed more host memory maps than vm.max_map_count "
                f"({map_count() or 0:,}) allows (UML maps its pages piecemeal); svcbench doctor "
                f"--fix raises it to {MAP_COUNT:,}")
    if "ptrace set fp regs failed" in console:
        return (f"this host's XSAVE area ({host_xstate_bytes() or 0:,} bytes) is larger than the "
                f"guest kernel's; svcbench doctor --fix builds {Path(XSTATE_SOURCE).name}")
    if "Kernel panic" in console:
        return "the guest kernel panicked: " + console.split("Kernel panic", 1)[1].splitlines()[0].strip(" -:")
    return None


def record_death(out_dir: str, since: float, reason: str) -> list[str]:
    """Mark run folders a guest command left "running" as failed, with the reason.

    The folders are the run.json files under `out_dir` (the command's --out) written since
    `since`; the command inside the guest can no longer say why it stopped.
    """
    base = Path(out_dir)
    marked = []
    for path in sorted(base.glob("*/run.json")):
        try:
            if path.stat().st_mtime < since:
                continue
            meta = read_json(path)
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or meta.get("status") != "running":
            continue
        error = f"the guest kernel: {reason}"
        for info in (meta.get("modes") or {}).values():
            if isinstance(info, dict) and info.get("status") == "running":
                info.update(status="failed", error=error)
        meta.setdefault("errors", []).append({"error": error, "where": "guest"})
        meta.update(status="failed", complete=False,
                    finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_run_json(path.parent, meta)
        marked.append(str(path.parent))
    return marked


# --------------------------------------------------------------------------- kept guests


def _kept_guests() -> list[Guest]:
    return [g for g in list_guests() if g.kind == "kept" and g.uml_alive()]


def up_in_guest(argv: Sequence[str], *, stdin: bytes | None = None, mem: str = DEFAULT_MEM,
                timeout: float = FORWARD_TIMEOUT_S) -> int:
    """`python -m svcbench ARGV` (an `up`) in a new kept guest; the guest keeps running with
    the cluster when the command succeeds and leaves a live run, else it stops."""
    problems = boot_problems()
    if problems:
        raise UmlError("--kernel uml cannot run here: " + "; ".join(problems))
    guest = Guest.new("kept")
    kept = False
    try:
        guest.boot(_job("kept", [], module="svcbench", env=None), mem)
        guest.wait_ready()
        response = guest.request(argv, stdin=stdin, timeout=timeout)
        rc = int(response.get("rc", 1))
        runs = [r for r, live in response.get("runs", {}).items() if live]
        if rc == 0 and runs:
            guest.record["runs"] = runs
            guest.save()
            kept = True
        return rc
    finally:
        if not kept:
            guest.stop(grace=10)


def _guest_of(run_id: str | None) -> Guest:
    guests = _kept_guests()
    if run_id is not None:
        for g in guests:
            if run_id in g.runs:
                return g
        raise UmlError(f"run {run_id} lives in no running guest kernel (guests: "
                       f"{', '.join(f'{g.id} {g.runs}' for g in guests) or 'none'})")
    holding = [(g, r) for g in guests for r in g.runs]
    if len(holding) != 1:
        listing = ", ".join(f"{r} (guest {g.id})" for g, r in holding) or "none"
        raise UmlError(f"{len(holding)} runs live in guest kernels ({listing}); name one with --run")
    return holding[0][0]


def run_in_kept_guest(run_id: str | None, argv: Sequence[str], *, stdin: bytes | None = None,
                      timeout: float = FORWARD_TIMEOUT_S) -> int:
    """`python -m svcbench ARGV` in the kept guest holding run `run_id` (None: the only run
    any guest holds). A guest left holding no run is stopped: nothing else keeps it."""
    guest = _guest_of(run_id)
    status = guest.status()
    if status is None or status["age_s"] > STALE_AFTER_S:
        how = guest.stop(grace=5)
        raise UmlError(f"guest {guest.id} (runs {', '.join(guest.runs)}) stopped answering; it was {how} "
                       "and its runs are gone")
    response = guest.request(argv, stdin=stdin, timeout=timeout)
    rc = int(response.get("rc", 1))
    runs = [r for r, live in response.get("runs", {}).items() if live]
    guest.record["runs"] = runs
    guest.save()
    if not runs:
        guest.stop()
    return rc


def owns_run(run_id: str | None) -> bool:
    """True when run `run_id` (or, for None, the only live run there is) lives in a guest kernel."""
    guests = _kept_guests()
    if not guests:
        return False
    if run_id is not None:
        return any(run_id in g.runs for g in guests)
    if not any(g.runs for g in guests):
        return False
    from clusters.netns import list_runs, run_liveness

    # A live host run makes "the only run" ambiguous: leave it to the host's attach.
    return not any(run_liveness(state)[0] for state in list_runs().values())


def gc_guests(all_guests: bool = False) -> list[str]:
    """Stop guests whose owner or runs are gone (every guest with all_guests); one line each."""
    removed = []
    for g in list_guests():
        what = f"guest {g.id}" + (f" (runs {', '.join(g.runs)})" if g.runs else "")
        owner_alive = _alive(g.record.get("owner"))
        booting = owner_alive and time.time() - g.record.get("created", 0) < BOOT_TIMEOUT_S
        if not g.uml_alive() and booting and g.record.get("uml") is None:
            continue  # its svcbench process is about to start UML
        if not g.uml_alive():
            left = g.kill()
            g.remove()
            removed.append(f"{what}: UML is not running; removed {g.dir}" + (" and killed its helpers" if left else ""))
            continue
        if all_guests:
            removed.append(f"{what}: {g.stop()} (--all)")
            continue
        if g.kind == "oneshot":
            if not owner_alive:
                g.kill()
                g.remove()
                removed.append(f"{what}: its svcbench process {g.record['owner']['pid']} is gone; killed")
            continue
        status = g.status()
        if status is None:
            if not owner_alive and time.time() - g.record.get("created", 0) > BOOT_TIMEOUT_S:
                removed.append(f"{what}: never became ready and its svcbench process is gone; {g.stop(grace=5)}")
            continue
        if status["age_s"] > STALE_AFTER_S:
            g.kill()
            g.remove()
            removed.append(f"{what}: no heartbeat for {status['age_s']:.0f} s; killed")
            continue
        live = [r for r, ok in status.get("runs", {}).items() if ok]
        if not live and not owner_alive:
            removed.append(f"{what}: no live run inside; {g.stop()}")
    return removed


# --------------------------------------------------------------------------- inside the guest


def _console(msg: str) -> None:
    with open("/proc/uptime") as fh:
        uptime = fh.read().split()[0]
    sys.stdout.write(f"[{uptime}] {msg}\n")
    sys.stdout.flush()


def _guest_setup(job: dict) -> None:
    """Modules from the package's tree, now and on demand; the guest's own temp dir."""
    modprobe = _which("modprobe")
    if modprobe is None:
        _console("svcbench-guest: modprobe is missing (apt-get install kmod)")
        return
    wrapper = "/run/svcbench-uml/modprobe"
    os.makedirs(os.path.dirname(wrapper), exist_ok=True)
    with open(wrapper, "w") as fh:
        fh.write(f'#!/bin/sh\nexec {modprobe} -d {job["modules_dir"]} "$@"\n')
    os.chmod(wrapper, 0o755)
    # The kernel runs this for every module it wants (xt matches, nft expressions, schedulers).
    with open("/proc/sys/kernel/modprobe", "w") as fh:
        fh.write(wrapper)
    res = subprocess.run([wrapper, "-a", *job["modules"]], capture_output=True, text=True)
    if res.returncode != 0:
        _console(f"svcbench-guest: some modules did not load: {res.stderr.strip()}")
    os.makedirs("/run/tmp", exist_ok=True)


def _command(job: dict, argv: Sequence[str]) -> list[str]:
    return [job["python"], "-m", job["module"], *argv]


def _raw_tty(path: str) -> int:
    import termios
    import tty

    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    tty.setraw(fd, termios.TCSANOW)  # no \n -> \r\n: bytes reach the host as written
    return fd


def _relay(src: int, dst: int) -> None:
    while True:
        data = os.read(src, 65536)
        if not data:
            break
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]
    os.close(src)


def _guest_oneshot(job: dict) -> int:
    """The command's stdout/stderr on consoles 1 and 2 (a tty only where the host had one)."""
    import termios

    ttys = [_raw_tty("/dev/tty1"), _raw_tty("/dev/tty2")]
    fds, relays = [], []
    for tty_fd, is_tty in zip(ttys, (job["stdout_tty"], job["stderr_tty"]), strict=True):
        if is_tty:
            fds.append(tty_fd)
        else:
            r, w = os.pipe()
            t = threading.Thread(target=_relay, args=(r, tty_fd), daemon=True)
            t.start()
            relays.append(t)
            fds.append(w)
    proc = subprocess.Popen(_command(job, job["argv"]), stdin=subprocess.DEVNULL, stdout=fds[0],
                            stderr=fds[1], cwd=job["cwd"], env=job["env"])
    for fd in fds:
        if fd not in ttys:
            os.close(fd)
    try:
        rc = proc.wait(timeout=job.get("timeout"))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        os.write(ttys[1], f"svcbench: killed after the {job['timeout']:.0f} s time limit\n".encode())
        rc = 124
    for t in relays:
        t.join()
    for fd in ttys:
        termios.tcdrain(fd)
    return rc


def _guest_runs() -> dict[str, bool]:
    from clusters.netns import list_runs, run_liveness

    return {run: run_liveness(state)[0] for run, state in list_runs().items()}


def _append(path: Path, src: int) -> None:
    """Copy a pipe into a hostfs file, fsync after each chunk so the host reads it at once."""
    with open(path, "ab") as fh:
        while True:
            data = os.read(src, 65536)
            if not data:
                break
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    os.close(src)


def _serve_request(job: dict, req: dict) -> None:
    responses = Path(job["dir"]) / "responses"
    rid = req["id"]
    rc = 1
    try:
        env = dict(job["env"], **(req.get("env") or {}))
        stdin = req.get("stdin")
        proc = subprocess.Popen(_command(job, req["argv"]), cwd=req.get("cwd") or job["cwd"], env=env,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        pumps = [threading.Thread(target=_append, args=(responses / f"{rid}.{ext}", os.dup(pipe.fileno())),
                                  daemon=True) for ext, pipe in (("out", proc.stdout), ("err", proc.stderr))]
        proc.stdout.close()
        proc.stderr.close()
        for t in pumps:
            t.start()
        if stdin is not None:
            try:
                proc.stdin.write(stdin.encode("latin-1"))
            except BrokenPipeError:
                pass
            proc.stdin.close()
        rc = proc.wait()
        for t in pumps:
            t.join()
    except Exception as exc:  # the host must get an answer, whatever went wrong here
        with open(responses / f"{rid}.err", "ab") as fh:
            fh.write(f"svcbench-guest: {type(exc).__name__}: {exc}\n".encode())
    _write_json(responses / f"{rid}.rc", {"rc": rc, "runs": _guest_runs()})


def _guest_serve(job: dict) -> int:
    """A kept guest: answer requests until a poweroff request comes."""
    base = Path(job["dir"])
    requests = base / "requests"
    seen: set[str] = set()
    last_beat = 0.0
    while True:
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_S:
            _write_json(base / "status.json", {"pid": os.getpid(), "time": time.time(), "runs": _guest_runs()})
            last_beat = now
        try:
            names = sorted(n for n in os.listdir(requests) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return 0  # the host removed the folder: nobody is left to answer
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            req = _read_json(requests / name)
            try:
                (requests / name).unlink()
            except FileNotFoundError:
                pass
            if req is None:
                continue
            if req.get("op") == "poweroff":
                return 0
            threading.Thread(target=_serve_request, args=(job, req), daemon=True).start()
        time.sleep(GUEST_POLL_S)


def guest_main(argv: Sequence[str]) -> int:
    """`python -m clusters.uml guest JOB`: the runner uml_init.sh starts inside the guest."""
    if len(argv) != 2 or argv[0] != "guest":
        sys.stderr.write("usage: python -m clusters.uml guest JOB.json (run by uml_init.sh inside a guest)\n")
        return 2
    job = _read_json(Path(argv[1]))
    if job is None:
        _console(f"svcbench-guest: cannot read the job {argv[1]}")
        return 1
    rc = 1
    try:
        _console("svcbench-guest: runner started")
        _guest_setup(job)
        _console("svcbench-guest: modules loaded")
        if job["mode"] == "oneshot":
            rc = _guest_oneshot(job)
        else:
            rc = _guest_serve(job)
    except BaseException as exc:
        _console(f"svcbench-guest: {type(exc).__name__}: {exc}")
    finally:
        _console(f"{EXIT_MARK}{rc}")
        os.sync()  # hostfs writes sit in the guest's page cache until then
    return rc


if __name__ == "__main__":
    sys.exit(guest_main(sys.argv[1:]))
