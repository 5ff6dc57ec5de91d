"""The IPVS data plane: kube-proxy's ipvs mode, programmed over generic netlink.

Per node: a `kube-ipvs0` dummy interface (left down, as kube-proxy does) holds every
ClusterIP, externalIP and load-balancer IP, so the kernel takes them as local; one IPVS
virtual server per VIP:port:protocol (ClusterIP, each node IP for a NodePort, each
externalIP, each load-balancer IP) with one real
server per endpoint, forwarded by masquerading (NAT), the configured scheduler, and
persistence for ClientIP affinity. What IPVS cannot do is done by a few iptables rules over
ipsets, in kube-proxy's layout: masquerade off-cluster traffic to ClusterIPs
(KUBE-CLUSTER-IP), hairpin (KUBE-LOOP-BACK), NodePorts (KUBE-NODE-PORT-*: masquerade, or
keep the client's address for externalTrafficPolicy Local), externalIPs, load-balancer
IPs (KUBE-LOAD-BALANCER) with their loadBalancerSourceRanges (KUBE-PROXY-FIREWALL and
KUBE-SOURCE-RANGES-FIREWALL over the KUBE-LOAD-BALANCER-FW and -SOURCE-CIDR/-SOURCE-IP
sets: other sources dropped) and a REJECT for VIP ports no Service serves
(KUBE-IPVS-FILTER). A virtual server without real servers
answers every new connection with ICMP port unreachable, which is the REJECT a Service
without endpoints needs.

A sync reads back what the kernel holds and applies only the difference: virtual and real
servers and the VIPs over netlink (requests in batches on one socket); ipset members and
our chains with `ipset save` / `iptables-save`, skipped while a cheap fingerprint (the
sets' element counts over ipset's netlink, the legacy tables' entry counts by getsockopt)
shows nobody changed them since our last write; set changes go in one `ipset restore`,
the iptables rules only when they differ.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    ctrlmsg,
)

from dataplanes import healthcheck
from dataplanes.base import DataplaneError, Host, NodeHandle, SyncStats, ipset_networks
from dataplanes.conntrack import udp_port_changes, untranslated_udp_flow_deletes
from kube.state import DROP, EndpointView, NodeView, ServicePortView

# Service ports this mode does not program yet, and why.
SKIPPED_PROTOCOLS = {
    "SCTP": "its virtual servers, ipsets and rules are written for TCP and UDP only",
}

KUBE_IPVS_IF = "kube-ipvs0"
MASQUERADE_MARK = "0x4000"
DEFAULT_SCHEDULER = "rr"
# What Linux offers (net/netfilter/ipvs/ip_vs_*.c); each is a module loaded on first use.
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos")
# kube-proxy's ipvs sysctls; conn_reuse_mode is left alone: kernels from 5.9 on fixed it.
SYSCTLS = {
    "net/ipv4/vs/conntrack": 1,  # iptables (masquerade, hairpin) must see IPVS's connections
    "net/ipv4/vs/expire_nodest_conn": 1,  # connections to a removed endpoint end at their next packet
    "net/ipv4/vs/expire_quiescent_template": 1,  # affinity never sticks to a removed endpoint
    "net/ipv4/ip_forward": 1,
}

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


IPSETS = (
    IpSet(KUBE_CLUSTER_IP, "hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    IpSet(KUBE_LOOP_BACK, "hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    IpSet(KUBE_EXTERNAL_IP, "hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"),
    IpSet(KUBE_EXTERNAL_IP_LOCAL, "hash:ip,port", "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    IpSet(KUBE_NODE_PORT_TCP, "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose", "range 0-65535"),
    IpSet(KUBE_NODE_PORT_LOCAL_TCP, "bitmap:port", "Kubernetes nodeport TCP port with externalTrafficPolicy=local", "range 0-65535"),
    IpSet(KUBE_NODE_PORT_UDP, "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose", "range 0-65535"),
    IpSet(KUBE_NODE_PORT_LOCAL_UDP, "bitmap:port", "Kubernetes nodeport UDP port with externalTrafficPolicy=local", "range 0-65535"),
    IpSet(KUBE_IPVS_IPS, "hash:ip", "Kubernetes IPVS ips for filter purpose"),
    IpSet(KUBE_LOAD_BALANCER, "hash:ip,port", "Kubernetes service lb portal"),
    IpSet(KUBE_LOAD_BALANCER_LOCAL, "hash:ip,port", "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    IpSet(KUBE_LOAD_BALANCER_FW, "hash:ip,port", "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    IpSet(KUBE_LOAD_BALANCER_SOURCE_CIDR, "hash:ip,port,net", "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    IpSet(KUBE_LOAD_BALANCER_SOURCE_IP, "hash:ip,port,ip", "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    IpSet(KUBE_DROP_CLUSTER_IP, "hash:ip,port", "Kubernetes service cluster ip + port with no endpoint for this node: drop"),
    IpSet(KUBE_DROP_EXTERNAL, "hash:ip,port", "Kubernetes service external or node ip + port with no endpoint for outside clients: drop them"),
)
IPSET_BY_NAME = {s.name: s for s in IPSETS}

# --------------------------------------------------------------------------- iptables

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_LOAD_BALANCER_CHAIN = "KUBE-LOAD-BALANCER"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
# mangle: the node's own connections meet the source ranges before IPVS's LOCAL_OUT hook
# schedules them (kube-proxy drops them after it, with one `-m ipvs --vaddr` rule per
# load-balancer IP:port in KUBE-IPVS-OUT-FILTER); the same two chains as in filter.
CHAINS = {
    "nat": (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_MARK_MASQ,
            KUBE_LOAD_BALANCER_CHAIN),
    "filter": (KUBE_FORWARD, KUBE_IPVS_FILTER, KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL),
    "mangle": (KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL),
}
TABLES = tuple(CHAINS)
# (table, built-in chain, rule spec) in the order they stand at the top of each chain.
JUMPS = (
    ("nat", "PREROUTING", f'-m comment --comment "kubernetes service portals" -j {KUBE_SERVICES}'),
    ("nat", "OUTPUT", f'-m comment --comment "kubernetes service portals" -j {KUBE_SERVICES}'),
    ("nat", "POSTROUTING", f'-m comment --comment "kubernetes postrouting rules" -j {KUBE_POSTROUTING}'),
    ("filter", "INPUT", f'-m comment --comment "kubernetes ipvs access filter" -j {KUBE_IPVS_FILTER}'),
    ("filter", "FORWARD", f'-m comment --comment "kubernetes forwarding rules" -j {KUBE_FORWARD}'),
    ("filter", "INPUT", f'-m comment --comment "kube-proxy firewall rules" -j {KUBE_PROXY_FIREWALL}'),
    ("filter", "FORWARD", f'-m comment --comment "kube-proxy firewall rules" -j {KUBE_PROXY_FIREWALL}'),
    ("mangle", "OUTPUT", f'-m comment --comment "kube-proxy firewall rules" -j {KUBE_PROXY_FIREWALL}'),
)


def _c(text: str) -> str:
    return f'-m comment --comment "{text}"'


def _set(name: str, flags: str) -> str:
    return f"{_c(IPSET_BY_NAME[name].comment)} -m set --match-set {name} {flags}"


def iptables_rules(cluster_cidr: str) -> dict[tuple[str, str], list[str]]:
    """Every rule of our chains, written as iptables-save prints them (so a save compares equal)."""
    m = MASQUERADE_MARK
    nat_services = [
        # Off-cluster sources (node processes, routed clients) to a ClusterIP: masquerade, so replies come back here.
        f"! -s {cluster_cidr} {_set(KUBE_CLUSTER_IP, 'dst,dst')} -j {KUBE_MARK_MASQ}",
        f"{_set(KUBE_EXTERNAL_IP, 'dst,dst')} -j {KUBE_MARK_MASQ}",
        # externalIPs never fall through to the NodePort rules below.
        f"{_set(KUBE_EXTERNAL_IP, 'dst,dst')} -j ACCEPT",
        # The node's own connection to a Local externalIP leaves from that address (it is on
        # kube-ipvs0): the endpoint's reply could not find its way back without masquerade.
        f"-m addrtype --src-type LOCAL {_set(KUBE_EXTERNAL_IP_LOCAL, 'dst,dst')} -j {KUBE_MARK_MASQ}",
        f"{_set(KUBE_EXTERNAL_IP_LOCAL, 'dst,dst')} -j ACCEPT",
        # Load-balancer IPs: masquerade but under externalTrafficPolicy Local; like
        # externalIPs, they never fall through to the NodePort rules.
        f"{_set(KUBE_LOAD_BALANCER, 'dst,dst')} -j {KUBE_LOAD_BALANCER_CHAIN}",
        f"-m set --match-set {KUBE_LOAD_BALANCER} dst,dst -j ACCEPT",
        f"-m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}",
        f"-m set --match-set {KUBE_CLUSTER_IP} dst,dst -j ACCEPT",
    ]
    node_port = []
    for proto, local, cluster in (("tcp", KUBE_NODE_PORT_LOCAL_TCP, KUBE_NODE_PORT_TCP),
                                  ("udp", KUBE_NODE_PORT_LOCAL_UDP, KUBE_NODE_PORT_UDP)):
        # externalTrafficPolicy Local keeps the client's address; the others are masqueraded.
        node_port.append(f"-p {proto} {_set(local, 'dst')} -j RETURN")
        node_port.append(f"-p {proto} {_set(cluster, 'dst')} -j {KUBE_MARK_MASQ}")
    postrouting = [
        f"{_set(KUBE_LOOP_BACK, 'dst,dst,src')} -j MASQUERADE",
        f"-m mark ! --mark {m}/{m} -j RETURN",
        # Clear the mark so a packet that loops through the stack is not masqueraded twice.
        f"-j MARK --set-xmark {m}/0x0",
        f"{_c('kubernetes service traffic requiring SNAT')} -j MASQUERADE --random-fully",
    ]
    forward = [
        "-m conntrack --ctstate INVALID -j DROP",
        f"{_c('kubernetes forwarding rules')} -m mark --mark {m}/{m} -j ACCEPT",
        f"{_c('kubernetes forwarding conntrack rule')} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    load_balancer = [
        # The node's own connection leaves from the LB IP (it is on kube-ipvs0), as to a
        # Local externalIP: masqueraded so a remote endpoint's reply finds its way back.
        f"-m addrtype --src-type LOCAL {_set(KUBE_LOAD_BALANCER_LOCAL, 'dst,dst')} -j {KUBE_MARK_MASQ}",
        f"{_set(KUBE_LOAD_BALANCER_LOCAL, 'dst,dst')} -j RETURN",
        f"-j {KUBE_MARK_MASQ}",
    ]
    # loadBalancerSourceRanges, before IPVS sees the connection: filter INPUT and FORWARD for
    # pods and outside clients, mangle OUTPUT for the node's own processes.
    firewall = [f"{_set(KUBE_LOAD_BALANCER_FW, 'dst,dst')} -j {KUBE_SOURCE_RANGES_FIREWALL}"]
    source_ranges = [
        f"{_set(KUBE_LOAD_BALANCER_SOURCE_CIDR, 'dst,dst,src')} -j RETURN",
        f"{_set(KUBE_LOAD_BALANCER_SOURCE_IP, 'dst,dst,src')} -j RETURN",
        "-j DROP",
    ]
    ipvs_filter = [
        # Before IPVS's LOCAL_IN hook: pods, outside clients and (through lo) the node itself.
        f"-m conntrack --ctstate NEW {_set(KUBE_DROP_CLUSTER_IP, 'dst,dst')} -j DROP",
        # Pods and the node itself are short-circuited by the virtual server instead.
        f"! -s {cluster_cidr} -m addrtype ! --src-type LOCAL -m conntrack --ctstate NEW"
        f" {_set(KUBE_DROP_EXTERNAL, 'dst,dst')} -j DROP",
        f"-m set --match-set {KUBE_CLUSTER_IP} dst,dst -j RETURN",
        f"-m set --match-set {KUBE_EXTERNAL_IP} dst,dst -j RETURN",
        f"-m set --match-set {KUBE_EXTERNAL_IP_LOCAL} dst,dst -j RETURN",
        f"-m set --match-set {KUBE_LOAD_BALANCER} dst,dst -j RETURN",
        # A VIP on a port no Service serves: refuse, as a host with no listener would.
        f"-m conntrack --ctstate NEW -m set --match-set {KUBE_IPVS_IPS} dst"
        " -j REJECT --reject-with icmp-port-unreachable",
    ]
    chains = {
        ("nat", KUBE_SERVICES): nat_services,
        ("nat", KUBE_NODE_PORT): node_port,
        ("nat", KUBE_POSTROUTING): postrouting,
        ("nat", KUBE_MARK_MASQ): [f"-j MARK --set-xmark {m}/{m}"],
        ("filter", KUBE_FORWARD): forward,
        ("filter", KUBE_IPVS_FILTER): ipvs_filter,
        ("nat", KUBE_LOAD_BALANCER_CHAIN): load_balancer,
        ("filter", KUBE_PROXY_FIREWALL): firewall,
        ("filter", KUBE_SOURCE_RANGES_FIREWALL): source_ranges,
        ("mangle", KUBE_PROXY_FIREWALL): firewall,
        ("mangle", KUBE_SOURCE_RANGES_FIREWALL): source_ranges,
    }
    return {key: [f"-A {key[1]} {rule}" for rule in rules] for key, rules in chains.items()}


def iptables_payload(rules: dict[tuple[str, str], list[str]], jumps: Iterable[tuple[str, str, str]] = JUMPS) -> str:
    """Restore text (for --noflush) that rewrites our chains and inserts the given jumps."""
    out = []
    for table in TABLES:
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in CHAINS[table]]
        for chain in CHAINS[table]:
            out += rules[(table, chain)]
        # Inserted at the top in reverse, so JUMPS order is the order in each chain.
        out += [f"-I {chain} 1 {spec}" for t, chain, spec in reversed(list(jumps)) if t == table]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


@dataclass
class SavedRules:
    """Our chains and the jumps into them, as iptables-save shows them."""

    chains: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    jumps: set[tuple[str, str, str]] = field(default_factory=set)

    @classmethod
    def parse(cls, text: str) -> SavedRules:
        ours = {(t, c) for t, cs in CHAINS.items() for c in cs}
        saved = cls()
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
            elif line.startswith(":"):
                chain = line[1:].split(" ", 1)[0]
                if (table, chain) in ours:
                    saved.chains.setdefault((table, chain), [])
            elif line.startswith("-A "):
                chain, _, spec = line[3:].partition(" ")
                if (table, chain) in ours:
                    saved.chains.setdefault((table, chain), []).append(line)
                elif spec.endswith(tuple(f"-j {c}" for t, cs in CHAINS.items() if t == table for c in cs)):
                    saved.jumps.add((table, chain, spec))
        return saved

    def missing_jumps(self) -> list[tuple[str, str, str]]:
        return [j for j in JUMPS if j not in self.jumps]


# --------------------------------------------------------------------------- what a node must hold


@dataclass(frozen=True)
class VirtualServer:
    protocol: str  # "TCP" | "UDP"
    ip: str
    port: int
    scheduler: str
    persistence_s: int = 0  # ClientIP affinity timeout; 0: none

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.protocol, self.ip, self.port)

    def __str__(self) -> str:
        return f"{self.protocol} {self.ip}:{self.port}"


@dataclass(frozen=True)
class RealServer:
    ip: str
    port: int
    weight: int = 1

    @property
    def key(self) -> tuple[str, int]:
        return (self.ip, self.port)


@dataclass
class IpvsLayout:
    """Everything one node's IPVS mode holds: virtual servers, VIPs and ipset members."""

    services: dict[tuple[str, str, int], VirtualServer] = field(default_factory=dict)
    dests: dict[tuple[str, str, int], dict[tuple[str, int], RealServer]] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)  # on kube-ipvs0
    ipsets: dict[str, set[str]] = field(default_factory=lambda: {s.name: set() for s in IPSETS})

    def add(self, vs: VirtualServer, endpoints: Sequence[EndpointView]) -> None:
        self.services[vs.key] = vs
        self.dests[vs.key] = {(e.ip, e.port): RealServer(e.ip, e.port) for e in endpoints}

    @property
    def real_server_count(self) -> int:
        return sum(len(d) for d in self.dests.values())


