"""The change tracker against the whole-state build: after every change of a random
sequence, each node's view equals the one `ClusterState.build` makes from all objects
(with the earlier build as `previous`, so allocations must agree too), the changes it
reports are exactly the views that differ, and a refused change leaves it as it was."""

from __future__ import annotations

import random

import pytest

from kube.model import TCP, Pod, Service, ServicePort
from kube.state import StateError, allocations, previous_from_allocations
from kube.tracker import ChangeTracker
from tests.changes import NODES, NS, Oracle, random_step, views_by_key


@pytest.mark.parametrize("seed", range(12))
def test_incremental_views_equal_whole_builds_after_every_change(seed):
    rng = random.Random(seed)
    oracle = Oracle()
    tracker = ChangeTracker(NODES)
    counter = [0]
    refused = applied = 0
    for _ in range(60):
        kwargs, pods, services, slices = random_step(rng, oracle, tracker, counter)
        before = views_by_key(oracle.built)
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
        after = views_by_key(expected)
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


@pytest.mark.parametrize("seed", range(6))
def test_a_new_tracker_keeps_what_an_earlier_process_allocated(seed):
    """`svcbench apply` in a later process: the objects as the user gave them, with the
    allocations stored by the earlier one, give the same views (addresses included)."""
    rng = random.Random(seed)
    oracle = Oracle()
    tracker = ChangeTracker(NODES)
    counter = [0]
    for _ in range(60):
        kwargs, pods, services, slices = random_step(rng, oracle, tracker, counter)
        try:
            built = oracle.build(pods, services, slices)
        except StateError:
            continue
        tracker.apply(**kwargs)
        oracle.pods, oracle.services, oracle.slices, oracle.built = pods, services, slices, built
    # Holes in the allocations: objects made and some of them deleted again.
    extra_pods = [Pod(NS, f"x{i}", {"app": "x"}) for i in range(8)]
    extra = [Service(NS, f"x{i}", (ServicePort(80, TCP),), type="NodePort",
                     selector={"app": "x"}) for i in range(8)]
    tracker.apply(pods=extra_pods, services=extra)
    tracker.apply(delete_pods=[p.key for p in extra_pods[:3]],
                  delete_services=[s.key for s in extra[:3]])
    objects = dict(pods=[*oracle.pods.values(), *extra_pods[3:]],
                   services=[*oracle.services.values(), *extra[3:]],
                   slices=list(oracle.slices.values()))
    stored = allocations(tracker.pods.values(), tracker.services.values())
    later = ChangeTracker(NODES, previous=previous_from_allocations(NODES, stored))
    later.apply(**objects)
    for node in NODES:
        assert later.node_view(node.name) == tracker.node_view(node.name), seed
    assert later.services == tracker.services and later.pods == tracker.pods
    # Without what was stored, allocations start over and differ.
    fresh = ChangeTracker(NODES)
    fresh.apply(**objects)
    assert fresh.services != tracker.services
