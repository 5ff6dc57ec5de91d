"""The bpf(2) commands svcbench needs, over ctypes: maps, programs, ids, cgroup attachment.

bcc compiles; everything after that (creating a node's maps, loading its programs,
batch map updates, finding a node's objects again from another process) goes through
these calls, so one compiled object serves every node and no pinning is needed.
`union bpf_attr` is filled as raw bytes at the offsets of include/uapi/linux/bpf.h.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
ATTR_SIZE = 128

# enum bpf_cmd
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_TEST_RUN = 10
PROG_GET_NEXT_ID = 11
MAP_GET_NEXT_ID = 12
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
MAP_LOOKUP_BATCH = 24
MAP_UPDATE_BATCH = 26
MAP_DELETE_BATCH = 27

# enum bpf_map_type / bpf_prog_type / bpf_attach_type (the ones used here)
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_LRU_HASH = 9
PROG_TYPE_XDP = 6
PROG_TYPE_CGROUP_SOCK_ADDR = 18
CGROUP_INET4_CONNECT = 10
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP4_RECVMSG = 19
CGROUP_INET4_GETPEERNAME = 29

F_NO_PREALLOC = 1 << 0
F_ALLOW_MULTI = 1 << 1
ANY = 0

INSN_SIZE = 8
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1
LOG_SIZE = 4 << 20


class BpfError(OSError):
    """A bpf(2) command failed; the message names the command and the object."""


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    ret = _libc.syscall(SYS_BPF, cmd, attr, ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attr(fmt: str, *values) -> ctypes.Array:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    return attr


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def _name(name: str) -> bytes:
    return name.encode()[:15]


# --------------------------------------------------------------------------- maps


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int, name: str) -> int:
    attr = _attr("=IIIIIII16s", map_type, key_size, value_size, max_entries, flags, 0, 0,
                 _name(name))
    return _bpf(MAP_CREATE, attr, f"create map {name}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = _attr("=I4xQQQ", fd, _addr(k), _addr(v), 0)
    try:
        _bpf(MAP_LOOKUP_ELEM, attr, f"lookup in map fd {fd}")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(MAP_UPDATE_ELEM, _attr("=I4xQQQ", fd, _addr(k), _addr(v), flags),
         f"update map fd {fd}")


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(MAP_DELETE_ELEM, _attr("=I4xQ", fd, _addr(k)), f"delete from map fd {fd}")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a map, with BPF_MAP_GET_NEXT_KEY (no key given: the first one)."""
    out: list[bytes] = []
    nxt = ctypes.create_string_buffer(key_size)
    cur = None
    while True:
        attr = _attr("=I4xQQ", fd, 0 if cur is None else _addr(cur), _addr(nxt))
        try:
            _bpf(MAP_GET_NEXT_KEY, attr, f"next key of map fd {fd}")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return out
            raise
        out.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """BPF_MAP_UPDATE_BATCH: `count` packed keys and values in one system call."""
    if not count:
        return
    k = ctypes.create_string_buffer(keys, len(keys))
    v = ctypes.create_string_buffer(values, len(values))
    attr = _attr("=QQQQII", 0, 0, _addr(k), _addr(v), count, fd)
    _bpf(MAP_UPDATE_BATCH, attr, f"batch update of {count} elements in map fd {fd}")


def map_delete_batch(fd: int, keys: bytes, count: int) -> None:
    """BPF_MAP_DELETE_BATCH; keys already gone are an error, so callers delete what exists."""
    if not count:
        return
    k = ctypes.create_string_buffer(keys, len(keys))
    attr = _attr("=QQQQII", 0, 0, _addr(k), 0, count, fd)
    _bpf(MAP_DELETE_BATCH, attr, f"batch delete of {count} elements from map fd {fd}")


def map_dump(fd: int, key_size: int, value_size: int, chunk: int = 8192) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, with BPF_MAP_LOOKUP_BATCH."""
    out: list[tuple[bytes, bytes]] = []
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    in_batch = ctypes.c_uint64(0)
    out_batch = ctypes.c_uint64(0)
    first = True
    while True:
        attr = _attr("=QQQQII", 0 if first else ctypes.addressof(in_batch),
                     ctypes.addressof(out_batch), _addr(keys), _addr(values), chunk, fd)
        done = False
        try:
            _bpf(MAP_LOOKUP_BATCH, attr, f"dump map fd {fd}")
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            done = True
        count = struct.unpack_from("=I", attr, 32)[0]
        kraw, vraw = keys.raw, values.raw
        for i in range(count):
            out.append((kraw[i * key_size:(i + 1) * key_size],
                        vraw[i * value_size:(i + 1) * value_size]))
        if done:
            return out
        in_batch.value = out_batch.value
        first = False


# --------------------------------------------------------------------------- programs


def prog_load(prog_type: int, insns: bytes, name: str, expected_attach_type: int = 0,
              license: str = "GPL") -> int:
    """Load instructions; on refusal the verifier's log ends the error message."""
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    for log_level in (0, 1):
        log = ctypes.create_string_buffer(LOG_SIZE if log_level else 0) if log_level else None
        attr = _attr("=IIQQIIQII16sII", prog_type, len(insns) // INSN_SIZE, _addr(insn_buf),
                     _addr(lic), log_level, LOG_SIZE if log_level else 0, _addr(log), 0, 0,
                     _name(name), 0, expected_attach_type)
        try:
            return _bpf(PROG_LOAD, attr, f"load program {name}")
        except BpfError as exc:
            if log_level:
                tail = log.value.decode(errors="replace").strip().splitlines()[-12:]
                raise BpfError(exc.errno, f"{exc.strerror}; verifier log ends:\n" + "\n".join(tail)) from None
    raise AssertionError("unreachable")


