"""The default cluster: nodes, pods and an external client as network namespaces on this host.

Layout (addresses from kube.model.PLAN, names carry the run id so runs never collide):

    svb-<run>-underlay         bridge br0: the L2 network between nodes
    svb-<run>-node<k>          eth0 198.18.0.k/24 on br0; pv<i> per pod (169.254.1.1/32,
                               proxy_arp, /32 route to the pod); routes to the other nodes'
                               pod CIDRs; Service and external-IP CIDRs on eth0
    svb-<run>-external         eth0 198.18.0.200/24 on br0; external-IP CIDR via node1
    svb-<run>-<ns>.<pod>       eth0 with the pod IP /32, default via 169.254.1.1 onlink

Nothing here touches the namespace this process runs in: every namespace is created by a
thread that unshares its own network namespace, and every veth is created inside one
sandbox namespace with its peer placed straight into another.

A run is recorded in STATE_DIR/<run>/state.json before anything else exists, so `gc` can
always tell a live run from what a killed one left behind. STATE_DIR/<run>/lock serialises
the commands that change a run (`up` until the run is ready, `apply`, `delete`, `down`): an
flock, so a holder that is killed frees it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute

from clusters.nsenter import NETNS_RUN_DIR, in_netns, pids_in_netns, run_in_netns
from clusters.signals import interrupts_deferred
from kube.model import PLAN, Node, Pod

STATE_DIR = "/run/svcbench/runs"
NETNS_PREFIX = "svb-"
RUN_ID_RE = re.compile(r"^[0-9a-f]{6}$")
UPLINK = "eth0"
BRIDGE = "br0"
STATUS_CREATING = "creating"
STATUS_READY = "ready"
STATUS_DESTROYING = "destroying"
LOCK_FILE = "lock"
LOCK_WAIT_S = 300.0  # a sync of 10,000 Services takes seconds; a holder this slow is stuck
# A killed holder's child between fork and exec still holds the lock for a moment.
GC_LOCK_WAIT_S = 1.0

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2
RTNH_F_ONLINK = 4
RT_SCOPE_LINK = 253
AGENT_STOP_GRACE_S = 2.0
POD_WORKERS = 2  # measured: 1, 2, 4 and 8 workers all take ~2 s for 150 pods (unshare is serialised)

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class ClusterError(RuntimeError):
    """A cluster could not be created, found or changed; the message names the run and object."""


class CommandFailed(subprocess.CalledProcessError):
    """A command run inside a node's namespace exited non-zero; str() carries its stderr."""

    def __init__(self, netns: str, proc: subprocess.CompletedProcess):
        super().__init__(proc.returncode, proc.args, proc.stdout, proc.stderr)
        self.netns = netns

    def __str__(self) -> str:
        err = (self.stderr or "").strip() or "(no stderr)"
        return f"in {self.netns}: {' '.join(map(str, self.cmd))} exited {self.returncode}: {err}"


# --------------------------------------------------------------------------- namespaces


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


_netns_dir_ready = threading.Lock()
_netns_dir_done: list[bool] = []


def _ensure_netns_dir() -> None:
    """iproute2's setup of /run/netns, once per process: a shared mount point.

    Shared, so namespaces created later still appear in processes that `ip netns exec`
    started earlier (each has its own mount namespace). As in iproute2, bind it onto
    itself only when it is not yet a mount point: binding again would copy every
    namespace mount below it each time.
    """
    with _netns_dir_ready:
        if _netns_dir_done:
            return
        os.makedirs(NETNS_RUN_DIR, exist_ok=True)
        run_dir = NETNS_RUN_DIR.encode()
        made = False
        while _libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL or made:
                raise OSError(err, f"make {NETNS_RUN_DIR} a shared mount: {os.strerror(err)}")
            _check(_libc.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None),
                   f"bind-mount {NETNS_RUN_DIR} onto itself")
            made = True
        _netns_dir_done.append(True)


def netns_add(name: str, fn: Callable[..., Any] | None = None, *args: Any) -> Any:
    """Create network namespace `name` (like `ip netns add`), then run fn inside it.

    A thread unshares its own network namespace (the process's stays untouched) and
    bind-mounts it under /run/netns; running fn on that same thread saves a setns.
    """
    path = os.path.join(NETNS_RUN_DIR, name)
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
        except FileExistsError:
            box["error"] = ClusterError(f"network namespace {name} already exists")
            return
        try:
            _check(_libc.unshare(CLONE_NEWNET), f"unshare for {name}")
            # /proc/self would name the thread-group leader, which stays where it was.
            _check(
                _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None),
                f"bind-mount {path}",
            )
        except BaseException as exc:
            _remove_netns_file(path)
            box["error"] = exc
            return
        try:
            box["value"] = fn(*args) if fn is not None else None
        except BaseException as exc:
            box["error"] = exc

    _ensure_netns_dir()
    thread = threading.Thread(target=body, name=f"netns-add:{name}", daemon=True)
    with interrupts_deferred():  # cut short, the namespace would appear after cleanup looked
        thread.start()
        thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _remove_netns_file(path: str) -> None:
    _libc.umount2(path.encode(), MNT_DETACH)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def netns_delete(name: str) -> bool:
    """Unmount and remove /run/netns/<name>; the kernel frees it once nothing holds it."""
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        return False
    _remove_netns_file(path)
    return True