def desired_layout(view: NodeView, scheduler: str = DEFAULT_SCHEDULER) -> IpvsLayout:
    """What IPVS mode must hold on the view's node (kube-proxy's syncService/syncEndpoint)."""
    out = IpvsLayout()
    sets = out.ipsets
    for sp in view.services:
        if sp.protocol in SKIPPED_PROTOCOLS:
            continue
        proto = sp.protocol.lower()

        def vs(ip: str, port: int, sp: ServicePortView = sp) -> VirtualServer:
            return VirtualServer(sp.protocol, ip, port, scheduler, sp.affinity_timeout_s or 0)

        if sp.internal_traffic_filter == DROP:
            # No virtual server: IPVS would answer it; the VIP stays local for the DROP rule.
            sets[KUBE_DROP_CLUSTER_IP].add(f"{sp.cluster_ip},{proto}:{sp.port}")
        else:
            out.add(vs(sp.cluster_ip, sp.port), sp.internal_endpoints)
        out.addresses.add(sp.cluster_ip)
        sets[KUBE_CLUSTER_IP].add(f"{sp.cluster_ip},{proto}:{sp.port}")
        for ep in {(e.ip, e.port) for e in sp.all_reachable_endpoints}:
            sets[KUBE_LOOP_BACK].add(f"{ep[0]},{proto}:{ep[1]},{ep[0]}")
        # One virtual server serves every client of an external frontend. While outsiders are
        # served it holds their set (pods and the node get it too: kube-proxy's IPVS mode does
        # the same); while they are dropped, only pods and the node reach it: the short circuit.
        dropped = sp.external_traffic_filter == DROP
        external = sp.cluster_endpoints if dropped else sp.external_endpoints
        for eip in sp.external_ips:
            out.add(vs(eip, sp.port), external)
            out.addresses.add(eip)
            local = KUBE_EXTERNAL_IP_LOCAL if sp.external_policy_local else KUBE_EXTERNAL_IP
            sets[local].add(f"{eip},{proto}:{sp.port}")
            if dropped:
                sets[KUBE_DROP_EXTERNAL].add(f"{eip},{proto}:{sp.port}")
        # Load-balancer IPs: served as externalIPs; with source ranges only from them.
        local_lb = sp.external_policy_local
        networks = ipset_networks(sp.load_balancer_source_ranges)
        node_allowed = any(ipaddress.ip_address(view.node_ip) in ipaddress.ip_network(net)
                           for net in sp.load_balancer_source_ranges)
        for lbip in sp.load_balancer_ips:
            entry = f"{lbip},{proto}:{sp.port}"
            out.add(vs(lbip, sp.port), external)
            out.addresses.add(lbip)
            sets[KUBE_LOAD_BALANCER].add(entry)
            if local_lb:
                sets[KUBE_LOAD_BALANCER_LOCAL].add(entry)
            if dropped:
                sets[KUBE_DROP_EXTERNAL].add(entry)
            if networks:
                sets[KUBE_LOAD_BALANCER_FW].add(entry)
                sets[KUBE_LOAD_BALANCER_SOURCE_CIDR].update(f"{entry},{net}" for net in networks)
                if node_allowed:
                    # The node reaches its own LB IP from that address (kube-proxy's allowFromNode).
                    sets[KUBE_LOAD_BALANCER_SOURCE_IP].add(f"{entry},{lbip}")
        if sp.node_port is not None:
            for node_ip in view.node_ips:
                out.add(vs(node_ip, sp.node_port), external)
                if dropped:
                    sets[KUBE_DROP_EXTERNAL].add(f"{node_ip},{proto}:{sp.node_port}")
            if proto == "tcp":
                name = KUBE_NODE_PORT_LOCAL_TCP if sp.external_policy_local else KUBE_NODE_PORT_TCP
            else:
                name = KUBE_NODE_PORT_LOCAL_UDP if sp.external_policy_local else KUBE_NODE_PORT_UDP
            sets[name].add(str(sp.node_port))
    sets[KUBE_IPVS_IPS] = set(out.addresses)
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


