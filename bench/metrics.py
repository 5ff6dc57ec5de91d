"""What the sweep measures, declared: a name, a unit, a setup and the thing measured.

A `Metric` is measured once per repeat at every size (the floor too: it is interleaved
with the Service connections, so every "added" figure is a same-moment difference) and
reduces each repeat to a few stats (p50/p90/p99, a count, one value). The runner (`run_mode`) repeats, records and moves on: it never
analyses. Repeat r is pass r over the sizes, up for even r and down for odd r (see
`sweep_order`), so a drift of the machine touches every size alike; at each visit the
traffic metrics go first, then the programming metrics (which reprogram node1 or build
scratch namespaces).

Units are in the names (`_us`, `_s`, `_rps`) and in `unit`. `catalog()` writes every metric
into run.json, with how the report shows it (title, short name, which way is better, the
headline series, floors, findings): reports/ spells no metric name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.probes import CLK_TCK
from bench.sweep import (
    NODES,
    Bench,
    Row,
    SweepConfig,
    SweepListener,
    host_kernel_label,
    load_mode,
    percentile,
)
from reports.catalog import Track

SIZE = "size"
TRAFFIC = "traffic"
PROGRAMMING = "programming"
LATENCY_STATS = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


@dataclass
class Observation:
    """One repeat of one metric: its stats, and the raw samples kept beside bench.csv."""

    stats: dict[str, float]
    target: str = ""  # bench.csv's target: first/last/random, or the address probed
    units: dict[str, str] = field(default_factory=dict)  # stat -> unit, when not the metric's
    extra: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    doc: str
    measure: Callable[[Bench, str, int], Observation]  # (bench, target, repeat)
    targets: tuple[str, ...] = ("",)
    phase: str = SIZE  # at every size (the only phase today; run.json's catalog records it)
    group: str = TRAFFIC
    setup: Callable[[Bench], str | None] | None = None  # once per mode: None or why skipped
    repeats: Callable[[SweepConfig], int] | None = None  # None: the sweep's --repeats
    budget_s: float | None = None  # a size stops repeating it once this much time went to it
    budget_key: str | None = None  # metrics sharing one fixture share one budget
    noise_stat: str | None = "p50"  # the stat whose spread across repeats flags noise
    # How the report shows it: run.json's catalog carries these, reports/ spells no metric.
    title: str = ""  # a heading: "New connection to a Service"
    short: str = ""  # a table header or a phrase in a sentence: "new connection"
    better: str = "lower"  # which way is an improvement: "lower" or "higher"
    headline: tuple[str, ...] = ()  # the findings' cost: its series (targets), best first
    floor: str | None = None  # the metric that measures this one's path with no Services
    finding: str = ""  # quoted so in each mode's headline, at the largest size
    scorecard: bool = False  # a column of the findings' table
    resolution: str = ""  # what makes its values come in steps, when something does
    verdict: bool = False  # each mode's sentence and the scorecard state its growth verdict
    # The nightly's regression gates on it (`svcbench report --compare OLD NEW`, exit 1).
    track: tuple[Track, ...] = ()

    @property
    def budget(self) -> str:
        """The name its time is counted under (shared by metrics read off one fixture)."""
        return self.budget_key or self.name


def _latency(run, target_label: str, extra: dict | None = None) -> Observation:
    ok = run.ok_latencies
    stats = {stat: round(percentile(ok, q), 1) for stat, q in LATENCY_STATS}
    stats["failed"] = run.failed
    return Observation(
        stats, target_label, units={"failed": "connections"},
        extra={"outcomes": run.outcomes(), **(extra or {})},
        raw={"latency_us": [round(s.latency_us, 1) for s in run.samples],
             "outcome": [s.outcome for s in run.samples],
             "backend": [s.backend for s in run.samples]},
    )


def _label(bench: Bench, target: str) -> str:
    # Word targets name a series in the report; an address does not.
    return target if target in ("first", "last", "random", "floor") else bench.address(target)


# --------------------------------------------------------------------------- measurements


def measure_interleaved(bench: Bench, target: str, repeat: int) -> Observation:
    run = bench.interleaved(target, repeat)
    return _latency(run, _label(bench, target), {"count": bench.cfg.count, "interleaved": True})


def measure_rr(bench: Bench, target: str, repeat: int) -> Observation:
    from bench.probes import request_response
    from clusters.nsenter import in_netns

    ip, port = bench.endpoints_of(target)[0]
    rtts = in_netns(bench.client_ns, request_response, ip, port, bench.cfg.rr_count)
    stats = {stat: round(percentile(rtts, q), 1) for stat, q in LATENCY_STATS}
    return Observation(stats, ip, extra={"count": len(rtts), "bytes": 64},
                       raw={"rtt_us": [round(x, 1) for x in rtts]})


def measure_cpu(bench: Bench, target: str, repeat: int) -> Observation:
    count = 2 * bench.cfg.count  # CPU time is sampled at 4 ms ticks: more connections average it
    cpu = bench.cpu_per_connection(target, count, repeat)
    # The counters move in USER_HZ ticks: one tick over the connections is the finest step.
    resolution = 1e6 / CLK_TCK / max(1, count - cpu["run"].failed)
    return Observation(
        {"tasks": round(cpu["tasks_us"], 2), "host": round(cpu["host_us"], 2)},
        bench.address(target),
        extra={"count": count, "failed": cpu["run"].failed, "thread_sys_s": cpu["thread_sys_s"],
               "agents_sys_s": cpu["agents_sys_s"], "host_sys_s": cpu["host_sys_s"],
               "resolution": round(resolution, 3)},
        raw={"wall_s": cpu["run"].wall_s, "thread_user_s": cpu["run"].thread_user_s},
    )


def measure_throughput(bench: Bench, target: str, repeat: int) -> Observation:
    from bench.locust_load import run_load

    ip, port = bench.endpoints_of(target)[0]
    load = run_load(bench.client_ns, ip, port, seconds=bench.cfg.load_seconds)
    lat = load.latencies_us
    return Observation(
        {"value": round(load.rps, 1)}, ip,
        extra={"processes": load.processes, "users": load.users, "ok": load.ok,
               "failed": load.failed, "late_s": load.late_s,
               "p50_us": round(percentile(lat, 0.5), 1), "p99_us": round(percentile(lat, 0.99), 1)},
        raw={"latency_us": lat, "per_process": load.per_process},
    )


def measure_handshake(bench: Bench, target: str, repeat: int) -> Observation:
    tracer = bench.handshake_tracer()
    ip = bench.address(target)
    restarted = len(tracer.restarts)
    tracer.arm()
    try:
        run = bench.connections(target, bench.cfg.count, repeat)
    finally:
        events = [e for e in tracer.collect() if e[2] == ip]
    # Other runs may use the same addresses: keep the probe's own sockets, by the port each
    # socket had (what the backend saw may be a masqueraded port).
    ports = {s.local_port for s in run.samples if s.local_port is not None}
    mine = [us for us, sport, _ in events if sport in ports]
    stats = {stat: round(percentile(mine, q), 1) for stat, q in LATENCY_STATS}
    stats["events"] = len(mine)
    return Observation(stats, ip, units={"events": "connections"},
                       extra={"probe_p50_us": round(percentile(run.ok_latencies, 0.5), 1),
                              "established": len(ports), "probe_failed": run.failed,
                              # a tracer that died since the last window was replaced: why
                              **({"tracer_restarted": tracer.restarts[-1]}
                                 if len(tracer.restarts) > restarted else {})},
                       raw={"handshake_us": [round(x, 1) for x in mine]})


def measure_sync_full(bench: Bench, target: str, repeat: int) -> Observation:
    s = bench.scratch_sync(repeat)
    return Observation({"value": round(s.seconds, 6)},
                       extra={"rules": s.stats.rules, "payload_bytes": s.stats.payload_bytes,
                              "uninstall_s": s.uninstall_s},
                       raw={"sync": _stats_dict(s.stats)})


def measure_rules(bench: Bench, target: str, repeat: int) -> Observation:
    s = bench.scratch_sync(repeat)
    return Observation({"count": s.stats.rules},
                       extra={"payload_bytes": s.stats.payload_bytes, "changed": s.stats.changed})


def measure_kernel_bytes(bench: Bench, target: str, repeat: int) -> Observation:
    s = bench.scratch_sync(repeat)
    stats = {"meminfo": s.kernel_bytes_delta}
    if s.reported_bytes is not None:
        stats["reported"] = s.reported_bytes
    return Observation(stats, extra={"source": "host /proc/meminfo SUnreclaim+VmallocUsed+Percpu"})


def measure_sync_one(bench: Bench, target: str, repeat: int) -> Observation:
    c = bench.endpoint_change(repeat)
    return Observation({"value": round(c.sync_s, 6)},
                       extra={"direction": c.direction, "full": c.stats.full,
                              "apply_s": round(c.apply_s, 6), "synced": c.synced},
                       raw={"sync": _stats_dict(c.stats)})


def measure_noop(bench: Bench, target: str, repeat: int) -> Observation:
    a = bench.noop(repeat)
    return Observation({"value": round(a.every_s, 6), "one": round(a.one_s, 6)},
                       extra={"services": bench.n, "synced": a.synced})


def measure_resync(bench: Bench, target: str, repeat: int) -> Observation:
    r = bench.resync(repeat)
    return Observation({"value": round(r.stats.seconds, 6)},
                       extra={"full": r.stats.full, "changed": r.stats.changed,
                              "wall_s": round(r.wall_s, 6),
                              "per_node": {k: round(v, 6) for k, v in r.per_node.items()}},
                       raw={"sync": _stats_dict(r.stats)})


def measure_programming(bench: Bench, target: str, repeat: int) -> Observation:
    c = bench.endpoint_change(repeat)
    stats: dict[str, float] = {"failed": 0 if c.programming_s is not None else 1}
    if c.programming_s is not None:
        stats["value"] = round(c.programming_s, 6)
    return Observation(stats, bench.address("last"), units={"failed": "changes"},
                       extra={"direction": c.direction, "sync_s": round(c.sync_s, 6),
                              "probe_connections": c.watched})


def _stats_dict(s) -> dict:
    return {"seconds": s.seconds, "full": s.full, "services": s.services, "rules": s.rules,
            "payload_bytes": s.payload_bytes, "changed": s.changed,
            "extra": {k: v for k, v in s.extra.items() if k != "changed_chains"}}


def _bcc_reason(bench: Bench) -> str | None:
    from bench.trace import unavailable_reason

    return unavailable_reason()


def _locust_reason(bench: Bench) -> str | None:
    import importlib.util

    if importlib.util.find_spec("locust") is None:
        return "locust is not installed (pip install locust)"
    return None


FLOOR = "floor_conn_latency_us"
TICK = "one clock tick of CPU time over the connections counted"
METRICS: tuple[Metric, ...] = (
    Metric(FLOOR, "us",
           "New connection pod to pod across two nodes the mode never programs (the floor), "
           "interleaved with the Service connections at every size.",
           measure_interleaved, ("floor",),
           title="New connection to a pod IP, no Services (floor)", short="floor"),
    Metric("conn_latency_us", "us",
           "New connection (connect to greeting) to the first, the last and random Services, "
           "interleaved connection by connection with each other and the pod IP.",
           measure_interleaved, ("first", "last", "random"),
           title="New connection to a Service", short="new connection",
           # the last Service walks the most rules
           headline=("last", "random", "", "first"), floor=FLOOR,
           track=(Track(0.30, stat="p50", target="last"),)),
    Metric("podip_conn_latency_us", "us",
           "New connection to the floor's pod IP while N Services are programmed (interleaved "
           "with the Service connections).",
           measure_interleaved, ("pod",),
           title="New connection to a pod IP, Services programmed", short="pod IP", floor=FLOOR,
           finding="connections straight to a pod IP", scorecard=True),
    Metric("cpu_us_per_conn", "us",
           "Kernel + softirq CPU per new connection to the last Service: probe thread and echo "
           "agents (tasks), and every CPU of the host (host, includes other load).",
           measure_cpu, ("last",), noise_stat="tasks",
           title="Kernel + softirq CPU per new connection", short="kernel CPU",
           finding="kernel CPU per connection", resolution=TICK),
    Metric("rr_latency_us", "us", "64-byte request/response on one established connection.",
           measure_rr, ("last",),
           title="Request/response on an established connection", short="request/response"),
    Metric("syn_to_established_us", "us",
           "Kernel handshake time from sock:inet_sock_set_state (bcc), to the last Service.",
           measure_handshake, ("last",), setup=_bcc_reason,
           title="Kernel handshake time, SYN to ESTABLISHED", short="handshake"),
    Metric("throughput_rps", "rps",
           "New connections per second to the last Service, locust, one process per core.",
           measure_throughput, ("last",), setup=_locust_reason,
           repeats=lambda cfg: cfg.load_repeats, noise_stat="value",
           title="Throughput, one new connection per request", short="throughput",
           better="higher", finding="throughput"),
    Metric("sync_one_s", "s",
           "One Service's EndpointSlice changed through ServiceProxy.apply: node1's own "
           "sync time (the mode's update where it has one, else a full sync of its view).",
           measure_sync_one, group=PROGRAMMING, budget_s=40.0, budget_key="change",
           noise_stat=None,
           title="Change one Service's endpoints at N Services", short="one change",
           verdict=True, track=(Track(0.50),)),
    Metric("programming_latency_s", "s",
           "From the change to the first connection served by the new endpoint (probe).",
           measure_programming, group=PROGRAMMING, budget_s=40.0, budget_key="change",
           noise_stat=None,
           title="Network programming latency: change to first connection served",
           short="programming latency", finding="network programming latency"),
    Metric("sync_noop_s", "s",
           "The same objects applied again through ServiceProxy (the tracker finds nothing "
           "changed and no node is synced), the whole call's wall time: every Service and "
           "EndpointSlice (value, what an informer's relist hands kube-proxy), and the last "
           "Service with its slice (one, an event that changes nothing).",
           # svcbench's tracker alone (no node is synced): the same work in every pass
           measure_noop, group=PROGRAMMING, repeats=lambda cfg: 1, noise_stat=None,
           title="Apply unchanged objects at N Services (no-op)", short="no-op apply"),
    Metric("resync_s", "s",
           "ServiceProxy.resync with nothing changed: node1's full sync of the state it already "
           "holds (the repair path, and what a mode without update pays for every change).",
           measure_resync, group=PROGRAMMING, budget_s=60.0, noise_stat=None,
           title="Full resync of unchanged state at N Services", short="resync"),
    Metric("sync_full_s", "s", "Program all N Services from empty on a fresh node namespace.",
           measure_sync_full, group=PROGRAMMING, budget_s=60.0, budget_key="scratch",
           noise_stat=None,
           title="Program all N Services from empty", short="sync", finding="full sync",
           scorecard=True, track=(Track(0.30, size=10_000),)),
    Metric("rules", "rules", "Rules, chains and map entries the full sync wrote.",
           measure_rules, group=PROGRAMMING, repeats=lambda cfg: 1, noise_stat=None,
           title="Rules, chains and map entries programmed", short="rules", scorecard=True),
    Metric("kernel_bytes", "bytes",
           "Kernel memory the full sync added (host-wide meminfo; a mode's own figure as reported).",
           measure_kernel_bytes, group=PROGRAMMING, repeats=lambda cfg: 1, noise_stat=None,
           title="Kernel memory programmed", short="kernel memory"),
)
BY_NAME = {m.name: m for m in METRICS}


def selected(cfg: SweepConfig) -> list[Metric]:
    """The metrics the sweep runs at every size, in order."""
    return [m for m in METRICS if cfg.metrics is None or m.name in cfg.metrics]


# --------------------------------------------------------------------------- the runner


class _Recording:
    """Turns observations into Rows and hands them on as they come."""

    def __init__(self, mode: str, kernel: str, listener: SweepListener):
        self.mode, self.kernel, self.listener = mode, kernel, listener
        self.rows: list[Row] = []

    def add(self, metric: Metric, n: int, repeat: int, obs: Observation,
            elapsed_s: float | None = None) -> None:
        extra = {"target": obs.target, **obs.extra}
        rows = [
            Row(self.mode, self.kernel, n, metric.name, stat, value,
                obs.units.get(stat, metric.unit), repeat, extra)
            for stat, value in obs.stats.items()
        ]
        self.rows.extend(rows)
        raw = {"mode": self.mode, "metric": metric.name, "n_services": n, "target": obs.target,
               "repeat": repeat, "unit": metric.unit, "stats": obs.stats,
               "elapsed_s": None if elapsed_s is None else round(elapsed_s, 3), **obs.raw}
        self.listener.observed(rows, raw)


def _repeats(metric: Metric, cfg: SweepConfig) -> int:
    return max(1, metric.repeats(cfg) if metric.repeats else cfg.repeats)


def run_mode(cfg: SweepConfig, mode: str, dp: Any, listener: SweepListener) -> list[Row]:
    """One mode's sweep on its own cluster; the cluster is gone when this returns or raises."""
    from clusters.netns import NetnsCluster

    size = selected(cfg)
    rec = _Recording(mode, host_kernel_label(), listener)
    say = listener.progress
    with NetnsCluster.create(NODES, progress=say) as cluster:
        listener.cluster_created(mode, cluster.run_id)
        bench = Bench(cfg, mode, dp, cluster, rec.kernel)
        try:
            bench.start()
            skipped: set[str] = set()
            for metric in size:
                reason = metric.setup(bench) if metric.setup else None
                if reason:
                    skipped.add(metric.name)
                    listener.metric_skipped(mode, metric.name, reason)
            size = [m for m in size if m.name not in skipped]
            say(f"{mode}: installing")
            bench.install()
            ledgers = {n: SizeLedger() for n in cfg.sizes}
            for repeat, n in sweep_order(cfg.sizes, passes(size, cfg)):
                if n != bench.n:
                    verb = "programming" if n > bench.n else "removing Services down to"
                    say(f"{mode}: {verb} {n:,} Services")
                    started = time.perf_counter()
                    stats = bench.grow(n)
                    listener.observed([], {"mode": mode, "phase": "sweep", "metric": "grow",
                                           "n_services": n, "repeat": repeat,
                                           "seconds": time.perf_counter() - started,
                                           "sync": [{"node": s.node, "seconds": s.seconds,
                                                     "full": s.full, "rules": s.rules} for s in stats]})
                listener.step()
                for group in (TRAFFIC, PROGRAMMING):
                    _size(bench, [m for m in size if m.group == group], rec, listener, repeat,
                          ledgers[n])
                bench.settle()
                listener.visited(mode, repeat, n)
            say(f"{mode}: uninstalling")
            bench.close()
            uninstall_s = bench.uninstall()
            listener.observed([], {"mode": mode, "phase": "sweep", "metric": "uninstall",
                                   "seconds": uninstall_s})
        finally:
            bench.close()
            if bench.installed:
                try:
                    bench.uninstall()
                except Exception:  # noqa: BLE001 - the namespaces go with the cluster anyway
                    pass
    return rec.rows


