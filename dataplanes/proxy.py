"""kube-proxy's daemon for a whole cluster: one mode on every node, fed by changes.

A `ServiceProxy` owns the nodes (anything implementing `NodeHandle`), the mode and the
desired state (a `kube.tracker.ChangeTracker`). It installs the mode on every node,
applies changes (objects created, changed or deleted), syncs only the nodes whose views
changed, resyncs on demand (to repair state removed by others), restarts, and tears down.
The CLI, the conformance harness and the benchmarks program clusters through it.

A mode may offer `update(node, changes) -> SyncStats` beside `sync`: then a change reaches
it as the node's `NodeChanges` (the views updated and removed), and it writes only what
changed; the node's whole view is not even made (at 100,000 Service ports sorting it
costs more than the change). A mode without `update` gets `sync(node, view)`, and so does
one whose `update` raises FullSyncNeeded (it has no memory of the node, or someone else
changed its state). The first sync of a node after install, `resync()` and `restart()` are
full syncs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dataplanes.base import Dataplane, FullSyncNeeded, NodeHandle, SyncStats
from kube.model import EndpointSlice, Pod, Service
from kube.tracker import ChangeTracker, NodeChanges


class ServiceProxy:
    """One mode on every node of a cluster (see the module's docstring)."""

    def __init__(self, dataplane: Dataplane, nodes: Sequence[NodeHandle],
                 tracker: ChangeTracker) -> None:
        known = {n.name for n in tracker.nodes}
        strangers = [n.name for n in nodes if n.name not in known]
        if strangers:
            raise ValueError(f"nodes {', '.join(strangers)} are not in the desired state's "
                             f"nodes ({', '.join(sorted(known))})")
        self.dataplane = dataplane
        self.nodes = list(nodes)
        self.tracker = tracker
        self.installed: list[NodeHandle] = []
        self._fresh: set[str] = set()  # installed, not synced yet: the next sync is full

    # ------------------------------------------------------------------ lifecycle

    def install(self) -> None:
        """Install the mode on every node; on a failure, uninstall what was installed."""
        try:
            for node in self.nodes:
                if node in self.installed:
                    continue
                self.dataplane.install(node)
                self.installed.append(node)
                self._fresh.add(node.name)
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        """Uninstall from every installed node; every node is tried, failures are raised
        together afterwards."""
        errors = []
        while self.installed:
            node = self.installed.pop()
            self._fresh.discard(node.name)
            try:
                self.dataplane.uninstall(node)
            except Exception as exc:  # the other nodes still go
                errors.append(f"{node.name}: {exc}")
        if errors:
            raise RuntimeError(f"{self.dataplane.name} uninstall failed: " + "; ".join(errors))

    def adopt(self) -> None:
        """Take every node as installed by an earlier process (a CLI command on a running
        cluster): nothing is installed, and each node's next sync is a full one."""
        self.installed = list(self.nodes)
        self._fresh = {n.name for n in self.nodes}

    def __enter__(self) -> ServiceProxy:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def restart(self) -> list[SyncStats]:
        """A proxy restart on every node: uninstall, install, full sync."""
        self.uninstall()
        self.install()
        return self.resync()

    # ------------------------------------------------------------------ desired state

    def apply(self, *, pods: Iterable[Pod] = (), services: Iterable[Service] = (),
              slices: Iterable[EndpointSlice] = (), delete_pods: Iterable[Any] = (),
              delete_services: Iterable[Any] = (), delete_slices: Iterable[Any] = (),
              side_by_side: bool = False) -> list[SyncStats]:
        """Change the desired state; sync the nodes whose views changed (and nodes never
        synced since install). StateError, with nothing changed, for a change refused.

        `side_by_side`: sync the nodes on threads at once, for a mode whose state is all
        inside each node's namespace (each node's iptables-restore or nft then runs on its
        own core); timings of one node's sync are cleaner one node at a time."""
        changes = self.tracker.apply(pods=pods, services=services, slices=slices,
                                     delete_pods=delete_pods, delete_services=delete_services,
                                     delete_slices=delete_slices)
        due = [node for node in self.installed if changes[node.name] or node.name in self._fresh]
        return self._each(due, lambda node: self._sync(node, changes[node.name]), side_by_side)

    def _each(self, nodes: list[NodeHandle], fn, side_by_side: bool) -> list[SyncStats]:
        if not side_by_side or len(nodes) < 2:
            return [fn(node) for node in nodes]
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            return list(pool.map(fn, nodes))

    def replace(self, *, services: Iterable[Service] = (), slices: Iterable[EndpointSlice] = (),
                pods: Iterable[Pod] | None = None, side_by_side: bool = False
                ) -> list[SyncStats]:
        """Make these the only Services and EndpointSlices (and pods, when given)."""
        services, slices = list(services), list(slices)
        keep_svcs = {s.key for s in services}
        keep_slices = {s.key for s in slices}
        gone_slices = [sl.key for sl in self.tracker.given_slices() if sl.key not in keep_slices]
        kwargs: dict[str, Any] = {
            "services": services, "slices": slices, "side_by_side": side_by_side,
            "delete_services": [k for k in self.tracker.services if k not in keep_svcs],
            "delete_slices": gone_slices,
        }
        if pods is not None:
            pods = list(pods)
            keep_pods = {p.key for p in pods}
            kwargs["pods"] = pods
            kwargs["delete_pods"] = [k for k in self.tracker.pods if k not in keep_pods]
        return self.apply(**kwargs)

    def resync(self, side_by_side: bool = False) -> list[SyncStats]:
        """A full sync of every installed node (repairs what others removed)."""
        return self._each(list(self.installed), lambda node: self._sync(node, None),
                          side_by_side)

    # ------------------------------------------------------------------ syncing

    def _sync(self, node: NodeHandle, change: NodeChanges | None) -> SyncStats:
        update = getattr(self.dataplane, "update", None)
        stats = None
        if change is not None and update is not None and node.name not in self._fresh:
            try:
                stats = update(node, change)
            except FullSyncNeeded:
                stats = None  # the mode lost track of the node: converge it whole
        if stats is None:
            stats = self.dataplane.sync(node, self.tracker.node_view(node.name))
        self._fresh.discard(node.name)
        return stats
