"""The change tracker against the whole-state build: after every change of a random
sequence, each node's view equals the one `ClusterState.build` makes from all objects
(with the earlier build as `previous`, so allocations must agree too), the changes it
reports are exactly the views that differ, and a refused change leaves it as it was."""

from __future__ import annotations

import random

import pytest

from kube.model import (
    HEADLESS,
    POLICY_LOCAL,
    PREFER_CLOSE,
    PROXY_NAME_LABEL,
    TCP,
    UDP,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState, StateError
from kube.tracker import ChangeTracker, view_key

NODES = [Node.numbered(k) for k in (1, 2, 3)]
NS = "ns1"


def _pod(rng: random.Random, name: str) -> Pod:
    return Pod(NS, name, {"app": rng.choice("abc"), "tier": rng.choice("xy")},
               node_name=rng.choice([None, None, "node1", "node2", "node3"]),
               ports=(ContainerPort(8080, TCP, "http"), ContainerPort(8080, UDP, "dns"),
                      ContainerPort(rng.choice([9090, 9091]), TCP, "alt")),
               ready=rng.random() > 0.2, terminating=rng.random() < 0.15)


def _service(rng: random.Random, name: str) -> Service:
    kind = rng.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName"])
    ports = [ServicePort(80, TCP, "http", "http")]
    if rng.random() < 0.5:
        ports.append(ServicePort(53, UDP, "dns", "dns"))
    if rng.random() < 0.3:
        ports.append(ServicePort(81, TCP, "alt", "alt"))
    fields: dict = {"type": kind}
    selector = rng.choice([{"app": "a"}, {"app": "b", "tier": "x"}, {"tier": "y"}, None])
    fields["selector"] = selector
    if kind == "ExternalName":
        fields["external_name"] = "example.org"
    if kind == "LoadBalancer":
        fields["load_balancer_ips"] = (f"198.18.32.{rng.randint(1, 50)}",)
    if rng.random() < 0.3:
        fields["internal_traffic_policy"] = POLICY_LOCAL
    if kind in ("NodePort", "LoadBalancer") and rng.random() < 0.4:
        fields["external_traffic_policy"] = POLICY_LOCAL
    if rng.random() < 0.2:
        fields["session_affinity"] = "ClientIP"
        fields["affinity_timeout_s"] = 30
    if rng.random() < 0.2:
        fields["traffic_distribution"] = PREFER_CLOSE
    if rng.random() < 0.1:
        fields["labels"] = {PROXY_NAME_LABEL: "other"}
    if kind == "ClusterIP" and rng.random() < 0.1:
        fields["cluster_ip"] = HEADLESS
    elif kind != "ExternalName" and rng.random() < 0.1:
        fields["cluster_ip"] = f"198.19.0.{rng.randint(1, 30)}"  # may collide: refused
    if rng.random() < 0.1 and kind == "NodePort":
        ports[0] = ServicePort(80, TCP, "http", "http", node_port=30000 + rng.randint(0, 20))
    return Service(NS, name, tuple(ports), **fields)


def _slice(rng: random.Random, service: str, index: int, pods: dict) -> EndpointSlice:
    placed = [p for p in pods.values() if p.ip]
    chosen = rng.sample(placed, k=min(len(placed), rng.randint(0, 4)))
    eps = tuple(Endpoint((p.ip,), ready=rng.random() > 0.2, serving=rng.random() > 0.1,
                         terminating=rng.random() < 0.2, node_name=p.node_name,
                         pod_name=p.name) for p in chosen)
    ports = (EndpointPort(8080, TCP, "http"), EndpointPort(5353, UDP, "dns"))
    return EndpointSlice(NS, f"{service}-{index}", service, eps, ports)


class Oracle:
    """The desired objects as a user applied them, built whole each time."""

    def __init__(self) -> None:
        self.pods: dict = {}
        self.services: dict = {}
        self.slices: dict = {}
        self.built = ClusterState.build(NODES)

    def build(self, pods, services, slices) -> ClusterState:
        return ClusterState.build(NODES, list(pods.values()), list(services.values()),
                                  list(slices.values()), previous=self.built)


def _views(state: ClusterState) -> dict[str, dict]:
    return {n.name: {view_key(v): v for v in state.node_view(n.name).services} for n in NODES}


def _step(rng: random.Random, oracle: Oracle, tracker: ChangeTracker, counter: list[int]):
    """One random change: (kwargs for tracker.apply, the oracle's new object dicts)."""
    pods, services, slices = dict(oracle.pods), dict(oracle.services), dict(oracle.slices)
    kwargs: dict = {}
    for _ in range(rng.randint(1, 3)):
        what = rng.random()
        counter[0] += 1
        n = counter[0]
        if what < 0.25:
            name = rng.choice([*(k[1] for k in pods), f"p{n}"]) if pods else f"p{n}"
            pod = _pod(rng, name)
            if (NS, name) in pods and rng.random() < 0.5:
                pod = Pod(NS, name, pod.labels, None, pod.ports, pod.ready, pod.terminating)
            pods[(NS, name)] = pod
            kwargs.setdefault("pods", []).append(pod)
        elif what < 0.35 and pods:
            key = rng.choice(list(pods))
            del pods[key]
            kwargs.setdefault("delete_pods", []).append(key)
        elif what < 0.65:
            name = rng.choice([*(k[1] for k in services), f"s{n}"]) if services else f"s{n}"
            svc = _service(rng, name)
            services[(NS, name)] = svc
            kwargs.setdefault("services", []).append(svc)
        elif what < 0.75 and services:
            key = rng.choice(list(services))
            del services[key]
            kwargs.setdefault("delete_services", []).append(key)
        elif what < 0.92:
            owner = rng.choice([*(k[1] for k in services), "not-yet"])
            sl = _slice(rng, owner, rng.randint(1, 2), tracker.pods)
            slices[sl.key] = sl
            kwargs.setdefault("slices", []).append(sl)
        elif slices:
            key = rng.choice(list(slices))
            del slices[key]
            kwargs.setdefault("delete_slices", []).append(key)
    # One change says what ends up: an object created and deleted in it is only deleted, one
    # deleted and created again is only created (the tracker deletes first, then creates).
    for field_name, gone, final in (("pods", "delete_pods", pods),
                                    ("services", "delete_services", services),
                                    ("slices", "delete_slices", slices)):
        last = {obj.key: obj for obj in kwargs.get(field_name, ())}
        # In the order build sees them: the order of the whole list.
        kwargs[field_name] = [last[key] for key in final if key in last]
        kwargs[gone] = sorted({key for key in kwargs.get(gone, ()) if key not in final})
    return kwargs, pods, services, slices


@pytest.mark.parametrize("seed", range(12))
def test_incremental_views_equal_whole_builds_after_every_change(seed):
    rng = random.Random(seed)
    oracle = Oracle()
    tracker = ChangeTracker(NODES)
    counter = [0]
    refused = applied = 0
    for _ in range(60):
        kwargs, pods, services, slices = _step(rng, oracle, tracker, counter)
        before = _views(oracle.built)
        try:
            expected = oracle.build(pods, services, slices)
        except StateError as exc:
            held = {n.name: tracker.node_view(n.name) for n in NODES}
            allocations = dict(tracker.allocator.ips), dict(tracker.allocator.ports)
            with pytest.raises(StateError):
                tracker.apply(**kwargs)
            refused += 1
            # Refused: nothing changed, not even an allocation.
            assert {n.name: tracker.node_view(n.name) for n in NODES} == held, exc
            assert (dict(tracker.allocator.ips), dict(tracker.allocator.ports)) == allocations
            assert len(tracker.pods) == len(oracle.pods)
            continue
        changes = tracker.apply(**kwargs)
        applied += 1
        oracle.pods, oracle.services, oracle.slices, oracle.built = pods, services, slices, expected
        after = _views(expected)
        for node in NODES:
            got = tracker.node_view(node.name)
            assert got == expected.node_view(node.name), f"seed {seed}, {node.name}: {kwargs}"
            old, new = before[node.name], after[node.name]
            differ = {k for k in new if old.get(k) != new[k]}
            gone = set(old) - set(new)
            change = changes[node.name]
            assert set(change.updated) == differ, f"seed {seed}: updated {kwargs}"
            assert set(change.removed) == gone, f"seed {seed}: removed {kwargs}"
        # Allocations agree with the whole build's, which kept the earlier ones.
        assert {s.key: (s.cluster_ip, tuple(p.node_port for p in s.ports),
                        s.health_check_node_port) for s in tracker.services.values()} == {
            s.key: (s.cluster_ip, tuple(p.node_port for p in s.ports), s.health_check_node_port)
            for s in expected.services}
        assert {p.key: (p.node_name, p.ip) for p in tracker.pods.values()} == {
            p.key: (p.node_name, p.ip) for p in expected.pods}
    assert applied > 30 and refused >= 0


def test_one_changed_service_recomputes_only_that_service():
    """The work of one change does not grow with the number of Services."""
    tracker = ChangeTracker(NODES)
    pods = [Pod(NS, f"web-{i}", {"app": "web"}, f"node{1 + i % 3}") for i in range(6)]
    services = [Service(NS, f"svc-{i}", (ServicePort(80, TCP),), selector={"app": "web"})
                for i in range(2000)]
    tracker.apply(pods=pods, services=services)
    view = tracker.node_view("node1")
    assert len(view.services) == 2000
    calls = []
    import kube.tracker as tracker_module

    real = tracker_module.service_port_views

    def counting(svc, slices, node):
        calls.append(svc.key)
        return real(svc, slices, node)

    tracker_module.service_port_views = counting
    try:
        changes = tracker.apply(services=[Service(NS, "svc-7", (ServicePort(81, TCP),),
                                                  selector={"app": "web"})])
    finally:
        tracker_module.service_port_views = real
    assert set(calls) == {(NS, "svc-7")} and len(calls) == len(NODES)
    for node in NODES:
        change = changes[node.name]
        assert [k[1:] for k in change.updated] == [("svc-7", "", TCP, 81)]
        assert [k[1:] for k in change.removed] == [("svc-7", "", TCP, 80)]
    # The node's view is made again only when asked, and then holds the change.
    assert tracker.node_view("node1").service(f"{NS}/svc-7").port == 81


def test_a_pod_change_touches_only_the_services_selecting_it():
    tracker = ChangeTracker(NODES)
    tracker.apply(pods=[Pod(NS, "a", {"app": "a"}, "node1"), Pod(NS, "b", {"app": "b"}, "node2")],
                  services=[Service(NS, "sa", (ServicePort(80, TCP),), selector={"app": "a"}),
                            Service(NS, "sb", (ServicePort(80, TCP),), selector={"app": "b"})])
    changes = tracker.apply(pods=[Pod(NS, "a", {"app": "a"}, "node1", ready=False)])
    assert {k[1] for k in changes["node1"].updated} == {"sa"}
    assert not tracker.node_view("node1").service(f"{NS}/sa").endpoints[0].ready
    changes = tracker.apply(delete_pods=[(NS, "b")])
    assert {k[1] for k in changes["node2"].updated} == {"sb"}
    assert tracker.node_view("node2").service(f"{NS}/sb").endpoints == ()


def test_a_refused_change_leaves_everything_as_it_was():
    tracker = ChangeTracker(NODES)
    web = Pod(NS, "web", {"app": "web"}, "node1")
    first = Service(NS, "first", (ServicePort(80, TCP),), type="NodePort", selector={"app": "web"})
    tracker.apply(pods=[web], services=[first])
    held = tracker.node_view("node1")
    taken = tracker.services[(NS, "first")]
    allocations = dict(tracker.allocator.ips), dict(tracker.allocator.ports)
    # A batch whose last Service asks for the first one's ClusterIP: refused whole, and the
    # Services before it in the batch (one changed, one new) are not half-applied.
    changed = Service(NS, "first", (ServicePort(80, TCP), ServicePort(81, TCP)), type="NodePort",
                      selector={"app": "web"})
    new = Service(NS, "second", (ServicePort(80, TCP),), selector={"app": "web"})
    thief = Service(NS, "thief", (ServicePort(80, TCP),), cluster_ip=taken.cluster_ip)
    with pytest.raises(StateError, match=f"spec.clusterIP {taken.cluster_ip} is already used"):
        tracker.apply(services=[changed, new, thief],
                      pods=[Pod(NS, "late", {"app": "web"}, "node2")])
    assert tracker.node_view("node1") == held
    assert tracker.services == {(NS, "first"): taken}
    assert set(tracker.pods) == {(NS, "web")}
    assert (dict(tracker.allocator.ips), dict(tracker.allocator.ports)) == allocations
    # A pod asking for a taken address is refused the same way.
    with pytest.raises(StateError, match="status.podIP"):
        placed = tracker.pods[(NS, "web")].ip
        tracker.apply(pods=[Pod(NS, "copy", {"app": "web"}, "node1", ip=placed)])
    assert tracker.node_view("node1") == held and set(tracker.pods) == {(NS, "web")}
    # And the tracker still works afterwards.
    changes = tracker.apply(services=[new])
    assert [k[1] for k in changes["node1"].updated] == ["second"]
