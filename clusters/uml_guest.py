"""The runner inside a User-Mode-Linux guest (PID 1's child: uml_init.sh starts it).

`python -m clusters.uml_guest JOB.json` loads the job's kernel modules (and points the
kernel's modprobe at the package's tree for the rest), then either runs one command with
its output on two raw consoles (a one-shot guest) or serves the command channel of a kept
guest: requests renamed into DIR/requests/, output streamed into DIR/responses/ with an
fsync per chunk, the exit status last, and status.json rewritten every HEARTBEAT_S.
The host side of both is clusters/uml.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Sequence
from pathlib import Path

from clusters.netns import list_runs, run_liveness
from clusters.uml import EXIT_MARK, GUEST_POLL_S, HEARTBEAT_S, read_record, write_record
from clusters.uml_host import which


def _console(msg: str) -> None:
    with open("/proc/uptime") as fh:
        uptime = fh.read().split()[0]
    sys.stdout.write(f"[{uptime}] {msg}\n")
    sys.stdout.flush()


def _guest_setup(job: dict) -> None:
    """Modules from the package's tree, now and on demand; the guest's own temp dir."""
    modprobe = which("modprobe")
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
    write_record(responses / f"{rid}.rc", {"rc": rc, "runs": _guest_runs()})


def _guest_serve(job: dict) -> int:
    """A kept guest: answer requests until a poweroff request comes."""
    base = Path(job["dir"])
    requests = base / "requests"
    seen: set[str] = set()
    last_beat = 0.0
    while True:
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_S:
            write_record(base / "status.json", {"pid": os.getpid(), "time": time.time(), "runs": _guest_runs()})
            last_beat = now
        try:
            names = sorted(n for n in os.listdir(requests) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return 0  # the host removed the folder: nobody is left to answer
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            req = read_record(requests / name)
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
    """`python -m clusters.uml_guest guest JOB`: the runner uml_init.sh starts inside the guest."""
    if len(argv) != 2 or argv[0] != "guest":
        sys.stderr.write("usage: python -m clusters.uml_guest guest JOB.json (run by uml_init.sh inside a guest)\n")
        return 2
    job = read_record(Path(argv[1]))
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
