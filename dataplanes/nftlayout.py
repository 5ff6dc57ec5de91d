"""The nftables mode's table layout, and what one Service port puts into it (pure, no I/O).

kube-proxy's nftables mode (facts, not code): table `ip kube-proxy`; a `service-ips`
verdict map keyed `ip daddr . meta l4proto . th dport` sending each frontend to its
Service's chain; `service-nodeports` keyed `meta l4proto . th dport`, looked up for
`fib daddr type local`; no-endpoint checks from filter hooks that reject (no endpoint at
all) or drop (no endpoint for this traffic policy); `numgen random mod N`; ClientIP
affinity in dynamic sets with a timeout; masquerade through mark 0x4000 in a postrouting
chain; every Service and every endpoint a chain of its own.

Here no Service has a chain of its own, and no verdict map holds an element per Service:
the kernel validates the whole table whenever a transaction adds a rule, or an element
that jumps to a chain, walking every element of every verdict map (14 ms for one rule or
one element at 100,000 Services in a `service-ips` map on this machine; 0.09 ms without
such a map). A frontend (a ClusterIP, an external or load-balancer IP, a NodePort of a
Service port) is instead a member of its *class*: a set and a chain of the same name, and
an endpoint map, shared by every frontend of one shape (path, protocol, endpoint counts,
policy, affinity):

    services               ip daddr <Service CIDR> meta l4proto tcp goto cluster-ip-tcp
                           meta l4proto tcp jump external-ip-tcp   (udp, sctp alike)
                           fib daddr type local ip daddr != 127.0.0.0/8 goto node-ports
    cluster-ip-tcp         ip daddr . th dport @cluster-ip-tcp-3 goto cluster-ip-tcp-3
    cluster-ip-tcp-3       (set)  VIP . port
    cluster-ip-tcp-3-endpoints   VIP . port . slot    : endpoint IP . port
    cluster-ip-tcp-3       ip saddr != <cluster CIDR> meta mark set meta mark or 0x4000
                           meta l4proto tcp dnat to ip daddr . th dport
                               . numgen random mod 3 map @cluster-ip-tcp-3-endpoints

So a Service added, changed or removed is elements of sets and maps; a class (and its
rule in its path's chain) comes and goes with its first and last member, and what the
kernel checks for it stays small: no verdict map holds an element per Service, no rule
reads a map with elements of other classes. A frontend whose endpoint count changes moves
to another class, its slots (same numbers, same endpoints) to that class's map: a
transaction of about twice its endpoints. A new connection looks its frontend up in the
class sets of its path and protocol, one set per class in use there (not one per
Service): the price of no per-Service verdict.

ClientIP affinity remembers `client . VIP . port . slot` (UDP in the slot's bit 30) in one
dynamic set with the Service's timeout; a slot keeps its endpoint across syncs (holes are
filled, never shifted). Hairpin masquerade is one postrouting rule over a set of
`endpoint IP . endpoint IP`. As kube-proxy's `cluster-ips-check`, a new connection still
addressed to a ClusterIP after DNAT (a port its Service lacks) is rejected, and one to an
unallocated address of the Service CIDR dropped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

from kube.state import DROP, REJECT, EndpointView, ServicePortView

FAMILY = "ip"
TABLE = "kube-proxy"
MASQUERADE_MARK = 0x4000
# Slots of the cluster-wide endpoint set that pods and the node itself use when a
# NodePort or external IP has externalTrafficPolicy Local (kube-proxy's short-circuit).
SHORT_CIRCUIT_BASE = 0x10000
AFFINITY_SET_SIZE = 262144
LOOPBACK = "127.0.0.0/8"

PATHS = ("cluster-ip", "external-ip", "node-port")
NODE_PORTS = "node-ports"
# No endpoint for this traffic: one set per verdict (a verdict-map element jumping to a
# reject chain would make the kernel validate the whole table when a Service loses its
# last endpoint).
NO_ENDPOINT_SERVICES = "no-endpoint-services"  # -reject, -drop
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
ENDPOINTS = "-endpoints"  # a class's endpoint map: its name and this
PROTOCOLS = ("tcp", "udp", "sctp")
HAIRPIN = "hairpin-endpoints"
CLUSTER_IPS = "cluster-ips"
CLUSTER_IPS_CHECK = "cluster-ips-check"
AFFINITY = "affinity"
REJECT_CHAIN = "reject-chain"
# loadBalancerSourceRanges: kube-proxy's firewall-ips map sends a load-balancer IP:port to
# a chain per Service; here a set sends it to one shared chain that looks the source up in
# one interval map.
FIREWALL_IPS = "firewall-ips"
FIREWALL_SOURCES = "firewall-sources"
FIREWALL_CHECK = "firewall-check"
FIREWALL_SOURCES_CHECK = "firewall-sources-check"
VERDICTS = {REJECT: "reject", DROP: "drop"}  # the view's filter -> set name suffix

IP_KEY = "ip daddr . meta l4proto . th dport"
PORT_KEY = "meta l4proto . th dport"
# nft 1.0.6 loses a typeof of five expressions when it reads the set back, so the protocol
# rides in the slot number of the affinity key: client . VIP . port . (slot | UDP bit).
AFFINITY_KEY = "ip saddr . ip daddr . th dport"
AFFINITY_UDP = 0x40000000
AFFINITY_SCTP = 0x20000000
AFFINITY_PROTOCOL_BITS = {"udp": AFFINITY_UDP, "sctp": AFFINITY_SCTP}  # tcp: neither
SLOT = "numgen random mod 1"  # the typeof of a slot: an integer

# name -> declaration body; elements are added separately.
MAPS: dict[str, str] = {
    # A concatenation ending in a network needs an interval map; `type` rather than
    # `typeof`, which nft 1.0.6 does not read back for intervals of concatenations.
    FIREWALL_SOURCES: "type ipv4_addr . inet_proto . inet_service . ipv4_addr : verdict ; "
                      "flags interval",
}
SETS: dict[str, str] = {
    HAIRPIN: "typeof ip saddr . ip daddr",
    CLUSTER_IPS: "typeof ip daddr",
    AFFINITY: f"typeof {AFFINITY_KEY} . {SLOT} ; flags dynamic,timeout ; size {AFFINITY_SET_SIZE}",
    FIREWALL_IPS: f"typeof {IP_KEY}",
}
for _verdict in VERDICTS.values():
    SETS[f"{NO_ENDPOINT_SERVICES}-{_verdict}"] = f"typeof {IP_KEY}"
    SETS[f"{NO_ENDPOINT_NODEPORTS}-{_verdict}"] = f"typeof {PORT_KEY}"

# Base chains: name -> hook line. Filter checks run after DNAT on output too, so a node
# process reaching an externalTrafficPolicy=Local Service it can short-circuit is not dropped.
BASE_CHAINS: dict[str, str] = {
    "nat-prerouting": "type nat hook prerouting priority dstnat ; policy accept ;",
    "nat-output": "type nat hook output priority -100 ; policy accept ;",
    "nat-postrouting": "type nat hook postrouting priority srcnat ; policy accept ;",
    "filter-input": "type filter hook input priority -110 ; policy accept ;",
    "filter-forward": "type filter hook forward priority -110 ; policy accept ;",
    "filter-output": "type filter hook output priority -90 ; policy accept ;",
    # kube-proxy's firewall hooks: before DNAT, while the destination is still the LB IP.
    "filter-prerouting-pre-dnat": "type filter hook prerouting priority -110 ; policy accept ;",
    "filter-output-pre-dnat": "type filter hook output priority -110 ; policy accept ;",
}


def fixed_chains(service_cidr: str = "") -> dict[str, list[str]]:
    """The chains every node has, whatever its Services.

    kube-proxy's cluster-ips-check: after DNAT, a new connection still addressed to an
    active ClusterIP asked for a port the Service does not have (rejected), and one to
    any other address of the Service CIDR asked for no Service at all (dropped).
    """
    m = f"0x{MASQUERADE_MARK:x}"
    check = [f"ip daddr @{CLUSTER_IPS} reject"]
    if service_cidr:
        check.append(f"ip daddr {service_cidr} drop")
    local = f"fib daddr type local ip daddr != {LOOPBACK}"

    def refuse(key: str, sets: str) -> list[str]:
        return [f"{key} @{sets}-drop drop", f"{key} @{sets}-reject goto {REJECT_CHAIN}"]

    # ClusterIPs are in the Service CIDR (manifests refuse others), so a packet to one never
    # looks at external IPs or NodePorts; the placeholder table of install knows no CIDR.
    cluster = f"ip daddr {service_cidr} " if service_cidr else ""
    services = [f"{cluster}meta l4proto {p} {'goto' if cluster else 'jump'} cluster-ip-{p}"
                for p in PROTOCOLS]
    services += [f"meta l4proto {p} jump external-ip-{p}" for p in PROTOCOLS]
    services.append(f"{local} goto {NODE_PORTS}")
    return {
        "nat-prerouting": ["jump services"],
        "nat-output": ["jump services"],
        "nat-postrouting": ["jump masquerading"],
        "filter-input": [
            "ct state new jump nodeport-endpoints-check",
            "ct state new jump service-endpoints-check",
        ],
        "filter-forward": [
            "ct state new jump service-endpoints-check",
            f"ct state new jump {CLUSTER_IPS_CHECK}",
        ],
        "filter-output": [
            "ct state new jump service-endpoints-check",
            "ct state new jump nodeport-endpoints-check",
            f"ct state new jump {CLUSTER_IPS_CHECK}",
        ],
        "filter-prerouting-pre-dnat": [f"ct state new jump {FIREWALL_CHECK}"],
        "filter-output-pre-dnat": [f"ct state new jump {FIREWALL_CHECK}"],
        FIREWALL_CHECK: [f"{IP_KEY} @{FIREWALL_IPS} goto {FIREWALL_SOURCES_CHECK}"],
        # A source inside the ranges returns; anything else to the LB IP is dropped.
        FIREWALL_SOURCES_CHECK: [f"{IP_KEY} . ip saddr vmap @{FIREWALL_SOURCES}", "drop"],
        "services": services,
        NODE_PORTS: [f"meta l4proto {p} goto node-port-{p}" for p in PROTOCOLS],
        # A path's chain holds one rule per class in use (see Class.rule), no more.
        **{f"{path}-{p}": [] for path in PATHS for p in PROTOCOLS},
        "service-endpoints-check": refuse(IP_KEY, NO_ENDPOINT_SERVICES),
        "nodeport-endpoints-check": refuse(f"{local} {PORT_KEY}", NO_ENDPOINT_NODEPORTS),
        "masquerading": [
            # Hairpin: a pod sent to itself through a Service must see another source.
            f"ct status dnat ip saddr . ip daddr @{HAIRPIN} meta mark set meta mark or {m}",
            f"meta mark & {m} == 0 return",
            # Cleared so a packet that loops through the stack is not masqueraded twice.
            f"meta mark set meta mark xor {m}",
            "masquerade fully-random",
        ],
        REJECT_CHAIN: ["reject"],
        CLUSTER_IPS_CHECK: check,
    }


# --------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class ServiceClass:
    """The shape shared by every frontend whose traffic one class chain handles.

    path: "cluster-ip" (ClusterIP traffic), "external-ip" or "node-port"; protocol;
    count: endpoints at slots 0..count-1 (Cluster policy: all; Local policy: local ones);
    short_circuit: with externalTrafficPolicy Local, the cluster-wide endpoints at
    SHORT_CIRCUIT_BASE.. that pods and the node itself use (None otherwise);
    affinity: ClientIP timeout in seconds, or None. Its members are a set of the same
    name as its chain, which the chain of its path and protocol looks up.
    """

    path: str
    protocol: str  # "tcp" | "udp" | "sctp": the endpoint maps are per protocol
    count: int
    short_circuit: int | None = None
    affinity: int | None = None

    @cached_property
    def chain(self) -> str:
        name = f"{self.path}-{self.protocol}"
        name += f"-{self.count}" if self.short_circuit is None else (
            f"-local-{self.count}-cluster-{self.short_circuit}"
        )
        if self.affinity is not None:
            name += f"-affinity-{self.affinity}"
        return name

    @cached_property
    def endpoints(self) -> str:
        """Its endpoint map: frontend key . slot -> endpoint. A map of its own, since a rule
        reading a map makes the kernel check every element of it (21 ms for a new class
        chain reading a shared map of 300,000 elements)."""
        return self.chain + ENDPOINTS

    @property
    def endpoints_body(self) -> str:
        """The map's declaration. Its data is typed `ip daddr . tcp dport` (or udp, sctp),
        which adds a `meta l4proto` match to every rule that reads it; `ip daddr . th dport`
        would not, but nft 1.0.6 cannot read that back from the kernel ("conflicting
        protocols"), so no rule could be added to an existing table."""
        return f"typeof {self.key} . {SLOT} : ip daddr . {self.protocol} dport"

    @property
    def partition(self) -> str:
        """The chain of its path and protocol, which holds its rule."""
        return f"{self.path}-{self.protocol}"

    @property
    def key(self) -> str:
        """The expression its set is keyed by."""
        return "th dport" if self.path == "node-port" else "ip daddr . th dport"

    @cached_property
    def rule(self) -> str:
        """Its rule in its partition's chain."""
        return f"{self.key} @{self.chain} goto {self.chain}"

    def rules(self, cluster_cidr: str) -> list[str]:
        m = f"0x{MASQUERADE_MARK:x}"
        masq = f"meta mark set meta mark or {m}"
        nodeport = self.path == "node-port"
        lookup = "th dport" if nodeport else "ip daddr . th dport"
        emap = self.endpoints
        out: list[str] = []
        if self.short_circuit is None:
            if self.path == "cluster-ip":
                # Off-cluster sources (node processes, routed clients) are masqueraded.
                out.append(f"ip saddr != {cluster_cidr} {masq}")
            else:
                out.append(masq)
            out += self._pick("", lookup, emap, 0, self.count)
            return out
        # externalTrafficPolicy Local: pods and the node itself take every endpoint,
        # the node masqueraded; other clients keep their address and take local ones.
        if self.short_circuit:
            out += self._pick(
                f"ip saddr {cluster_cidr} ", lookup, emap, SHORT_CIRCUIT_BASE, self.short_circuit
            )
            out.append(f"fib saddr type local {masq}")
            out += self._pick(
                "fib saddr type local ", lookup, emap, SHORT_CIRCUIT_BASE, self.short_circuit
            )
        if self.count:
            out += self._pick("", lookup, emap, 0, self.count)
        return out

    def _pick(self, match: str, lookup: str, emap: str, base: int, n: int) -> list[str]:
        # dnat to a port needs a transport protocol match first.
        match = f"{match}meta l4proto {self.protocol} "

        def slot(k: int) -> str:
            return f"{SLOT} offset {k}" if k else SLOT

        def dnat(k: int) -> str:
            return f"dnat to {lookup} . {slot(k)} map @{emap}"

        if self.affinity is None:
            offset = f" offset {base}" if base else ""
            return [f"{match}dnat to {lookup} . numgen random mod {n}{offset} map @{emap}"]
        proto_bit = AFFINITY_PROTOCOL_BITS.get(self.protocol, 0)

        def key(k: int) -> str:
            return f"{AFFINITY_KEY} . {slot(k | proto_bit)}"

        out = []
        for k in range(base, base + n):
            remember = f"update @{AFFINITY} {{ {key(k)} timeout {self.affinity}s }}"
            out.append(f"{match}{key(k)} @{AFFINITY} {remember} {dnat(k)}")
        for i, k in enumerate(range(base, base + n)):
            # Each rule draws afresh: 1/n, then 1/(n-1) of the rest, ... = uniform.
            chance = f"numgen random mod {n - i} == 0 " if i < n - 1 else ""
            remember = f"update @{AFFINITY} {{ {key(k)} timeout {self.affinity}s }}"
            out.append(f"{match}{chance}{remember} {dnat(k)}")
        return out


# --------------------------------------------------------------------------- frontends


@dataclass(frozen=True)
class SlotGroup:
    """The endpoints of one lookup key at consecutive slots from `base`."""

    key: str  # "VIP . 80" or "30001"
    base: int


FrontendKey = str  # "VIP . tcp . 80" (ClusterIP, external, load-balancer IP), "tcp . 30001"
Element = tuple[str, str]  # (map or set, key)
Slots = tuple[tuple[SlotGroup, tuple[str, ...]], ...]  # endpoint values "ip . port" by slot


@dataclass(frozen=True)
class Frontend:
    """What one frontend of a Service port puts into the table: its class membership, its
    endpoint slots, its no-endpoint and firewall entries. Elements of two frontends never
    share a key, so a frontend is added or taken out whole."""

    key: str  # its FrontendKey, also its key in no-endpoint and firewall sets
    lookup: str  # its key in class sets and endpoint maps: "VIP . 80" or "30001"
    cls: ServiceClass | None = None  # None: no endpoint this frontend translates to
    slots: Slots = ()
    refuse: str | None = None  # the no-endpoint set it is in
    sources: tuple[str, ...] = ()  # loadBalancerSourceRanges (load-balancer IPs only)
    hairpin: frozenset[str] = frozenset()  # "ip . ip" of its endpoints
    affinity: int | None = None  # ClientIP timeout

    @cached_property
    def elements(self) -> dict[Element, str | None]:
        """(map or set, key) -> map value, None for a set member."""
        key = self.key
        out: dict[Element, str | None] = {}
        if self.cls is not None:
            out[self.cls.chain, self.lookup] = None
            emap = self.cls.endpoints
            for group, values in self.slots:
                prefix = group.key
                for k, value in enumerate(values, group.base):
                    out[emap, f"{prefix} . {k}"] = value
        if self.refuse is not None:
            out[self.refuse, key] = None
        if self.sources:
            out[FIREWALL_IPS, key] = None
            for net in self.sources:
                out[FIREWALL_SOURCES, f"{key} . {net}"] = "return"
        return out


@lru_cache(maxsize=4096)
def _class(path: str, protocol: str, count: int, short_circuit: int | None,
           affinity: int | None) -> ServiceClass:
    return ServiceClass(path, protocol, count, short_circuit, affinity)


def _fill(previous: dict[FrontendKey, Frontend], fkey: FrontendKey, group: SlotGroup,
          eps: Sequence[EndpointView]) -> tuple[SlotGroup, tuple[str, ...]]:
    """The endpoints of one slot group, as values in slot order (see assign_slots)."""
    before = previous.get(fkey)
    old = next((values for g, values in before.slots if g == group), None) if before else None
    if old is None:
        return group, tuple([f"{e.ip} . {e.port}" for e in eps])
    return group, tuple([f"{e.ip} . {e.port}" for e in assign_slots(old, eps)])


def _pairs(*endpoint_lists: Sequence[EndpointView]) -> frozenset[str]:
    return frozenset([f"{e.ip} . {e.ip}" for eps in endpoint_lists for e in eps])


def render_frontends(sp: ServicePortView, previous: dict[FrontendKey, Frontend] | None = None,
                     node_ip: str | None = None) -> dict[FrontendKey, Frontend]:
    """A Service port's frontends; slots follow `previous` (its frontends of the last
    render) where endpoints stay. node_ip: the node's address, which kube-proxy checks
    against loadBalancerSourceRanges."""
    previous = previous or {}
    out: dict[FrontendKey, Frontend] = {}
    proto = sp.protocol.lower()
    affinity = sp.affinity_timeout_s
    # ClusterIP traffic.
    fkey = f"{sp.cluster_ip} . {proto} . {sp.port}"
    lookup = f"{sp.cluster_ip} . {sp.port}"
    eps = sp.internal_endpoints
    if eps:
        slots = _fill(previous, fkey, SlotGroup(lookup, 0), eps)
        cls = _class("cluster-ip", proto, len(eps), None, affinity)
        out[fkey] = Frontend(fkey, lookup, cls, (slots,), hairpin=_pairs(eps), affinity=affinity)
    else:
        refuse = f"{NO_ENDPOINT_SERVICES}-{VERDICTS[sp.internal_traffic_filter]}"
        out[fkey] = Frontend(fkey, lookup, refuse=refuse, affinity=affinity)
    if not sp.has_external:
        return out

    # External traffic: external and load-balancer IPs, the NodePort.
    sources = _firewall_sources(sp, node_ip)
    targets = [("external-ip", f"{ip} . {sp.port}", f"{ip} . {proto} . {sp.port}",
                sources if ip in sp.load_balancer_ips else ())
               for ip in dict.fromkeys((*sp.external_ips, *sp.load_balancer_ips))]
    if sp.node_port is not None:
        targets.append(("node-port", f"{sp.node_port}", f"{proto} . {sp.node_port}", ()))
    outside, inside = sp.external_endpoints, sp.cluster_endpoints
    local = sp.external_policy_local
    pairs = _pairs(outside, inside) if inside else frozenset()
    for path, lookup, fkey, firewall in targets:
        refuse = None
        if sp.external_traffic_filter:
            # Clients that were not short-circuited reach the filter hooks untranslated.
            base = NO_ENDPOINT_NODEPORTS if path == "node-port" else NO_ENDPOINT_SERVICES
            refuse = f"{base}-{VERDICTS[sp.external_traffic_filter]}"
        cls, slots = None, ()
        if inside and not local:
            one = _fill(previous, fkey, SlotGroup(lookup, 0), outside)
            cls, slots = _class(path, proto, len(outside), None, affinity), (one,)
        elif inside:
            # Pods and the node itself take the cluster-wide set at SHORT_CIRCUIT_BASE.
            every = _fill(previous, fkey, SlotGroup(lookup, SHORT_CIRCUIT_BASE), inside)
            if outside:
                slots = (_fill(previous, fkey, SlotGroup(lookup, 0), outside), every)
            else:
                slots = (every,)
            cls = _class(path, proto, len(outside), len(inside), affinity)
        out[fkey] = Frontend(fkey, lookup, cls, slots, refuse, firewall, pairs, affinity)
    return out


def _firewall_sources(sp: ServicePortView, node_ip: str | None) -> tuple[str, ...]:
    """loadBalancerSourceRanges: the networks whose sources may reach the LB IPs.

    Like kube-proxy, a range holding the node's own address also admits the LB IPs as
    sources (an LB IP bound on a node loops back with itself as source). Overlapping
    networks are merged: an interval map may refuse them.
    """
    if not (sp.load_balancer_ips and sp.load_balancer_source_ranges):
        return ()
    nets = [ipaddress.ip_network(cidr) for cidr in sp.load_balancer_source_ranges]
    if node_ip is not None and any(ipaddress.ip_address(node_ip) in net for net in nets):
        nets += [ipaddress.ip_network(f"{ip}/32") for ip in sp.load_balancer_ips]
    return tuple(str(net) for net in ipaddress.collapse_addresses(nets))


def assign_slots(previous: Sequence[str] | None, wanted: Sequence[EndpointView]
                 ) -> list[EndpointView]:
    """Endpoints in slot order; one that stays keeps its slot, so affinity stays valid.
    `previous`: the slots' values ("ip . port") of the last render.

    New endpoints fill the holes removed ones left; remaining holes take the last
    endpoints, because `numgen random mod n` needs slots 0..n-1.
    """
    if not previous:
        return list(wanted)
    by_addr = {f"{e.ip} . {e.port}": e for e in wanted}
    if tuple(by_addr) == tuple(previous):
        return list(wanted)
    kept = set(previous)
    fresh = [e for a, e in by_addr.items() if a not in kept]
    slots: list[EndpointView | None] = [by_addr.get(a) for a in previous]
    for i, ep in enumerate(slots):
        if ep is None and fresh:
            slots[i] = fresh.pop(0)
    slots += fresh
    while slots and slots[-1] is None:
        slots.pop()
    for i in range(len(slots)):
        if i < len(slots) and slots[i] is None:
            slots[i] = slots.pop()
            while slots and slots[-1] is None:
                slots.pop()
    return [e for e in slots if e is not None]


def declare_chain(name: str) -> str:
    hook = BASE_CHAINS.get(name)
    return f"add chain {FAMILY} {TABLE} {name}" + (f" {{ {hook} }}" if hook else "")


def elements_command(verb: str, name: str, items: Sequence[str]) -> str:
    return f"{verb} element {FAMILY} {TABLE} {name} {{ {', '.join(items)} }}"
