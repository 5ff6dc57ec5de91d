"""The Service-count sweep: one cluster per mode, reused across sizes.

Every measurement becomes a `Row`; the sweep never analyses (reports/ does).
Topology: the client pod on node1, every backend of the pool on node2, so each
connection - to a ClusterIP or straight to a pod IP - crosses the same path. The floor
takes that path too, from a client pod on node3 to a pod on node4, two nodes the mode
never programs, and is measured at every size interleaved with the Service connections,
so what the Services add is a difference taken at the same moments. Each repeat is a pass
over the sizes, up by adding Services and back down by removing them. node1 and node2 are
programmed through dataplanes/proxy.py's ServiceProxy over a ChangeTracker, as the CLI
programs a cluster: a mode with `update` only writes what changed. What is measured at
each size is declared in bench/metrics.py; `Bench` is the fixture those declarations use.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.probes import (
    CLK_TCK,
    BackendWatch,
    ConnectionRun,
    host_kernel_ticks,
    new_connections,
    process_sys_ticks,
)
from bench.synthetic import (
    AFFINITY_EVERY,
    BACKEND_PORT,
    NAMESPACE,
    NODEPORT_EVERY,
    SERVICE_PORT,
    endpoint_slice,
    pool_endpoints,
    pool_pods,
    synthetic_services,
)
from clusters.netns import NetnsCluster
from clusters.nsenter import in_netns
from dataplanes.base import Host, SyncStats
from dataplanes.modes import make, mode_name
from dataplanes.proxy import ServiceProxy
from kube.model import EndpointSlice, Node, Pod, Service
from kube.state import ClusterState
from kube.tracker import ChangeTracker

CLIENT = Pod(NAMESPACE, "client", {"app": "client"}, node_name="node1")
# The floor: the same pod-to-pod path across the underlay, between two nodes the mode never
# touches (on a programmed iptables node even pod-IP traffic walks KUBE-SERVICES).
FLOOR_CLIENT = Pod(NAMESPACE, "floor-client", {"app": "floor"}, node_name="node3")
FLOOR_BACKEND = Pod(NAMESPACE, "floor-backend", {"app": "floor"}, node_name="node4")
NODES = 4  # node1 (client) and node2 (pool) are programmed; node3 and node4 carry the floor
PROGRAMMED = 2
# Modes whose whole kernel state lives in the node's network namespace: deleting a scratch
# namespace removes what they programmed, so their (slow at scale) uninstall is skipped there.
NAMESPACE_SCOPED = frozenset({"iptables", "nftables", "ipvs"})
PROGRAMMING_TIMEOUT_S = 30.0  # longest wait, after the sync returned, for the new endpoint
MEMINFO_KEYS = ("SUnreclaim", "VmallocUsed", "Percpu")  # kernel memory a ruleset or map takes
FLOOR_BLOCK = 10  # Bench.interleaved: rounds of the Service targets between floor blocks


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
    repeats: int = 1
    metrics: tuple[str, ...] | None = None  # None: every metric of bench.metrics
    load_seconds: float = 2.0  # locust window per throughput sample
    load_repeats: int = 1
    rr_count: int = 200  # round trips per rr_latency sample
    seed: int = 7


class ModeUnavailable(RuntimeError):
    """The mode cannot run on this host; the message is the reason recorded in run.json."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(rows: Sequence[Row | dict]) -> list[dict[str, Any]]:
    """Median and spread (min-max) per (mode, metric, stat, size)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        d = r if isinstance(r, dict) else r.as_dict()
        key = (d["mode"], d["metric"], d["stat"], d["n_services"], d["unit"])
        groups.setdefault(key, []).append(float(d["value"]))
    return [
        {"mode": mode, "metric": metric, "stat": stat, "services": n, "unit": unit,
         "median": round(percentile(v, 0.5), 4), "min": round(min(v), 4), "max": round(max(v), 4),
         "repeats": len(v)}
        for (mode, metric, stat, n, unit), v in sorted(groups.items())
    ]


def kernel_memory_bytes() -> int:
    """Unreclaimable slab + vmalloc + per-cpu memory of the whole host (/proc/meminfo)."""
    total = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in MEMINFO_KEYS:
                total += int(rest.split()[0]) * 1024
    return total


def load_mode(mode: str, backend: str | None = None):
    """The mode's data plane, or ModeUnavailable saying why it cannot run here."""
    try:
        dp = make(mode, backend=backend)
    except ImportError as exc:
        raise ModeUnavailable(f"its data plane does not load here ({exc})") from None
    missing = dp.missing(Host())
    if missing:
        raise ModeUnavailable("; ".join(missing))
    return dp


