"""The iptables data plane: kube-proxy's iptables mode, written with iptables-restore.

The layout follows kube-proxy's proxier (chain names, rule order, probabilities, marks);
the code is our own. A sync writes with `--noflush`, so only KUBE-* chains are touched;
a full sync on the nft backend is split into leaf-first restores (see `_batches`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from dataplanes import healthcheck
from dataplanes.base import DataplaneError, Host, NodeHandle, SyncStats
from dataplanes.conntrack import run_deletes, stale_udp_flow_deletes, udp_port_changes
from kube.state import REJECT, EndpointView, NodeView, ServicePortView

MASQUERADE_MARK = "0x4000"
CANARY_CHAIN = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")  # kube-proxy watches all three
CANARY_CHECKS = {t: [f"-C {CANARY_CHAIN} -j RETURN"] for t in CANARY_TABLES}
# Above this many endpoint chains kube-proxy drops per-endpoint comments to shrink the payload.
LARGE_CLUSTER_ENDPOINTS = 1000
# iptables-nft-restore's cost per line grows with the chains a payload names (see _batches).
NFT_CHAINS_PER_RESTORE = 1000

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


BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648, Go's base32.StdEncoding


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """kube-proxy's portProtoHash: base32(sha256(name + protocol))[:16], protocol lower case."""
    digest = hashlib.sha256((service_port_name + protocol).encode()).digest()
    bits = int.from_bytes(digest[:10], "big")  # 80 bits are exactly 16 base32 characters
    return "".join(BASE32[(bits >> shift) & 31] for shift in range(75, -1, -5))


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

    def payload(
        self,
        only: set[tuple[str, str]] | None = None,
        delete: Iterable[tuple[str, str]] = (),
        extra: dict[str, list[str]] | None = None,
        checks: dict[str, list[str]] | None = None,
    ) -> str:
        """Restore text for the chains in `only` (all when None), `delete`d chains and extra lines.

        Per table: `checks` (-C lines: the restore fails, changing nothing in that table, when
        one does not hold), chain declarations (which flush), rules, -X, then extra rules.
        """
        delete = list(delete)
        extra = extra or {}
        checks = checks or {}
        out: list[str] = []
        for table in ("mangle", "filter", "nat"):
            chains = dict(self.tables()).get(table, {})
            names = [c for c in chains if only is None or (table, c) in only]
            gone = [c for t, c in delete if t == table]
            more = extra.get(table, [])
            if table == "mangle" and not more and not checks.get(table):
                continue
            out.append(f"*{table}")
            out.extend(checks.get(table, []))
            out.extend(f":{c} - [0:0]" for c in names + gone)
            out.extend(line for line in more if line.startswith(":"))
            for c in names:
                out.extend(chains[c])
            out.extend(f"-X {c}" for c in gone)
            out.extend(line for line in more if not line.startswith(":"))
            out.append("COMMIT")
        return "\n".join(out) + "\n"


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


# How a frontend without usable endpoints answers, by the view's filter: (comment, target).
def _filter_rule(sp: ServicePortView, verdict: str) -> tuple[str, str]:
    if verdict == REJECT:
        return f"{sp.name} has no endpoints", "REJECT --reject-with icmp-port-unreachable"
    return f"{sp.name} has no local endpoints", "DROP"


