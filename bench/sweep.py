"""The Service-count sweep: one cluster per mode, reused across sizes.

Every measurement becomes a `Row`; the runner never analyses (reports/ does).
Topology: the client pod on node1, every backend of the pool on node2, so each
connection - to a ClusterIP or straight to a pod IP - crosses the same path, and the
floor (pod IP, no Services programmed) is measured at the start and the end of each
mode's sweep.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from bench.synthetic import NAMESPACE, SERVICE_PORT, pool_pods, synthetic_services
from clusters.netns import NetnsCluster
from clusters.nsenter import in_netns
from clusters.workloads.probe import probe
from dataplanes.base import Host
from dataplanes.modes import make
from kube.model import Node, Pod
from kube.state import ClusterState

CLIENT = Pod(NAMESPACE, "client", {"app": "client"}, node_name="node1")
BACKEND_PORT = 8080


@dataclass
class Row:
    mode: str
    kernel: str
    n_services: int
    metric: str
    stat: str
    value: float
    unit: str
    repeat: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepConfig:
    modes: list[str]
    sizes: list[int]
    endpoints: int = 3
    count: int = 300  # connections per latency sample
    backend: str | None = None
    pool_size: int = 6


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _latency_rows(base: dict, metric: str, samples, target: str) -> list[Row]:
    ok = [s.latency_us for s in samples if s.outcome == "ok"]
    failed = len(samples) - len(ok)
    rows = [
        Row(**base, metric=metric, stat=stat, value=round(percentile(ok, q), 1), unit="us",
            extra={"target": target})
        for stat, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
    ]
    rows.append(Row(**base, metric=metric, stat="failed", value=failed, unit="connections",
                    extra={"target": target}))
    return rows


def measure_cluster_lifecycle(nodes: int, pods_per_node: int) -> dict[str, float]:
    """Seconds to bring a cluster with backends up, and to take it down."""
    node_objs = [Node.numbered(k) for k in range(1, nodes + 1)]
    pods = [Pod("default", f"p-{n.name}-{i}", node_name=n.name) for n in node_objs
            for i in range(pods_per_node)]
    state = ClusterState.build(node_objs, pods)
    t0 = time.perf_counter()
    cluster = NetnsCluster.create(nodes)
    try:
        cluster.set_pods(list(state.pods))
        up = time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        cluster.destroy()
        down = time.perf_counter() - t1
    return {"up_s": up, "down_s": down}


def sweep_mode(cfg: SweepConfig, mode: str, progress: Callable[[str], None]) -> list[Row]:
    dp = make(mode, backend=cfg.backend)
    missing = dp.missing(Host())
    if missing:
        raise RuntimeError(f"mode {mode} cannot run here: " + "; ".join(missing))
    kernel = os.uname().release
    nodes = [Node.numbered(1), Node.numbered(2)]
    pods = [CLIENT, *pool_pods(["node2"], cfg.pool_size)]
    base_state = ClusterState.build(nodes, pods)
    pool = [p for p in base_state.pods if p.name != CLIENT.name]
    floor_ip = pool[0].ip
    rows: list[Row] = []
    with NetnsCluster.create(len(nodes), progress=progress) as cluster:
        cluster.set_pods(list(base_state.pods))
        client_ns = cluster.pod_netns(NAMESPACE, CLIENT.name)
        for node in cluster.nodes:
            dp.install(node)

        def conn(ip: str) -> list:
            return in_netns(client_ns, probe, ip, BACKEND_PORT if ip == floor_ip else SERVICE_PORT,
                            count=cfg.count).samples

        def program(state: ClusterState, n: int, when: str = "") -> None:
            for node in cluster.nodes:
                stats = dp.sync(node, state.node_view(node.name))
                base = dict(mode=mode, kernel=kernel, n_services=n,
                            extra={"node": node.name, "when": when})
                rows.append(Row(**base, metric="sync_s", stat="full" if stats.full else "partial",
                                value=round(stats.seconds, 6), unit="s"))
                rows.append(Row(**base, metric="rules", stat="count", value=stats.rules,
                                unit="rules"))

        def floor(when: str) -> None:
            program(base_state, 0, when)
            progress(f"{mode}: floor ({when})")
            for row in _latency_rows(dict(mode=mode, kernel=kernel, n_services=0),
                                     "floor_conn_latency_us", conn(floor_ip), floor_ip):
                row.extra["when"] = when
                rows.append(row)

        floor("start")
        for n in cfg.sizes:
            progress(f"{mode}: programming {n} services")
            services, slices = synthetic_services(n, pool, cfg.endpoints)
            state = ClusterState.build(nodes, base_state.pods, services, slices)
            program(state, n)
            first, last = state.services[0], state.services[-1]
            base = dict(mode=mode, kernel=kernel, n_services=n)
            progress(f"{mode}: probing at {n} services")
            rows.extend(_latency_rows(base, "conn_latency_us:first", conn(first.cluster_ip),
                                      first.cluster_ip))
            rows.extend(_latency_rows(base, "conn_latency_us:last", conn(last.cluster_ip),
                                      last.cluster_ip))
            rows.extend(_latency_rows(base, "podip_conn_latency_us", conn(floor_ip), floor_ip))
        floor("end")
        for node in cluster.nodes:
            dp.uninstall(node)
    return rows


LATENCY_COLUMNS = {
    "floor_conn_latency_us": "floor",
    "conn_latency_us:first": "first svc",
    "conn_latency_us:last": "last svc",
    "podip_conn_latency_us": "pod IP",
}


def summarize(rows: list[Row]) -> list[dict]:
    """One line per (mode, size, floor start/end): sync time and p50/p99 of each target."""
    lines: dict[tuple, dict] = {}
    for r in rows:
        when = r.extra.get("when", "")
        line = lines.setdefault((r.mode, r.n_services, when),
                                {"mode": r.mode, "services": f"{r.n_services}{' ' + when if when else ''}"})
        if r.metric == "sync_s":
            line["sync ms"] = round(max(line.get("sync ms", 0.0), r.value * 1000), 1)
        elif r.metric in LATENCY_COLUMNS and r.stat in ("p50", "p99"):
            line[f"{LATENCY_COLUMNS[r.metric]} {r.stat} µs"] = r.value
    return list(lines.values())
