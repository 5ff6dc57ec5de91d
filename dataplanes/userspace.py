"""The userspace data plane: kube-proxy's legacy mode, a proxy process on every node.

The kernel only steers: iptables nat REDIRECTs a Service's new connections and datagrams to
the proxy's port (PREROUTING for pods and outside clients, OUTPUT for the node's own
processes), and filter REJECTs or DROPs the portals the proxy must not take. Which
(address, protocol, port) is a portal lives in ipsets (hash:ip,port), so the rules stay a
fixed handful and a packet's cost does not grow with the number of Services. The proxy
(dataplanes/userspace_proxy.py) picks backends, retries, and splices the bytes.

REDIRECT rather than TPROXY: REDIRECT works in nat OUTPUT for the node's own processes,
needs no policy routing in the node, and conntrack turns replies back into the portal by
itself; TPROXY would need a fwmark route table, a reroute trick for local traffic, and
transparent sockets bound to every VIP to answer UDP.

A sync sends the whole table over the proxy's control socket (no restart: established
connections keep their backend), swaps the ipsets atomically and rewrites the chains, so
it also repairs rules, sets or a proxy process that someone removed. It also leaves a
memory of the node (`_Memory`: each Service port's portals, classes and source ranges,
and the proxy table it matches), on which `update(node, changes)` builds: the proxy gets
a delta of the changed entries only (applied in place, refused when its table is not the
one the memory matches), and the sets only the members the changed ports' portals gained
or lost, with one `ipset restore`; the rules are a fixed handful and never change.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataplanes import healthcheck
from dataplanes.base import (
    DataplaneError,
    FullSyncNeeded,
    Host,
    NodeHandle,
    SyncStats,
    ipset_networks,
)
from dataplanes.nodeproc import log_tail, request_json_line, sweep_logs
from dataplanes.userspace_proxy import (
    BALANCING,
    CONNECT_TIMEOUT_S,
    CONTROL_NAME,
    DROP,
    EXTERNAL_LOCAL,
    PROXY_PORT,
    REDIRECT,
    REJECT,
    UDP_IDLE_TIMEOUT_S,
    Claims,
    PortalKey,
    portal_classes,
    portal_source_ranges,
    spec_portals,
    spec_source_ranges,
)
from kube.state import NodeView, ServicePortView, view_order

if TYPE_CHECKING:
    from kube.tracker import NodeChanges

ViewKey = tuple[str, str, str, str, int]  # kube.tracker.ViewKey

# Service ports this mode does not program, and why.
SKIPPED_PROTOCOLS = {
    "SCTP": "the proxy relays TCP and UDP sockets; this host has no SCTP sockets",
}

# nat: kube-proxy's userspace mode named its chains for the "portals" it opened.
PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"  # PREROUTING: pods and outside clients
PORTALS_HOST = "KUBE-PORTALS-HOST"  # OUTPUT: the node's own processes
PORTALS_FILTER = "KUBE-PORTALS-FILTER"  # filter: portals refused or dropped
CHAINS = (("nat", PORTALS_CONTAINER), ("nat", PORTALS_HOST), ("filter", PORTALS_FILTER))
# (table, built-in chain, our chain, new connections only)
JUMPS = (
    ("nat", "PREROUTING", PORTALS_CONTAINER, False),
    ("nat", "OUTPUT", PORTALS_HOST, False),
    ("filter", "INPUT", PORTALS_FILTER, True),
    ("filter", "FORWARD", PORTALS_FILTER, True),
    ("filter", "OUTPUT", PORTALS_FILTER, True),
)
JUMP_COMMENT = "kubernetes service portals (userspace)"

# ipsets of hash:ip,port, one per portal class.
SET_REDIRECT = "KUBE-PORTALS"  # redirected to the proxy
SET_EXTERNAL_LOCAL = "KUBE-PORTALS-EXT-LOCAL"  # ... but not for outside clients
SET_DROP = "KUBE-PORTALS-DROP"
SET_REJECT = "KUBE-PORTALS-REJECT"
SETS = (SET_REDIRECT, SET_EXTERNAL_LOCAL, SET_DROP, SET_REJECT)
# loadBalancerSourceRanges (as kube-proxy's IPVS mode keeps them): the load-balancer portals
# that have ranges, and (portal, allowed network) pairs. A TCP connection the proxy could
# refuse has already been accepted by the kernel, so the source is judged before REDIRECT:
# other sources stay unredirected and the filter drops them (the client times out).
SET_FIREWALL = "KUBE-PORTALS-FW"
SET_FIREWALL_SOURCES = "KUBE-PORTALS-FW-SOURCES"
SET_TYPES = {SET_FIREWALL_SOURCES: "hash:ip,port,net"}  # the others are hash:ip,port
SET_MEMBERS = {  # which classes each set holds
    SET_REDIRECT: (REDIRECT, EXTERNAL_LOCAL),
    SET_EXTERNAL_LOCAL: (EXTERNAL_LOCAL,),
    SET_DROP: (DROP, EXTERNAL_LOCAL),  # outside clients of an EXTERNAL_LOCAL portal are not redirected
    SET_REJECT: (REJECT,),
}
SET_MAXELEM = 1 << 20

IPTABLES = "iptables-nft"
IPTABLES_SAVE = "iptables-nft-save"
IPTABLES_RESTORE = "iptables-nft-restore"
CONNTRACK_DELETES_MAX = 64  # above this many changed UDP portals one flush of UDP flows is cheaper
CONTROL_TIMEOUT_S = 60.0  # a 10,000-Service table takes well under a second to apply
SPAWN_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
LOG_DIR = "/run/svcbench/userspace"
REPO_ROOT = str(Path(__file__).resolve().parents[1])

# Conformance checks this mode cannot meet by design (check name -> why).
_SOURCE_IP = ("the proxy opens its own connection to the backend, so the backend sees the node's "
              "address, never the client's: userspace mode cannot preserve the source IP")
_LOCAL_POLICY = (_SOURCE_IP + " (the policy's other half, no service through a node without "
                 "a local endpoint, is met)")
DEVIATIONS = {
    "clusterip_preserves_client_pod_ip": _SOURCE_IP,
    "external_traffic_policy_local": _LOCAL_POLICY,
    "load_balancer_external_traffic_policy_local": _LOCAL_POLICY,
    "connections_survive_proxy_restart": (
        "the proxy process holds both halves of every connection it proxies, so stopping it "
        "closes them (kube-proxy's userspace mode lost them on restart alike)"
    ),
    "source_ip_per_policy": _SOURCE_IP,
}


# --------------------------------------------------------------------------- rendering


def table_message(view: NodeView) -> dict[str, Any]:
    """The proxy's table for a node: every Service port with the endpoints each traffic kind uses."""
    return {
        "op": "table",
        "node": view.node,
        "node_ips": list(view.node_ips),
        "cluster_cidr": view.cluster_cidr,
        "services": [_service(sp) for sp in view.services if sp.protocol not in SKIPPED_PROTOCOLS],
    }


