"""The userspace proxy process: one per node, in the node's network namespace.

iptables REDIRECTs every Service connection and datagram to one port of this process
(dataplanes/userspace.py writes the rules). For TCP the original VIP:port comes back from
SO_ORIGINAL_DST; for UDP, which SO_ORIGINAL_DST does not serve, from the same conntrack
entry asked for by its reply tuple over ctnetlink. Either way the 6 raw bytes
(port, address) are the key of one dict: the lookup costs the same for 1 or 10,000
Services.

A backend is chosen round robin (or at random, with `--balancing random`), or by ClientIP
affinity; one that refuses or does not answer within the connect timeout costs a retry
with the next one, not a failed connection. TCP is spliced in both directions with
half-close; UDP gets one session (a connected socket towards the backend) per client
address, closed after an idle timeout.

Control: JSON lines on the abstract Unix socket CONTROL_NAME, which lives in the node's
network namespace and so needs no file and cannot collide with another node's proxy.
Ops: ping, table (the whole table; established connections keep their backend), delta
(entries changed and gone, applied in place by the sender that knows the table), dump (the
table as served), stats, events (connections and flows it refused, for `svcbench monitor
--type drop`), stop. The process exits when its network namespace is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import ipaddress
import os
import random
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dataplanes.nodeproc import serve_json_lines

try:
    import uvloop
except ImportError:  # the data plane reports it missing; plain asyncio still works
    uvloop = None

CONTROL_NAME = "svcbench-userspace-proxy"
CONTROL_LINE_LIMIT = 256 << 20
PROXY_PORT = 15001
CONNECT_TIMEOUT_S = 0.25
UDP_IDLE_TIMEOUT_S = 20.0  # below nf_conntrack_udp_timeout (30 s): a session never outlives its flow
MAX_ATTEMPTS = 4  # backends tried per connection (kube-proxy's userspace mode tried 4)
LISTEN_BACKLOG = 4096
NETNS_CHECK_S = 1.0
UDP_READ_BATCH = 64
UDP_BUFFER = 65535
_LINGER_RESET = struct.pack("ii", 1, 0)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP_PKTINFO = 8  # linux/in.h; the socket module has it only from Python 3.12
IP_PKTINFO_SPACE = socket.CMSG_SPACE(12)

# Portal classes: what the node does with a (protocol, address, port) of a Service.
REDIRECT = "redirect"  # to this proxy
EXTERNAL_LOCAL = "external-local"  # redirected for pods and the node, dropped for outsiders
DROP = "drop"  # endpoints exist, none for this kind of traffic
REJECT = "reject"  # no endpoints at all: refused at once
CLASSES = (REDIRECT, EXTERNAL_LOCAL, DROP, REJECT)
# A table's "internal_filter" / "external_filter" (the view's) -> the portal's class.
FILTER_CLASSES = {None: REDIRECT, DROP: DROP, REJECT: REJECT}

BALANCING = ("rr", "random")  # how a backend is picked without affinity (--balancing)

PortalKey = tuple[str, str, int]  # (protocol, ip, port)


def portal_key_bytes(ip: str, port: int) -> bytes:
    """The (port, address) bytes of a sockaddr_in: what SO_ORIGINAL_DST returns at [2:8]."""
    return struct.pack("!H", port) + socket.inet_aton(ip)


def spec_portals(spec: dict[str, Any], node_ips: Iterable[str]
                 ) -> dict[PortalKey, tuple[bool, str]]:
    """One table entry's portals: (protocol, ip, port) -> (external, class), from the
    table's reject-or-drop answers; a portal named twice keeps its last meaning."""
    proto = spec["protocol"]
    out: dict[PortalKey, tuple[bool, str]] = {
        (proto, spec["cluster_ip"], spec["port"]):
            (False, FILTER_CLASSES[spec["internal_filter"]])}
    # Dropped outsiders of a NodePort or externalIP: pods and the node still short-circuit.
    external = spec["external_filter"]
    ext = (True, EXTERNAL_LOCAL if external == DROP else FILTER_CLASSES[external])
    for ip in (*spec["external_ips"], *spec.get("load_balancer_ips", ())):
        out[(proto, ip, spec["port"])] = ext
    if spec["node_port"] is not None:
        for ip in node_ips:
            out[(proto, ip, spec["node_port"])] = ext
    return out


def spec_source_ranges(spec: dict[str, Any]) -> dict[PortalKey, tuple[str, ...]]:
    """One table entry's load-balancer portals with loadBalancerSourceRanges, and those."""
    ranges = tuple(spec.get("source_ranges", ()))
    if not ranges:
        return {}
    return {(spec["protocol"], ip, spec["port"]): ranges
            for ip in spec.get("load_balancer_ips", ())}


def portal_classes(services: Iterable[dict[str, Any]],
                   node_ips: Iterable[str]) -> dict[PortalKey, str]:
    """Every portal of a table and its class (a portal two entries name: the later's)."""
    node_ips = list(node_ips)
    out: dict[PortalKey, str] = {}
    for svc in services:
        for portal, (_external, cls) in spec_portals(svc, node_ips).items():
            out[portal] = cls
    return out