def list_netns(prefix: str = NETNS_PREFIX) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def write_sysctl(key: str, value: str | int) -> None:
    """Write net.* sysctl `key` in the calling thread's network namespace.

    /proc/sys/net resolves to the namespace of the thread that opens it, so this must
    run on a thread that entered the namespace (in_netns or netns_add).
    """
    with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
        fh.write(str(value))


def _interface_sysctls(ifname: str, **values: int) -> None:
    for k, v in values.items():
        with open(f"/proc/sys/net/ipv4/conf/{ifname}/{k}", "w") as fh:
            fh.write(str(v))


def _base_sysctls(forward: bool) -> None:
    """Every namespace: IPv4 only, no reverse-path filter; nodes also forward."""
    # IPv6 autoconf on every veth would put stray DAD/MLD packets into benchmarks.
    write_sysctl("net.ipv6.conf.default.disable_ipv6", 1)
    for conf in ("all", "default"):
        write_sysctl(f"net.ipv4.conf.{conf}.rp_filter", 0)
    # A Service without endpoints answers with ICMP port unreachable; the default rate limit
    # (one per second per peer) would turn refused probes into timeouts.
    write_sysctl("net.ipv4.icmp_ratelimit", 0)
    write_sysctl("net.ipv4.icmp_msgs_per_sec", 1_000_000)
    write_sysctl("net.ipv4.icmp_msgs_burst", 100_000)
    if forward:
        write_sysctl("net.ipv4.ip_forward", 1)


def _link_index(ipr: IPRoute, ifname: str) -> int:
    return ipr.link("get", ifname=ifname)[0]["index"]


# --------------------------------------------------------------------------- processes


def proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a pid apart from a reused one)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def process_alive(pid: int | None, start: int | None = None) -> bool:
    """True when pid runs (not a zombie) and, given `start`, is the same process as then.

    Zombies count as gone; reaping them is their parent's business (never steal an exit status).
    """
    if not pid:
        return False
    now = proc_start(pid)
    return now is not None and (start is None or now == start)


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def _kill_and_wait(pids: Iterable[int], timeout: float = 2.0) -> list[int]:
    """SIGKILL pids and wait until they are gone; returns the ones that were signalled."""
    killed = []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    while any(process_alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.01)
    return killed


# --------------------------------------------------------------------------- state


def _now() -> float:
    return round(time.time(), 3)


def boot_id() -> str:
    """This kernel's boot id: a pid means something only under the kernel that ran it."""
    with open("/proc/sys/kernel/random/boot_id") as fh:
        return fh.read().strip()


def owner() -> dict[str, Any]:
    """This process as the owner of something it made: pid, start time and kernel boot id."""
    return {"pid": os.getpid(), "start": proc_start(os.getpid()), "boot": boot_id()}


