"""`svcbench service list`: one node's Service frontends as its kernel (or the userspace
proxy) holds them, in one row shape for every mode, and the same rows rendered from the
node's intended view, so that the two can be compared (`--check`).

A row is one frontend: its kind (ClusterIP, NodePort, ExternalIP, LoadBalancer,
HealthCheckNodePort), `address:port/PROTOCOL` (a NodePort once per address the node answers
it on), the Service port (`ns/name:port`), where that name came from (`kernel`: the mode's
own objects say it, as kube-proxy's rule comments or the userspace proxy's table do;
`view`: the kernel objects do not name Services, so the frontend was looked up by address
in the node's intended view), the backends outside clients (or, for a ClusterIP, every
client) get, the ClientIP affinity timeout, the load-balancer source ranges, what traffic
meets when there is no backend for it (`drop` / `reject`), and the mode's own objects
(chains, nft sets and map elements, IPVS virtual servers, BPF map keys, proxy portals).

Readers take a mode's `kernel_state(node)` (its normalised read-back) or, for ebpf, the map
rows of `dataplanes/ebpf.service_list`; the view is used only for the node's addresses, and
to name what the kernel does not (column `service_from`).

Normalisation, so that equal forwarding compares equal: source ranges are collapsed
networks, without the load-balancer IP itself (kube-proxy lets it through, for hairpin
traffic from the node); backends are compared by address; for external frontends the
short circuit that pods and the node take to the cluster-wide endpoints is not a row of its
own (the objects column names it where the mode holds it apart).
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kube.state import NodeView, ServicePortView

CLUSTER_IP, NODE_PORT, EXTERNAL_IP, LOAD_BALANCER, HEALTH_CHECK = (
    "ClusterIP", "NodePort", "ExternalIP", "LoadBalancer", "HealthCheckNodePort")
KINDS = (CLUSTER_IP, NODE_PORT, EXTERNAL_IP, LOAD_BALANCER, HEALTH_CHECK)
FROM_KERNEL, FROM_VIEW, UNKNOWN = "kernel", "view", "-"


@dataclass
class Backend:
    address: str  # "ip:port"
    local: bool | None = None  # on this node; None where the mode does not show it
    state: str | None = None  # "ready" / "terminating" where the mode shows it
    weight: int | None = None  # IPVS real server weight


@dataclass
class Row:
    frontend: str  # "198.19.0.1:80/TCP"
    kind: str = "?"
    service: str = ""  # "ns/name:port"
    service_from: str = UNKNOWN  # FROM_KERNEL, FROM_VIEW or UNKNOWN
    backends: list[Backend] = field(default_factory=list)
    affinity_timeout_s: int | None = None
    source_ranges: list[str] = field(default_factory=list)
    no_endpoints: str | None = None  # "drop" / "reject": what traffic gets without a backend
    objects: list[str] = field(default_factory=list)
    local_endpoints: int | None = None  # health-check NodePorts: what the server reports

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def addresses(self) -> list[str]:
        return sorted({b.address for b in self.backends})


def frontend(ip: str, port: int, protocol: str) -> str:
    return f"{ip}:{port}/{protocol.upper()}"


def ranges(nets: Iterable[str], own_ip: str | None = None) -> list[str]:
    """Source networks collapsed, sorted; `own_ip`/32 (the LB IP itself) left out."""
    parsed = []
    for net in nets:
        n = ipaddress.ip_network(net, strict=False)
        if own_ip is not None and n == ipaddress.ip_network(f"{own_ip}/32"):
            continue
        parsed.append(n)
    return [str(n) for n in ipaddress.collapse_addresses(parsed)]


# --------------------------------------------------------------------------- intended


def _backends(endpoints) -> list[Backend]:
    return [Backend(e.addr, e.local, "ready" if e.ready else
                    "terminating" if e.serving and e.terminating else "not serving")
            for e in endpoints]


def intended_rows(view: NodeView, skipped: Iterable[str] = ()) -> list[Row]:
    """The node's view rendered as rows: what its kernel should hold. `skipped`: protocols
    the mode does not program (its SKIPPED_PROTOCOLS)."""
    skipped = set(skipped)
    rows: dict[str, Row] = {}

    def add(kind: str, ip: str, port: int, sp: ServicePortView, external: bool,
            source_ranges: Iterable[str] = ()) -> None:
        key = frontend(ip, port, sp.protocol)
        rows.setdefault(key, Row(
            key, kind, sp.name, FROM_VIEW,
            _backends(sp.external_endpoints if external else sp.internal_endpoints),
            sp.affinity_timeout_s, ranges(source_ranges, ip),
            sp.external_traffic_filter if external else sp.internal_traffic_filter))

    health: dict[int, Row] = {}
    for sp in view.services:
        if sp.protocol in skipped:
            continue
        if sp.cluster_ip:
            add(CLUSTER_IP, sp.cluster_ip, sp.port, sp, False)
        for ip in sp.external_ips:
            add(EXTERNAL_IP, ip, sp.port, sp, True)
        for ip in sp.load_balancer_ips:
            add(LOAD_BALANCER, ip, sp.port, sp, True, sp.load_balancer_source_ranges)
        if sp.node_port is not None:
            for ip in view.node_ips:
                add(NODE_PORT, ip, sp.node_port, sp, True)
        if sp.health_check_node_port is not None:
            health.setdefault(sp.health_check_node_port, Row(
                frontend("*", sp.health_check_node_port, "TCP"), HEALTH_CHECK,
                f"{sp.namespace}/{sp.service}", FROM_VIEW,
                local_endpoints=sp.health_check_local_endpoints))
    return sorted([*rows.values(), *health.values()], key=row_order)


def row_order(row: Row) -> tuple:
    ip, _, rest = row.frontend.partition(":")
    port, _, proto = rest.partition("/")
    try:
        addr = int(ipaddress.ip_address(ip))
    except ValueError:
        addr = -1
    return (KINDS.index(row.kind) if row.kind in KINDS else len(KINDS), addr, int(port), proto)


# --------------------------------------------------------------------------- naming


class Namer:
    """Kind and Service of a frontend from the intended view, for what the kernel does not
    name (marked FROM_VIEW)."""

    def __init__(self, view: NodeView | None) -> None:
        self.by_frontend: dict[str, tuple[str, str]] = {}
        if view is not None:
            for row in intended_rows(view):
                self.by_frontend[row.frontend] = (row.kind, row.service)

    def fill(self, row: Row) -> None:
        known = self.by_frontend.get(row.frontend)
        if row.kind == "?" and known:
            row.kind = known[0]
        if not row.service:
            if known:
                row.service, row.service_from = known[1], FROM_VIEW
            else:
                row.service, row.service_from = "", UNKNOWN


def _health_rows(node) -> list[Row]:
    """Health-check NodePorts as the node's health server (every mode runs one) reports
    them: port -> [namespace, name, local endpoints]."""
    from dataplanes import healthcheck

    status = healthcheck.status(node) or {}
    out = []
    for port, (ns, name, count) in sorted((status.get("ports") or {}).items()):
        out.append(Row(frontend("*", int(port), "TCP"), HEALTH_CHECK, f"{ns}/{name}", FROM_KERNEL,
                       objects=[f"health server :{port}"], local_endpoints=count))
    return out


# --------------------------------------------------------------------------- iptables


def _opts(rule: str) -> dict[str, str]:
    """An iptables-save rule's options (the last value of each), '!' kept as '!-s' etc."""
    words = shlex.split(rule)
    out: dict[str, str] = {}
    negate = False
    i = 0
    while i < len(words):
        w = words[i]
        if w == "!":
            negate = True
        elif w.startswith("-"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("-") \
                else ""
            out[("!" if negate else "") + w] = value
            negate = False
            if value:
                i += 1
        i += 1
    return out


def _ipt_kind(comment: str) -> str | None:
    for suffix, kind in ((" cluster IP", CLUSTER_IP), (" external IP", EXTERNAL_IP),
                         (" loadbalancer IP", LOAD_BALANCER)):
        if comment.endswith(suffix):
            return kind
    return None


def iptables_rows(state: dict[str, Any], view: NodeView | None) -> list[Row]:
    """kube-proxy's iptables layout read back: KUBE-SERVICES and KUBE-NODEPORTS frontends,
    followed through KUBE-FW-* (source ranges), KUBE-EXT-* (the last, unconditional jump is
    what outside clients get) to KUBE-SVC-* / KUBE-SVL-* and their KUBE-SEP-* DNATs; the
    filter table's REJECT/DROP rules for frontends without endpoints."""
    nat: dict[str, list[str]] = state.get("nat", {})
    filt: dict[str, list[str]] = state.get("filter", {})
    node_ips = tuple(view.node_ips) if view is not None else ()
    rows: dict[str, Row] = {}

    def row(key: str) -> Row:
        return rows.setdefault(key, Row(key))

    def sep_dest(chain: str) -> str:
        for r in nat.get(chain, []):
            o = _opts(r)
            if o.get("-j") == "DNAT":
                return o.get("--to-destination", "?")
        return "?"

    def endpoints(r: Row, chain: str) -> None:
        r.objects.append(chain)
        local = True if chain.startswith("KUBE-SVL-") else None
        for rule in nat.get(chain, []):
            o = _opts(rule)
            target = o.get("-j", "")
            if not target.startswith("KUBE-SEP-"):
                continue
            if "--rcheck" in o:
                r.affinity_timeout_s = int(o.get("--seconds", "0"))
                continue
            if any(b.address == sep_dest(target) for b in r.backends):
                continue
            r.backends.append(Backend(sep_dest(target), local))

    def follow(r: Row, chain: str) -> None:
        if chain.startswith(("KUBE-SVC-", "KUBE-SVL-")):
            endpoints(r, chain)
        elif chain.startswith("KUBE-EXT-"):
            r.objects.append(chain)
            rules = nat.get(chain, [])
            last = _opts(rules[-1]) if rules else {}
            conditional = any(k in last for k in ("-s", "!-s", "--src-type"))
            if last.get("-j", "").startswith(("KUBE-SVC-", "KUBE-SVL-")) and not conditional:
                endpoints(r, last["-j"])
        elif chain.startswith("KUBE-FW-"):
            r.objects.append(chain)
            own = r.frontend.partition(":")[0]
            nets, ext = [], None
            for rule in nat.get(chain, []):
                o = _opts(rule)
                if "-s" in o and o.get("-j", "").startswith("KUBE-EXT-"):
                    nets.append(o["-s"])
                    ext = o["-j"]
                elif o.get("-j", "").startswith("KUBE-EXT-"):
                    ext = o["-j"]  # no -s: every source (iptables-save omits 0.0.0.0/0)
                    nets.append("0.0.0.0/0")
            r.source_ranges = ranges(nets, own)
            if ext:
                follow(r, ext)

    for rule in nat.get("KUBE-SERVICES", []):
        o = _opts(rule)
        if "-d" not in o or "--dport" not in o:
            continue
        ip = o["-d"].removesuffix("/32")
        comment = o.get("--comment", "")
        r = row(frontend(ip, int(o["--dport"]), o.get("-p", "tcp")))
        r.kind = _ipt_kind(comment) or r.kind
        r.service, r.service_from = comment.split(" ")[0], FROM_KERNEL
        follow(r, o.get("-j", ""))
    for rule in nat.get("KUBE-NODEPORTS", []):
        o = _opts(rule)
        if "--dport" not in o:
            continue
        for ip in node_ips:
            r = row(frontend(ip, int(o["--dport"]), o.get("-p", "tcp")))
            r.kind = NODE_PORT
            r.service, r.service_from = o.get("--comment", "").split(" ")[0], FROM_KERNEL
            follow(r, o.get("-j", ""))
    for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"):
        for rule in filt.get(chain, []):
            o = _opts(rule)
            verdict = o.get("-j", "")
            if verdict not in ("DROP", "REJECT") or "--dport" not in o:
                continue
            proto = o.get("-p", "tcp")
            if "-d" in o:
                keys = [frontend(o["-d"].removesuffix("/32"), int(o["--dport"]), proto)]
            else:  # -m addrtype --dst-type LOCAL: a NodePort
                keys = [frontend(ip, int(o["--dport"]), proto) for ip in node_ips]
            for key in keys:
                r = row(key)
                r.no_endpoints = verdict.lower()
                r.objects.append(f"filter {chain} {verdict}")
                if not r.service:
                    r.service, r.service_from = o.get("--comment", "").split(" ")[0], FROM_KERNEL
                if "-d" not in o:
                    r.kind = NODE_PORT
    return list(rows.values())


# --------------------------------------------------------------------------- nftables


def _nft_value(text: str) -> Any:
    return json.loads(text) if isinstance(text, str) else text


def _nft_flat(value: Any) -> list[Any]:
    if isinstance(value, dict) and "concat" in value:
        return [p for v in value["concat"] for p in _nft_flat(v)]
    if isinstance(value, list):
        return [p for v in value for p in _nft_flat(v)]
    if isinstance(value, dict) and "prefix" in value:
        return [f"{value['prefix']['addr']}/{value['prefix']['len']}"]
    return [value]


def nftables_rows(state: dict[str, Any], view: NodeView | None) -> list[Row]:
    """The nftables mode's table read back (see nftlayout): each class's set names its
    frontends (`cluster-ip-tcp-3`, `external-ip-...`, `node-port-...`, affinity in the
    name), its endpoint map gives their slots (slots from SHORT_CIRCUIT_BASE up are the
    cluster-wide set pods and the node use); the no-endpoint sets give drop/reject, the
    firewall sets the source ranges. nft elements do not name Services: they come from
    the view."""
    from dataplanes.nftlayout import SHORT_CIRCUIT_BASE

    sets: dict[str, dict] = state.get("sets") or {}
    node_ips = tuple(view.node_ips) if view is not None else ()
    rows: dict[str, Row] = {}

    def row(key: str) -> Row:
        return rows.setdefault(key, Row(key))

    def keys_of(path: str, proto: str, parts: list[Any]) -> list[str]:
        if path == "node-port":
            return [frontend(ip, int(parts[0]), proto) for ip in node_ips]
        return [frontend(parts[0], int(parts[1]), proto)]

    for name, s in sets.items():
        for path in ("cluster-ip", "external-ip", "node-port"):
            if not name.startswith(path + "-") or name.endswith("-endpoints"):
                continue
            proto = name[len(path) + 1:].split("-")[0].upper()
            affinity = None
            if "-affinity-" in name:
                affinity = int(name.rsplit("-affinity-", 1)[1])
            for element in s.get("elements", []):
                for key in keys_of(path, proto, _nft_flat(_nft_value(element))):
                    r = row(key)
                    r.kind = {"cluster-ip": CLUSTER_IP, "node-port": NODE_PORT}.get(path, r.kind)
                    r.affinity_timeout_s = affinity
                    r.objects.insert(0, f"class {name}")
            emap = sets.get(name + "-endpoints", {})
            for group in emap.get("elements", []):
                base_key, slots, endpoints = group
                parts = _nft_flat(_nft_value(base_key))
                base = int(parts[-1])
                for key in keys_of(path, proto, parts[:-1]):
                    r = row(key)
                    span = f"{base + min(slots)}-{base + max(slots)}" if slots else "none"
                    if base >= SHORT_CIRCUIT_BASE:
                        r.objects.append(f"slots {span} (pods, node)")
                        continue
                    r.objects.append(f"slots {span}")
                    for ep in endpoints:
                        ip, port = _nft_flat(_nft_value(ep))
                        r.backends.append(Backend(f"{ip}:{port}"))
    for verdict in ("drop", "reject"):
        for element in sets.get(f"no-endpoint-services-{verdict}", {}).get("elements", []):
            ip, proto, port = _nft_flat(_nft_value(element))
            r = row(frontend(ip, int(port), proto))
            r.no_endpoints = verdict
            r.objects.append(f"set no-endpoint-services-{verdict}")
        for element in sets.get(f"no-endpoint-nodeports-{verdict}", {}).get("elements", []):
            proto, port = _nft_flat(_nft_value(element))
            for ip in node_ips:
                r = row(frontend(ip, int(port), proto))
                r.kind, r.no_endpoints = NODE_PORT, verdict
                r.objects.append(f"set no-endpoint-nodeports-{verdict}")
    firewalled: dict[str, list[str]] = {}
    for element in sets.get("firewall-ips", {}).get("elements", []):
        ip, proto, port = _nft_flat(_nft_value(element))
        firewalled[frontend(ip, int(port), proto)] = []
    for element in sets.get("firewall-sources", {}).get("elements", []):
        parts = _nft_flat(_nft_value(element))
        ip, proto, port, source = parts[:4]
        firewalled.setdefault(frontend(ip, int(port), proto), []).append(str(source))
    for key, nets in firewalled.items():
        r = row(key)
        r.kind = LOAD_BALANCER
        r.source_ranges = ranges(nets, key.partition(":")[0])
        r.objects.append("firewall-ips, firewall-sources")
    return list(rows.values())


# --------------------------------------------------------------------------- ipvs


def _member(text: str) -> tuple[str, str, int, str | None]:
    """'198.19.0.1,tcp:80[,extra]' -> (ip, PROTO, port, extra)."""
    ip, rest = text.split(",", 1)
    proto_port, _, extra = rest.partition(",")
    proto, _, port = proto_port.partition(":")
    return ip, proto.upper(), int(port), extra or None


def ipvs_rows(state: dict[str, Any], view: NodeView | None) -> list[Row]:
    """IPVS read back: one row per virtual server (`TCP 198.19.0.1:80 rr`, persistence as
    affinity, real servers with weights); kind from kube-proxy's ipsets (KUBE-CLUSTER-IP,
    KUBE-EXTERNAL-IP[-LOCAL], KUBE-LOAD-BALANCER, KUBE-NODE-PORT-*); no endpoints: a
    virtual server without real servers answers port unreachable (reject), the
    KUBE-DROP-* sets drop (an external frontend's real servers are then the short circuit
    of pods and the node, not backends of outside clients); source ranges from
    KUBE-LOAD-BALANCER-SOURCE-CIDR. Virtual servers do not name Services: from the view."""
    sets: dict[str, list[str]] = state.get("ipsets") or {}
    rows: dict[str, Row] = {}

    def row(key: str) -> Row:
        return rows.setdefault(key, Row(key))

    kinds: dict[str, str] = {}
    for name, kind in (("KUBE-CLUSTER-IP", CLUSTER_IP), ("KUBE-EXTERNAL-IP", EXTERNAL_IP),
                       ("KUBE-EXTERNAL-IP-LOCAL", EXTERNAL_IP),
                       ("KUBE-LOAD-BALANCER", LOAD_BALANCER)):
        for m in sets.get(name, []):
            ip, proto, port, _ = _member(m)
            kinds[frontend(ip, port, proto)] = kind
    node_ports = {(proto, int(m)) for proto in ("TCP", "UDP")
                  for name in (f"KUBE-NODE-PORT-{proto}", f"KUBE-NODE-PORT-LOCAL-{proto}")
                  for m in sets.get(name, [])}
    dropped = set()
    for name in ("KUBE-DROP-CLUSTER-IP", "KUBE-DROP-EXTERNAL"):
        for m in sets.get(name, []):
            ip, proto, port, _ = _member(m)
            dropped.add(frontend(ip, port, proto))
    for name, servers in (state.get("virtual_servers") or {}).items():
        proto, address = name.split(" ", 1)
        ip, _, port = address.rpartition(":")
        key = frontend(ip, int(port), proto)
        r = row(key)
        r.kind = kinds.get(key) or (NODE_PORT if (proto, int(port)) in node_ports else "?")
        vs = servers
        r.objects.append(f"{proto} {address} {vs.get('scheduler')}"
                         + (f" persistent {vs['persistence_s']}" if vs.get("persistence_s")
                            else ""))
        r.affinity_timeout_s = vs.get("persistence_s") or None
        reals = vs.get("real_servers") or {}
        if key in dropped:
            r.objects.append(f"{len(reals)} real servers for pods and the node only")
        else:
            r.backends = [Backend(addr, weight=w) for addr, w in sorted(reals.items())]
            if not reals:
                r.no_endpoints = "reject"
    for key in dropped:
        r = row(key)
        r.no_endpoints = "drop"
        r.kind = kinds.get(key, r.kind)
        r.objects.append("ipset KUBE-DROP-" + ("CLUSTER-IP" if r.kind == CLUSTER_IP
                                                else "EXTERNAL"))
    nets: dict[str, list[str]] = {}
    for m in sets.get("KUBE-LOAD-BALANCER-SOURCE-CIDR", []):
        ip, proto, port, net = _member(m)
        nets.setdefault(frontend(ip, port, proto), []).append(net or "")
    for key, found in nets.items():
        r = row(key)
        r.source_ranges = ranges(found, key.partition(":")[0])
        r.objects.append("ipset KUBE-LOAD-BALANCER-SOURCE-CIDR")
    return list(rows.values())


# --------------------------------------------------------------------------- ebpf


def ebpf_rows(map_rows: list[dict], view: NodeView | None) -> list[Row]:
    """lb4_services read back (`dataplanes.ebpf.service_list`): one row per frontend of
    scope all; a scope-internal twin (the short circuit for pods and the node) is named in
    objects. Map keys do not name Services or kinds beyond ClusterIP/External: from the
    view."""
    rows: dict[str, Row] = {}
    for m in map_rows:
        key = m["frontend"]
        r = rows.setdefault(key, Row(key))
        if m.get("scope") == "internal":
            r.objects.append(f"lb4_services id {m['id']} scope internal "
                             f"({len(m['backends'])} backends for pods and the node)")
            continue
        r.objects.insert(0, f"lb4_services id {m['id']}")
        if m.get("type") == "ClusterIP":
            r.kind = CLUSTER_IP
        r.affinity_timeout_s = m.get("affinity_timeout_s")
        r.no_endpoints = m.get("empty") or None
        r.source_ranges = ranges(m.get("source_ranges") or [], key.partition(":")[0])
        r.backends = [Backend(b["address"], b.get("local")) for b in m["backends"]]
    return list(rows.values())


# --------------------------------------------------------------------------- userspace


def userspace_rows(state: dict[str, Any], view: NodeView | None) -> list[Row]:
    """The userspace proxy's table (its `dump`: per Service port the internal, external
    and cluster endpoint lists and affinity; one portal per frontend naming its Service
    port) and the portal ipsets: KUBE-PORTALS-REJECT / -DROP (no endpoints),
    KUBE-PORTALS-FW-SOURCES (source ranges)."""
    proxy = state.get("proxy") or {}
    services = {(s["name"], s["protocol"]): s for s in proxy.get("services", [])}
    sets = {name: s.get("members", []) for name, s in (state.get("sets") or {}).items()}
    rows: dict[str, Row] = {}
    for portal in proxy.get("portals", []):
        proto, ip, port, name, sproto, external, action = portal[:7]
        key = frontend(ip, int(port), proto)
        r = rows.setdefault(key, Row(key))
        r.service, r.service_from = name, FROM_KERNEL
        if not external:
            r.kind = CLUSTER_IP
        elif ip in proxy.get("node_ips", []):
            r.kind = NODE_PORT
        r.objects.append(f"portal {key} {action}")
        svc = services.get((name, sproto), {})
        r.affinity_timeout_s = svc.get("affinity_s")
        eps = svc.get("external" if external else "internal", [])
        r.backends = [Backend(f"{a}:{p}") for a, p in eps]
    for verdict in ("reject", "drop"):
        for m in sets.get(f"KUBE-PORTALS-{verdict.upper()}", []):
            ip, proto, port, _ = _member(m)
            r = rows.setdefault(frontend(ip, port, proto), Row(frontend(ip, port, proto)))
            r.no_endpoints = verdict
            r.objects.append(f"ipset KUBE-PORTALS-{verdict.upper()}")
    nets: dict[str, list[str]] = {}
    for m in sets.get("KUBE-PORTALS-FW", []):
        ip, proto, port, _ = _member(m)
        nets.setdefault(frontend(ip, port, proto), [])
    for m in sets.get("KUBE-PORTALS-FW-SOURCES", []):
        ip, proto, port, net = _member(m)
        nets.setdefault(frontend(ip, port, proto), []).append(net or "")
    for key, found in nets.items():
        r = rows.setdefault(key, Row(key))
        r.kind = LOAD_BALANCER
        r.source_ranges = ranges(found, key.partition(":")[0])
        r.objects.append("ipset KUBE-PORTALS-FW-SOURCES")
    return list(rows.values())


# --------------------------------------------------------------------------- one node


def skipped_protocols(mode: str) -> tuple[str, ...]:
    import importlib

    from dataplanes.modes import MODES

    module = importlib.import_module(MODES[mode][0])
    return tuple(getattr(module, "SKIPPED_PROTOCOLS", {}) or ())


def kernel_rows(mode: str, dp, node, view: NodeView | None) -> list[Row]:
    """The node's frontends as `mode` holds them in its kernel (or proxy), as rows."""
    if mode == "ebpf":
        from dataplanes.ebpf import service_list

        rows = ebpf_rows(service_list(node), view)
    else:
        state = dp.kernel_state(node)
        reader = {"iptables": iptables_rows, "nftables": nftables_rows, "ipvs": ipvs_rows,
                  "userspace": userspace_rows}[mode]
        rows = reader(state, view)
    namer = Namer(view)
    for r in rows:
        r.backends.sort(key=lambda b: b.address)
        r.source_ranges = sorted(r.source_ranges)
        namer.fill(r)
    rows += _health_rows(node)
    return sorted(rows, key=row_order)


# --------------------------------------------------------------------------- check


def differences(node: str, intended: list[Row], held: list[Row]) -> list[dict[str, Any]]:
    """Every difference between the intended rows and the rows the kernel holds, one dict
    each: node, frontend, kind, service, what (missing frontend, extra frontend, backend
    missing, backend extra, affinity, source ranges, no endpoints, kind, service, local
    endpoints), want and have."""
    want = {r.frontend: r for r in intended}
    have = {r.frontend: r for r in held}
    out: list[dict[str, Any]] = []

    def diff(r: Row, what: str, wanted: Any, found: Any) -> None:
        out.append({"node": node, "frontend": r.frontend, "kind": r.kind, "service": r.service,
                    "what": what, "want": wanted, "have": found})

    for key in sorted(set(want) | set(have), key=lambda k: row_order(want.get(k) or have[k])):
        w, h = want.get(key), have.get(key)
        if h is None:
            diff(w, "missing frontend", w.service, None)
            continue
        if w is None:
            diff(h, "extra frontend", None, h.service or None)
            continue
        if h.kind != w.kind:
            diff(w, "kind", w.kind, h.kind)
        if h.service_from == FROM_KERNEL and h.service != w.service:
            diff(w, "service", w.service, h.service)
        wa, ha = set(w.addresses), set(h.addresses)
        for addr in sorted(wa - ha):
            diff(w, "backend missing", addr, None)
        for addr in sorted(ha - wa):
            diff(w, "backend extra", None, addr)
        if w.affinity_timeout_s != h.affinity_timeout_s:
            diff(w, "affinity", w.affinity_timeout_s, h.affinity_timeout_s)
        if w.source_ranges != h.source_ranges:
            diff(w, "source ranges", w.source_ranges, h.source_ranges)
        if w.no_endpoints != h.no_endpoints:
            diff(w, "no endpoints", w.no_endpoints, h.no_endpoints)
        if w.kind == HEALTH_CHECK and w.local_endpoints != h.local_endpoints:
            diff(w, "local endpoints", w.local_endpoints, h.local_endpoints)
    return out
