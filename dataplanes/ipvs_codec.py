"""The netlink messages IPVS mode speaks, as bytes (pure: encoding and decoding, no socket).

IPVS's generic netlink family (include/uapi/linux/ip_vs.h) is encoded with struct:
pyroute2's generic codec took minutes to read back a few thousand virtual servers in the
guest kernel. Also here: ipset's nfnetlink requests for one member (what `ipset add` sends)
and rtnetlink's address requests for kube-ipvs0.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from dataplanes.ipvs_layout import IPSET_BY_NAME, IpvsChanges, RealServer, VirtualServer

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(attrs))


def attributes(data: bytes | memoryview, offset: int = 0, end: int | None = None
               ) -> dict[int, bytes]:
    """type -> payload of the attributes in data[offset:end]."""
    end = len(data) if end is None else end
    out = {}
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & NLA_TYPE_MASK] = bytes(data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return out


# --------------------------------------------------------------------------- IPVS

IPVS_GENL_NAME = "IPVS"
IPVS_GENL_VERSION = 1
CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE = 1, 2, 3, 4
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST, CMD_GET_DEST = 5, 6, 7, 8
CMD_FLUSH = 17
CMD_ATTR_SERVICE, CMD_ATTR_DEST = 1, 2
(SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK, SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT,
 SVC_NETMASK) = range(1, 10)
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH = range(1, 7)
DEST_ADDR_FAMILY = 11
SVC_F_PERSISTENT = 0x1
CONN_F_MASQ = 0  # the forwarding method: NAT
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
GENLMSGHDR = struct.Struct("=BBH")  # command, version, reserved


def service_key(vs: VirtualServer) -> bytes:
    """The attributes naming a virtual server (family, protocol, address, port)."""
    return (nla(SVC_AF, struct.pack("=H", socket.AF_INET))
            + nla(SVC_PROTOCOL, struct.pack("=H", PROTOCOLS[vs.protocol]))
            + nla(SVC_ADDR, socket.inet_aton(vs.ip) + bytes(12))  # union nf_inet_addr
            + nla(SVC_PORT, struct.pack("!H", vs.port)))


def service_full(vs: VirtualServer) -> bytes:
    """Every attribute of a virtual server: scheduler, persistence, netmask."""
    flags = SVC_F_PERSISTENT if vs.persistence_s else 0
    return (service_key(vs)
            + nla(SVC_SCHED_NAME, vs.scheduler.encode() + b"\0")
            + nla(SVC_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF))
            + nla(SVC_TIMEOUT, struct.pack("=I", vs.persistence_s))
            + nla(SVC_NETMASK, b"\xff\xff\xff\xff"))


def dest(rs: RealServer, full: bool = True) -> bytes:
    """A real server's attributes: its address and port, and (full) NAT and its weight."""
    attrs = (nla(DEST_ADDR, socket.inet_aton(rs.ip) + bytes(12))
             + nla(DEST_PORT, struct.pack("!H", rs.port))
             + nla(DEST_ADDR_FAMILY, struct.pack("=H", socket.AF_INET)))
    if full:
        attrs += (nla(DEST_FWD_METHOD, struct.pack("=I", CONN_F_MASQ))
                  + nla(DEST_WEIGHT, struct.pack("=I", rs.weight))
                  + nla(DEST_U_THRESH, struct.pack("=I", 0))
                  + nla(DEST_L_THRESH, struct.pack("=I", 0)))
    return attrs


def encode_request(msg_type: int, flags: int, seq: int, cmd: int, attrs: bytes) -> bytes:
    """A whole netlink message: nlmsghdr, genlmsghdr, attributes."""
    body = GENLMSGHDR.pack(cmd, IPVS_GENL_VERSION, 0) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


@dataclass(frozen=True)
class IpvsRequest:
    """One IPVS command: what it does (for errors), the command, its attributes."""

    what: str
    cmd: int
    attrs: bytes

    def body(self) -> bytes:
        """The message after its nlmsghdr."""
        return GENLMSGHDR.pack(self.cmd, IPVS_GENL_VERSION, 0) + self.attrs


def changes_to_messages(ch: IpvsChanges) -> list[IpvsRequest]:
    """The requests in a safe order: deletions first, then services before their dests."""
    out: list[IpvsRequest] = []
    gone = {vs.key for vs in ch.delete_services}

    def svc(vs: VirtualServer, full: bool = False) -> bytes:
        return nested(CMD_ATTR_SERVICE, service_full(vs) if full else service_key(vs))

    def dst(rs: RealServer, full: bool = True) -> bytes:
        return nested(CMD_ATTR_DEST, dest(rs, full))

    for vs, rs in ch.delete_dests:
        if vs.key not in gone:
            out.append(IpvsRequest(f"delete real server {rs.ip}:{rs.port} of {vs}",
                                   CMD_DEL_DEST, svc(vs) + dst(rs, False)))
    for vs in ch.delete_services:
        out.append(IpvsRequest(f"delete virtual server {vs}", CMD_DEL_SERVICE, svc(vs)))
    for vs in ch.add_services:
        out.append(IpvsRequest(f"add virtual server {vs} ({vs.scheduler})", CMD_NEW_SERVICE,
                               svc(vs, True)))
    for vs in ch.edit_services:
        out.append(IpvsRequest(f"change virtual server {vs}", CMD_SET_SERVICE, svc(vs, True)))
    for vs, rs in ch.add_dests:
        out.append(IpvsRequest(f"add real server {rs.ip}:{rs.port} to {vs}", CMD_NEW_DEST,
                               svc(vs) + dst(rs)))
    for vs, rs in ch.edit_dests:
        out.append(IpvsRequest(f"change real server {rs.ip}:{rs.port} of {vs}", CMD_SET_DEST,
                               svc(vs) + dst(rs)))
    return out