class _Renderer:
    def __init__(self, view: NodeView):
        self.view = view
        total = sum(len(sp.all_reachable_endpoints) for sp in view.services)  # KUBE-SEP chains
        self.large = total > LARGE_CLUSTER_ENDPOINTS
        self.rs = Ruleset()
        f, n = self.rs.filter, self.rs.nat
        for c in FILTER_CHAINS:
            f[c] = []
        for c in NAT_CHAINS:
            n[c] = []

    def render(self) -> Ruleset:
        view, f, n = self.view, self.rs.filter, self.rs.nat
        m = MASQUERADE_MARK
        n[KUBE_POSTROUTING] += [
            f"-A {KUBE_POSTROUTING} -m mark ! --mark {m}/{m} -j RETURN",
            # Clear the mark so a packet that loops through the stack is not masqueraded twice.
            f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {m}",
            f"-A {KUBE_POSTROUTING} {_comment('kubernetes service traffic requiring SNAT')}"
            " -j MASQUERADE --random-fully",
        ]
        n[KUBE_MARK_MASQ].append(f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {m}")
        for sp in view.services:
            self._service(sp)
        # 127.0.0.0/8 is left out: NodePorts on localhost need route_localnet, which we never set.
        n[KUBE_SERVICES].append(
            f"-A {KUBE_SERVICES} "
            + _comment(
                "kubernetes service nodeports; NOTE: this must be the last rule in this chain"
            )
            + f" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j {KUBE_NODEPORTS}"
        )
        f[KUBE_FORWARD] += [
            f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP",
            f"-A {KUBE_FORWARD} {_comment('kubernetes forwarding rules')}"
            f" -m mark --mark {m}/{m} -j ACCEPT",
            f"-A {KUBE_FORWARD} {_comment('kubernetes forwarding conntrack rule')}"
            " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]
        return self.rs

    def _service(self, sp: ServicePortView) -> None:
        f, n, cidr = self.rs.filter, self.rs.nat, self.view.cluster_cidr
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
            n[KUBE_SERVICES].append(
                f"-A {KUBE_SERVICES} {vip} -p {proto} {_comment(name + ' cluster IP')}"
                f" -m {proto} --dport {sp.port} -j {internal_chain}"
            )
        else:
            why, verdict = _filter_rule(sp, sp.internal_traffic_filter)
            f[KUBE_SERVICES].append(
                f"-A {KUBE_SERVICES} {vip} -p {proto} {_comment(why)}"
                f" -m {proto} --dport {sp.port} -j {verdict}"
            )
        if sp.external_traffic_filter:
            why, verdict = _filter_rule(sp, sp.external_traffic_filter)
        for eip in sp.external_ips:
            if uses_ext:
                n[KUBE_SERVICES].append(
                    f"-A {KUBE_SERVICES} -d {eip}/32 -p {proto} {_comment(name + ' external IP')}"
                    f" -m {proto} --dport {sp.port} -j {ext}"
                )
            if sp.external_traffic_filter:
                f[KUBE_EXTERNAL_SERVICES].append(
                    f"-A {KUBE_EXTERNAL_SERVICES} -d {eip}/32 -p {proto} {_comment(why)}"
                    f" -m {proto} --dport {sp.port} -j {verdict}"
                )
        for lbip in sp.load_balancer_ips:
            if uses_ext:
                n[KUBE_SERVICES].append(
                    f"-A {KUBE_SERVICES} -d {lbip}/32 -p {proto}"
                    f" {_comment(name + ' loadbalancer IP')} -m {proto} --dport {sp.port} -j {lb_chain}"
                )
            if uses_fw:
                f[KUBE_PROXY_FIREWALL].append(
                    f"-A {KUBE_PROXY_FIREWALL} -d {lbip}/32 -p {proto}"
                    f" {_comment(f'{name} traffic not accepted by {fw}')}"
                    f" -m {proto} --dport {sp.port} -j DROP"
                )
            if sp.external_traffic_filter:
                f[KUBE_EXTERNAL_SERVICES].append(
                    f"-A {KUBE_EXTERNAL_SERVICES} -d {lbip}/32 -p {proto} {_comment(why)}"
                    f" -m {proto} --dport {sp.port} -j {verdict}"
                )
        # NodePorts are not subject to loadBalancerSourceRanges (kube-proxy).
        if sp.node_port is not None:
            if uses_ext:
                n[KUBE_NODEPORTS].append(
                    f"-A {KUBE_NODEPORTS} -p {proto} {_comment(name)}"
                    f" -m {proto} --dport {sp.node_port} -j {ext}"
                )
            if sp.external_traffic_filter:
                f[KUBE_EXTERNAL_SERVICES].append(
                    f"-A {KUBE_EXTERNAL_SERVICES} -p {proto} {_comment(why)}"
                    f" -m addrtype --dst-type LOCAL -m {proto} --dport {sp.node_port} -j {verdict}"
                )

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
            self._firewall(sp, n.setdefault(fw, []), fw, ext)
        seps = {ep.addr: endpoint_chain(sp, ep) for ep in sp.all_reachable_endpoints}
        if sp.cluster_endpoints:
            self._balance(sp, n.setdefault(svc, []), svc, sp.cluster_endpoints, seps)
        if sp.local_endpoints:
            self._balance(sp, n.setdefault(svl, []), svl, sp.local_endpoints, seps)
        tag = "" if self.large else " " + _comment(name)
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

    def _firewall(self, sp: ServicePortView, rules: list[str], fw: str, ext: str) -> None:
        """kube-proxy's KUBE-FW chain: each allowed source range goes on to the EXT chain;
        what falls through keeps the LB IP as destination and meets KUBE-PROXY-FIREWALL."""
        tag = _comment(f"{sp.name} loadbalancer IP")
        ranges = list(dict.fromkeys(sp.load_balancer_source_ranges))
        for cidr in ranges:
            rules.append(f"-A {fw} {tag} -s {cidr} -j {ext}")
        node = ipaddress.ip_address(self.view.node_ip)
        if any(node in ipaddress.ip_network(cidr) for cidr in ranges):
            # A node that may reach the LB IP may also do so from the LB IP itself (an LB
            # IP bound on the node loops back with it as source).
            rules += [f"-A {fw} {tag} -s {lbip}/32 -j {ext}" for lbip in sp.load_balancer_ips]
        rules.append(
            f"-A {fw} {_comment(f'other traffic to {sp.name} will be dropped by {KUBE_PROXY_FIREWALL}')}"
        )

    def _balance(self, sp: ServicePortView, rules: list[str], chain: str, eps, seps) -> None:
        def tag(ep: EndpointView) -> str:
            return "" if self.large else " " + _comment(f"{sp.name} -> {ep.addr}")

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


def render_ruleset(view: NodeView) -> Ruleset:
    """Every KUBE chain this node needs, per table, in kube-proxy's layout."""
    return _Renderer(view).render()


# --------------------------------------------------------------------------- saved state


@dataclass
class SavedState:
    """What `iptables-save` shows: chains per table and the built-in chains' rules."""

    chains: dict[str, set[str]] = field(default_factory=dict)
    rules: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, keep_rules_of: Iterable[str] = ()) -> SavedState:
        keep = set(keep_rules_of)
        state = cls()
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
                state.chains.setdefault(table, set())
            elif line.startswith(":"):
                state.chains[table].add(line[1:].split(" ", 1)[0])
            elif line.startswith("-A "):
                chain = line[3:].split(" ", 1)[0]
                if chain in keep:
                    state.rules.setdefault((table, chain), []).append(line)
        return state

    def has(self, table: str, chain: str) -> bool:
        return chain in self.chains.get(table, set())

    def jumps_to(self, table: str, chain: str, target: str) -> bool:
        return any(line.endswith(f"-j {target}") for line in self.rules.get((table, chain), []))


BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


# --------------------------------------------------------------------------- the data plane


@dataclass
class _Synced:
    """What a node holds after our last successful sync."""

    chains: dict[tuple[str, str], list[str]]
    view: NodeView


class IptablesDataplane:
    name = "iptables"

    def __init__(self, backend: str | None = None, max_chains_per_restore: int | None = None):
        """backend None: nft, or legacy where the kernel has no nf_tables IPv4 family (the UML
        guest). max_chains_per_restore splits big syncs: None means 1,000 on nft, 0 on legacy."""
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
        self._synced: dict[str, _Synced] = {}  # by network namespace
        if max_chains_per_restore is None:
            max_chains_per_restore = NFT_CHAINS_PER_RESTORE if backend == "nft" else 0
        self.max_chains_per_restore = max_chains_per_restore

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
        self._restore(node, Ruleset().payload(only=set(), extra=self._hooks(saved, True)))

    def sync(self, node: NodeHandle, view: NodeView, full: bool = False) -> SyncStats:
        """Full sync (first time here, canary gone, or asked): every chain, stale ones deleted,
        hooks re-ensured. Partial sync: top-level chains plus the chains whose rules changed."""
        start = time.perf_counter()
        prev = self._synced.pop(node.netns, None)  # forgotten until this sync succeeds
        full = full or prev is None
        ruleset = render_ruleset(view)
        try:
            payloads, written, stale, differ = self._write(node, ruleset, None if full else prev)
        except DataplaneError:
            if full:
                raise
            # A canary is gone (someone flushed a table) or someone changed our chains under
            # us: start over from what the kernel holds.
            full = True
            payloads, written, stale, differ = self._write(node, ruleset, None)
        self._synced[node.netns] = _Synced(ruleset.chains(), view)
        flushed = self._clear_stale_udp(node, prev.view if prev else None, view)
        extra = {
            "backend": self.backend,
            "restores": len(payloads),
            "chains_written": len(written),
            "chains_deleted": len(stale),
            "conntrack_deletes": flushed,
        }
        if not full:
            extra["changed_chains"] = sorted(c for _, c in differ | set(stale))
        healthcheck.sync(node, view)
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - start,
            full=full,
            services=len(view.services),
            rules=sum(p.count("\n-A ") + p.count("\n-I ") for p in payloads),
            payload_bytes=sum(len(p.encode()) for p in payloads),
            changed=len(differ) + len(stale),
            extra=extra,
        )

    def _write(self, node: NodeHandle, ruleset: Ruleset, prev: _Synced | None):
        """Write everything (prev None) or only what changed since prev; returns the payloads."""
        chains = ruleset.chains()
        extra: dict[str, list[str]] = {}
        if prev is None:
            saved = self._save(node)
            stale = [
                ("nat", c)
                for c in sorted(saved.chains.get("nat", ()))
                if c.startswith(SERVICE_CHAIN_PREFIXES) and ("nat", c) not in chains
            ]
            extra = self._hooks(saved)
            written = differ = set(chains)
        else:
            top = {("filter", c) for c in FILTER_CHAINS} | {("nat", c) for c in NAT_CHAINS}
            stale = [k for k in prev.chains if k not in chains]
            # Top-level chains are written every time; `differ` is the per-service ones.
            differ = {
                k for k, rules in chains.items() if k not in top and prev.chains.get(k) != rules
            }
            written = differ | top
        batches = self._batches(written)
        # A partial sync trusts what it wrote before only while every canary is there; the
        # first restore checks them itself, which saves a process per table on every sync.
        checks = None if prev is None else CANARY_CHECKS
        payloads = []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            payload = ruleset.payload(only=batch, extra=extra if last else None,
                                      checks=checks if i == 0 else None)
            self._restore(node, payload)
            payloads.append(payload)
        # Stale chains go after nothing jumps to them any more, in batches as well: one -X
        # payload naming N chains is O(N^2) too (5,000 Services -> 0 took 60-170 s unsplit).
        for batch in self._batches(set(stale), roots_first=True):
            if batch:
                payload = ruleset.payload(only=set(), delete=sorted(batch, key=_write_order, reverse=True))
                self._restore(node, payload)
                payloads.append(payload)
        return payloads, written, stale, differ

    def _batches(
        self, chains: set[tuple[str, str]], roots_first: bool = False
    ) -> list[set[tuple[str, str]]]:
        """Chains to write, split so each restore names at most max_chains_per_restore.

        iptables-nft-restore --noflush (1.8.9) keeps the chains a payload names in a sorted
        linked list and walks it for every line: one payload naming N chains costs O(N^2)
        (10,000 Services: minutes). Leaves go first, so every jump target already exists;
        for deletion (roots_first) the chains that jump go first, so nothing left refers to a
        deleted chain.
        """
        ordered = sorted(chains, key=_write_order, reverse=roots_first)
        size = self.max_chains_per_restore or len(ordered) or 1
        return [set(ordered[i : i + size]) for i in range(0, len(ordered), size)] or [set()]

    def uninstall(self, node: NodeHandle) -> None:
        """Remove the jump rules, then every KUBE-* chain, roots before the chains they jump to."""
        healthcheck.uninstall(node)
        self._synced.pop(node.netns, None)
        saved = self._save(node)
        unhook: dict[str, list[str]] = {}
        for (table, _builtin), rules in saved.rules.items():
            for line in rules:
                target = line.rsplit(" -j ", 1)[-1].split(" ", 1)[0] if " -j " in line else ""
                if target.startswith("KUBE-"):
                    unhook.setdefault(table, []).append("-D " + line[3:])
        ours = [(t, c) for t, cs in saved.chains.items() for c in cs if c.startswith("KUBE-")]
        batches = self._batches(set(ours))[::-1]
        for i, batch in enumerate(batches):
            lines: list[str] = []
            for table in ("mangle", "filter", "nat"):
                names = sorted(c for t, c in batch if t == table)
                more = unhook.get(table, []) if i == 0 else []
                if names or more:
                    lines += [f"*{table}", *(f":{c} - [0:0]" for c in names), *more]
                    lines += [f"-X {c}" for c in names] + ["COMMIT"]
            if lines:
                self._restore(node, "\n".join(lines) + "\n")

    # ------------------------------------------------------------------ pieces

    def _hooks(
        self, saved: SavedState, declare_missing_chains: bool = False
    ) -> dict[str, list[str]]:
        """Restore lines for canaries, missing jump rules and (for install) missing base chains."""
        extra: dict[str, list[str]] = {}
        for table in CANARY_TABLES:
            # The canary holds one rule, so a flush of its table (-F) shows as well as -X does.
            extra.setdefault(table, []).extend(
                [f":{CANARY_CHAIN} - [0:0]", f"-A {CANARY_CHAIN} -j RETURN"]
            )
        if declare_missing_chains:
            for table, names in (("filter", FILTER_CHAINS), ("nat", NAT_CHAINS)):
                extra[table] += [f":{c} - [0:0]" for c in names if not saved.has(table, c)]
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
        return SavedState.parse(self._save_text(node), keep_rules_of=BUILTIN_CHAINS)

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


def _write_order(key: tuple[str, str]) -> tuple[int, str, str]:
    """Leaves first: a chain is written after every chain it jumps to."""
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
    return rank, table, chain


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
