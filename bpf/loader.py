"""The bcc loader: compile bpf/*.c once, then give each node its own maps and programs.

bcc compiles the entry files (bpf_lxc.c, bpf_host.c, bpf_sock.c) as one unit: its
rewriter only turns `map.lookup()` into helper calls in the main file, so the loader
inlines the local headers itself. Compiling takes seconds, a node needs milliseconds:
the instructions are kept (in memory, and on disk keyed by source, bcc and kernel) and
each node gets fresh maps that its programs' map references are relocated to.

Nothing is pinned. A node's objects are found again, from any process, by listing the
kernel's programs named `svb_*` and reading the netns cookie in their `node_config` map.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field

from bpf import maps, syscall
from bpf.setup import bcc_import

BPF_DIR = os.path.dirname(os.path.abspath(__file__))
ENTRY_FILES = ("bpf_lxc.c", "bpf_host.c", "bpf_sock.c")
CACHE_DIR = "/run/svcbench/bpf-cache"
PROGRAM_PREFIX = "svb_"


@dataclass(frozen=True)
class ProgramSpec:
    name: str  # the C function, also the kernel's program name
    prog_type: int
    attach_type: int = 0  # expected_attach_type, for cgroup hooks


XDP_LXC = ProgramSpec("svb_xdp_lxc", syscall.PROG_TYPE_XDP)
XDP_HOST = ProgramSpec("svb_xdp_host", syscall.PROG_TYPE_XDP)
SOCK_HOOKS = (
    ProgramSpec("svb_sock4_conn", syscall.PROG_TYPE_CGROUP_SOCK_ADDR, syscall.CGROUP_INET4_CONNECT),
    ProgramSpec("svb_sock4_send", syscall.PROG_TYPE_CGROUP_SOCK_ADDR, syscall.CGROUP_UDP4_SENDMSG),
    ProgramSpec("svb_sock4_recv", syscall.PROG_TYPE_CGROUP_SOCK_ADDR, syscall.CGROUP_UDP4_RECVMSG),
    ProgramSpec("svb_sock4_peer", syscall.PROG_TYPE_CGROUP_SOCK_ADDR,
                syscall.CGROUP_INET4_GETPEERNAME),
)
PROGRAMS = {p.name: p for p in (XDP_LXC, XDP_HOST, *SOCK_HOOKS)}


class LoaderError(RuntimeError):
    """bcc could not compile, or the kernel refused a map or program (message says which)."""


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    template_fd: int  # the fd the compiled instructions refer to


@dataclass
class CompiledObject:
    programs: dict[str, bytes]
    maps: dict[str, MapSpec]
    digest: str

    @property
    def build(self) -> int:
        """The digest as node_config.build: objects of another build are never reused."""
        return int(self.digest[:8], 16)


# --------------------------------------------------------------------------- compile


def source_text() -> str:
    """The entry files with their local headers inlined once each (include guards kept)."""
    seen: set[str] = set()

    def expand(path: str) -> str:
        path = os.path.normpath(path)
        if path in seen:
            return ""
        seen.add(path)
        out = []
        with open(path) as fh:
            for line in fh:
                m = re.match(r'\s*#include\s+"([^"]+)"', line)
                out.append(expand(os.path.join(os.path.dirname(path), m.group(1))) if m else line)
        return "".join(out)

    return "".join(expand(os.path.join(BPF_DIR, f)) for f in ENTRY_FILES)


_compiled: dict[str, CompiledObject] = {}
_compile_lock = threading.Lock()


def _digest(text: str) -> str:
    try:
        from bcc.version import __version__ as bcc_version  # type: ignore[import-not-found]
    except ImportError:
        bcc_version = "?"
    h = hashlib.sha256()
    for part in (text, bcc_version, os.uname().release, ",".join(sorted(PROGRAMS))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def compile_object(cache_dir: str | None = CACHE_DIR) -> CompiledObject:
    """The compiled programs and map specs: from memory, the disk cache, or bcc."""
    text = source_text()
    with _compile_lock:
        bcc_import()
        digest = _digest(text)
        if digest in _compiled:
            return _compiled[digest]
        obj = _read_cache(cache_dir, digest) if cache_dir else None
        if obj is None:
            obj = _compile_with_bcc(text, digest)
            if cache_dir:
                _write_cache(cache_dir, obj)
        problems = maps.check_layouts({m.name: (m.key_size, m.value_size) for m in obj.maps.values()})
        if problems:
            raise LoaderError("bpf/maps.py does not mirror bpf/lib/maps.h: " + "; ".join(problems))
        _compiled[digest] = obj
        return obj


def _compile_with_bcc(text: str, digest: str) -> CompiledObject:
    try:
        from bcc import BPF  # type: ignore[import-not-found]
    except ImportError as exc:
        raise LoaderError(f"bcc is not importable ({exc}); `svcbench doctor --fix` installs it") from None
    try:
        bpf = BPF(text=text, cflags=["-Wno-unused-function", "-Wno-macro-redefined"])
    except Exception as exc:
        raise LoaderError(f"bcc could not compile bpf/{', bpf/'.join(ENTRY_FILES)}: {exc}") from None
    try:
        programs = {name: bytes(bpf.dump_func(name)) for name in PROGRAMS}
        specs = {}
        for name in maps.LAYOUTS:
            table = bpf[name]
            info = syscall.map_info(table.map_fd)
            specs[name] = MapSpec(name, info["type"], info["key_size"], info["value_size"],
                                  info["max_entries"], info["flags"], table.map_fd)
    finally:
        bpf.cleanup()
    return CompiledObject(programs, specs, digest)


def _read_cache(cache_dir: str, digest: str) -> CompiledObject | None:
    try:
        with open(os.path.join(cache_dir, f"{digest}.json")) as fh:
            data = json.load(fh)
        return CompiledObject(
            {k: bytes.fromhex(v) for k, v in data["programs"].items()},
            {k: MapSpec(**v) for k, v in data["maps"].items()},
            digest,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(cache_dir: str, obj: CompiledObject) -> None:
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = os.path.join(cache_dir, f".{obj.digest}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump({"programs": {k: v.hex() for k, v in obj.programs.items()},
                       "maps": {k: vars(v) for k, v in obj.maps.items()}}, fh)
        os.replace(tmp, os.path.join(cache_dir, f"{obj.digest}.json"))
    except OSError:
        pass  # a cache that cannot be written only costs the next process a compile


# --------------------------------------------------------------------------- per node


@dataclass
class NodeObjects:
    """One node's maps and programs (fds owned by this process until close())."""

    maps: dict[str, maps.BpfMap]
    programs: dict[str, int]
    program_ids: dict[str, int] = field(default_factory=dict)

    def map(self, name: str) -> maps.BpfMap:
        return self.maps[name]

    def config(self) -> maps.NodeConfig:
        raw = self.maps["node_config"].lookup(maps.U32.pack(0))
        return maps.NodeConfig.from_buffer_copy(raw)

    def set_config(self, config: maps.NodeConfig) -> None:
        self.maps["node_config"].update(maps.U32.pack(0), bytes(config))

    def close(self) -> None:
        for fd in self.programs.values():
            syscall.close(fd)
        for m in self.maps.values():
            syscall.close(m.fd)
        self.programs.clear()
        self.maps.clear()


