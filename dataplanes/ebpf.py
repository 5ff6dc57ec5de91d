"""The eBPF/XDP data plane: Services as hash lookups, without netfilter on the path.

In the spirit of Cilium's kube-proxy replacement, with our own programs (bpf/):

- XDP on the node side of every pod veth (`svb_xdp_lxc`) and on the uplink
  (`svb_xdp_host`): (address, port, protocol) -> backend through `lb4_services`, DNAT
  with checksum updates, replies translated back through the LRU map `ct4`, ClientIP
  affinity in `affinity`, hairpin SNAT to HAIRPIN_IP (also for an endpoint at the node's
  own address, a hostNetwork pod, whose replies the host path routes back through XDP),
  NodePort SNAT to the node IP only when the endpoint is on another node (the source is
  kept otherwise, so externalTrafficPolicy Local sees the client), RST / ICMP port
  unreachable when a frontend has no endpoints, a drop when the traffic policy excludes
  the ones it has. Load-balancer IPs are frontends like externalIPs; with
  loadBalancerSourceRanges a new flow's source must match the LPM trie
  `lb4_source_ranges` (Service id, network), or it is dropped.
- Host-network processes: every socket of the node's namespace reaches Services, and the
  node's own NodePorts, through policy routes into an XDP-attached veth pair (HOST_LINK,
  NODEPORT_TABLE); processes placed in the
  run's cgroup (join_host_cgroup) are balanced earlier, at connect/sendmsg time, by
  cgroup socket hooks (connect4, sendmsg4, recvmsg4, getpeername4) that act only on
  sockets of their node's namespace.

A frontend with up to 8 endpoints is one lb4_services element (bpf/lib/maps.h). A sync
renders the NodeView into those elements, diffs them against what this process last
wrote (or what the kernel holds, read back once per process), and writes only the
difference with BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH. Nothing is pinned: another
process finds a node's programs and maps by name and netns cookie (bpf/loader.py).
"""

from __future__ import annotations

import errno
import gc
import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from bpf import cgroup, loader, maps, syscall
from bpf.setup import bcc_missing
from dataplanes import healthcheck
from dataplanes.base import DataplaneError, Host, NodeHandle, SyncStats
from kube.model import PLAN
from kube.state import DROP, REJECT, EndpointView, NodeView, ServicePortView

# Service ports this mode does not program, and why: the XDP DNAT patches TCP and UDP
# checksums incrementally (RFC 1624), but SCTP's CRC32c covers the whole packet and cannot be.
SKIPPED_PROTOCOLS = {
    "SCTP": "SCTP's CRC32c checksum cannot be patched incrementally by the XDP DNAT",
}

HAIRPIN_IP = "169.254.42.1"  # link-local, never a pod or node address (Cilium uses it alike)
# SNAT source ports stay above the ephemeral range (32768-60999), so they never collide
# with the node's own connections.
SNAT_PORTS = (61000, 65535)
SO_NETNS_COOKIE = 71
# Host-network traffic to Services: locally generated packets to the Service CIDR and
# externalIPs are routed (policy rule `iif lo`, own table) into a veth pair inside the
# node, whose far end runs svb_xdp_lxc, so every process of the node namespace is
# balanced whatever its cgroup. Processes in the run's cgroup are balanced earlier, at
# connect/sendmsg time, by the socket hooks, and never reach this path.
HOST_LINK = "svb-lb"
HOST_XDP_LINK = "svb-lb-xdp"
HOST_GATEWAY = "169.254.42.2"
HOST_TABLE = 3610
HOST_RULE_PRIORITY = 3610
# The node's own NodePorts: the node IP is a local address, so the local table (rule 0)
# would deliver a host process's packet to it before any later rule could send it to the
# host path. The local lookup moves to LOCAL_RULE_PRIORITY, behind one rule per protocol
# that routes locally generated TCP and UDP for the NodePort range on the node IP into the
# pair (VRF setups move the local rule alike). A packet to a port that is no NodePort comes
# back in through the pair untranslated and is delivered locally as before.
NODEPORT_TABLE = 3611
NODEPORT_RULE_PRIORITY = 10
LOCAL_RULE_PRIORITY = 32
RT_TABLE_LOCAL = 255
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
NETNS_DIR = "/run/netns"
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
# IFLA_XDP_ATTACHED (as pyroute2 names it) -> the flags that detach that mode
XDP_ATTACHED_MODES = {"xdp": XDP_FLAGS_DRV_MODE, "xdpgeneric": XDP_FLAGS_SKB_MODE,
                      1: XDP_FLAGS_DRV_MODE, 2: XDP_FLAGS_SKB_MODE}
# lb4_services entry whose absence means someone emptied the map: read it all back.
CANARY_KEY = maps.LB4_KEY.pack(b"\0\0\0\0", 0, 0xFFFF, 0, 0, 0)
CANARY_VALUE = bytes(maps.LB4_SERVICE.size)

# Routing what XDP rewrote: a NodePort packet SNATed to the node IP, or a RST for the
# node IP, comes back in with a local source address; the kernel drops that as martian
# unless accept_local is on. Forwarding such a packet out of the interface it came in on
# must not draw an ICMP redirect to the client.
SYSCTLS = (
    ("net/ipv4/conf/all/accept_local", 1),
    ("net/ipv4/conf/all/send_redirects", 0),
    ("net/ipv4/conf/{uplink}/send_redirects", 0),
)
SAVED_MARK = 1 << 31

