"""The nftables data plane: kube-proxy's nftables layout with no chain per Service.

kube-proxy's nftables mode (facts, not code): table `ip kube-proxy`; a `service-ips`
verdict map keyed `ip daddr . meta l4proto . th dport`; `service-nodeports` keyed
`meta l4proto . th dport`, looked up for `fib daddr type local`; `no-endpoint-services`
and `no-endpoint-nodeports` maps checked from filter hooks that reject (no endpoint at
all) or drop (no endpoint for this traffic policy); `numgen random mod N`; ClientIP
affinity in dynamic sets with a timeout; masquerade through mark 0x4000 in a postrouting
chain. kube-proxy gives every Service and every endpoint its own chain, and every chain
an anonymous map. Here no Service has a chain of its own:

    service-ips            VIP . proto . port   : goto cluster-ip-tcp-3
    service-endpoints-tcp  VIP . port . slot    : endpoint IP . port
    cluster-ip-tcp-3       ip saddr != <cluster CIDR> meta mark set meta mark or 0x4000
                           meta l4proto tcp dnat to ip daddr . th dport
                               . numgen random mod 3 map @service-endpoints-tcp

A Service's behaviour is map elements; the few chains are shared by every Service of one
shape ("class": path, protocol, endpoint count, traffic policy, affinity timeout).
ClientIP affinity remembers `client . VIP . port . slot` (UDP in the slot's bit 30) in
one dynamic set with the Service's timeout; a slot keeps its endpoint across syncs (holes
are filled, never shifted) and remembered clients of a slot that changed are deleted.
Hairpin masquerade is one postrouting rule over a set of `endpoint IP . endpoint IP`.
As kube-proxy's `cluster-ips-check`, a new connection still addressed to a ClusterIP after
DNAT (a port its Service lacks) is rejected, and one to an unallocated address of the
Service CIDR dropped; conntrack is liberal about TCP windows instead of INVALID packets
being dropped (install).

Measured on this machine (2 cores shared with other engineers, load average 5-7 while
measuring, kernel 6.18, nftables 1.0.6; numbers are noisy, CPU is user+sys of every
process involved). Loads into a fresh namespace, 10,000 ClusterIP Services x 3 endpoints:

    layout / loader                                        wall s    CPU s
    kube-proxy's: chain per Service and endpoint, nft -f    124        -     (measured by hand)
    chain per Service, inline `numgen .. map { }`, nft -f   56.5      56.1   the kernel names
        anonymous sets by a linear scan: 2,000 0.6 s, 4,000 3.1 s, quadratic
    10,000 empty chains, nft -f                             0.09      0.08   chains are cheap
    chain per Service, one dnat rule per endpoint, nft -f   2.35      2.26   no anonymous set
    no Service chain, 12 slots per Service (120,000 elems)  3.15      3.04
    this layout, 40,100 elements + 15 chains, nft -f        2.0-2.9   0.75
    30,000 elements as one raw nfnetlink batch (Python)     0.31      0.23   nft -f: 2.2 / 0.56

Raw netlink loads elements with 2.4x less CPU but would need every rule expression
encoded by hand, or a second transaction; libnftables (in-process, on a thread in the
node's namespace) keeps one `nft -f` transaction and saves a fork and exec per sync.
Syncs (bench/mode_benches.py; medians with min-max of the repeats; bench.synthetic's mix
with a NodePort every 20th and ClientIP affinity every 100th Service):

    Services  sync                 quiet machine (load 0.1-1)      loaded (load 5-7)
                                   wall s               CPU s      wall s
    10,000    full, from empty     1.00 (0.95-1.22)     0.99       2.9-4.2 (2.36-5.54)
                                   1.28 (1.14-1.31)     1.28       (nox -s bench, 2026-11-28)
    10,000    one Service changed  0.036 (0.027-0.040)  0.028      0.043-0.11 (0.035-0.23)
    10,000    nothing changed      0.0017               0.0017     0.001-0.014
    30,000    full                 4.0 (3.94-4.06)      4.0        7.9-13.0
    30,000    one Service changed  0.056 (0.048-0.080)  0.050      0.16-0.38 (0.12-0.85)

The full sync is about 0.25 s of rendering in Python and 0.7 s of libnftables parsing
and the kernel's commit.
"""

from __future__ import annotations

import ctypes
import gc
import ipaddress
import json
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dataplanes import healthcheck
from dataplanes.base import DataplaneError, Host, NodeHandle, SyncStats
from dataplanes.conntrack import run_deletes, stale_udp_flow_deletes
from kube.state import DROP, REJECT, EndpointView, NodeView, ServicePortView

FAMILY = "ip"
TABLE = "kube-proxy"
MASQUERADE_MARK = 0x4000
# Slots of the cluster-wide endpoint set that pods and the node itself use when a
# NodePort or external IP has externalTrafficPolicy Local (kube-proxy's short-circuit).
SHORT_CIRCUIT_BASE = 0x10000
AFFINITY_SET_SIZE = 262144
LOOPBACK = "127.0.0.0/8"

SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
SERVICE_ENDPOINTS = "service-endpoints"  # one map per protocol: service-endpoints-tcp, -udp, -sctp
NODEPORT_ENDPOINTS = "nodeport-endpoints"
PROTOCOLS = ("tcp", "udp", "sctp")
HAIRPIN = "hairpin-endpoints"
BE_LIBERAL = "net.netfilter.nf_conntrack_tcp_be_liberal"
CLUSTER_IPS = "cluster-ips"
CLUSTER_IPS_CHECK = "cluster-ips-check"
AFFINITY = "affinity"
REJECT_CHAIN = "reject-chain"
# loadBalancerSourceRanges: kube-proxy's firewall-ips map sends a load-balancer IP:port to
# a chain per Service; here one shared chain looks the source up in one interval map.
FIREWALL_IPS = "firewall-ips"
FIREWALL_SOURCES = "firewall-sources"
FIREWALL_CHECK = "firewall-check"
FIREWALL_SOURCES_CHECK = "firewall-sources-check"
# The no-endpoint maps' verdict for the view's filter of a frontend.
_FILTER_VERDICTS = {REJECT: f"goto {REJECT_CHAIN}", DROP: "drop"}

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
    SERVICE_IPS: f"typeof {IP_KEY} : verdict",
    SERVICE_NODEPORTS: f"typeof {PORT_KEY} : verdict",
    NO_ENDPOINT_SERVICES: f"typeof {IP_KEY} : verdict",
    NO_ENDPOINT_NODEPORTS: f"typeof {PORT_KEY} : verdict",
    FIREWALL_IPS: f"typeof {IP_KEY} : verdict",
    # A concatenation ending in a network needs an interval map; `type` rather than
    # `typeof`, which nft 1.0.6 does not read back for intervals of concatenations.
    FIREWALL_SOURCES: "type ipv4_addr . inet_proto . inet_service . ipv4_addr : verdict ; "
                      "flags interval",
}
# Endpoint maps are per protocol: their data must be typed `ip daddr . tcp dport` (or udp),
# which adds a `meta l4proto` match to every rule that reads them; `ip daddr . th dport`
# would not, but nft 1.0.6 cannot read that back from the kernel ("conflicting
# protocols"), so no rule could be added to an existing table.
for _proto in PROTOCOLS:
    MAPS[f"{SERVICE_ENDPOINTS}-{_proto}"] = f"typeof ip daddr . th dport . {SLOT} : ip daddr . {_proto} dport"
    MAPS[f"{NODEPORT_ENDPOINTS}-{_proto}"] = f"typeof th dport . {SLOT} : ip daddr . {_proto} dport"
SETS: dict[str, str] = {
    HAIRPIN: "typeof ip saddr . ip daddr",
    CLUSTER_IPS: "typeof ip daddr",
    AFFINITY: f"typeof {AFFINITY_KEY} . {SLOT} ; flags dynamic,timeout ; size {AFFINITY_SET_SIZE}",
}

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
        FIREWALL_CHECK: [f"{IP_KEY} vmap @{FIREWALL_IPS}"],
        # A source inside the ranges returns; anything else to the LB IP is dropped.
        FIREWALL_SOURCES_CHECK: [f"{IP_KEY} . ip saddr vmap @{FIREWALL_SOURCES}", "drop"],
        "services": [
            f"{IP_KEY} vmap @{SERVICE_IPS}",
            f"fib daddr type local ip daddr != {LOOPBACK} {PORT_KEY} vmap @{SERVICE_NODEPORTS}",
        ],
        "service-endpoints-check": [f"{IP_KEY} vmap @{NO_ENDPOINT_SERVICES}"],
        "nodeport-endpoints-check": [
            f"fib daddr type local ip daddr != {LOOPBACK} {PORT_KEY} vmap @{NO_ENDPOINT_NODEPORTS}"
        ],
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
    """The shape shared by every Service whose traffic one class chain handles.

    path: "cluster-ip" (ClusterIP traffic), "external-ip" or "node-port"; protocol;
    count: endpoints at slots 0..count-1 (Cluster policy: all; Local policy: local ones);
    short_circuit: with externalTrafficPolicy Local, the cluster-wide endpoints at
    SHORT_CIRCUIT_BASE.. that pods and the node itself use (None otherwise);
    affinity: ClientIP timeout in seconds, or None.
    """

    path: str
    protocol: str  # "tcp" | "udp": the endpoint maps are per protocol
    count: int
    short_circuit: int | None = None
    affinity: int | None = None

    @property
    def chain(self) -> str:
        name = f"{self.path}-{self.protocol}"
        name += f"-{self.count}" if self.short_circuit is None else (
            f"-local-{self.count}-cluster-{self.short_circuit}"
        )
        if self.affinity is not None:
            name += f"-affinity-{self.affinity}"
        return name

    def rules(self, cluster_cidr: str) -> list[str]:
        m = f"0x{MASQUERADE_MARK:x}"
        masq = f"meta mark set meta mark or {m}"
        nodeport = self.path == "node-port"
        lookup = "th dport" if nodeport else "ip daddr . th dport"
        emap = f"{NODEPORT_ENDPOINTS if nodeport else SERVICE_ENDPOINTS}-{self.protocol}"
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


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class SlotGroup:
    """The endpoints of one lookup key at consecutive slots from `base`."""

    emap: str  # service-endpoints-<proto> or nodeport-endpoints-<proto>
    key: str  # "VIP . tcp . 80" or "tcp . 30001"
    base: int