def create_node_objects(obj: CompiledObject, config: maps.NodeConfig) -> NodeObjects:
    """Fresh maps for one node, its config written, and every program loaded against them."""
    made: dict[str, maps.BpfMap] = {}
    progs: dict[str, int] = {}
    try:
        for name, spec in obj.maps.items():
            fd = syscall.map_create(spec.map_type, spec.key_size, spec.value_size,
                                    spec.max_entries, spec.flags, name)
            made[name] = maps.BpfMap(fd, maps.LAYOUTS[name])
        node = NodeObjects(made, progs)
        config.build = obj.build
        node.set_config(config)
        relocation = {spec.template_fd: made[name].fd for name, spec in obj.maps.items()}
        for name, prog in PROGRAMS.items():
            insns = syscall.relocate_maps(obj.programs[name], relocation)
            progs[name] = syscall.prog_load(prog.prog_type, insns, name, prog.attach_type)
            node.program_ids[name] = syscall.prog_info(progs[name])["id"]
        return node
    except OSError as exc:
        for fd in progs.values():
            syscall.close(fd)
        for m in made.values():
            syscall.close(m.fd)
        raise LoaderError(str(exc)) from None


def load_missing_programs(obj: CompiledObject, node: NodeObjects) -> list[str]:
    """Load the programs a found node lacks (a program nothing held any more was freed)."""
    relocation = {spec.template_fd: node.maps[name].fd for name, spec in obj.maps.items()}
    loaded = []
    for name, prog in PROGRAMS.items():
        if name in node.programs:
            continue
        insns = syscall.relocate_maps(obj.programs[name], relocation)
        try:
            node.programs[name] = syscall.prog_load(prog.prog_type, insns, name, prog.attach_type)
        except OSError as exc:
            raise LoaderError(str(exc)) from None
        node.program_ids[name] = syscall.prog_info(node.programs[name])["id"]
        loaded.append(name)
    return loaded