SOCK_ATTACH = {
    "svb_sock4_conn": syscall.CGROUP_INET4_CONNECT,
    "svb_sock4_send": syscall.CGROUP_UDP4_SENDMSG,
    "svb_sock4_recv": syscall.CGROUP_UDP4_RECVMSG,
    "svb_sock4_peer": syscall.CGROUP_INET4_GETPEERNAME,
}


# --------------------------------------------------------------------------- naming


def run_group(netns: str) -> str:
    """The cgroup a node's socket hooks attach to: one per run, named like its namespaces."""
    return netns.rsplit("-", 1)[0] if netns.count("-") >= 2 else netns


def netns_cookie() -> int:
    """The calling thread's network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def _mask(cidr: str) -> tuple[bytes, bytes]:
    net = ipaddress.ip_network(cidr)
    return net.network_address.packed, net.netmask.packed


# --------------------------------------------------------------------------- node state


@dataclass
class _Node:
    """What this process knows of one node's BPF objects and of lb4_services."""

    netns: str
    cookie: int
    objects: loader.NodeObjects
    entries: dict[bytes, bytes] = field(default_factory=dict)  # lb4_services as written
    ranges: set[bytes] = field(default_factory=set)  # lb4_source_ranges keys as written
    svc_ids: dict[tuple[bytes, int, int], int] = field(default_factory=dict)
    next_svc_id: int = 1
    mirrored: bool = False  # `entries` reflects the kernel
    routed: list[str] = field(default_factory=list)  # destinations of the host path

    def load_mirror(self) -> None:
        """Read lb4_services back, with the Service ids it holds."""
        self.entries = dict(self.objects.map("lb4_services").dump())
        self.svc_ids.clear()
        for key, value in self.entries.items():
            if key == CANARY_KEY:
                continue
            address, port, slot, proto, scope, _ = maps.LB4_KEY.unpack(key)
            svc_id = maps.LB4_HEADER.unpack_from(value)[2]
            if slot == 0 and scope == maps.LB_SCOPE_ALL:
                self.svc_ids.setdefault((address, port, proto), svc_id)
            self.next_svc_id = max(self.next_svc_id, svc_id + 1)
        self.ranges = set(self.objects.map("lb4_source_ranges").keys())
        self.mirrored = True


# A frontend's flags for the view's filter: with no backend, DROP_EMPTY drops, else it rejects.
_EMPTY_FLAGS = {None: 0, REJECT: 0, DROP: maps.SVC_F_DROP_EMPTY}
_PADDING = [maps.NO_BACKEND * (maps.LB4_INLINE - n) for n in range(maps.LB4_INLINE + 1)]