# --------------------------------------------------------------------------- the fixture


@dataclass
class ScratchSync:
    """One full sync from empty on a fresh node namespace."""

    seconds: float
    stats: SyncStats
    kernel_bytes_delta: int
    reported_bytes: int | None
    uninstall_s: float | None


@dataclass
class EndpointChange:
    """One Service's EndpointSlice changed through ServiceProxy.apply, watched by a probe
    from the client pod on node1."""

    direction: str  # "replace": its endpoints become one other pod; "restore": back again
    sync_s: float  # node1's SyncStats.seconds: the mode's update (or sync) of node1
    programming_s: float | None  # None: the new endpoint never answered in time
    stats: SyncStats
    watched: int  # probe connections made while waiting
    apply_s: float = 0.0  # the whole apply call: the tracker and every node's update
    synced: list[str] = field(default_factory=list)  # the nodes it synced


@dataclass
class NoopApply:
    """The same objects applied again through ServiceProxy: wall time of the whole call."""

    every_s: float  # every Service and slice (what an informer's relist hands kube-proxy)
    one_s: float  # the last Service and its slice (one event that changes nothing)
    synced: list[str]  # nodes synced: none, when the tracker finds nothing changed


@dataclass
class Resync:
    """ServiceProxy.resync of unchanged state: a full sync of each programmed node."""

    stats: SyncStats  # node1's
    wall_s: float  # both nodes, one after the other
    per_node: dict[str, float]