def passes(size_metrics: list[Metric], cfg: SweepConfig) -> int:
    """How many times the sweep visits every size: the most repeats any size metric takes."""
    return max((_repeats(m, cfg) for m in size_metrics), default=1)


def sweep_order(sizes: list[int], count: int) -> list[tuple[int, int]]:
    """(repeat, size) visits: pass r takes repeat r of every size, up the sizes, then down.

    A repeat is a pass over the whole sweep, not a rerun a second later: this VM's
    connection latency drifts by up to 1.5x for seconds to minutes at a time (a 10,000
    Service iptables p50 moved between 600 and 950 us within one minute), and repeats taken
    back to back let one such episode land on one size and bend the growth fit. Spread over
    passes, every size samples the drift alike. Going back down removes Services, so the
    passes cost one extra partial sync per size, not a rebuild.
    """
    order: list[tuple[int, int]] = []
    for r in range(count):
        order += [(r, n) for n in (sizes if r % 2 == 0 else sizes[::-1])]
    return order


@dataclass
class SizeLedger:
    """What earlier passes left at one size: seconds per budget key, metrics that failed."""

    spent: dict[str, float] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)


def _size(bench: Bench, metrics: list[Metric], rec: _Recording, listener: SweepListener,
          repeat: int, ledger: SizeLedger) -> None:
    """Repeat `repeat` of each metric at the current size.

    A metric that failed at this size is not retried in later passes; one whose budget
    this size has used up is not repeated (metrics sharing a budget key, such as the two
    read off one endpoint change, are decided together).
    """
    cfg, n = bench.cfg, bench.n
    over = {m.budget for m in metrics
            if m.budget_s is not None and ledger.spent.get(m.budget, 0.0) >= m.budget_s}
    for metric in metrics:
        key = metric.budget
        if (repeat >= _repeats(metric, cfg) or metric.name in ledger.broken
                or (repeat > 0 and key in over)):
            listener.step()
            continue
        for target in metric.targets:
            listener.progress(f"{bench.mode}: {n:,} Services: {metric.name}"
                              f"{' ' + target if target else ''} {repeat + 1}/{_repeats(metric, cfg)}")
            started = time.perf_counter()
            try:
                obs = metric.measure(bench, target, repeat)
                rec.add(metric, n, repeat, obs, elapsed_s=time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
                listener.metric_failed(bench.mode, metric.name, n, f"{type(exc).__name__}: {exc}")
                ledger.broken.add(metric.name)
                break
            finally:
                ledger.spent[key] = ledger.spent.get(key, 0.0) + time.perf_counter() - started
        listener.step()


@dataclass(frozen=True)
class Recorded:
    """A metric another bench writes into the sweep's run folder (bench/mode_benches.py,
    bench/userspace_rate.py): not measured here, described here for the report."""

    name: str
    unit: str
    doc: str
    title: str
    short: str = ""
    better: str = "lower"
    floor: str | None = None
    phase: str = "mode_benches"  # `python -m bench.mode_benches --out RUN_DIR` adds them
    finding: str = ""  # quoted so in each mode's headline, at the largest size
    scorecard: bool = False  # a column of the findings' table


RECORDED: tuple[Recorded, ...] = (
    Recorded("sync_s", "s", "One node's sync through ServiceProxy past the sweep's sizes "
             "(the mode's own SyncStats.seconds): the first after install, from empty (full); "
             "one Service's EndpointSlice changed, an apply (one_changed: the mode's update "
             "where it has one); a resync with nothing changed (unchanged). The userspace rate "
             "bench's step up to N Services from the size before (grow).",
             "Sync of one node", "node sync"),
    Recorded("sync_cpu_s", "s", "CPU time of the same syncs: this process and its children "
             "(nft, bpftool).", "CPU time of one node's sync", "sync CPU"),
    Recorded("floor_conn_rate", "conn/s", "Connections per second straight to the pod IP, no "
             "proxy on the path (the ceiling of client and backend).",
             "Connection rate to a pod IP, no proxy (floor)", "rate floor", better="higher"),
    Recorded("proxied_conn_rate", "conn/s", "Connections per second through the userspace "
             "proxy to a ClusterIP, the same load.", "Connection rate through the userspace proxy",
             "proxied rate", better="higher", floor="floor_conn_rate"),
    Recorded("proxy_conn_per_cpu_s", "conn/cpu-s", "Proxied connections per second of the "
             "proxy's own CPU time: what one core sustains.",
             "Proxied connections per CPU-second of the proxy", "per CPU-second",
             better="higher"),
    Recorded("proxy_cpu_share", "cores", "CPU the proxy used during the load, in cores.",
             "CPU the userspace proxy used under load", "proxy CPU"),
    Recorded("proxy_user_us_per_conn", "us", "The proxy's user CPU time per proxied "
             "connection.", "Proxy user CPU per connection", "user CPU"),
    Recorded("proxy_sys_us_per_conn", "us", "The proxy's system CPU time per proxied "
             "connection (includes the peers' receive paths veth runs in its context).",
             "Proxy system CPU per connection", "system CPU"),
    Recorded("added_latency_us", "us", "A new connection's p50 through the userspace proxy "
             "minus the pod IP's, to the first and the last Service.",
             "Latency the userspace proxy adds to a Service", "added latency"),
    Recorded("churn_programming_latency_s", "s",
             "Kubernetes' network programming latency SLI under endpoint churn (bench/churn.py): "
             "EndpointSlices change at 20 a second, each applied through ServiceProxy (what "
             "came due during a sync goes in the next apply, as kube-proxy batches), and a "
             "probe in a pod on every node connects to the changed ClusterIP; per change, from "
             "its due time to the first connection served by the new endpoint set from every "
             "node; p50/p90/p99 over the changes, with every failed connection (failed) and "
             "changes some node never showed (unprogrammed). For scale, not comparison (real "
             "clusters, other machines): kube-proxy nftables on the 100-node GCE performance "
             "job, p50 1.5 s, p90 2.3 s, p99 6.8 s (kubernetes#124272); one new Service among "
             "10,000 programmed in 141 ms after nftables' partial sync (kubernetes#126013).",
             "Network programming latency under endpoint churn (20 changes/s)",
             "churn programming latency", phase="churn",
             finding="network programming latency under churn", scorecard=True),
    Recorded("churn_apply_s", "s",
             "Wall time of each ServiceProxy.apply during the churn: the tracker and every "
             "node's update (or full sync) of the changes it carries; batch: the median number "
             "of changes per apply.", "ServiceProxy.apply under endpoint churn", "churn apply",
             phase="churn"),
)


def catalog() -> list[dict[str, Any]]:
    """Every metric as run.json records it: the sweep's, then those other benches add to
    its folder. The report reads each one's title, unit and meaning from here."""
    shown = ("title", "short", "better", "floor", "finding", "scorecard", "resolution", "verdict")
    sweep = [{"name": m.name, "unit": m.unit, "doc": m.doc, "phase": m.phase, "group": m.group,
              "targets": [t for t in m.targets if t], "budget_s": m.budget_s,
              "headline": list(m.headline), **{k: getattr(m, k) for k in shown},
              "track": [asdict(t) for t in m.track]}
             for m in METRICS]
    others = [{"name": r.name, "unit": r.unit, "doc": r.doc, "phase": r.phase, "title": r.title,
               "short": r.short, "better": r.better, "floor": r.floor, "finding": r.finding,
               "scorecard": r.scorecard} for r in RECORDED]
    return sweep + others


def sweep_mode(cfg: SweepConfig, mode: str, progress: Callable[[str], None] | None = None,
               listener: SweepListener | None = None) -> list[Row]:
    """Measure `mode` over cfg.sizes with the metrics declared here; returns every Row.

    Raises ModeUnavailable (nothing created) when the mode cannot run here.
    """
    listener = listener or _Progress(progress or (lambda _m: None))
    dp = load_mode(mode, cfg.backend)
    return run_mode(cfg, mode, dp, listener)


def steps_of(cfg: SweepConfig) -> int:
    """How many `step()` calls one mode's sweep makes (for a progress bar)."""
    size = selected(cfg)
    return passes(size, cfg) * len(cfg.sizes) * (1 + len(size))


class _Progress(SweepListener):
    def __init__(self, say: Callable[[str], None]):
        self.say = say

    def progress(self, message: str) -> None:
        self.say(message)