class _Render:
    """One NodeView as lb4_services contents: packed key -> packed value.

    The hot loop is written out for speed: one map element per frontend, backends packed
    once per (address, port, locality) and reused by every Service that has them.
    Service ids carry over from the node's previous assignment; ids of frontends that
    are gone are forgotten and never reused (they only grow).
    """

    def __init__(self, st: _Node, view: NodeView):
        self.st = st
        self.entries: dict[bytes, bytes] = {CANARY_KEY: CANARY_VALUE}
        self.ranges: set[bytes] = set()  # lb4_source_ranges keys
        self.svc_ids: dict[tuple[bytes, int, int], int] = {}
        self.external_ips: set[str] = set()  # externalIPs and load-balancer IPs
        self.slot_keys: set[bytes] = set()  # overflow slots of large frontends
        # (endpoint IP, port) -> packed lb4_backend; locality is the IP's, for this node
        self._refs: dict[tuple[str, int], bytes] = {}
        entries, svc_ids, old_ids, refs_cache = self.entries, self.svc_ids, st.svc_ids, self._refs
        key, head, htons, aton = maps.LB4_KEY.pack, maps.LB4_HEADER.pack, socket.htons, socket.inet_aton
        inline, padding, protos, ref_of = maps.LB4_INLINE, _PADDING, maps.IPPROTO, self._ref
        for sp in view.services:
            if sp.protocol not in protos:
                continue  # SCTP: skipped, see SKIPPED_PROTOCOLS
            proto = protos[sp.protocol]
            vip = aton(sp.cluster_ip)
            vport = htons(sp.port)
            ident = (vip, vport, proto)
            svc_id = old_ids.get(ident)
            if svc_id is None:
                svc_id = st.next_svc_id
                st.next_svc_id += 1
            svc_ids[ident] = svc_id
            if sp.affinity_timeout_s is None:
                flags, timeout = 0, 0
            else:
                flags, timeout = maps.SVC_F_AFFINITY, sp.affinity_timeout_s
            refs = [refs_cache.get((ep.ip, ep.port)) or ref_of(ep) for ep in sp.internal_endpoints]
            count = len(refs)
            if count and count <= inline:
                entries[key(vip, vport, 0, proto, 0, 0)] = (
                    head(count, flags, svc_id, timeout, 0) + b"".join(refs) + padding[count])
            else:
                self._frontend(vip, vport, proto, maps.LB_SCOPE_ALL, svc_id,
                               flags | _EMPTY_FLAGS[sp.internal_traffic_filter], timeout, refs)
            if sp.has_external:
                self._external(sp, proto, svc_id, flags | maps.SVC_F_EXTERNAL, timeout,
                               view.node_ips)

    def _ref(self, ep: EndpointView) -> bytes:
        ref = self._refs[(ep.ip, ep.port)] = maps.LB4_BACKEND.pack(
            socket.inet_aton(ep.ip), socket.htons(ep.port), maps.BE_F_LOCAL if ep.local else 0, 0)
        return ref

    def _refs_of(self, endpoints: tuple[EndpointView, ...]) -> list[bytes]:
        cache = self._refs
        return [cache.get((ep.ip, ep.port)) or self._ref(ep) for ep in endpoints]

    def _external(self, sp: ServicePortView, proto: int, svc_id: int, flags: int,
                  timeout: int, node_ips: tuple[str, ...]) -> None:
        outside = self._refs_of(sp.external_endpoints)
        outside_flags = flags | _EMPTY_FLAGS[sp.external_traffic_filter]
        # Pods and the node itself are short-circuited to the cluster-wide set.
        inside = (None if sp.cluster_endpoints == sp.external_endpoints
                  else self._refs_of(sp.cluster_endpoints))
        # (address, port, extra flags): load-balancer IPs serve like externalIPs, and with
        # loadBalancerSourceRanges only sources inside them (the NodePort is not filtered).
        frontends = [(ip, sp.port, 0) for ip in sp.external_ips]
        self.external_ips.update(sp.external_ips)
        if sp.load_balancer_ips:
            firewall = 0
            if sp.load_balancer_source_ranges:
                firewall = maps.SVC_F_SOURCE_RANGES
                self._source_ranges(svc_id, sp.load_balancer_source_ranges)
            frontends += [(ip, sp.port, firewall) for ip in sp.load_balancer_ips]
            self.external_ips.update(sp.load_balancer_ips)
        if sp.node_port is not None:
            frontends += [(ip, sp.node_port, 0) for ip in node_ips]
        for ip, port, extra in frontends:
            address = socket.inet_aton(ip)
            port = socket.htons(port)
            self._frontend(address, port, proto, maps.LB_SCOPE_ALL, svc_id,
                           outside_flags | extra, timeout, outside)
            if inside is not None:
                self._frontend(address, port, proto, maps.LB_SCOPE_INTERNAL, svc_id,
                               flags | extra, timeout, inside)

    def _source_ranges(self, svc_id: int, ranges: tuple[str, ...]) -> None:
        """One LPM trie key per allowed network: the whole Service id, then its prefix."""
        pack = maps.LB4_RANGE_KEY.pack
        for cidr in ranges:
            net = ipaddress.ip_network(cidr)
            self.ranges.add(pack(32 + net.prefixlen, svc_id, net.network_address.packed))

    def _frontend(self, address: bytes, port: int, proto: int, scope: int, svc_id: int,
                  flags: int, timeout: int, refs: list[bytes]) -> None:
        count = len(refs)
        key = maps.LB4_KEY.pack
        head = maps.LB4_HEADER.pack(count, flags, svc_id, timeout, 0)
        inline = maps.LB4_INLINE
        self.entries[key(address, port, 0, proto, scope, 0)] = (
            head + b"".join(refs[:inline]) + _PADDING[min(count, inline)])
        if count > inline:
            slot_head = maps.LB4_HEADER.pack(0, 0, svc_id, 0, 0)
            for slot in range(inline + 1, count + 1):
                slot_key = key(address, port, slot, proto, scope, 0)
                self.entries[slot_key] = slot_head + refs[slot - 1] + _PADDING[1]
                self.slot_keys.add(slot_key)

    def host_destinations(self, service_cidr: str) -> list[str]:
        """What host-network traffic is routed to the XDP host path: the Service CIDR, the
        externalIPs and load-balancer IPs outside it, and HAIRPIN_IP, to which an endpoint at
        the node's own address (a hostNetwork pod) answers the clients SNATed to it."""
        net = ipaddress.ip_network(service_cidr)
        extra = sorted(ip for ip in self.external_ips if ipaddress.ip_address(ip) not in net)
        return [service_cidr, *(f"{ip}/32" for ip in extra), f"{HAIRPIN_IP}/32"]


# --------------------------------------------------------------------------- in the node


def _read_sysctl(path: str) -> int:
    with open("/proc/sys/" + path) as fh:
        return int(fh.read().strip())


def _write_sysctl(path: str, value: int) -> None:
    with open("/proc/sys/" + path, "w") as fh:
        fh.write(str(value))


def _set_sysctls(uplink: str) -> int:
    """Runs in the node: apply SYSCTLS, return the old values as bits (bit i = SYSCTLS[i])."""
    saved = SAVED_MARK
    for i, (path, value) in enumerate(SYSCTLS):
        path = path.format(uplink=uplink)
        if _read_sysctl(path):
            saved |= 1 << i
        _write_sysctl(path, value)
    return saved


def _restore_sysctls(uplink: str, saved: int) -> None:
    if not saved & SAVED_MARK:
        return
    for i, (path, _value) in enumerate(SYSCTLS):
        try:
            _write_sysctl(path.format(uplink=uplink), 1 if saved & (1 << i) else 0)
        except FileNotFoundError:
            pass  # the interface is gone