class Bench:
    """One mode's cluster across the sweep: what metrics measure, and how the sizes grow.

    The cluster is programmed as the CLI programs one: through `dataplanes/proxy.py`'s
    ServiceProxy over a `kube.tracker.ChangeTracker`. Growing to N Services is one
    `replace`, an endpoint change one `apply` of the changed EndpointSlice, so a mode's
    `update` is what `sync_one_s` measures once the mode has one; the scratch full sync is a
    full sync on a fresh node.
    """

    def __init__(self, cfg: SweepConfig, mode: str, dp: Any, cluster: NetnsCluster, kernel: str):
        self.cfg = cfg
        self.mode = mode
        self.dp = dp
        self.cluster = cluster
        self.kernel = kernel
        self.nodes = [Node.numbered(k) for k in range(1, NODES + 1)]
        self.tracker = ChangeTracker(self.nodes)
        self.tracker.apply(pods=[CLIENT, FLOOR_CLIENT, FLOOR_BACKEND,
                                 *pool_pods(["node2"], cfg.pool_size)])
        self.pods = sorted(self.tracker.pods.values(), key=lambda p: (p.namespace, p.name))
        self.pool = [p for p in self.pods if p.labels.get("app") == "backend"]
        self.client = self.tracker.pods[CLIENT.key]
        self.pod_ip = self.pool[0].ip  # a pool pod's IP: what programmed nodes do to pod traffic
        self.floor_ip = self.tracker.pods[FLOOR_BACKEND.key].ip
        self.proxy = ServiceProxy(dp, list(cluster.nodes[:PROGRAMMED]), self.tracker)
        self.services: list[Service] = []  # as the tracker allocated them, svc-00000 first
        self.slices: list[EndpointSlice] = []  # what the tracker holds now, in the same order
        self._given: list[Service] = []  # the Services as applied (no ClusterIPs given)
        self.n = 0
        self._memo: dict[tuple, Any] = {}
        self._changed = False  # the last Service's endpoints are moved (endpoint_change)
        self._tracer: Any = None

    # ------------------------------------------------------------------ cluster

    def start(self) -> None:
        self.cluster.set_pods(self.pods)
        self.client_ns = self.cluster.pod_netns(NAMESPACE, CLIENT.name)
        self.floor_client_ns = self.cluster.pod_netns(NAMESPACE, FLOOR_CLIENT.name)

    @property
    def programmed(self) -> list:
        """The nodes the mode runs on; the rest carry the floor."""
        return list(self.proxy.nodes)

    @property
    def installed(self) -> bool:
        return bool(self.proxy.installed)

    def install(self) -> None:
        """The mode on node1 and node2, each with its first (full) sync of no Services."""
        self.proxy.install()
        self.proxy.resync()

    def uninstall(self) -> float:
        started = time.perf_counter()
        self.proxy.uninstall()
        return time.perf_counter() - started

    def grow(self, n: int) -> list[SyncStats]:
        """Program both nodes with Services 0..n-1: the ones already there are kept, the
        ones past n-1 removed (one ServiceProxy.replace)."""
        services, slices = synthetic_services(n, self.pool, self.cfg.endpoints,
                                              NODEPORT_EVERY, AFFINITY_EVERY, BACKEND_PORT)
        stats = self.proxy.replace(services=services, slices=slices,
                                   side_by_side=mode_name(self.mode) in NAMESPACE_SCOPED)
        self._given, self.slices = services, slices
        self.services = [self.tracker.services[s.key] for s in services]
        self.n = n
        self._memo.clear()
        self._changed = False
        return stats

    def settle(self) -> None:
        """Undo what an endpoint change left (the last Service moved), so the next visit of
        this size measures the Services `grow` programmed: one apply of its slice."""
        if self._changed:
            restored = endpoint_slice(self.services[-1].name,
                                      pool_endpoints(self.pool, self.n - 1, self.cfg.endpoints),
                                      BACKEND_PORT)
            self.proxy.apply(slices=[restored])
            self.slices[-1] = restored
            self._changed = False

    # ------------------------------------------------------------------ targets

    def endpoints_of(self, target: str) -> list[tuple[str, int]]:
        services = self.services
        if target == "pod":
            return [(self.pod_ip, BACKEND_PORT)]
        if target == "floor":
            return [(self.floor_ip, BACKEND_PORT)]
        if not services:
            raise ValueError(f"target {target!r} needs Services; none are programmed")
        if target == "first":
            return [(services[0].cluster_ip, SERVICE_PORT)]
        if target == "last":
            return [(services[-1].cluster_ip, SERVICE_PORT)]
        if target == "random":
            return [(s.cluster_ip, SERVICE_PORT) for s in services]
        raise ValueError(f"unknown target {target!r}")

    def address(self, target: str) -> str:
        """The IP a target stands for in bench.csv ("random" has none)."""
        return "" if target == "random" else self.endpoints_of(target)[0][0]

    # ------------------------------------------------------------------ traffic

    def connections(self, target: str, count: int, repeat: int) -> ConnectionRun:
        pick = "random" if target == "random" else "cycle"
        return in_netns(self.client_ns, new_connections, self.endpoints_of(target), count,
                        pick=pick, seed=self.cfg.seed * 1000 + repeat)

    def interleaved(self, target: str, repeat: int) -> ConnectionRun:
        """`count` new connections to `target`, taken from one run that goes round the
        first Service, the last, a random one and the pod IP, one connection each, with the
        floor's connections in blocks between every FLOOR_BLOCK rounds.

        The targets of a size share the instants of the run: the VM's latency drifts for
        seconds at a time, so targets measured one after the other would differ by when
        they were measured as much as by the rules their packets walk. The floor leaves from
        another namespace; the connection right after the thread switches namespaces runs
        about 10 us slower (measured: 41 against 28 us p50), so the floor comes in blocks
        of FLOOR_BLOCK (about 5 ms, far inside the drift's seconds) and the first connection
        after each switch is a warm-up that no target counts.
        """
        key = ("interleaved", repeat)
        if key not in self._memo:
            rng = random.Random(self.cfg.seed * 1000 + repeat)
            here = {t: (*self.endpoints_of(t)[0], self.client_ns) for t in ("first", "last", "pod")}
            floor = (*self.endpoints_of("floor")[0], self.floor_client_ns)
            every = self.endpoints_of("random")
            plan: list[tuple[str, int, str]] = []
            labels: list[str | None] = []
            for start in range(0, self.cfg.count, FLOOR_BLOCK):
                rounds = min(FLOOR_BLOCK, self.cfg.count - start)
                plan.append(here["first"])
                labels.append(None)
                for _ in range(rounds):
                    pick = (*every[rng.randrange(len(every))], self.client_ns)
                    plan += [here["first"], here["last"], pick, here["pod"]]
                    labels += ["first", "last", "random", "pod"]
                plan += [floor] * (rounds + 1)
                labels += [None] + ["floor"] * rounds
            run = in_netns(self.client_ns, new_connections, plan, len(plan))
            self._memo[key] = run.dealt(labels)
        return self._memo[key][target]

    def agent_pids(self) -> list[int]:
        return [n["agent"]["pid"] for n in self.cluster.state["nodes"] if n.get("agent")]

    def cpu_per_connection(self, target: str, count: int, repeat: int) -> dict[str, Any]:
        """Kernel CPU of `count` new connections: probe thread + echo agents, and host-wide."""
        agents = self.agent_pids()
        host0 = host_kernel_ticks()
        agent0 = sum(process_sys_ticks(p) for p in agents)
        run = self.connections(target, count, repeat)
        agent1 = sum(process_sys_ticks(p) for p in agents)
        host1 = host_kernel_ticks()
        ok = max(1, count - run.failed)
        tasks_s = run.thread_sys_s + (agent1 - agent0) / CLK_TCK
        return {
            "tasks_us": tasks_s * 1e6 / ok,
            "host_us": (host1 - host0) / CLK_TCK * 1e6 / ok,
            "run": run,
            "thread_sys_s": run.thread_sys_s,
            "agents_sys_s": (agent1 - agent0) / CLK_TCK,
            "host_sys_s": (host1 - host0) / CLK_TCK,
        }

    def handshake_tracer(self):
        """The sweep's one sock:inet_sock_set_state tracer for the client pod (started once)."""
        if self._tracer is None:
            from bench.trace import HandshakeTrace

            self._tracer = HandshakeTrace(self.client.ip)
        return self._tracer

    def close(self) -> None:
        if self._tracer is not None:
            self._tracer.close()
            self._tracer = None

    # ------------------------------------------------------------------ programming

    def scratch_sync(self, repeat: int) -> ScratchSync:
        """Program all N Services from empty on a fresh, agentless node namespace."""
        key = ("scratch", repeat)
        if key not in self._memo:
            self._memo[key] = self._scratch_sync()
        return self._memo[key]

    def _scratch_sync(self) -> ScratchSync:
        self.tracker.node_view("node1")  # svcbench's own work (cached) stays outside the timing
        fresh = make(self.mode, backend=self.cfg.backend)
        with NetnsCluster.create(1, agents=False) as scratch:
            proxy = ServiceProxy(fresh, [scratch.nodes[0]], self.tracker)  # its node1
            before = kernel_memory_bytes()
            proxy.install()
            started = time.perf_counter()
            (stats,) = proxy.resync()  # the first sync after install: a full one
            seconds = time.perf_counter() - started
            delta = kernel_memory_bytes() - before
            reported = None
            if callable(getattr(fresh, "kernel_bytes", None)):
                reported = fresh.kernel_bytes(scratch.nodes[0])
            elif isinstance(stats.extra.get("kernel_bytes"), int):
                reported = stats.extra["kernel_bytes"]
            uninstall_s = None
            if mode_name(self.mode) not in NAMESPACE_SCOPED:
                t0 = time.perf_counter()
                proxy.uninstall()
                uninstall_s = time.perf_counter() - t0
        return ScratchSync(seconds, stats, delta, reported, uninstall_s)

    def endpoint_change(self, repeat: int) -> EndpointChange:
        """Even repeats move the last Service to one other pool pod, odd ones move it back."""
        key = ("change", repeat)
        if key not in self._memo:
            self._memo[key] = self._endpoint_change("replace" if repeat % 2 == 0 else "restore")
        return self._memo[key]

    def _endpoint_change(self, direction: str) -> EndpointChange:
        n = self.n
        last = self.services[-1]
        old = pool_endpoints(self.pool, n - 1, self.cfg.endpoints)
        other = [self.pool[(n - 1 + self.cfg.endpoints) % len(self.pool)]]
        if direction == "replace" or not self._changed:
            direction = "replace"
            pods = other
        else:
            pods = old
        changed = endpoint_slice(last.name, pods, BACKEND_PORT)
        wanted = {f"{NAMESPACE}/{p.name}" for p in pods}
        with BackendWatch(self.client_ns, last.cluster_ip, SERVICE_PORT) as watch:
            time.sleep(0.02)
            t0 = time.perf_counter_ns()
            synced = self.proxy.apply(slices=[changed])
            apply_s = (time.perf_counter_ns() - t0) / 1e9
            self._changed = direction == "replace"
            self.slices[-1] = changed
            hit = watch.wait_for(wanted, t0, PROGRAMMING_TIMEOUT_S)
        programming = (hit.start_ns - t0) / 1e9 if hit else None
        stats = node_stats(synced, "node1")
        return EndpointChange(direction, stats.seconds, programming, stats, len(watch.samples),
                              apply_s, [s.node for s in synced])

    def noop(self, repeat: int) -> NoopApply:
        """The objects the tracker holds applied again: every Service and slice (a relist),
        and the last Service with its slice (one event). Nothing changed: no node syncs."""
        key = ("noop", repeat)
        if key not in self._memo:
            t0 = time.perf_counter()
            every = self.proxy.replace(services=self._given, slices=self.slices)
            t1 = time.perf_counter()
            one = self.proxy.apply(services=self._given[-1:], slices=self.slices[-1:])
            t2 = time.perf_counter()
            self._memo[key] = NoopApply(t1 - t0, t2 - t1, [s.node for s in every + one])
        return self._memo[key]

    def resync(self, repeat: int) -> Resync:
        """A full sync of both nodes with nothing changed (the repair path)."""
        key = ("resync", repeat)
        if key not in self._memo:
            for node in self.programmed:
                self.tracker.node_view(node.name)  # made (and cached) outside the timing
            t0 = time.perf_counter()
            synced = self.proxy.resync()
            wall = time.perf_counter() - t0
            self._memo[key] = Resync(node_stats(synced, "node1"), wall,
                                     {s.node: s.seconds for s in synced})
        return self._memo[key]


