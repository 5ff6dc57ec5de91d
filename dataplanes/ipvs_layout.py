"""What IPVS mode holds on a node, computed from views (pure: no kernel, no root).

A Service port becomes virtual servers (its ClusterIP, each node address for a NodePort,
each externalIP and load-balancer IP) with one NAT real server per endpoint, VIPs on
`kube-ipvs0`, and members of kube-proxy's ipsets (`port_layout`). A node's whole layout is
the sum of its ports' (`desired_layout`).

`LayoutMirror` keeps that sum per node by Service port, so one port's change is applied in
work proportional to that port: what it claims is reference-counted (an ipset member or a
VIP two ports share stays while either holds it) and a virtual server two ports claim (two
Services given the same load-balancer IP) goes to the last of them in view order, as a
full sync writing the ports in that order leaves it. `change` returns the difference as
netlink operations, ipset members and addresses, and leaves the mirror describing the new
state.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dataplanes.base import ipset_networks
from kube.state import DROP, EndpointView, NodeView, ServicePortView, view_order
from kube.tracker import ViewKey, view_key

# Service ports this mode does not program yet, and why.
SKIPPED_PROTOCOLS = {
    "SCTP": "its virtual servers, ipsets and rules are written for TCP and UDP only",
}

KUBE_IPVS_IF = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
# What Linux offers (net/netfilter/ipvs/ip_vs_*.c); each is a module loaded on first use.
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf",
              "mh", "twos")

# --------------------------------------------------------------------------- ipsets

KUBE_CLUSTER_IP = "KUBE-CLUSTER-IP"
KUBE_LOOP_BACK = "KUBE-LOOP-BACK"
KUBE_EXTERNAL_IP = "KUBE-EXTERNAL-IP"
KUBE_EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
KUBE_NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
KUBE_NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
KUBE_NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
KUBE_NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
KUBE_IPVS_IPS = "KUBE-IPVS-IPS"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
KUBE_LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
KUBE_LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
KUBE_LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
# The view's DROP, which kube-proxy's IPVS layout has no set for: a virtual server without
# real servers answers ICMP port unreachable, which is its REJECT.
KUBE_DROP_CLUSTER_IP = "KUBE-DROP-CLUSTER-IP"
KUBE_DROP_EXTERNAL = "KUBE-DROP-EXTERNAL"


@dataclass(frozen=True)
class IpSet:
    name: str
    type: str
    comment: str
    options: str = "family inet hashsize 1024 maxelem 65536"

    def create(self) -> str:
        return f"create {self.name} {self.type} {self.options}"


_PORTS = "range 0-65535"
IPSETS = (
    IpSet(KUBE_CLUSTER_IP, "hash:ip,port",
          "Kubernetes service cluster ip + port for masquerade purpose"),
    IpSet(KUBE_LOOP_BACK, "hash:ip,port,ip",
          "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    IpSet(KUBE_EXTERNAL_IP, "hash:ip,port",
          "Kubernetes service external ip + port for masquerade and filter purpose"),
    IpSet(KUBE_EXTERNAL_IP_LOCAL, "hash:ip,port",
          "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    IpSet(KUBE_NODE_PORT_TCP, "bitmap:port",
          "Kubernetes nodeport TCP port for masquerade purpose", _PORTS),
    IpSet(KUBE_NODE_PORT_LOCAL_TCP, "bitmap:port",
          "Kubernetes nodeport TCP port with externalTrafficPolicy=local", _PORTS),
    IpSet(KUBE_NODE_PORT_UDP, "bitmap:port",
          "Kubernetes nodeport UDP port for masquerade purpose", _PORTS),
    IpSet(KUBE_NODE_PORT_LOCAL_UDP, "bitmap:port",
          "Kubernetes nodeport UDP port with externalTrafficPolicy=local", _PORTS),
    IpSet(KUBE_IPVS_IPS, "hash:ip", "Kubernetes IPVS ips for filter purpose"),
    IpSet(KUBE_LOAD_BALANCER, "hash:ip,port", "Kubernetes service lb portal"),
    IpSet(KUBE_LOAD_BALANCER_LOCAL, "hash:ip,port",
          "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    IpSet(KUBE_LOAD_BALANCER_FW, "hash:ip,port",
          "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    IpSet(KUBE_LOAD_BALANCER_SOURCE_CIDR, "hash:ip,port,net",
          "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    IpSet(KUBE_LOAD_BALANCER_SOURCE_IP, "hash:ip,port,ip",
          "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    IpSet(KUBE_DROP_CLUSTER_IP, "hash:ip,port",
          "Kubernetes service cluster ip + port with no endpoint for this node: drop"),
    IpSet(KUBE_DROP_EXTERNAL, "hash:ip,port",
          "Kubernetes service external or node ip + port with no endpoint for outside "
          "clients: drop them"),
)
IPSET_BY_NAME = {s.name: s for s in IPSETS}

# --------------------------------------------------------------------------- objects

VsKey = tuple[str, str, int]  # protocol, VIP, port
DestKey = tuple[str, int]  # endpoint address, port
Member = tuple[str, str]  # ipset name, member as `ipset save` prints it


@dataclass(frozen=True)
class VirtualServer:
    protocol: str  # "TCP" | "UDP"
    ip: str
    port: int
    scheduler: str
    persistence_s: int = 0  # ClientIP affinity timeout; 0: none

    @property
    def key(self) -> VsKey:
        return (self.protocol, self.ip, self.port)

    def __str__(self) -> str:
        return f"{self.protocol} {self.ip}:{self.port}"


@dataclass(frozen=True)
class RealServer:
    ip: str
    port: int
    weight: int = 1

    @property
    def key(self) -> DestKey:
        return (self.ip, self.port)


Dests = dict[DestKey, RealServer]


@dataclass
class IpvsLayout:
    """Everything one node's IPVS mode holds: virtual servers, VIPs and ipset members."""

    services: dict[VsKey, VirtualServer] = field(default_factory=dict)
    dests: dict[VsKey, Dests] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)  # on kube-ipvs0
    ipsets: dict[str, set[str]] = field(default_factory=lambda: {s.name: set() for s in IPSETS})

    def add(self, vs: VirtualServer, endpoints: Sequence[EndpointView]) -> None:
        self.services[vs.key] = vs
        self.dests[vs.key] = {(e.ip, e.port): RealServer(e.ip, e.port) for e in endpoints}

    @property
    def real_server_count(self) -> int:
        return sum(len(d) for d in self.dests.values())