def _read_state(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, "state.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _write_state(run_dir: str, state: dict) -> None:
    """Atomic replace: a reader (gc, attach) never sees half a file."""
    tmp = os.path.join(run_dir, f".state.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(run_dir, "state.json"))


def _new_lock(run_dir: str) -> int:
    """Create the run's lock file and hold it (the run is born locked by its creator)."""
    fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _name_holder(fd)
    return fd


def _name_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> str:
    """Who holds the lock, as a waiter can say it: "pid 123 (svcbench apply -f x.yaml)"."""
    try:
        pid = int(os.pread(fd, 32, 0).split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except (OSError, ValueError, IndexError):
        return "another process"
    words = argv[argv.index("svcbench"):] if "svcbench" in argv else argv[-4:]
    return f"pid {pid} ({' '.join(words)})"


def _flock(fd: int, wait_s: float) -> bool:
    """Take an exclusive flock on fd within wait_s seconds; False if its holder kept it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def _lock_run(run_dir: str, run_id: str, wait_s: float = LOCK_WAIT_S) -> int:
    """Take the run's lock, waiting up to wait_s for its holder; returns the fd that holds it."""
    path = os.path.join(run_dir, LOCK_FILE)
    # O_CREAT only for a run made before runs had locks: a waiter must not bring back the
    # lock file of a run that `down` is removing.
    legacy = not os.path.exists(path) and os.path.exists(os.path.join(run_dir, "state.json"))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if legacy else 0), 0o644)
    except FileNotFoundError:
        raise ClusterError(f"run {run_id} is gone: {path} no longer exists") from None
    try:
        if not _flock(fd, wait_s):
            raise ClusterError(f"run {run_id} is busy: {_holder(fd)} has held its lock for more "
                               f"than {wait_s:.0f} s; try again once it is done")
        # The holder before us may have been `down`: then the file we hold is no longer there.
        try:
            in_place = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            in_place = False
        if not in_place:
            raise ClusterError(f"run {run_id} was removed while this command waited for it")
        _name_holder(fd)
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def _lock_if_free(run_dir: str) -> Iterator[bool]:
    """Hold the run's lock for the block if nobody does (True, also when it has no lock file)."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    try:
        yield _flock(fd, GC_LOCK_WAIT_S)
    finally:
        os.close(fd)


def run_liveness(state: dict | None) -> tuple[bool, str]:
    """(live, why) for a run's state: live runs are never garbage-collected."""
    if state is None:
        return False, "no readable state.json"
    status = state.get("status")
    owner = state.get("owner") or {}
    owner_alive = process_alive(owner.get("pid"), owner.get("start"))
    if status in (STATUS_CREATING, STATUS_DESTROYING):
        if owner_alive:
            return True, f"{status} by pid {owner.get('pid')}"
        return False, f"{status} and its owner pid {owner.get('pid')} is gone"
    if status == STATUS_READY:
        if not state.get("kept", True) and not owner_alive:
            return False, f"ready but never kept, and its owner pid {owner.get('pid')} is gone"
        agents = [(n["name"], n["agent"]) for n in state.get("nodes", []) if n.get("agent")]
        for node, agent in agents:
            if not process_alive(agent.get("pid"), agent.get("start")):
                return False, f"ready but the echo agent of {node} (pid {agent.get('pid')}) is gone"
        if agents:
            return True, "ready, every echo agent running"
        # An agentless run lives as long as the process that made it.
        if owner_alive:
            return True, f"ready, no agents, owner pid {owner.get('pid')} running"
        return False, f"ready, no agents, and its owner pid {owner.get('pid')} is gone"
    return False, f"unknown status {status!r}"


def _run_of_netns(name: str) -> str | None:
    rest = name[len(NETNS_PREFIX) :] if name.startswith(NETNS_PREFIX) else None
    if not rest:
        return None
    return rest.split("-", 1)[0]


# --------------------------------------------------------------------------- nodes


@dataclass(eq=False)
class NetnsNode:
    """A node's host network: one network namespace on this host (dataplanes.base.NodeHandle)."""

    name: str
    netns: str
    ip: str
    pod_cidr: str
    index: int
    uplink: str = UPLINK
    pod_veths: dict[str, str] = field(default_factory=dict, repr=False)  # pod IP -> pv<i>

    def pod_interfaces(self) -> dict[str, str]:
        return dict(self.pod_veths)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = 120,
    ) -> subprocess.CompletedProcess:
        if isinstance(input, bytes):
            input = input.decode()
        proc = run_in_netns(self.netns, [str(a) for a in argv], input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise CommandFailed(self.netns, proc)
        return proc

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return in_netns(self.netns, fn, *args, **kwargs)


@dataclass
class PodRecord:
    """A pod namespace this run created."""

    key: str  # "namespace/name"
    netns: str
    ip: str
    node: str
    veth: str  # node-side interface
    ports: list[tuple[int, str]]


# --------------------------------------------------------------------------- cluster


class NetnsCluster:
    """One run: its namespaces, echo agents and state file. Use `create` or `attach`."""

    def __init__(self, run_id: str, state_dir: str, state: dict):
        self.run_id = run_id
        self.state_dir = state_dir
        self.run_dir = os.path.join(state_dir, run_id)
        self.state = state
        self.underlay_netns = state["underlay"]
        self.external_netns = state["external"]
        self.nodes: list[NetnsNode] = [
            NetnsNode(n["name"], n["netns"], n["ip"], n["pod_cidr"], n["index"])
            for n in state["nodes"]
        ]
        self.pods: dict[str, PodRecord] = {}
        for key, rec in state.get("pods", {}).items():
            self.pods[key] = PodRecord(
                key, rec["netns"], rec["ip"], rec["node"], rec["veth"],
                [tuple(p) for p in rec["ports"]],
            )
            self.node(rec["node"]).pod_veths[rec["ip"]] = rec["veth"]
        self._kept = False
        self._destroyed = False
        self._lock = threading.RLock()  # agent threads save while the main thread builds
        self._run_lock: int | None = None  # fd holding STATE_DIR/<run>/lock, when we hold it

    # ------------------------------------------------------------------ naming

    @staticmethod
    def netns_name(run_id: str, suffix: str) -> str:
        return f"{NETNS_PREFIX}{run_id}-{suffix}"

    def pod_netns(self, namespace: str, name: str) -> str:
        key = f"{namespace}/{name}"
        if key not in self.pods:
            raise KeyError(f"pod {key} is not in run {self.run_id} (it has {len(self.pods)} pods)")
        return self.pods[key].netns

    def node(self, name: str) -> NetnsNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"run {self.run_id} has no node {name!r} (nodes: "
                       f"{', '.join(n.name for n in self.nodes)})")

    @property
    def meta(self) -> dict:
        return self.state.setdefault("meta", {})

    @property
    def namespaces(self) -> list[str]:
        return list_netns(f"{NETNS_PREFIX}{self.run_id}-")

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        nodes: int,
        run_id: str | None = None,
        state_dir: str = STATE_DIR,
        progress: Callable[[str], None] | None = None,
        agents: bool = True,
    ) -> NetnsCluster:
        """Build underlay, `nodes` nodes, the external client and one echo agent per node.

        `agents=False` skips the echo agents (data-plane tests that bring their own traffic).
        On any failure everything created so far is removed before the error propagates.
        """
        if not 1 <= nodes <= 199:
            raise ValueError(f"nodes must be between 1 and 199, got {nodes}")
        say = progress or (lambda _msg: None)
        run_id = cls._claim_run_id(run_id, state_dir)
        node_list = [Node.numbered(k) for k in range(1, nodes + 1)]
        state = {
            "run": run_id,
            "status": STATUS_CREATING,
            "kept": False,
            "owner": owner(),
            "created": _now(),
            "underlay": cls.netns_name(run_id, "underlay"),
            "external": cls.netns_name(run_id, "external"),
            "nodes": [
                {
                    "name": n.name,
                    "index": n.index,
                    "ip": n.ip,
                    "pod_cidr": n.pod_cidr,
                    "netns": cls.netns_name(run_id, n.name),
                    "agent": None,
                }
                for n in node_list
            ],
            "agents": agents,
            "pods": {},
            "next_veth": 0,
            "meta": {},
        }
        # The state file exists before the first namespace, so gc can always find the run.
        run_dir = os.path.join(state_dir, run_id)
        tmp_dir = os.path.join(state_dir, f".{run_id}.creating")
        os.makedirs(tmp_dir)
        run_lock = _new_lock(tmp_dir)  # held until the run is ready and kept, or gone
        _write_state(tmp_dir, state)
        os.rename(tmp_dir, run_dir)
        cluster = cls(run_id, state_dir, state)
        cluster._run_lock = run_lock
        try:
            cluster._build(say)
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    @staticmethod
    def _claim_run_id(run_id: str | None, state_dir: str) -> str:
        os.makedirs(state_dir, exist_ok=True)
        if run_id is not None:
            if not RUN_ID_RE.match(run_id):
                raise ValueError(f"run id {run_id!r} must be 6 lowercase hex characters, like 'a3f09c'")
            if os.path.exists(os.path.join(state_dir, run_id)) or list_netns(
                f"{NETNS_PREFIX}{run_id}-"
            ):
                raise ClusterError(f"run {run_id} already exists (state or namespaces); pick another id")
            return run_id
        while True:
            run_id = secrets.token_hex(3)
            if not os.path.exists(os.path.join(state_dir, run_id)) and not list_netns(
                f"{NETNS_PREFIX}{run_id}-"
            ):
                return run_id

    def _build(self, say: Callable[[str], None]) -> None:
        underlay = self.underlay_netns
        say(f"run {self.run_id}: underlay {underlay}")
        self._add_netns(underlay, _setup_underlay)
        spawner = ThreadPoolExecutor(max_workers=len(self.nodes)) if self.state["agents"] else None
        spawning = []
        try:
            for node in self.nodes:
                say(f"run {self.run_id}: {node.name} {node.netns}")
                self._add_netns(node.netns, _setup_node_netns)
                in_netns(underlay, _plug_into_bridge, node.name, node.netns)
                others = [(o.pod_cidr, o.ip) for o in self.nodes if o is not node]
                in_netns(node.netns, _setup_node_uplink, node.ip, others)
                if spawner is not None:
                    # The agent's interpreter starts while the next node is being wired.
                    with interrupts_deferred():  # an agent destroy() does not know would stay
                        spawning.append(spawner.submit(self._spawn_agent, node))
            say(f"run {self.run_id}: external client {self.external_netns}")
            self._add_netns(self.external_netns, _setup_external_netns)
            in_netns(underlay, _plug_into_bridge, "external", self.external_netns)
            in_netns(self.external_netns, _setup_external_uplink, self.nodes[0].ip)
            if spawning:
                say(f"run {self.run_id}: echo agents")
            for fut in spawning:
                fut.result()
        finally:
            if spawner is not None:
                spawner.shutdown(wait=True)  # every started agent is recorded, so destroy() stops it
        self.state["status"] = STATUS_READY
        self.state["ready"] = _now()
        self.save()
        say(f"run {self.run_id}: ready")

    def _add_netns(self, name: str, setup: Callable[[], None]) -> None:
        """Record the namespace in the state file, then create it."""
        with self._lock:
            self.state.setdefault("namespaces", []).append(name)
            self.save()
        netns_add(name, setup)

    def _node_state(self, name: str) -> dict:
        for n in self.state["nodes"]:
            if n["name"] == name:
                return n
        raise KeyError(name)

    def _agent_paths(self, node: NetnsNode) -> tuple[str, str]:
        return (
            os.path.join(self.run_dir, f"agent-{node.name}.sock"),
            os.path.join(self.run_dir, f"agent-{node.name}.log"),
        )

    def _spawn_agent(self, node: NetnsNode) -> dict:
        from clusters.workloads.echo import spawn_agent  # agentless runs never need it

        control, log = self._agent_paths(node)
        pid = spawn_agent(node.netns, control, log)
        agent = {"pid": pid, "start": proc_start(pid), "control": control, "log": log}
        with self._lock:
            self._node_state(node.name)["agent"] = agent
            self.save()
        return agent

    def agent(self, node_name: str):
        """The AgentClient of a node's echo agent."""
        from clusters.workloads.echo import AgentClient

        info = self._node_state(node_name).get("agent")
        if not info:
            raise ClusterError(f"run {self.run_id}: {node_name} has no echo agent")
        return AgentClient(info["control"])

    @classmethod
    def attach(cls, run_id: str | None = None, state_dir: str = STATE_DIR) -> NetnsCluster:
        """Open a live run (the only one when run_id is None) made by this or another process."""
        runs = list_runs(state_dir)
        if run_id is None:
            live = [r for r, st in runs.items() if run_liveness(st)[0] and st["status"] == STATUS_READY]
            if len(live) != 1:
                listing = ", ".join(
                    f"{r} ({run_liveness(st)[1]})" for r, st in sorted(runs.items())
                ) or "none"
                what = "no live run" if not live else f"{len(live)} live runs"
                raise ClusterError(
                    f"{what} in {state_dir} to attach to; name one with a run id (runs: {listing})"
                )
            run_id = live[0]
        if run_id not in runs:
            raise ClusterError(
                f"run {run_id} not found in {state_dir} (runs: {', '.join(sorted(runs)) or 'none'})"
            )
        state = runs[run_id]
        live, why = run_liveness(state)
        if not live or state.get("status") != STATUS_READY:
            raise ClusterError(f"run {run_id} cannot be attached: {why}; `svcbench gc` removes dead runs")
        cluster = cls(run_id, state_dir, state)
        cluster._kept = True  # an attached run belongs to whoever created it
        return cluster

    @classmethod
    @contextmanager
    def attach_locked(
        cls, run_id: str | None = None, state_dir: str = STATE_DIR, wait_s: float = LOCK_WAIT_S
    ) -> Iterator[NetnsCluster]:
        """`attach` holding the run's lock: commands that change one run take turns.

        The state is read once the lock is held, so each sees what the one before it left;
        a run that `down` removed meanwhile raises ClusterError saying so.
        """
        found = cls.attach(run_id, state_dir)
        fd = _lock_run(found.run_dir, found.run_id, wait_s)
        try:
            cluster = cls.attach(found.run_id, state_dir)
        except BaseException:
            os.close(fd)
            raise
        cluster._run_lock = fd
        try:
            yield cluster
        finally:
            cluster._release_lock()

    def _release_lock(self) -> None:
        if self._run_lock is not None:
            os.close(self._run_lock)
            self._run_lock = None

    def save(self) -> None:
        """Write the state file (call after changing `meta`)."""
        with self._lock:
            if self._destroyed:
                return
            known = {k: _pod_state(r) for k, r in self.pods.items()}
            self.state["pods"] = {**self.state.get("pods", {}), **known}
            _write_state(self.run_dir, self.state)

    def keep(self) -> NetnsCluster:
        """Leave the run in place when the context manager exits (the CLI's `up`).

        Recorded in the state: until then the run lives only as long as its owner, so a
        `svcbench up` killed after the namespaces were made leaves nothing gc keeps.
        """
        self._kept = True
        self.state["kept"] = True
        self.save()
        return self

    def __enter__(self) -> NetnsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._kept:
            self.destroy()
        self._release_lock()

    def destroy(self) -> list[str]:
        """Stop agents, kill what runs in the run's namespaces, delete them and the state dir."""
        if self._destroyed:
            return []
        with interrupts_deferred():  # `down` stopped halfway by SIGTERM would leave half a run
            if os.path.isdir(self.run_dir):
                self.state["status"] = STATUS_DESTROYING
                self.state["owner"] = owner()
                self.save()
            removed = self._stop_agents()
            removed += _remove_run(self.run_id, self.run_dir)
            self._destroyed = True
            self._release_lock()  # a waiter now finds the run gone
        return removed

    def _stop_agents(self) -> list[str]:
        agents = [(n["name"], n["agent"]) for n in self.state["nodes"] if n.get("agent")]
        if not agents:
            return []

        def stop(item: tuple[str, dict]) -> str:
            name, info = item
            try:
                from clusters.workloads.echo import AgentClient

                AgentClient(info["control"]).stop()
            except Exception:
                pass  # a dead or wedged agent is killed below
            deadline = time.monotonic() + AGENT_STOP_GRACE_S
            while process_alive(info["pid"], info.get("start")) and time.monotonic() < deadline:
                time.sleep(0.01)
            if process_alive(info["pid"], info.get("start")):
                _kill_and_wait([info["pid"]])
                return f"run {self.run_id}: killed echo agent of {name} (pid {info['pid']})"
            return f"run {self.run_id}: stopped echo agent of {name} (pid {info['pid']})"

        with ThreadPoolExecutor(max_workers=len(agents)) as pool:
            return list(pool.map(stop, agents))

    # ------------------------------------------------------------------ pods

    def set_pods(self, pods: Sequence[Pod], program: Callable[[], T] | None = None) -> T | None:
        """Make the run's pod namespaces exactly `pods` around `program`, the sync that points
        every node's rules at them; returns what `program` returned.

        Kubernetes' order, so clients see no gap: new pods and their echo backends exist
        before `program` runs; pods that leave are first taken out of every node's rules by
        `program`, then every node's conntrack entries towards them are cleared (else a
        half-open entry keeps catching a reused client port), and only then do their
        namespaces go. Pods carry .ip and .node_name (ClusterState.build assigns them). A
        pod whose IP or node changed, or whose IP a new pod takes, goes before `program`:
        two namespaces cannot hold one name or one node one IP.
        """
        wanted: dict[str, Pod] = {}
        for pod in pods:
            key = f"{pod.namespace}/{pod.name}"
            if not pod.ip or not pod.node_name:
                raise ClusterError(f"Pod {key}: ip and node_name must be set (ClusterState.build assigns them)")
            self.node(pod.node_name)  # raises naming the nodes
            wanted[key] = pod
        kept = {key for key, rec in self.pods.items()
                if key in wanted and (wanted[key].ip, wanted[key].node_name) == (rec.ip, rec.node)}
        taken = {pod.ip for key, pod in wanted.items() if key not in kept}
        first = [rec for key, rec in self.pods.items() if key not in kept and (key in wanted or rec.ip in taken)]
        last = [rec for key, rec in self.pods.items() if key not in wanted and rec.ip not in taken]
        if first:
            self._remove_pods(first)
            self._clear_conntrack([rec.ip for rec in first])
        new = [p for key, p in wanted.items() if key not in self.pods]
        if new:
            self._add_pods(new)
        for key, pod in wanted.items():
            self.pods[key].ports = [(cp.port, cp.protocol) for cp in pod.backend_ports()]
        self.save()
        self._tell_agents()  # the leaving pods keep answering until no rule sends to them
        result = program() if program is not None else None
        if last:
            self._clear_conntrack([rec.ip for rec in last])
            self._remove_pods(last)
            self.save()
        return result

    def set_host_ports(self, ports: Sequence[tuple[int, str]]) -> None:
        """Echo listeners on every node's own address (a hostNetwork pod's), on these
        (port, protocol) pairs; empty removes them. Each answers as `node/<name>`, and goes
        with its node's echo agent when the run is destroyed."""
        self.state["host_ports"] = [[int(port), proto] for port, proto in ports]
        self.save()
        self._tell_agents()

    def _clear_conntrack(self, ips: list[str]) -> None:
        """Delete every node's conntrack entries towards `ips` (pods that are going away)."""
        from dataplanes.base import Host
        from dataplanes.conntrack import endpoint_flow_deletes, run_deletes

        if not Host().which("conntrack"):
            return  # nothing to clear with; the netfilter modes list it as missing
        commands = endpoint_flow_deletes(ips)
        for node in self.nodes:
            run_deletes(node, commands)

    def _tell_agents(self, exclude: set[str] = frozenset()) -> None:
        """Converge every node's echo agent to its pods (raises AgentError naming failures)."""
        if not self.state.get("agents"):
            return
        from clusters.workloads.echo import BackendSpec

        host_ports = [(port, proto) for port, proto in self.state.get("host_ports", [])]
        for node in self.nodes:
            specs = [
                BackendSpec(pod=rec.key, netns=rec.netns, ip=rec.ip, ports=list(rec.ports))
                for rec in self.pods.values()
                if rec.node == node.name and rec.key not in exclude
            ]
            if host_ports:
                specs.append(BackendSpec(pod=f"node/{node.name}", netns=node.netns, ip=node.ip,
                                         ports=host_ports))
            self.agent(node.name).set_backends(specs)

    def _remove_pods(self, gone: list[PodRecord]) -> None:
        # Agents hold sockets in pod namespaces: drop them before the namespaces go.
        self._tell_agents(exclude={rec.key for rec in gone})
        by_node: dict[str, list[PodRecord]] = {}
        for rec in gone:
            by_node.setdefault(rec.node, []).append(rec)
        for node_name, recs in by_node.items():
            node = self.node(node_name)
            # Deleting the node side removes the pair and the /32 route now, not when the
            # kernel gets round to freeing the namespace, so the IP can be reused at once.
            in_netns(node.netns, _unplug_pods, [r.veth for r in recs])
            for rec in recs:
                node.pod_veths.pop(rec.ip, None)
        for rec in gone:
            _kill_and_wait(pids_in_netns(rec.netns))
            netns_delete(rec.netns)
            del self.pods[rec.key]
            self.state["pods"].pop(rec.key, None)

    def _add_pods(self, new: list[Pod]) -> None:
        records = []
        for pod in new:
            key = f"{pod.namespace}/{pod.name}"
            veth = f"pv{self.state['next_veth']}"
            self.state["next_veth"] += 1
            netns = self.netns_name(self.run_id, f"{pod.namespace}.{pod.name}")
            if len(netns) > 255:
                raise ClusterError(f"Pod {key}: namespace and name are too long for a netns name")
            records.append(
                PodRecord(key, netns, pod.ip, pod.node_name, veth,
                          [(cp.port, cp.protocol) for cp in pod.backend_ports()])
            )
        for rec in records:
            self.state["pods"][rec.key] = _pod_state(rec)
        self.save()  # gc must know these names before they exist

        def make(rec: PodRecord) -> None:
            netns_add(rec.netns, _setup_pod, rec.ip, rec.veth, self.node(rec.node).netns)

        pool = ThreadPoolExecutor(max_workers=POD_WORKERS)
        try:
            with interrupts_deferred():  # a pod made after cleanup looked would stay
                made = [pool.submit(make, rec) for rec in records]
            for fut in made:
                fut.result()
        finally:
            # Interrupted: pods not yet begun are skipped, those under way finish for cleanup.
            pool.shutdown(wait=True, cancel_futures=True)
        by_node: dict[str, list[PodRecord]] = {}
        for rec in records:
            by_node.setdefault(rec.node, []).append(rec)
        for node_name, recs in by_node.items():
            node = self.node(node_name)
            in_netns(node.netns, _plug_pods, [(r.veth, r.ip) for r in recs])
            for rec in recs:
                node.pod_veths[rec.ip] = rec.veth
                self.pods[rec.key] = rec


