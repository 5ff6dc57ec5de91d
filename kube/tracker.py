"""kube-proxy's change trackers for svcbench: objects in, changed Service ports out.

`ClusterState.build` derives everything from every object: right for a manifest applied
once, O(N) for each change. A `ChangeTracker` holds the same state in indexes (Services,
EndpointSlices, pods by label, allocations) and every node's views by Service port;
`apply` takes the objects that changed or went and returns, per node, the views that
changed (`NodeChanges`), recomputing only the Services those objects touch: the Service
itself, the EndpointSlices naming it, the Services whose selectors match a changed pod.
A change that `build` would refuse raises StateError and leaves the tracker as it was.

The semantics stay in `kube/state.py`: the tracker uses its Allocator, its endpoint
controller and its `service_port_views`, so `tracker.node_view(n)` equals
`tracker.state().node_view(n)` after every change (tests/test_tracker.py checks this on
random sequences).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from kube.model import (
    PLAN,
    TYPE_EXTERNAL_NAME,
    AddressPlan,
    EndpointSlice,
    Node,
    NodeLabels,
    Pod,
    Service,
)
from kube.state import (
    Allocator,
    ClusterState,
    NodeView,
    ServicePortView,
    StateError,
    _labelled,
    make_node_view,
    proxied,
    service_port_views,
)

ServiceKey = tuple[str, str]  # namespace, name
ViewKey = tuple[str, str, str, str, int]  # namespace, service, port name, protocol, port
PODS_PER_NODE = 253


def view_key(view: ServicePortView) -> ViewKey:
    return (view.namespace, view.service, view.port_name, view.protocol, view.port)


@dataclass
class NodeChanges:
    """What one `apply` changed in one node's view."""

    node: str
    updated: dict[ViewKey, ServicePortView] = field(default_factory=dict)  # new or changed
    removed: dict[ViewKey, ServicePortView] = field(default_factory=dict)  # gone: the old view

    def __bool__(self) -> bool:
        return bool(self.updated or self.removed)

    @property
    def count(self) -> int:
        return len(self.updated) + len(self.removed)


