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
  `lb4_source_ranges` (Service id, network), or it is dropped. Every drop (and every
  reject answered) is reported with its reason into the ring buffer `xdp_drops`, which
  `svcbench monitor --type drop` reads (bpf/lib/drop.h, bpf/xdpdrops.py).
- Host-network processes: every socket of the node's namespace reaches Services, and the
  node's own NodePorts, through policy routes into an XDP-attached veth pair (HOST_LINK,
  NODEPORT_TABLE); processes placed in the
  run's cgroup (join_host_cgroup) are balanced earlier, at connect/sendmsg time, by
  cgroup socket hooks (connect4, sendmsg4, recvmsg4, getpeername4) that act only on
  sockets of their node's namespace.

A frontend with up to 8 endpoints is one lb4_services element (bpf/lib/maps.h). The
data plane keeps, per node, what each Service port (ViewKey) rendered: its elements, its
source-range keys, its external addresses (host-path routes), its Service id, its
health-check port; what ports share (an element two Services render, a range key, an
address, an id) is reference-counted. So `update(node, changes)` renders only the
changed ports and writes only the elements they add, change or drop (a few map element
writes per Service), and `sync(node, view)` renders only the ports whose view changed,
then reads lb4_services back whole and writes what differs from the desired state with
BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH, which also repairs an element someone else
deleted. A canary element holds the token of the data plane object that last wrote the
node: an update finding another token (another process synced the node) or none (the
map was flushed) asks for a full sync. Nothing is pinned: another process finds a
node's programs and maps by name and netns cookie (bpf/loader.py).
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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bpf import cgroup, loader, maps, syscall, xdpdrops
from bpf.setup import bcc_missing
from dataplanes import healthcheck
from dataplanes.base import DataplaneError, FullSyncNeeded, Host, NodeHandle, SyncStats
from kube.state import DROP, REJECT, EndpointView, NodeView, ServicePortView, view_order

if TYPE_CHECKING:
    from kube.tracker import NodeChanges

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

ViewKey = tuple[str, str, str, str, int]  # kube.tracker.ViewKey
Ident = tuple[bytes, int, int]  # (ClusterIP, port, protocol): what a Service id names

# A frontend's flags for the view's filter: with no backend, DROP_EMPTY drops, else it rejects.
_EMPTY_FLAGS = {None: 0, REJECT: 0, DROP: maps.SVC_F_DROP_EMPTY}
_PADDING = [maps.NO_BACKEND * (maps.LB4_INLINE - n) for n in range(maps.LB4_INLINE + 1)]
_SLOT = slice(6, 8)  # the slot field of a packed lb4_key
_KEY, _HEAD, _INLINE = maps.LB4_KEY.pack, maps.LB4_HEADER.pack, maps.LB4_INLINE
_REFS_MAX = 1 << 18  # packed backends kept per node before the cache starts again


def canary_value(token: int) -> bytes:
    """The canary's value: the token of the EbpfDataplane that last wrote the node."""
    return maps.LB4_HEADER.pack(0, 0, token, 0, 0) + _PADDING[0]


class _Delta:
    """What one apply changed in a node's desired state: each lb4_services key and range key
    touched with its value before (None / False: absent), host-path addresses that came or
    went, and whether the health-check table may have changed."""

    __slots__ = ("entries", "ranges", "routes_added", "routes_removed", "health", "whole")

    def __init__(self) -> None:
        self.whole = False  # every port rendered anew (nothing was known): entries not kept
        self.entries: dict[bytes, bytes | None] = {}
        self.ranges: dict[bytes, bool] = {}
        self.routes_added: set[str] = set()
        self.routes_removed: set[str] = set()
        self.health = False

    def writes(self, entries: dict[bytes, bytes]) -> tuple[list, list, list]:
        """(slot elements to write, other elements to write, keys to delete): what differs
        between the values before and `entries` now."""
        slots, heads, gone = [], [], []
        for key, before in self.entries.items():
            now = entries.get(key)
            if now == before:
                continue
            if now is None:
                gone.append(key)
            elif key[_SLOT] != b"\0\0":
                slots.append((key, now))
            else:
                heads.append((key, now))
        return slots, heads, gone


class _HealthView:
    """The part of a NodeView dataplanes/healthcheck.py reads: the ports with a
    health-check NodePort."""

    __slots__ = ("services",)

    def __init__(self, services: tuple[ServicePortView, ...]) -> None:
        self.services = services