def portal_source_ranges(services: Iterable[dict[str, Any]]) -> dict[PortalKey, tuple[str, ...]]:
    """Load-balancer portals with loadBalancerSourceRanges: the networks allowed to reach
    each (the kernel keeps every other source from being redirected here)."""
    out: dict[PortalKey, tuple[str, ...]] = {}
    for svc in services:
        out.update(spec_source_ranges(svc))
    return out


def spec_order(spec: dict[str, Any]) -> tuple[str, str, int]:
    """Where a table entry stands in a table (kube.state.view_order: name, protocol, port):
    a portal two entries name is the later one's."""
    return (spec["name"], spec["protocol"], spec.get("port", 0))


class Claims:
    """Values several owners may offer for one key, the offer of the owner last in `order`
    winning, as a whole table applied in order would leave it: `won` (key -> value) and
    `owner` (key -> owner) are kept exact by offers and withdrawals that cost time in
    proportion to the owners of that key, never a scan of every key."""

    __slots__ = ("won", "owner", "contested", "order")

    def __init__(self, order: Callable[[Hashable], Any]) -> None:
        self.won: dict[Hashable, Any] = {}
        self.owner: dict[Hashable, Hashable] = {}
        self.contested: dict[Hashable, dict[Hashable, Any]] = {}  # keys offered twice or more
        self.order = order

    def offer(self, key: Hashable, owner: Hashable, value: Any) -> None:
        offers = self.contested.get(key)
        if offers is None:
            current = self.owner.get(key)
            if current is None or current == owner:
                self.owner[key] = owner
                self.won[key] = value
                return
            offers = self.contested[key] = {current: self.won[key]}
        offers[owner] = value
        self._crown(key, offers)

    def withdraw(self, key: Hashable, owner: Hashable) -> None:
        offers = self.contested.get(key)
        if offers is None:
            if self.owner.get(key) == owner:
                del self.owner[key]
                del self.won[key]
            return
        offers.pop(owner, None)
        if len(offers) == 1:
            del self.contested[key]
        self._crown(key, offers)

    def _crown(self, key: Hashable, offers: dict[Hashable, Any]) -> None:
        winner = max(offers, key=self.order)
        self.owner[key] = winner
        self.won[key] = offers[winner]


def changed_udp_portals(old: dict[PortalKey, str], new: dict[PortalKey, str]) -> list[list]:
    """UDP portals whose class changed (or that came or went), as [ip, port].

    Their conntrack flows still carry the old verdict (redirected, refused, dropped): a
    client that keeps its source port would keep it, so the caller deletes them.
    """
    return sorted(
        [ip, port]
        for proto, ip, port in old.keys() | new.keys()
        if proto == "UDP" and old.get((proto, ip, port)) != new.get((proto, ip, port))
    )


# --------------------------------------------------------------------------- the table


@dataclass(slots=True)
class ServiceCounters:
    connections: int = 0  # TCP connections accepted for this Service port
    sessions: int = 0  # UDP sessions opened
    retries: int = 0  # extra backends tried after one refused or stayed silent
    failed: int = 0  # connections or sessions no backend took
    active: int = 0  # TCP connections spliced now

    def to_json(self) -> dict[str, int]:
        return {"connections": self.connections, "sessions": self.sessions,
                "retries": self.retries, "failed": self.failed, "active": self.active}


Endpoint = tuple[str, int]

# Refusals kept for `events` (svcbench monitor --type drop): the newest REFUSALS_KEPT.
REFUSALS_KEPT = 1024
NO_ENDPOINT = "NO_ENDPOINT"  # the entry has no endpoint for this client (a table race)
ALL_BACKENDS_FAILED = "ALL_BACKENDS_FAILED"  # every backend tried refused or stayed silent
UNKNOWN_PORTAL = "UNKNOWN_PORTAL"  # redirected here, but no Service has that address now


class Refusals:
    """What the proxy refused (a TCP reset, a UDP flow not forwarded), numbered, the newest
    REFUSALS_KEPT kept: a monitor asks for those after the last number it saw. Recorded only
    when a connection or flow fails, so serving costs nothing."""

    def __init__(self) -> None:
        self.seq = 0
        self.kept: collections.deque = collections.deque(maxlen=REFUSALS_KEPT)

    def add(self, reason: str, service: str, protocol: str, client: Any,
            portal: bytes | tuple[str, int] | None) -> None:
        self.seq += 1
        if isinstance(portal, bytes) and len(portal) == 6:  # SO_ORIGINAL_DST's (port, address)
            portal = (socket.inet_ntoa(portal[2:]), struct.unpack("!H", portal[:2])[0])
        src, sport = client if isinstance(client, tuple) and len(client) >= 2 else ("", 0)
        dst, dport = portal if isinstance(portal, tuple) else ("", 0)
        self.kept.append({"seq": self.seq, "time": round(time.time(), 6),
                          "reason": f"PROXY:{reason}", "service": service,
                          "protocol": protocol, "src": src, "sport": sport, "dst": dst,
                          "dport": dport})

    def since(self, after: int | None) -> dict[str, Any]:
        """Those numbered above `after` (None: none, only the current number)."""
        events = [] if after is None else [e for e in self.kept if e["seq"] > after]
        return {"ok": True, "seq": self.seq, "events": events}