class ChangeTracker:
    """One cluster's desired state, kept by change (see the module's docstring)."""

    def __init__(self, nodes: Iterable[Node], *, plan: AddressPlan = PLAN,
                 node_labels: Iterable[NodeLabels] = (), proxy_name: str | None = None,
                 previous: ClusterState | None = None) -> None:
        """`previous`: what an earlier process allocated (pods' nodes and IPs, Services'
        ClusterIPs and NodePorts), kept for those objects when they are first applied here,
        as `ClusterState.build(previous=)` keeps them."""
        self.plan = plan
        self._prev_pods = {p.key: p for p in previous.pods} if previous else {}
        self._prev_services = {s.key: s for s in previous.services} if previous else {}
        self.proxy_name = proxy_name
        self.nodes = _labelled(tuple(nodes), tuple(node_labels), plan)
        self._node = {n.name: n for n in self.nodes}
        self._zones = {n.name: n.zone for n in self.nodes}
        self.allocator = Allocator(plan)
        self.services: dict[ServiceKey, Service] = {}
        self.pods: dict[tuple[str, str], Pod] = {}
        self.given: dict[ServiceKey, dict[str, EndpointSlice]] = {}  # slices applied
        self._slice_owner: dict[tuple[str, str], ServiceKey] = {}
        self.derived: dict[ServiceKey, list[EndpointSlice]] = {}  # the endpoint controller's
        self._pods_by_label: dict[tuple[str, str, str], dict[tuple[str, str], Pod]] = {}
        self._selecting: dict[tuple[str, str, str], set[ServiceKey]] = {}  # selector pair
        self._pod_ips: dict[str, set[str]] = {n.name: set() for n in self.nodes}
        self._pod_counts: dict[str, int] = {n.name: 0 for n in self.nodes}
        self.views: dict[str, dict[ViewKey, ServicePortView]] = {n.name: {} for n in self.nodes}
        self._by_service: dict[ServiceKey, set[ViewKey]] = {}
        self._node_views: dict[str, NodeView] = {}  # cached until a change touches the node

    # ------------------------------------------------------------------ reading

    def node_view(self, node_name: str) -> NodeView:
        """The node's whole view (sorted as `ClusterState.node_view` sorts it)."""
        view = self._node_views.get(node_name)
        if view is None:
            node = self._node[node_name]
            view = make_node_view(node, list(self.views[node_name].values()), self.plan)
            self._node_views[node_name] = view
        return view

    def given_slices(self) -> list[EndpointSlice]:
        """The EndpointSlices applied (not the endpoint controller's)."""
        return [sl for per in self.given.values() for sl in per.values()]

    def state(self) -> ClusterState:
        """The same state as a ClusterState (O(N): for tools, not for every change)."""
        slices = self.given_slices()
        slices += [sl for key, per in self.derived.items() if key not in self.given for sl in per]
        return ClusterState(self.nodes, tuple(self.pods.values()), tuple(self.services.values()),
                            tuple(slices), self.plan)

    # ------------------------------------------------------------------ changing

    def apply(self, *, pods: Iterable[Pod] = (), services: Iterable[Service] = (),
              slices: Iterable[EndpointSlice] = (), delete_pods: Iterable[tuple[str, str]] = (),
              delete_services: Iterable[ServiceKey] = (),
              delete_slices: Iterable[tuple[str, str]] = ()) -> dict[str, NodeChanges]:
        """Objects created or changed, and keys (namespace, name) of objects deleted; the
        changed views per node (every node has an entry, empty when nothing changed)."""
        undo: list = []
        touched: set[ServiceKey] = set()  # Services whose views must be recomputed
        selectors: set[ServiceKey] = set()  # selector Services whose endpoints must be too
        try:
            for key in delete_pods:
                self._delete_pod(tuple(key), undo, selectors)
            self._upsert_pods(list(pods), undo, selectors)
            for key in delete_services:
                self._delete_service(tuple(key), undo, touched, selectors)
            self._upsert_services(list(services), undo, touched, selectors)
            for key in delete_slices:
                self._delete_slice(tuple(key), undo, touched)
            for sl in slices:
                self._upsert_slice(sl, undo, touched)
            # A selector Service's own slices replace the controller's, and back when they go.
            selectors |= {key for key in touched if key in self.services}
            derived_before = {k: self.derived.get(k) for k in selectors}
            undo.append(lambda: self._restore_derived(derived_before))
            for key in selectors:
                self._derive(key)
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        return self._recompute(touched | selectors)

    # ------------------------------------------------------------------ pods

    def _delete_pod(self, key, undo, selectors) -> None:
        old = self.pods.get(key)
        if old is None:
            return
        self._forget_pod(old)
        selectors |= self._selectors_of(old)
        undo.append(lambda: self._remember_pod(old))

    def _upsert_pods(self, pods: list[Pod], undo, selectors) -> None:
        """As ClusterState._place_pods, for the pods of one change: each keeps its earlier
        node and IP; addresses kept or given are held before any is handed out; pods
        without a node go where the fewest pods are (counting this change's), in order."""
        pending = []
        for pod in pods:
            old = self.pods.get(pod.key)
            if old is not None:
                self._forget_pod(old)
                undo.append(lambda old=old: self._remember_pod(old))
                selectors |= self._selectors_of(old)
            where = f"Pod {pod.namespace}/{pod.name}"
            if pod.node_name is not None and pod.node_name not in self._node:
                raise StateError(f"{where}: spec.nodeName {pod.node_name!r} is not a node of "
                                 f"this cluster (the address plan fits at most "
                                 f"{self.plan.max_nodes})")
            held = old or self._prev_pods.get(pod.key)
            if (held is not None and held.ip and held.node_name in self._node
                    and pod.node_name in (None, held.node_name)):
                pod = replace(pod, node_name=held.node_name, ip=held.ip)
            elif pod.ip is not None and pod.node_name is None:
                pod = replace(pod, ip=None)
            if pod.ip is not None:
                if pod.ip in self._pod_ips[pod.node_name]:
                    raise StateError(f"{where}: status.podIP {pod.ip} is already used by "
                                     f"another pod on {pod.node_name}")
                self._remember_pod(pod)  # held now, so no other pod of the change gets it
                undo.append(lambda pod=pod: self._forget_pod(pod))
            elif pod.node_name is not None:
                self._pod_counts[pod.node_name] += 1  # counted for the scheduler below
                undo.append(lambda node=pod.node_name: self._count(node, -1))
            pending.append(pod)
        for pod in pending:
            if pod.ip is None:
                if pod.node_name is None:
                    if not self.nodes:
                        raise StateError("the cluster has no nodes to place pods on")
                    target = min(self.nodes, key=lambda n: (self._pod_counts[n.name], n.index))
                    pod = replace(pod, node_name=target.name)
                else:
                    self._count(pod.node_name, -1)  # _remember_pod counts it again
                    undo.append(lambda node=pod.node_name: self._count(node, 1))
                pod = replace(pod, ip=self._free_pod_ip(pod.node_name))
                self._remember_pod(pod)
                undo.append(lambda pod=pod: self._forget_pod(pod))
            selectors |= self._selectors_of(pod)

    def _count(self, node: str, delta: int) -> None:
        self._pod_counts[node] += delta

    def _free_pod_ip(self, node_name: str) -> str:
        node = self._node[node_name]
        used = self._pod_ips[node_name]
        for i in range(PODS_PER_NODE):
            ip = self.plan.pod_ip(node.index, i)
            if ip not in used:
                return ip
        raise StateError(f"node {node.name} is full: at most {PODS_PER_NODE} pods per node")

    def _remember_pod(self, pod: Pod) -> None:
        self.pods[pod.key] = pod
        self._pod_ips[pod.node_name].add(pod.ip)
        self._pod_counts[pod.node_name] += 1
        for k, v in pod.labels.items():
            self._pods_by_label.setdefault((pod.namespace, k, v), {})[pod.key] = pod

    def _forget_pod(self, pod: Pod) -> None:
        del self.pods[pod.key]
        self._pod_ips[pod.node_name].discard(pod.ip)
        self._pod_counts[pod.node_name] -= 1
        for k, v in pod.labels.items():
            group = self._pods_by_label.get((pod.namespace, k, v), {})
            group.pop(pod.key, None)
            if not group:
                self._pods_by_label.pop((pod.namespace, k, v), None)

    def _selectors_of(self, pod: Pod) -> set[ServiceKey]:
        """Services whose selector matches `pod`."""
        found: set[ServiceKey] = set()
        for k, v in pod.labels.items():
            for key in self._selecting.get((pod.namespace, k, v), ()):
                svc = self.services[key]
                if all(pod.labels.get(sk) == sv for sk, sv in svc.selector.items()):
                    found.add(key)
        return found

    # ------------------------------------------------------------------ Services

    def _delete_service(self, key, undo, touched, selectors) -> None:
        old = self.services.get(key)
        if old is None:
            return
        self._drop_service(old)
        self.allocator.release(old)
        undo.append(lambda: self._restore_service(old))
        touched.add(key)
        selectors.add(key)  # its derived slices go

    def _upsert_services(self, services: list[Service], undo, touched, selectors) -> None:
        """As ClusterState.build allocates: every changed Service lets go of its values and
        holds again what its earlier version had; then explicit values are taken; then the
        rest are allocated, in order."""
        olds = []
        for svc in services:
            old = self.services.get(svc.key)
            if old is not None:
                self._drop_service(old)
                self.allocator.release(old)
                undo.append(lambda old=old: self._restore_service(old))
            olds.append(old)
        undo.append(lambda: [self.allocator.release(svc) for svc in services])
        kept = [self.allocator.keep(svc, old or self._prev_services.get(svc.key))
                for svc, old in zip(services, olds, strict=True)]
        for svc in kept:
            self.allocator.take_explicit(svc)
        for svc, old in zip(kept, olds, strict=True):
            new = self.allocator.allocate(svc)
            self._keep_service(new)
            undo.append(lambda new=new: self._drop_service(new))
            touched.add(new.key)
            if new.selector is not None or (old is not None and old.selector is not None):
                selectors.add(new.key)

    def _keep_service(self, svc: Service) -> None:
        self.services[svc.key] = svc
        for k, v in (svc.selector or {}).items():
            self._selecting.setdefault((svc.namespace, k, v), set()).add(svc.key)

    def _drop_service(self, svc: Service) -> None:
        del self.services[svc.key]
        for k, v in (svc.selector or {}).items():
            group = self._selecting.get((svc.namespace, k, v), set())
            group.discard(svc.key)
            if not group:
                self._selecting.pop((svc.namespace, k, v), None)

    def _restore_service(self, old: Service) -> None:
        """Undo: `old` back, with exactly the values it held."""
        if old.key in self.services:
            current = self.services[old.key]
            self._drop_service(current)
        self.allocator.release(old)
        self.allocator.take_explicit(old)
        self._keep_service(old)

    # ------------------------------------------------------------------ EndpointSlices

    def _delete_slice(self, key, undo, touched) -> None:
        svc_key = self._slice_owner.pop(key, None)
        if svc_key is None:
            return
        per = self.given[svc_key]
        old = per.pop(key[1])
        if not per:
            del self.given[svc_key]

        def back() -> None:
            self.given.setdefault(svc_key, {})[key[1]] = old
            self._slice_owner[key] = svc_key

        undo.append(back)
        touched.add(svc_key)

    def _upsert_slice(self, sl: EndpointSlice, undo, touched) -> None:
        svc_key = (sl.namespace, sl.service_name)
        if self._slice_owner.get(sl.key, svc_key) != svc_key:
            self._delete_slice(sl.key, undo, touched)  # it moved to another Service
        per = self.given.setdefault(svc_key, {})
        old = per.get(sl.name)
        per[sl.name] = sl
        self._slice_owner[sl.key] = svc_key

        def back() -> None:
            if old is None:
                per.pop(sl.name, None)
                self._slice_owner.pop(sl.key, None)
                if not per:
                    self.given.pop(svc_key, None)
            else:
                per[sl.name] = old

        undo.append(back)
        touched.add(svc_key)

    # ------------------------------------------------------------------ endpoints

    def _derive(self, key: ServiceKey) -> None:
        """The endpoint controller's slices for selector Service `key` (as build does)."""
        svc = self.services.get(key)
        if svc is None or svc.selector is None or svc.type == TYPE_EXTERNAL_NAME or (
            key in self.given
        ):
            self.derived.pop(key, None)
            return
        candidates = min((list(self._pods_by_label.get((svc.namespace, k, v), {}).values())
                          for k, v in svc.selector.items()), key=len, default=[])
        self.derived[key] = ClusterState._endpoint_slices_for(svc, candidates, self._zones)

    def _restore_derived(self, before: dict[ServiceKey, list[EndpointSlice] | None]) -> None:
        for key, slices in before.items():
            if slices is None:
                self.derived.pop(key, None)
            else:
                self.derived[key] = slices

    def _slices(self, key: ServiceKey) -> list[EndpointSlice]:
        if key in self.given:
            return list(self.given[key].values())
        return self.derived.get(key, [])

    # ------------------------------------------------------------------ views

    def _recompute(self, keys: set[ServiceKey]) -> dict[str, NodeChanges]:
        changes = {n.name: NodeChanges(n.name) for n in self.nodes}
        for key in keys:
            svc = self.services.get(key)
            serve = svc is not None and proxied(svc, self.proxy_name)
            slices = self._slices(key) if serve else []
            old_keys = self._by_service.pop(key, set())
            new_keys: set[ViewKey] = set()
            for node in self.nodes:
                held = self.views[node.name]
                fresh = {view_key(v): v for v in service_port_views(svc, slices, node)} if (
                    serve) else {}
                change = changes[node.name]
                for vk in old_keys - fresh.keys():
                    change.removed[vk] = held.pop(vk)
                for vk, view in fresh.items():
                    if held.get(vk) != view:
                        change.updated[vk] = view
                    held[vk] = view
                new_keys |= fresh.keys()
            if new_keys:
                self._by_service[key] = new_keys
        for name, change in changes.items():
            if change:
                self._node_views.pop(name, None)
        return changes