# --------------------------------------------------------------------------- one port


@dataclass(frozen=True)
class NodeFacts:
    """What a port's layout needs of its node besides the port: the node's addresses."""

    node_ip: str
    node_ips: tuple[str, ...]

    @classmethod
    def of(cls, view: NodeView) -> NodeFacts:
        return cls(view.node_ip, tuple(view.node_ips))


@dataclass
class PortLayout:
    """What one Service port puts on its node (duplicates kept: each is counted once)."""

    servers: list[tuple[VsKey, VirtualServer, Dests]] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)  # on kube-ipvs0 (and KUBE-IPVS-IPS)


@functools.lru_cache(maxsize=1 << 16)
def _real_server(ip: str, port: int) -> RealServer:
    return RealServer(ip, port)  # one object per endpoint: 30,000 ports share a few hundred


def _dests(endpoints: Sequence[EndpointView]) -> Dests:
    return {(e.ip, e.port): _real_server(e.ip, e.port) for e in endpoints}


def port_layout(sp: ServicePortView, node: NodeFacts,
                scheduler: str = DEFAULT_SCHEDULER) -> PortLayout:
    """kube-proxy's syncService/syncEndpoint for one Service port on one node."""
    out = PortLayout()
    if sp.protocol in SKIPPED_PROTOCOLS:
        return out
    proto = sp.protocol.lower()
    persistence = sp.affinity_timeout_s or 0
    servers, members, addresses = out.servers, out.members, out.addresses

    def vs(ip: str, port: int) -> tuple[VsKey, VirtualServer]:
        return (sp.protocol, ip, port), VirtualServer(sp.protocol, ip, port, scheduler, persistence)

    cluster_entry = f"{sp.cluster_ip},{proto}:{sp.port}"
    if sp.internal_traffic_filter == DROP:
        # No virtual server: IPVS would answer it; the VIP stays local for the DROP rule.
        members.append((KUBE_DROP_CLUSTER_IP, cluster_entry))
    else:
        servers.append((*vs(sp.cluster_ip, sp.port), _dests(sp.internal_endpoints)))
    addresses.append(sp.cluster_ip)
    members.append((KUBE_CLUSTER_IP, cluster_entry))
    for ip, port in {(e.ip, e.port): None for e in sp.all_reachable_endpoints}:
        members.append((KUBE_LOOP_BACK, f"{ip},{proto}:{port},{ip}"))
    # One virtual server serves every client of an external frontend. While outsiders are
    # served it holds their set (pods and the node get it too: kube-proxy's IPVS mode does
    # the same); while they are dropped, only pods and the node reach it: the short circuit.
    dropped = sp.external_traffic_filter == DROP
    external = _dests(sp.cluster_endpoints if dropped else sp.external_endpoints)
    local_eip = KUBE_EXTERNAL_IP_LOCAL if sp.external_policy_local else KUBE_EXTERNAL_IP
    for eip in sp.external_ips:
        entry = f"{eip},{proto}:{sp.port}"
        servers.append((*vs(eip, sp.port), external))
        addresses.append(eip)
        members.append((local_eip, entry))
        if dropped:
            members.append((KUBE_DROP_EXTERNAL, entry))
    # Load-balancer IPs: served as externalIPs; with source ranges only from them.
    if sp.load_balancer_ips:
        networks = ipset_networks(sp.load_balancer_source_ranges)
        node_ip = ipaddress.ip_address(node.node_ip)
        node_allowed = any(node_ip in ipaddress.ip_network(net)
                           for net in sp.load_balancer_source_ranges)
        for lbip in sp.load_balancer_ips:
            entry = f"{lbip},{proto}:{sp.port}"
            servers.append((*vs(lbip, sp.port), external))
            addresses.append(lbip)
            members.append((KUBE_LOAD_BALANCER, entry))
            if sp.external_policy_local:
                members.append((KUBE_LOAD_BALANCER_LOCAL, entry))
            if dropped:
                members.append((KUBE_DROP_EXTERNAL, entry))
            if networks:
                members.append((KUBE_LOAD_BALANCER_FW, entry))
                members += [(KUBE_LOAD_BALANCER_SOURCE_CIDR, f"{entry},{net}") for net in networks]
                if node_allowed:
                    # The node reaches its own LB IP from that address (kube-proxy's
                    # allowFromNode).
                    members.append((KUBE_LOAD_BALANCER_SOURCE_IP, f"{entry},{lbip}"))
    if sp.node_port is not None:
        for node_ip in node.node_ips:
            servers.append((*vs(node_ip, sp.node_port), external))
            if dropped:
                members.append((KUBE_DROP_EXTERNAL, f"{node_ip},{proto}:{sp.node_port}"))
        if proto == "tcp":
            name = KUBE_NODE_PORT_LOCAL_TCP if sp.external_policy_local else KUBE_NODE_PORT_TCP
        else:
            name = KUBE_NODE_PORT_LOCAL_UDP if sp.external_policy_local else KUBE_NODE_PORT_UDP
        members.append((name, str(sp.node_port)))
    members += [(KUBE_IPVS_IPS, ip) for ip in addresses]
    return out