def _peer(transport: asyncio.BaseTransport) -> Any:
    try:
        return transport.get_extra_info("peername")
    except OSError:
        return None


class ServiceEntry:
    """One Service port as the proxy serves it: endpoints, round robin, affinity."""

    __slots__ = ("name", "protocol", "rank", "portals", "internal", "external", "cluster",
                 "short_circuit", "affinity_s", "affinity", "next", "counters")
    at_random = False  # the process's --balancing random: a random first choice, then in turn

    def __init__(self, spec: dict[str, Any], previous: ServiceEntry | None) -> None:
        self.name: str = spec["name"]
        self.protocol: str = spec["protocol"]
        self.rank = spec_order(spec)  # where it stands in a table
        # portal -> (SO_ORIGINAL_DST bytes, external, class): what a table gets from it
        self.portals: dict[PortalKey, tuple[bytes, bool, str]] = {}
        # ClusterIP clients; outside clients of a NodePort or externalIP; pods and the node
        # reaching a NodePort or externalIP (kube-proxy's short circuit).
        self.internal: list[Endpoint] = [(ip, port) for ip, port in spec["internal"]]
        self.external: list[Endpoint] = [(ip, port) for ip, port in spec["external"]]
        self.cluster: list[Endpoint] = [(ip, port) for ip, port in spec["cluster"]]
        # Only then does an external portal care who the client is.
        self.short_circuit: bool = self.cluster != self.external
        self.affinity_s: int | None = spec["affinity_s"]
        # client IP -> (endpoint, deadline on the loop clock)
        self.affinity: dict[str, tuple[Endpoint, float]] = {}
        self.next = 0
        self.counters = ServiceCounters()
        if previous is not None:
            # The same Service port again: its place in the rotation, its clients and counters stay.
            self.next = previous.next
            self.counters = previous.counters
            if self.affinity_s is not None and previous.affinity_s is not None:
                alive = self.serves()
                self.affinity = {c: v for c, v in previous.affinity.items() if v[0] in alive}

    def serves(self) -> set[Endpoint]:
        """Every endpoint some client of this Service port may be sent to."""
        return set(self.internal) | set(self.external) | set(self.cluster)

    def endpoints(self, external: bool, in_cluster: bool) -> list[Endpoint]:
        if not external:
            return self.internal
        return self.cluster if in_cluster else self.external

    def order(self, endpoints: list[Endpoint], client_ip: str, now: float) -> list[Endpoint]:
        """The backends to try, first choice first: the client's affinity, else round robin
        (or a random one); the rest in turn after it."""
        n = len(endpoints)
        if n == 0:
            return endpoints
        if self.affinity_s is not None:
            held = self.affinity.get(client_ip)
            if held is not None and held[1] > now and held[0] in endpoints:
                first = endpoints.index(held[0])
                return endpoints[first:] + endpoints[:first]
        if self.at_random:
            start = random.randrange(n)
        else:
            start = self.next % n
            self.next = start + 1
        return endpoints[start:] + endpoints[:start]

    def chosen(self, client_ip: str, endpoint: Endpoint, now: float) -> None:
        if self.affinity_s is not None:
            self.affinity[client_ip] = (endpoint, now + self.affinity_s)

    def forget_expired(self, now: float) -> None:
        for client in [c for c, (_, deadline) in self.affinity.items() if deadline <= now]:
            del self.affinity[client]