def _xdp_state(ipr=None) -> dict[str, tuple[int, int, int]]:
    """Runs in the node: ifname -> (ifindex, attached XDP program id or 0, XDP mode flags)."""
    from pyroute2 import IPRoute

    out = {}
    with (IPRoute() if ipr is None else _borrowed(ipr)) as route:
        for link in route.get_links():
            xdp = link.get_attr("IFLA_XDP")
            prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else None
            mode = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else None
            out[link.get_attr("IFLA_IFNAME")] = (link["index"], prog_id or 0,
                                                 XDP_ATTACHED_MODES.get(mode, 0))
    return out


class _borrowed:
    """An open IPRoute used as a context manager without closing it."""

    def __init__(self, ipr):
        self.ipr = ipr

    def __enter__(self):
        return self.ipr

    def __exit__(self, *exc):
        return False


def _xdp_set(wanted: list[tuple[int, int, int]]) -> list[str]:
    """Runs in the node: (ifindex, prog fd, mode flags) to attach; fd -1 detaches.

    Native mode first (veth runs XDP in its NAPI poll); generic mode if refused.
    Returns what failed.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    failed = []
    with IPRoute() as ipr:
        for index, fd, flags in wanted:
            modes = (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE) if fd >= 0 else (flags,)
            for mode in modes:
                attrs = [("IFLA_XDP_FD", fd)] + ([("IFLA_XDP_FLAGS", mode)] if mode else [])
                try:
                    ipr.link("set", index=index, xdp={"attrs": attrs})
                    break
                except NetlinkError as exc:
                    if exc.code == errno.ENODEV:
                        break  # the pod went away meanwhile
                    if mode == modes[-1]:
                        failed.append(f"ifindex {index}: {exc}")
    return failed


def _plumb_host_path(node_ip: str, destinations: list[str], ipr=None,
                     links: dict[str, tuple[int, int, int]] | None = None) -> list[str]:
    """Runs in the node: the veth pair, its permanent neighbour, the rule and the routes."""
    from pyroute2 import IPRoute

    done = []
    with (IPRoute() if ipr is None else _borrowed(ipr)) as route:
        links = links if links is not None else _xdp_state(route)
        if HOST_LINK not in links or HOST_XDP_LINK not in links:
            route.link("add", ifname=HOST_LINK, kind="veth", peer=HOST_XDP_LINK)
            done.append(f"created {HOST_LINK}/{HOST_XDP_LINK}")
            links.update(_xdp_state(route))
        tx, rx = links[HOST_LINK][0], links[HOST_XDP_LINK][0]
        for index in (tx, rx):
            route.link("set", index=index, state="up")
        mac = route.get_links(rx)[0].get_attr("IFLA_ADDRESS")
        route.neigh("replace", dst=HOST_GATEWAY, lladdr=mac, ifindex=tx, state=NUD_PERMANENT)
        if not [r for r in route.get_rules(family=socket.AF_INET)
                if r.get_attr("FRA_PRIORITY") == HOST_RULE_PRIORITY]:
            route.rule("add", table=HOST_TABLE, priority=HOST_RULE_PRIORITY, iifname="lo")
            done.append(f"added rule iif lo lookup {HOST_TABLE}")
        have = {
            f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
            for r in route.get_routes(family=socket.AF_INET, table=HOST_TABLE)
        }
        for dst in destinations:
            if dst not in have:
                route.route("replace", dst=dst, table=HOST_TABLE, gateway=HOST_GATEWAY, oif=tx,
                            flags=RTNH_F_ONLINK, prefsrc=node_ip)
        for dst in have - set(destinations):
            route.route("del", dst=dst, table=HOST_TABLE)
        done += _plumb_node_ports(route, node_ip, tx)
    return done


def _rule_priority(rule) -> int:
    return rule.get_attr("FRA_PRIORITY") or 0


def _rule_table(rule) -> int:
    return rule.get_attr("FRA_TABLE") or rule["table"]


def _plumb_node_ports(route, node_ip: str, tx: int) -> list[str]:
    """Runs in the node: host processes' packets to the node IP's NodePort range take the
    host path (see NODEPORT_TABLE); the local rule moves behind them."""
    done = []
    rules = route.get_rules(family=socket.AF_INET)
    local = {_rule_priority(r) for r in rules if _rule_table(r) == RT_TABLE_LOCAL}
    if LOCAL_RULE_PRIORITY not in local:
        route.rule("add", table=RT_TABLE_LOCAL, priority=LOCAL_RULE_PRIORITY)
        done.append(f"moved the local table's rule to priority {LOCAL_RULE_PRIORITY}")
    if 0 in local:
        route.rule("del", table=RT_TABLE_LOCAL, priority=0)
    low, high = PLAN.node_port_range
    wanted = {socket.IPPROTO_TCP, socket.IPPROTO_UDP}
    for rule in rules:
        if _rule_priority(rule) != NODEPORT_RULE_PRIORITY:
            continue
        proto = rule.get_attr("FRA_IP_PROTO")
        if rule.get_attr("FRA_DST") == node_ip and proto in wanted:
            wanted.discard(proto)
        else:  # the node's address changed: the rule points at the old one
            route.rule("del", table=NODEPORT_TABLE, priority=NODEPORT_RULE_PRIORITY,
                       iifname="lo", dst=rule.get_attr("FRA_DST"), dst_len=32, ip_proto=proto,
                       dport_range=f"{low}:{high}")
    for proto in sorted(wanted):
        route.rule("add", table=NODEPORT_TABLE, priority=NODEPORT_RULE_PRIORITY, iifname="lo",
                   dst=node_ip, dst_len=32, ip_proto=proto,
                   dport_range=f"{low}:{high}")
        done.append(f"added rule to {node_ip} ipproto {proto} dport {low}-{high} "
                    f"lookup {NODEPORT_TABLE}")
    have = [r.get_attr("RTA_DST") for r in route.get_routes(family=socket.AF_INET,
                                                           table=NODEPORT_TABLE)]
    if have != [node_ip]:
        for dst in have:
            route.route("del", dst=f"{dst}/32", table=NODEPORT_TABLE)
        route.route("replace", dst=f"{node_ip}/32", table=NODEPORT_TABLE, gateway=HOST_GATEWAY,
                    oif=tx, flags=RTNH_F_ONLINK, prefsrc=node_ip)
    return done


def _unplumb_host_path() -> None:
    """Runs in the node: remove the rule, the table and the pair (neighbour goes with it)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        rules = ipr.get_rules(family=socket.AF_INET)
        for r in rules:
            if r.get_attr("FRA_PRIORITY") == HOST_RULE_PRIORITY:
                ipr.rule("del", table=HOST_TABLE, priority=HOST_RULE_PRIORITY, iifname="lo")
        low, high = PLAN.node_port_range
        for r in rules:
            if _rule_priority(r) == NODEPORT_RULE_PRIORITY:
                ipr.rule("del", table=NODEPORT_TABLE, priority=NODEPORT_RULE_PRIORITY,
                         iifname="lo", dst=r.get_attr("FRA_DST"), dst_len=32,
                         ip_proto=r.get_attr("FRA_IP_PROTO"),
                         dport_range=f"{low}:{high}")
        local = {_rule_priority(r) for r in rules if _rule_table(r) == RT_TABLE_LOCAL}
        if 0 not in local:  # the local lookup back in front, before its stand-in goes
            ipr.rule("add", table=RT_TABLE_LOCAL, priority=0)
        if LOCAL_RULE_PRIORITY in local:
            ipr.rule("del", table=RT_TABLE_LOCAL, priority=LOCAL_RULE_PRIORITY)
        for table in (HOST_TABLE, NODEPORT_TABLE):
            for r in ipr.get_routes(family=socket.AF_INET, table=table):
                try:
                    ipr.route("del", dst=f"{r.get_attr('RTA_DST')}/{r['dst_len']}", table=table)
                except NetlinkError:
                    pass
        for index in ipr.link_lookup(ifname=HOST_LINK):
            ipr.link("del", index=index)


