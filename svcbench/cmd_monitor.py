"""`svcbench monitor --type drop`: every packet dropped in a run, with its reason and the
Service it was for, from three sources merged into one stream:

- the kernel: the `skb:kfree_skb` tracepoint (bpf/dropmon.py) in every namespace of the
  run, with the kernel's drop reason (NETFILTER_DROP, NO_SOCKET, ...);
- the mode, where it drops outside the kernel's sight (its optional `drop_reporter(node)`,
  dataplanes/base.py): the ebpf mode's XDP programs (XDP_DROP frees a frame before an
  sk_buff exists) report into a ring buffer per node, reasons `XDP:...`; the userspace
  proxy reports the connections and flows it refuses, reasons `PROXY:...`.

Each row is attributed to a Service port with the node's view (kube/lookup.py), which also
says whether the view wants that traffic dropped or rejected.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

# Reasons for buffers that had arrived and were freed with their socket's queue: an
# application's business, not a packet the network lost.
NOT_IN_FLIGHT = ("QUEUE_PURGE",)
POLL_S = 0.1
# Where the kernel frees a frame an XDP program dropped, when the frame had an sk_buff
# (veth, generic XDP): kfree_skb sees it with no reason of its own (NOT_SPECIFIED). When the
# mode reported that drop with its reason, the kernel's row is left out.
XDP_FREES = ("veth_xdp_rcv_skb", "do_xdp_generic", "netif_receive_generic_xdp")
RECENT_S = 2.0


def _tuple(row: dict) -> tuple:
    return (row["protocol"], row["src"], row["sport"], row["dst"], row["dport"])


def drop_line(row: dict) -> str:
    """One row as the text output prints it."""
    ports = (f"{row['src']}:{row['sport']} -> {row['dst']}:{row['dport']}"
             if row["sport"] or row["dport"] else f"{row['src']} -> {row['dst']}")
    flags = f" [{row['tcp_flags']}]" if row["tcp_flags"] else ""
    clock = (time.strftime("%H:%M:%S", time.localtime(row["time"]))
             + f".{int(row['time'] % 1 * 1000):03d}")
    line = (f"{clock} {row['where']:<22} {row['reason']} ({row['location']}) "
            f"{row['protocol']} {ports}{flags}")
    if row.get("service"):
        line += f"  {row['service']} via {row['via']}" + (" (reply)" if row["reply"] else "")
        if row.get("verdict"):
            line += f", the view says {row['verdict']}"
    return line


def _reporters(dp, cluster, wanted: str | None, warn) -> dict[str, Any]:
    """node name -> the mode's drop reporter there, for modes that have one."""
    make = getattr(dp, "drop_reporter", None)
    if make is None:
        return {}
    out = {}
    for node in cluster.nodes:
        if wanted not in (None, node.name):
            continue
        try:
            reporter = make(node)
        except Exception as exc:  # noqa: BLE001 - one node's reporter missing is not fatal
            warn(f"{node.name}: the {dp.name} mode's drop reports are not readable: {exc}")
            continue
        if reporter is None:
            warn(f"{node.name}: the {dp.name} mode is not running there; only the kernel's "
                 "drops are shown")
        else:
            out[node.name] = reporter
    return out


def run(args, cluster, tracker, dp, names: list[str], out, err) -> int:
    from bpf.dropmon import DropMonitor, DropMonitorUnavailable, netns_inode
    from kube.lookup import ServiceIndex

    places: dict[int, tuple[str, str | None]] = {}  # nsfs inode -> (where, node)
    node_inode: dict[str, int] = {}
    for n in cluster.nodes:
        if args.node in (None, n.name):
            node_inode[n.name] = netns_inode(f"/run/netns/{n.netns}")
            places[node_inode[n.name]] = (f"node/{n.name}", n.name)
    for key, pod in cluster.pods.items():
        if args.node in (None, pod.node):
            places[netns_inode(f"/run/netns/{pod.netns}")] = (f"pod/{key}", pod.node)
    if args.node is None:
        places[netns_inode(f"/run/netns/{cluster.external_netns}")] = ("external", None)
        prefix = cluster.netns_name(cluster.run_id, "")
        for name in cluster.namespaces:  # the underlay and any other namespace of the run
            places.setdefault(netns_inode(f"/run/netns/{name}"),
                              (f"netns/{name.removeprefix(prefix)}", None))
    indexes = {}
    for name in names:
        view = tracker.node_view(name)
        indexes[name] = ServiceIndex(view.services, view.node_ips, view.cluster_cidr)

    def warn(message: str) -> None:
        err.print(f"warning: {message}", markup=False)

    reporters = _reporters(dp, cluster, args.node, warn)
    seen = 0
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        for reporter in reporters.values():
            stack.callback(reporter.close)
        try:
            kernel = stack.enter_context(
                DropMonitor(list(places), max_seconds=(args.duration or 86400) + 5))
        except DropMonitorUnavailable as exc:
            if not reporters:
                raise
            kernel = None
            warn(f"{exc}; only the {dp.name} mode's own drop reports are shown")
        # on stderr, also with --json: a script waits for this line before sending traffic
        err.print(f"watching {len(places)} namespaces of run {cluster.run_id} for drops"
                  + (f" for {args.duration:g} s" if args.duration else "; Ctrl-C ends"))

        recent: dict[tuple, float] = {}  # what the mode reported lately, by 5-tuple

        def collect() -> list[tuple[dict, str | None]]:
            rows = []
            # The kernel's first: a report the mode made for one of them is in its ring by then.
            drops = kernel.take() if kernel is not None else []
            for node, reporter in reporters.items():
                for event in reporter.take():
                    rows.append(({**event, "netns": node_inode[node],
                                  "where": f"node/{node}"}, node))
                    recent[_tuple(event)] = time.monotonic()
            for old in [k for k, t in recent.items() if time.monotonic() - t > RECENT_S]:
                del recent[old]
            for drop in drops:
                if drop.reason in NOT_IN_FLIGHT:
                    continue
                if drop.location in XDP_FREES and _tuple(drop.as_dict()) in recent:
                    continue  # the frame an XDP program dropped, already shown with its reason
                where, node = places.get(drop.netns, ("?", None))
                rows.append(({**drop.as_dict(), "where": where}, node))
            rows.sort(key=lambda r: r[0]["time"])
            return rows

        def emit(row: dict, node: str | None) -> None:
            for name in [node] if node else names:
                match = indexes[name].lookup(row["protocol"], row["src"], row["sport"],
                                             row["dst"], row["dport"])
                if match:
                    row.update(service=match.service, via=match.via, reply=match.reply,
                               verdict=match.verdict)
                    break
            else:
                if row.get("proxy_service"):
                    row.update(service=row["proxy_service"], via="proxy", reply=False,
                               verdict=None)
            row.pop("proxy_service", None)
            if args.json:
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()
            else:
                out.print(drop_line(row), markup=False, highlight=False, soft_wrap=True)

        try:
            while not args.duration or time.monotonic() - started < args.duration:
                time.sleep(POLL_S)
                for row, node in collect():
                    seen += 1
                    emit(row, node)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a live monitor ends
        time.sleep(3 * POLL_S)  # what the last moments reported (later signals are ignored)
        for row, node in collect():
            seen += 1
            emit(row, node)
    if not args.json:
        err.print(f"{seen} drops in {time.monotonic() - started:.1f} s")
    return 0