@dataclass
class ServiceRules:
    """What one ServicePortView puts into the table."""

    elements: dict[tuple[str, str], str] = field(default_factory=dict)  # (map, key) -> value
    slots: dict[SlotGroup, tuple[str, ...]] = field(default_factory=dict)  # endpoint addrs
    affinity: dict[SlotGroup, int] = field(default_factory=dict)  # remembered groups, timeout
    classes: dict[str, ServiceClass] = field(default_factory=dict)
    hairpin: set[str] = field(default_factory=set)  # "ip . ip" of its endpoints
    cluster_ip: str = ""  # an element of cluster-ips


ServiceKey = tuple[str, str, int]  # (ServicePortName, protocol, port)


@dataclass
class Ruleset:
    """One render: chains, map and set elements, and what each Service contributed.

    Shared elements (hairpin pairs, ClusterIPs, class chains) carry reference counts, so
    an incremental sync can tell when the last Service using one left.
    """

    cluster_cidr: str
    chains: dict[str, list[str]] = field(default_factory=fixed_chains)
    maps: dict[str, dict[str, str]] = field(default_factory=lambda: {m: {} for m in MAPS})
    hairpin: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    services: dict[ServiceKey, tuple[ServicePortView, ServiceRules]] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)  # maps still shared with the copied Ruleset
    order: tuple[ServicePortView, ...] = ()  # the view's Service ports, as rendered
    service_cidr: str = ""  # what cluster-ips-check drops (fixed_chains(service_cidr))
    cluster_ips: dict[str, int] = field(default_factory=dict)  # ClusterIP -> its ports

    @property
    def slots(self) -> dict[SlotGroup, tuple[str, ...]]:
        return {g: s for _, rules in self.services.values() for g, s in rules.slots.items()}

    @property
    def affinity(self) -> dict[SlotGroup, int]:
        return {g: t for _, rules in self.services.values() for g, t in rules.affinity.items()}

    def element_count(self) -> int:
        return sum(len(e) for e in self.maps.values()) + len(self.hairpin) + len(self.cluster_ips)

    def rule_count(self) -> int:
        return sum(len(r) for r in self.chains.values())

    def copy(self) -> Ruleset:
        """A Ruleset that copies a map only when it first changes (120,000 elements at 30k)."""
        return Ruleset(
            self.cluster_cidr,
            dict(self.chains),
            dict(self.maps),
            dict(self.hairpin),
            dict(self.classes),
            dict(self.services),
            set(self.maps),
            service_cidr=self.service_cidr,
            cluster_ips=dict(self.cluster_ips),
        )

    def _writable(self, name: str) -> dict[str, str]:
        if name in self.shared:
            self.maps[name] = dict(self.maps[name])
            self.shared.discard(name)
        return self.maps[name]

    def add(self, key: ServiceKey, sp: ServicePortView, rules: ServiceRules) -> None:
        self.services[key] = (sp, rules)
        for (name, k), value in rules.elements.items():
            self._writable(name)[k] = value
        for pair in rules.hairpin:
            self.hairpin[pair] = self.hairpin.get(pair, 0) + 1
        if rules.cluster_ip:
            self.cluster_ips[rules.cluster_ip] = self.cluster_ips.get(rules.cluster_ip, 0) + 1
        for name, cls in rules.classes.items():
            if name not in self.classes:
                self.chains[name] = cls.rules(self.cluster_cidr)
            self.classes[name] = self.classes.get(name, 0) + 1

    def remove(self, key: ServiceKey, forget: bool = True) -> None:
        """Take a Service port's elements out; forget=False keeps its place for add()."""
        rules = self.services.pop(key)[1] if forget else self.services[key][1]
        for (name, k), value in rules.elements.items():
            if self.maps[name].get(k) == value:
                del self._writable(name)[k]
        for pair in rules.hairpin:
            self.hairpin[pair] -= 1
            if not self.hairpin[pair]:
                del self.hairpin[pair]
        if rules.cluster_ip:
            self.cluster_ips[rules.cluster_ip] -= 1
            if not self.cluster_ips[rules.cluster_ip]:
                del self.cluster_ips[rules.cluster_ip]
        for name in rules.classes:
            self.classes[name] -= 1
            if not self.classes[name]:
                del self.classes[name]
                del self.chains[name]

    def script(self) -> str:
        """An `nft -f` transaction that replaces the whole table."""
        t = f"{FAMILY} {TABLE}"
        out = [f"add table {t}", f"delete table {t}", f"add table {t}"]
        out += [_declare_chain(name) for name in self.chains]
        out += [f"add map {t} {name} {{ {body} ; }}" for name, body in MAPS.items()]
        out += [f"add set {t} {name} {{ {body} ; }}" for name, body in SETS.items()]
        for name, elements in self.maps.items():
            if elements:
                out.append(_elements("add", name, [f"{k} : {v}" for k, v in elements.items()]))
        if self.hairpin:
            out.append(_elements("add", HAIRPIN, sorted(self.hairpin)))
        if self.cluster_ips:
            out.append(_elements("add", CLUSTER_IPS, sorted(self.cluster_ips)))
        for name, rules in self.chains.items():
            out += [f"add rule {t} {name} {rule}" for rule in rules]
        return "\n".join(out) + "\n"


