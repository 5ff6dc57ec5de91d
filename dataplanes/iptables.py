"""The iptables data plane: kube-proxy's iptables mode, written with iptables-restore.

The layout follows kube-proxy's proxier (chain names, rule order, probabilities, marks,
no per-endpoint comments above 1,000 endpoint chains); the code is our own. Every write is
`iptables-restore --noflush`, so only KUBE-* chains are touched.

Each Service port renders to a `Piece`: its own chains (KUBE-SVC/SVL/EXT/FW/SEP-*) and its
rows in the shared chains (KUBE-SERVICES in nat and filter, KUBE-NODEPORTS,
KUBE-EXTERNAL-SERVICES, KUBE-PROXY-FIREWALL), kept per node with the port's view.

- `update(node, changes)` is kube-proxy's partial sync (#110268): the changed ports' chains
  are written, the removed ones' deleted, and a shared chain is rebuilt from the kept rows
  (a join of strings) only when some of its rows changed (kube-proxy rewrites the shared
  chains on every sync); the first restore checks the canaries.
- `sync(node, view)` is the full sync: iptables-save read back, every chain that differs
  from what it should hold rewritten, stale chains deleted, hooks and canaries ensured; a
  sync that finds everything in place writes nothing.

On nft, big writes are split into restores of bounded cost (see `_batches`).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
import re
import time
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from dataplanes import healthcheck
from dataplanes.base import DataplaneError, FullSyncNeeded, Host, NodeHandle, SyncStats
from dataplanes.conntrack import run_deletes, stale_udp_flow_deletes, udp_port_changes
from kube.state import REJECT, EndpointView, NodeView, ServicePortView, view_order

if TYPE_CHECKING:
    from kube.tracker import NodeChanges

MASQUERADE_MARK = "0x4000"
CANARY_CHAIN = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")  # kube-proxy watches all three
CANARY_CHECKS = {t: [f"-C {CANARY_CHAIN} -j RETURN"] for t in CANARY_TABLES}
# Above this many endpoint chains kube-proxy drops per-endpoint comments to shrink the payload
# (its largeClusterEndpointsThreshold, #65755).
LARGE_CLUSTER_ENDPOINTS = 1000
# iptables-nft-restore's cost grows with the square of the chains a payload names or jumps
# to: bigger writes are split into restores of at most this cost (see _batches).
NFT_RESTORE_BUDGET = 1500

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"

FILTER_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_PROXY_FIREWALL)
NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that hands packets to one of our chains."""

    table: str
    chain: str  # the built-in chain
    target: str
    comment: str
    new_only: bool = False  # `-m conntrack --ctstate NEW`: only a connection's first packet

    def spec(self) -> str:
        ct = "-m conntrack --ctstate NEW " if self.new_only else ""
        return f'{ct}-m comment --comment "{self.comment}" -j {self.target}'


