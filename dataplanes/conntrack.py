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


# A frontend: (destination address, port); None for a NodePort (any of the node's addresses).
Frontend = tuple[str | None, int]


def _frontends(sp: ServicePortView) -> set[Frontend]:
    out: set[Frontend] = {(sp.cluster_ip, sp.port)}
    out |= {(ip, sp.port) for ip in (*sp.external_ips, *sp.load_balancer_ips)}
    if sp.node_port is not None:
        out.add((None, sp.node_port))
    return out


def _udp_flow_deletes(frontends: set[Frontend], nat: list[str]) -> list[list[str]]:
    base = ["conntrack", "-D", "-p", "udp"]
    out = []
    for ip, port in sorted(frontends, key=lambda f: (f[0] or "", f[1])):
        dst = ["--orig-dst", ip] if ip is not None else []
        out.append([*base, *dst, "--orig-port-dst", str(port), *nat])
    return out


def stale_udp_flow_deletes(
    before: ServicePortView | None, after: ServicePortView | None
) -> list[list[str]]:
    """`conntrack -D` commands for one UDP Service port that went from `before` to `after`
    (None: the port did not exist, or no longer does): both kinds below."""
    return left_endpoint_udp_flow_deletes(before, after) + untranslated_udp_flow_deletes(
        before, after)


def left_endpoint_udp_flow_deletes(
    before: ServicePortView | None, after: ServicePortView | None
) -> list[list[str]]:
    """Flows translated to an endpoint that no traffic reaches any more, on every frontend
    the port had."""
    if before is None:
        return []
    kept = _used_ips(after) if after is not None else set()
    commands: list[list[str]] = []
    for ip in sorted(_used_ips(before) - kept):
        commands += _udp_flow_deletes(_frontends(before), ["--dst-nat", ip])
    return commands


def untranslated_udp_flow_deletes(
    before: ServicePortView | None, after: ServicePortView | None
) -> list[list[str]]:
    """Flows to a frontend that starts translating: recorded untranslated (refused, dropped,
    or delivered to the node), they go, so the client's next datagram is balanced. That is
    every frontend when the port had no usable endpoint before, and otherwise the frontends
    it did not have (a new port, nodePort, externalIP or load-balancer IP)."""
    return _udp_flow_deletes(fresh_frontends(before, after), [])


def fresh_frontends(
    before: ServicePortView | None, after: ServicePortView | None
) -> set[Frontend]:
    """The frontends of a Service port that start translating (see above); any protocol."""
    if after is None or not _used_ips(after):
        return set()
    fresh = _frontends(after)
    if before is not None and _used_ips(before):
        fresh -= _frontends(before)
    return fresh


def udp_port_changes(old, new) -> list[tuple[ServicePortView | None, ServicePortView | None]]:
    """(before, after) for each UDP Service port of two NodeViews that differs, by name,
    protocol and port (None on the side where it is missing)."""
    was = {(sp.name, sp.protocol, sp.port): sp for sp in old.services if sp.protocol == "UDP"}
    now = {(sp.name, sp.protocol, sp.port): sp for sp in new.services if sp.protocol == "UDP"}
    out = []
    for key in sorted(was.keys() | now.keys()):
        before, after = was.get(key), now.get(key)
        if before is not after and before != after:
            out.append((before, after))
    return out


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