def _declare_chain(name: str) -> str:
    hook = BASE_CHAINS.get(name)
    return f"add chain {FAMILY} {TABLE} {name}" + (f" {{ {hook} }}" if hook else "")


def _elements(verb: str, name: str, items: Sequence[str]) -> str:
    return f"{verb} element {FAMILY} {TABLE} {name} {{ {', '.join(items)} }}"


def assign_slots(previous: Sequence[str] | None, wanted: Sequence[EndpointView]) -> list[EndpointView]:
    """Endpoints in slot order; one that stays keeps its slot, so affinity stays valid.

    New endpoints fill the holes removed ones left; remaining holes take the last
    endpoints, because `numgen random mod n` needs slots 0..n-1.
    """
    if not previous:
        return list(wanted)
    by_addr = {f"{e.ip}:{e.port}": e for e in wanted}
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


def service_key(sp: ServicePortView) -> ServiceKey:
    return (sp.name, sp.protocol, sp.port)


def render_service(
    sp: ServicePortView, previous: ServiceRules | None = None, node_ip: str | None = None
) -> ServiceRules:
    """One Service port's elements; its slots follow `previous` where endpoints stay.

    node_ip: the node's address, which kube-proxy checks against loadBalancerSourceRanges.
    """
    out = ServiceRules(cluster_ip=sp.cluster_ip)
    before = previous.slots if previous else {}
    proto = sp.protocol.lower()
    affinity = sp.affinity_timeout_s
    elements = out.elements

    def fill(group: SlotGroup, eps: Sequence[EndpointView]) -> int:
        ordered = assign_slots(before.get(group), eps)
        out.slots[group] = tuple(f"{e.ip}:{e.port}" for e in ordered)
        for k, ep in enumerate(ordered, group.base):
            elements[group.emap, f"{group.key} . {k}"] = f"{ep.ip} . {ep.port}"
            out.hairpin.add(f"{ep.ip} . {ep.ip}")
        if affinity is not None:
            out.affinity[group] = affinity
        return len(ordered)

    def use(cls: ServiceClass) -> str:
        name = cls.chain
        out.classes[name] = cls
        return f"goto {name}"

    ip_map, port_map = f"{SERVICE_ENDPOINTS}-{proto}", f"{NODEPORT_ENDPOINTS}-{proto}"
    key = f"{sp.cluster_ip} . {proto} . {sp.port}"
    if sp.internal_endpoints:
        n = fill(SlotGroup(ip_map, f"{sp.cluster_ip} . {sp.port}", 0), sp.internal_endpoints)
        elements[SERVICE_IPS, key] = use(ServiceClass("cluster-ip", proto, n, None, affinity))
    else:
        elements[NO_ENDPOINT_SERVICES, key] = _FILTER_VERDICTS[sp.internal_traffic_filter]
    if not sp.has_external:
        return out
    _firewall(sp, proto, elements, node_ip)
    # (endpoint map, its key, the dispatch key); load-balancer IPs are served as externalIPs.
    targets = [(ip_map, f"{ip} . {sp.port}", f"{ip} . {proto} . {sp.port}")
               for ip in (*sp.external_ips, *sp.load_balancer_ips)]
    if sp.node_port is not None:
        targets.append((port_map, f"{sp.node_port}", f"{proto} . {sp.node_port}"))
    outside, inside = sp.external_endpoints, sp.cluster_endpoints
    for emap, slot_key, key in targets:
        nodeport = emap == port_map
        path = "node-port" if nodeport else "external-ip"
        dispatch = SERVICE_NODEPORTS if nodeport else SERVICE_IPS
        refuse = NO_ENDPOINT_NODEPORTS if nodeport else NO_ENDPOINT_SERVICES
        if sp.external_traffic_filter:
            # Clients that were not short-circuited reach the filter hooks untranslated.
            elements[refuse, key] = _FILTER_VERDICTS[sp.external_traffic_filter]
        if not inside:
            continue
        if not sp.external_policy_local:
            n = fill(SlotGroup(emap, slot_key, 0), outside)
            elements[dispatch, key] = use(ServiceClass(path, proto, n, None, affinity))
            continue
        # Pods and the node itself take the cluster-wide set at SHORT_CIRCUIT_BASE.
        m = fill(SlotGroup(emap, slot_key, 0), outside) if outside else 0
        n = fill(SlotGroup(emap, slot_key, SHORT_CIRCUIT_BASE), inside)
        elements[dispatch, key] = use(ServiceClass(path, proto, m, n, affinity))
    return out


