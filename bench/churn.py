"""Endpoint churn: network programming latency while endpoints change at a steady rate.

ClusterLoader2's load test and kube-burner load a cluster the same way: objects change at a
steady rate while the proxy keeps up, and the network programming latency SLI (Kubernetes'
"in-cluster load balancing programming latency": from the moment a Service's endpoints
change to the moment every node's load balancing reflects it) is reported as percentiles.
Here the proxy is svcbench's ServiceProxy over a ChangeTracker, programming every node of
a namespace cluster, and the moment a node reflects a change is read from real traffic:

- N Services (the sweep's synthetic ones, no affinity) over a pool of two backend pods on
  each of NODES nodes; each Service's EndpointSlice holds three of the six pods, and a
  change moves it to the other three, so a connection tells which set served it.
- Changes are due at a steady `rate` (20 per second: CL2's default pod churn is of that
  order), each on a Service whose earlier change every node has already shown. The applier
  takes every change that is due and hands them to one `ServiceProxy.apply(slices=...)`,
  as kube-proxy batches what arrived during its last sync; a mode that syncs slower than
  changes come therefore batches more, and its latency shows the wait.
- A probe process in a client pod on every node opens connections, back to back (at most
  one per PROBE_GAP_S), to the ClusterIPs of the changes it has not seen yet; the first
  connection started after the change was due and answered by a pod of the new set is that
  node's moment. Between changes it keeps connecting to the Services changed last.
- Per change: latency = its due time to the latest node's moment (the SLI's "every node");
  a change some node did not show within `timeout_s` is counted `unprogrammed`. Every
  connection that failed (refused, reset, timed out after CONNECT_TIMEOUT_S, past the first
  SYN retransmission) is counted and kept with its node, address and time.

Rows: `churn_programming_latency_s` (p50, p90, p99 over the changes; `failed` connections,
`unprogrammed` and `changes` counts) and `churn_apply_s` (p50, p90, p99 of the apply calls;
`batch`: the median changes per call) per mode and size. `svcbench bench` runs it after each
mode's sweep (sizes from `--churn`); `python -m bench.churn --out RUN_DIR` adds it to a run
folder on its own.

Reference points (other machines, real clusters): kube-proxy nftables on the 100-node GCE
performance job, p50 1.5 s, p90 2.3 s, p99 6.8 s (kubernetes#124272); one new Service among
10,000 programmed in 141 ms after the nftables partial sync (kubernetes#126013).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.sweep import NAMESPACE_SCOPED, Row, percentile
from bench.synthetic import (
    BACKEND_PORT,
    NAMESPACE,
    NODEPORT_EVERY,
    SERVICE_PORT,
    endpoint_slice,
    pool_endpoints,
    pool_pods,
    synthetic_services,
)
from dataplanes.modes import mode_name

NODES = 3
POOL_PER_NODE = 2
ENDPOINTS = 3  # of the pool's six: a change moves a Service to the other three
RATE = 20.0  # changes per second
PROBE_GAP_S = 0.002  # a probe process opens at most one connection per gap ...
IDLE_GAP_S = 0.05  # ... and one per this while no change is waiting to be seen
CONNECT_TIMEOUT_S = 2.0  # past the first SYN retransmission (1 s): a lost SYN is not a failure
TIMEOUT_S = 30.0  # a change not seen from every node by then is unprogrammed
RECENT = 8  # Services the probes keep connecting to between changes
REPO_ROOT = str(Path(__file__).resolve().parents[1])
# seconds of changes per preset (sizes come from the sweep's --churn); `nox -s bench` runs
# the default with every host mode at 1,000 and 10,000 Services (README: time it takes)
SECONDS = {"quick": 2.0, "bench": 5.0, "default": 5.0, "nightly": 30.0}
SIZES = {"quick": (100,), "bench": (1000, 10000), "default": (1000, 10000),
         "nightly": (1000, 10000)}

Say = Callable[[str], None]


# --------------------------------------------------------------------------- the probe process


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def probe_main(node: str, gap_s: float, idle_s: float, connect_timeout: float) -> int:
    """Runs in a client pod (born in its network namespace): reads the changes to watch
    from stdin, one JSON object a line, and writes what it saw to stdout (module text)."""
    from clusters.workloads.probe import OK, tcp_sample

    pending: dict[int, dict] = {}
    order: deque[int] = deque()
    recent: deque[tuple[str, int]] = deque(maxlen=RECENT)
    connections = failed = 0
    buf = b""
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    _emit({"ready": node})
    stopping = False
    while not stopping:
        wait = 0.0 if pending else idle_s
        ready, _, _ = select.select([fd], [], [], wait)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # the parent went away
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if msg.get("stop"):
                    stopping = True
                elif "id" in msg:
                    pending[msg["id"]] = msg
                    order.append(msg["id"])
        if stopping:
            break
        if pending:
            cid = order[0]
            order.rotate(-1)
            if cid not in pending:
                order.remove(cid)
                continue
            target = pending[cid]
            ip, port = target["ip"], target["port"]
        elif recent:
            cid, target = None, None
            ip, port = recent[0]
            recent.rotate(-1)
        else:
            continue
        t0 = time.perf_counter_ns()
        sample = tcp_sample(ip, port, connect_timeout, b"", None)
        connections += 1
        if sample.outcome != OK:
            failed += 1
            _emit({"fail": cid, "ip": ip, "outcome": sample.outcome, "at": t0})
        elif target is not None and t0 >= target["since"] and sample.backend in target["want"]:
            _emit({"hit": cid, "at": t0})
            del pending[cid]
            order.remove(cid)
            if (ip, port) not in recent:
                recent.append((ip, port))
        if target is not None and cid in pending and t0 - target["since"] > target["timeout"] * 1e9:
            _emit({"miss": cid, "at": t0})
            del pending[cid]
            order.remove(cid)
        time.sleep(gap_s if pending else 0.0)
    _emit({"done": node, "connections": connections, "failed": failed})
    return 0


class Prober:
    """A probe process in one node's client pod, and a thread reading what it reports."""

    def __init__(self, node: str, netns: str, on_report: Callable[[str, dict], None],
                 gap_s: float = PROBE_GAP_S):
        from clusters.nsenter import in_netns

        self.node = node
        self.done: dict | None = None
        self.error = ""
        argv = [sys.executable, "-m", "bench.churn", "--probe", node, "--gap", str(gap_s)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        # Born on a thread inside the pod's namespace, the process lives there.
        self.proc = in_netns(netns, subprocess.Popen, argv, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             bufsize=1)
        self._ready = threading.Event()
        self._on_report = on_report
        self._reader = threading.Thread(target=self._read, name=f"churn-probe:{node}",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "ready" in msg:
                self._ready.set()
            elif "done" in msg:
                self.done = msg
            else:
                self._on_report(self.node, msg)
        self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"the probe on {self.node} did not start: "
                               f"{self.proc.stderr.read() if self.proc.poll() is not None else 'no answer'}")

    def watch(self, change: dict) -> None:
        self.proc.stdin.write(json.dumps(change) + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout)
        if self.proc.returncode not in (0, None) and not self.error:
            self.error = (self.proc.stderr.read() or "").strip()[-500:]


# --------------------------------------------------------------------------- one run


@dataclass
class Change:
    id: int
    service: str
    ip: str
    due_ns: int
    apply_ns: int = 0  # when the apply call that carried it started
    seen: dict[str, int | None] = field(default_factory=dict)  # node -> connection start

    def latency_s(self, nodes: Sequence[str]) -> float | None:
        """Due time to the latest node's first connection served by the new set."""
        if any(self.seen.get(n) is None for n in nodes):
            return None
        return (max(self.seen[n] for n in nodes) - self.due_ns) / 1e9


@dataclass
class ChurnResult:
    mode: str
    n: int
    rate: float
    seconds: float
    nodes: list[str]
    changes: list[Change]
    applies: list[dict]  # per apply call: start (ns), seconds, changes carried, node seconds
    failures: list[dict]  # every failed connection: node, address, outcome, at (s into the run)
    connections: int
    setup_s: float
    started_ns: int
    probe_errors: list[str] = field(default_factory=list)

    @property
    def latencies(self) -> list[float]:
        return [x for x in (c.latency_s(self.nodes) for c in self.changes) if x is not None]

    @property
    def unprogrammed(self) -> int:
        return sum(1 for c in self.changes if c.latency_s(self.nodes) is None)

    def rows(self, kernel: str) -> list[Row]:
        lat = self.latencies
        applied = [a["seconds"] for a in self.applies]
        batches = [a["changes"] for a in self.applies]
        span = max((c.due_ns for c in self.changes), default=self.started_ns) - self.started_ns
        extra = {"rate": self.rate, "seconds": self.seconds, "nodes": len(self.nodes),
                 "changes_per_s": round(len(self.changes) / (span / 1e9), 2) if span else None,
                 "connections": self.connections, "applies": len(self.applies),
                 "setup_s": round(self.setup_s, 3),
                 "per_node_p50_s": {n: _p(self._node_latencies(n), 0.5) for n in self.nodes}}
        base = dict(mode=self.mode, kernel=kernel, n_services=self.n, repeat=0)
        rows = [Row(**base, metric="churn_programming_latency_s", stat=stat,
                    value=_p(lat, q), unit="s", extra=extra)
                for stat, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))]
        rows += [Row(**base, metric="churn_programming_latency_s", stat="failed",
                     value=len(self.failures), unit="connections", extra=extra),
                 Row(**base, metric="churn_programming_latency_s", stat="unprogrammed",
                     value=self.unprogrammed, unit="changes", extra=extra),
                 Row(**base, metric="churn_programming_latency_s", stat="changes",
                     value=len(self.changes), unit="changes", extra=extra)]
        rows += [Row(**base, metric="churn_apply_s", stat=stat, value=_p(applied, q), unit="s",
                     extra={"applies": len(applied)})
                 for stat, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))]
        rows.append(Row(**base, metric="churn_apply_s", stat="batch",
                        value=_p([float(b) for b in batches], 0.5), unit="changes",
                        extra={"max": max(batches, default=0)}))
        return rows

    def _node_latencies(self, node: str) -> list[float]:
        return [(c.seen[node] - c.due_ns) / 1e9 for c in self.changes
                if c.seen.get(node) is not None]

    def raw(self) -> dict[str, Any]:
        t0 = self.started_ns
        return {"mode": self.mode, "phase": f"churn-n{self.n}", "metric": "churn",
                "n_services": self.n, "rate": self.rate, "seconds": self.seconds,
                "nodes": self.nodes, "setup_s": self.setup_s,
                "changes": [{"id": c.id, "service": c.service, "due_s": (c.due_ns - t0) / 1e9,
                             "queued_s": (c.apply_ns - c.due_ns) / 1e9 if c.apply_ns else None,
                             "seen_s": {n: None if v is None else round((v - c.due_ns) / 1e9, 6)
                                        for n, v in c.seen.items()},
                             "latency_s": c.latency_s(self.nodes)} for c in self.changes],
                "applies": [{**a, "start_s": (a["start_ns"] - t0) / 1e9} for a in self.applies],
                "failures": self.failures, "connections": self.connections,
                "probe_errors": self.probe_errors}