def parse_service(payload: bytes) -> VirtualServer | None:
    """A virtual server from its attributes; None for fwmark and IPv6 ones (not ours)."""
    a = attributes(payload)
    if struct.unpack("=H", a.get(SVC_AF, b"\0\0"))[0] != socket.AF_INET or SVC_ADDR not in a:
        return None
    proto = PROTOCOL_NAMES.get(struct.unpack("=H", a[SVC_PROTOCOL])[0])
    if proto is None:
        return None
    flags = struct.unpack_from("=I", a.get(SVC_FLAGS, bytes(8)))[0]
    timeout = struct.unpack("=I", a.get(SVC_TIMEOUT, bytes(4)))[0]
    return VirtualServer(proto, socket.inet_ntoa(a[SVC_ADDR][:4]),
                         struct.unpack("!H", a[SVC_PORT])[0],
                         a.get(SVC_SCHED_NAME, b"").rstrip(b"\0").decode(),
                         timeout if flags & SVC_F_PERSISTENT else 0)


def parse_dest(payload: bytes) -> RealServer:
    a = attributes(payload)
    weight = struct.unpack("=I", a.get(DEST_WEIGHT, bytes(4)))[0]
    if struct.unpack("=I", a.get(DEST_FWD_METHOD, bytes(4)))[0] & 0x7 != CONN_F_MASQ:
        weight = -1  # not NAT: differs from anything we want, so it is rewritten
    return RealServer(socket.inet_ntoa(a[DEST_ADDR][:4]), struct.unpack("!H", a[DEST_PORT])[0],
                      weight)


# --------------------------------------------------------------------------- ipset

NFNL_SUBSYS_IPSET = 6
IPSET_CMD_DESTROY, IPSET_CMD_ADD, IPSET_CMD_DEL = 3, 9, 10
IPSET_PROTOCOL = 6
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_DATA = 1, 2, 7
IPSET_ATTR_IP, IPSET_ATTR_PORT, IPSET_ATTR_PROTO, IPSET_ATTR_IP2 = 1, 4, 7, 20
IPSET_ATTR_CIDR2 = 21
IPSET_ATTR_IPADDR_IPV4 = 1
IPSET_FLAG_LIST_HEADER = 1 << 2  # a list dump of the header only, element count included
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id
IP_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def ipset_type(cmd: int) -> int:
    """The nlmsg type of an ipset command."""
    return (NFNL_SUBSYS_IPSET << 8) | cmd


def _ipset_ip(kind: int, ip: str) -> bytes:
    return nested(kind, nla(IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, socket.inet_aton(ip)))


def ipset_entry(set_type: str, entry: str) -> bytes:
    """IPSET_ATTR_DATA for one member, as `ipset add` encodes it: "ip", "ip,proto:port[,ip]",
    "ip,proto:port,net/prefix" (a bare address is a /32) or "port"."""
    if set_type == "bitmap:port":
        return nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(entry)))
    parts = entry.split(",")
    attrs = [_ipset_ip(IPSET_ATTR_IP, parts[0])]
    if len(parts) > 1:
        proto, port = parts[1].split(":")
        attrs += [nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(port))),
                  nla(IPSET_ATTR_PROTO, struct.pack("=B", IP_PROTOCOLS[proto]))]
    if len(parts) > 2:
        ip2, _, prefix = parts[2].partition("/")
        attrs.append(_ipset_ip(IPSET_ATTR_IP2, ip2))
        if prefix:
            attrs.append(nla(IPSET_ATTR_CIDR2, struct.pack("=B", int(prefix))))
    return b"".join(attrs)


def _ipset_head(name: str) -> bytes:
    return (NFGENMSG.pack(socket.AF_INET, 0, 0)
            + nla(IPSET_ATTR_PROTOCOL, struct.pack("=B", IPSET_PROTOCOL))
            + nla(IPSET_ATTR_SETNAME, name.encode() + b"\0"))


def ipset_request(cmd: int, name: str, entry: str) -> bytes:
    """The body of an IPSET_CMD_ADD/DEL for one member (sent without NLM_F_EXCL: `-exist`)."""
    return _ipset_head(name) + nested(IPSET_ATTR_DATA,
                                      ipset_entry(IPSET_BY_NAME[name].type, entry))


def ipset_destroy_request(name: str) -> bytes:
    return _ipset_head(name)


# --------------------------------------------------------------------------- addresses

RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
NLM_F_CREATE_EXCL = 0x400 | 0x200


def address_request(index: int, ip: str) -> bytes:
    """The body of an RTM_NEWADDR/RTM_DELADDR for ip/32 on interface `index`."""
    addr = socket.inet_aton(ip)
    return (IFADDRMSG.pack(socket.AF_INET, 32, 0, 0, index) + nla(IFA_LOCAL, addr)
            + nla(IFA_ADDRESS, addr))


def address_dump_request() -> bytes:
    return IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)


def parse_address(raw: bytes) -> tuple[int, str] | None:
    """(interface index, address) of an RTM_NEWADDR answer; None when not IPv4."""
    family, _plen, _flags, _scope, index = IFADDRMSG.unpack_from(raw)
    if family != socket.AF_INET:
        return None
    attrs = attributes(raw, IFADDRMSG.size)
    return index, socket.inet_ntoa(attrs.get(IFA_LOCAL) or attrs[IFA_ADDRESS])