def _firewall(sp: ServicePortView, proto: str, elements: dict[tuple[str, str], str],
              node_ip: str | None) -> None:
    """loadBalancerSourceRanges: each LB IP:port is checked, each range lets its sources on.

    Like kube-proxy, a range holding the node's own address also admits the LB IPs as
    sources (an LB IP bound on a node loops back with itself as source). Overlapping
    networks are merged: an interval map may refuse them.
    """
    if not (sp.load_balancer_ips and sp.load_balancer_source_ranges):
        return
    nets = [ipaddress.ip_network(cidr) for cidr in sp.load_balancer_source_ranges]
    if node_ip is not None and any(ipaddress.ip_address(node_ip) in net for net in nets):
        nets += [ipaddress.ip_network(f"{ip}/32") for ip in sp.load_balancer_ips]
    sources = list(ipaddress.collapse_addresses(nets))
    for ip in sp.load_balancer_ips:
        key = f"{ip} . {proto} . {sp.port}"
        elements[FIREWALL_IPS, key] = f"goto {FIREWALL_SOURCES_CHECK}"
        for net in sources:
            elements[FIREWALL_SOURCES, f"{key} . {net}"] = "return"


def render_ruleset(view: NodeView) -> Ruleset:
    """Everything the node's table holds for `view`."""
    rs = Ruleset(view.cluster_cidr, fixed_chains(view.service_cidr), order=view.services,
                 service_cidr=view.service_cidr)
    for sp in view.services:
        rs.add(service_key(sp), sp, render_service(sp, node_ip=view.node_ip))
    return rs


# --------------------------------------------------------------------------- incremental


@dataclass
class Delta:
    """An incremental transaction: what changed between two renders."""

    script: str
    services: list[ServiceKey]  # Service ports rendered again
    chains_written: list[str]
    chains_deleted: list[str]
    elements_added: int
    elements_deleted: int

    @property
    def changed(self) -> int:
        return (
            len(self.chains_written)
            + len(self.chains_deleted)
            + self.elements_added
            + self.elements_deleted
        )


def update(old: Ruleset, view: NodeView) -> tuple[Ruleset, Delta]:
    """The render of `view` built from `old`, and the nft commands between the two.

    Only Service ports whose view changed are rendered again; slots follow `old`.
    """
    changed = _changed_services(old, view)
    if not changed:
        return old, Delta("", [], [], [], 0, 0)
    new = old.copy()
    new.order = view.services
    wanted = {key: sp for key, sp in changed.items() if sp is not None}
    changed = list(changed)
    touched: set[tuple[str, str]] = set()
    pairs: set[str] = set()
    vips: set[str] = set()
    for key in changed:
        before = old.services.get(key)
        if before is not None:
            touched.update(before[1].elements)
            pairs.update(before[1].hairpin)
            vips.add(before[1].cluster_ip)
            new.remove(key, forget=key not in wanted)
        sp = wanted.get(key)
        if sp is not None:
            rules = render_service(sp, before[1] if before else None, view.node_ip)
            touched.update(rules.elements)
            pairs.update(rules.hairpin)
            vips.add(rules.cluster_ip)
            new.add(key, sp, rules)
    if len(new.services) != len(old.services) or any(k not in old.services for k in wanted):
        # Keep the view's order, so the next update can compare position by position.
        new.services = {k: new.services[k] for k in map(service_key, view.services)}
    t = f"{FAMILY} {TABLE}"
    head: list[str] = []
    written = [name for name in new.chains if old.chains.get(name) != new.chains[name]]
    for name in written:
        head.append(_declare_chain(name) if name not in old.chains else f"flush chain {t} {name}")
        head += [f"add rule {t} {name} {rule}" for rule in new.chains[name]]
    gone: dict[str, list[str]] = {}
    fresh: dict[str, list[str]] = {}
    for name, k in sorted(touched):
        a, b = old.maps[name].get(k), new.maps[name].get(k)
        if a == b:
            continue
        if a is not None:
            gone.setdefault(name, []).append(k)
        if b is not None:
            fresh.setdefault(name, []).append(f"{k} : {b}")
    gone_pairs = sorted(p for p in pairs if p in old.hairpin and p not in new.hairpin)
    new_pairs = sorted(p for p in pairs if p in new.hairpin and p not in old.hairpin)
    deletes = [_elements("delete", name, keys) for name, keys in gone.items()]
    adds = [_elements("add", name, items) for name, items in fresh.items()]
    if gone_pairs:
        deletes.append(_elements("delete", HAIRPIN, gone_pairs))
    if new_pairs:
        adds.append(_elements("add", HAIRPIN, new_pairs))
    gone_vips = sorted(v for v in vips if v in old.cluster_ips and v not in new.cluster_ips)
    new_vips = sorted(v for v in vips if v in new.cluster_ips and v not in old.cluster_ips)
    if gone_vips:
        deletes.append(_elements("delete", CLUSTER_IPS, gone_vips))
    if new_vips:
        adds.append(_elements("add", CLUSTER_IPS, new_vips))
    # A class chain goes only after the elements that jumped to it.
    stale = [name for name in old.chains if name not in new.chains]
    tail = [f"delete chain {t} {name}" for name in stale]
    script = "\n".join(head + deletes + adds + tail)
    delta = Delta(
        script + "\n" if script else "",
        changed,
        written,
        stale,
        sum(map(len, fresh.values())) + len(new_pairs) + len(new_vips),
        sum(map(len, gone.values())) + len(gone_pairs) + len(gone_vips),
    )
    return new, delta


