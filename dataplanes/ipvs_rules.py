"""IPVS mode's iptables side, as text (pure): kube-proxy's chains for what IPVS cannot do.

Masquerade off-cluster traffic to ClusterIPs (KUBE-CLUSTER-IP), hairpin (KUBE-LOOP-BACK),
NodePorts (KUBE-NODE-PORT-*: masquerade, or keep the client's address for
externalTrafficPolicy Local), externalIPs, load-balancer IPs (KUBE-LOAD-BALANCER) with their
loadBalancerSourceRanges (KUBE-PROXY-FIREWALL and KUBE-SOURCE-RANGES-FIREWALL over the
KUBE-LOAD-BALANCER-FW and -SOURCE-CIDR/-SOURCE-IP sets: other sources dropped) and a REJECT
for VIP ports no Service serves (KUBE-IPVS-FILTER). Every rule matches sets, so the rules
depend on the cluster CIDR alone: Services change set members, never rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dataplanes.ipvs_layout import (
    IPSET_BY_NAME,
    KUBE_CLUSTER_IP,
    KUBE_DROP_CLUSTER_IP,
    KUBE_DROP_EXTERNAL,
    KUBE_EXTERNAL_IP,
    KUBE_EXTERNAL_IP_LOCAL,
    KUBE_IPVS_IPS,
    KUBE_LOAD_BALANCER,
    KUBE_LOAD_BALANCER_FW,
    KUBE_LOAD_BALANCER_LOCAL,
    KUBE_LOAD_BALANCER_SOURCE_CIDR,
    KUBE_LOAD_BALANCER_SOURCE_IP,
    KUBE_LOOP_BACK,
    KUBE_NODE_PORT_LOCAL_TCP,
    KUBE_NODE_PORT_LOCAL_UDP,
    KUBE_NODE_PORT_TCP,
    KUBE_NODE_PORT_UDP,
)

MASQUERADE_MARK = "0x4000"

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
_PORTALS = '-m comment --comment "kubernetes service portals"'
_FIREWALL = '-m comment --comment "kube-proxy firewall rules"'
JUMPS = (
    ("nat", "PREROUTING", f"{_PORTALS} -j {KUBE_SERVICES}"),
    ("nat", "OUTPUT", f"{_PORTALS} -j {KUBE_SERVICES}"),
    ("nat", "POSTROUTING",
     f'-m comment --comment "kubernetes postrouting rules" -j {KUBE_POSTROUTING}'),
    ("filter", "INPUT",
     f'-m comment --comment "kubernetes ipvs access filter" -j {KUBE_IPVS_FILTER}'),
    ("filter", "FORWARD", f'-m comment --comment "kubernetes forwarding rules" -j {KUBE_FORWARD}'),
    ("filter", "INPUT", f"{_FIREWALL} -j {KUBE_PROXY_FIREWALL}"),
    ("filter", "FORWARD", f"{_FIREWALL} -j {KUBE_PROXY_FIREWALL}"),
    ("mangle", "OUTPUT", f"{_FIREWALL} -j {KUBE_PROXY_FIREWALL}"),
)


def _c(text: str) -> str:
    return f'-m comment --comment "{text}"'


def _set(name: str, flags: str) -> str:
    return f"{_c(IPSET_BY_NAME[name].comment)} -m set --match-set {name} {flags}"


def iptables_rules(cluster_cidr: str) -> dict[tuple[str, str], list[str]]:
    """Every rule of our chains, written as iptables-save prints them (so a save compares
    equal)."""
    m = MASQUERADE_MARK
    nat_services = [
        # Off-cluster sources (node processes, routed clients) to a ClusterIP: masquerade,
        # so replies come back here.
        f"! -s {cluster_cidr} {_set(KUBE_CLUSTER_IP, 'dst,dst')} -j {KUBE_MARK_MASQ}",
        f"{_set(KUBE_EXTERNAL_IP, 'dst,dst')} -j {KUBE_MARK_MASQ}",
        # externalIPs never fall through to the NodePort rules below.
        f"{_set(KUBE_EXTERNAL_IP, 'dst,dst')} -j ACCEPT",
        # The node's own connection to a Local externalIP leaves from that address (it is on
        # kube-ipvs0): the endpoint's reply could not find its way back without masquerade.
        f"-m addrtype --src-type LOCAL {_set(KUBE_EXTERNAL_IP_LOCAL, 'dst,dst')}"
        f" -j {KUBE_MARK_MASQ}",
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
        f"{_c('kubernetes forwarding conntrack rule')}"
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    load_balancer = [
        # The node's own connection leaves from the LB IP (it is on kube-ipvs0), as to a
        # Local externalIP: masqueraded so a remote endpoint's reply finds its way back.
        f"-m addrtype --src-type LOCAL {_set(KUBE_LOAD_BALANCER_LOCAL, 'dst,dst')}"
        f" -j {KUBE_MARK_MASQ}",
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


def iptables_payload(rules: dict[tuple[str, str], list[str]],
                     jumps: Iterable[tuple[str, str, str]] = JUMPS) -> str:
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
        targets = {t: tuple(f"-j {c}" for c in cs) for t, cs in CHAINS.items()}
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
                elif spec.endswith(targets.get(table, ())):
                    saved.jumps.add((table, chain, spec))
        return saved

    def missing_jumps(self) -> list[tuple[str, str, str]]:
        return [j for j in JUMPS if j not in self.jumps]