def _node_state(node_ip: str, destinations: list[str]) -> tuple[int, dict, list[str]]:
    """Runs in the node, once per sync: (netns cookie, XDP per link, host-path changes)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = _xdp_state(ipr)
        done = _plumb_host_path(node_ip, destinations, ipr, links)
        if done:
            links = _xdp_state(ipr)  # the pair is new: its index must be current
    return netns_cookie(), links, done


def _same_node(prog_id: int, cookie: int) -> bool:
    """Whether a program is a suite program of the node with this netns cookie."""
    fd = syscall.prog_fd_by_id(prog_id)
    if fd is None:
        return False
    try:
        info = syscall.prog_info(fd)
    finally:
        syscall.close(fd)
    if info["name"] not in loader.PROGRAMS:
        return False
    config = loader.program_config(info)
    return config is not None and config.netns_cookie == cookie


def _suite_program_names() -> dict[int, str]:
    return {prog_id: info["name"] for prog_id, info in loader.suite_programs()}


# --------------------------------------------------------------------------- the data plane


class EbpfDataplane:
    name = "ebpf"
    deviations: dict[str, str] = {
        "connections_survive_proxy_restart": (
            "uninstall frees the XDP programs' connection table with them (nothing is pinned), "
            "so after the reinstall an established connection's next packet picks a backend "
            "afresh and is reset unless it draws the one it had"
        ),
    }

    @staticmethod
    def gc(netns_names: list[str] | None = None) -> list[str]:
        """What killed runs left outside their namespaces (the protocol's optional `gc`)."""
        return gc_bpf(netns_names)

    def __init__(self):
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ protocol

    def missing(self, host: Host) -> list[str]:
        out = list(bcc_missing())
        if os.geteuid() != 0:
            out.append("loading BPF programs needs root")
        for option in ("CONFIG_BPF_SYSCALL", "CONFIG_CGROUP_BPF"):
            if host.kernel_config(option) not in (None, "y"):
                out.append(f"the kernel lacks {option} (XDP programs and socket hooks)")
        if cgroup.cgroup2_mount() is None:
            out.append("no cgroup v2 hierarchy is mounted, so socket hooks cannot attach "
                       "(mount -t cgroup2 none /sys/fs/cgroup)")
        return out

    def install(self, node: NodeHandle) -> None:
        healthcheck.install(node)
        with self._lock:
            self._ensure(node, node.ip, [PLAN.service_cidr])

    def sync(self, node: NodeHandle, view: NodeView) -> SyncStats:
        start = time.perf_counter()
        with self._lock:
            st = self._nodes.get(node.netns)
            routed = st.routed if st is not None else [view.service_cidr]
            st, repaired = self._ensure(node, view.node_ip, routed)
            self._configure(st, view)
            full = not st.mirrored or st.objects.map("lb4_services").lookup(CANARY_KEY) is None
            collecting = gc.isenabled()
            gc.disable()  # the render allocates only acyclic tuples and bytes: skip the scans
            try:
                if full:
                    st.load_mirror()
                render = _Render(st, view)
            finally:
                if collecting:
                    gc.enable()
            routed = render.host_destinations(view.service_cidr)
            if routed != st.routed:
                repaired += node.call(_plumb_host_path, view.node_ip, routed)
                st.routed = routed
            changed = self._write(st, render)
        healthcheck.sync(node, view)
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - start,
            full=full,
            services=len(view.services),
            rules=len(render.entries),
            changed=changed,
            extra={"repaired": repaired} if repaired else {},
        )

    def uninstall(self, node: NodeHandle) -> None:
        healthcheck.uninstall(node)
        with self._lock:
            st = self._nodes.pop(node.netns, None)
            cookie = node.call(netns_cookie)
            objects = st.objects if st is not None and st.cookie == cookie else None
            if objects is None:
                try:
                    obj = loader.compile_object()
                    objects = loader.find_node_objects(cookie, obj)
                except loader.LoaderError:
                    objects = None
            names = _suite_program_names()
            state = node.call(_xdp_state)
            detach = [(index, -1, mode) for index, prog_id, mode in state.values()
                      if prog_id in names]
            if detach:
                node.call(_xdp_set, detach)
            node.call(_unplumb_host_path)
            if objects is not None:
                self._detach_sock_hooks(node, objects)
                saved = objects.config().saved_sysctls
                node.call(_restore_sysctls, node.uplink, saved)
                objects.close()
            self._remove_group_if_empty(run_group(node.netns))

    # ------------------------------------------------------------------ extras

    def service_list(self, node: NodeHandle) -> list[dict]:
        """The node's frontends and backends as the kernel holds them (`cilium service list`)."""
        with self._lock:
            cookie = node.call(netns_cookie)
            st = self._nodes.get(node.netns)
            if st is not None and st.cookie == cookie:
                return service_rows(st.objects)
            objects = loader.find_node_objects(cookie, loader.compile_object())
            if objects is None:
                return []
            try:
                return service_rows(objects)
            finally:
                objects.close()

    def join_host_cgroup(self, node: NodeHandle, pid: int | None = None) -> str:
        return join_host_cgroup(node, pid)

    # ------------------------------------------------------------------ internals

    def _ensure(self, node: NodeHandle, node_ip: str,
                destinations: list[str]) -> tuple[_Node, list[str]]:
        """The node's objects loaded, XDP on the uplink, the host path and every pod veth,
        socket hooks attached: what is missing is put back, and named in the result."""
        cookie, xdp, repaired = node.call(_node_state, node_ip, destinations)
        st = self._nodes.get(node.netns)
        if st is not None and st.cookie != cookie:
            st.objects.close()  # the namespace was recreated under the same name
            st = None
        if st is None:
            try:
                obj = loader.compile_object()
                objects = loader.find_node_objects(cookie, obj)
                if objects is None:
                    objects = loader.create_node_objects(obj, self._config(node, cookie))
                    repaired.append("loaded programs and maps")
            except loader.LoaderError as exc:
                raise DataplaneError(f"ebpf on {node.name}: {exc}") from None
            st = self._nodes[node.netns] = _Node(node.netns, cookie, objects, routed=destinations)
        config = st.objects.config()
        if not config.saved_sysctls & SAVED_MARK:
            config.saved_sysctls = node.call(_set_sysctls, node.uplink)
            st.objects.set_config(config)
        repaired += self._attach_xdp(node, st.objects, xdp)
        repaired += self._attach_sock_hooks(node, st.objects)
        return st, repaired

    def _configure(self, st: _Node, view: NodeView) -> None:
        """node_config follows the view: the node IP (NodePort SNAT) and the cluster CIDR."""
        config = st.objects.config()
        cidr, mask = _mask(view.cluster_cidr)
        node_ip = socket.inet_aton(view.node_ip)
        if (bytes(config.cluster_cidr), bytes(config.cluster_mask), bytes(config.node_ip)) != (
                cidr, mask, node_ip):
            config.cluster_cidr[:] = cidr
            config.cluster_mask[:] = mask
            config.node_ip[:] = node_ip
            st.objects.set_config(config)

    def _config(self, node: NodeHandle, cookie: int) -> maps.NodeConfig:
        config = maps.NodeConfig()
        config.netns_cookie = cookie
        config.node_ip[:] = socket.inet_aton(node.ip)
        config.hairpin_ip[:] = socket.inet_aton(HAIRPIN_IP)
        cidr, mask = _mask(PLAN.cluster_cidr)
        config.cluster_cidr[:] = cidr
        config.cluster_mask[:] = mask
        config.snat_port_min, config.snat_port_max = SNAT_PORTS
        return config

    def _attach_xdp(self, node: NodeHandle, objects: loader.NodeObjects,
                    state: dict[str, tuple[int, int, int]]) -> list[str]:
        if node.uplink not in state:
            raise DataplaneError(f"ebpf on {node.name}: uplink {node.uplink} not found in {node.netns}")
        wanted = {node.uplink: "svb_xdp_host", HOST_XDP_LINK: "svb_xdp_lxc"}
        for ifname in node.pod_interfaces().values():
            wanted[ifname] = "svb_xdp_lxc"
        todo = []
        for ifname, prog in wanted.items():
            if ifname not in state:
                continue  # a pod being deleted
            index, prog_id, _mode = state[ifname]
            if prog_id != objects.program_ids[prog]:
                todo.append((ifname, index, objects.programs[prog]))
        if not todo:
            return []
        failed = node.call(_xdp_set, [(index, fd, 0) for _, index, fd in todo])
        if failed:
            raise DataplaneError(f"ebpf on {node.name}: XDP attach failed: {'; '.join(failed)}")
        return [f"attached XDP to {', '.join(name for name, _, _ in todo)}"]

    def _attach_sock_hooks(self, node: NodeHandle, objects: loader.NodeObjects) -> list[str]:
        try:
            path = cgroup.group_path(run_group(node.netns))
        except FileNotFoundError:
            return []  # missing() says so; pods still work
        cgroup.ensure(path)
        done = []
        cookie = objects.config().netns_cookie
        for prog, attach_type in SOCK_ATTACH.items():
            attached = cgroup.attached(path, attach_type)
            stale = [i for i in attached if i != objects.program_ids[prog] and _same_node(i, cookie)]
            if stale:  # an earlier load for this node (a crash, another build) still hooked in
                cgroup.detach_ids(path, attach_type, stale)
            if objects.program_ids[prog] in attached:
                continue
            try:
                cgroup.attach(path, objects.programs[prog], attach_type)
            except OSError as exc:
                raise DataplaneError(f"ebpf on {node.name}: attach {prog} to {path}: {exc}") from None
            done.append(prog)
        return [f"attached {', '.join(done)} to {path}"] if done else []

    def _detach_sock_hooks(self, node: NodeHandle, objects: loader.NodeObjects) -> None:
        try:
            path = cgroup.group_path(run_group(node.netns))
        except FileNotFoundError:
            return
        if not os.path.isdir(path):
            return
        for prog, attach_type in SOCK_ATTACH.items():
            if prog in objects.programs:
                cgroup.detach(path, objects.programs[prog], attach_type)

    def _remove_group_if_empty(self, group: str) -> None:
        try:
            path = cgroup.group_path(group)
        except FileNotFoundError:
            return
        if not os.path.isdir(path):
            return
        if any(cgroup.attached(path, t) for t in cgroup.SOCK_ATTACH_TYPES):
            return  # other nodes of the run still use it
        cgroup.remove(path, cgroup.cgroup2_mount() or "/")
        try:
            os.rmdir(os.path.dirname(path))  # the suite's parent, once no run uses it
        except OSError:
            pass

    def _write(self, st: _Node, render: _Render) -> int:
        """Write the difference: overflow slots before the entries that count them, then
        delete what went (an entry's count never points past what exists)."""
        services_map = st.objects.map("lb4_services")
        old = st.entries
        if old:
            changed = [(k, v) for k, v in render.entries.items() if old.get(k) != v]
        else:
            changed = list(render.entries.items())
        slots = [kv for kv in changed if kv[0] in render.slot_keys] if render.slot_keys else []
        if slots:
            changed = [kv for kv in changed if kv[0] not in render.slot_keys]
        gone = [k for k in old if k not in render.entries] if old else []
        # Source ranges come before the frontends that check them and go after them: a
        # flagged frontend never meets an empty trie it should not.
        ranges_map = st.objects.map("lb4_source_ranges")
        new_ranges = render.ranges - st.ranges
        old_ranges = st.ranges - render.ranges
        try:
            for key in sorted(new_ranges):  # an LPM trie takes no batch updates
                ranges_map.update(key, maps.LB4_RANGE)
            services_map.update_batch(slots)
            services_map.update_batch(changed)
            services_map.delete_batch(gone)
            for key in sorted(old_ranges):
                ranges_map.delete(key)
        except OSError as exc:
            st.mirrored = False  # read the kernel back next time
            raise DataplaneError(f"ebpf: lb4_services update failed: {exc}") from None
        st.entries = render.entries
        st.ranges = render.ranges
        st.svc_ids = render.svc_ids
        return len(slots) + len(changed) + len(gone) + len(new_ranges) + len(old_ranges)