def ipvs_changes(have: IpvsLayout, want: IpvsLayout) -> IpvsChanges:
    """Only what differs: a deleted virtual server takes its real servers with it."""
    ch = IpvsChanges()
    for key, vs in want.services.items():
        old = have.services.get(key)
        if old is None:
            ch.add_services.append(vs)
        elif old != vs:
            ch.edit_services.append(vs)
        held = have.dests.get(key, {}) if old is not None else {}
        for dkey, rs in want.dests.get(key, {}).items():
            if dkey not in held:
                ch.add_dests.append((vs, rs))
            elif held[dkey] != rs:
                ch.edit_dests.append((vs, rs))
        for dkey, rs in held.items():
            if dkey not in want.dests.get(key, {}):
                ch.delete_dests.append((vs, rs))
    for key, vs in have.services.items():
        if key not in want.services:
            ch.delete_services.append(vs)
    return ch


def ipset_restore(have: dict[str, set[str]] | None, want: dict[str, set[str]]) -> tuple[str, int]:
    """`ipset restore` text for the sets that differ (creating missing ones); and the change count."""
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


# --------------------------------------------------------------------------- generic netlink
# IPVS's family (include/uapi/linux/ip_vs.h), encoded with struct: pyroute2's generic codec
# took minutes to read back a few thousand virtual servers in the guest kernel. pyroute2
# still resolves the family id (ctrlmsg) and runs the address and ipset side.

