"""Which Service port a packet belongs to, from one node's view: for naming what a drop
monitor or a trace saw ("ns1/web:http via its NodePort"), and whether the view itself
says that traffic is to be dropped or rejected there (a Local policy with endpoints only
elsewhere, no endpoints at all, a source outside loadBalancerSourceRanges).

The index is built once per view (dicts by address and port), so a lookup is O(1).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from kube.state import DROP, ServicePortView

CLUSTER_IP, NODE_PORT, EXTERNAL_IP, LOAD_BALANCER, ENDPOINT = (
    "ClusterIP", "NodePort", "externalIP", "LoadBalancer", "endpoint")


@dataclass(frozen=True)
class Match:
    service: str  # "ns/name:port-name" (kube-proxy's ServicePortName)
    via: str  # CLUSTER_IP, NODE_PORT, EXTERNAL_IP, LOAD_BALANCER or ENDPOINT
    reply: bool  # the packet came from the frontend or endpoint (a reply), not to it
    verdict: str | None  # "DROP" / "REJECT" when the view says this traffic gets that


class ServiceIndex:
    """Frontends and endpoints of the Service ports of one node's view."""

    def __init__(self, views: Iterable[ServicePortView], node_ips: Iterable[str] = (),
                 cluster_cidr: str | None = None) -> None:
        """`node_ips`: where NodePorts answer; `cluster_cidr`: pod addresses, which with the
        node's own reach NodePorts and externalIPs through the cluster-wide endpoints
        (kube-proxy's short circuit), never through the external policy's drop."""
        self._by_addr: dict[tuple[str, int, str], list[tuple[ServicePortView, str]]] = {}
        node_ips = tuple(node_ips)
        self._inside = [ipaddress.ip_network(f"{ip}/32") for ip in node_ips]
        if cluster_cidr:
            self._inside.append(ipaddress.ip_network(cluster_cidr))
        for view in views:
            proto = view.protocol
            if view.cluster_ip:
                self._add(view.cluster_ip, view.port, proto, view, CLUSTER_IP)
            for ip in view.external_ips:
                self._add(ip, view.port, proto, view, EXTERNAL_IP)
            for ip in view.load_balancer_ips:
                self._add(ip, view.port, proto, view, LOAD_BALANCER)
            if view.node_port:
                for ip in node_ips:
                    self._add(ip, view.node_port, proto, view, NODE_PORT)
            for ep in view.endpoints:
                self._add(ep.ip, ep.port, proto, view, ENDPOINT)

    def _add(self, ip: str, port: int, proto: str, view: ServicePortView, via: str) -> None:
        self._by_addr.setdefault((ip, port, proto), []).append((view, via))

    def lookup(self, protocol: str, src: str, sport: int, dst: str, dport: int) -> Match | None:
        """The Service port the packet goes to (or, for a reply, comes from); None if none."""
        for (ip, port), reply in (((dst, dport), False), ((src, sport), True)):
            found = self._by_addr.get((ip, port, protocol))
            if not found:
                continue
            frontends = [(v, via) for v, via in found if via != ENDPOINT]
            view, via = (frontends or found)[0]
            verdict = None if reply else self._verdict(view, via, src)
            return Match(view.name, via, reply, verdict)
        return None


    def _verdict(self, view: ServicePortView, via: str, src: str) -> str | None:
        if via == ENDPOINT:
            return None
        if via == CLUSTER_IP:
            return view.internal_traffic_filter
        addr = ipaddress.ip_address(src) if src else None
        if via == LOAD_BALANCER and view.load_balancer_source_ranges and addr:
            if not any(addr in ipaddress.ip_network(r) for r in view.load_balancer_source_ranges):
                return DROP
        if addr and any(addr in net for net in self._inside):
            return None  # pods and the node: the short circuit to the cluster's endpoints
        return view.external_traffic_filter
