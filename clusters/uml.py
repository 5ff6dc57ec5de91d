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

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clusters.netns import proc_start, process_alive
from clusters.uml_host import (
    CACHE_DIR,
    MAP_COUNT,
    SBIN,
    UML_KERNEL,
    XSTATE_SOURCE,
    UmlError,
    boot_problems,
    host_xstate_bytes,
    map_count,
    uml_env,
)
from reports.results import read_json, write_run_json

GUEST_DIR = "/var/lib/svcbench/uml"  # one folder per guest, readable by host and guest
REPO_ROOT = str(Path(__file__).resolve().parents[1])
INIT_SCRIPT = str(Path(__file__).resolve().with_name("uml_init.sh"))
GUEST_ID_RE = re.compile(r"^g[0-9a-f]{8}$")
EXIT_MARK = "svcbench-guest: exit "

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


def write_record(path: Path, data: dict) -> None:
    """Atomic replace, so the other side never reads half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_record(path: Path) -> dict | None:
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
        record = read_record(path / "guest.json")
        if record is None:
            return None
        return cls(path.name, path, record)

    def save(self) -> None:
        write_record(self.dir / "guest.json", self.record)

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
        data = read_record(path)
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
        write_record(self.dir / "job.json", job)
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
                env=uml_env(),
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
        write_record(self.dir / "requests" / f"{rid}.json", dict(request, id=rid))
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
                    response = read_record(rc_path)
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
