"""The one seam every data plane plugs into, and the node it sees.

A data plane sees a node only through `NodeHandle`; each cluster provider (network
namespaces on this host, the same inside a UML guest, kind) implements it.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kube.state import NodeView


class DataplaneError(RuntimeError):
    """The kernel refused what a data plane asked for (the message says what and why)."""


class FullSyncNeeded(Exception):  # noqa: N818 - a request, not an error
    """Raised by a mode's `update(node, changes)` that cannot apply changes alone (it has no
    memory of the node, or someone else changed its state): the caller does a full sync."""


@runtime_checkable
class NodeHandle(Protocol):
    name: str  # Kubernetes node name, "node1"
    netns: str  # the network namespace holding the node's host network
    ip: str  # the node's address on the underlay
    pod_cidr: str
    uplink: str  # interface towards the other nodes, "eth0"

    def pod_interfaces(self) -> dict[str, str]:
        """Pod IP -> the node-side interface of that pod's veth."""
        ...

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = 120,
    ) -> subprocess.CompletedProcess:
        """Run a command in the node's network namespace, capturing text output."""
        ...

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a Python callable on a thread that has entered the node's network namespace."""
        ...


@dataclass
class SyncStats:
    mode: str
    node: str
    seconds: float
    full: bool
    services: int  # service ports in the view
    rules: int = 0  # rules, chains, map elements or table entries written
    payload_bytes: int = 0
    changed: int = 0  # objects (chains, elements, virtual servers) rewritten this sync
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Host:
    """What the kernel and userland this code runs on offer."""

    kernel: str = field(default_factory=lambda: os.uname().release)

    def which(self, cmd: str) -> str | None:
        return shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")

    def kernel_config(self, option: str) -> str | None:
        """'y', 'm' or None, read from /proc/config.gz or /boot/config-*."""
        import gzip

        for path in ("/proc/config.gz", f"/boot/config-{self.kernel}"):
            try:
                opener = gzip.open if path.endswith(".gz") else open
                with opener(path, "rt") as fh:
                    for line in fh:
                        if line.startswith(option + "="):
                            return line.strip().split("=", 1)[1]
                return None
            except OSError:
                continue
        return None

    def has_proc(self, path: str) -> bool:
        return os.path.exists(path)


class Dataplane(Protocol):
    name: str
    # How a new connection without ClientIP affinity picks its endpoint: "random" (iptables,
    # nftables, ebpf), "rr" (userspace's default) or the IPVS scheduler ("rr", "lc", "sh",
    # ...); the balancing checks (conformance/checks/test_balancing.py) assert it.
    balancing: str
    # Optional: conformance check name -> why this mode cannot meet it by design.
    # deviations: dict[str, str]

    def missing(self, host: Host) -> list[str]:
        """Unmet prerequisites on this host, each one sentence; empty means usable."""
        ...

    def install(self, node: NodeHandle) -> None:
        """One-time hooks on a node (jump rules, tables, programs, processes)."""
        ...

    def sync(self, node: NodeHandle, view: NodeView) -> SyncStats:
        """Converge the node to the view. Idempotent; repairs state removed by others."""
        ...

    def uninstall(self, node: NodeHandle) -> None:
        """Leave the node as it was before install()."""
        ...

    # Optional: apply one node's changes (kube.tracker.NodeChanges: the views updated and
    # removed since the last sync or update) in work that grows with the changes, not with
    # the node's Services. Raise FullSyncNeeded when it cannot (no memory of the node, or
    # its state was changed by others); dataplanes/proxy.py then syncs the whole view.
    # def update(self, node: NodeHandle, changes: NodeChanges) -> SyncStats: ...

    # Optional: the node's programmed state as read back from the kernel (or the mode's
    # process), JSON-able and normalised (no handles, counters, ids or order that a full
    # sync would choose differently), so that two states that forward alike compare equal.
    # tests/incremental.py compares it after updates with a full sync's.
    # def kernel_state(self, node: NodeHandle) -> dict[str, Any]: ...

    # Optional: for `svcbench status`, what the mode has on the node, cheaply counted (no
    # full dump where a count will do): its options, the programs / rules / sets / processes
    # present with their counts, and the health of its processes; JSON-able.
    # def summary(self, node: NodeHandle) -> dict[str, Any]: ...

    # Optional: for `svcbench monitor --type drop`, the drops the mode makes where the
    # kernel's kfree_skb tracepoint cannot see them (XDP_DROP, a proxy's refusals): an object
    # with `take() -> list[dict]` (rows as bpf/dropmon.py's Drop without netns, reason
    # prefixed "XDP:" / "PROXY:", the events since the last take) and `close()`; None when
    # the mode is not running on the node.
    # def drop_reporter(self, node: NodeHandle) -> Any: ...

    # Optional, on the class: what killed runs of this mode left outside their network
    # namespaces (BPF hooks, cgroups), one line per thing removed. For `netns_names` that
    # still exist (a run being torn down), their state too.
    # @staticmethod
    # def gc(netns_names: list[str] | None = None) -> list[str]: ...


def ipset_networks(cidrs: Iterable[str]) -> list[str]:
    """Networks as ipset's hash:*,net types take them, each once: a /32 bare (as `ipset
    save` prints it, so what a sync reads back compares equal) and 0.0.0.0/0, which those
    types refuse, as its two halves."""
    out: dict[str, None] = {}
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr)
        halves = list(net.subnets()) if net.prefixlen == 0 else [net]
        for part in halves:
            out[str(part.network_address) if part.prefixlen == 32 else str(part)] = None
    return list(out)