# --------------------------------------------------------------------------- differences


@dataclass
class IpvsChanges:
    """The netlink operations that turn what the kernel holds into what the node must hold."""

    add_services: list[VirtualServer] = field(default_factory=list)
    edit_services: list[VirtualServer] = field(default_factory=list)
    delete_services: list[VirtualServer] = field(default_factory=list)
    add_dests: list[tuple[VirtualServer, RealServer]] = field(default_factory=list)
    edit_dests: list[tuple[VirtualServer, RealServer]] = field(default_factory=list)
    delete_dests: list[tuple[VirtualServer, RealServer]] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(x) for x in (self.add_services, self.edit_services, self.delete_services,
                                    self.add_dests, self.edit_dests, self.delete_dests))

    def server(self, old: tuple[VirtualServer, Dests] | None,
               new: tuple[VirtualServer, Dests] | None) -> None:
        """Add what turns one virtual server (with its real servers) from old into new."""
        if new is None:
            if old is not None:
                self.delete_services.append(old[0])  # its real servers go with it
            return
        vs, want = new
        if old is None:
            self.add_services.append(vs)
            held: Dests = {}
        else:
            if old[0] != vs:
                self.edit_services.append(vs)
            held = old[1]
        for dkey, rs in want.items():
            had = held.get(dkey)
            if had is None:
                self.add_dests.append((vs, rs))
            elif had != rs:
                self.edit_dests.append((vs, rs))
        for dkey, rs in held.items():
            if dkey not in want:
                self.delete_dests.append((vs, rs))