def _changed_services(old: Ruleset, view: NodeView) -> dict[ServiceKey, ServicePortView | None]:
    """Service ports whose view differs from what `old` rendered (None: gone)."""
    before = old.order
    if len(before) == len(view.services) == len(old.services):
        # Views come sorted by name, so an update that adds or removes nothing lines up.
        out: dict[ServiceKey, ServicePortView | None] = {}
        aligned = True
        for a, b in zip(before, view.services, strict=True):
            if a is b:
                continue
            ka, kb = service_key(a), service_key(b)
            if ka != kb:
                aligned = False
                break
            if a != b:
                out[kb] = b
        if aligned:
            return out
    wanted = {service_key(sp): sp for sp in view.services}
    out = {}
    for key, (sp, _) in old.services.items():
        now = wanted.get(key)
        if now is None or (now is not sp and now != sp):
            out[key] = now
    out.update((key, sp) for key, sp in wanted.items() if key not in old.services)
    return out


def stale_affinity(old: Ruleset, new: Ruleset, keys: Iterable[ServiceKey]) -> dict[tuple[str, str], set[int]]:
    """(map, key) -> slots whose remembered clients must choose afresh.

    A slot is stale when its group lost affinity or went away, or the slot now holds
    another endpoint (or none). Only the Service ports in `keys` are looked at.
    """
    out: dict[tuple[str, str], set[int]] = {}
    for key in keys:
        if key not in old.services:
            continue
        before = old.services[key][1]
        after = new.services[key][1] if key in new.services else ServiceRules()
        for group, timeout in before.affinity.items():
            now = after.slots.get(group, ()) if after.affinity.get(group) == timeout else ()
            bad = {
                group.base + k
                for k, addr in enumerate(before.slots.get(group, ()))
                if k >= len(now) or now[k] != addr
            }
            if bad:
                out.setdefault((group.emap, group.key), set()).update(bad)
    return out


# --------------------------------------------------------------------------- generation


NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 1


def ruleset_generation() -> int:
    """The nf_tables generation of the calling thread's network namespace.

    Every committed transaction (ours, nft's, iptables-nft's) bumps it, so an unchanged
    number proves nobody touched the ruleset since our last sync.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(5)
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        s.send(struct.pack("=LHHLL", 16 + len(body), msg_type, NLM_F_REQUEST, 1, 0) + body)
        data = s.recv(65536)
    length, kind = struct.unpack_from("=LH", data)
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, 16)
        raise DataplaneError(f"reading the nf_tables generation failed: errno {-err}")
    offset = 16 + 4
    while offset + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, offset)
        if atype & 0x3FFF == NFTA_GEN_ID:
            return struct.unpack_from(">I", data, offset + 4)[0]
        offset += (alen + 3) & ~3
    raise DataplaneError("the nf_tables generation reply carried no NFTA_GEN_ID")


# --------------------------------------------------------------------------- libnftables


_LIB: list[ctypes.CDLL | None] = []


def _libnftables() -> ctypes.CDLL | None:
    """nft's own library (Debian libnftables1), loaded once; None when absent."""
    if not _LIB:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError:
            lib = None
        if lib is not None:
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            for fn in ("nft_ctx_free", "nft_ctx_buffer_output", "nft_ctx_buffer_error"):
                getattr(lib, fn).argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _LIB.append(lib)
    return _LIB[0]


def run_nft(script: str) -> tuple[int, str]:
    """`nft -f` without a process: (exit code, errors), in the calling thread's namespace.

    The context's netlink socket is opened here, so it belongs to this thread's
    network namespace; saves the fork and exec of `ip netns exec nft` on every sync.
    """
    lib = _libnftables()
    if lib is None:
        raise DataplaneError("libnftables.so.1 not found (apt-get install libnftables1)")
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise DataplaneError("nft_ctx_new failed")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
        return (1 if rc else 0), err.decode(errors="replace")
    finally:
        lib.nft_ctx_free(ctx)


