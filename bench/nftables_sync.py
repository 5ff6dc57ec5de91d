"""How fast the nftables data plane programs a node: full syncs and one changed Service.

Declared, not scripted: sizes and repeats are parameters; every measurement is a row
(the schema of bench.sweep.Row) with the raw value, and medians are left to reports/.
The node is one scratch namespace of an agentless NetnsCluster; no traffic flows.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import replace

from bench.sweep import Row
from bench.synthetic import pool_pods, synthetic_services
from clusters.netns import NetnsCluster
from dataplanes.base import Host
from dataplanes.nftables import NftablesDataplane
from kube.model import Node
from kube.state import ClusterState, NodeView

MODE = "nftables"
ENDPOINTS = 3
POOL_PER_NODE = 50
FULL_REPEATS = {10000: 3}  # sizes not listed get one full sync
CHANGED_REPEATS = 10


def synthetic_view(n: int, endpoints: int = ENDPOINTS) -> NodeView:
    """node1's view of n ClusterIP Services with `endpoints` pool pods each."""
    nodes = [Node.numbered(1), Node.numbered(2)]
    pods = list(ClusterState.build(nodes, pool_pods(["node1", "node2"], POOL_PER_NODE)).pods)
    services, slices = synthetic_services(n, pods, endpoints)
    return ClusterState.build(nodes, pods, services, slices).node_view("node1")


def one_endpoint_fewer(view: NodeView, index: int) -> NodeView:
    """The view with Service `index` losing its last endpoint (the smallest real change)."""
    sp = view.services[index]
    changed = replace(
        sp,
        endpoints=sp.endpoints[:-1],
        internal_endpoints=sp.internal_endpoints[:-1],
        external_endpoints=sp.external_endpoints[:-1],
    )
    services = list(view.services)
    services[index] = changed
    return replace(view, services=tuple(services))


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def bench_nftables_sync(
    sizes=(10000, 30000),
    changed_repeats: int = CHANGED_REPEATS,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows of full-sync and one-changed-Service sync times at each size.

    metric "sync_s" (wall) and "sync_cpu_s" (this process plus nft), stat "full",
    "one_changed" or "unchanged"; extra carries the sync's own breakdown.
    """
    say = progress or (lambda _msg: None)
    dp = NftablesDataplane()
    missing = dp.missing(Host())
    if missing:
        raise RuntimeError("the nftables mode cannot run here: " + "; ".join(missing))
    kernel = os.uname().release
    rows: list[Row] = []
    with NetnsCluster.create(1, agents=False) as cluster:
        node = cluster.nodes[0]
        dp.install(node)
        try:
            for n in sizes:
                say(f"nftables: building the view of {n} Services")
                view = synthetic_view(n)
                fewer = one_endpoint_fewer(view, len(view.services) // 2)

                def measure(v: NodeView, stat: str, repeat: int, full: bool = False, n: int = n) -> None:
                    cpu0, wall0 = _children_cpu_s() + _self_cpu_s(), time.perf_counter()
                    stats = dp.sync(node, v, full=full)
                    wall = time.perf_counter() - wall0
                    cpu = _children_cpu_s() + _self_cpu_s() - cpu0
                    extra = {
                        "full": stats.full,
                        "changed": stats.changed,
                        "payload_bytes": stats.payload_bytes,
                        "elements": stats.extra.get("elements"),
                        "chains": stats.extra.get("chains"),
                        "render_s": stats.extra.get("render_s"),
                        "apply_s": stats.extra.get("apply_s"),
                    }
                    base = dict(mode=MODE, kernel=kernel, n_services=n, repeat=repeat)
                    rows.append(Row(**base, metric="sync_s", stat=stat, value=round(wall, 6),
                                    unit="s", extra=extra))
                    rows.append(Row(**base, metric="sync_cpu_s", stat=stat, value=round(cpu, 6),
                                    unit="s", extra={}))

                for r in range(FULL_REPEATS.get(n, 1)):
                    say(f"nftables: full sync of {n} Services ({r + 1})")
                    measure(view, "full", r, full=True)
                say(f"nftables: one changed Service among {n}")
                for r in range(changed_repeats):
                    # Alternate so every sync really changes one Service.
                    measure(fewer if r % 2 == 0 else view, "one_changed", r)
                measure(view, "unchanged", 0)
        finally:
            dp.uninstall(node)
    return [r.as_dict() for r in rows]


def median_by_stat(rows: list[dict]) -> list[dict]:
    """median, min and max of each (n_services, metric, stat): the one-screen summary."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["n_services"], r["metric"], r["stat"]), []).append(r["value"])
    out = []
    for (n, metric, stat), values in sorted(groups.items()):
        ordered = sorted(values)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        out.append(
            {"services": n, "metric": metric, "stat": stat, "median": round(median, 4),
             "min": round(ordered[0], 4), "max": round(ordered[-1], 4), "n": len(ordered)}
        )
    return out


if __name__ == "__main__":
    import json
    import sys

    sizes = tuple(int(a) for a in sys.argv[1:]) or (10000, 30000)
    result = bench_nftables_sync(sizes, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(median_by_stat(result), indent=1))