def join_host_cgroup(node: NodeHandle, pid: int | None = None) -> str:
    """Put a process (this one by default) in the run's cgroup: its sockets in the node's
    namespace are then balanced at connect/sendmsg time by the socket hooks.

    For a node agent or host-network client that should see socket-level balancing
    (getpeername() answers the Service, NodePorts on the node's own IP work). Sockets in
    other namespaces are left alone by the hooks. When the cgroup goes (last uninstall,
    gc) its members move to the cgroup root.
    """
    path = cgroup.group_path(run_group(node.netns))
    if not os.path.isdir(path):
        raise DataplaneError(f"ebpf: {path} does not exist; install the ebpf mode on {node.name} first")
    cgroup.move(pid or os.getpid(), path)
    return path


# --------------------------------------------------------------------------- reading back


def service_list(node: NodeHandle) -> list[dict]:
    """`svcbench service list --mode ebpf`: the node's lb4_services as the kernel holds it,
    one row per frontend, as `cilium service list` prints it:

        {"id": 3, "frontend": "198.19.0.1:80/TCP", "type": "ClusterIP" | "External",
         "scope": "" | "internal", "affinity_timeout_s": None | int,
         "empty": "" | "reject" | "drop",
         "source_ranges": [] | ["198.18.0.0/24", ...],  # loadBalancerSourceRanges
         "backends": [{"address": "198.18.129.2:8080", "local": True}, ...]}

    Works from any process (the node's maps are found by netns cookie); [] when the mode
    is not installed on the node.
    """
    return EbpfDataplane().service_list(node)


