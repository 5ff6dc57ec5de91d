"""The XDP service path's drop reports (bpf/lib/drop.h), read from a node's ring buffer.

XDP_DROP frees a frame before the kernel made an sk_buff of it, so the `skb:kfree_skb`
monitor (bpf/dropmon.py) never sees those drops. The programs report each one, with a
reason of their own, into the node's `xdp_drops` ring buffer (BPF_MAP_TYPE_RINGBUF, one
per node like every map of the node). This module finds that map from any process (as
bpf/loader.py finds a node's objects: the suite's XDP programs whose `node_config` holds
the node's netns cookie), maps it, and reads the records without libbpf or bcc:

    page 0            consumer position (u64), written by the reader
    page 1            producer position (u64), written by the kernel
    page 2 ...        the data area, mapped twice in a row so a record never wraps

Each record is an 8-byte header (length with BUSY and DISCARD bits, page offset) and the
event, padded to 8 bytes. One reader per ring: a second monitor would take the first's
records. A new reader skips what the ring held before it started.
"""

from __future__ import annotations

import mmap
import socket
import struct
import time
from typing import Any

from bpf import loader, syscall

MAP_TYPE_RINGBUF = 27
MAP_NAME = "xdp_drops"
XDP_PROGRAMS = ("svb_xdp_host", "svb_xdp_lxc")

# bpf/lib/drop.h
REASONS = {
    1: "NAT_FAILED",
    2: "FRAGMENT_NO_FLOW",
    3: "SOURCE_RANGE_DENIED",
    4: "NO_LOCAL_ENDPOINT",
    5: "NO_ENDPOINT",
    6: "NO_BACKEND",
    7: "SNAT_PORTS_EXHAUSTED",
    8: "CT_FULL",
}
# Reasons whose packet was answered (RST / ICMP port unreachable), not silently dropped;
# the socket hooks refuse the call itself (ECONNREFUSED) before any packet exists.
ANSWERED = {"NO_ENDPOINT": "answered with a reject"}
REFUSED_CALL = "the call refused with ECONNREFUSED"
FROM = {0: "svb_xdp_lxc", 1: "svb_xdp_host", 2: "svb_sock4_conn", 3: "svb_sock4_send"}
# struct xdp_drop_event: ts_ns, saddr, daddr, sport, dport, ifindex, proto, reason, from,
# tcp_flags, svc_id
EVENT = struct.Struct("=Q4s4sHHIBBBBI")
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}
TCP_FLAGS = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"))
BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = struct.Struct("=II")
U64 = struct.Struct("=Q")


def find_ring(netns_cookie: int) -> int | None:
    """An fd of the xdp_drops ring of the node whose namespace has this cookie (the
    caller closes it); None when the node has no XDP programs of this suite loaded."""
    for _prog_id, info in loader.suite_programs():
        if info["name"] not in XDP_PROGRAMS:
            continue
        config = loader.program_config(info)
        if config is None or config.netns_cookie != netns_cookie:
            continue
        for map_id in info["map_ids"]:
            fd = syscall.map_fd_by_id(map_id)
            if fd is None:
                continue
            found = syscall.map_info(fd)
            if found["name"] == MAP_NAME and found["type"] == MAP_TYPE_RINGBUF:
                return fd
            syscall.close(fd)
    return None


class RingReader:
    """The records of one BPF ring buffer map, read by polling (no epoll wakeups)."""

    def __init__(self, fd: int, skip_backlog: bool = True) -> None:
        info = syscall.map_info(fd)
        if info["type"] != MAP_TYPE_RINGBUF:
            raise ValueError(f"map {info['name']} is not a ring buffer (type {info['type']})")
        self.fd = fd
        self.size = info["max_entries"]
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        self._data = page  # where the data area starts in the producer mapping
        if skip_backlog:
            U64.pack_into(self._consumer, 0, self._producer_pos())

    def _producer_pos(self) -> int:
        return U64.unpack_from(self._producer, 0)[0]

    def read(self, limit: int = 4096) -> list[bytes]:
        """The records committed since the last read (at most `limit`), in order."""
        out: list[bytes] = []
        cons = U64.unpack_from(self._consumer, 0)[0]
        prod = self._producer_pos()
        while cons < prod and len(out) < limit:
            at = self._data + (cons & self.mask)
            length, _pgoff = HEADER.unpack_from(self._producer, at)
            if length & BUSY:
                break  # reserved, not yet committed
            size = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                out.append(bytes(self._producer[at + HEADER.size:at + HEADER.size + size]))
            cons += (size + HEADER.size + 7) & ~7
        U64.pack_into(self._consumer, 0, cons)
        return out

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
        syscall.close(self.fd)
        self.fd = -1


def decode(raw: bytes, now_wall: float | None = None, now_mono_ns: int | None = None
           ) -> dict[str, Any]:
    """One report as the drop monitor's rows are (bpf/dropmon.py's Drop, without netns):
    reason "XDP:NAME", location the program that dropped it."""
    (ts, saddr, daddr, sport, dport, ifindex, proto, reason, source, flags,
     svc_id) = EVENT.unpack_from(raw)
    wall = time.time() if now_wall is None else now_wall
    mono = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
    name = REASONS.get(reason, str(reason))
    return {
        "time": round(wall - (mono - ts) / 1e9, 6),
        "reason": f"XDP:{name}",
        "location": FROM.get(source, str(source)) + (
            f", {REFUSED_CALL}" if source >= 2 else
            f", {ANSWERED[name]}" if name in ANSWERED else ""),
        "ifindex": ifindex,
        "protocol": PROTOCOLS.get(proto, str(proto)),
        "src": socket.inet_ntoa(saddr) if source < 2 else "",  # unknown at connect()
        "dst": socket.inet_ntoa(daddr),
        "sport": socket.ntohs(sport), "dport": socket.ntohs(dport),
        "tcp_flags": "|".join(n for bit, n in TCP_FLAGS if flags & bit) if proto == 6 else "",
        "svc_id": svc_id,
    }


class XdpDropReader:
    """A node's XDP drop reports as monitor rows; `take()` returns what came since."""

    def __init__(self, fd: int) -> None:
        self._ring = RingReader(fd)

    def take(self) -> list[dict[str, Any]]:
        return [decode(raw) for raw in self._ring.read()]

    def close(self) -> None:
        self._ring.close()
