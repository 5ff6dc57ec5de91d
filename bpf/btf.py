"""Member offsets of kernel structs, read from the running kernel's BTF.

bcc compiles against Debian's generic headers, whose struct layouts need not match the
running kernel, so a program that reads kernel memory (`bpf_probe_read_kernel`) takes the
offsets it needs from /sys/kernel/btf/vmlinux instead, as #defines. This reads the BTF
format directly (the kernel's Documentation/bpf/btf.rst: a header, then the type section,
then the string section); only what offsets need is kept: structs and unions with their
members, and the typedefs, qualifiers and pointers between them.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

# Kinds (BTF_KIND_*) and the bytes each adds after the 12-byte common part.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


class BtfError(RuntimeError):
    """The BTF cannot be read, or lacks a struct or member asked for."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int


@dataclass(frozen=True)
class Type:
    kind: int
    name: str
    size_or_type: int  # size for structs, unions, ints; the target for pointers, typedefs
    members: tuple[Member, ...] = ()


def _extra(kind: int, vlen: int) -> int:
    if kind in (INT, VAR, DECL_TAG):
        return 4
    if kind == ARRAY:
        return 12
    if kind in (STRUCT, UNION, DATASEC, ENUM64):
        return 12 * vlen
    if kind in (ENUM, FUNC_PROTO):
        return 8 * vlen
    return 0


def parse(data: bytes) -> dict[int, Type]:
    """Type id -> Type for every type in a raw BTF blob (id 0 is void)."""
    if len(data) < 24:
        raise BtfError("the BTF blob is shorter than its header")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != MAGIC:
        raise BtfError(f"not BTF (magic {magic:#x}, not {MAGIC:#x})")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    types_at, strings_at = hdr_len + type_off, hdr_len + str_off
    strings = data[strings_at:strings_at + str_len]

    def name(off: int) -> str:
        end = strings.find(b"\0", off)
        return strings[off:end].decode("ascii", "replace")

    out: dict[int, Type] = {}
    pos, end, tid = types_at, types_at + type_len, 1
    while pos < end:
        name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        pos += 12
        members: tuple[Member, ...] = ()
        if kind in (STRUCT, UNION):
            found = []
            for i in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                bit = m_off & 0xFFFFFF if kflag else m_off
                found.append(Member(name(m_name), m_type, bit))
            members = tuple(found)
        out[tid] = Type(kind, name(name_off), size_or_type, members)
        pos += _extra(kind, vlen)
        tid += 1
    return out


class Btf:
    """Offsets of struct members, resolved through anonymous structs and unions."""

    def __init__(self, types: dict[int, Type]) -> None:
        self.types = types
        self._by_name: dict[str, int] = {}
        for tid, t in types.items():
            if t.kind in (STRUCT, UNION) and t.name and t.members:
                self._by_name.setdefault(t.name, tid)

    @classmethod
    def from_file(cls, path: str = VMLINUX) -> Btf:
        try:
            with open(path, "rb") as fh:
                return cls(parse(fh.read()))
        except OSError as exc:
            raise BtfError(f"cannot read the kernel's BTF at {path}: {exc.strerror}") from None

    def resolve(self, tid: int) -> Type:
        """The type behind typedefs and qualifiers."""
        t = self.types[tid]
        while t.kind in QUALIFIERS:
            t = self.types[t.size_or_type]
        return t

    def _find(self, t: Type, member: str, base: int) -> tuple[int, int] | None:
        for m in t.members:
            if m.name == member:
                return base + m.bit_offset, m.type_id
            if not m.name:  # an anonymous struct or union: its members are ours
                inner = self.resolve(m.type_id)
                hit = self._find(inner, member, base + m.bit_offset)
                if hit:
                    return hit
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` ("a.b.c": members of embedded structs) in the struct."""
        if struct_name not in self._by_name:
            raise BtfError(f"the kernel's BTF has no struct {struct_name}")
        t = self.resolve(self._by_name[struct_name])
        bits = 0
        where = struct_name
        for part in path.split("."):
            hit = self._find(t, part, 0)
            if hit is None:
                raise BtfError(f"struct {where} has no member {part} in this kernel")
            at, tid = hit
            bits += at
            t = self.resolve(tid)
            where = f"{where}.{part}"
        if bits % 8:
            raise BtfError(f"{struct_name}.{path} is a bit field")
        return bits // 8


@functools.cache
def kernel_btf() -> Btf:
    """The running kernel's BTF, parsed once per process."""
    return Btf.from_file()