IPVS_GENL_NAME = "IPVS"
IPVS_GENL_VERSION = 1
CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE = 1, 2, 3, 4
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST, CMD_GET_DEST = 5, 6, 7, 8
CMD_FLUSH = 17
CMD_ATTR_SERVICE, CMD_ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK, SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = range(1, 10)
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH = range(1, 7)
DEST_ADDR_FAMILY = 11
SVC_F_PERSISTENT = 0x1
CONN_F_MASQ = 0  # the forwarding method: NAT
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
BATCH_BYTES = 32 * 1024  # below the default netlink send buffer (212992) with room for error echoes
RCVBUF_BYTES = 4 << 20
NLMSGHDR = struct.Struct("=IHHII")
GENLMSGHDR = struct.Struct("=BBH")


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _nla(kind | NLA_F_NESTED, b"".join(attrs))


def _attrs(data: bytes | memoryview, offset: int = 0, end: int | None = None) -> dict[int, bytes]:
    """type -> payload of the attributes in data[offset:end]."""
    end = len(data) if end is None else end
    out = {}
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & NLA_TYPE_MASK] = bytes(data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return out


def _service_key(vs: VirtualServer) -> bytes:
    return (_nla(SVC_AF, struct.pack("=H", socket.AF_INET))
            + _nla(SVC_PROTOCOL, struct.pack("=H", PROTOCOLS[vs.protocol]))
            + _nla(SVC_ADDR, socket.inet_aton(vs.ip) + bytes(12))  # union nf_inet_addr
            + _nla(SVC_PORT, struct.pack("!H", vs.port)))


def _service_full(vs: VirtualServer) -> bytes:
    flags = SVC_F_PERSISTENT if vs.persistence_s else 0
    return (_service_key(vs)
            + _nla(SVC_SCHED_NAME, vs.scheduler.encode() + b"\0")
            + _nla(SVC_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF))
            + _nla(SVC_TIMEOUT, struct.pack("=I", vs.persistence_s))
            + _nla(SVC_NETMASK, b"\xff\xff\xff\xff"))


def _dest(rs: RealServer, full: bool = True) -> bytes:
    attrs = (_nla(DEST_ADDR, socket.inet_aton(rs.ip) + bytes(12))
             + _nla(DEST_PORT, struct.pack("!H", rs.port))
             + _nla(DEST_ADDR_FAMILY, struct.pack("=H", socket.AF_INET)))
    if full:
        attrs += (_nla(DEST_FWD_METHOD, struct.pack("=I", CONN_F_MASQ))
                  + _nla(DEST_WEIGHT, struct.pack("=I", rs.weight))
                  + _nla(DEST_U_THRESH, struct.pack("=I", 0))
                  + _nla(DEST_L_THRESH, struct.pack("=I", 0)))
    return attrs


def encode_request(msg_type: int, flags: int, seq: int, cmd: int, attrs: bytes) -> bytes:
    """A whole netlink message: nlmsghdr, genlmsghdr, attributes."""
    body = GENLMSGHDR.pack(cmd, IPVS_GENL_VERSION, 0) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


@dataclass(frozen=True)
class IpvsRequest:
    """One IPVS command: what it does (for errors), the command, its attributes."""

    what: str
    cmd: int
    attrs: bytes


def changes_to_messages(ch: IpvsChanges) -> list[IpvsRequest]:
    """The requests in a safe order: deletions first, then services before their dests."""
    out: list[IpvsRequest] = []
    gone = {vs.key for vs in ch.delete_services}

    def svc(vs: VirtualServer, full: bool = False) -> bytes:
        return _nested(CMD_ATTR_SERVICE, _service_full(vs) if full else _service_key(vs))

    def dest(rs: RealServer, full: bool = True) -> bytes:
        return _nested(CMD_ATTR_DEST, _dest(rs, full))

    for vs, rs in ch.delete_dests:
        if vs.key not in gone:
            out.append(IpvsRequest(f"delete real server {rs.ip}:{rs.port} of {vs}", CMD_DEL_DEST,
                                   svc(vs) + dest(rs, False)))
    for vs in ch.delete_services:
        out.append(IpvsRequest(f"delete virtual server {vs}", CMD_DEL_SERVICE, svc(vs)))
    for vs in ch.add_services:
        out.append(IpvsRequest(f"add virtual server {vs} ({vs.scheduler})", CMD_NEW_SERVICE, svc(vs, True)))
    for vs in ch.edit_services:
        out.append(IpvsRequest(f"change virtual server {vs}", CMD_SET_SERVICE, svc(vs, True)))
    for vs, rs in ch.add_dests:
        out.append(IpvsRequest(f"add real server {rs.ip}:{rs.port} to {vs}", CMD_NEW_DEST, svc(vs) + dest(rs)))
    for vs, rs in ch.edit_dests:
        out.append(IpvsRequest(f"change real server {rs.ip}:{rs.port} of {vs}", CMD_SET_DEST, svc(vs) + dest(rs)))
    return out


def _parse_service(payload: bytes) -> VirtualServer | None:
    a = _attrs(payload)
    if struct.unpack("=H", a.get(SVC_AF, b"\0\0"))[0] != socket.AF_INET or SVC_ADDR not in a:
        return None  # fwmark and IPv6 services are not ours
    proto = PROTOCOL_NAMES.get(struct.unpack("=H", a[SVC_PROTOCOL])[0])
    if proto is None:
        return None
    flags = struct.unpack_from("=I", a.get(SVC_FLAGS, bytes(8)))[0]
    timeout = struct.unpack("=I", a.get(SVC_TIMEOUT, bytes(4)))[0]
    return VirtualServer(proto, socket.inet_ntoa(a[SVC_ADDR][:4]), struct.unpack("!H", a[SVC_PORT])[0],
                         a.get(SVC_SCHED_NAME, b"").rstrip(b"\0").decode(),
                         timeout if flags & SVC_F_PERSISTENT else 0)


def _parse_dest(payload: bytes) -> RealServer:
    a = _attrs(payload)
    weight = struct.unpack("=I", a.get(DEST_WEIGHT, bytes(4)))[0]
    if struct.unpack("=I", a.get(DEST_FWD_METHOD, bytes(4)))[0] & 0x7 != CONN_F_MASQ:
        weight = -1  # not NAT: differs from anything we want, so it is rewritten
    return RealServer(socket.inet_ntoa(a[DEST_ADDR][:4]), struct.unpack("!H", a[DEST_PORT])[0], weight)