# --------------------------------------------------------------------------- the data plane


@dataclass
class _Synced:
    """What a node holds after our last successful sync."""

    ruleset: Ruleset  # its Service ports carry the views they were rendered from
    generation: int


class NftablesDataplane:
    name = "nftables"

    def __init__(self) -> None:
        self._synced: dict[str, _Synced] = {}  # by network namespace

    # ------------------------------------------------------------------ protocol

    def missing(self, host: Host) -> list[str]:
        out = []
        if not host.which("nft"):
            out.append("nft not found (apt-get install nftables)")
        if not host.which("conntrack"):
            out.append(
                "conntrack not found (apt-get install conntrack): stale UDP flows are not cleared"
            )
        if host.has_proc("/proc/config.gz"):
            for option in (
                "CONFIG_NF_TABLES",
                "CONFIG_NF_TABLES_IPV4",
                "CONFIG_NFT_NAT",
                "CONFIG_NFT_MASQ",
                "CONFIG_NFT_NUMGEN",
                "CONFIG_NFT_CT",
                "CONFIG_NFT_FIB_IPV4",
                "CONFIG_NFT_REJECT",
            ):
                if host.kernel_config(option) is None:
                    out.append(f"kernel {host.kernel} lacks {option} (the nftables mode needs it)")
        return out

    def render(self, view: NodeView) -> str:
        return render_ruleset(view).script()

    def install(self, node: NodeHandle) -> None:
        """The table and its hooks with no Service; an existing table is left as it is.

        kube-proxy's nftables mode drops no packet conntrack finds INVALID (the iptables
        mode's KUBE-FORWARD rule): it is run with conntrack.tcpBeLiberal, which upstream's
        nftables e2e jobs set, so an out-of-window segment of a DNATed connection is
        translated back instead of reaching the client untranslated and drawing a RST that
        kills the connection. Set here, in the node's namespace, and never undone (as
        kube-proxy leaves it).
        """
        healthcheck.install(node)
        node.run(["sysctl", "-qw", f"{BE_LIBERAL}=1"])
        probe = ["nft", "list", "chain", FAMILY, TABLE, "services"]
        if node.run(probe, check=False).returncode == 0:
            return
        self._apply(node, Ruleset(cluster_cidr="").script())  # no class chain reads it yet
        self._synced.pop(node.netns, None)

    def uninstall(self, node: NodeHandle) -> None:
        healthcheck.uninstall(node)
        self._synced.pop(node.netns, None)
        t = f"{FAMILY} {TABLE}"
        self._apply(node, f"add table {t}\ndelete table {t}\n")

    def sync(self, node: NodeHandle, view: NodeView, full: bool = False) -> SyncStats:
        start = time.perf_counter()
        prev = self._synced.get(node.netns)
        if _libnftables() is not None:
            # One thread in the node's namespace does the check, the render and the commit.
            result = node.call(self._converge, node, view, prev, full, True)
        else:
            result = self._converge(node, view, prev, full, False)
        ruleset, delta, script, generation, render_s, apply_s = result
        full = delta is None
        self._synced[node.netns] = _Synced(ruleset, generation)
        forgotten = 0
        if delta is not None and prev is not None:
            stale = stale_affinity(prev.ruleset, ruleset, delta.services)
            if stale:
                forgotten = self._forget_affinity(node, stale)
        flushed = self._clear_stale_udp(node, prev.ruleset if prev else None, ruleset, delta)
        extra = {
            "layout": "class chains + slot maps",
            "render_s": round(render_s, 4),
            "apply_s": round(apply_s, 4),
            "chains": len(ruleset.chains),
            "elements": ruleset.element_count(),
            "conntrack_deletes": flushed,
            "affinity_forgotten": forgotten,
        }
        if delta is not None:
            extra.update(
                services_changed=len(delta.services),
                chains_written=delta.chains_written,
                chains_deleted=delta.chains_deleted,
                elements_added=delta.elements_added,
                elements_deleted=delta.elements_deleted,
            )
        healthcheck.sync(node, view)
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - start,
            full=full,
            services=len(view.services),
            rules=ruleset.rule_count() + ruleset.element_count(),
            payload_bytes=len(script.encode()),
            changed=delta.changed if delta else ruleset.element_count() + len(ruleset.chains),
            extra=extra,
        )

    # ------------------------------------------------------------------ pieces

    def _converge(self, node: NodeHandle, view: NodeView, prev: _Synced | None, full: bool,
                  inside: bool):
        """Render and commit one transaction; inside: this thread is in the node's namespace.

        Returns (ruleset, delta or None for a full sync, script, generation, render_s, apply_s).
        """
        start = time.perf_counter()
        generation = ruleset_generation if inside else lambda: node.call(ruleset_generation)
        if prev is not None and not full and generation() != prev.generation:
            full = True  # someone else committed a transaction: trust nothing we remember
        full = full or prev is None or prev.ruleset.cluster_cidr != view.cluster_cidr
        full = full or prev.ruleset.service_cidr != view.service_cidr
        delta: Delta | None = None
        collecting = gc.isenabled()
        gc.disable()  # rendering makes many small acyclic objects; a full collection costs more
        try:
            if full:
                ruleset = render_ruleset(view)
                script = ruleset.script()
            else:
                ruleset, delta = update(prev.ruleset, view)
                script = delta.script
        finally:
            if collecting:
                gc.enable()
        render_s = time.perf_counter() - start
        try:
            if script:
                self._apply(node, script, inside)
        except DataplaneError:
            if full:
                self._synced.pop(node.netns, None)
                raise
            # Our memory and the kernel disagree: start over from scratch.
            delta = None
            ruleset = render_ruleset(view)
            script = ruleset.script()
            self._apply(node, script, inside)
        apply_s = time.perf_counter() - start - render_s
        return ruleset, delta, script, generation(), render_s, apply_s

    def _apply(self, node: NodeHandle, script: str, inside: bool = False) -> None:
        """One transaction: libnftables in the node's namespace, else `nft -f`."""
        if _libnftables() is not None:
            rc, err = run_nft(script) if inside else node.call(run_nft, script)
        else:
            res = node.run(["nft", "-f", "-"], input=script, check=False, timeout=600)
            rc, err = res.returncode, res.stderr or res.stdout
        if rc != 0:
            if _libnftables() is not None:
                # From a buffer nft cannot show the failing line; a dry run from stdin can.
                check = node.run(["nft", "-c", "-f", "-"], input=script, check=False, timeout=600)
                err = check.stderr or err
            raise DataplaneError(f"nft -f failed on {node.name}: {_first_lines(err.strip())}")

    def _forget_affinity(self, node: NodeHandle, stale: dict[tuple[str, str], set[int]]) -> int:
        """Delete remembered clients of stale slots (best effort: they also time out)."""
        res = node.run(["nft", "-j", "list", "set", FAMILY, TABLE, AFFINITY], check=False)
        if res.returncode != 0:
            return 0
        doomed = []
        for client, daddr, port, slot in _affinity_elements(res.stdout):
            bits = int(slot)
            proto = next((p for p, b in AFFINITY_PROTOCOL_BITS.items() if bits & b), "tcp")
            k = bits & ~(AFFINITY_UDP | AFFINITY_SCTP)
            by_ip = stale.get((f"{SERVICE_ENDPOINTS}-{proto}", f"{daddr} . {port}"), ())
            by_port = stale.get((f"{NODEPORT_ENDPOINTS}-{proto}", port), ())
            if k in by_ip or k in by_port:
                doomed.append(f"{client} . {daddr} . {port} . {slot}")
        if doomed:
            # Best effort: an entry that timed out meanwhile fails the batch, and then
            # it is gone anyway; retry one by one.
            script = _elements("delete", AFFINITY, doomed) + "\n"
            if node.run(["nft", "-f", "-"], input=script, check=False).returncode != 0:
                for item in doomed:
                    node.run(["nft", "-f", "-"], input=_elements("delete", AFFINITY, [item]) + "\n",
                             check=False)
            # The deletes bumped the generation; they are ours.
            self._synced[node.netns].generation = node.call(ruleset_generation)
        return len(doomed)

    def _clear_stale_udp(
        self, node: NodeHandle, old: Ruleset | None, new: Ruleset, delta: Delta | None
    ) -> int:
        """kube-proxy's conntrack cleanup: UDP flows must not stick to endpoints that left,
        nor stay untranslated once their frontend translates.

        After an incremental sync only the Service ports it rendered again can have changed.
        """
        if old is None:
            return 0
        keys = delta.services if delta is not None else old.services.keys() | new.services.keys()
        commands: list[list[str]] = []
        for key in keys:
            if key[1] != "UDP":
                continue
            before = old.services[key][0] if key in old.services else None
            after = new.services[key][0] if key in new.services else None
            commands += stale_udp_flow_deletes(before, after)
        return run_deletes(node, commands)


def _affinity_elements(text: str) -> list[list[str]]:
    """The keys `nft -j list set` shows for the affinity set, as string parts."""
    out = []
    for item in json.loads(text).get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            val = elem.get("elem", {}).get("val", elem) if isinstance(elem, dict) else elem
            parts = val.get("concat") if isinstance(val, dict) else None
            if parts and len(parts) == 4:
                out.append([str(p) for p in parts])
    return out


def _first_lines(err: str, n: int = 6) -> str:
    lines = err.splitlines()
    return "\n".join(lines[:n]) + (f"\n... ({len(lines) - n} more lines)" if len(lines) > n else "")
