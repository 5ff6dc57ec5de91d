"""IPVS mode's kernel I/O, run on a thread inside the node's network namespace.

Every function here is meant for `NodeHandle.call` (a thread that entered the node's
namespace, so sockets and child processes live there): plain netlink sockets for IPVS,
kube-ipvs0's addresses and ipset members (requests in batches, answers matched by
sequence number), the `ipset`/`iptables` tools as processes, and two cheap fingerprints
(the sets' element counts over ipset's netlink, the legacy tables' entry counts by
getsockopt) that tell a sync whether anybody changed them since our last write.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Sequence

from pyroute2 import IPRoute
from pyroute2.ipset import IPSet, NoSuchObject
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)

from dataplanes.base import DataplaneError
from dataplanes.ipvs_codec import (
    CMD_ATTR_DEST,
    CMD_ATTR_SERVICE,
    CMD_FLUSH,
    CMD_GET_DEST,
    CMD_GET_SERVICE,
    CTRL_CMD_GETFAMILY,
    GENL_ID_CTRL,
    GENLMSGHDR,
    IPSET_CMD_ADD,
    IPSET_CMD_DESTROY,
    IPSET_FLAG_LIST_HEADER,
    IPVS_GENL_NAME,
    IPVS_GENL_VERSION,
    NLM_F_CREATE_EXCL,
    NLMSGHDR,
    RTM_DELADDR,
    RTM_GETADDR,
    RTM_NEWADDR,
    IpvsRequest,
    address_dump_request,
    address_request,
    attributes,
    changes_to_messages,
    ipset_destroy_request,
    ipset_request,
    ipset_type,
    nested,
    nla,
    parse_address,
    parse_dest,
    parse_service,
    service_key,
)
from dataplanes.ipvs_layout import IPSETS, KUBE_IPVS_IF, IpvsLayout, ipvs_changes

# kube-proxy's ipvs sysctls; conn_reuse_mode is left alone: kernels from 5.9 on fixed it.
SYSCTLS = {
    "net/ipv4/vs/conntrack": 1,  # iptables (masquerade, hairpin) must see IPVS's connections
    # connections to a removed endpoint end at their next packet
    "net/ipv4/vs/expire_nodest_conn": 1,
    "net/ipv4/vs/expire_quiescent_template": 1,  # affinity never sticks to a removed endpoint
    "net/ipv4/ip_forward": 1,
}
NETLINK_GENERIC = 16
NETLINK_NETFILTER = 12
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
# Below the default netlink send buffer (212992), with room for error echoes.
BATCH_BYTES = 32 * 1024
RCVBUF_BYTES = 4 << 20
SO_RCVBUFFORCE = 33


class NetlinkChannel:
    """One plain netlink socket in the calling thread's netns: batched requests, sequential
    dumps.

    Many requests go out in one send and every answer is matched to its request by
    sequence number; dumps run one after another (netlink allows one per socket).
    """

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        self.buf = bytearray(1 << 18)  # one receive buffer: no allocation per datagram
        self.seq = 0
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)  # root
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
        header = NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, self.seq, 0)
        return self.seq, header + body

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
                    raise DataplaneError(
                        f"netlink dump (type {msg_type}) failed: {os.strerror(code)}")
                out.append(bytes(raw[NLMSGHDR.size :]))
                if not flags & NLM_F_MULTI:
                    return out

    def batch(self, requests: Sequence[tuple[str, int, int, bytes]]) -> list[str]:
        """Send (what, type, extra flags, body) requests in batches, wait for every ack; one
        line per refusal."""
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
        body = (GENLMSGHDR.pack(CTRL_CMD_GETFAMILY, 1, 0)
                + nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))
        seq, data = self._encode(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, body)
        self.sock.send(data)
        family = None
        while True:
            for mtype, _flags, mseq, raw in self._messages():
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = self._error(raw)
                    if code == 0 and family is not None:
                        return family
                    if code == errno.ENOENT:
                        raise DataplaneError(
                            "the kernel has no IPVS (CONFIG_IP_VS, generic netlink family "
                            "IPVS); run with --kernel uml")
                    raise DataplaneError(
                        f"looking up generic netlink family {name}: {os.strerror(code)}")
                attrs = attributes(raw, NLMSGHDR.size + GENLMSGHDR.size)
                if CTRL_ATTR_FAMILY_ID in attrs:
                    family = struct.unpack_from("=H", attrs[CTRL_ATTR_FAMILY_ID])[0]

    def dump(self, cmd: int, attrs: bytes = b"") -> list[dict[int, bytes]]:
        """The top-level attributes of every message a dump answers with."""
        body = GENLMSGHDR.pack(cmd, IPVS_GENL_VERSION, 0) + attrs
        return [attributes(raw, GENLMSGHDR.size) for raw in self.dump_raw(self.family, body)]

    def layout(self) -> IpvsLayout:
        """What the kernel holds: every virtual server and its real servers."""
        held = IpvsLayout()
        for reply in self.dump(CMD_GET_SERVICE):
            vs = parse_service(reply.get(CMD_ATTR_SERVICE, b""))
            if vs is None:
                continue
            held.services[vs.key] = vs
            dests = held.dests.setdefault(vs.key, {})
            for dreply in self.dump(CMD_GET_DEST, nested(CMD_ATTR_SERVICE, service_key(vs))):
                if CMD_ATTR_DEST in dreply:
                    rs = parse_dest(dreply[CMD_ATTR_DEST])
                    dests[rs.key] = rs
        return held

    def apply(self, requests: Sequence[IpvsRequest]) -> list[str]:
        """Send every request (batched), wait for each ack; one line per refused request."""
        return self.batch([(r.what, self.family, 0, r.body()) for r in requests])

    def flush(self) -> None:
        failures = self.apply([IpvsRequest("flush every virtual server", CMD_FLUSH, b"")])
        if failures:
            raise DataplaneError("; ".join(failures))


# --------------------------------------------------------------------------- in the node's netns


def write_sysctls() -> None:
    for key, value in SYSCTLS.items():
        with open(f"/proc/sys/{key}", "w") as fh:
            fh.write(str(value))


def read_sysctls() -> dict[str, int]:
    out = {}
    for key in SYSCTLS:
        with open(f"/proc/sys/{key}") as fh:
            out[key] = int(fh.read().strip())
    return out


def kube_ipvs_index(create: bool = True) -> int | None:
    """kube-ipvs0's interface index, made (a dummy left down, as kube-proxy leaves it) when
    missing and `create`; None when missing and not."""
    try:
        return socket.if_nametoindex(KUBE_IPVS_IF)
    except OSError:
        if not create:
            return None
    with IPRoute() as ipr:
        ipr.link("add", ifname=KUBE_IPVS_IF, kind="dummy")
    return socket.if_nametoindex(KUBE_IPVS_IF)


def _addresses(nl: NetlinkChannel, index: int) -> set[str]:
    have = set()
    for raw in nl.dump_raw(RTM_GETADDR, address_dump_request()):
        found = parse_address(raw)
        if found is not None and found[0] == index:
            have.add(found[1])
    return have


def _change_addresses(nl: NetlinkChannel, index: int, add: Iterable[str],
                      remove: Iterable[str]) -> list[str]:
    return nl.batch(
        [(f"add {ip} to {KUBE_IPVS_IF}", RTM_NEWADDR, NLM_F_CREATE_EXCL, address_request(index, ip))
         for ip in add]
        + [(f"remove {ip} from {KUBE_IPVS_IF}", RTM_DELADDR, 0, address_request(index, ip))
           for ip in remove])


def sync_addresses(want: set[str]) -> tuple[int, int]:
    """Put exactly `want` on kube-ipvs0 (as /32s), over rtnetlink in batches."""
    index = kube_ipvs_index()
    with NetlinkChannel(socket.NETLINK_ROUTE) as nl:
        have = _addresses(nl, index)
        failures = _change_addresses(nl, index, sorted(want - have), sorted(have - want))
    if failures:
        raise DataplaneError(f"{len(failures)} address changes refused: "
                             + "; ".join(failures[:5]))
    return len(want - have), len(have - want)


def sync_ipvs(want: IpvsLayout) -> dict:
    """Read back IPVS, apply the difference, and put the VIPs on kube-ipvs0."""
    started = time.perf_counter()
    with IpvsNetlink() as nl:
        have = nl.layout()
        read_s = time.perf_counter() - started
        changes = ipvs_changes(have, want)
        messages = changes_to_messages(changes)
        failures = nl.apply(messages)
    added, removed = sync_addresses(want.addresses)
    return {
        "read_s": read_s,
        "messages": len(messages),
        "failures": failures,
        "removed_dests": [(vs.ip, vs.port, vs.protocol, rs.ip, rs.port)
                          for vs, rs in changes.delete_dests],
        "addresses_added": added,
        "addresses_removed": removed,
    }


def apply_delta(requests: Sequence[IpvsRequest], add_addresses: Sequence[str],
                delete_addresses: Sequence[str],
                members: Sequence[tuple[int, str, str]]) -> list[str]:
    """An update's writes, in a sync's order: IPVS requests, kube-ipvs0's addresses, ipset
    members (each a batch on one socket); one line per refusal."""
    failures: list[str] = []
    if requests:
        with IpvsNetlink() as nl:
            failures += nl.apply(requests)
    if add_addresses or delete_addresses:
        index = kube_ipvs_index(create=False)
        if index is None:
            failures.append(f"{KUBE_IPVS_IF} is gone")
        else:
            with NetlinkChannel(socket.NETLINK_ROUTE) as nl:
                failures += _change_addresses(nl, index, add_addresses, delete_addresses)
    if members:
        failures += ipset_apply(members)
    return failures


def read_ipvs() -> tuple[IpvsLayout, set[str] | None]:
    """Every virtual server with its real servers, and kube-ipvs0's addresses (None when
    there is no kube-ipvs0)."""
    with IpvsNetlink() as nl:
        layout = nl.layout()
    index = kube_ipvs_index(create=False)
    if index is None:
        return layout, None
    with NetlinkChannel(socket.NETLINK_ROUTE) as nl:
        return layout, _addresses(nl, index)


def remove_ipvs() -> None:
    try:
        with IpvsNetlink() as nl:
            nl.flush()
    except DataplaneError:
        pass  # no IPVS here: nothing to flush
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=KUBE_IPVS_IF)
        if found:
            ipr.link("del", index=found[0])


def run(argv: Sequence[str], input: str | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    # Forked from a thread inside the node's netns, the child lives there too (no
    # `ip netns exec`).
    return subprocess.run(list(argv), input=input, capture_output=True, text=True,
                          timeout=timeout)


def delete_half_open_tcp(frontends: Sequence[tuple[str | None, int]]) -> int:
    """Delete the half-open TCP flows (SYN_SENT) recorded untranslated at these frontends
    ((address, port); None: any address); how many. IPVS translates a packet whose
    conntrack entry is already confirmed but cannot rewrite the entry, so a client port
    that comes round again to such an entry (a SYN sent there before a Service had the
    address, kept 120 s) gets its SYN to an endpoint and the SYN-ACK dropped as INVALID.
    Read from the namespace's conntrack table in /proc (no process: a sync may do this
    often); a `conntrack -D` per flow found (rare)."""
    wanted = set(frontends)
    try:
        with open("/proc/thread-self/net/nf_conntrack") as fh:
            table = fh.read()
    except FileNotFoundError:  # a kernel without CONFIG_NF_CONNTRACK_PROCFS
        table = run(["conntrack", "-L", "-p", "tcp", "--state", "SYN_SENT"], None, 30).stdout
    deleted = 0
    for line in table.splitlines():
        words = line.split()
        if "tcp" not in words[:4] or "SYN_SENT" not in words:
            continue
        # src, dst, sport, dport of the original direction, then of the reply
        pairs = [w.split("=", 1) for w in words if "=" in w]
        if len(pairs) < 8:
            continue
        orig, reply = dict(pairs[:4]), dict(pairs[4:8])
        dport = int(orig["dport"])
        if (orig["dst"], dport) not in wanted and (None, dport) not in wanted:
            continue
        if reply["src"] != orig["dst"] or reply["sport"] != orig["dport"]:
            continue  # translated: a live handshake to an endpoint
        res = run(["conntrack", "-D", "-p", "tcp", "--orig-src", orig["src"], "--orig-dst",
                   orig["dst"], "--sport", orig["sport"], "--dport", orig["dport"]], None, 30)
        deleted += res.returncode == 0
    return deleted


IPT_SO_GET_INFO = 64  # include/uapi/linux/netfilter_ipv4/ip_tables.h
# name, valid_hooks, hook_entry, underflow, num_entries, size
IPT_GETINFO = struct.Struct("=32sI5I5III")


def iptables_fingerprint() -> tuple | None:
    """(entries, bytes) of the legacy nat, filter and mangle tables: any rule added or removed
    changes it.

    Read with one getsockopt per table, no process; None when a table is not loaded.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        for table in (b"nat", b"filter", b"mangle"):
            buf = ctypes.create_string_buffer(IPT_GETINFO.pack(table, 0, *[0] * 10, 0, 0),
                                              IPT_GETINFO.size)
            size = ctypes.c_uint(IPT_GETINFO.size)
            if libc.getsockopt(sock.fileno(), socket.IPPROTO_IP, IPT_SO_GET_INFO, buf,
                               ctypes.byref(size)) != 0:
                return None
            fields = IPT_GETINFO.unpack(buf.raw)
            out.append((fields[-2], fields[-1]))
    return tuple(out)


def ipset_destroy(names: Sequence[str]) -> list[str]:
    """Destroy the named sets over netlink; a set that is already gone is no failure."""
    with NetlinkChannel(NETLINK_NETFILTER) as nl:
        failures = nl.batch([(f"destroy {name}", ipset_type(IPSET_CMD_DESTROY), 0,
                              ipset_destroy_request(name)) for name in names])
    return [f for f in failures if not f.endswith(os.strerror(errno.ENOENT))]


def ipset_apply(changes: Sequence[tuple[int, str, str]]) -> list[str]:
    """(cmd, set, member) changes over ipset's netlink, in batches: no process."""
    with NetlinkChannel(NETLINK_NETFILTER) as nl:
        return nl.batch([
            (f"{'add' if cmd == IPSET_CMD_ADD else 'del'} {name} {entry}", ipset_type(cmd), 0,
             ipset_request(cmd, name, entry))
            for cmd, name, entry in changes
        ])


def ipset_fingerprint() -> tuple | None:
    """Each of our sets' element count ("missing" when absent), over ipset's netlink: no
    process.

    None when a count cannot be read, so the caller falls back to `ipset save`.
    """
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