def _service(sp: ServicePortView) -> dict[str, Any]:
    return {
        "name": sp.name,
        "protocol": sp.protocol,
        "cluster_ip": sp.cluster_ip,
        "port": sp.port,
        "node_port": sp.node_port,
        "external_ips": list(sp.external_ips),
        "load_balancer_ips": list(sp.load_balancer_ips),
        "source_ranges": list(sp.load_balancer_source_ranges),
        "affinity_s": sp.affinity_timeout_s,
        "internal": [[e.ip, e.port] for e in sp.internal_endpoints],
        "external": [[e.ip, e.port] for e in sp.external_endpoints],
        "cluster": [[e.ip, e.port] for e in sp.cluster_endpoints],
        "internal_filter": sp.internal_traffic_filter,
        "external_filter": sp.external_traffic_filter,
    }


def render_ipsets(classes: dict[PortalKey, str],
                  source_ranges: dict[PortalKey, tuple[str, ...]] | None = None) -> str:
    """An `ipset restore` payload that replaces every portal set at once (fill a copy, swap)."""
    members: dict[str, list[str]] = {name: [] for name in (*SETS, SET_FIREWALL,
                                                           SET_FIREWALL_SOURCES)}
    for (proto, ip, port), cls in sorted(classes.items()):
        entry = f"{ip},{proto.lower()}:{port}"
        for name in SETS:
            if cls in SET_MEMBERS[name]:
                members[name].append(entry)
    for (proto, ip, port), ranges in sorted((source_ranges or {}).items()):
        entry = f"{ip},{proto.lower()}:{port}"
        members[SET_FIREWALL].append(entry)
        members[SET_FIREWALL_SOURCES] += [f"{entry},{net}" for net in ipset_networks(ranges)]
    out: list[str] = []
    for name in members:
        new = f"{name}-NEW"
        kind = SET_TYPES.get(name, "hash:ip,port")
        spec = f"{kind} family inet hashsize {_hashsize(len(members[name]))} maxelem {SET_MAXELEM}"
        out += [f"create {name} {spec} -exist", f"create {new} {spec} -exist", f"flush {new}"]
        out += [f"add {new} {entry}" for entry in members[name]]
        out += [f"swap {new} {name}", f"destroy {new}"]
    return "\n".join(out) + "\n"


def _hashsize(n: int) -> int:
    size = 1024
    while size < n:
        size <<= 1
    return size