class NetlinkChannel:
    """One plain netlink socket in the calling thread's netns: batched requests, sequential dumps.

    Many requests go out in one send and every answer is matched to its request by
    sequence number; dumps run one after another (netlink allows one per socket).
    """

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        self.buf = bytearray(1 << 18)  # one receive buffer: no allocation per datagram
        self.seq = 0
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF_BYTES)  # SO_RCVBUFFORCE (root)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _encode(self, msg_type: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self.seq += 1
        return self.seq, NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, self.seq, 0) + body

    def _messages(self):
        """Yield (type, flags, seq, view of the whole message) for the next datagram."""
        size = self.sock.recv_into(self.buf)
        data = memoryview(self.buf)[:size]
        offset = 0
        while offset + NLMSGHDR.size <= size:
            length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
            if length < NLMSGHDR.size:
                break
            yield mtype, flags, seq, data[offset : offset + length]
            offset += (length + 3) & ~3

    @staticmethod
    def _error(raw) -> int:
        return -struct.unpack_from("=i", raw, NLMSGHDR.size)[0]

    def dump_raw(self, msg_type: int, body: bytes) -> list[bytes]:
        """Every message a dump answers with, without its nlmsghdr."""
        seq, data = self._encode(msg_type, NLM_F_REQUEST | NLM_F_DUMP, body)
        self.sock.send(data)
        out = []
        while True:
            for mtype, flags, mseq, raw in self._messages():
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = self._error(raw)
                    if code == 0:
                        return out
                    raise DataplaneError(f"netlink dump (type {msg_type}) failed: {os.strerror(code)}")
                out.append(bytes(raw[NLMSGHDR.size :]))
                if not flags & NLM_F_MULTI:
                    return out

    def batch(self, requests: Sequence[tuple[str, int, int, bytes]]) -> list[str]:
        """Send (what, type, extra flags, body) requests in batches, wait for every ack; one line per refusal."""
        failures: list[str] = []
        i = 0
        while i < len(requests):
            pending: dict[int, str] = {}
            chunk = bytearray()
            while i < len(requests) and len(chunk) < BATCH_BYTES:
                what, msg_type, flags, body = requests[i]
                seq, data = self._encode(msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, body)
                pending[seq] = what
                chunk += data
                i += 1
            self.sock.send(chunk)
            while pending:
                for mtype, _flags, seq, raw in self._messages():
                    if mtype != NLMSG_ERROR or seq not in pending:
                        continue
                    what = pending.pop(seq)
                    code = self._error(raw)
                    if code:
                        failures.append(f"{what}: {os.strerror(code)}")
        return failures


class IpvsNetlink(NetlinkChannel):
    """IPVS's generic netlink family."""

    def __init__(self) -> None:
        super().__init__(NETLINK_GENERIC)
        try:
            self.family = self._family_id(IPVS_GENL_NAME)
        except BaseException:
            self.close()
            raise

    def _family_id(self, name: str) -> int:
        msg = ctrlmsg()
        msg["cmd"] = CTRL_CMD_GETFAMILY
        msg["version"] = 1
        msg["attrs"] = [("CTRL_ATTR_FAMILY_NAME", name)]
        self.seq += 1
        msg["header"].update(type=GENL_ID_CTRL, flags=NLM_F_REQUEST | NLM_F_ACK, sequence_number=self.seq, pid=0)
        msg.encode()
        self.sock.send(msg.data)
        family = None
        while True:
            for mtype, _flags, seq, raw in self._messages():
                if seq != self.seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = self._error(raw)
                    if code == 0 and family is not None:
                        return family
                    if code == errno.ENOENT:
                        raise DataplaneError(
                            "the kernel has no IPVS (CONFIG_IP_VS, generic netlink family IPVS); "
                            "run with --kernel uml")
                    raise DataplaneError(f"looking up generic netlink family {name}: {os.strerror(code)}")
                reply = ctrlmsg(bytes(raw))
                reply.decode()
                family = reply.get_attr("CTRL_ATTR_FAMILY_ID")

    def dump(self, cmd: int, attrs: bytes = b"") -> list[dict[int, bytes]]:
        """The top-level attributes of every message a dump answers with."""
        body = GENLMSGHDR.pack(cmd, IPVS_GENL_VERSION, 0) + attrs
        return [_attrs(raw, GENLMSGHDR.size) for raw in self.dump_raw(self.family, body)]

    def layout(self) -> IpvsLayout:
        """What the kernel holds: every virtual server and its real servers."""
        held = IpvsLayout()
        for reply in self.dump(CMD_GET_SERVICE):
            vs = _parse_service(reply.get(CMD_ATTR_SERVICE, b""))
            if vs is None:
                continue
            held.services[vs.key] = vs
            dests = held.dests.setdefault(vs.key, {})
            for dreply in self.dump(CMD_GET_DEST, _nested(CMD_ATTR_SERVICE, _service_key(vs))):
                if CMD_ATTR_DEST in dreply:
                    rs = _parse_dest(dreply[CMD_ATTR_DEST])
                    dests[rs.key] = rs
        return held

    def apply(self, requests: Sequence[IpvsRequest]) -> list[str]:
        """Send every request (batched), wait for each ack; one line per refused request."""
        return self.batch([(r.what, self.family, 0, GENLMSGHDR.pack(r.cmd, IPVS_GENL_VERSION, 0) + r.attrs)
                           for r in requests])

    def flush(self) -> None:
        failures = self.apply([IpvsRequest("flush every virtual server", CMD_FLUSH, b"")])
        if failures:
            raise DataplaneError("; ".join(failures))


# --------------------------------------------------------------------------- in the node's netns
# Each runs on a thread that entered the node's network namespace (NodeHandle.call).


def _write_sysctls() -> None:
    for key, value in SYSCTLS.items():
        with open(f"/proc/sys/{key}", "w") as fh:
            fh.write(str(value))


RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
NLM_F_CREATE_EXCL = 0x400 | 0x200


def _kube_ipvs_index() -> int:
    try:
        return socket.if_nametoindex(KUBE_IPVS_IF)
    except OSError:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("add", ifname=KUBE_IPVS_IF, kind="dummy")  # left down, as kube-proxy leaves it
        return socket.if_nametoindex(KUBE_IPVS_IF)


def _sync_addresses(want: set[str]) -> tuple[int, int]:
    """Put exactly `want` on kube-ipvs0 (as /32s), over rtnetlink in batches."""
    index = _kube_ipvs_index()
    with NetlinkChannel(socket.NETLINK_ROUTE) as nl:
        have = set()
        for raw in nl.dump_raw(RTM_GETADDR, IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)):
            family, _plen, _flags, _scope, ifindex = IFADDRMSG.unpack_from(raw)
            if ifindex == index and family == socket.AF_INET:
                attrs = _attrs(raw, IFADDRMSG.size)
                have.add(socket.inet_ntoa(attrs.get(IFA_LOCAL) or attrs[IFA_ADDRESS]))

        def request(ip: str) -> bytes:
            addr = socket.inet_aton(ip)
            return IFADDRMSG.pack(socket.AF_INET, 32, 0, 0, index) + _nla(IFA_LOCAL, addr) + _nla(IFA_ADDRESS, addr)

        failures = nl.batch(
            [(f"add {ip} to {KUBE_IPVS_IF}", RTM_NEWADDR, NLM_F_CREATE_EXCL, request(ip))
             for ip in sorted(want - have)]
            + [(f"remove {ip} from {KUBE_IPVS_IF}", RTM_DELADDR, 0, request(ip))
               for ip in sorted(have - want)]
        )
    if failures:
        raise DataplaneError(f"{len(failures)} address changes refused: " + "; ".join(failures[:5]))
    return len(want - have), len(have - want)


