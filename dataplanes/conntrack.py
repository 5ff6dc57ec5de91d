"""kube-proxy's conntrack cleanup, shared by the netfilter modes and the cluster.

UDP has no connection to close: a flow's conntrack entry keeps sending a client to the
endpoint it was DNATed to, so when that endpoint leaves the entry must go. When a pod goes
away, every flow towards it must go, TCP too: a half-open entry (SYN_SENT, renewed by each
retransmission) keeps catching a client port that comes round again for minutes.
"""

from __future__ import annotations

from collections.abc import Iterable

from dataplanes.base import NodeHandle
from kube.state import ServicePortView


def _used_ips(sp: ServicePortView) -> set[str]:
    # every endpoint some traffic reaches, the short circuit of both-Local Services included
    return {e.ip for e in sp.all_reachable_endpoints}


def _udp_flow_deletes(sp: ServicePortView, nat: list[str]) -> list[list[str]]:
    base = ["conntrack", "-D", "-p", "udp"]
    out = [[*base, "--orig-dst", sp.cluster_ip, "--orig-port-dst", str(sp.port), *nat]]
    out += [
        [*base, "--orig-dst", ip, "--orig-port-dst", str(sp.port), *nat] for ip in sp.external_ips
    ]
    if sp.node_port is not None:
        out.append([*base, "--orig-port-dst", str(sp.node_port), *nat])
    return out


def stale_udp_flow_deletes(
    before: ServicePortView, after: ServicePortView | None
) -> list[list[str]]:
    """`conntrack -D` commands for one UDP Service port that went from `before` to `after`."""
    kept = _used_ips(after) if after else set()
    commands: list[list[str]] = []
    for ip in sorted(_used_ips(before) - kept):
        commands += _udp_flow_deletes(before, ["--dst-nat", ip])
    if after is not None and not _used_ips(before) and kept:
        # Flows recorded while the Service had no endpoints carry no DNAT: drop them.
        commands += _udp_flow_deletes(after, [])
    return commands


def endpoint_flow_deletes(ips: Iterable[str]) -> list[list[str]]:
    """`conntrack -D` for every flow, of any protocol, whose replies come from one of `ips`.

    By reply source, so flows DNATed to the pod and flows sent to its IP directly both go.
    """
    return [["conntrack", "-D", "--reply-src", ip] for ip in sorted(set(ips))]


def run_deletes(node: NodeHandle, commands: list[list[str]]) -> int:
    """Run them in the node (an entry already gone is not an error); returns how many."""
    for argv in commands:
        node.run(argv, check=False, timeout=30)
    return len(commands)