def render_chains(proxy_port: int, cluster_cidr: str | None) -> dict[tuple[str, str], list[str]]:
    """Our chains' rules, as iptables-restore lines: a fixed handful, whatever the Service count."""
    redirect = [
        f'-p {proto} -m set --match-set {SET_REDIRECT} dst,dst -m comment --comment '
        f'"redirect {proto.upper()} portals to the userspace proxy" -j REDIRECT --to-ports {proxy_port}'
        for proto in ("tcp", "udp")
    ]
    container = []
    if cluster_cidr:
        # externalTrafficPolicy: Local without a local endpoint: outside clients get nothing.
        container.append(
            f"-A {PORTALS_CONTAINER} ! -s {cluster_cidr} -m addrtype ! --src-type LOCAL"
            f" -m set --match-set {SET_EXTERNAL_LOCAL} dst,dst"
            ' -m comment --comment "no local endpoint for outside clients" -j RETURN'
        )
    # loadBalancerSourceRanges: a source outside them is not redirected (pods, outside
    # clients and the node itself alike; kube-proxy's KUBE-FW chain).
    firewall = (f"-m set --match-set {SET_FIREWALL} dst,dst"
                f" -m set ! --match-set {SET_FIREWALL_SOURCES} dst,dst,src"
                ' -m comment --comment "outside loadBalancerSourceRanges" -j RETURN')
    container += [f"-A {PORTALS_CONTAINER} {rule}" for rule in (firewall, *redirect)]
    host = [f"-A {PORTALS_HOST} {rule}" for rule in (firewall, *redirect)]
    refuse = [
        f"-A {PORTALS_FILTER} -m set --match-set {SET_REJECT} dst,dst"
        ' -m comment --comment "service has no endpoints"'
        " -j REJECT --reject-with icmp-port-unreachable",
        f"-A {PORTALS_FILTER} -m set --match-set {SET_DROP} dst,dst"
        ' -m comment --comment "service has no endpoints for this traffic" -j DROP',
        # Still addressed to a load-balancer portal with source ranges: not redirected above.
        f"-A {PORTALS_FILTER} -m set --match-set {SET_FIREWALL} dst,dst"
        ' -m comment --comment "load balancer source not allowed" -j DROP',
    ]
    return {("nat", PORTALS_CONTAINER): container, ("nat", PORTALS_HOST): host,
            ("filter", PORTALS_FILTER): refuse}


def _jump_spec(chain: str, new_only: bool) -> str:
    ct = "-m conntrack --ctstate NEW " if new_only else ""
    return f'{ct}-m comment --comment "{JUMP_COMMENT}" -j {chain}'


def render_rules(chains: dict[tuple[str, str], list[str]], saved: str | None) -> str:
    """iptables-restore --noflush text: our chains rewritten, jumps added where `saved` lacks them."""
    have = _jumps_in(saved) if saved is not None else set()
    out: list[str] = []
    for table in ("filter", "nat"):
        out.append(f"*{table}")
        ours = [c for t, c in CHAINS if t == table]
        out += [f":{c} - [0:0]" for c in ours]  # declaring a chain flushes it
        for c in ours:
            out += chains[(table, c)]
        for t, builtin, target, new_only in reversed(JUMPS):
            if t == table and (t, builtin, target) not in have:
                out.append(f"-I {builtin} 1 {_jump_spec(target, new_only)}")
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def rules_intact(chains: dict[tuple[str, str], list[str]], saved: str) -> bool:
    """True when `saved` (iptables-save) holds our chains exactly as rendered and every jump."""
    found: dict[tuple[str, str], list[str]] = {key: [] for key in chains}
    declared = set()
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            declared.add((table, line[1:].split(" ", 1)[0]))
        elif line.startswith("-A "):
            key = (table, line[3:].split(" ", 1)[0])
            if key in found:
                found[key].append(line)
    jumps = _jumps_in(saved)
    return (
        all(key in declared and found[key] == rules for key, rules in chains.items())
        and all((t, b, c) in jumps for t, b, c, _ in JUMPS)
    )


def _jumps_in(saved: str) -> set[tuple[str, str, str]]:
    found = set()
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            chain = line[3:].split(" ", 1)[0]
            target = line.rsplit(" -j ", 1)[-1].split(" ", 1)[0] if " -j " in line else ""
            if any(t == table and b == chain and c == target for t, b, c, _ in JUMPS):
                found.add((table, chain, target))
    return found


# --------------------------------------------------------------------------- node memory

# Where a portal's members go first and last: an allowed source is in place before the
# portal is firewalled, and the firewall goes before its sources.
_ADD_ORDER = {SET_FIREWALL_SOURCES: 0, SET_FIREWALL: 2}


def _portal_entry(portal: PortalKey) -> str:
    proto, ip, port = portal
    return f"{ip},{proto.lower()}:{port}"