class Table:
    """Portals -> Service entries, one dict per protocol, keyed by SO_ORIGINAL_DST bytes.

    Built whole from a table message, or changed in place by `patch` (a delta message):
    each entry keeps its portals, and a portal two entries name (two Services on one
    load-balancer IP and port) is the later one's in the table's order (`Claims`), so a
    patched table serves as the whole table of the same entries would.
    """

    def __init__(self, message: dict[str, Any] | None = None,
                 previous: Table | None = None) -> None:
        self.tcp: dict[bytes, tuple[ServiceEntry, bool]] = {}
        self.udp: dict[bytes, tuple[ServiceEntry, bool]] = {}
        self.entries: dict[tuple[str, str], ServiceEntry] = {}
        # entries with ClientIP affinity, swept for expiry
        self.sticky: dict[tuple[str, str], ServiceEntry] = {}
        # portal -> (entry key, ...): the entry a portal belongs to; `classes` follows it
        self.claims = Claims(lambda key: self.entries[key].rank)
        self.classes: dict[PortalKey, str] = {}
        self.node_ips: list[str] = []
        self.local_ips: frozenset[str] = frozenset({"127.0.0.1"})
        self.cluster_net = 0
        self.cluster_mask = 0xFFFFFFFF  # matches nothing until a table names the cluster CIDR
        if message is None:
            return
        self.node_ips = list(message.get("node_ips", []))
        self.local_ips = frozenset(self.node_ips) | {"127.0.0.1"}
        if message.get("cluster_cidr"):
            net = ipaddress.ip_network(message["cluster_cidr"])
            self.cluster_net = int(net.network_address)
            self.cluster_mask = int(net.netmask)
        old = previous.entries if previous is not None else {}
        for spec in message.get("services", []):
            entry = self.entry(spec, old)
            self._place(entry, None)

    def entry(self, spec: dict[str, Any], old: dict[tuple[str, str], ServiceEntry]
              ) -> ServiceEntry:
        """A new entry for `spec` (carrying over what `old` held for the same Service port),
        its portals resolved; raises on a malformed spec, before anything changed."""
        entry = ServiceEntry(spec, old.get((spec["name"], spec["protocol"])))
        entry.portals = {portal: (portal_key_bytes(portal[1], portal[2]), external, cls)
                         for portal, (external, cls) in spec_portals(spec, self.node_ips).items()}
        return entry

    def patch(self, specs: list[dict[str, Any]], removed: list[list[str]]
              ) -> tuple[set[tuple[str, str]], list[list]]:
        """Entries new or changed, and entries gone ([name, protocol]): the table follows in
        time that grows with them. Returns (the keys changed, UDP portals whose class
        changed, as [ip, port]). A malformed spec raises before anything changed."""
        fresh = [self.entry(spec, self.entries) for spec in specs]
        gone = [(str(name), str(proto)) for name, proto in removed]
        before: dict[PortalKey, str | None] = {}
        for key in gone:
            if key in self.entries:
                self._retract(key, before)
        for entry in fresh:
            key = (entry.name, entry.protocol)
            if key in self.entries:
                self._retract(key, before)
            self._place(entry, before)
        udp_changed = sorted([ip, port] for (proto, ip, port), cls in before.items()
                             if proto == "UDP" and self.classes.get((proto, ip, port)) != cls)
        return {*gone, *((e.name, e.protocol) for e in fresh)}, udp_changed

    def _place(self, entry: ServiceEntry, before: dict[PortalKey, str | None] | None) -> None:
        key = (entry.name, entry.protocol)
        self.entries[key] = entry
        if entry.affinity_s is not None:
            self.sticky[key] = entry
        claims = self.claims
        owner, won, classes = claims.owner, claims.won, self.classes
        portals = self.tcp if entry.protocol == "TCP" else self.udp
        for portal, offer in entry.portals.items():
            if before is not None and portal not in before:
                before[portal] = classes.get(portal)
            if portal not in owner:  # the common case, written out: nobody else names it
                owner[portal] = key
                won[portal] = offer
                raw, external, cls = offer
                portals[raw] = (entry, external)
                classes[portal] = cls
            else:
                claims.offer(portal, key, offer)
                self._follow(portal)

    def _retract(self, key: tuple[str, str], before: dict[PortalKey, str | None]) -> None:
        entry = self.entries.pop(key)
        self.sticky.pop(key, None)
        for portal in entry.portals:
            if portal not in before:
                before[portal] = self.classes.get(portal)
            self.claims.withdraw(portal, key)
            self._follow(portal, entry.portals[portal][0])

    def _follow(self, portal: PortalKey, raw: bytes | None = None) -> None:
        """The portal's dict entry and class, as its claims now say."""
        portals = self.tcp if portal[0] == "TCP" else self.udp
        owner = self.claims.owner.get(portal)
        if owner is None:
            if raw is not None:
                portals.pop(raw, None)
            self.classes.pop(portal, None)
            return
        raw, external, cls = self.claims.won[portal]
        portals[raw] = (self.entries[owner], external)
        self.classes[portal] = cls

    def in_cluster(self, client_ip: str) -> bool:
        """A pod of the cluster or the node itself (not an outside client)."""
        if client_ip in self.local_ips:
            return True
        addr = int.from_bytes(socket.inet_aton(client_ip), "big")
        return addr & self.cluster_mask == self.cluster_net

    def dump(self) -> dict[str, Any]:
        """The table as this process serves it: each entry's endpoints for each traffic kind
        and its affinity, and each portal's entry, kind and class (no counters, no rotation
        or affinity state)."""
        services = [{"name": e.name, "protocol": e.protocol, "affinity_s": e.affinity_s,
                     "internal": [list(x) for x in e.internal],
                     "external": [list(x) for x in e.external],
                     "cluster": [list(x) for x in e.cluster]}
                    for e in self.entries.values()]
        portals = [[proto, ip, port, *self.claims.owner[(proto, ip, port)],
                    self.claims.won[(proto, ip, port)][1], cls]
                   for (proto, ip, port), cls in self.classes.items()]
        return {"node_ips": self.node_ips, "services": services, "portals": portals,
                "tcp_portals": len(self.tcp), "udp_portals": len(self.udp)}


# --------------------------------------------------------------------------- TCP


