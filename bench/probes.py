"""What the sweep measures from inside the client pod: connection loops with CPU accounting.

Every function here runs on a thread that has entered the client pod's network namespace
(clusters.nsenter.in_netns), except `BackendWatch`, which enters it on its own thread so
it can probe while the caller reprograms the node. Counts and durations are bounded.
"""

from __future__ import annotations

import random
import resource
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from clusters.nsenter import setns
from clusters.workloads.probe import OK, Sample, tcp_sample

_LINGER_RESET = struct.pack("ii", 1, 0)
CLK_TCK = 100  # /proc/<pid>/stat counts in USER_HZ, 100 on Linux


@dataclass
class ConnectionRun:
    """`count` new connections: one Sample each, the targets they went to, CPU spent."""

    samples: list[Sample]
    targets: list[str]  # "ip:port" per sample
    wall_s: float
    thread_sys_s: float  # kernel time of the probing thread (softirq run on its behalf included)
    thread_user_s: float

    @property
    def ok_latencies(self) -> list[float]:
        return [s.latency_us for s in self.samples if s.outcome == OK]

    @property
    def failed(self) -> int:
        return sum(1 for s in self.samples if s.outcome != OK)

    def outcomes(self) -> dict[str, int]:
        return dict(Counter(s.outcome for s in self.samples))

    def dealt(self, labels: list[str | None]) -> dict[str, ConnectionRun]:
        """The run split by the label of each connection (None: a warm-up, left out); each
        part gets its share of the wall and CPU time by its number of connections."""
        parts: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            if label is not None:
                parts.setdefault(label, []).append(i)
        total = max(1, len(labels))
        return {label: ConnectionRun([self.samples[i] for i in idx], [self.targets[i] for i in idx],
                                     self.wall_s * len(idx) / total,
                                     self.thread_sys_s * len(idx) / total,
                                     self.thread_user_s * len(idx) / total)
                for label, idx in parts.items()}


def _thread_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_stime, usage.ru_utime


def new_connections(
    targets: list[tuple[str, int]] | list[tuple[str, int, str]],
    count: int,
    *,
    pick: str = "cycle",
    seed: int = 0,
    timeout: float = 1.0,
) -> ConnectionRun:
    """`count` sequential new TCP connections, each to the next target ("cycle") or a
    seeded random one ("random"); latency is connect() to the backend's greeting.

    A target (ip, port, netns) is connected from that network namespace: the thread enters
    it before the socket is made (outside the timing). Either every target names one or none.
    """
    if not targets or count < 1:
        raise ValueError("new_connections needs at least one target and count >= 1")
    if len({len(t) for t in targets}) != 1:
        raise ValueError("new_connections: either every target names its namespace or none does")
    rng = random.Random(seed)
    chosen = [
        targets[rng.randrange(len(targets))] if pick == "random" else targets[i % len(targets)]
        for i in range(count)
    ]
    samples: list[Sample] = []
    here = None
    sys0, user0 = _thread_cpu()
    start = time.perf_counter()
    for ip, port, *netns in chosen:
        if netns and netns[0] != here:
            setns(netns[0])
            here = netns[0]
        samples.append(tcp_sample(ip, port, timeout, b"", None))
    wall = time.perf_counter() - start
    sys1, user1 = _thread_cpu()
    return ConnectionRun(samples, [f"{t[0]}:{t[1]}" for t in chosen], wall,
                         sys1 - sys0, user1 - user0)


def request_response(ip: str, port: int, count: int, size: int = 64,
                     timeout: float = 2.0) -> list[float]:
    """Round trips (µs) of `size`-byte requests on one established connection."""
    payload = b"r" * size
    with socket.create_connection((ip, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        greeting = b""
        while b"\n" not in greeting:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionResetError(f"{ip}:{port} closed before its greeting")
            greeting += chunk
        rest = len(greeting.split(b"\n", 1)[1])
        if rest:
            raise ConnectionError(f"{ip}:{port} sent {rest} bytes after its greeting")
        out = []
        for _ in range(count):
            t0 = time.perf_counter_ns()
            sock.sendall(payload)
            got = 0
            while got < size:
                chunk = sock.recv(size - got)
                if not chunk:
                    raise ConnectionResetError(f"{ip}:{port} closed during request/response")
                got += len(chunk)
            out.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


@dataclass
class WatchedSample:
    start_ns: int  # perf_counter_ns when connect() began
    backend: str | None
    outcome: str


@dataclass
class BackendWatch:
    """Probe ip:port from `netns` in a loop on its own thread until stopped or bounded.

    The network programming latency is read from it: the first connection that started
    after a change and was answered by one of the wanted backends.
    """

    netns: str
    ip: str
    port: int
    max_s: float = 120.0
    max_count: int = 500_000
    samples: list[WatchedSample] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"watch:{self.netns}", daemon=True)

    def __enter__(self) -> BackendWatch:
        self._thread.start()
        self._started.wait(5.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            setns(self.netns)
        except BaseException as exc:  # reported by first_after
            self.error = exc
            self._started.set()
            return
        self._started.set()
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and len(self.samples) < self.max_count:
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter_ns()
            s = tcp_sample(self.ip, self.port, 1.0, b"", None)
            self.samples.append(WatchedSample(t0, s.backend, s.outcome))

    def wait_for(self, wanted: set[str], since_ns: int, timeout: float) -> WatchedSample | None:
        """Block until a connection started at or after `since_ns` reached one of `wanted`."""
        end = time.monotonic() + timeout
        seen = 0
        while True:
            now = list(self.samples)
            for s in now[seen:]:
                if s.start_ns >= since_ns and s.outcome == OK and s.backend in wanted:
                    return s
            seen = len(now)
            if time.monotonic() > end or not self._thread.is_alive():
                if self.error is not None:
                    raise self.error
                return None
            time.sleep(0.0005)


# --------------------------------------------------------------------------- CPU accounting


def host_kernel_ticks() -> int:
    """system + irq + softirq ticks of every CPU (/proc/stat), whoever ran them."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...
    return int(fields[3]) + int(fields[6]) + int(fields[7])


def process_sys_ticks(pid: int) -> int:
    """Kernel time of a process, every thread, in USER_HZ ticks (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[12])  # stime: field 15 of stat(5), 13 after pid and comm