def _sync_ipvs(want: IpvsLayout) -> dict:
    """Read back IPVS, apply the difference, and put the VIPs on kube-ipvs0."""
    started = time.perf_counter()
    with IpvsNetlink() as nl:
        have = nl.layout()
        read_s = time.perf_counter() - started
        changes = ipvs_changes(have, want)
        messages = changes_to_messages(changes)
        failures = nl.apply(messages)
    added, removed = _sync_addresses(want.addresses)
    return {
        "read_s": read_s,
        "messages": len(messages),
        "failures": failures,
        "removed_dests": [(vs.ip, vs.port, vs.protocol, rs.ip, rs.port) for vs, rs in changes.delete_dests],
        "addresses_added": added,
        "addresses_removed": removed,
    }


def _remove_ipvs() -> None:
    from pyroute2 import IPRoute

    try:
        with IpvsNetlink() as nl:
            nl.flush()
    except DataplaneError:
        pass  # no IPVS here: nothing to flush
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=KUBE_IPVS_IF)
        if found:
            ipr.link("del", index=found[0])


def _exec(argv: Sequence[str], input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    # Forked from a thread inside the node's netns, the child lives there too (no `ip netns exec`).
    return subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)


IPT_SO_GET_INFO = 64  # include/uapi/linux/netfilter_ipv4/ip_tables.h
IPT_GETINFO = struct.Struct("=32sI5I5III")  # name, valid_hooks, hook_entry, underflow, num_entries, size


def _iptables_fingerprint() -> tuple | None:
    """(entries, bytes) of the legacy nat, filter and mangle tables: any rule added or removed
    changes it.

    Read with one getsockopt per table, no process; None when a table is not loaded.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        for table in (b"nat", b"filter", b"mangle"):
            buf = ctypes.create_string_buffer(IPT_GETINFO.pack(table, 0, *[0] * 10, 0, 0), IPT_GETINFO.size)
            size = ctypes.c_uint(IPT_GETINFO.size)
            if libc.getsockopt(sock.fileno(), socket.IPPROTO_IP, IPT_SO_GET_INFO, buf, ctypes.byref(size)) != 0:
                return None
            fields = IPT_GETINFO.unpack(buf.raw)
            out.append((fields[-2], fields[-1]))
    return tuple(out)


IPSET_FLAG_LIST_HEADER = 1 << 2  # a list dump of the header only, element count included
NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
IPSET_CMD_DESTROY, IPSET_CMD_ADD, IPSET_CMD_DEL = 3, 9, 10
IPSET_PROTOCOL = 6
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_DATA = 1, 2, 7
IPSET_ATTR_IP, IPSET_ATTR_PORT, IPSET_ATTR_PROTO, IPSET_ATTR_IP2 = 1, 4, 7, 20
IPSET_ATTR_CIDR2 = 21
IPSET_ATTR_IPADDR_IPV4 = 1
NLA_F_NET_BYTEORDER = 0x4000
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id
IP_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def _ipset_ip(kind: int, ip: str) -> bytes:
    return _nested(kind, _nla(IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, socket.inet_aton(ip)))


def _ipset_entry(set_type: str, entry: str) -> bytes:
    """IPSET_ATTR_DATA for one member, as `ipset add` encodes it: "ip", "ip,proto:port[,ip]",
    "ip,proto:port,net/prefix" (a bare address is a /32) or "port"."""
    if set_type == "bitmap:port":
        return _nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(entry)))
    parts = entry.split(",")
    attrs = [_ipset_ip(IPSET_ATTR_IP, parts[0])]
    if len(parts) > 1:
        proto, port = parts[1].split(":")
        attrs += [_nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(port))),
                  _nla(IPSET_ATTR_PROTO, struct.pack("=B", IP_PROTOCOLS[proto]))]
    if len(parts) > 2:
        ip2, _, prefix = parts[2].partition("/")
        attrs.append(_ipset_ip(IPSET_ATTR_IP2, ip2))
        if prefix:
            attrs.append(_nla(IPSET_ATTR_CIDR2, struct.pack("=B", int(prefix))))
    return b"".join(attrs)


def ipset_request(cmd: int, name: str, entry: str) -> bytes:
    """The body of an IPSET_CMD_ADD/DEL for one member (sent without NLM_F_EXCL: `-exist`)."""
    return (NFGENMSG.pack(socket.AF_INET, 0, 0)
            + _nla(IPSET_ATTR_PROTOCOL, struct.pack("=B", IPSET_PROTOCOL))
            + _nla(IPSET_ATTR_SETNAME, name.encode() + b"\0")
            + _nested(IPSET_ATTR_DATA, _ipset_entry(IPSET_BY_NAME[name].type, entry)))


def _ipset_destroy(names: Sequence[str]) -> list[str]:
    """Destroy the named sets over netlink; a set that is already gone is no failure."""
    with NetlinkChannel(NETLINK_NETFILTER) as nl:
        failures = nl.batch([
            (f"destroy {name}", (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_DESTROY, 0,
             NFGENMSG.pack(socket.AF_INET, 0, 0) + _nla(IPSET_ATTR_PROTOCOL, struct.pack("=B", IPSET_PROTOCOL))
             + _nla(IPSET_ATTR_SETNAME, name.encode() + b"\0"))
            for name in names
        ])
    return [f for f in failures if not f.endswith(os.strerror(errno.ENOENT))]


def _ipset_apply(changes: Sequence[tuple[int, str, str]]) -> list[str]:
    """(cmd, set, member) changes over ipset's netlink, in batches: no process."""
    with NetlinkChannel(NETLINK_NETFILTER) as nl:
        failures = nl.batch([
            (f"{'add' if cmd == IPSET_CMD_ADD else 'del'} {name} {entry}", (NFNL_SUBSYS_IPSET << 8) | cmd, 0,
             ipset_request(cmd, name, entry))
            for cmd, name, entry in changes
        ])
    return failures




def _ipset_fingerprint() -> tuple | None:
    """Each of our sets' element count ("missing" when absent), over ipset's netlink: no process.

    None when a count cannot be read, so the caller falls back to `ipset save`.
    """
    from pyroute2.ipset import IPSet, NoSuchObject

    counts: list[int | str] = []
    try:
        with IPSet() as ipset:
            for s in IPSETS:
                try:
                    headers = list(ipset.list(s.name, flags=IPSET_FLAG_LIST_HEADER))
                except NoSuchObject:
                    counts.append("missing")
                    continue
                data = [h.get_attr("IPSET_ATTR_DATA") for h in headers]
                elements = [d.get_attr("IPSET_ATTR_ELEMENTS") for d in data if d is not None]
                if len(elements) != 1 or elements[0] is None:
                    return None
                counts.append(elements[0])
    except Exception:  # ipset's netlink unusable here: read with `ipset save` instead
        return None
    return tuple(counts)