def ipvs_changes(have: IpvsLayout, want: IpvsLayout) -> IpvsChanges:
    """Only what differs: a deleted virtual server takes its real servers with it."""
    ch = IpvsChanges()
    for key, vs in want.services.items():
        old = have.services.get(key)
        ch.server(None if old is None else (old, have.dests.get(key, {})),
                  (vs, want.dests.get(key, {})))
    for key, vs in have.services.items():
        if key not in want.services:
            ch.delete_services.append(vs)
    return ch


def ipset_restore(have: dict[str, set[str]] | None,
                  want: dict[str, set[str]]) -> tuple[str, int]:
    """`ipset restore` text for the sets that differ (creating missing ones); and the change
    count."""
    lines: list[str] = []
    changes = 0
    for s in IPSETS:
        held = None if have is None else have.get(s.name)
        wanted = want.get(s.name, set())
        if held is None:
            lines.append(f"{s.create()} -exist")
            held = set()
        for entry in sorted(wanted - held):
            lines.append(f"add {s.name} {entry} -exist")
        for entry in sorted(held - wanted):
            lines.append(f"del {s.name} {entry} -exist")
        changes += len(wanted ^ held)
    return ("\n".join(lines) + "\n" if lines else "", changes)


def parse_ipset_save(text: str) -> dict[str, set[str]]:
    """Members of our sets, from `ipset save` (a set that exists but is empty maps to set())."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in IPSET_BY_NAME:
            if parts[0] == "create":
                out.setdefault(parts[1], set())
            elif parts[0] == "add" and len(parts) >= 3:
                out.setdefault(parts[1], set()).add(parts[2])
    return out


# --------------------------------------------------------------------------- the mirror


@dataclass
class LayoutDelta:
    """What one `LayoutMirror.change` changed: netlink operations, ipset members, VIPs."""

    ipvs: IpvsChanges = field(default_factory=IpvsChanges)
    add_members: list[Member] = field(default_factory=list)
    delete_members: list[Member] = field(default_factory=list)
    add_addresses: list[str] = field(default_factory=list)
    delete_addresses: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(len(self.ipvs) or self.add_members or self.delete_members
                    or self.add_addresses or self.delete_addresses)


_Claim = tuple[tuple[str, str, int], VirtualServer, Dests]  # view order, server, dests


class _Before:
    """What a change found before touching them: each virtual server (with its real
    servers, or None), ipset member and VIP it touched (True: held)."""

    def __init__(self) -> None:
        self.servers: dict[VsKey, tuple[VirtualServer, Dests] | None] = {}
        self.members: dict[Member, bool] = {}
        self.addresses: dict[str, bool] = {}

    def note(self, mirror: LayoutMirror, layout: PortLayout) -> None:
        for vkey, _, _ in layout.servers:
            if vkey not in self.servers:
                self.servers[vkey] = mirror.server(vkey)
        for member in layout.members:
            if member not in self.members:
                self.members[member] = member[1] in mirror.sets[member[0]]
        for ip in layout.addresses:
            if ip not in self.addresses:
                self.addresses[ip] = ip in mirror.addresses


class LayoutMirror:
    """One node's layout kept by Service port (see the module's docstring).

    Between changes it equals `desired_layout` of the node's view; `layout()` gives it whole
    (O(N), for full syncs), `change()` applies ports updated and removed (O(their size)).
    """

    def __init__(self, node: NodeFacts, scheduler: str = DEFAULT_SCHEDULER) -> None:
        self.node = node
        self.scheduler = scheduler
        self.ports: dict[ViewKey, tuple[ServicePortView, PortLayout]] = {}
        # Virtual server -> the ports claiming it; the last in view order holds it.
        self.claims: dict[VsKey, dict[ViewKey, _Claim]] = {}
        # ipset -> member -> how many claims; VIP -> how many claims
        self.sets: dict[str, dict[str, int]] = {s.name: {} for s in IPSETS}
        self.addresses: dict[str, int] = {}
        self.real_servers = 0  # of the virtual servers held

    @classmethod
    def of(cls, view: NodeView, scheduler: str = DEFAULT_SCHEDULER) -> LayoutMirror:
        """The mirror of a whole view."""
        mirror = cls(NodeFacts.of(view), scheduler)
        for sp in view.services:
            mirror._claim(view_key(sp), sp)
        return mirror

    # ------------------------------------------------------------------ reading

    def layout(self) -> IpvsLayout:
        """The whole layout (O(N))."""
        out = IpvsLayout()
        for key, claims in self.claims.items():
            _, vs, dests = self._holder(claims)
            out.services[key] = vs
            out.dests[key] = dict(dests)
        out.addresses = set(self.addresses)
        out.ipsets = self.ipsets()
        return out

    def ipsets(self) -> dict[str, set[str]]:
        return {name: set(members) for name, members in self.sets.items()}

    def set_counts(self) -> tuple[int, ...]:
        """Members per set, in IPSETS order (what the kernel's element counts must be)."""
        return tuple(len(self.sets[s.name]) for s in IPSETS)

    def server(self, key: VsKey) -> tuple[VirtualServer, Dests] | None:
        """The virtual server held at `key` and its real servers; None when none is."""
        claims = self.claims.get(key)
        if not claims:
            return None
        _, vs, dests = self._holder(claims)
        return vs, dests

    @staticmethod
    def _holder(claims: Mapping[ViewKey, _Claim]) -> _Claim:
        if len(claims) == 1:
            for claim in claims.values():
                return claim
        return max(claims.values(), key=lambda c: c[0])

    # ------------------------------------------------------------------ changing

    def change(self, updated: Mapping[ViewKey, ServicePortView],
               removed: Iterable[ViewKey] = ()) -> LayoutDelta:
        """Apply ports updated (new or changed) and removed; the difference they make."""
        before = _Before()
        for key in removed:
            self._retract(key, before)
        for key, sp in updated.items():
            held = self.ports.get(key)
            if held is not None and held[0] == sp:
                continue
            self._retract(key, before)
            self._claim(key, sp, before)
        delta = LayoutDelta()
        for vkey, was in before.servers.items():
            now = self.server(vkey)
            if now != was:
                delta.ipvs.server(was, now)
        for member, was in before.members.items():
            if (member[1] in self.sets[member[0]]) != was:
                (delta.delete_members if was else delta.add_members).append(member)
        for ip, was in before.addresses.items():
            if (ip in self.addresses) != was:
                (delta.delete_addresses if was else delta.add_addresses).append(ip)
        return delta

    def _claim(self, key: ViewKey, sp: ServicePortView, before: _Before | None = None) -> None:
        layout = port_layout(sp, self.node, self.scheduler)
        if before is not None:
            before.note(self, layout)
        self.ports[key] = (sp, layout)
        order = view_order(sp)
        claims = self.claims
        for vkey, vs, dests in layout.servers:
            held = claims.get(vkey)
            if held is None:
                claims[vkey] = {key: (order, vs, dests)}
                self.real_servers += len(dests)
            else:
                was = len(self._holder(held)[2])
                held[key] = (order, vs, dests)
                self.real_servers += len(self._holder(held)[2]) - was
        sets = self.sets
        for name, entry in layout.members:
            refs = sets[name]
            refs[entry] = refs.get(entry, 0) + 1
        addresses = self.addresses
        for ip in layout.addresses:
            addresses[ip] = addresses.get(ip, 0) + 1

    def _retract(self, key: ViewKey, before: _Before) -> None:
        held = self.ports.pop(key, None)
        if held is None:
            return
        layout = held[1]
        before.note(self, layout)
        for vkey, _, _ in layout.servers:
            claims = self.claims.get(vkey)
            if claims is None or key not in claims:
                continue  # a port naming one address twice: gone already
            was = len(self._holder(claims)[2])
            del claims[key]
            if claims:
                self.real_servers += len(self._holder(claims)[2]) - was
            else:
                del self.claims[vkey]
                self.real_servers -= was
        for name, entry in layout.members:
            _release(self.sets[name], entry)
        for ip in layout.addresses:
            _release(self.addresses, ip)


def _release(counts: dict[str, int], thing: str) -> None:
    n = counts[thing]
    if n == 1:
        del counts[thing]
    else:
        counts[thing] = n - 1


def desired_layout(view: NodeView, scheduler: str = DEFAULT_SCHEDULER) -> IpvsLayout:
    """What IPVS mode must hold on the view's node (kube-proxy's syncService/syncEndpoint)."""
    return LayoutMirror.of(view, scheduler).layout()
