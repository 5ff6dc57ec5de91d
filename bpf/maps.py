"""The layouts of bpf/lib/maps.h in ctypes, and fast packers for the hot ones.

Addresses and ports are kept in network byte order, as the programs compare them with
packet fields. The ctypes structures are the reference (readable, used to decode);
`struct.Struct` packers with the same layout build thousands of entries per millisecond
for batch updates. `check_layouts` compares both with the sizes the compiler produced.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

from bpf import syscall

LB_SCOPE_ALL = 0
LB_SCOPE_INTERNAL = 1

SVC_F_AFFINITY = 1 << 0
SVC_F_DROP_EMPTY = 1 << 1
SVC_F_EXTERNAL = 1 << 2
SVC_F_SOURCE_RANGES = 1 << 3

BE_F_LOCAL = 1 << 0

CT_ORIGINAL = 0
CT_REPLY = 1
CT_F_SNAT = 1 << 0
CT_F_HAIRPIN = 1 << 1

IPPROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in IPPROTO.items()}


class Lb4Key(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint8 * 4), ("dport", ctypes.c_uint16),
                ("slot", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("scope", ctypes.c_uint8), ("pad", ctypes.c_uint16)]


LB4_INLINE = 8


class Lb4Backend(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint8 * 4), ("port", ctypes.c_uint16),
                ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class Lb4Service(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint16), ("flags", ctypes.c_uint16),
                ("svc_id", ctypes.c_uint32), ("affinity_timeout_s", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("backends", Lb4Backend * LB4_INLINE)]


class Lb4RangeKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("svc_id", ctypes.c_uint32),
                ("address", ctypes.c_uint8 * 4)]


class Lb4Range(ctypes.Structure):
    _fields_ = [("pad", ctypes.c_uint32)]


class Ct4Key(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint8 * 4), ("daddr", ctypes.c_uint8 * 4),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("dir", ctypes.c_uint8), ("pad", ctypes.c_uint16)]


class Ct4Entry(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint8 * 4), ("daddr", ctypes.c_uint8 * 4),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("svc_id", ctypes.c_uint32), ("flags", ctypes.c_uint16),
                ("slot", ctypes.c_uint16), ("pad", ctypes.c_uint32),
                ("created_ns", ctypes.c_uint64),
                ("seen_ns", ctypes.c_uint64)]


class AffinityKey(ctypes.Structure):
    _fields_ = [("client", ctypes.c_uint8 * 4), ("svc_id", ctypes.c_uint32)]


class AffinityVal(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint8 * 4), ("port", ctypes.c_uint16),
                ("slot", ctypes.c_uint16), ("seen_ns", ctypes.c_uint64)]


class Frag4Key(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint8 * 4), ("daddr", ctypes.c_uint8 * 4),
                ("id", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class Frag4Ports(ctypes.Structure):
    _fields_ = [("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16)]


class Sock4Key(ctypes.Structure):
    _fields_ = [("cookie", ctypes.c_uint64), ("address", ctypes.c_uint8 * 4),
                ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class Sock4Val(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint8 * 4), ("port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16)]


class NodeConfig(ctypes.Structure):
    _fields_ = [("netns_cookie", ctypes.c_uint64), ("node_ip", ctypes.c_uint8 * 4),
                ("hairpin_ip", ctypes.c_uint8 * 4), ("cluster_cidr", ctypes.c_uint8 * 4),
                ("cluster_mask", ctypes.c_uint8 * 4), ("snat_port_min", ctypes.c_uint16),
                ("snat_port_max", ctypes.c_uint16), ("saved_sysctls", ctypes.c_uint32),
                ("build", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Nothing(ctypes.Structure):
    """The key and value of a ring buffer map (it has neither: both sizes are 0)."""

    _fields_: list = []


@dataclass(frozen=True)
class MapLayout:
    name: str  # as in bpf/lib/maps.h, also the kernel's map name
    key: type[ctypes.Structure] | type[ctypes.c_uint32]
    value: type[ctypes.Structure]


LAYOUTS = {
    m.name: m
    for m in (
        MapLayout("lb4_services", Lb4Key, Lb4Service),
        MapLayout("ct4", Ct4Key, Ct4Entry),
        MapLayout("affinity", AffinityKey, AffinityVal),
        MapLayout("frag4", Frag4Key, Frag4Ports),
        MapLayout("sock4_revnat", Sock4Key, Sock4Val),
        MapLayout("node_config", ctypes.c_uint32, NodeConfig),
        MapLayout("lb4_source_ranges", Lb4RangeKey, Lb4Range),
        # the XDP drop reports (bpf/lib/drop.h, read by bpf/xdpdrops.py): a ring buffer
        MapLayout("xdp_drops", Nothing, Nothing),
    )
}

# Packers with the exact layouts above ("=" : native order, no implicit padding).
LB4_KEY = struct.Struct("=4sHHBBH")
LB4_HEADER = struct.Struct("=HHIII")  # lb4_service up to its inline backends
LB4_BACKEND = struct.Struct("=4sHBB")
LB4_SERVICE = struct.Struct("=HHIII" + "4sHBB" * LB4_INLINE)
NO_BACKEND = bytes(LB4_BACKEND.size)
U32 = struct.Struct("=I")
CT4_KEY = struct.Struct("=4s4sHHBBH")
CT4_ENTRY = struct.Struct("=4s4sHHIHHIQQ")
NODE_CONFIG = struct.Struct("=Q4s4s4s4sHHIII")
LB4_RANGE_KEY = struct.Struct("=II4s")
LB4_RANGE = bytes(ctypes.sizeof(Lb4Range))
PACKERS = {"lb4_services": (LB4_KEY, LB4_SERVICE), "ct4": (CT4_KEY, CT4_ENTRY),
           "node_config": (U32, NODE_CONFIG), "lb4_source_ranges": (LB4_RANGE_KEY, U32)}


def check_layouts(sizes: dict[str, tuple[int, int]]) -> list[str]:
    """Mismatches between the compiled maps' (key, value) sizes and the Python mirrors."""
    problems = []
    for name, layout in LAYOUTS.items():
        if name not in sizes:
            problems.append(f"map {name} is missing from the compiled object")
            continue
        mine = (ctypes.sizeof(layout.key), ctypes.sizeof(layout.value))
        if mine != sizes[name]:
            problems.append(f"map {name}: compiled key/value sizes {sizes[name]} != ctypes {mine}")
        packers = PACKERS.get(name)
        if packers and (packers[0].size, packers[1].size) != sizes[name]:
            problems.append(f"map {name}: packer sizes differ from compiled {sizes[name]}")
    return problems