def _pod_state(rec: PodRecord) -> dict:
    return {"netns": rec.netns, "ip": rec.ip, "node": rec.node, "veth": rec.veth, "ports": rec.ports}


# --------------------------------------------------------------------------- wiring
# Each runs on a thread inside the namespace it configures.


def _setup_underlay() -> None:
    _base_sysctls(forward=False)
    # The bridge is a plain switch: frames crossing it must not meet any iptables.
    for table in ("iptables", "ip6tables", "arptables"):
        key = f"net/bridge/bridge-nf-call-{table}"
        if os.path.exists(f"/proc/sys/{key}"):
            write_sysctl(key, 0)
    with IPRoute() as ipr:
        ipr.link("set", index=1, state="up")
        ipr.link("add", ifname=BRIDGE, kind="bridge", state="up")


def _plug_into_bridge(port: str, peer_netns: str) -> None:
    """A veth whose bridge end stays here and whose other end is born as eth0 in peer_netns."""
    with IPRoute() as ipr:
        bridge = _link_index(ipr, BRIDGE)
        ipr.link(
            "add",
            ifname=port,
            kind="veth",
            peer={"ifname": UPLINK, "net_ns_fd": peer_netns},
            master=bridge,
            state="up",
        )


def _setup_node_netns() -> None:
    _base_sysctls(forward=True)
    with IPRoute() as ipr:
        ipr.link("set", index=1, state="up")