def node_stats(synced: list[SyncStats], node: str) -> SyncStats:
    """The one node's SyncStats among those a ServiceProxy call returned."""
    for stats in synced:
        if stats.node == node:
            return stats
    raise RuntimeError(f"{node} was not synced (synced: {', '.join(s.node for s in synced) or 'none'})")


# --------------------------------------------------------------------------- the sweep


class SweepListener:
    """What the runner hears from a sweep; every method may be left as it is."""

    def progress(self, message: str) -> None:
        pass

    def step(self) -> None:
        """One (size, metric) or floor step is done."""

    def visited(self, mode: str, repeat: int, n_services: int) -> None:
        """Pass `repeat` is done at this size; raising here stops the mode's sweep cleanly."""

    def observed(self, rows: list[Row], raw: dict) -> None:
        pass

    def cluster_created(self, mode: str, run_id: str) -> None:
        """The NetnsCluster run id the mode's sweep uses (its namespaces are svb-<id>-*)."""

    def metric_skipped(self, mode: str, metric: str, reason: str) -> None:
        pass

    def metric_failed(self, mode: str, metric: str, n_services: int, error: str) -> None:
        pass


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


def host_kernel_label() -> str:
    """The kernel column of every row: the release this code runs on (a guest's inside UML)."""
    return os.uname().release