def _reset(transport: asyncio.Transport) -> None:
    """Close with a RST: a loop's abort() alone sends a FIN, and leaves a TIME_WAIT behind."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # already gone
    transport.abort()


class Downstream(asyncio.Protocol):
    """The connection a client opened to a Service portal (redirected here)."""

    __slots__ = ("proxy", "transport", "upstream", "entry", "client_ip", "order", "attempt",
                 "dialing", "timer", "early", "eof", "closed", "portal")

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.entry: ServiceEntry | None = None
        self.dialing: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.early: list[bytes] = []  # what the client sent before a backend answered
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        proxy = self.proxy
        sock = transport.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        except OSError:
            raw = b""
        self.portal = raw[2:8]
        hit = proxy.table.tcp.get(self.portal)
        if hit is None:
            proxy.unknown += 1  # not redirected, or a portal dropped by the last table
            if len(self.portal) == 6:
                proxy.refusals.add(UNKNOWN_PORTAL, "", "TCP", _peer(transport), self.portal)
            _reset(transport)
            return
        entry, external = hit
        client_ip = ""
        local = external and entry.short_circuit
        if entry.affinity_s is not None or local:
            # Only affinity and the short circuit care who the client is.
            try:
                client_ip = sock.getpeername()[0]
            except OSError:
                _reset(transport)  # reset before we looked
                return
        endpoints = entry.endpoints(external, local and proxy.table.in_cluster(client_ip))
        entry.counters.connections += 1
        if not endpoints:
            entry.counters.failed += 1
            proxy.refusals.add(NO_ENDPOINT, entry.name, "TCP", _peer(transport), self.portal)
            _reset(transport)
            return
        self.entry = entry
        self.client_ip = client_ip
        entry.counters.active += 1
        transport.pause_reading()  # the client's bytes wait in the kernel until a backend answers
        self.order = entry.order(endpoints, client_ip, proxy.loop.time())
        self.attempt = -1
        self.dial_next()

    def dial_next(self) -> None:
        """Connect to the next backend in order; a timer cancels a connect that hangs."""
        self.attempt += 1
        if self.attempt >= len(self.order) or self.attempt >= MAX_ATTEMPTS:
            self.entry.counters.failed += 1
            self.proxy.refusals.add(ALL_BACKENDS_FAILED, self.entry.name, "TCP",
                                    _peer(self.transport), self.portal)
            _reset(self.transport)
            return
        if self.attempt:
            self.entry.counters.retries += 1
        ip, port = self.order[self.attempt]
        loop = self.proxy.loop
        # The loop's coroutine as the task and a plain timer: no asyncio.timeout per connection.
        task = loop.create_task(loop.create_connection(self.make_upstream, ip, port))
        task.add_done_callback(self.dialed)
        self.dialing = task
        self.timer = loop.call_later(self.proxy.connect_timeout, task.cancel)

    def make_upstream(self) -> Upstream:
        return Upstream(self)

    def dialed(self, task: asyncio.Task) -> None:
        self.timer.cancel()
        self.dialing = self.timer = None
        failed = task.cancelled() or task.exception() is not None
        if self.closed:  # the client left while we were dialing
            if not failed:
                _reset(task.result()[0])
            return
        if failed:
            self.dial_next()
            return
        transport, upstream = task.result()
        self.entry.chosen(self.client_ip, self.order[self.attempt], self.proxy.loop.time())
        self.upstream = upstream
        if self.early:
            transport.write(b"".join(self.early))
            self.early.clear()
        if self.eof:
            transport.write_eof()
        else:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is None:
            # uvloop starts reading right after connection_made, whatever it paused: hold
            # the bytes until a backend answers.
            self.early.append(data)
            self.transport.pause_reading()
            return
        upstream.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        upstream = self.upstream
        if upstream is None:
            return True  # passed on once a backend answers
        if upstream.eof:
            upstream.transport.close()
            return False
        upstream.transport.write_eof()
        return True  # the other direction keeps flowing (half-close)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.entry is not None:
            self.entry.counters.active -= 1
        if self.dialing is not None:
            self.dialing.cancel()  # dialed() sees the client gone
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            # A reset travels on as a reset (no TIME_WAIT towards the backend), a close as a close.
            if exc is None:
                upstream.transport.close()
            else:
                _reset(upstream.transport)


class Upstream(asyncio.Protocol):
    """The proxy's connection to the chosen backend."""

    __slots__ = ("downstream", "transport", "eof", "closed")

    def __init__(self, downstream: Downstream) -> None:
        self.downstream = downstream
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.downstream.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        down = self.downstream
        if down.eof:
            down.transport.close()
            return False
        down.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        self.downstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.downstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        down = self.downstream
        if down.upstream is self and not down.closed:
            if exc is None:
                down.transport.close()
            else:
                _reset(down.transport)


# --------------------------------------------------------------------------- UDP

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3


def _nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nla_parse(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, pos)
        if size < 4:
            break
        out[kind & NLA_TYPE_MASK] = data[pos + 4 : pos + size]
        pos += (size + 3) & ~3
    return out