# --------------------------------------------------------------------------- values


def ip_bytes(ip: str) -> bytes:
    return socket.inet_aton(ip)


def ip_str(raw) -> str:
    return socket.inet_ntoa(bytes(raw))


def port_be(port: int) -> int:
    """A port as the u16 whose memory holds it in network order."""
    return socket.htons(port)


def port_host(port_be_value: int) -> int:
    return socket.ntohs(port_be_value)


class BpfMap:
    """One kernel map of a node, by fd, with its layout."""

    def __init__(self, fd: int, layout: MapLayout):
        self.fd = fd
        self.layout = layout
        self.key_size = ctypes.sizeof(layout.key)
        self.value_size = ctypes.sizeof(layout.value)

    @property
    def name(self) -> str:
        return self.layout.name

    def update_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        if items:
            syscall.map_update_batch(self.fd, b"".join(k for k, _ in items),
                                     b"".join(v for _, v in items), len(items))

    def delete_batch(self, keys: list[bytes]) -> None:
        if keys:
            syscall.map_delete_batch(self.fd, b"".join(keys), len(keys))

    def dump(self) -> list[tuple[bytes, bytes]]:
        return syscall.map_dump(self.fd, self.key_size, self.value_size)

    def keys(self) -> list[bytes]:
        """Every key, one BPF_MAP_GET_NEXT_KEY at a time (for maps without batch lookups,
        such as LPM tries)."""
        return syscall.map_keys(self.fd, self.key_size)

    def delete(self, key: bytes) -> bool:
        return syscall.map_delete(self.fd, key)

    def lookup(self, key: bytes) -> bytes | None:
        return syscall.map_lookup(self.fd, key, self.value_size)

    def update(self, key: bytes, value: bytes) -> None:
        syscall.map_update(self.fd, key, value)

    def decode(self, key: bytes, value: bytes):
        return self.layout.key.from_buffer_copy(key), self.layout.value.from_buffer_copy(value)