# In the order they end up in each built-in chain (each is inserted at the top).
JUMPS = (
    Jump(
        "filter",
        "INPUT",
        KUBE_EXTERNAL_SERVICES,
        "kubernetes externally-visible service portals",
        True,
    ),
    Jump("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    Jump("filter", "FORWARD", KUBE_SERVICES, "kubernetes service portals", True),
    Jump(
        "filter",
        "FORWARD",
        KUBE_EXTERNAL_SERVICES,
        "kubernetes externally-visible service portals",
        True,
    ),
    Jump("filter", "OUTPUT", KUBE_SERVICES, "kubernetes service portals", True),
    # Load-balancer IP traffic the KUBE-FW-* chain did not translate (a source outside
    # loadBalancerSourceRanges) still has the LB IP as destination here, and is dropped.
    Jump("filter", "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", True),
    Jump("filter", "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", True),
    Jump("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", True),
    Jump("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)


def hook_rules() -> dict[tuple[str, str], list[str]]:
    """The built-in chains' rules install() guarantees, as restore lines (for the tracer)."""
    out: dict[tuple[str, str], list[str]] = {}
    for j in JUMPS:
        out.setdefault((j.table, j.chain), []).append(f"-A {j.chain} {j.spec()}")
    return out


# --------------------------------------------------------------------------- names


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """kube-proxy's portProtoHash: base32(sha256(name + protocol))[:16], protocol lower case."""
    digest = hashlib.sha256((service_port_name + protocol).encode()).digest()
    return base64.b32encode(digest[:10]).decode()  # 80 bits are exactly 16 characters


def service_chain(sp: ServicePortView) -> str:
    return "KUBE-SVC-" + port_proto_hash(sp.name, sp.protocol.lower())


def local_chain(sp: ServicePortView) -> str:
    return "KUBE-SVL-" + port_proto_hash(sp.name, sp.protocol.lower())


def external_chain(sp: ServicePortView) -> str:
    return "KUBE-EXT-" + port_proto_hash(sp.name, sp.protocol.lower())


def firewall_chain(sp: ServicePortView) -> str:
    return "KUBE-FW-" + port_proto_hash(sp.name, sp.protocol.lower())


def endpoint_chain(sp: ServicePortView, ep: EndpointView) -> str:
    return "KUBE-SEP-" + port_proto_hash(sp.name + sp.protocol.lower(), ep.addr)


def probability(n: int) -> str:
    """The statistic match probability for the first of n remaining endpoints."""
    return f"{1.0 / n:0.10f}"


# --------------------------------------------------------------------------- rendering


@dataclass
class Ruleset:
    """One render: each table's chains in order, each chain's rules as restore lines."""

    filter: dict[str, list[str]] = field(default_factory=dict)
    nat: dict[str, list[str]] = field(default_factory=dict)

    def tables(self) -> tuple[tuple[str, dict[str, list[str]]], ...]:
        return (("filter", self.filter), ("nat", self.nat))

    def chains(self) -> dict[tuple[str, str], list[str]]:
        return {(t, c): rules for t, chains in self.tables() for c, rules in chains.items()}

    def payload(self) -> str:
        """The whole render as one `iptables-restore --noflush` input."""
        return _payload(((t, c), rules, True) for t, chains in self.tables()
                        for c, rules in chains.items())


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


# How a frontend without usable endpoints answers, by the view's filter: (comment, target).
def _filter_rule(sp: ServicePortView, verdict: str) -> tuple[str, str]:
    if verdict == REJECT:
        return f"{sp.name} has no endpoints", "REJECT --reject-with icmp-port-unreachable"
    return f"{sp.name} has no local endpoints", "DROP"


# The chains each Service port adds rows to; everything else a port renders is its own chains.
SHARED_CHAINS = (
    ("filter", KUBE_SERVICES),
    ("filter", KUBE_EXTERNAL_SERVICES),
    ("filter", KUBE_PROXY_FIREWALL),
    ("nat", KUBE_SERVICES),
    ("nat", KUBE_NODEPORTS),
)


def base_chains() -> dict[tuple[str, str], list[str]]:
    """The chains every node has, with the rules they hold whatever its Services (the shared
    chains' rows go before these)."""
    m = MASQUERADE_MARK
    return {
        ("filter", KUBE_SERVICES): [],
        ("filter", KUBE_EXTERNAL_SERVICES): [],
        ("filter", KUBE_FORWARD): [
            f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP",
            f"-A {KUBE_FORWARD} {_comment('kubernetes forwarding rules')}"
            f" -m mark --mark {m}/{m} -j ACCEPT",
            f"-A {KUBE_FORWARD} {_comment('kubernetes forwarding conntrack rule')}"
            " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ],
        ("filter", KUBE_PROXY_FIREWALL): [],
        # 127.0.0.0/8 is left out: NodePorts on localhost need route_localnet, never set here.
        ("nat", KUBE_SERVICES): [
            f"-A {KUBE_SERVICES} "
            + _comment(
                "kubernetes service nodeports; NOTE: this must be the last rule in this chain"
            )
            + f" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j {KUBE_NODEPORTS}"
        ],
        ("nat", KUBE_NODEPORTS): [],
        ("nat", KUBE_POSTROUTING): [
            f"-A {KUBE_POSTROUTING} -m mark ! --mark {m}/{m} -j RETURN",
            # Clear the mark so a packet that loops through the stack is not masqueraded twice.
            f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {m}",
            f"-A {KUBE_POSTROUTING} {_comment('kubernetes service traffic requiring SNAT')}"
            " -j MASQUERADE --random-fully",
        ],
        ("nat", KUBE_MARK_MASQ): [f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {m}"],
    }


@dataclass
class Piece:
    """What one Service port renders: its own nat chains (KUBE-SVC/SVL/EXT/FW/SEP-*) and its
    rows in the shared chains. Pieces are cached per port, so that rebuilding a shared chain
    is a join of these rows, not a render."""

    view: ServicePortView
    large: bool  # rendered in large-cluster mode (no per-endpoint comments)
    chains: dict[str, list[str]]  # nat chain -> rules, in kube-proxy's order of creation
    rows: dict[tuple[str, str], list[str]]  # (table, shared chain) -> this port's rules there
    saved: dict[str, list[str]] = field(default_factory=dict)  # chain -> as iptables-save shows

    @property
    def endpoint_chains(self) -> int:
        return len(self.view.all_reachable_endpoints)

    def saved_form(self, chain: str) -> list[str]:
        """The chain's rules as iptables-save prints them back (cached)."""
        out = self.saved.get(chain)
        if out is None:
            out = self.saved[chain] = [saved_form(r) for r in self.chains[chain]]
        return out


def endpoint_chain_total(services: Iterable[ServicePortView]) -> int:
    return sum(len(sp.all_reachable_endpoints) for sp in services)


def render_piece(sp: ServicePortView, cluster_cidr: str, node_ip: str, large: bool) -> Piece:
    """One Service port in kube-proxy's layout (`large`: kube-proxy's large-cluster mode,
    above LARGE_CLUSTER_ENDPOINTS endpoint chains on the node, drops per-endpoint comments)."""
    n: dict[str, list[str]] = {}
    rows: dict[tuple[str, str], list[str]] = {}

    def row(table: str, chain: str, rule: str) -> None:
        rows.setdefault((table, chain), []).append(rule)

    cidr = cluster_cidr
    proto = sp.protocol.lower()
    name = sp.name
    etp_local = sp.external_policy_local
    digest = port_proto_hash(name, proto)
    svc, svl, ext = f"KUBE-SVC-{digest}", f"KUBE-SVL-{digest}", f"KUBE-EXT-{digest}"
    fw = f"KUBE-FW-{digest}"
    internal_chain = svl if sp.internal_policy_local else svc
    # The EXT chain exists whenever anything may use it: pods and the node short-circuit.
    uses_ext = sp.has_any_endpoints and sp.has_external
    # loadBalancerSourceRanges: load-balancer IP traffic passes the FW chain first.
    uses_fw = uses_ext and bool(sp.load_balancer_ips and sp.load_balancer_source_ranges)
    lb_chain = fw if uses_fw else ext

    vip = f"-d {sp.cluster_ip}/32"
    if sp.internal_endpoints:
        row("nat", KUBE_SERVICES,
            f"-A {KUBE_SERVICES} {vip} -p {proto} {_comment(name + ' cluster IP')}"
            f" -m {proto} --dport {sp.port} -j {internal_chain}")
    else:
        why, verdict = _filter_rule(sp, sp.internal_traffic_filter)
        row("filter", KUBE_SERVICES,
            f"-A {KUBE_SERVICES} {vip} -p {proto} {_comment(why)}"
            f" -m {proto} --dport {sp.port} -j {verdict}")
    if sp.external_traffic_filter:
        why, verdict = _filter_rule(sp, sp.external_traffic_filter)
    for eip in sp.external_ips:
        if uses_ext:
            row("nat", KUBE_SERVICES,
                f"-A {KUBE_SERVICES} -d {eip}/32 -p {proto} {_comment(name + ' external IP')}"
                f" -m {proto} --dport {sp.port} -j {ext}")
        if sp.external_traffic_filter:
            row("filter", KUBE_EXTERNAL_SERVICES,
                f"-A {KUBE_EXTERNAL_SERVICES} -d {eip}/32 -p {proto} {_comment(why)}"
                f" -m {proto} --dport {sp.port} -j {verdict}")
    for lbip in sp.load_balancer_ips:
        if uses_ext:
            row("nat", KUBE_SERVICES,
                f"-A {KUBE_SERVICES} -d {lbip}/32 -p {proto}"
                f" {_comment(name + ' loadbalancer IP')} -m {proto} --dport {sp.port} -j {lb_chain}")
        if uses_fw:
            row("filter", KUBE_PROXY_FIREWALL,
                f"-A {KUBE_PROXY_FIREWALL} -d {lbip}/32 -p {proto}"
                f" {_comment(f'{name} traffic not accepted by {fw}')}"
                f" -m {proto} --dport {sp.port} -j DROP")
        if sp.external_traffic_filter:
            row("filter", KUBE_EXTERNAL_SERVICES,
                f"-A {KUBE_EXTERNAL_SERVICES} -d {lbip}/32 -p {proto} {_comment(why)}"
                f" -m {proto} --dport {sp.port} -j {verdict}")
    # NodePorts are not subject to loadBalancerSourceRanges (kube-proxy).
    if sp.node_port is not None:
        if uses_ext:
            row("nat", KUBE_NODEPORTS,
                f"-A {KUBE_NODEPORTS} -p {proto} {_comment(name)}"
                f" -m {proto} --dport {sp.node_port} -j {ext}")
        if sp.external_traffic_filter:
            row("filter", KUBE_EXTERNAL_SERVICES,
                f"-A {KUBE_EXTERNAL_SERVICES} -p {proto} {_comment(why)}"
                f" -m addrtype --dst-type LOCAL -m {proto} --dport {sp.node_port} -j {verdict}")

    if sp.internal_endpoints:
        # Off-cluster sources (node processes) are masqueraded so replies come back here.
        n.setdefault(internal_chain, []).append(
            f"-A {internal_chain} ! -s {cidr} {vip} -p {proto} {_comment(name + ' cluster IP')}"
            f" -m {proto} --dport {sp.port} -j {KUBE_MARK_MASQ}"
        )
    if uses_ext:
        rules = n.setdefault(ext, [])
        if not etp_local:
            rules.append(
                f"-A {ext} {_comment(f'masquerade traffic for {name} external destinations')}"
                f" -j {KUBE_MARK_MASQ}"
            )
        else:
            # Pods and the node itself reach external destinations through Cluster policy.
            rules += [
                f"-A {ext} -s {cidr} {_comment(f'pod traffic for {name} external destinations')}"
                f" -j {svc}",
                f"-A {ext} {_comment(f'masquerade LOCAL traffic for {name} external destinations')}"
                f" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}",
                f"-A {ext} {_comment(f'route LOCAL traffic for {name} external destinations')}"
                f" -m addrtype --src-type LOCAL -j {svc}",
            ]
        if sp.external_endpoints:
            rules.append(f"-A {ext} -j {svl if etp_local else svc}")
    if uses_fw:
        _firewall(sp, n.setdefault(fw, []), fw, ext, node_ip)
    seps = {ep.addr: endpoint_chain(sp, ep) for ep in sp.all_reachable_endpoints}
    if sp.cluster_endpoints:
        _balance(sp, n.setdefault(svc, []), svc, sp.cluster_endpoints, seps, large)
    if sp.local_endpoints:
        _balance(sp, n.setdefault(svl, []), svl, sp.local_endpoints, seps, large)
    tag = "" if large else " " + _comment(name)
    for ep in sp.all_reachable_endpoints:
        sep = seps[ep.addr]
        affinity = (
            f" -m recent --set --name {sep} --mask 255.255.255.255 --rsource"
            if sp.session_affinity
            else ""
        )
        n[sep] = [
            # Hairpin: a pod reaching itself through the Service must see a different source.
            f"-A {sep} -s {ep.ip}/32{tag} -j {KUBE_MARK_MASQ}",
            f"-A {sep} -p {proto}{tag}{affinity} -m {proto} -j DNAT --to-destination {ep.addr}",
        ]
    return Piece(sp, large, n, rows)


def _firewall(sp: ServicePortView, rules: list[str], fw: str, ext: str, node_ip: str) -> None:
    """kube-proxy's KUBE-FW chain: each allowed source range goes on to the EXT chain;
    what falls through keeps the LB IP as destination and meets KUBE-PROXY-FIREWALL."""
    tag = _comment(f"{sp.name} loadbalancer IP")
    ranges = list(dict.fromkeys(sp.load_balancer_source_ranges))
    for cidr in ranges:
        rules.append(f"-A {fw} {tag} -s {cidr} -j {ext}")
    node = ipaddress.ip_address(node_ip)
    if any(node in ipaddress.ip_network(cidr, strict=False) for cidr in ranges):
        # A node that may reach the LB IP may also do so from the LB IP itself (an LB
        # IP bound on the node loops back with it as source).
        rules += [f"-A {fw} {tag} -s {lbip}/32 -j {ext}" for lbip in sp.load_balancer_ips]
    rules.append(
        f"-A {fw} {_comment(f'other traffic to {sp.name} will be dropped by {KUBE_PROXY_FIREWALL}')}"
    )


def _balance(sp: ServicePortView, rules: list[str], chain: str, eps, seps, large: bool) -> None:
    def tag(ep: EndpointView) -> str:
        return "" if large else " " + _comment(f"{sp.name} -> {ep.addr}")

    if sp.session_affinity:
        for ep in eps:
            sep = seps[ep.addr]
            rules.append(
                f"-A {chain}{tag(ep)} -m recent --name {sep} --rcheck"
                f" --seconds {sp.affinity_timeout_s} --reap -j {sep}"
            )
    count = len(eps)
    for i, ep in enumerate(eps):
        chance = (
            f" -m statistic --mode random --probability {probability(count - i)}"
            if i < count - 1
            else ""
        )
        rules.append(f"-A {chain}{tag(ep)}{chance} -j {seps[ep.addr]}")


def shared_rules(key: tuple[str, str], pieces: Iterable[Piece]) -> list[str]:
    """A shared chain: the rows of every piece, in the order given, then its fixed rules."""
    out = [r for p in pieces for r in p.rows.get(key, ())]
    return out + BASE_CHAINS[key]


def assemble(pieces: list[Piece]) -> Ruleset:
    """The chains of a node holding these pieces (in their order)."""
    rs = Ruleset()
    tables = dict(rs.tables())
    for (table, chain), rules in BASE_CHAINS.items():
        tables[table][chain] = list(rules)
    for key in SHARED_CHAINS:
        tables[key[0]][key[1]] = shared_rules(key, pieces)
    for p in pieces:
        for chain, rules in p.chains.items():
            rs.nat[chain] = rules
    return rs


def render_ruleset(view: NodeView) -> Ruleset:
    """Every KUBE chain this node needs, per table, in kube-proxy's layout."""
    large = endpoint_chain_total(view.services) > LARGE_CLUSTER_ENDPOINTS
    ordered = sorted(view.services, key=view_order)
    return assemble([render_piece(sp, view.cluster_cidr, view.node_ip, large) for sp in ordered])


# --------------------------------------------------------------------------- saved form
#
# iptables-save prints a few of the rules we write in another (equivalent) form; a full sync
# compares what the kernel holds with what it would write, so it needs ours in that form.

_PROBABILITY = re.compile(r"--probability (\S+)")
_RCHECK = re.compile(r"-m recent --name (\S+) --rcheck --seconds (\d+) --reap")
_FW_RANGE = re.compile(r"^(-A KUBE-FW-\S+) (-m comment --comment \"[^\"]*\") -s (\S+) (-j .*)$")


def _saved_probability(text: str) -> str:
    # The statistic match keeps round(p * 2^31) and prints it back with 11 decimals.
    kept = math.floor(float(text) * 0x80000000 + 0.5)
    return f"--probability {kept / 0x80000000:.11f}"


def _saved_cidr(cidr: str) -> str:
    net = ipaddress.ip_network(cidr, strict=False)
    return str(net)


def saved_form(rule: str) -> str:
    """`rule` as iptables-save prints it back (the same rule, in the form it keeps)."""
    if "--probability " in rule:
        rule = _PROBABILITY.sub(lambda m: _saved_probability(m.group(1)), rule)
    if " --rcheck " in rule:
        rule = _RCHECK.sub(r"-m recent --rcheck --seconds \2 --reap --name \1"
                           r" --mask 255.255.255.255 --rsource", rule)
    if rule.startswith("-A KUBE-FW-"):
        m = _FW_RANGE.match(rule)
        if m:
            cidr = _saved_cidr(m.group(3))
            source = "" if cidr.endswith("/0") else f" -s {cidr}"
            rule = f"{m.group(1)}{source} {m.group(2)} {m.group(4)}"
    return SAVED_BASE.get(rule, rule)


BASE_CHAINS = base_chains()
_m = MASQUERADE_MARK
SAVED_BASE = {
    f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {_m}": f"-A {KUBE_POSTROUTING} -j MARK --set-xmark {_m}/0x0",
    f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {_m}": f"-A {KUBE_MARK_MASQ} -j MARK --set-xmark {_m}/{_m}",
    BASE_CHAINS[("nat", KUBE_SERVICES)][0]: f"-A {KUBE_SERVICES} ! -d 127.0.0.0/8 "
    + _comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
    + f" -m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}",
}
del _m


# --------------------------------------------------------------------------- saved state


BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


@dataclass
class SavedState:
    """What `iptables-save` shows: every chain of every table, with its rules in order."""

    rules: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> SavedState:
        rules: dict[tuple[str, str], list[str]] = {}
        table, last, current = "", "", None
        for line in text.splitlines():
            if line.startswith("-A "):
                end = line.find(" ", 3)
                chain = line[3:] if end < 0 else line[3:end]
                if chain != last or current is None:
                    current = rules.setdefault((table, chain), [])
                    last = chain
                current.append(line)
            elif line.startswith(":"):
                rules.setdefault((table, line[1:].split(" ", 1)[0]), [])
            elif line.startswith("*"):
                table, last, current = line[1:].strip(), "", None
        return cls(rules)

    def has(self, table: str, chain: str) -> bool:
        return (table, chain) in self.rules

    def jumps_to(self, table: str, chain: str, target: str) -> bool:
        return any(line.endswith(f"-j {target}") for line in self.rules.get((table, chain), []))


def _target(rule: str) -> str:
    at = rule.rfind(" -j ")
    return rule[at + 4:].split(" ", 1)[0] if at >= 0 else ""


def _restore_cost(rules: list[str]) -> int:
    """What writing a chain costs iptables-nft-restore: one, plus the rules that jump to one of
    our chains (the distinct targets' lookups make a payload's cost grow with the square of
    their number; a chain's rules mostly jump to distinct chains)."""
    return 1 + sum(" -j KUBE-" in r for r in rules)


# One chain's part of a restore: (table, chain), its rules, and whether the restore declares it
# (which flushes it first) or appends the rules to what it holds.
Item = tuple[tuple[str, str], list[str], bool]


def _payload(items: Iterable[Item], delete: Iterable[tuple[str, str]] = (),
             extra: dict[str, list[str]] | None = None, checks: bool = False) -> str:
    """Restore text: per table, canary checks (-C: a missing canary fails the whole restore,
    changing nothing), chain declarations (each flushes its chain), rules, -X, extra lines."""
    items, delete, extra = list(items), list(delete), extra or {}
    out: list[str] = []
    for table in ("mangle", "filter", "nat"):
        mine = [it for it in items if it[0][0] == table]
        gone = [c for t, c in delete if t == table]
        more = extra.get(table, [])
        check = CANARY_CHECKS[table] if checks else []
        if not (mine or gone or more or check):
            continue
        out.append(f"*{table}")
        out.extend(check)
        out.extend(f":{key[1]} - [0:0]" for key, _, declare in mine if declare)
        out.extend(f":{c} - [0:0]" for c in gone)
        out.extend(line for line in more if line.startswith(":"))
        for _, rules, _ in mine:
            out.extend(rules)
        out.extend(f"-X {c}" for c in gone)
        out.extend(line for line in more if not line.startswith(":"))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- the data plane


ViewKey = tuple[str, str, str, str, int]  # kube.tracker's: namespace, service, port name, ...


def _view_key(sp: ServicePortView) -> ViewKey:
    return (sp.namespace, sp.service, sp.port_name, sp.protocol, sp.port)


@dataclass
class _Memory:
    """One node as our last sync or update left it: the pieces of its Service ports, in the
    order their rows take in the shared chains, and what the write-out needs to stay exact."""

    template: NodeView  # the node's own fields (services empty)
    pieces: dict[ViewKey, Piece]
    order: list[tuple[tuple[str, str, int], ViewKey]]  # by view_order, as a full sync sorts
    endpoint_chains: int  # KUBE-SEP chains over all pieces (large-cluster mode)
    large: bool
    health: dict[ViewKey, ServicePortView]  # the ports with a health-check NodePort
    trusted: bool = True  # False once a write failed half-way: the next sync is a full one

    def ordered(self) -> Iterator[Piece]:
        pieces = self.pieces
        return (pieces[vk] for _, vk in self.order)

    def add(self, vk: ViewKey, piece: Piece) -> None:
        if vk not in self.pieces:
            insort(self.order, (view_order(piece.view), vk))
        self.pieces[vk] = piece
        if piece.view.health_check_node_port is not None:
            self.health[vk] = piece.view
        else:
            self.health.pop(vk, None)

    def drop(self, vk: ViewKey) -> None:
        piece = self.pieces.pop(vk)
        at = bisect_left(self.order, (view_order(piece.view), vk))
        del self.order[at]
        self.health.pop(vk, None)

    def view(self, services: Iterable[ServicePortView]) -> NodeView:
        return replace(self.template, services=tuple(services))


@dataclass
class _HealthPorts:
    """What healthcheck.table reads of a NodeView: the ports with a health-check NodePort."""

    services: tuple[ServicePortView, ...]


@dataclass
class _Write:
    """One sync's changes to the kernel: chains (re)written, rules appended to chains that
    hold the start of what they should (no flush: a full sync from empty splits the 10,000
    jumps of KUBE-SERVICES), chains deleted, hook lines."""

    chains: dict[tuple[str, str], list[str]]
    delete: set[tuple[str, str]] = field(default_factory=set)
    appends: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    extra: dict[str, list[str]] = field(default_factory=dict)
    checks: bool = False  # the first restore checks every canary first


class IptablesDataplane:
    name = "iptables"
    balancing = "random"  # statistic --mode random probabilities, as kube-proxy

    def __init__(self, backend: str | None = None, restore_budget: int | None = None):
        """backend None: nft, or legacy where the kernel has no nf_tables IPv4 family (the UML
        guest). restore_budget splits big writes into several restores, each costing at most
        that much (see _restore_cost): None means NFT_RESTORE_BUDGET on nft and 0 (one
        restore) on legacy, whose every restore rewrites the whole table anyway."""
        if backend is None:
            host = Host()
            no_nft = host.has_proc("/proc/config.gz") and host.kernel_config("CONFIG_NF_TABLES_IPV4") is None
            backend = "legacy" if no_nft else "nft"
        if backend not in ("nft", "legacy"):
            raise ValueError(f"iptables backend {backend!r}: use 'nft' or 'legacy'")
        self.backend = backend
        self.restore_cmd = [f"iptables-{backend}-restore"] + (["-w"] if backend == "legacy" else [])
        self.save_cmd = [f"iptables-{backend}-save"]
        self.iptables_cmd = [f"iptables-{backend}"] + (["-w"] if backend == "legacy" else [])
        self._memory: dict[str, _Memory] = {}  # by network namespace
        if restore_budget is None:
            restore_budget = NFT_RESTORE_BUDGET if backend == "nft" else 0
        self.restore_budget = restore_budget

    # ------------------------------------------------------------------ protocol

    def missing(self, host: Host) -> list[str]:
        out = [
            f"{cmd} not found (apt-get install iptables)"
            for cmd in (self.restore_cmd[0], self.save_cmd[0], self.iptables_cmd[0])
            if not host.which(cmd)
        ]
        if not host.which("conntrack"):
            out.append(
                "conntrack not found (apt-get install conntrack): stale UDP flows are not cleared"
            )
        if host.has_proc("/proc/config.gz"):
            base = "CONFIG_NFT_COMPAT" if self.backend == "nft" else "CONFIG_IP_NF_IPTABLES"
            for option in (
                base,
                "CONFIG_NETFILTER_XT_MATCH_STATISTIC",
                "CONFIG_NETFILTER_XT_MATCH_RECENT",
                "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE",
                "CONFIG_NETFILTER_XT_TARGET_MASQUERADE",
            ):
                if host.kernel_config(option) is None:
                    out.append(
                        f"kernel {host.kernel} lacks {option} (iptables {self.backend} mode needs it)"
                    )
        return out

    def render(self, view: NodeView) -> str:
        return render_ruleset(view).payload()

    def install(self, node: NodeHandle) -> None:
        healthcheck.install(node)
        saved = self._save(node)
        self._restore(node, _payload((), extra=self._hooks(saved, True)))

    def sync(self, node: NodeHandle, view: NodeView, full: bool = True) -> SyncStats:
        """Converge the node to the view (kube-proxy's full sync; `full` is accepted for callers
        that pass it, every sync is one): the kernel's state is read back, every chain that
        differs from what it should hold is rewritten (so whatever others removed or changed
        comes back), stale chains deleted, hooks and canaries re-ensured; nothing else is
        written. Changes in between go through `update`."""
        return self._full(node, view, time.perf_counter())

    def update(self, node: NodeHandle, changes: NodeChanges) -> SyncStats:
        """Write what `changes` changed: the chains of the Service ports updated or removed,
        and the shared chains whose rows changed, rebuilt from the memory (a join of kept
        strings); the first restore checks the canaries. FullSyncNeeded when there is no
        memory of the node, a restore fails (a canary or a chain removed by someone else), or
        the node crosses the large-cluster threshold (every endpoint chain's comments change).
        """
        start = time.perf_counter()
        mem = self._memory.get(node.netns)
        if mem is None or not mem.trusted:
            raise FullSyncNeeded(f"no trusted memory of {node.name}")
        if type(self).sync is not IptablesDataplane.sync:
            # A subclass that changes what sync renders (the tests' broken modes) only syncs.
            raise FullSyncNeeded(f"{type(self).__name__} renders through sync")
        return self._partial(node, mem, changes.updated, changes.removed, start)

    def kernel_state(self, node: NodeHandle) -> dict[str, dict[str, list[str]]]:
        """iptables-save read back: every KUBE-* chain with its rules in order, and the rules
        of the built-in chains that jump to one, per table (no counters; chains sorted)."""
        saved = SavedState.parse(self._save_text(node))
        out: dict[str, dict[str, list[str]]] = {}
        for (table, chain), rules in sorted(saved.rules.items()):
            if chain.startswith("KUBE-"):
                out.setdefault(table, {})[chain] = list(rules)
            elif chain in BUILTIN_CHAINS:
                hooks = [r for r in rules if _target(r).startswith("KUBE-")]
                if hooks:
                    out.setdefault(table, {})[chain] = hooks
        return out

    def summary(self, node: NodeHandle) -> dict[str, object]:
        """For `svcbench status`: the backend, KUBE-* chains and their rules per table (one
        iptables-save: iptables has no cheaper count), the jumps from the built-in chains,
        the per-Service chains, and the health server."""
        saved = self._save(node)
        tables: dict[str, dict[str, int]] = {}
        jumps = services = 0
        for (table, chain), rules in saved.rules.items():
            if chain.startswith("KUBE-"):
                t = tables.setdefault(table, {"chains": 0, "rules": 0})
                t["chains"] += 1
                t["rules"] += len(rules)
                services += chain.startswith(SERVICE_CHAIN_PREFIXES)
            elif chain in BUILTIN_CHAINS:
                jumps += sum(1 for r in rules if _target(r).startswith("KUBE-"))
        return {"options": {"backend": self.backend}, "tables": tables,
                "chains": sum(t["chains"] for t in tables.values()),
                "rules": sum(t["rules"] for t in tables.values()),
                "service_chains": services, "jumps": jumps,
                "health_server": healthcheck.summary(node)}

    def uninstall(self, node: NodeHandle) -> None:
        """Remove the jump rules, then every KUBE-* chain, roots before the chains they jump to."""
        healthcheck.uninstall(node)
        self._memory.pop(node.netns, None)
        saved = self._save(node)
        unhook: dict[str, list[str]] = {}
        for (table, chain), rules in saved.rules.items():
            if chain not in BUILTIN_CHAINS:
                continue
            for line in rules:
                if _target(line).startswith("KUBE-"):
                    unhook.setdefault(table, []).append("-D " + line[3:])
        ours = sorted(((t, c) for t, c in saved.rules if c.startswith("KUBE-")),
                      key=_write_order, reverse=True)
        size = self.restore_budget or len(ours) or 1
        batches = [ours[i : i + size] for i in range(0, len(ours), size)] or [[]]
        for i, batch in enumerate(batches):
            extra = {t: lines for t, lines in unhook.items()} if i == 0 else {}
            # The unhooking goes before the chains are flushed and deleted.
            lines: list[str] = []
            for table in ("mangle", "filter", "nat"):
                names = [c for t, c in batch if t == table]
                more = extra.get(table, [])
                if names or more:
                    lines += [f"*{table}", *(f":{c} - [0:0]" for c in names), *more]
                    lines += [f"-X {c}" for c in names] + ["COMMIT"]
            if lines:
                self._restore(node, "\n".join(lines) + "\n")

    # ------------------------------------------------------------------ syncing

    def _full(self, node: NodeHandle, view: NodeView, start: float) -> SyncStats:
        mem = self._memory.pop(node.netns, None)  # forgotten until this sync succeeds
        saved = SavedState.parse(self._save_text(node))
        total = endpoint_chain_total(view.services)
        large = total > LARGE_CLUSTER_ENDPOINTS
        # Pieces of unchanged views are reused: rendering is the same function of the same view.
        reuse = mem.pieces if mem and mem.large == large and _same_node(mem.template, view) else {}
        new = _Memory(replace(view, services=()), {}, [], total, large, {})
        for sp in view.services:
            vk = _view_key(sp)
            piece = reuse.get(vk)
            if piece is None or (piece.view is not sp and piece.view != sp):
                piece = render_piece(sp, view.cluster_cidr, view.node_ip, large)
            new.pieces[vk] = piece
            new.order.append((view_order(sp), vk))
            if sp.health_check_node_port is not None:
                new.health[vk] = sp
        new.order.sort()
        write: dict[tuple[str, str], list[str]] = {}
        appends: dict[tuple[str, str], list[str]] = {}
        for key, fixed in BASE_CHAINS.items():
            rules = shared_rules(key, new.ordered()) if key in SHARED else fixed
            have = saved.rules.get(key)
            if have is not None and (have == rules or have == [saved_form(r) for r in rules]):
                continue
            if have is not None and len(have) < len(rules) and (
                    have == [saved_form(r) for r in rules[: len(have)]]):
                # It holds the start of its rules (empty, after install): the rest is appended,
                # in parts, without the chain ever losing a rule it has.
                appends[key] = rules[len(have):]
            else:
                write[key] = rules
        wanted: set[str] = set()
        for piece in new.pieces.values():
            for chain, rules in piece.chains.items():
                wanted.add(chain)
                have = saved.rules.get(("nat", chain))
                if have is None or (have != rules and have != piece.saved_form(chain)):
                    write[("nat", chain)] = rules
        stale = {(t, c) for t, c in saved.rules
                 if t == "nat" and c.startswith(SERVICE_CHAIN_PREFIXES) and c not in wanted}
        payloads = self._apply(node, _Write(write, stale, appends, extra=self._hooks(saved)))
        self._memory[node.netns] = new
        old = mem.view(p.view for p in mem.pieces.values()) if mem else None
        flushed = self._clear_stale_udp(node, old, view)
        healthcheck.sync(node, view)
        stats = self._stats(node, start, True, new, payloads, write, stale, flushed)
        stats.changed += len(appends)
        stats.extra["chains_appended"] = len(appends)
        # The first 100 chains written or appended to (all of them after a repair).
        stats.extra["written"] = sorted(f"{t}/{c}" for t, c in (*write, *appends))[:100]
        return stats

    def _partial(self, node: NodeHandle, mem: _Memory, updated: dict[ViewKey, ServicePortView],
                 removed: Iterable[ViewKey], start: float) -> SyncStats:
        seps = mem.endpoint_chains
        gone = [vk for vk in removed if vk in mem.pieces and vk not in updated]
        for vk in gone:
            seps -= mem.pieces[vk].endpoint_chains
        fresh: dict[ViewKey, ServicePortView] = {}
        for vk, sp in updated.items():
            old = mem.pieces.get(vk)
            if old is not None:
                if old.view is sp or old.view == sp:
                    continue
                seps -= old.endpoint_chains
            seps += len(sp.all_reachable_endpoints)
            fresh[vk] = sp
        large = seps > LARGE_CLUSTER_ENDPOINTS
        if large != mem.large:
            raise FullSyncNeeded(f"{node.name} crosses the large-cluster threshold "
                                 f"({LARGE_CLUSTER_ENDPOINTS} endpoint chains)")
        cidr, node_ip = mem.template.cluster_cidr, mem.template.node_ip
        pieces = {vk: render_piece(sp, cidr, node_ip, large) for vk, sp in fresh.items()}
        write: dict[tuple[str, str], list[str]] = {}
        before: set[str] = set()
        after: set[str] = set()
        dirty: set[tuple[str, str]] = set()
        olds: list[ServicePortView] = []
        for vk in (*gone, *pieces):
            old, new = mem.pieces.get(vk), pieces.get(vk)
            was = old.chains if old else {}
            now = new.chains if new else {}
            for chain, rules in now.items():
                if was.get(chain) != rules:
                    write[("nat", chain)] = rules
            before.update(was)
            after.update(now)
            rows_was = old.rows if old else {}
            rows_now = new.rows if new else {}
            dirty.update(k for k in rows_was.keys() | rows_now.keys()
                         if rows_was.get(k) != rows_now.get(k))
            if old is not None:
                olds.append(old.view)
        delete = {("nat", c) for c in before - after}
        # The memory follows first; a failed write leaves it untrusted (the next sync is full).
        for vk in gone:
            mem.drop(vk)
        for vk, piece in pieces.items():
            mem.add(vk, piece)
        mem.endpoint_chains = seps
        for key in dirty:
            write[key] = shared_rules(key, mem.ordered())
        try:
            payloads = self._apply(node, _Write(write, delete, checks=True))
        except DataplaneError as exc:
            mem.trusted = False
            raise FullSyncNeeded(f"a partial write to {node.name} failed: {exc}") from exc
        flushed = 0
        if any(v.protocol == "UDP" for v in olds) or any(
                sp.protocol == "UDP" for sp in fresh.values()):
            flushed = self._clear_stale_udp(node, mem.view(olds), mem.view(fresh.values()))
        healthcheck.sync(node, _HealthPorts(tuple(mem.health.values())))
        stats = self._stats(node, start, False, mem, payloads, write, delete, flushed)
        stats.extra["changed_chains"] = sorted(
            c for t, c in (*write, *delete) if (t, c) not in BASE_CHAINS)
        stats.extra["shared_chains"] = sorted(f"{t}/{c}" for t, c in dirty)
        return stats

    def _stats(self, node: NodeHandle, start: float, full: bool, mem: _Memory,
               payloads: list[str], write: dict, delete: set, flushed: int) -> SyncStats:
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - start,
            full=full,
            services=len(mem.pieces),
            rules=sum(p.count("\n-A ") + p.count("\n-I ") for p in payloads),
            payload_bytes=sum(len(p.encode()) for p in payloads),
            changed=len(write) + len(delete),
            extra={
                "backend": self.backend,
                "restores": len(payloads),
                "chains_written": len(write),
                "chains_deleted": len(delete),
                "conntrack_deletes": flushed,
                "large_cluster": mem.large,
            },
        )

    def _apply(self, node: NodeHandle, w: _Write) -> list[str]:
        """Write `w` in as few restores as the budget allows: leaves first (every jump target
        exists before a rule names it), deletions last (nothing refers to them any more)."""
        if not (w.chains or w.appends or w.delete or any(w.extra.values()) or w.checks):
            return []  # a partial write always checks the canaries, even with nothing to write
        items: list[Item] = []
        for key in sorted(w.chains.keys() | w.appends.keys(), key=_write_order):
            if key in w.chains:
                items.append((key, w.chains[key], True))
            else:
                items += [(key, part, False) for part in self._parts(w.appends[key])]
        payloads = []
        checks = w.checks
        if checks and self.backend == "nft" and (items or w.delete):
            # On nft the canary checks go first, alone (2 ms): a -C in the payload that
            # rewrites KUBE-SERVICES makes it 0.2 s slower at 10,000 Services. A legacy
            # restore reads each table it names whole, so there they ride in the first one.
            payloads.append(_payload((), checks=True))
            self._restore(node, payloads[-1])
            checks = False
        batches = self._batches(items, sorted(w.delete, key=_write_order, reverse=True))
        for i, (part, delete) in enumerate(batches):
            last = i == len(batches) - 1
            payload = _payload(part, delete, w.extra if last else None, checks and i == 0)
            self._restore(node, payload)
            payloads.append(payload)
        return payloads

    def _parts(self, rules: list[str]) -> list[list[str]]:
        """Rules appended to one chain, in parts that each cost at most the budget."""
        if not self.restore_budget:
            return [rules]
        out: list[list[str]] = [[]]
        targets: set[str] = set()
        for rule in rules:
            if " -j KUBE-" in rule:
                targets.add(_target(rule))
                if len(targets) >= self.restore_budget:
                    out.append([])
                    targets = set()
            out[-1].append(rule)
        return [part for part in out if part]

    def _batches(self, items: list[Item], delete: list[tuple[str, str]]
                 ) -> list[tuple[list[Item], list[tuple[str, str]]]]:
        """Split so each restore costs at most restore_budget (0: one restore).

        iptables-nft-restore (1.8.9) takes time growing with the square of the distinct chains
        a payload declares or jumps to: one payload holding 10,000 Services' 40,000 chains
        takes minutes. Each chain costs 1 plus its distinct jump targets; a deletion costs 1.
        """
        budget = self.restore_budget
        if not budget:
            return [(items, delete)]
        out: list[tuple[list[Item], list[tuple[str, str]]]] = []
        part: list[Item] = []
        gone: list[tuple[str, str]] = []
        cost = 0
        for item in items:
            c = _restore_cost(item[1])
            if part and cost + c > budget:
                out.append((part, []))
                part, cost = [], 0
            part.append(item)
            cost += c
        for key in delete:
            if (part or gone) and cost + 1 > budget:
                out.append((part, gone))
                part, gone, cost = [], [], 0
            gone.append(key)
            cost += 1
        out.append((part, gone))
        return out

    # ------------------------------------------------------------------ pieces

    def _hooks(
        self, saved: SavedState, declare_missing_chains: bool = False
    ) -> dict[str, list[str]]:
        """Restore lines for canaries that are not as they should be, missing jump rules and
        (for install) missing base chains."""
        extra: dict[str, list[str]] = {}
        for table in CANARY_TABLES:
            # The canary holds one rule, so a flush of its table (-F) shows as well as -X does.
            if saved.rules.get((table, CANARY_CHAIN)) != [f"-A {CANARY_CHAIN} -j RETURN"]:
                extra.setdefault(table, []).extend(
                    [f":{CANARY_CHAIN} - [0:0]", f"-A {CANARY_CHAIN} -j RETURN"])
        if declare_missing_chains:
            for table, chain in BASE_CHAINS:
                if not saved.has(table, chain):
                    extra.setdefault(table, []).append(f":{chain} - [0:0]")
        # Inserted at the top in reverse, so the JUMPS order is the order in each chain.
        for j in reversed(JUMPS):
            if not saved.jumps_to(j.table, j.chain, j.target):
                extra.setdefault(j.table, []).append(f"-I {j.chain} 1 {j.spec()}")
        return extra

    def _save_text(self, node: NodeHandle) -> str:
        res = node.run(self.save_cmd, check=False, timeout=300)
        if res.returncode != 0:
            raise DataplaneError(f"{self.save_cmd[0]} failed on {node.name}: {res.stderr.strip()}")
        return res.stdout

    def _save(self, node: NodeHandle) -> SavedState:
        return SavedState.parse(self._save_text(node))

    def _restore(self, node: NodeHandle, payload: str) -> None:
        res = node.run([*self.restore_cmd, "--noflush"], input=payload, check=False, timeout=600)
        if res.returncode != 0:
            err = (res.stderr or res.stdout).strip()
            raise DataplaneError(
                f"{self.restore_cmd[0]} failed on {node.name}: {err}{_context(payload, err)}"
            )

    def _clear_stale_udp(self, node: NodeHandle, old: NodeView | None, new: NodeView) -> int:
        """kube-proxy's conntrack cleanup: UDP flows must not stick to endpoints that left,
        nor stay untranslated once their frontend translates."""
        if old is None:
            return 0
        commands: list[list[str]] = []
        for before, after in udp_port_changes(old, new):
            commands += stale_udp_flow_deletes(before, after)
        return run_deletes(node, commands)


SHARED = frozenset(SHARED_CHAINS)


def _same_node(template: NodeView, view: NodeView) -> bool:
    return (template.cluster_cidr, template.node_ip) == (view.cluster_cidr, view.node_ip)


def _write_order(key: tuple[str, str]) -> tuple[int, str, str]:
    """Leaves first: a chain is written after every chain it jumps to. Within a rank the
    order is not the names' (it sorts by the name read backwards): iptables-nft keeps its
    cache of a table's chains sorted by name, and chains the kernel lists in name order make
    every later iptables-nft-save and restore slow (20,000 chains: save 0.2 s -> 6-8 s)."""
    table, chain = key
    if table == "filter":
        rank = 6
    elif chain in (KUBE_MARK_MASQ, KUBE_POSTROUTING):
        rank = 0
    elif chain.startswith("KUBE-SEP-"):
        rank = 1
    elif chain.startswith(("KUBE-SVC-", "KUBE-SVL-")):
        rank = 2
    elif chain == KUBE_NODEPORTS:
        rank = 4
    elif chain == KUBE_SERVICES:
        rank = 5
    else:  # KUBE-EXT-, KUBE-FW-: jump to SVC/SVL chains
        rank = 3
    return rank, table, chain[::-1]


def _context(payload: str, err: str) -> str:
    """The payload lines around the one iptables-restore names in its error (kube-proxy's too)."""
    m = re.search(r"line:? (\d+)", err)
    if not m:
        return ""
    n = int(m.group(1))
    lines = payload.splitlines()
    lo, hi = max(0, n - 3), min(len(lines), n + 2)
    shown = "\n".join(f"{'>' if i + 1 == n else ' '} {i + 1}: {lines[i]}" for i in range(lo, hi))
    return f"\n{shown}"