def service_rows(objects: loader.NodeObjects) -> list[dict]:
    """One row per frontend, from the kernel: id, frontend, type, scope, affinity, backends."""
    frontends: dict[tuple, dict] = {}
    overflow: dict[tuple, dict[int, dict]] = {}

    def backend(value: bytes, offset: int) -> dict:
        ip, port, flags, _pad = maps.LB4_BACKEND.unpack_from(value, offset)
        return {"address": f"{socket.inet_ntoa(ip)}:{socket.ntohs(port)}",
                "local": bool(flags & maps.BE_F_LOCAL)}

    ranges: dict[int, list[str]] = {}
    for key in objects.map("lb4_source_ranges").keys():
        prefixlen, svc_id, address = maps.LB4_RANGE_KEY.unpack(key)
        ranges.setdefault(svc_id, []).append(f"{socket.inet_ntoa(address)}/{prefixlen - 32}")
    for key, value in objects.map("lb4_services").dump():
        if key == CANARY_KEY:
            continue
        address, port, slot, proto, scope, _ = maps.LB4_KEY.unpack(key)
        count, flags, svc_id, timeout, _pad = maps.LB4_HEADER.unpack_from(value)
        ident = (address, port, proto, scope)
        if slot:
            overflow.setdefault(ident, {})[slot] = backend(value, maps.LB4_HEADER.size)
            continue
        frontends[ident] = {
            "id": svc_id,
            "frontend": f"{socket.inet_ntoa(address)}:{socket.ntohs(port)}/"
                        f"{maps.PROTO_NAME.get(proto, proto)}",
            "type": "External" if flags & maps.SVC_F_EXTERNAL else "ClusterIP",
            "scope": "internal" if scope == maps.LB_SCOPE_INTERNAL else "",
            "affinity_timeout_s": timeout if flags & maps.SVC_F_AFFINITY else None,
            "empty": ("drop" if flags & maps.SVC_F_DROP_EMPTY else "reject") if not count else "",
            "source_ranges": (sorted(ranges.get(svc_id, []), key=ipaddress.ip_network)
                              if flags & maps.SVC_F_SOURCE_RANGES else []),
            "backends": [backend(value, maps.LB4_HEADER.size + i * maps.LB4_BACKEND.size)
                         for i in range(min(count, maps.LB4_INLINE))],
            "count": count,
        }
    rows = []
    for ident, row in frontends.items():
        extra = overflow.get(ident, {})
        row["backends"] += [extra.get(slot, {"address": "?", "local": False})
                            for slot in range(maps.LB4_INLINE + 1, row.pop("count") + 1)]
        rows.append(row)
    rows.sort(key=lambda r: (r["id"], r["scope"], r["frontend"]))
    return rows


