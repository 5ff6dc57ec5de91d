"""throughput_rps: locust users opening one new TCP connection per request.

`run_load` starts one locust process per core inside the client pod's network namespace
(`nsenter --net`, so nothing runs in the root namespace's network). Each process runs
locust as a library (a LocalRunner of `ConnectionUser`s), says "ready" once its imports
are done, starts at the common wall-clock instant the parent then sends to all of them,
stops by itself after `seconds` or `max_requests`, and writes every request's own start
and duration: locust's statistics round to whole milliseconds, ours do not. Only
requests that start and finish inside the common window count.

Locust (gevent) is imported only inside the worker process: importing it would
monkey-patch the caller's threads and sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from clusters.nsenter import netns_path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
READY_TIMEOUT_S = 120.0  # importing locust and gevent takes seconds on a loaded host
START_AFTER_READY_S = 0.5
SPAWN_RATE = 100  # users per second; locust warns above this
USERS_PER_PROCESS = 8


@dataclass
class LoadResult:
    processes: int
    users: int
    seconds: float
    ok: int
    failed: int
    late_s: float  # the latest a worker started after the common start
    latencies_us: list[float] = field(repr=False, default_factory=list)  # completed in the window
    per_process: list[dict] = field(repr=False, default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


class LoadError(RuntimeError):
    """A locust worker failed; the message carries its stderr."""


def run_load(
    netns: str,
    ip: str,
    port: int,
    *,
    seconds: float = 3.0,
    processes: int | None = None,
    users: int = USERS_PER_PROCESS,
    max_requests: int = 200_000,
    keep_dir: str | None = None,
) -> LoadResult:
    """Drive ip:port from `netns` with one locust process per core; bounded in time and count."""
    processes = processes or os.cpu_count() or 1
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="svcbench-locust-") as tmp:
        out_dir = keep_dir or tmp
        procs = []
        try:
            for k in range(processes):
                out = os.path.join(out_dir, f"locust-{k}.json")
                argv = ["nsenter", f"--net={netns_path(netns)}", sys.executable, "-m",
                        "bench.locust_load", "--target", f"{ip}:{port}", "--users", str(users),
                        "--seconds", str(seconds), "--max-requests", str(max_requests),
                        "--out", out]
                # Its own session: a Ctrl-C to the sweep reaches the sweep, which stops these.
                procs.append((out, subprocess.Popen(argv, env=env, stdin=subprocess.PIPE,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                    text=True, start_new_session=True)))
            for _out, proc in procs:
                line = _line_within(proc, READY_TIMEOUT_S)
                if line != "ready":
                    exited = proc.poll()
                    proc.kill()
                    _, stderr = proc.communicate()
                    why = (f"exited {exited}" if exited is not None
                           else f"was not ready within {READY_TIMEOUT_S:.0f} s")
                    raise LoadError(f"locust worker {why}: {stderr.strip()[-2000:]}")
            start_at = time.time() + START_AFTER_READY_S
            for _, proc in procs:
                proc.stdin.write(f"{start_at!r}\n")
                proc.stdin.flush()
            deadline = start_at + seconds + 60
            per_process = []
            for out, proc in procs:
                try:
                    _, stderr = proc.communicate(timeout=max(1.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    raise LoadError(f"locust worker {out} did not stop within {seconds + 60:.0f} s") from None
                if proc.returncode != 0 or not os.path.exists(out):
                    raise LoadError(f"locust worker exited {proc.returncode}: {stderr.strip()[-2000:]}")
                with open(out) as fh:
                    per_process.append(json.load(fh))
        finally:
            for _, proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    lat = [s[1] for p in per_process for s in p["samples"] if s[2]]
    return LoadResult(
        processes=processes,
        users=users * processes,
        seconds=seconds,
        ok=sum(1 for p in per_process for s in p["samples"] if s[2]),
        failed=sum(1 for p in per_process for s in p["samples"] if not s[2]),
        late_s=max((p["late_s"] for p in per_process), default=0.0),
        latencies_us=lat,
        per_process=[{k: v for k, v in p.items() if k != "samples"} for p in per_process],
    )


def _line_within(proc: subprocess.Popen, timeout: float) -> str | None:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else None


# --------------------------------------------------------------------------- the worker


def greet_once(ip: str, port: int, timeout: float = 2.0) -> OSError | None:
    """One new TCP connection that reads the echo backend's greeting line and is reset at
    close (SO_LINGER 0: no TIME_WAIT piles up); None when the line came, else the error.
    Under locust its socket module is gevent's (locust patches it on import). Also the
    request of the locustfile on a real cluster (bench/locustfile_kube.py)."""
    import socket
    import struct

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.settimeout(timeout)
        sock.connect((ip, port))
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return ConnectionResetError("closed before the greeting")
            buf += chunk
        return None
    except OSError as exc:
        return exc
    finally:
        sock.close()


def _worker(args: argparse.Namespace) -> int:
    import gevent
    from locust import User, constant, task
    from locust.env import Environment

    ip, _, port_text = args.target.rpartition(":")
    port = int(port_text)
    records: list[tuple[float, float, bool]] = []  # (start µs after start_at, latency µs, ok)

    def connect_once() -> tuple[float, bool, int]:
        t0 = time.perf_counter_ns()
        ok = greet_once(ip, port) is None
        return (time.perf_counter_ns() - t0) / 1000.0, ok, t0

    class ConnectionUser(User):
        wait_time = constant(0)

        @task
        def new_connection(self) -> None:
            if len(records) >= args.max_requests:
                self.environment.runner.quit()
                return
            latency_us, ok, t0 = connect_once()
            records.append(((t0 - base_ns - start_offset_ns) / 1000.0, latency_us, ok))
            self.environment.events.request.fire(
                request_type="tcp", name=args.target, response_time=latency_us / 1000.0,
                response_length=0, exception=None if ok else ConnectionError("no greeting"),
                context={},
            )

    env = Environment(user_classes=[ConnectionUser])
    runner = env.create_local_runner()
    if args.start_at is None:
        print("ready", flush=True)
        args.start_at = float(sys.stdin.readline())
    base_ns = time.perf_counter_ns()
    start_offset_ns = int((args.start_at - time.time()) * 1e9)
    wait = args.start_at - time.time()
    late = max(0.0, -wait)
    # Users ramp up just before the window opens; what they do before it is not counted.
    ramp_s = args.users / SPAWN_RATE
    if wait > ramp_s:
        gevent.sleep(wait - ramp_s)
    runner.start(args.users, spawn_rate=SPAWN_RATE)
    gevent.spawn_later(max(0.0, args.start_at + args.seconds - time.time()), runner.quit)
    runner.greenlet.join()
    window_us = args.seconds * 1e6
    # Only requests that started and finished inside the common window count.
    kept = [r for r in records if r[0] >= 0 and r[0] + r[1] <= window_us]
    data = {
        "pid": os.getpid(),
        "late_s": round(late, 4),
        "requests": len(records),
        "locust_num_requests": env.stats.total.num_requests,
        "samples": [[round(a, 1), round(b, 1), c] for a, b, c in kept],
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.locust_load",
                                     description="One locust process: new TCP connection per request.")
    parser.add_argument("--target", required=True, help="IP:PORT of an echo backend or Service")
    parser.add_argument("--users", type=int, default=USERS_PER_PROCESS)
    parser.add_argument("--start-at", type=float,
                        help="common start, epoch seconds (default: say ready, read it from stdin)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--out", required=True, help="JSON file for the raw per-request times")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600 or args.users < 1 or args.max_requests < 1:
        parser.error("--seconds must be in (0, 600], --users and --max-requests at least 1")
    return _worker(args)


if __name__ == "__main__":
    sys.exit(main())