def relocate_maps(insns: bytes, fds: dict[int, int]) -> bytes:
    """Point every map reference (ld_imm64 with BPF_PSEUDO_MAP_FD) at other map fds."""
    out = bytearray(insns)
    for off in range(0, len(out), INSN_SIZE):
        if out[off] == LD_IMM64 and (out[off + 1] >> 4) == PSEUDO_MAP_FD:
            old = struct.unpack_from("=i", out, off + 4)[0]
            if old not in fds:
                raise BpfError(errno.EINVAL, f"instruction {off // INSN_SIZE} uses unknown map fd {old}")
            struct.pack_into("=i", out, off + 4, fds[old])
    return bytes(out)


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1,
                  out_size: int = 4096) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: (return code, packet as the program left it, mean ns per run)."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(out_size)
    attr = _attr("=IIIIQQII", prog_fd, 0, len(packet), out_size, _addr(data_in),
                 _addr(data_out), repeat, 0)
    _bpf(PROG_TEST_RUN, attr, f"test run of program fd {prog_fd}")
    retval, _size_in, size_out = struct.unpack_from("=III", attr, 4)
    duration = struct.unpack_from("=I", attr, 36)[0]
    return retval, data_out.raw[:size_out], duration


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
    _bpf(PROG_ATTACH, _attr("=IIII", target_fd, prog_fd, attach_type, flags),
         f"attach program fd {prog_fd} (type {attach_type})")


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    _bpf(PROG_DETACH, _attr("=IIII", target_fd, prog_fd, attach_type, 0),
         f"detach program fd {prog_fd} (type {attach_type})")


def prog_query(target_fd: int, attach_type: int, room: int = 64) -> list[int]:
    """Ids of the programs attached to a cgroup for one attach type."""
    ids = (ctypes.c_uint32 * room)()
    attr = _attr("=IIIIQI", target_fd, attach_type, 0, 0, ctypes.addressof(ids), room)
    _bpf(PROG_QUERY, attr, f"query attach type {attach_type}")
    count = struct.unpack_from("=I", attr, 24)[0]
    return list(ids[:count])


# --------------------------------------------------------------------------- ids and info


def _next_id(cmd: int, start: int) -> int | None:
    attr = _attr("=II", start, 0)
    try:
        _bpf(cmd, attr, "next id")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return struct.unpack_from("=I", attr, 4)[0]


def prog_ids() -> list[int]:
    out, cur = [], 0
    while (cur := _next_id(PROG_GET_NEXT_ID, cur)) is not None:
        out.append(cur)
    return out


def prog_fd_by_id(prog_id: int) -> int | None:
    try:
        return _bpf(PROG_GET_FD_BY_ID, _attr("=I", prog_id), f"open program id {prog_id}")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def map_fd_by_id(map_id: int) -> int | None:
    try:
        return _bpf(MAP_GET_FD_BY_ID, _attr("=I", map_id), f"open map id {map_id}")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def _info(fd: int, size: int) -> ctypes.Array:
    info = ctypes.create_string_buffer(size)
    _bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, size, ctypes.addressof(info)), f"info of fd {fd}")
    return info


def prog_info(fd: int) -> dict:
    """type, id, name and the ids of the maps a program uses."""
    ids = (ctypes.c_uint32 * 64)()
    info = ctypes.create_string_buffer(232)
    struct.pack_into("=IQ", info, 52, 64, ctypes.addressof(ids))
    _bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), ctypes.addressof(info)),
         f"info of program fd {fd}")
    prog_type, prog_id = struct.unpack_from("=II", info, 0)
    nr_maps = struct.unpack_from("=I", info, 52)[0]
    name = struct.unpack_from("=16s", info, 64)[0].split(b"\0", 1)[0].decode()
    return {"type": prog_type, "id": prog_id, "name": name, "map_ids": list(ids[:nr_maps])}


def map_info(fd: int) -> dict:
    info = _info(fd, 88)
    map_type, map_id, key_size, value_size, max_entries, flags = struct.unpack_from("=6I", info, 0)
    name = struct.unpack_from("=16s", info, 24)[0].split(b"\0", 1)[0].decode()
    return {"type": map_type, "id": map_id, "key_size": key_size, "value_size": value_size,
            "max_entries": max_entries, "flags": flags, "name": name}


def close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