def _p(values: list[float], q: float) -> float:
    return round(percentile(values, q), 6) if values else float("nan")


def run_churn(mode: str, n: int, seconds: float, *, rate: float = RATE, dp: Any = None,
              backend: str | None = None, timeout_s: float = TIMEOUT_S, seed: int = 7,
              say: Say = lambda _m: None) -> ChurnResult:
    """One churn run of `mode` at `n` Services on a cluster of its own (module text).

    `dp` is the data plane to program (default: a fresh one of `mode`)."""
    from clusters.netns import NetnsCluster
    from dataplanes.modes import make
    from dataplanes.proxy import ServiceProxy
    from kube.model import Node, Pod
    from kube.tracker import ChangeTracker

    dp = dp if dp is not None else make(mode, backend=backend)
    nodes = [Node.numbered(k) for k in range(1, NODES + 1)]
    names = [node.name for node in nodes]
    clients = [Pod(NAMESPACE, f"churn-client-{name}", {"app": "churn-client"}, node_name=name)
               for name in names]
    tracker = ChangeTracker(nodes)
    tracker.apply(pods=[*clients, *pool_pods(names, POOL_PER_NODE)])
    pods = sorted(tracker.pods.values(), key=lambda p: p.name)
    pool = [p for p in pods if p.labels.get("app") == "backend"]
    services, slices = synthetic_services(n, pool, ENDPOINTS, NODEPORT_EVERY, 0, BACKEND_PORT)
    moved = [False] * n
    lock = threading.Lock()
    changes: dict[int, Change] = {}
    failures: list[dict] = []
    waiting: set[int] = set()  # Service indexes whose change some node has not shown yet
    by_service: dict[int, int] = {}  # change id -> Service index

    def on_report(node: str, msg: dict) -> None:
        with lock:
            if "fail" in msg:
                failures.append({"node": node, "ip": msg["ip"], "outcome": msg["outcome"],
                                 "at_ns": msg["at"], "change": msg["fail"]})
                return
            change = changes.get(msg.get("hit", msg.get("miss")))
            if change is None:
                return
            change.seen[node] = msg["at"] if "hit" in msg else None
            if len(change.seen) == len(names):
                waiting.discard(by_service[change.id])

    applies: list[dict] = []
    started = time.perf_counter_ns()
    setup_s = 0.0
    with NetnsCluster.create(NODES, progress=say) as cluster:
        cluster.set_pods(pods)
        proxy = ServiceProxy(dp, cluster.nodes, tracker)
        probers: list[Prober] = []
        try:
            say(f"{mode}: churn: programming {n:,} Services on {NODES} nodes")
            t0 = time.perf_counter()
            proxy.install()
            proxy.replace(services=services, slices=slices,
                          side_by_side=mode_name(mode) in NAMESPACE_SCOPED)
            setup_s = time.perf_counter() - t0
            for client in clients:
                probers.append(Prober(client.node_name,
                                      cluster.pod_netns(NAMESPACE, client.name), on_report))
            for prober in probers:
                prober.wait_ready()
            vips = [tracker.services[s.key].cluster_ip for s in services]
            order = list(range(n))
            random.Random(seed).shuffle(order)
            queue = deque(order)  # the Services in the order they change, round and round
            total = max(1, round(rate * seconds))
            say(f"{mode}: churn: {total} endpoint changes at {rate:g}/s among {n:,} Services")
            started = time.perf_counter_ns() + 50_000_000
            schedule = started  # when change 0 is due; pushed back while no Service is free
            next_id = 0
            while next_id < total:
                now = time.perf_counter_ns()
                batch: list[Change] = []
                changed = []
                while next_id < total and schedule + int(next_id * 1e9 / rate) <= now:
                    with lock:
                        pick = next((i for i in queue if i not in waiting), None)
                    if pick is None:
                        # Every Service has a change some node has not shown yet (few
                        # Services, a slow mode): the rest of the schedule waits for one.
                        schedule += 5_000_000
                        break
                    queue.remove(pick)
                    queue.append(pick)
                    moved[pick] = not moved[pick]
                    members = pool_endpoints(pool, pick, ENDPOINTS)
                    if moved[pick]:
                        members = [p for p in pool if p not in members]
                    change = Change(next_id, services[pick].name, vips[pick],
                                    schedule + int(next_id * 1e9 / rate))
                    with lock:
                        changes[next_id] = change
                        by_service[next_id] = pick
                        waiting.add(pick)
                    want = sorted(f"{NAMESPACE}/{p.name}" for p in members)
                    for prober in probers:
                        prober.watch({"id": next_id, "ip": change.ip, "port": SERVICE_PORT,
                                      "want": want, "since": change.due_ns,
                                      "timeout": timeout_s})
                    changed.append(endpoint_slice(services[pick].name, members, BACKEND_PORT))
                    batch.append(change)
                    next_id += 1
                if not batch:
                    due = schedule + int(next_id * 1e9 / rate)
                    time.sleep(min(max(due - time.perf_counter_ns(), 0) / 1e9, 0.005) or 0.001)
                    continue
                # Everything due since the last apply goes in one call, as kube-proxy syncs
                # what arrived while it was busy.
                start_ns = time.perf_counter_ns()
                for change in batch:
                    change.apply_ns = start_ns
                # Every node runs its own proxy: the nodes sync at once, where the mode's
                # state is all inside each node's namespace.
                synced = proxy.apply(slices=changed, side_by_side=mode_name(mode) in NAMESPACE_SCOPED)
                applies.append({"start_ns": start_ns,
                                "seconds": (time.perf_counter_ns() - start_ns) / 1e9,
                                "changes": len(batch),
                                "nodes": {s.node: round(s.seconds, 6) for s in synced}})
            # every change seen (or given up) by every node, then the probes stop
            deadline = time.monotonic() + timeout_s + 5.0
            while time.monotonic() < deadline:
                with lock:
                    if not waiting:
                        break
                time.sleep(0.05)
        finally:
            for prober in probers:
                prober.stop()
            proxy.uninstall()
    connections = sum((p.done or {}).get("connections", 0) for p in probers)
    errors = [f"{p.node}: {p.error}" for p in probers if p.error]
    for f in failures:
        f["at_s"] = round((f.pop("at_ns") - started) / 1e9, 6)
    return ChurnResult(mode, n, rate, seconds, names, [changes[k] for k in sorted(changes)],
                       applies, failures, connections, setup_s, started, errors)