class _Memory:
    """What the mode told one node's proxy and put in its portal sets, by Service port
    (ViewKey), kept exact by every sync (rebuilt from the view) and update (changed by
    the ports it touches): each port's portals with their classes and source ranges, and
    the winner of a portal several ports name (the last in the view's order, `Claims`),
    from which the sets' members follow. `expect` names the proxy table this memory
    matches: the proxy's pid and the number of tables and deltas it took."""

    def __init__(self, node_ips: tuple[str, ...]) -> None:
        self.node_ips = list(node_ips)
        self.views: dict[ViewKey, ServicePortView] = {}
        self.portals: dict[ViewKey, dict[PortalKey, str]] = {}
        self.fw: dict[ViewKey, dict[PortalKey, tuple[str, ...]]] = {}
        order = self._order
        self.classes = Claims(order)
        self.ranges = Claims(order)
        self.health: dict[ViewKey, ServicePortView] = {}
        self.expect: list = []

    def _order(self, vk: ViewKey):
        return view_order(self.views[vk])

    def place(self, vk: ViewKey, sp: ServicePortView, spec: dict[str, Any] | None,
              before: dict[PortalKey, frozenset] | None) -> None:
        """A port new (or changed, after `retract`): its portals offered. `before` collects
        the members each touched portal had (None: not kept, a sync)."""
        self.views[vk] = sp
        if sp.health_check_node_port is not None:
            self.health[vk] = sp
        if spec is None:
            return  # a protocol this mode skips
        offers = {portal: cls for portal, (_ext, cls) in spec_portals(spec, self.node_ips).items()}
        self.portals[vk] = offers
        claims = self.classes
        owner, won = claims.owner, claims.won
        for portal, cls in offers.items():
            if before is not None and portal not in before:
                before[portal] = self.members(portal)
            if portal in owner:
                claims.offer(portal, vk, cls)
            else:  # the common case, written out: no other port names it
                owner[portal] = vk
                won[portal] = cls
        fw = spec_source_ranges(spec)
        if fw:
            self.fw[vk] = fw
            for portal, ranges in fw.items():
                if before is not None and portal not in before:
                    before[portal] = self.members(portal)
                self.ranges.offer(portal, vk, ranges)

    def retract(self, vk: ViewKey, before: dict[PortalKey, frozenset]) -> None:
        self.health.pop(vk, None)
        for portal in self.portals.pop(vk, {}):
            if portal not in before:
                before[portal] = self.members(portal)
            self.classes.withdraw(portal, vk)
        for portal in self.fw.pop(vk, {}):
            if portal not in before:
                before[portal] = self.members(portal)
            self.ranges.withdraw(portal, vk)
        del self.views[vk]

    def members(self, portal: PortalKey) -> frozenset[tuple[str, str]]:
        """(set, member) pairs the portal puts in the portal sets now."""
        entry = _portal_entry(portal)
        out = set()
        cls = self.classes.won.get(portal)
        if cls is not None:
            out.update((name, entry) for name in SETS if cls in SET_MEMBERS[name])
        ranges = self.ranges.won.get(portal)
        if ranges:
            out.add((SET_FIREWALL, entry))
            out.update((SET_FIREWALL_SOURCES, f"{entry},{net}") for net in ipset_networks(ranges))
        return frozenset(out)

    def set_changes(self, before: dict[PortalKey, frozenset]) -> str:
        """An `ipset restore` payload of the members the touched portals gained and lost
        ("" when none): additions first (a firewall's sources before the firewall),
        removals after (the firewall before its sources)."""
        added, dropped = [], []
        for portal, was in before.items():
            now = self.members(portal)
            added += now - was
            dropped += was - now
        added.sort(key=lambda m: _ADD_ORDER.get(m[0], 1))
        dropped.sort(key=lambda m: -_ADD_ORDER.get(m[0], 1))
        lines = [f"add {name} {member} -exist" for name, member in added]
        lines += [f"del {name} {member} -exist" for name, member in dropped]
        return "\n".join(lines) + "\n" if lines else ""

    def health_view(self) -> _HealthView:
        return _HealthView(tuple(sorted(self.health.values(), key=view_order)))


class _HealthView:
    """The part of a NodeView dataplanes/healthcheck.py reads."""

    __slots__ = ("services",)

    def __init__(self, services: tuple[ServicePortView, ...]) -> None:
        self.services = services


# --------------------------------------------------------------------------- in the node
# These run on a thread inside the node's network namespace (NodeHandle.call).


def _control(payload: bytes, timeout: float) -> dict[str, Any]:
    """One JSON-line request on the abstract socket of the calling thread's namespace."""
    return request_json_line(CONTROL_NAME, payload, timeout, "the userspace proxy")


def _command(argv: list[str], input: str | None = None, check: bool = True) -> str:
    """Run a tool; forked from a thread in the node's namespace, it runs there (no `ip netns exec`:
    its mount namespace setup costs more than the tool itself)."""
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise DataplaneError(f"{argv[0]} exited {res.returncode}: "
                             f"{(res.stderr or res.stdout).strip()[:2000]}")
    return res.stdout


def _program(sets_payload: str, chains: dict[tuple[str, str], list[str]],
             flows: list[list]) -> dict[str, Any]:
    """One node's kernel side of a sync: portal sets, our chains when they differ, stale flows."""
    _command(["ipset", "restore"], sets_payload)
    saved = _command([IPTABLES_SAVE])
    rules = ""
    if not rules_intact(chains, saved):
        rules = render_rules(chains, saved)
        _command([IPTABLES_RESTORE, "--noflush"], rules)
    return {"rules": rules, "conntrack_deletes": _delete_udp_flows(flows)}


def _deliver(payload: bytes, sets_payload: str, timeout: float, settings: list
             ) -> tuple[dict[str, Any], int | str | None]:
    """One node's side of an update, on one thread in the node: the delta to the proxy;
    once it took it (and only then, so portals never point at entries it lacks), the
    portal sets' members that changed (one `ipset restore`) and the stale flows of UDP
    portals whose class changed. Returns (the proxy's reply, flows deleted; None when the
    proxy did not take the delta; the error when the sets refused)."""
    reply = _control(payload, timeout)
    if not reply.get("ok") or reply.get("settings") != settings:
        return reply, None
    try:
        if sets_payload:
            _command(["ipset", "restore"], sets_payload)
        return reply, _delete_udp_flows(reply.get("udp_changed", []))
    except DataplaneError as exc:
        return reply, str(exc)