def _setup_node_uplink(ip: str, others: list[tuple[str, str]]) -> None:
    with IPRoute() as ipr:
        idx = _link_index(ipr, UPLINK)
        _interface_sysctls(UPLINK, rp_filter=0)
        ipr.addr("add", index=idx, address=ip, prefixlen=int(PLAN.node_cidr.split("/")[1]))
        ipr.link("set", index=idx, state="up")
        for pod_cidr, gateway in others:
            ipr.route("add", dst=pod_cidr, gateway=gateway, oif=idx)
        # Node processes reach ClusterIPs, external IPs and load-balancer IPs; the data
        # plane's DNAT takes over.
        for cidr in (PLAN.service_cidr, PLAN.external_ip_cidr, PLAN.load_balancer_cidr):
            ipr.route("add", dst=cidr, oif=idx, scope=RT_SCOPE_LINK)


def _setup_external_netns() -> None:
    _base_sysctls(forward=False)
    with IPRoute() as ipr:
        ipr.link("set", index=1, state="up")


def _setup_external_uplink(node1_ip: str) -> None:
    with IPRoute() as ipr:
        idx = _link_index(ipr, UPLINK)
        _interface_sysctls(UPLINK, rp_filter=0)
        ipr.addr("add", index=idx, address=PLAN.external_client_ip,
                 prefixlen=int(PLAN.node_cidr.split("/")[1]))
        ipr.link("set", index=idx, state="up")
        # External IPs and load-balancer IPs reach the cluster through node1 (a load
        # balancer delivers to a node; no cloud stands in front).
        for cidr in (PLAN.external_ip_cidr, PLAN.load_balancer_cidr):
            ipr.route("add", dst=cidr, gateway=node1_ip, oif=idx)