def _ip_links(netns: str) -> list[dict]:
    proc = subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        return []
    return json.loads(proc.stdout or "[]")


def gc_bpf(netns_names: list[str] | None = None) -> list[str]:
    """Remove what the suite left in the kernel; one line per thing removed.

    Always: socket hooks and cgroups of runs whose namespaces are all gone (cgroups
    outlive namespaces). For `netns_names` that still exist (a run being torn down, or
    every svb-* namespace for `gc --all`): their XDP programs and their runs' hooks too.
    Otherwise XDP programs die with their namespace's interfaces; nothing is pinned.
    """
    removed: list[str] = []
    try:
        present = set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        present = set()
    targets = set(netns_names or ())
    suite = _suite_program_names()
    for ns in sorted(targets & present):
        for link in _ip_links(ns):
            prog = (link.get("xdp") or {}).get("prog") or {}
            if prog.get("id") not in suite:
                continue
            mode = "xdpgeneric" if (link.get("xdp") or {}).get("mode") == 2 else "xdpdrv"
            subprocess.run(["ip", "-n", ns, "link", "set", "dev", link["ifname"], mode, "off"],
                           capture_output=True, timeout=30)
            removed.append(f"{ns}: detached XDP program {suite[prog['id']]} from {link['ifname']}")
    root = cgroup.suite_root()
    if not root or not os.path.isdir(root):
        return removed
    target_groups = {run_group(n) for n in targets}
    for group in sorted(os.listdir(root)):
        path = os.path.join(root, group)
        if not os.path.isdir(path):
            continue
        alive = group in present or any(n.startswith(group + "-") for n in present)
        if alive and group not in target_groups:
            continue
        for attach_type in cgroup.SOCK_ATTACH_TYPES:
            ids = [i for i in cgroup.attached(path, attach_type) if i in suite]
            for prog_id in cgroup.detach_ids(path, attach_type, ids):
                removed.append(f"cgroup {path}: detached {suite[prog_id]} (id {prog_id})")
        if any(cgroup.attached(path, t) for t in cgroup.SOCK_ATTACH_TYPES):
            continue  # someone else's programs: leave the directory
        moved = cgroup.remove(path, cgroup.cgroup2_mount() or "/")
        removed.append(f"cgroup {path}: removed" + (f" (moved pids {moved} out)" if moved else ""))
    try:
        os.rmdir(root)  # only when no run uses it any more
    except OSError:
        pass
    return removed