def _delete_udp_flows(flows: list[list]) -> int:
    if len(flows) > CONNTRACK_DELETES_MAX:
        _command(["conntrack", "-D", "-p", "udp"], check=False)
        return 1
    for ip, port in flows:
        _command(["conntrack", "-D", "-p", "udp", "--orig-dst", ip,
                  "--orig-port-dst", str(port)], check=False)
    return len(flows)


def _read_state() -> dict[str, Any]:
    """The suite's portal sets (type and members; no hash sizes, which follow the member
    count a set was made for) and iptables rules (our chains in order, the jumps to them)."""
    sets: dict[str, Any] = {}
    ours = (*SETS, SET_FIREWALL, SET_FIREWALL_SOURCES)
    for line in _command(["ipset", "save"], check=False).splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in ours:
            if parts[0] == "create":
                sets.setdefault(parts[1], {"type": parts[2], "members": []})["type"] = parts[2]
            elif parts[0] == "add":
                sets.setdefault(parts[1], {"type": None, "members": []})["members"].append(
                    " ".join(parts[2:]))
    for entry in sets.values():
        entry["members"].sort()
    chains = {c for _t, c in CHAINS}
    rules: dict[str, list[str]] = {}
    table = ""
    for line in _command([IPTABLES_SAVE]).splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and line[1:].split(" ", 1)[0] in chains:
            rules.setdefault(table, []).append(line.rsplit(" ", 1)[0])  # no counters
        elif line.startswith("-A ") and (line[3:].split(" ", 1)[0] in chains or any(
                line.endswith(f"-j {c}") for c in chains)):
            rules.setdefault(table, []).append(line)
    return {"sets": sets, "rules": rules}


def _unprogram() -> None:
    """Remove our jumps, chains and sets from the node."""
    saved = _command([IPTABLES_SAVE])
    lines: list[str] = []
    for table in ("filter", "nat"):
        ours = [c for t, c in CHAINS if t == table and f"\n:{c} " in "\n" + saved]
        deletes = []
        current = ""
        for line in saved.splitlines():
            if line.startswith("*"):
                current = line[1:].strip()
            elif current == table and line.startswith("-A ") and any(
                line.endswith(f"-j {c}") for t, c in CHAINS if t == table
            ):
                deletes.append("-D " + line[3:])
        if ours or deletes:
            lines += [f"*{table}", *deletes, *(f":{c} - [0:0]" for c in ours),
                      *(f"-X {c}" for c in ours), "COMMIT"]
    if lines:
        _command([IPTABLES_RESTORE, "--noflush"], "\n".join(lines) + "\n")
    present = set(_command(["ipset", "list", "-n"], check=False).split())
    for name in (*SETS, SET_FIREWALL, SET_FIREWALL_SOURCES):
        for victim in (name, f"{name}-NEW"):
            if victim in present:
                _command(["ipset", "destroy", victim], check=False)