def _setup_pod(ip: str, node_veth: str, node_netns: str) -> None:
    """Inside the new pod namespace: eth0 with its peer born in the node namespace."""
    _base_sysctls(forward=False)
    with IPRoute() as ipr:
        ipr.link("set", index=1, state="up")
        ipr.link("add", ifname=UPLINK, kind="veth",
                 peer={"ifname": node_veth, "net_ns_fd": node_netns}, state="up")
        idx = _link_index(ipr, UPLINK)
        ipr.addr("add", index=idx, address=ip, prefixlen=32)
        ipr.route("add", dst="0.0.0.0/0", gateway=PLAN.pod_gateway, oif=idx, flags=RTNH_F_ONLINK)


def _plug_pods(veths: list[tuple[str, str]]) -> None:
    with IPRoute() as ipr:
        for veth, ip in veths:
            idx = _link_index(ipr, veth)
            _interface_sysctls(veth, proxy_arp=1, rp_filter=0)
            ipr.addr("add", index=idx, address=PLAN.pod_gateway, prefixlen=32)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=f"{ip}/32", oif=idx, scope=RT_SCOPE_LINK)


def _unplug_pods(veths: list[str]) -> None:
    with IPRoute() as ipr:
        for veth in veths:
            try:
                ipr.link("del", index=_link_index(ipr, veth))
            except Exception as exc:  # already gone with its namespace
                if getattr(exc, "code", None) != errno.ENODEV:
                    raise