@dataclass(eq=False)
class _Node:
    """One node's BPF objects and its desired state, kept exact by every sync and update.

    `entries` and `ranges` are what lb4_services and lb4_source_ranges must hold; `owned`
    says which Service port (ViewKey) rendered what. A key several ports render (two
    Services on one load-balancer IP and port) is `contested`: it holds the value of the
    port last in the view's order, as a whole render would. Source ranges, external
    addresses and Service ids are reference-counted, so a change costs work in proportion
    to the ports it touches, never a scan of the node's Services.
    """

    netns: str
    cookie: int
    objects: loader.NodeObjects | None
    canary: bytes = CANARY_VALUE
    routed: set[str] = field(default_factory=set)  # destinations of the host path
    host_link: int = 0  # ifindex of HOST_LINK, where the host path's routes point
    node_ip: str = ""
    service_cidr: str = ""  # the view's, as the last sync found it (updates route by it)
    entries: dict[bytes, bytes] = field(default_factory=dict)
    ranges: set[bytes] = field(default_factory=set)
    # Each Service port's view as last rendered: what it wrote follows from it again (the
    # render is a function of the view, its Service id and `node_ips`), so it is not kept.
    owned: dict[ViewKey, ServicePortView] = field(default_factory=dict)
    owner: dict[bytes, ViewKey] = field(default_factory=dict)
    contested: dict[bytes, dict[ViewKey, bytes]] = field(default_factory=dict)
    range_refs: dict[bytes, int] = field(default_factory=dict)
    external_refs: dict[str, int] = field(default_factory=dict)
    svc_ids: dict[Ident, int] = field(default_factory=dict)
    id_refs: dict[Ident, int] = field(default_factory=dict)  # ids held twice or more; else 1
    adopted: dict[Ident, int] = field(default_factory=dict)  # ids found in the kernel
    next_svc_id: int = 1
    health: dict[ViewKey, ServicePortView] = field(default_factory=dict)
    node_ips: tuple[str, ...] | None = None  # the NodePort addresses `owned` was rendered for
    planned: bool = False  # the memory holds a whole view (a sync ran)
    suspect: bool = False  # a write or an apply failed: only a sync may trust memory again
    refs: dict[tuple[str, int, bool], bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.entries[CANARY_KEY] = self.canary

    # ------------------------------------------------------------------ memory

    def reset(self) -> None:
        """Forget every port (ids are kept as adopted, so the next plan reuses them)."""
        self.adopted.update(self.svc_ids)
        self.entries = {CANARY_KEY: self.canary}
        self.ranges = set()
        self.owned, self.owner, self.contested = {}, {}, {}
        self.range_refs, self.external_refs = {}, {}
        self.svc_ids, self.id_refs, self.health = {}, {}, {}
        self.node_ips = None
        self.planned = self.suspect = False

    def adopt_ids(self, kernel: dict[bytes, bytes]) -> None:
        """Service ids the kernel holds (written by an earlier process) are reused for the
        same (ClusterIP, port, protocol), so conntrack and affinity entries stay valid."""
        header = maps.LB4_HEADER.unpack_from
        for key, value in kernel.items():
            if key == CANARY_KEY:
                continue
            address, port, slot, proto, scope, _ = maps.LB4_KEY.unpack(key)
            svc_id = header(value)[2]
            if slot == 0 and scope == maps.LB_SCOPE_ALL:
                self.adopted.setdefault((address, port, proto), svc_id)
            self.next_svc_id = max(self.next_svc_id, svc_id + 1)

    def plan(self, view: NodeView, delta: _Delta) -> int:
        """The memory follows the whole view (a sync): ports rendered again only when their
        view changed. Returns how many ports were (re)rendered or removed."""
        if view.node_ips != self.node_ips:
            if self.node_ips is not None:
                self.reset()
            self.node_ips = view.node_ips
        owned = self.owned
        delta.whole = not owned
        if delta.whole:  # nothing known: every port is new
            self._fresh(view.services, delta)
            self.adopted.clear()
            self.planned = True
            return len(view.services)
        changed = []
        for sp in view.services:
            vk = (sp.namespace, sp.service, sp.port_name, sp.protocol, sp.port)
            old = owned.get(vk)
            if old is not sp:
                if old is not None and old == sp:
                    owned[vk] = sp  # the same again: found by identity next time
                else:
                    changed.append(sp)
        self.apply(changed, (), delta)
        removed: list[ViewKey] = []
        if len(owned) != len(view.services):
            removed = list(owned.keys() - {(sp.namespace, sp.service, sp.port_name, sp.protocol,
                                             sp.port) for sp in view.services})
            self.apply((), removed, delta)
        self.adopted.clear()
        self.planned = True
        return len(changed) + len(removed)

    def _fresh(self, services: tuple[ServicePortView, ...], delta: _Delta) -> None:
        """`apply` of every port of a view to an empty memory, with the common port (a
        ClusterIP alone, 1 to LB4_INLINE endpoints, no health-check port) written out in
        one loop (a sync from nothing at 100,000 ports costs half as much); the other
        ports take `apply`."""
        owned, owner, entries = self.owned, self.owner, self.entries
        svc_ids, id_refs, adopted, cache = self.svc_ids, self.id_refs, self.adopted, self.refs
        protos, aton, htons = maps.IPPROTO, socket.inet_aton, socket.htons
        next_id = self.next_svc_id
        others = []
        for sp in services:
            proto = protos.get(sp.protocol)
            endpoints = sp.internal_endpoints
            count = len(endpoints)
            if (proto is None or not count or count > _INLINE or sp.node_port is not None
                    or sp.external_ips or sp.load_balancer_ips
                    or sp.health_check_node_port is not None):
                others.append(sp)
                continue
            vip, vport = aton(sp.cluster_ip), htons(sp.port)
            ident = (vip, vport, proto)
            svc_id = svc_ids.get(ident)
            if svc_id is None:
                svc_id = adopted.pop(ident, None) if adopted else None
                if svc_id is None:
                    svc_id = next_id
                    next_id += 1
                svc_ids[ident] = svc_id
            else:
                id_refs[ident] = id_refs.get(ident, 1) + 1
            try:
                refs = [cache[(ep.ip, ep.port, ep.local)] for ep in endpoints]
            except KeyError:
                refs = self._refs_of(endpoints)
            if sp.affinity_timeout_s is None:
                flags, timeout = 0, 0
            else:
                flags, timeout = maps.SVC_F_AFFINITY, sp.affinity_timeout_s
            key = _KEY(vip, vport, 0, proto, 0, 0)
            value = _HEAD(count, flags, svc_id, timeout, 0) + b"".join(refs) + _PADDING[count]
            vk = (sp.namespace, sp.service, sp.port_name, sp.protocol, sp.port)
            owned[vk] = sp
            if key in owner:
                self._claim(key, vk, value, delta)
            else:
                owner[key] = vk
                entries[key] = value
        self.next_svc_id = next_id
        self.apply(others, (), delta)

    def apply(self, updated: Iterable[ServicePortView], removed: Iterable[ViewKey],
              delta: _Delta) -> None:
        """Ports changed or new, and ports gone: the memory and `delta` follow."""
        owned = self.owned
        for vk in removed:
            if vk in owned:
                self._retract(vk, delta)
        svc_ids, id_refs = self.svc_ids, self.id_refs
        for sp in updated:
            vk = (sp.namespace, sp.service, sp.port_name, sp.protocol, sp.port)
            old = owned.get(vk)
            if old is not None and old == sp:
                owned[vk] = sp
                continue
            ident = _ident(sp)
            svc_id = 0
            if ident is not None:
                # Held before the old version lets go of it: a changed port keeps its id.
                svc_id = svc_ids.get(ident)
                if svc_id is None:
                    svc_id = self._new_id(ident)
                else:
                    id_refs[ident] = id_refs.get(ident, 1) + 1
            if old is not None:
                self._retract(vk, delta)
            self._place(vk, sp, ident, svc_id, delta)

    def _new_id(self, ident: Ident) -> int:
        svc_id = self.adopted.pop(ident, None)
        if svc_id is None:
            svc_id = self.next_svc_id
            self.next_svc_id += 1
        self.svc_ids[ident] = svc_id
        return svc_id

    def _release_id(self, ident: Ident) -> None:
        left = self.id_refs.pop(ident, 1) - 1
        if left > 1:
            self.id_refs[ident] = left
        elif not left:
            del self.svc_ids[ident]  # ids only grow: a Service that comes back gets a new one

    def _place(self, vk: ViewKey, sp: ServicePortView, ident: Ident | None, svc_id: int,
               delta: _Delta) -> None:
        self.owned[vk] = sp
        if sp.health_check_node_port is not None:
            self.health[vk] = sp
            delta.health = True
        if ident is None:
            return  # SCTP: nothing rendered
        items, ranges, external = self.render(sp, ident, svc_id)
        owner = self.owner
        entries = self.entries
        record = delta.entries
        for key, value in items.items():
            if key in owner:
                self._claim(key, vk, value, delta)
            else:
                owner[key] = vk
                if not delta.whole and key not in record:
                    record[key] = entries.get(key)
                entries[key] = value
        for key in ranges:
            n = self.range_refs.get(key, 0)
            self.range_refs[key] = n + 1
            if not n:
                delta.ranges.setdefault(key, key in self.ranges)
                self.ranges.add(key)
        for ip in external:
            n = self.external_refs.get(ip, 0)
            self.external_refs[ip] = n + 1
            if not n:
                if ip in delta.routes_removed:
                    delta.routes_removed.discard(ip)
                else:
                    delta.routes_added.add(ip)

    def _retract(self, vk: ViewKey, delta: _Delta) -> None:
        """Take back what the port's view rendered (rendered again to know it: the same
        view, Service id and node addresses give the same keys)."""
        sp = self.owned.pop(vk)
        if self.health.pop(vk, None) is not None:
            delta.health = True
        ident = _ident(sp)
        if ident is None:
            return
        items, ranges, external = self.render(sp, ident, self.svc_ids[ident])
        owner, contested, entries, record = self.owner, self.contested, self.entries, delta.entries
        for key in items:
            if key in contested:
                self._unclaim(key, vk, delta)
            else:
                del owner[key]
                if key not in record:
                    record[key] = entries.get(key)
                del entries[key]
        for key in ranges:
            n = self.range_refs[key] - 1
            if n:
                self.range_refs[key] = n
            else:
                del self.range_refs[key]
                delta.ranges.setdefault(key, True)
                self.ranges.discard(key)
        for ip in external:
            n = self.external_refs[ip] - 1
            if n:
                self.external_refs[ip] = n
            else:
                del self.external_refs[ip]
                if ip in delta.routes_added:
                    delta.routes_added.discard(ip)
                else:
                    delta.routes_removed.add(ip)
        self._release_id(ident)

    def _claim(self, key: bytes, vk: ViewKey, value: bytes, delta: _Delta) -> None:
        """A second (third...) port renders `key`: the last in the view's order wins."""
        offers = self.contested.get(key)
        if offers is None:
            offers = self.contested[key] = {self.owner[key]: self.entries[key]}
        offers[vk] = value
        self._crown(key, offers, delta)

    def _unclaim(self, key: bytes, vk: ViewKey, delta: _Delta) -> None:
        offers = self.contested[key]
        del offers[vk]
        if len(offers) == 1:
            del self.contested[key]
        self._crown(key, offers, delta)

    def _crown(self, key: bytes, offers: dict[ViewKey, bytes], delta: _Delta) -> None:
        owned = self.owned
        winner = max(offers, key=lambda vk: view_order(owned[vk]))
        self.owner[key] = winner
        delta.entries.setdefault(key, self.entries.get(key))
        self.entries[key] = offers[winner]

    # ------------------------------------------------------------------ the kernel

    def program(self, view: NodeView) -> tuple[int, int]:
        """The maps follow the whole view (what a sync does to them): lb4_services read
        back, the memory rebuilt when another writer's canary is found, the plan, and the
        difference written. Returns (elements written, of which repairs)."""
        kernel = dict(self.objects.map("lb4_services").dump())
        found = kernel.get(CANARY_KEY, self.canary)
        if self.suspect or found != self.canary:
            # Another process wrote the node since (its ids win), or an update failed
            # halfway: the memory is rebuilt from the view.
            self.reset()
            if found != self.canary:
                self.adopted.clear()
        if not self.planned:
            self.adopt_ids(kernel)
        delta = _Delta()
        self.plan(view, delta)
        return self.converge(kernel, delta)

    def converge(self, kernel: dict[bytes, bytes], delta: _Delta) -> tuple[int, int]:
        """Write what differs between the desired state and the kernel's (`kernel`:
        lb4_services as read back). Returns (elements written, of which repairs: elements
        this sync's plan did not touch, so someone else had changed them)."""
        entries = self.entries
        slots: list[tuple[bytes, bytes]] = []
        heads: list[tuple[bytes, bytes]] = []
        gone: list[bytes] = []
        if kernel != entries:
            for key, value in entries.items():
                if kernel.get(key) != value:
                    (slots if key[_SLOT] != b"\0\0" else heads).append((key, value))
            gone = [key for key in kernel if key not in entries]
        have = set(self.objects.map("lb4_source_ranges").keys())
        added, dropped = self.ranges - have, have - self.ranges
        self.write(slots, heads, gone, added, dropped)
        written = [k for k, _ in slots] + [k for k, _ in heads] + gone
        repairs = 0
        if not delta.whole:
            repairs = sum(1 for k in written if k not in delta.entries and k != CANARY_KEY)
            repairs += sum(1 for k in (*added, *dropped) if k not in delta.ranges)
        canary = kernel.get(CANARY_KEY) != entries[CANARY_KEY]  # bookkeeping, not counted
        return len(written) - canary + len(added) + len(dropped), repairs

    def write(self, slots: list, heads: list, gone: list, added: Iterable[bytes],
              dropped: Iterable[bytes]) -> None:
        """Overflow slots before the entries that count them, then delete what went (an
        entry's count never points past what exists). Source ranges come before the
        frontends that check them and go after them: a flagged frontend never meets an
        empty trie it should not."""
        services_map = self.objects.map("lb4_services")
        ranges_map = self.objects.map("lb4_source_ranges")
        try:
            for key in sorted(added):  # an LPM trie takes no batch updates
                ranges_map.update(key, maps.LB4_RANGE)
            services_map.update_batch(slots)
            services_map.update_batch(heads)
            if gone:
                try:
                    services_map.delete_batch(gone)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    for key in gone:  # someone deleted one already: the others one by one
                        services_map.delete(key)
            for key in sorted(dropped):
                ranges_map.delete(key)
        except OSError as exc:
            self.suspect = True  # the next sync reads the kernel back
            raise DataplaneError(f"ebpf: lb4_services update failed: {exc}") from None

    def destinations(self, service_cidr: str) -> list[str]:
        """What host-network traffic is routed to the XDP host path: the Service CIDR, the
        externalIPs and load-balancer IPs outside it, and HAIRPIN_IP, to which an endpoint at
        the node's own address (a hostNetwork pod) answers the clients SNATed to it."""
        net = ipaddress.ip_network(service_cidr)
        extra = sorted(ip for ip in self.external_refs if ipaddress.ip_address(ip) not in net)
        return [service_cidr, *(f"{ip}/32" for ip in extra), f"{HAIRPIN_IP}/32"]

    def health_view(self) -> _HealthView:
        return _HealthView(tuple(sorted(self.health.values(), key=view_order)))

    # ------------------------------------------------------------------ rendering

    def render(self, sp: ServicePortView, ident: Ident, svc_id: int
               ) -> tuple[dict[bytes, bytes], tuple[bytes, ...], tuple[str, ...]]:
        """One Service port as lb4_services elements (packed key -> packed value), its
        lb4_source_ranges keys and its external addresses. One element per frontend with up
        to LB4_INLINE backends; backends are packed once per node and reused."""
        items: dict[bytes, bytes] = {}
        vip, vport, proto = ident
        if sp.affinity_timeout_s is None:
            flags, timeout = 0, 0
        else:
            flags, timeout = maps.SVC_F_AFFINITY, sp.affinity_timeout_s
        refs = self._refs_of(sp.internal_endpoints)
        count = len(refs)
        if count and count <= _INLINE:
            items[_KEY(vip, vport, 0, proto, 0, 0)] = (
                _HEAD(count, flags, svc_id, timeout, 0) + b"".join(refs) + _PADDING[count])
        else:
            _frontend(items, vip, vport, proto, maps.LB_SCOPE_ALL, svc_id,
                      flags | _EMPTY_FLAGS[sp.internal_traffic_filter], timeout, refs)
        if sp.node_port is None and not sp.external_ips and not sp.load_balancer_ips:
            return items, (), ()  # not sp.has_external, without the property's call
        flags |= maps.SVC_F_EXTERNAL
        outside = self._refs_of(sp.external_endpoints)
        outside_flags = flags | _EMPTY_FLAGS[sp.external_traffic_filter]
        # Pods and the node itself are short-circuited to the cluster-wide set.
        inside = (None if sp.cluster_endpoints == sp.external_endpoints
                  else self._refs_of(sp.cluster_endpoints))
        # (address, port, extra flags): load-balancer IPs serve like externalIPs, and with
        # loadBalancerSourceRanges only sources inside them (the NodePort is not filtered).
        frontends = [(ip, sp.port, 0) for ip in sp.external_ips]
        ranges: tuple[bytes, ...] = ()
        if sp.load_balancer_ips:
            firewall = 0
            if sp.load_balancer_source_ranges:
                firewall = maps.SVC_F_SOURCE_RANGES
                ranges = _source_ranges(svc_id, sp.load_balancer_source_ranges)
            frontends += [(ip, sp.port, firewall) for ip in sp.load_balancer_ips]
        if sp.node_port is not None:
            frontends += [(ip, sp.node_port, 0) for ip in self.node_ips or ()]
        for ip, port, extra in frontends:
            address = socket.inet_aton(ip)
            port = socket.htons(port)
            _frontend(items, address, port, proto, maps.LB_SCOPE_ALL, svc_id,
                      outside_flags | extra, timeout, outside)
            if inside is not None:
                _frontend(items, address, port, proto, maps.LB_SCOPE_INTERNAL, svc_id,
                          flags | extra, timeout, inside)
        return items, ranges, tuple(dict.fromkeys((*sp.external_ips, *sp.load_balancer_ips)))

    def _refs_of(self, endpoints: tuple[EndpointView, ...]) -> list[bytes]:
        cache = self.refs
        try:
            return [cache[(ep.ip, ep.port, ep.local)] for ep in endpoints]
        except KeyError:
            pass
        if len(cache) >= _REFS_MAX:
            cache.clear()
        pack, aton, htons = maps.LB4_BACKEND.pack, socket.inet_aton, socket.htons
        out = []
        for ep in endpoints:
            key = (ep.ip, ep.port, ep.local)
            ref = cache.get(key)
            if ref is None:
                ref = cache[key] = pack(aton(ep.ip), htons(ep.port),
                                        maps.BE_F_LOCAL if ep.local else 0, 0)
            out.append(ref)
        return out


def _ident(sp: ServicePortView) -> Ident | None:
    """What the port's Service id names; None for a protocol this mode skips (SCTP)."""
    proto = maps.IPPROTO.get(sp.protocol)
    if proto is None:
        return None
    return (socket.inet_aton(sp.cluster_ip), socket.htons(sp.port), proto)


def _source_ranges(svc_id: int, ranges: tuple[str, ...]) -> tuple[bytes, ...]:
    """One LPM trie key per allowed network: the whole Service id, then its prefix."""
    pack = maps.LB4_RANGE_KEY.pack
    out = {}
    for cidr in ranges:
        net = ipaddress.ip_network(cidr)
        out[pack(32 + net.prefixlen, svc_id, net.network_address.packed)] = None
    return tuple(out)


def _frontend(items: dict[bytes, bytes], address: bytes, port: int, proto: int, scope: int,
              svc_id: int, flags: int, timeout: int, refs: list[bytes]) -> None:
    count = len(refs)
    key = maps.LB4_KEY.pack
    inline = maps.LB4_INLINE
    items[key(address, port, 0, proto, scope, 0)] = (
        maps.LB4_HEADER.pack(count, flags, svc_id, timeout, 0) + b"".join(refs[:inline])
        + _PADDING[min(count, inline)])
    if count > inline:
        slot_head = maps.LB4_HEADER.pack(0, 0, svc_id, 0, 0)
        for slot in range(inline + 1, count + 1):
            items[key(address, port, slot, proto, scope, 0)] = (
                slot_head + refs[slot - 1] + _PADDING[1])


class _Render:
    """One NodeView rendered whole into a scratch node state (for tests and tools):
    `entries` (lb4_services, the canary included), `ranges`, `svc_ids`, `slot_keys`.
    Service ids carry over from `st.svc_ids`."""

    def __init__(self, st: _Node, view: NodeView):
        scratch = _Node(st.netns, st.cookie, None, canary=st.canary)
        scratch.adopted = dict(st.svc_ids)
        scratch.next_svc_id = st.next_svc_id
        scratch.plan(view, _Delta())
        self.entries = scratch.entries
        self.ranges = scratch.ranges
        self.svc_ids = scratch.svc_ids
        self.slot_keys = {k for k in scratch.entries if k[_SLOT] != b"\0\0" and k != CANARY_KEY}
        self.external_ips = set(scratch.external_refs)
        self._scratch = scratch

    def host_destinations(self, service_cidr: str) -> list[str]:
        return self._scratch.destinations(service_cidr)


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


def _plumb_host_path(node_ip: str, destinations: list[str] | None,
                     node_ports: tuple[int, int] | None, ipr=None,
                     links: dict[str, tuple[int, int, int]] | None = None) -> list[str]:
    """Runs in the node: the veth pair, its permanent neighbour, the rule and the routes to
    `destinations`, and the NodePort rules for the range `node_ports` (see
    _plumb_node_ports). None leaves the routes, or the NodePort rules, as they are: before
    a sync no view has said which they are."""
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
        if destinations is not None:
            have = {
                f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
                for r in route.get_routes(family=socket.AF_INET, table=HOST_TABLE)
            }
            for dst in destinations:
                if dst not in have:
                    route.route("replace", dst=dst, table=HOST_TABLE, gateway=HOST_GATEWAY,
                                oif=tx, flags=RTNH_F_ONLINK, prefsrc=node_ip)
            for dst in have - set(destinations):
                route.route("del", dst=dst, table=HOST_TABLE)
        if node_ports is not None:
            done += _plumb_node_ports(route, node_ip, tx, node_ports)
    return done


def _rule_priority(rule) -> int:
    return rule.get_attr("FRA_PRIORITY") or 0


def _rule_table(rule) -> int:
    return rule.get_attr("FRA_TABLE") or rule["table"]


def _plumb_node_ports(route, node_ip: str, tx: int, node_ports: tuple[int, int]) -> list[str]:
    """Runs in the node: host processes' packets to the node IP's NodePort range (the
    view's) take the host path (see NODEPORT_TABLE); the local rule moves behind them. A
    rule for another address or range goes."""
    done = []
    rules = route.get_rules(family=socket.AF_INET)
    local = {_rule_priority(r) for r in rules if _rule_table(r) == RT_TABLE_LOCAL}
    if LOCAL_RULE_PRIORITY not in local:
        route.rule("add", table=RT_TABLE_LOCAL, priority=LOCAL_RULE_PRIORITY)
        done.append(f"moved the local table's rule to priority {LOCAL_RULE_PRIORITY}")
    if 0 in local:
        route.rule("del", table=RT_TABLE_LOCAL, priority=0)
    low, high = node_ports
    wanted = {socket.IPPROTO_TCP, socket.IPPROTO_UDP}
    for rule in rules:
        if _rule_priority(rule) != NODEPORT_RULE_PRIORITY:
            continue
        proto = rule.get_attr("FRA_IP_PROTO")
        dports = rule.get_attr("FRA_DPORT_RANGE")
        if rule.get_attr("FRA_DST") == node_ip and dports == f"{low}:{high}" and proto in wanted:
            wanted.discard(proto)
        else:  # the node's address or the range changed: the rule names the old one
            _del_node_port_rule(route, rule)
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


def _del_node_port_rule(route, rule) -> None:
    """Delete one NodePort rule, named by what it matches (its own range, whatever the
    view's is now)."""
    dports = rule.get_attr("FRA_DPORT_RANGE")
    route.rule("del", table=NODEPORT_TABLE, priority=NODEPORT_RULE_PRIORITY, iifname="lo",
               dst=rule.get_attr("FRA_DST"), dst_len=32, ip_proto=rule.get_attr("FRA_IP_PROTO"),
               **({"dport_range": dports} if dports else {}))


def _unplumb_host_path() -> None:
    """Runs in the node: remove the rule, the table and the pair (neighbour goes with it)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        rules = ipr.get_rules(family=socket.AF_INET)
        for r in rules:
            if r.get_attr("FRA_PRIORITY") == HOST_RULE_PRIORITY:
                ipr.rule("del", table=HOST_TABLE, priority=HOST_RULE_PRIORITY, iifname="lo")
        for r in rules:
            if _rule_priority(r) == NODEPORT_RULE_PRIORITY:
                _del_node_port_rule(ipr, r)
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


def _reroute(node_ip: str, host_link: int, add: list[str], remove: list[str]) -> None:
    """Runs in the node: the host path's routes to externalIPs and load-balancer IPs that
    came or went (an update's share of _plumb_host_path; the next sync checks them all)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as route:
        for dst in add:
            if host_link:
                route.route("replace", dst=dst, table=HOST_TABLE, gateway=HOST_GATEWAY,
                            oif=host_link, flags=RTNH_F_ONLINK, prefsrc=node_ip)
        for dst in remove:
            try:
                route.route("del", dst=dst, table=HOST_TABLE)
            except NetlinkError:
                pass  # gone already


def _plumbing_state(program_names: dict[int, str]) -> dict[str, Any]:
    """Runs in the node: what the mode hooked into it outside the maps, normalised: the
    program on each link with XDP, the policy rules and routes of the host path, the
    sysctls this mode sets."""
    from pyroute2 import IPRoute

    with IPRoute() as route:
        xdp = {name: program_names.get(prog_id, f"foreign program {mode}")
               for name, (_index, prog_id, mode) in _xdp_state(route).items() if prog_id}
        rules = sorted(
            f"{_rule_priority(r)}: iif {r.get_attr('FRA_IFNAME')} dst {r.get_attr('FRA_DST')} "
            f"ipproto {r.get_attr('FRA_IP_PROTO')} dport {r.get_attr('FRA_DPORT_RANGE')} "
            f"table {_rule_table(r)}"
            for r in route.get_rules(family=socket.AF_INET)
            if _rule_table(r) in (HOST_TABLE, NODEPORT_TABLE, RT_TABLE_LOCAL))
        routes = {
            str(table): sorted(f"{r.get_attr('RTA_DST')}/{r['dst_len']} via "
                               f"{r.get_attr('RTA_GATEWAY')} src {r.get_attr('RTA_PREFSRC')}"
                               for r in route.get_routes(family=socket.AF_INET, table=table))
            for table in (HOST_TABLE, NODEPORT_TABLE)
        }
    uplink = next((n for n in xdp if xdp[n] == "svb_xdp_host"), "eth0")
    sysctls = {path.format(uplink=uplink): _read_sysctl(path.format(uplink=uplink))
               for path, _value in SYSCTLS}
    return {"xdp": xdp, "rules": rules, "routes": routes, "sysctls": sysctls}


def _node_state(node_ip: str, destinations: list[str] | None,
                node_ports: tuple[int, int] | None) -> tuple[int, dict, list[str]]:
    """Runs in the node, once per sync: (netns cookie, XDP per link, host-path changes)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = _xdp_state(ipr)
        done = _plumb_host_path(node_ip, destinations, node_ports, ipr, links)
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
    balancing = "random"  # bpf_get_prandom_u32() % count (bpf/lib/lb.h)
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
        # Written into each node's canary: an update finding another token there knows that
        # another process (or data plane object) wrote the node since, and asks for a sync.
        self._token = int.from_bytes(os.urandom(4), "little") or 1

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
            # No view yet: the host path's routes and NodePort rules wait for the first sync,
            # which knows the cluster's Service CIDR and NodePort range.
            self._ensure(node, node.ip, None, None)

    def sync(self, node: NodeHandle, view: NodeView) -> SyncStats:
        """Converge the node to the view: hooks and host path repaired, the memory follows
        the view (ports whose view is unchanged are not rendered again), and lb4_services
        and lb4_source_ranges, read back whole, get what differs from it, so an element
        someone else deleted or changed is written again."""
        start = time.perf_counter()
        with self._lock:
            st = self._nodes.get(node.netns)
            # The routes as this object left them (repaired here); with none yet, or another
            # Service CIDR, the routes the view asks for are written once it is programmed.
            routed = sorted(st.routed) if st is not None and st.routed else None
            st, repaired = self._ensure(node, view.node_ip, routed, view.node_port_range)
            self._configure(st, view)
            st.node_ip, st.service_cidr = view.node_ip, view.service_cidr
            collecting = gc.isenabled()
            gc.disable()  # the render allocates only acyclic objects: skip the scans
            try:
                written, repairs = st.program(view)
            except BaseException:
                st.suspect = True
                raise
            finally:
                if collecting:
                    gc.enable()
            if repairs:
                repaired.append(f"rewrote {repairs} map elements that differed from the view")
            routed = set(st.destinations(view.service_cidr))
            if routed != st.routed:
                repaired += node.call(_plumb_host_path, view.node_ip, sorted(routed),
                                      view.node_port_range)
                st.routed = routed
            health = st.health_view()
        healthcheck.sync(node, health)
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - start,
            full=True,
            services=len(view.services),
            rules=len(st.entries),
            changed=written,
            extra={"repaired": repaired} if repaired else {},
        )

    def update(self, node: NodeHandle, changes: NodeChanges) -> SyncStats:
        """Apply one node's changed and removed Service ports: each is rendered alone and
        only the map elements, range keys and host-path routes it adds, changes or drops
        are written (one batch each), in time that grows with the changes, not with the
        node's Services. Raises FullSyncNeeded when this object has not synced the node,
        when a write failed before, or when the canary says the map was flushed or written
        by another process since. An element deleted by someone else is not looked for
        (that would read the whole map back): the next sync finds and repairs it."""
        start = time.perf_counter()
        with self._lock:
            st = self._nodes.get(node.netns)
            if st is None or not st.planned or st.suspect:
                raise FullSyncNeeded(f"ebpf has no memory of {node.name}")
            if st.objects.map("lb4_services").lookup(CANARY_KEY) != st.canary:
                raise FullSyncNeeded(f"lb4_services of {node.name} was flushed or written by "
                                     "another process")
            delta = _Delta()
            try:
                st.apply(changes.updated.values(), changes.removed, delta)
                slots, heads, gone = delta.writes(st.entries)
                added = [k for k, was in delta.ranges.items() if not was and k in st.ranges]
                dropped = [k for k, was in delta.ranges.items() if was and k not in st.ranges]
                st.write(slots, heads, gone, added, dropped)
            except BaseException:
                st.suspect = True  # memory and kernel may differ: the next sync rebuilds
                raise
            if delta.routes_added or delta.routes_removed:
                net = ipaddress.ip_network(st.service_cidr)
                add = {f"{ip}/32" for ip in delta.routes_added
                       if ipaddress.ip_address(ip) not in net}
                remove = {f"{ip}/32" for ip in delta.routes_removed
                          if ipaddress.ip_address(ip) not in net}
                if add or remove:
                    node.call(_reroute, st.node_ip, st.host_link, sorted(add), sorted(remove))
                    st.routed = (st.routed | add) - remove
            health = st.health_view() if delta.health else None
        if health is not None:
            healthcheck.sync(node, health)
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - start,
            full=False,
            services=len(st.owned),
            rules=len(st.entries),
            changed=len(slots) + len(heads) + len(gone) + len(added) + len(dropped),
            extra={"ports": changes.count},
        )

    def kernel_state(self, node: NodeHandle) -> dict[str, Any]:
        """The node as the kernel holds it, normalised (see `map_state`): frontends with
        their backends, flags and affinity, grouped by the Service id they share, with
        their source ranges; node_config; the XDP program on each link, the socket hooks
        of this node, the host path's rules and routes, the sysctls; and the health
        server's ports. No ids, handles or counters, so a restart compares equal."""
        with self._lock:
            cookie = node.call(netns_cookie)
            st = self._nodes.get(node.netns)
            own = st is not None and st.cookie == cookie
            objects = st.objects if own else loader.find_node_objects(
                cookie, loader.compile_object())
            state: dict[str, Any] = {"loaded": objects is not None}
            if objects is not None:
                try:
                    state.update(map_state(objects))
                    state["config"] = _config_state(objects.config())
                    state["socket_hooks"] = self._hook_state(node, cookie)
                finally:
                    if not own:
                        objects.close()
        state.update(node.call(_plumbing_state, _suite_program_names()))
        health = healthcheck.status(node)
        state["health_ports"] = health.get("ports") if health else None
        return state

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

    def summary(self, node: NodeHandle) -> dict[str, Any]:
        """For `svcbench status`: the XDP program on each link, the socket hooks of this
        node, and each map's entry count against its size (one batch read per map: BPF
        keeps no count), and the health server. `loaded` is False when the node has no
        programs of this build."""
        with self._lock:
            cookie = node.call(netns_cookie)
            names = _suite_program_names()
            xdp = {link: names.get(prog_id, f"foreign program {prog_id}")
                   for link, (_index, prog_id, _mode) in node.call(_xdp_state).items()
                   if prog_id}
            st = self._nodes.get(node.netns)
            own = st is not None and st.cookie == cookie
            objects = st.objects if own else loader.find_node_objects(
                cookie, loader.compile_object())
            out: dict[str, Any] = {"loaded": objects is not None, "xdp": xdp,
                                   "xdp_programs": len(xdp)}
            if objects is not None:
                try:
                    entries = {}
                    for name, m in objects.maps.items():
                        if not m.key_size:
                            continue  # the ring buffer: no entries
                        count = len(m.keys()) if name == "lb4_source_ranges" else len(m.dump())
                        info = syscall.map_info(m.fd)
                        entries[name] = {"entries": count, "max": info["max_entries"]}
                    entries["lb4_services"]["entries"] -= 1 if objects.map(
                        "lb4_services").lookup(CANARY_KEY) is not None else 0
                    out["maps"] = entries
                    hooks = self._hook_state(node, cookie)
                    out["socket_hooks"] = sum(len(v) for v in hooks.values())
                    out["programs_loaded"] = len(objects.programs)
                finally:
                    if not own:
                        objects.close()
        out["health_server"] = healthcheck.summary(node)
        return out

    def drop_reporter(self, node: NodeHandle) -> xdpdrops.XdpDropReader | None:
        """What the node's XDP programs drop, as `svcbench monitor --type drop` shows it
        (the ring buffer of bpf/lib/drop.h; see dataplanes/base.py); None when the mode is
        not loaded on the node."""
        fd = xdpdrops.find_ring(node.call(netns_cookie))
        return None if fd is None else xdpdrops.XdpDropReader(fd)

    # ------------------------------------------------------------------ internals

    def _ensure(self, node: NodeHandle, node_ip: str, destinations: list[str] | None,
                node_ports: tuple[int, int] | None) -> tuple[_Node, list[str]]:
        """The node's objects loaded, XDP on the uplink, the host path and every pod veth,
        socket hooks attached: what is missing is put back, and named in the result.
        `destinations` and `node_ports`: the host path's routes and NodePort range (None:
        left as they are, see _plumb_host_path)."""
        cookie, xdp, repaired = node.call(_node_state, node_ip, destinations, node_ports)
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
            st = self._nodes[node.netns] = _Node(node.netns, cookie, objects,
                                                 canary=canary_value(self._token),
                                                 routed=set(destinations or ()))
        st.host_link = xdp[HOST_LINK][0] if HOST_LINK in xdp else 0
        config = st.objects.config()
        if not config.saved_sysctls & SAVED_MARK:
            config.saved_sysctls = node.call(_set_sysctls, node.uplink)
            st.objects.set_config(config)
        repaired += self._attach_xdp(node, st.objects, xdp)
        repaired += self._attach_sock_hooks(node, st.objects)
        return st, repaired

    def _configure(self, st: _Node, view: NodeView) -> None:
        """node_config follows the view: the node IP (NodePort SNAT) and the cluster CIDR
        (sources inside it are in-cluster clients: internal frontends, no masquerade)."""
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
        # No view yet, so no cluster CIDR: no source but 0.0.0.0 counts as in-cluster until
        # the first sync writes the view's (before its frontends, so none meets this one).
        config.cluster_cidr[:] = bytes(4)
        config.cluster_mask[:] = b"\xff" * 4
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

    def _hook_state(self, node: NodeHandle, cookie: int) -> dict[str, list[str]]:
        """The suite's socket hooks of this node attached to the run's cgroup, by type."""
        try:
            path = cgroup.group_path(run_group(node.netns))
        except FileNotFoundError:
            return {}
        if not os.path.isdir(path):
            return {}
        names = _suite_program_names()
        out = {}
        for prog, attach_type in SOCK_ATTACH.items():
            out[prog] = sorted(names.get(i, "?") for i in cgroup.attached(path, attach_type)
                               if _same_node(i, cookie))
        return out

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


def _backend_name(value: bytes, offset: int) -> str:
    ip, port, flags, _pad = maps.LB4_BACKEND.unpack_from(value, offset)
    local = " local" if flags & maps.BE_F_LOCAL else ""
    return f"{socket.inet_ntoa(ip)}:{socket.ntohs(port)}{local}"


_FLAG_NAMES = ((maps.SVC_F_AFFINITY, "affinity"), (maps.SVC_F_DROP_EMPTY, "drop-empty"),
               (maps.SVC_F_EXTERNAL, "external"), (maps.SVC_F_SOURCE_RANGES, "source-ranges"))


def map_state(objects: loader.NodeObjects) -> dict[str, Any]:
    """lb4_services and lb4_source_ranges as the kernel holds them, normalised (see
    `normalise_maps`)."""
    return normalise_maps(objects.map("lb4_services").dump(),
                          objects.map("lb4_source_ranges").keys())


def normalise_maps(services: Iterable[tuple[bytes, bytes]], range_keys: Iterable[bytes]
                   ) -> dict[str, Any]:
    """lb4_services elements and lb4_source_ranges keys, normalised so that two nodes
    that forward alike compare equal: each frontend (address:port/protocol, scope)
    with its flags, affinity timeout and backends (address:port, "local"; slot entries
    resolved, sorted: a new flow picks any slot alike); frontends grouped by the Service
    id they share (conntrack and affinity follow it), with the group's source ranges;
    the id itself left out. What a frontend does not reach is listed apart: slot entries
    past its count or without a frontend, source ranges of no frontend's id."""
    heads: dict[tuple, bytes] = {}
    slots: dict[tuple, dict[int, str]] = {}
    canary = False
    for key, value in services:
        if key == CANARY_KEY:
            canary = True
            continue
        address, port, slot, proto, scope, _ = maps.LB4_KEY.unpack(key)
        frontend = (address, port, proto, scope)
        if slot:
            slots.setdefault(frontend, {})[slot] = _backend_name(value, maps.LB4_HEADER.size)
        else:
            heads[frontend] = value
    ranges: dict[int, list[str]] = {}
    for key in range_keys:
        prefixlen, svc_id, address = maps.LB4_RANGE_KEY.unpack(key)
        ranges.setdefault(svc_id, []).append(f"{socket.inet_ntoa(address)}/{prefixlen - 32}")
    groups: dict[int, list[dict]] = {}
    for frontend, value in heads.items():
        address, port, proto, scope = frontend
        count, flags, svc_id, timeout, _pad = maps.LB4_HEADER.unpack_from(value)
        extra = slots.pop(frontend, {})
        backends = []
        for i in range(1, count + 1):
            if i <= maps.LB4_INLINE:
                offset = maps.LB4_HEADER.size + (i - 1) * maps.LB4_BACKEND.size
                backends.append(_backend_name(value, offset))
            else:
                backends.append(extra.pop(i, "missing slot"))
        row = {
            "frontend": f"{socket.inet_ntoa(address)}:{socket.ntohs(port)}/"
                        f"{maps.PROTO_NAME.get(proto, proto)}",
            "scope": "internal" if scope == maps.LB_SCOPE_INTERNAL else "all",
            "flags": [name for bit, name in _FLAG_NAMES if flags & bit],
            "affinity_timeout_s": timeout if flags & maps.SVC_F_AFFINITY else None,
            "backends": sorted(backends),
        }
        if extra:
            row["unused_slots"] = sorted(extra.values())
        groups.setdefault(svc_id, []).append(row)
    services = []
    for svc_id, rows in groups.items():
        rows.sort(key=lambda r: (r["frontend"], r["scope"]))
        services.append({"frontends": rows, "source_ranges": sorted(ranges.pop(svc_id, []))})
    services.sort(key=lambda g: (g["frontends"][0]["frontend"], g["frontends"][0]["scope"]))
    return {
        "canary": canary,
        "services": services,
        "slots_without_frontend": sorted(
            f"{socket.inet_ntoa(f[0])}:{socket.ntohs(f[1])}/{f[2]}/{f[3]} slot {slot}"
            for f, per in slots.items() for slot in per),
        "source_ranges_without_frontend": sorted(c for per in ranges.values() for c in per),
    }


def _config_state(config: maps.NodeConfig) -> dict[str, Any]:
    return {"node_ip": maps.ip_str(config.node_ip), "hairpin_ip": maps.ip_str(config.hairpin_ip),
            "cluster_cidr": (f"{maps.ip_str(config.cluster_cidr)}/"
                             f"{maps.ip_str(config.cluster_mask)}"),
            "snat_ports": [config.snat_port_min, config.snat_port_max],
            "saved_sysctls": bool(config.saved_sysctls & SAVED_MARK)}


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