class ConntrackLookup:
    """The original destination of a REDIRECTed UDP flow: one ctnetlink GET by reply tuple.

    It is what the kernel does for SO_ORIGINAL_DST on a TCP socket, asked over netlink.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(0.5)
        self.seq = 0

    def original_destination(self, local_ip: bytes, local_port: int, client_ip: bytes,
                             client_port: int) -> bytes | None:
        """(port, address) bytes of the flow client -> ? whose reply comes from local:port."""
        self.seq += 1
        reply = (
            _nla(CTA_TUPLE_IP | NLA_F_NESTED,
                 _nla(CTA_IP_V4_SRC, local_ip) + _nla(CTA_IP_V4_DST, client_ip))
            + _nla(CTA_TUPLE_PROTO | NLA_F_NESTED,
                   _nla(CTA_PROTO_NUM, bytes([socket.IPPROTO_UDP]))
                   + _nla(CTA_PROTO_SRC_PORT, struct.pack("!H", local_port))
                   + _nla(CTA_PROTO_DST_PORT, struct.pack("!H", client_port)))
        )
        body = struct.pack("=BBH", socket.AF_INET, 0, 0) + _nla(CTA_TUPLE_REPLY | NLA_F_NESTED, reply)
        kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
        self.sock.send(struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST, self.seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            size, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data)
            if seq == self.seq:
                break
        if kind == NLMSG_ERROR:
            return None  # no such flow (it expired, or the datagram was not redirected)
        attrs = _nla_parse(data[20:size])
        orig = _nla_parse(attrs.get(CTA_TUPLE_ORIG, b""))
        ip = _nla_parse(orig.get(CTA_TUPLE_IP, b"")).get(CTA_IP_V4_DST)
        port = _nla_parse(orig.get(CTA_TUPLE_PROTO, b"")).get(CTA_PROTO_DST_PORT)
        if ip is None or port is None:
            return None
        return port + ip

    def close(self) -> None:
        self.sock.close()


class UdpSession:
    """One client address of one UDP portal: a connected socket towards its backend."""

    __slots__ = ("front", "key", "entry", "client", "local", "order", "attempt", "sock", "last",
                 "pending", "portal")

    def __init__(self, front: UdpFront, key: tuple, entry: ServiceEntry, client: tuple[str, int],
                 local: str, order: list[Endpoint], portal: bytes = b"") -> None:
        self.front = front
        self.portal = portal  # the Service address the client wrote to
        self.key = key
        self.entry = entry
        self.client = client
        self.local = local  # the address the client's datagrams were redirected to
        self.order = order[:MAX_ATTEMPTS]
        self.attempt = -1
        self.sock: socket.socket | None = None
        self.last = front.loop.time()
        self.pending = b""  # the latest datagram: resent to the next backend if one refuses

    @property
    def endpoint(self) -> Endpoint | None:
        return self.order[self.attempt] if 0 <= self.attempt < len(self.order) else None

    def next_backend(self) -> bool:
        """Move to the next backend to try; False when none is left."""
        self._close_socket()
        self.attempt += 1
        if self.attempt >= len(self.order):
            return False
        if self.attempt:
            self.entry.counters.retries += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.order[self.attempt])
        except OSError:
            sock.close()
            return self.next_backend()
        self.sock = sock
        self.front.loop.add_reader(sock.fileno(), self.readable)
        return True

    def send(self, data: bytes) -> None:
        self.pending = data
        self.last = self.front.loop.time()
        try:
            self.sock.send(data)
        except BlockingIOError:
            pass  # a full socket buffer drops the datagram, as the network would
        except ConnectionRefusedError:
            self.refused()

    def refused(self) -> None:
        """ICMP port unreachable from the backend: the next one gets the latest datagram."""
        if self.next_backend():
            self.send(self.pending)
        else:
            self.entry.counters.failed += 1
            self.front.proxy.refusals.add(ALL_BACKENDS_FAILED, self.entry.name, "UDP",
                                          self.client, self.portal)
            self.front.close(self)

    def readable(self) -> None:
        front = self.front
        for _ in range(UDP_READ_BATCH):
            try:
                data = self.sock.recv(UDP_BUFFER)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self.refused()
                return
            except OSError:
                front.close(self)
                return
            if self.attempt >= 0:
                self.entry.chosen(self.client[0], self.order[self.attempt], front.loop.time())
            self.last = front.loop.time()
            front.reply(data, self.client, self.local)

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.front.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self._close_socket()


class UdpFront:
    """The UDP socket every Service datagram is redirected to."""

    def __init__(self, proxy: Proxy, sock: socket.socket) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.conntrack = ConntrackLookup()
        # (client ip, client port, redirected-to ip) -> session: one conntrack flow each
        self.sessions: dict[tuple[str, int, str], UdpSession] = {}
        # entry key (name, protocol) -> its sessions, so a delta visits only those it changed
        self.by_entry: dict[tuple[str, str], dict[tuple[str, int, str], UdpSession]] = {}
        self.loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        sock = self.sock
        for _ in range(UDP_READ_BATCH):
            try:
                data, ancdata, _flags, client = sock.recvmsg(UDP_BUFFER, IP_PKTINFO_SPACE)
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error queued for a client we answered earlier
            local = None
            for level, kind, value in ancdata:
                if level == socket.SOL_IP and kind == IP_PKTINFO:
                    local = socket.inet_ntoa(value[8:12])  # ipi_addr: the header's destination
            if local is None:
                continue
            key = (client[0], client[1], local)
            session = self.sessions.get(key)
            if session is None:
                session = self.open(key, client, local)
                if session is None:
                    continue
            session.send(data)

    def open(self, key: tuple, client: tuple[str, int], local: str) -> UdpSession | None:
        proxy = self.proxy
        try:
            portal = self.conntrack.original_destination(
                socket.inet_aton(local), self.port, socket.inet_aton(client[0]), client[1])
        except OSError:
            portal = None
        hit = proxy.table.udp.get(portal) if portal else None
        if hit is None:
            proxy.unknown += 1
            proxy.refusals.add(UNKNOWN_PORTAL, "", "UDP", client, portal)
            return None
        entry, external = hit
        endpoints = entry.endpoints(external, external and entry.short_circuit
                                    and proxy.table.in_cluster(client[0]))
        entry.counters.sessions += 1
        order = entry.order(endpoints, client[0], self.loop.time())
        session = UdpSession(self, key, entry, client, local, order, portal)
        if not session.next_backend():
            entry.counters.failed += 1
            proxy.refusals.add(NO_ENDPOINT if not order else ALL_BACKENDS_FAILED, entry.name,
                               "UDP", client, portal)
            return None
        self.sessions[key] = session
        self.by_entry.setdefault((entry.name, entry.protocol), {})[key] = session
        return session

    def reply(self, data: bytes, client: tuple[str, int], local: str) -> None:
        # From the address the client wrote to, so conntrack turns it back into the portal.
        pktinfo = struct.pack("=I4s4s", 0, socket.inet_aton(local), b"\0\0\0\0")
        try:
            self.sock.sendmsg([data], [(socket.SOL_IP, IP_PKTINFO, pktinfo)], 0, client)
        except OSError:
            pass  # the client is gone or its buffer is full: UDP drops it

    def close(self, session: UdpSession) -> None:
        session.close()
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            entry_key = (session.entry.name, session.entry.protocol)
            group = self.by_entry.get(entry_key)
            if group is not None:
                group.pop(session.key, None)
                if not group:
                    del self.by_entry[entry_key]

    def expire(self, idle_s: float) -> int:
        cutoff = self.loop.time() - idle_s
        stale = [s for s in self.sessions.values() if s.last < cutoff]
        for session in stale:
            self.close(session)
        return len(stale)

    def retable(self, table: Table, keys: Iterable[tuple[str, str]] | None = None) -> int:
        """Point sessions at the new table's entries; close those whose backend left. With
        `keys`, only the sessions of those entries (a delta changed only them)."""
        closed = 0
        if keys is None:
            sessions = list(self.sessions.values())
        else:
            sessions = [s for key in keys for s in self.by_entry.get(key, {}).values()]
        for session in sessions:
            entry = table.entries.get((session.entry.name, session.entry.protocol))
            endpoint = session.endpoint
            if entry is None or endpoint not in entry.serves():
                self.close(session)
                closed += 1
            else:
                session.entry = entry
        return closed

    def shutdown(self) -> None:
        for session in list(self.sessions.values()):
            self.close(session)
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.conntrack.close()


# --------------------------------------------------------------------------- the process


@dataclass
class Proxy:
    port: int
    netns: str | None
    connect_timeout: float = CONNECT_TIMEOUT_S
    udp_idle_timeout: float = UDP_IDLE_TIMEOUT_S
    loop: asyncio.AbstractEventLoop = field(init=False)
    table: Table = field(default_factory=Table)
    unknown: int = 0  # connections and flows whose portal is in no table
    tables: int = 0
    started: float = field(default_factory=time.time)
    refusals: Refusals = field(default_factory=Refusals)

    def log(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} userspace-proxy[{os.getpid()}] {message}",
              file=sys.stderr, flush=True)

    def apply(self, message: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        old = self.table
        collecting = gc.isenabled()
        gc.disable()  # a table is acyclic: the collector's scans of a large heap only cost
        try:
            new = Table(message, old)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            return {"ok": False, "error": f"table refused: {exc!r}"}
        finally:
            if collecting:
                gc.enable()
        self.table = new
        self.tables += 1
        closed = self.udp.retable(new)
        # A proxy that just started knows no earlier table: it cannot tell what changed.
        changed = changed_udp_portals(old.classes, new.classes) if self.tables > 1 else []
        return {"ok": True, "services": len(new.entries), "tcp_portals": len(new.tcp),
                "udp_portals": len(new.udp), "udp_sessions_closed": closed,
                "udp_changed": changed, "seconds": round(time.perf_counter() - start, 6),
                "settings": self.settings(), "tables": self.tables, "pid": os.getpid()}

    def apply_delta(self, request: dict[str, Any]) -> dict[str, Any]:
        """Entries new or changed ("services": table entries) and gone ("removed": [name,
        protocol]), applied to the table in place, in time that grows with them. Only for
        the sender that knows this table: "expect" must name this process and the number
        of tables and deltas it took (a table sent by anyone else, or a restart, changes
        it), else the reply says "stale" and the sender sends a whole table."""
        if request.get("expect") != [os.getpid(), self.tables]:
            return {"ok": False, "stale": True, "tables": self.tables, "pid": os.getpid(),
                    "error": f"delta for {request.get('expect')}, this proxy is at "
                             f"{[os.getpid(), self.tables]}"}
        start = time.perf_counter()
        try:
            keys, changed = self.table.patch(request.get("services", []),
                                             request.get("removed", []))
        except (KeyError, TypeError, ValueError, OSError) as exc:
            return {"ok": False, "error": f"delta refused: {exc!r}"}
        self.tables += 1
        closed = self.udp.retable(self.table, keys)
        return {"ok": True, "services": len(self.table.entries), "udp_sessions_closed": closed,
                "udp_changed": changed, "seconds": round(time.perf_counter() - start, 6),
                "settings": self.settings(), "tables": self.tables, "pid": os.getpid()}

    def settings(self) -> list:
        """What the process was started with: a data plane configured otherwise restarts it."""
        return [self.port, self.connect_timeout, self.udp_idle_timeout,
                "random" if ServiceEntry.at_random else "rr"]

    def stats(self, services: bool) -> dict[str, Any]:
        totals = ServiceCounters()
        per: dict[str, Any] = {}
        for (name, proto), entry in self.table.entries.items():
            c = entry.counters
            totals.connections += c.connections
            totals.sessions += c.sessions
            totals.retries += c.retries
            totals.failed += c.failed
            totals.active += c.active
            if services:
                per[f"{name}/{proto}"] = c.to_json()
        out = {"ok": True, "pid": os.getpid(), "services": len(self.table.entries),
               "tables": self.tables, "unknown": self.unknown,
               "udp_sessions": len(self.udp.sessions), **totals.to_json(),
               "cpu_s": round(time.process_time(), 3), "cpu_user_s": round(os.times().user, 3),
               "cpu_sys_s": round(os.times().system, 3)}
        if services:
            out["per_service"] = per
        return out

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "port": self.port, "netns": self.netns,
                    "tables": self.tables, "loop": type(self.loop).__module__,
                    "settings": self.settings()}
        if op == "table":
            return self.apply(request)
        if op == "delta":
            return self.apply_delta(request)
        if op == "dump":
            return {"ok": True, "pid": os.getpid(), "tables": self.tables,
                    "settings": self.settings(), **self.table.dump()}
        if op == "stats":
            return self.stats(bool(request.get("services")))
        if op == "events":
            return self.refusals.since(request.get("after"))
        if op == "stop":
            self.stop("stop requested")
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}; accepted: ping, table, delta, dump, "
                                      "stats, events, stop"}

    async def control_client(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await serve_json_lines(self.handle, reader, writer)

    def stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.exit_reason = reason
            self.stopping.set()

    async def housekeeping(self) -> None:
        own = os.stat("/proc/self/ns/net").st_ino
        tick = max(0.1, min(NETNS_CHECK_S, self.udp_idle_timeout / 4))
        last_netns_check = 0.0
        while not self.stopping.is_set():
            await asyncio.sleep(tick)
            now = self.loop.time()
            self.udp.expire(self.udp_idle_timeout)
            for entry in self.table.sticky.values():
                if entry.affinity:
                    entry.forget_expired(now)
            if self.netns and now - last_netns_check >= NETNS_CHECK_S:
                last_netns_check = now
                try:
                    same = os.stat(os.path.join("/run/netns", self.netns)).st_ino == own
                except OSError:
                    same = False
                if not same:
                    self.stop(f"netns {self.netns} is gone")

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.exit_reason = ""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two sockets per connection
        try:
            control_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            control_sock.bind("\0" + CONTROL_NAME)
        except OSError as exc:
            self.log(f"cannot bind the control socket @{CONTROL_NAME}: {exc} "
                     "(another proxy runs in this network namespace?)")
            return 1
        control = await asyncio.start_unix_server(self.control_client, sock=control_sock,
                                                  limit=CONTROL_LINE_LIMIT)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", self.port))
        server = await self.loop.create_server(lambda: Downstream(self), sock=tcp,
                                               backlog=LISTEN_BACKLOG)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        udp.bind(("0.0.0.0", self.port))
        udp.setblocking(False)
        self.udp = UdpFront(self, udp)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stop, signal.Signals(signum).name)
        chores = asyncio.create_task(self.housekeeping())
        self.log(f"serving TCP and UDP on port {self.port}, control @{CONTROL_NAME} "
                 f"(netns {self.netns}, loop {type(self.loop).__module__})")
        try:
            await self.stopping.wait()
        finally:
            chores.cancel()
            server.close()
            control.close()
            self.udp.shutdown()
        self.log(f"exiting: {self.exit_reason}")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataplanes.userspace_proxy",
                                     description="The userspace Service proxy of one node.")
    parser.add_argument("--port", type=int, default=PROXY_PORT, help="port iptables redirects to")
    parser.add_argument("--netns", help="exit when /run/netns/NETNS is gone or replaced")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S,
                        help="seconds a backend has to accept before the next one is tried")
    parser.add_argument("--udp-idle-timeout", type=float, default=UDP_IDLE_TIMEOUT_S,
                        help="seconds of silence after which a UDP session is closed")
    parser.add_argument("--balancing", choices=BALANCING, default="rr",
                        help="how a backend is picked without affinity: rr (round robin) or "
                             "random")
    args = parser.parse_args(argv)
    ServiceEntry.at_random = args.balancing == "random"
    proxy = Proxy(args.port, args.netns, args.connect_timeout, args.udp_idle_timeout)
    if uvloop is not None:
        return uvloop.run(proxy.run())
    return asyncio.run(proxy.run())


if __name__ == "__main__":
    sys.exit(main())
