"""cgroup v2 directories for the socket hooks: create, attach, list, join, remove.

Socket hooks attach to a cgroup, and cgroups are not per network namespace. The suite
keeps its own directories under <cgroup2>/svcbench/ so only processes placed there run
its hooks; the hooks themselves act only on sockets of their node's namespace.
"""

from __future__ import annotations

import errno
import os

from bpf import syscall

SUITE_DIR = "svcbench"
SOCK_ATTACH_TYPES = (
    syscall.CGROUP_INET4_CONNECT,
    syscall.CGROUP_UDP4_SENDMSG,
    syscall.CGROUP_UDP4_RECVMSG,
    syscall.CGROUP_INET4_GETPEERNAME,
)


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on hybrid hosts)."""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        return None
    return None


def suite_root() -> str | None:
    mount = cgroup2_mount()
    return os.path.join(mount, SUITE_DIR) if mount else None


def group_path(group: str) -> str:
    root = suite_root()
    if root is None:
        raise FileNotFoundError(errno.ENOENT, "no cgroup v2 hierarchy is mounted")
    return os.path.join(root, group)


def ensure(path: str) -> bool:
    """Create the directory (and the suite's parent); True when it was made now."""
    try:
        os.makedirs(path)
        return True
    except FileExistsError:
        return False


def process_cgroup(pid: int | str = "self") -> str | None:
    """The process's cgroup v2 path relative to the mount ("/" for the root)."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def members(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def move(pid: int, path: str) -> bool:
    """Put a process into the cgroup at `path`; False when it is gone."""
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as fh:
            fh.write(str(pid))
        return True
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise


def attached(path: str, attach_type: int) -> list[int]:
    """Program ids attached directly to the cgroup for one attach type."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return syscall.prog_query(fd, attach_type)
    finally:
        os.close(fd)


def attach(path: str, prog_fd: int, attach_type: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syscall.prog_attach(fd, prog_fd, attach_type, syscall.F_ALLOW_MULTI)
    finally:
        os.close(fd)


def detach(path: str, prog_fd: int, attach_type: int) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syscall.prog_detach(fd, prog_fd, attach_type)
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    finally:
        os.close(fd)


def detach_ids(path: str, attach_type: int, prog_ids: list[int]) -> list[int]:
    """Detach programs by id (from any process); returns the ids detached."""
    done = []
    for prog_id in prog_ids:
        fd = syscall.prog_fd_by_id(prog_id)
        if fd is None:
            continue
        try:
            if detach(path, fd, attach_type):
                done.append(prog_id)
        finally:
            syscall.close(fd)
    return done


def remove(path: str, home: str) -> list[int]:
    """Move every member to `home`, then remove the directory; returns the pids moved."""
    moved = []
    for _ in range(3):  # a member may fork while we move the others
        pids = members(path)
        if not pids:
            break
        for pid in pids:
            if move(pid, home):
                moved.append(pid)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    return moved