# --------------------------------------------------------------------------- entry point


def churn_modes(modes: Sequence[str], sizes: Sequence[int], seconds: float, rate: float = RATE,
                say: Say = lambda _m: None,
                on_result: Callable[[ChurnResult], None] | None = None
                ) -> tuple[list[Row], dict[str, Any]]:
    """Every mode at every size: (rows, status per mode). A mode this host cannot run is
    skipped with the reason; one that fails is recorded, and the others still run."""
    from bench.sweep import ModeUnavailable, host_kernel_label, load_mode

    rows: list[Row] = []
    status: dict[str, Any] = {}
    for mode in modes:
        try:
            load_mode(mode)
        except ModeUnavailable as exc:
            status[mode] = {"status": "skipped", "reason": str(exc)}
            say(f"{mode}: churn skipped: {exc}")
            continue
        started = time.perf_counter()
        try:
            for n in sizes:
                result = run_churn(mode, n, seconds, rate=rate, say=say)
                rows += result.rows(host_kernel_label())
                if on_result:
                    on_result(result)
        except Exception as exc:  # noqa: BLE001 - one mode failing leaves the others to run
            status[mode] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        status[mode] = {"status": "done", "seconds": round(time.perf_counter() - started, 1)}
    return rows, status


def main(argv: list[str] | None = None) -> int:
    from dataplanes.modes import UnknownMode, parse_modes

    parser = argparse.ArgumentParser(prog="python -m bench.churn",
                                     description="Network programming latency while endpoints "
                                                 "change at a steady rate, every mode.")
    parser.add_argument("--probe", metavar="NODE", help=argparse.SUPPRESS)
    parser.add_argument("--gap", type=float, default=PROBE_GAP_S, help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="iptables,nftables,ebpf,userspace",
                        help="comma-separated proxy modes (default: the host's four)")
    parser.add_argument("--preset", default="default", choices=sorted(SECONDS))
    parser.add_argument("--services", help="comma-separated numbers of Services "
                                            "(default: the preset's, 1,000 and 10,000)")
    parser.add_argument("--seconds", type=float, help="seconds of changes per size "
                                                      "(default: the preset's)")
    parser.add_argument("--rate", type=float, default=RATE, help="changes per second (20)")
    parser.add_argument("--out", metavar="RUN_DIR", help="a run folder of `svcbench bench`: "
                        "the rows are added to its bench.csv, the samples to raw/")
    args = parser.parse_args(argv)
    if args.probe:
        return probe_main(args.probe, args.gap, IDLE_GAP_S, CONNECT_TIMEOUT_S)
    try:  # mode specs, as `svcbench bench --modes` takes them (ipvs:rr,ipvs:lc)
        modes, bad = [s.label for s in parse_modes(args.modes)], None
    except UnknownMode as exc:
        modes, bad = [], str(exc)
    try:
        sizes = ([int(x) for x in args.services.split(",") if x.strip()] if args.services
                 else list(SIZES[args.preset]))
    except ValueError:
        sizes = []
    seconds = args.seconds if args.seconds is not None else SECONDS[args.preset]
    problem = (bad if bad else
               f"--services must be whole numbers from 1 to 60,000, not {args.services!r}"
               if not sizes or not all(1 <= n <= 60000 for n in sizes) else
               f"--seconds must be from 0.5 to 3600, not {seconds}"
               if not 0.5 <= seconds <= 3600 else
               f"--rate must be from 0.5 to 1000 changes per second, not {args.rate}"
               if not 0.5 <= args.rate <= 1000 else None)
    run_dir = Path(args.out) if args.out else None
    from reports.results import RUN_JSON

    if problem is None and run_dir is not None and not (run_dir / RUN_JSON).is_file():
        problem = f"--out {str(run_dir)!r} is not a run folder (no {RUN_JSON})"
    if problem:
        print(f"svcbench: {problem}", file=sys.stderr)
        return 2
    results: list[ChurnResult] = []
    rows, status = churn_modes(modes, sizes, seconds, args.rate,
                               say=lambda m: print(m, file=sys.stderr, flush=True),
                               on_result=results.append)
    if run_dir is not None:
        add_to_run(run_dir, rows, results, status)
    for r in rows:
        if r.unit == "s" or r.stat in ("failed", "unprogrammed", "changes", "batch"):
            print(f"{r.mode:10} {r.n_services:>7,} {r.metric:30} {r.stat:12} {r.value:g} {r.unit}")
    for mode, st in status.items():
        if st["status"] != "done":
            print(f"{mode}: churn {st['status']}: {st['reason']}", file=sys.stderr)
    return 1 if any(st["status"] == "failed" for st in status.values()) else 0


def add_to_run(run_dir: Path, rows: Sequence[Row], results: Sequence[ChurnResult],
               status: dict[str, Any]) -> None:
    """Rows into run_dir's bench.csv, samples into raw/<mode>/churn-n<N>.json, the status
    into run.json under `churn` (each write atomic)."""
    from reports.results import (
        RAW_DIR,
        RUN_JSON,
        append_bench_csv,
        read_json,
        write_json,
        write_run_json,
    )

    append_bench_csv(run_dir, (r.as_dict() for r in rows))
    for result in results:
        write_json(run_dir / RAW_DIR / result.mode / f"churn-n{result.n}.json", [result.raw()])
    meta = read_json(run_dir / RUN_JSON) if (run_dir / RUN_JSON).exists() else {}
    meta.setdefault("churn", {}).update(status)
    write_run_json(run_dir, meta)


if __name__ == "__main__":
    sys.exit(main())