def _spawn(argv: list[str], log_path: str) -> subprocess.Popen:
    """Start the proxy; forked from a thread in the node's namespace, it is born there."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, close_fds=True)


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# --------------------------------------------------------------------------- the data plane


class UserspaceDataplane:
    name = "userspace"
    deviations = DEVIATIONS

    def __init__(self, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 udp_idle_timeout_s: float = UDP_IDLE_TIMEOUT_S,
                 proxy_port: int = PROXY_PORT, balancing: str = "rr") -> None:
        if balancing not in BALANCING:
            raise ValueError(f"userspace balancing {balancing!r}: use one of "
                             f"{', '.join(BALANCING)}")
        self.balancing = balancing  # how the proxy picks a backend: "rr" or "random"
        self.connect_timeout_s = float(connect_timeout_s)
        self.udp_idle_timeout_s = float(udp_idle_timeout_s)
        self.proxy_port = int(proxy_port)
        self._memory: dict[str, _Memory] = {}  # by node netns: what update builds on

    # ------------------------------------------------------------------ protocol

    def missing(self, host: Host) -> list[str]:
        out = [
            f"{cmd} not found (apt-get install {pkg})"
            for cmd, pkg in ((IPTABLES, "iptables"), (IPTABLES_SAVE, "iptables"),
                             (IPTABLES_RESTORE, "iptables"), ("ipset", "ipset"))
            if not host.which(cmd)
        ]
        if not host.which("conntrack"):
            out.append("conntrack not found (apt-get install conntrack): stale UDP flows are not cleared")
        try:
            import uvloop  # noqa: F401
        except ImportError:
            out.append("python module uvloop not found (apt-get install python3-uvloop, "
                       "or pip install uvloop): the proxy runs on uvloop")
        if host.has_proc("/proc/config.gz"):
            for option in ("CONFIG_NF_NAT_REDIRECT", "CONFIG_NETFILTER_XT_TARGET_REDIRECT",
                           "CONFIG_NETFILTER_XT_SET", "CONFIG_IP_SET_HASH_IPPORT",
                           "CONFIG_NF_CT_NETLINK", "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE",
                           "CONFIG_IP_NF_TARGET_REJECT"):
                if host.kernel_config(option) is None:
                    out.append(f"kernel {host.kernel} lacks {option} (userspace mode needs it)")
        return out

    def render(self, view: NodeView) -> str:
        """What a sync writes: the ipsets, the rules and the proxy's table."""
        message = table_message(view)
        classes = portal_classes(message["services"], view.node_ips)
        ranges = portal_source_ranges(message["services"])
        rules = render_rules(render_chains(self.proxy_port, view.cluster_cidr), None)
        return ("# ipset restore\n" + render_ipsets(classes, ranges)
                + "# iptables-restore --noflush\n" + rules
                + "# proxy table\n" + json.dumps(message, indent=1) + "\n")

    def install(self, node: NodeHandle) -> None:
        self._memory.pop(node.netns, None)
        healthcheck.install(node)
        self._ensure_proxy(node)
        node.call(_program, render_ipsets({}), render_chains(self.proxy_port, None), [])

    def sync(self, node: NodeHandle, view: NodeView) -> SyncStats:
        start = time.perf_counter()
        self._memory.pop(node.netns, None)  # kept again once the node follows the view
        specs = [None if sp.protocol in SKIPPED_PROTOCOLS else _service(sp)
                 for sp in view.services]
        message = {"op": "table", "node": view.node, "node_ips": list(view.node_ips),
                   "cluster_cidr": view.cluster_cidr,
                   "services": [spec for spec in specs if spec is not None]}
        payload = json.dumps(message, separators=(",", ":")).encode()
        spawned = False
        try:
            reply = node.call(_control, payload, CONTROL_TIMEOUT_S)
        except OSError:
            reply = {}
        if reply.get("settings") != self._settings():
            # No proxy answers (never installed, killed, or its node restarted), or one
            # started with another port or timeouts: (re)start it.
            self._ensure_proxy(node)
            spawned = True
            reply = node.call(_control, payload, CONTROL_TIMEOUT_S)
        if not reply.get("ok"):
            raise DataplaneError(f"userspace proxy on {node.name} refused the table: "
                                 f"{reply.get('error', reply)}")
        table_s = time.perf_counter() - start
        # Portals change only after the proxy knows the new table; the memory of the node
        # (from which they follow) is made while nothing waits for it.
        memory = _Memory(view.node_ips)
        collecting = gc.isenabled()
        gc.disable()  # acyclic memory: the collector's scans of a large heap only cost
        try:
            for sp, spec in zip(view.services, specs, strict=True):
                memory.place((sp.namespace, sp.service, sp.port_name, sp.protocol, sp.port), sp,
                             spec, None)
        finally:
            if collecting:
                gc.enable()
        classes = memory.classes.won
        sets_payload = render_ipsets(classes, memory.ranges.won)
        chains = render_chains(self.proxy_port, view.cluster_cidr)
        udp_changed = reply.get("udp_changed", [])
        try:
            done = node.call(_program, sets_payload, chains, udp_changed)
        except DataplaneError as exc:
            raise DataplaneError(f"userspace mode on {node.name}: {exc}") from None
        counts = dict.fromkeys((REDIRECT, EXTERNAL_LOCAL, DROP, REJECT), 0)
        for cls in classes.values():
            counts[cls] += 1
        healthcheck.sync(node, memory.health_view())
        memory.expect = [reply.get("pid"), reply.get("tables")]
        self._memory[node.netns] = memory
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - start,
            full=True,  # the proxy always gets the whole table
            services=len(view.services),
            rules=sum(len(rules) for rules in chains.values()) + len(JUMPS),
            payload_bytes=len(payload) + len(sets_payload) + len(done["rules"]),
            changed=len(udp_changed),
            extra={
                "portals": len(classes),
                **{f"portals_{cls.replace('-', '_')}": n for cls, n in counts.items()},
                "rules_rewritten": bool(done["rules"]),
                "table_s": round(table_s, 6),
                "proxy_apply_s": reply.get("seconds"),
                "proxy_spawned": spawned,
                "udp_sessions_closed": reply.get("udp_sessions_closed", 0),
                "conntrack_deletes": done["conntrack_deletes"],
            },
        )

    def update(self, node: NodeHandle, changes: NodeChanges) -> SyncStats:
        """Apply one node's changed and removed Service ports: the proxy gets only their
        table entries (a delta it applies in place), the portal sets only the members
        those ports' portals gained or lost (one `ipset restore`, none when no portal
        changed class), and UDP portals whose class changed lose their flows. The rules
        stay: they are a fixed handful, whatever the Services.

        Raises FullSyncNeeded when there is no memory of the node (never synced by this
        object, or an earlier update failed), when the proxy is gone or its table is not
        the one this memory matches (restarted, or fed by another process), or when the
        sets refuse the change (someone destroyed them). Rules or set members someone
        else removed are not looked for (that would read them all back): the next sync
        rewrites them."""
        start = time.perf_counter()
        memory = self._memory.pop(node.netns, None)  # back only once the node follows it
        if memory is None:
            raise FullSyncNeeded(f"userspace has no memory of {node.name}")
        before: dict[PortalKey, frozenset] = {}
        specs, removed = [], []
        health = False
        for vk, old in changes.removed.items():
            if vk in memory.views:
                health |= vk in memory.health
                memory.retract(vk, before)
                if old.protocol not in SKIPPED_PROTOCOLS:
                    removed.append([old.name, old.protocol])
        for vk, sp in changes.updated.items():
            if vk in memory.views:
                health |= vk in memory.health
                memory.retract(vk, before)
            spec = None if sp.protocol in SKIPPED_PROTOCOLS else _service(sp)
            memory.place(vk, sp, spec, before)
            health |= sp.health_check_node_port is not None
            if spec is not None:
                specs.append(spec)
        payload = json.dumps({"op": "delta", "expect": memory.expect, "services": specs,
                              "removed": removed}, separators=(",", ":")).encode()
        sets_payload = memory.set_changes(before)
        try:
            reply, deleted = node.call(_deliver, payload, sets_payload, CONTROL_TIMEOUT_S,
                                       self._settings())
        except OSError as exc:
            raise FullSyncNeeded(f"userspace proxy on {node.name}: {exc}") from None
        if reply.get("stale"):
            raise FullSyncNeeded(f"userspace proxy on {node.name} holds another table: "
                                 f"{reply.get('error')}")
        if not reply.get("ok"):
            raise DataplaneError(f"userspace proxy on {node.name} refused the delta: "
                                 f"{reply.get('error', reply)}")
        if reply.get("settings") != self._settings():
            raise FullSyncNeeded(f"userspace proxy on {node.name} runs with other settings")
        if isinstance(deleted, str):  # someone destroyed the sets: a sync makes them again
            raise FullSyncNeeded(f"userspace mode on {node.name}: {deleted}")
        memory.expect = [reply["pid"], reply["tables"]]
        if health:
            healthcheck.sync(node, memory.health_view())
        self._memory[node.netns] = memory
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - start,
            full=False,
            services=len(memory.views),
            rules=len(specs) + len(removed),
            payload_bytes=len(payload) + len(sets_payload),
            changed=sets_payload.count("\n"),
            extra={"proxy_apply_s": reply.get("seconds"), "conntrack_deletes": deleted,
                   "udp_sessions_closed": reply.get("udp_sessions_closed", 0)},
        )

    def kernel_state(self, node: NodeHandle) -> dict[str, Any]:
        """The node as the proxy and the kernel hold it, normalised: the proxy's table as
        it reports it (entries with sorted endpoints per traffic kind and affinity; each
        portal's entry, kind and class), the portal sets' members, our chains and jumps,
        and the health server's ports. The proxy listens on one port this data plane
        configures (the REDIRECT target), never one it chose, so a restart compares equal;
        rotation, affinity state, counters and pids are left out."""
        try:
            dump = self._request(node, {"op": "dump"}, timeout=CONTROL_TIMEOUT_S)
        except (OSError, DataplaneError):
            dump = None
        state: dict[str, Any] = {"proxy": None}
        if dump is not None:
            services = sorted(
                ({**e, **{k: sorted(e[k]) for k in ("internal", "external", "cluster")}}
                 for e in dump["services"]), key=lambda e: (e["name"], e["protocol"]))
            state["proxy"] = {"settings": dump["settings"], "node_ips": dump["node_ips"],
                              "services": services, "portals": sorted(dump["portals"])}
        state.update(node.call(_read_state))
        health = healthcheck.status(node)
        state["health_ports"] = health.get("ports") if health else None
        return state

    def uninstall(self, node: NodeHandle) -> None:
        self._memory.pop(node.netns, None)
        healthcheck.uninstall(node)
        self._stop_proxy(node)
        try:
            node.call(_unprogram)
        except DataplaneError as exc:
            raise DataplaneError(f"userspace mode on {node.name}: {exc}") from None
        try:
            os.unlink(self._log_path(node))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ beyond the protocol

    def stats(self, node: NodeHandle, services: bool = False) -> dict[str, Any]:
        """The proxy's counters: connections, UDP sessions, retries, failures (per Service port
        with services=True, keyed "ns/svc:port/PROTO"), its pid and CPU seconds."""
        return self._request(node, {"op": "stats", "services": services})

    def summary(self, node: NodeHandle) -> dict[str, Any]:
        """For `svcbench status`: the proxy's settings, whether it answers (pid, tables and
        Service ports it holds, its counters), the portal sets' member counts and our
        iptables rules, and the health server."""
        try:
            stats = self._request(node, {"op": "stats"}, timeout=2.0)
            ping = self._request(node, {"op": "ping"}, timeout=2.0)
            proxy: dict[str, Any] = {
                "running": True, "pid": stats["pid"], "tables": stats["tables"],
                "services": stats["services"], "loop": ping.get("loop"),
                **{k: stats[k] for k in ("connections", "sessions", "retries", "failed",
                                         "active", "unknown", "udp_sessions", "cpu_s")}}
        except (OSError, DataplaneError) as exc:
            proxy = {"running": False, "error": str(exc)}
        state = node.call(_read_state)
        return {
            "options": {"proxy_port": self.proxy_port,
                        "connect_timeout_s": self.connect_timeout_s,
                        "udp_idle_timeout_s": self.udp_idle_timeout_s},
            "proxy": proxy,
            "ipsets": len(state["sets"]),
            "ipset_members": sum(len(s["members"]) for s in state["sets"].values()),
            "rules": sum(1 for rules in state["rules"].values() for r in rules
                         if r.startswith("-A ")),
            "chains": sum(1 for rules in state["rules"].values() for r in rules
                          if r.startswith(":")),
            "health_server": healthcheck.summary(node),
        }

    def drop_reporter(self, node: NodeHandle) -> ProxyRefusals | None:
        """The connections and flows the node's proxy refuses from now on, as `svcbench
        monitor --type drop` shows them (see dataplanes/base.py); None when no proxy answers.
        What the kernel drops for it (the ipset drops of Local policies and source ranges)
        the kfree_skb monitor sees."""
        try:
            first = self._request(node, {"op": "events", "after": None}, timeout=2.0)
        except (OSError, DataplaneError):
            return None
        return ProxyRefusals(self, node, first["seq"])

    def proxy_pid(self, node: NodeHandle) -> int | None:
        try:
            return self._request(node, {"op": "ping"}, timeout=2.0).get("pid")
        except (OSError, DataplaneError):
            return None

    # ------------------------------------------------------------------ pieces

    def _request(self, node: NodeHandle, request: dict[str, Any],
                 timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        reply = node.call(_control, json.dumps(request).encode(), timeout)
        if not reply.get("ok"):
            raise DataplaneError(f"userspace proxy on {node.name}: {reply.get('error', reply)}")
        return reply

    def _log_path(self, node: NodeHandle) -> str:
        # A node that names its run's folder keeps the log there, removed with the run.
        run_dir = getattr(node, "run_dir", None)
        if run_dir:
            return os.path.join(run_dir, f"userspace-{node.name}.log")
        return os.path.join(LOG_DIR, f"{node.netns.rsplit('/', 1)[-1]}.log")

    def _settings(self) -> list:
        return [self.proxy_port, self.connect_timeout_s, self.udp_idle_timeout_s, self.balancing]

    def _ensure_proxy(self, node: NodeHandle) -> int:
        """The pid of the node's proxy, started when none answers with our settings."""
        try:
            ping = self._request(node, {"op": "ping"}, timeout=2.0)
        except (OSError, DataplaneError):
            ping = {}
        if ping.get("settings") == self._settings():
            return ping["pid"]
        if ping:
            self._stop_proxy(node)
        log_path = self._log_path(node)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        sweep_logs(LOG_DIR)
        argv = [sys.executable, "-m", "dataplanes.userspace_proxy",
                "--port", str(self.proxy_port),
                "--netns", node.netns,
                "--connect-timeout", str(self.connect_timeout_s),
                "--udp-idle-timeout", str(self.udp_idle_timeout_s),
                "--balancing", self.balancing]
        proc = node.call(_spawn, argv, log_path)
        # Reap it whenever it exits, so it never lingers as a zombie of this process.
        threading.Thread(target=proc.wait, name=f"reap:userspace:{node.name}", daemon=True).start()
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DataplaneError(
                    f"userspace proxy on {node.name} exited with status {proc.returncode} before "
                    f"answering; {log_path} ends with:\n{log_tail(log_path)}")
            if self.proxy_pid(node) == proc.pid:
                return proc.pid
            time.sleep(0.02)
        proc.kill()
        raise DataplaneError(f"userspace proxy on {node.name} did not answer within "
                             f"{SPAWN_TIMEOUT_S:.0f} s; {log_path} ends with:\n{log_tail(log_path)}")

    def _stop_proxy(self, node: NodeHandle) -> None:
        pid = self.proxy_pid(node)
        if pid is None:
            return
        try:
            self._request(node, {"op": "stop"}, timeout=STOP_TIMEOUT_S)
        except (OSError, DataplaneError):
            pass  # killed below
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _alive(pid):
            os.kill(pid, 9)


class ProxyRefusals:
    """Polls a node's proxy for the refusals numbered after the last one seen."""

    def __init__(self, dp: UserspaceDataplane, node: NodeHandle, seq: int) -> None:
        self._dp, self._node, self._seq = dp, node, seq

    def take(self) -> list[dict[str, Any]]:
        """The refusals since the last take, as monitor rows (reason "PROXY:NAME", the
        Service port the proxy served); [] while the proxy does not answer."""
        try:
            reply = self._dp._request(self._node, {"op": "events", "after": self._seq},
                                      timeout=2.0)
        except (OSError, DataplaneError):
            return []
        if reply["seq"] < self._seq:  # a new proxy process: its numbers start again
            self._seq = 0
            return self.take()
        self._seq = reply["seq"]
        return [{"time": e["time"], "reason": e["reason"], "location": "userspace proxy",
                 "ifindex": 0, "protocol": e["protocol"], "src": e["src"],
                 "dst": e["dst"], "sport": e["sport"], "dport": e["dport"], "tcp_flags": "",
                 "proxy_service": e["service"]} for e in reply["events"]]

    def close(self) -> None:
        pass
