"""How fast the eBPF data plane programs a node: full syncs, one changed Service, no change.

Declared, not scripted: sizes and repeats are parameters, every measurement is a row
(bench.sweep.Row's schema) with its raw value; medians are left to reports/ (the
__main__ block prints a one-screen summary). The node is the one node of an agentless
NetnsCluster; no traffic flows. A full sync starts from empty maps (the data plane is
uninstalled and installed again, untimed, before each one).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace

from bench.sweep import Row
from bench.synthetic import NODEPORT_EVERY, pool_pods, synthetic_services
from clusters.netns import NetnsCluster
from dataplanes.base import Host
from dataplanes.ebpf import EbpfDataplane
from kube.model import PLAN, Node
from kube.state import ClusterState, NodeView

MODE = "ebpf"
SIZES = (10000, 100000)
ENDPOINTS = 3
POOL_PER_NODE = 50
FULL_REPEATS = 3
CHANGED_REPEATS = 10
# NodePorts are a scarce range (30000-32767): at 50,000 Services one in 20 gets one.
MAX_NODE_PORTS = 2500
# The plan's /16 Service CIDR holds 65,534 ClusterIPs: larger views repeat the first
# DISTINCT Services on further ports (each is still its own frontend and map element).
DISTINCT = 50000


def synthetic_view(n: int, endpoints: int = ENDPOINTS) -> NodeView:
    """node1's view of n Service ports with `endpoints` pool pods each, some NodePort or
    affinity; above DISTINCT the ClusterIPs repeat on ports 81, 82, ..."""
    nodes = [Node.numbered(1), Node.numbered(2)]
    pods = list(ClusterState.build(nodes, pool_pods(["node1", "node2"], POOL_PER_NODE)).pods)
    lo, hi = PLAN.node_port_range
    distinct = min(n, DISTINCT)
    every = max(NODEPORT_EVERY, -(-distinct // min(MAX_NODE_PORTS, hi - lo)))
    services, slices = synthetic_services(distinct, pods, endpoints, nodeport_every=every)
    view = ClusterState.build(nodes, pods, services, slices).node_view("node1")
    if n == distinct:
        return view
    extra = [
        replace(sp, port=sp.port + 1 + i // distinct, port_name=f"p{1 + i // distinct}",
                node_port=None)
        for i, sp in ((i, view.services[i % distinct]) for i in range(n - distinct))
    ]
    return replace(view, services=view.services + tuple(extra))


def one_endpoint_fewer(view: NodeView, index: int) -> NodeView:
    """The view with Service `index` losing its last endpoint (the smallest real change)."""
    sp = view.services[index]
    changed = replace(sp, endpoints=sp.endpoints[:-1],
                      internal_endpoints=sp.internal_endpoints[:-1],
                      external_endpoints=sp.external_endpoints[:-1])
    services = list(view.services)
    services[index] = changed
    return replace(view, services=tuple(services))


def _cpu_s() -> float:
    return time.process_time()


def bench_ebpf_sync(
    sizes=SIZES,
    full_repeats: int = FULL_REPEATS,
    changed_repeats: int = CHANGED_REPEATS,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows of sync times per size: metric "sync_s" (wall) and "sync_cpu_s" (this process),
    stat "full" (from empty maps), "one_changed" or "unchanged"; extra has the sync's stats.
    """
    say = progress or (lambda _msg: None)
    dp = EbpfDataplane()
    missing = dp.missing(Host())
    if missing:
        raise RuntimeError("the ebpf mode cannot run here: " + "; ".join(missing))
    kernel = os.uname().release
    rows: list[Row] = []
    with NetnsCluster.create(1, agents=False) as cluster:
        node = cluster.nodes[0]
        dp.install(node)
        try:
            for n in sizes:
                say(f"ebpf: building the view of {n} Services")
                view = synthetic_view(n)
                fewer = one_endpoint_fewer(view, len(view.services) // 2)

                def measure(v: NodeView, stat: str, repeat: int, n: int = n) -> None:
                    cpu0, wall0 = _cpu_s(), time.perf_counter()
                    stats = dp.sync(node, v)
                    wall, cpu = time.perf_counter() - wall0, _cpu_s() - cpu0
                    base = dict(mode=MODE, kernel=kernel, n_services=n, repeat=repeat)
                    extra = {"full": stats.full, "changed": stats.changed, "elements": stats.rules}
                    rows.append(Row(**base, metric="sync_s", stat=stat, value=round(wall, 6),
                                    unit="s", extra=extra))
                    rows.append(Row(**base, metric="sync_cpu_s", stat=stat, value=round(cpu, 6),
                                    unit="s"))

                for r in range(full_repeats):
                    say(f"ebpf: full sync of {n} Services ({r + 1}/{full_repeats})")
                    dp.uninstall(node)
                    dp.install(node)
                    measure(view, "full", r)
                say(f"ebpf: one changed Service among {n}")
                for r in range(changed_repeats):
                    measure(fewer if r % 2 == 0 else view, "one_changed", r)  # each sync changes one
                measure(view, "unchanged", 0)
        finally:
            dp.uninstall(node)
    return [r.as_dict() for r in rows]


def summary(rows: list[dict]) -> list[dict]:
    """median, min and max per (n_services, metric, stat)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["n_services"], r["metric"], r["stat"]), []).append(r["value"])
    out = []
    for (n, metric, stat), values in sorted(groups.items()):
        v = sorted(values)
        mid = len(v) // 2
        median = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
        out.append({"services": n, "metric": metric, "stat": stat, "median": round(median, 4),
                    "min": round(v[0], 4), "max": round(v[-1], 4), "n": len(v)})
    return out


if __name__ == "__main__":
    import json
    import sys

    chosen = tuple(int(a) for a in sys.argv[1:]) or SIZES
    result = bench_ebpf_sync(chosen, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(summary(result), indent=1))