# --------------------------------------------------------------------------- gc


def list_runs(state_dir: str = STATE_DIR) -> dict[str, dict | None]:
    """run id -> its state (None when unreadable), for every run directory in state_dir."""
    try:
        entries = os.listdir(state_dir)
    except FileNotFoundError:
        return {}
    return {
        e: _read_state(os.path.join(state_dir, e))
        for e in sorted(entries)
        if RUN_ID_RE.match(e) and os.path.isdir(os.path.join(state_dir, e))
    }


def _remove_run(run_id: str, run_dir: str | None) -> list[str]:
    """Kill every process in the run's namespaces, delete them, remove the state dir."""
    removed = []
    names = list_netns(f"{NETNS_PREFIX}{run_id}-")
    for name in names:
        for pid in _kill_and_wait(pids_in_netns(name)):
            removed.append(f"run {run_id}: killed pid {pid} in {name}")
    for name in names:
        if netns_delete(name):
            removed.append(f"run {run_id}: deleted netns {name}")
    if run_dir and os.path.isdir(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(f"run {run_id}: removed {run_dir}")
    return removed


def gc(
    all_runs: bool = False,
    *,
    state_dir: str = STATE_DIR,
    run_ids: Iterable[str] | None = None,
) -> list[str]:
    """Remove what dead runs left (every run with all_runs); returns one line per thing removed.

    Dead: "creating"/"destroying" with the owner gone, or "ready" with an agent gone.
    `svb-<run>-*` namespaces of a run with no state directory are orphans and go too (with
    all_runs, every `svb-*` namespace does). `run_ids`
    limits the sweep to those runs (tests use it to leave concurrent runs alone).
    """
    only = set(run_ids) if run_ids is not None else None
    removed: list[str] = []
    runs = list_runs(state_dir)
    for run_id, state in runs.items():
        if only is not None and run_id not in only:
            continue
        live, why = run_liveness(state)
        if live and not all_runs:
            continue
        run_dir = os.path.join(state_dir, run_id)
        with _lock_if_free(run_dir) as free:
            if not free and not all_runs:
                continue  # a command is changing the run: it is not dead while it does
            removed.append(f"run {run_id}: {why}" if not live else f"run {run_id}: removing live run")
            for node in (state or {}).get("nodes", []):
                agent = node.get("agent") or {}
                if process_alive(agent.get("pid"), agent.get("start")):
                    _kill_and_wait([agent["pid"]])
                    removed.append(f"run {run_id}: killed echo agent of {node['name']} (pid {agent['pid']})")
            removed += _remove_run(run_id, run_dir)
    # A half-made state directory (create() was killed before its rename).
    try:
        leftovers = [e for e in os.listdir(state_dir) if e.startswith(".") and e.endswith(".creating")]
    except FileNotFoundError:
        leftovers = []
    for entry in leftovers:
        run_id = entry[1:].split(".", 1)[0]
        if (only is not None and run_id not in only) or run_liveness(
            _read_state(os.path.join(state_dir, entry))
        )[0]:
            continue
        shutil.rmtree(os.path.join(state_dir, entry), ignore_errors=True)
        removed.append(f"run {run_id}: removed unfinished {os.path.join(state_dir, entry)}")
    for name in list_netns():
        run_id = _run_of_netns(name)
        if run_id in runs or (only is not None and run_id not in only):
            continue
        # Names not shaped like a run's (a test's scratch namespace) belong to someone alive.
        if not all_runs and not (run_id and RUN_ID_RE.match(run_id)):
            continue
        # create() writes the state before any namespace: look again to close the race.
        if run_id and os.path.exists(os.path.join(state_dir, run_id)):
            continue
        pids = pids_in_netns(name)
        names = {pid: _process_name(pid) for pid in pids}
        for pid in _kill_and_wait(pids):
            removed.append(f"orphan {name}: killed pid {pid} ({names[pid]})")
        if netns_delete(name):
            removed.append(f"orphan {name}: deleted netns (no state for run {run_id})")
    return removed