def suite_programs() -> list[tuple[int, dict]]:
    """(program id, info) for every loaded program named svb_* (any node, any process)."""
    out = []
    for prog_id in syscall.prog_ids():
        fd = syscall.prog_fd_by_id(prog_id)
        if fd is None:
            continue
        try:
            info = syscall.prog_info(fd)
        finally:
            syscall.close(fd)
        if info["name"] in PROGRAMS:
            out.append((prog_id, info))
    return out


def program_config(info: dict) -> maps.NodeConfig | None:
    """The node_config a program uses (None if it has none)."""
    for map_id in info["map_ids"]:
        fd = syscall.map_fd_by_id(map_id)
        if fd is None:
            continue
        try:
            if syscall.map_info(fd)["name"] != "node_config":
                continue
            if syscall.map_info(fd)["value_size"] != maps.NODE_CONFIG.size:
                return None  # an older layout
            raw = syscall.map_lookup(fd, maps.U32.pack(0), maps.NODE_CONFIG.size)
            return maps.NodeConfig.from_buffer_copy(raw) if raw else None
        finally:
            syscall.close(fd)
    return None


def find_node_objects(netns_cookie: int, obj: CompiledObject) -> NodeObjects | None:
    """Open the maps and programs of the node whose namespace has this cookie, if loaded.

    Programs nothing held any more were freed with the maps only they used: those are
    made and loaded again, against the maps still alive. Objects of another build (map
    sizes differ from this one's) count as absent: the caller loads fresh ones over them.
    """
    found: dict[str, int] = {}
    map_ids: set[int] = set()
    for prog_id, info in suite_programs():
        if info["name"] in found:
            continue
        config = program_config(info)
        if config is None or config.netns_cookie != netns_cookie or config.build != obj.build:
            continue
        found[info["name"]] = prog_id
        map_ids.update(info["map_ids"])
    if not found:
        return None
    node = NodeObjects({}, {}, {})
    try:
        for map_id in sorted(map_ids):
            fd = syscall.map_fd_by_id(map_id)
            if fd is None:
                continue
            info = syscall.map_info(fd)
            # The kernel keeps 15 characters of a map's name (BPF_OBJ_NAME_LEN):
            # lb4_source_ranges reads back as lb4_source_rang.
            name = next((n for n in maps.LAYOUTS if n[:15] == info["name"]), info["name"])
            spec = obj.maps.get(name)
            if spec is not None and (info["key_size"], info["value_size"]) != (
                    spec.key_size, spec.value_size):
                syscall.close(fd)
                node.close()
                return None
            if name in maps.LAYOUTS and name not in node.maps:
                node.maps[name] = maps.BpfMap(fd, maps.LAYOUTS[name])
            else:
                syscall.close(fd)
        for name, prog_id in found.items():
            fd = syscall.prog_fd_by_id(prog_id)
            if fd is not None:
                node.programs[name] = fd
                node.program_ids[name] = prog_id
        if "node_config" not in node.maps:
            node.close()
            return None
        for name, spec in obj.maps.items():
            if name not in node.maps:
                fd = syscall.map_create(spec.map_type, spec.key_size, spec.value_size,
                                        spec.max_entries, spec.flags, name)
                node.maps[name] = maps.BpfMap(fd, maps.LAYOUTS[name])
        load_missing_programs(obj, node)
    except OSError as exc:
        node.close()
        raise LoaderError(str(exc)) from None
    return node