# --------------------------------------------------------------------------- the data plane


_PERSISTENCE = (
    "IPVS keeps a ClientIP persistence template alive while any connection it chose "
    "lives, and a closed TCP connection stays in IPVS's TIME_WAIT for 120 s, a timeout "
    "its netlink API cannot set; so a choice outlives a short timeoutSeconds by up to "
    "two minutes (kube-proxy's IPVS mode behaves the same)"
)


class IpvsDataplane:
    name = "ipvs"
    deviations = {
        "connections_survive_proxy_restart": (
            "uninstall flushes the virtual servers and removes kube-ipvs0, and IPVS's connection "
            "entries go with them, so an established connection's next packets find none (a "
            "reply leaves untranslated and the client resets the connection); kube-proxy's "
            "restart keeps both"
        ),
        "session_affinity_client_ip": _PERSISTENCE,
        "session_affinity_nodeport_timeout": _PERSISTENCE,
    }

    def __init__(self, scheduler: str = DEFAULT_SCHEDULER, backend: str | None = None):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"IPVS scheduler {scheduler!r} is not one Linux offers; accepted: {', '.join(SCHEDULERS)}")
        if backend not in (None, "nft", "legacy"):
            raise ValueError(f"iptables backend {backend!r}: use 'nft' or 'legacy'")
        self.scheduler = scheduler
        self._backend = backend
        self._synced: set[str] = set()  # network namespaces synced at least once
        self._views: dict[str, NodeView] = {}  # netns -> the view of its last sync
        # netns -> (cluster CIDR, our chains as iptables-save printed them after our last write)
        self._written: dict[str, tuple[str, dict[tuple[str, str], list[str]]]] = {}
        # netns -> (fingerprint, members) of the ipsets and (fingerprint) of the tables after our
        # last look: while a fingerprint holds, nobody added or removed anything, and a sync
        # skips the `ipset save` / `iptables-save` process (the slow part in a guest kernel).
        self._ipset_seen: dict[str, tuple[tuple, dict[str, set[str]]]] = {}
        self._iptables_seen: dict[str, tuple] = {}

    # ------------------------------------------------------------------ iptables backend

    @property
    def backend(self) -> str:
        """iptables-nft unless this kernel has only the legacy tables (as the UML guest's)."""
        if self._backend is None:
            host = Host()
            no_nft = host.has_proc("/proc/config.gz") and host.kernel_config("CONFIG_NF_TABLES_IPV4") is None
            self._backend = "legacy" if no_nft and host.kernel_config("CONFIG_IP_NF_IPTABLES") else "nft"
        return self._backend

    def _iptables(self, tool: str) -> list[str]:
        return [f"iptables-{self.backend}{tool}"] + (["-w"] if self.backend == "legacy" and tool != "-save" else [])

    # ------------------------------------------------------------------ protocol

    def missing(self, host: Host) -> list[str]:
        out = []
        if not host.has_proc("/proc/net/ip_vs"):
            if host.kernel_config("CONFIG_IP_VS") == "m":
                out.append("the ip_vs module is not loaded (modprobe ip_vs), or run with --kernel uml")
            else:
                out.append("the kernel has no IPVS (CONFIG_IP_VS); run with --kernel uml")
        for cmd in ("ipset", self._iptables("-restore")[0], self._iptables("-save")[0]):
            if not host.which(cmd):
                package = "ipset" if cmd == "ipset" else "iptables"
                out.append(f"{cmd} not found (apt-get install {package})")
        if not host.which("conntrack"):
            out.append("conntrack not found (apt-get install conntrack): stale UDP flows are not cleared")
        if host.has_proc("/proc/config.gz"):
            for option in ("CONFIG_IP_SET", "CONFIG_NETFILTER_XT_SET", "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE",
                           "CONFIG_NETFILTER_XT_TARGET_MASQUERADE", "CONFIG_DUMMY"):
                if host.kernel_config(option) is None:
                    out.append(f"kernel {host.kernel} lacks {option} (IPVS mode needs it)")
        return out

    def render(self, view: NodeView) -> str:
        """What a sync programs, as text: virtual servers (ipvsadm -S style), ipsets, iptables."""
        layout = desired_layout(view, self.scheduler)
        lines = [f"# IPVS virtual servers of {view.node} ({len(layout.services)}), VIPs on {KUBE_IPVS_IF}: "
                 + " ".join(sorted(layout.addresses, key=ipaddress.ip_address))]
        for key in sorted(layout.services, key=lambda k: (k[0], ipaddress.ip_address(k[1]), k[2])):
            vs = layout.services[key]
            flag = "-t" if vs.protocol == "TCP" else "-u"
            persist = f" -p {vs.persistence_s}" if vs.persistence_s else ""
            lines.append(f"-A {flag} {vs.ip}:{vs.port} -s {vs.scheduler}{persist}")
            for rs in sorted(layout.dests[key].values(), key=lambda r: (ipaddress.ip_address(r.ip), r.port)):
                lines.append(f"-a {flag} {vs.ip}:{vs.port} -r {rs.ip}:{rs.port} -m -w {rs.weight}")
        lines.append("# ipset restore")
        restore, _ = ipset_restore(None, layout.ipsets)
        lines.append(restore.rstrip("\n"))
        lines.append("# iptables-restore --noflush")
        lines.append(iptables_payload(iptables_rules(view.cluster_cidr)).rstrip("\n"))
        return "\n".join(lines) + "\n"

    def install(self, node: NodeHandle) -> None:
        """Sysctls, kube-ipvs0, the ipsets, our iptables chains and the jumps into them."""
        healthcheck.install(node)
        node.call(_write_sysctls)
        node.call(_sync_addresses, set())
        self._sync_ipsets(node, None)
        saved = self._save(node)
        lines = []
        for table in TABLES:
            # Existing chains are left as they are: a restarted proxy keeps serving until its sync.
            lines.append(f"*{table}")
            lines += [f":{c} - [0:0]" for c in CHAINS[table] if (table, c) not in saved.chains]
            lines += [f"-I {chain} 1 {spec}" for t, chain, spec in reversed(saved.missing_jumps()) if t == table]
            lines.append("COMMIT")
        self._restore(node, "\n".join(lines) + "\n")

    def sync(self, node: NodeHandle, view: NodeView) -> SyncStats:
        started = time.perf_counter()
        full = node.netns not in self._synced
        layout = desired_layout(view, self.scheduler)
        ipvs = node.call(_sync_ipvs, layout)
        if ipvs["failures"]:
            shown = "; ".join(ipvs["failures"][:5])
            more = f" (and {len(ipvs['failures']) - 5} more)" if len(ipvs["failures"]) > 5 else ""
            raise DataplaneError(f"IPVS refused {len(ipvs['failures'])} changes on {node.name}: {shown}{more}")
        set_changes = self._sync_ipsets(node, layout.ipsets)
        rules_written = self._sync_iptables(node, view.cluster_cidr)
        flushed = self._clear_stale_udp(node, ipvs["removed_dests"], self._views.get(node.netns),
                                        view)
        self._synced.add(node.netns)
        self._views[node.netns] = view
        changed = ipvs["messages"] + set_changes + ipvs["addresses_added"] + ipvs["addresses_removed"]
        healthcheck.sync(node, view)
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - started,
            full=full,
            services=len(view.services),
            rules=len(layout.services) + layout.real_server_count + sum(len(s) for s in layout.ipsets.values()),
            changed=changed + (1 if rules_written else 0),
            extra={
                "scheduler": self.scheduler,
                "backend": self.backend,
                "virtual_servers": len(layout.services),
                "real_servers": layout.real_server_count,
                "netlink_messages": ipvs["messages"],
                "ipvs_read_s": round(ipvs["read_s"], 4),
                "ipset_changes": set_changes,
                "addresses_added": ipvs["addresses_added"],
                "addresses_removed": ipvs["addresses_removed"],
                "iptables_written": rules_written,
                "conntrack_deletes": flushed,
            },
        )

    def uninstall(self, node: NodeHandle) -> None:
        healthcheck.uninstall(node)
        self._synced.discard(node.netns)
        self._views.pop(node.netns, None)
        self._written.pop(node.netns, None)
        self._ipset_seen.pop(node.netns, None)
        self._iptables_seen.pop(node.netns, None)
        saved = self._save(node)
        lines = []
        for table in TABLES:
            ours = [c for c in CHAINS[table] if (table, c) in saved.chains]
            lines.append(f"*{table}")
            lines += [f":{c} - [0:0]" for c in ours]  # flushed, so nothing refers to the sets
            lines += [f"-D {chain} {spec}" for t, chain, spec in sorted(saved.jumps) if t == table]
            lines += [f"-X {c}" for c in ours]
            lines.append("COMMIT")
        self._restore(node, "\n".join(lines) + "\n")
        node.call(_remove_ipvs)
        failures = node.call(_ipset_destroy, [s.name for s in IPSETS])
        if failures:
            raise DataplaneError(f"ipset refused to destroy our sets on {node.name}: " + "; ".join(failures))

    # ------------------------------------------------------------------ pieces

    def _sync_ipsets(self, node: NodeHandle, want: dict[str, set[str]] | None) -> int:
        """Apply the members that differ; want None only creates the sets that are missing."""
        seen = self._ipset_seen.get(node.netns)
        fingerprint = node.call(_ipset_fingerprint) if seen is not None else None
        if seen is not None and fingerprint is not None and fingerprint == seen[0]:
            have = {name: set(members) for name, members in seen[1].items()}
        else:
            res = node.call(_exec, ["ipset", "save"])
            if res.returncode != 0:
                raise DataplaneError(f"ipset save failed on {node.name}: {res.stderr.strip()}")
            have = parse_ipset_save(res.stdout)
        wanted = want if want is not None else {name: have.get(name, set()) for name in IPSET_BY_NAME}
        payload, changes = ipset_restore(have, wanted)
        if payload and all(name in have for name in IPSET_BY_NAME):
            # Every set exists: members change over netlink, without an `ipset restore` process.
            members = [(IPSET_CMD_ADD, name, e) for name in IPSET_BY_NAME for e in sorted(wanted.get(name, set()) - have[name])]
            members += [(IPSET_CMD_DEL, name, e) for name in IPSET_BY_NAME for e in sorted(have[name] - wanted.get(name, set()))]
            failures = node.call(_ipset_apply, members)
            if failures:
                self._ipset_seen.pop(node.netns, None)
                raise DataplaneError(f"ipset refused {len(failures)} changes on {node.name}: " + "; ".join(failures[:5]))
        elif payload:
            res = node.call(_exec, ["ipset", "restore"], payload)
            if res.returncode != 0:
                self._ipset_seen.pop(node.netns, None)
                raise DataplaneError(f"ipset restore failed on {node.name}: {res.stderr.strip()}")
        if fingerprint is None:
            fingerprint = node.call(_ipset_fingerprint)
        if fingerprint is not None:
            # After a restore that succeeded the kernel holds exactly `wanted`: count, don't ask.
            counts = tuple(len(wanted.get(s.name, ())) for s in IPSETS)
            self._ipset_seen[node.netns] = (counts, {name: set(wanted.get(name, ())) for name in IPSET_BY_NAME})
        return changes

    def _save(self, node: NodeHandle) -> SavedRules:
        res = node.call(_exec, self._iptables("-save"))
        if res.returncode != 0:
            raise DataplaneError(f"{self._iptables('-save')[0]} failed on {node.name}: {res.stderr.strip()}")
        return SavedRules.parse(res.stdout)

    def _sync_iptables(self, node: NodeHandle, cluster_cidr: str) -> bool:
        """Rewrite our chains only when they differ from what we last wrote, or a jump is gone."""
        written = self._written.get(node.netns)
        legacy = self.backend == "legacy"
        if legacy and written is not None and written[0] == cluster_cidr:
            seen = self._iptables_seen.get(node.netns)
            if seen is not None and node.call(_iptables_fingerprint) == seen:
                return False
        saved = self._save(node)
        rules = iptables_rules(cluster_cidr)
        expected = written[1] if written is not None and written[0] == cluster_cidr else rules
        wrote = not (saved.chains == expected and not saved.missing_jumps())
        if wrote:
            self._restore(node, iptables_payload(rules, saved.missing_jumps()))
            # Remember iptables-save's own spelling, so the next sync compares like with like.
            saved = self._save(node)
        self._written[node.netns] = (cluster_cidr, saved.chains)
        if legacy:
            fingerprint = node.call(_iptables_fingerprint)
            if fingerprint is not None:
                self._iptables_seen[node.netns] = fingerprint
        return wrote

    def _restore(self, node: NodeHandle, payload: str) -> None:
        res = node.call(_exec, [*self._iptables("-restore"), "--noflush"], payload)
        if res.returncode != 0:
            raise DataplaneError(
                f"{self._iptables('-restore')[0]} failed on {node.name}: {(res.stderr or res.stdout).strip()}")

    def _clear_stale_udp(self, node: NodeHandle, removed: list[tuple], old: NodeView | None,
                         new: NodeView) -> int:
        """kube-proxy's conntrack cleanup: UDP flows must not stick to endpoints that left
        (the real servers this sync removed), nor stay untranslated once their frontend
        translates (from the view's change)."""
        commands = [
            ["conntrack", "-D", "-p", "udp", "--orig-dst", vip, "--orig-port-dst", str(port),
             "--reply-src", ep_ip, "--reply-port-src", str(ep_port)]
            for vip, port, proto, ep_ip, ep_port in removed
            if proto == "UDP"
        ]
        if old is not None:
            for before, after in udp_port_changes(old, new):
                commands += untranslated_udp_flow_deletes(before, after)
        for argv in commands:
            node.call(_exec, argv, None, 30)
        return len(commands)
