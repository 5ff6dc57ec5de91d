"""kube/state.py: placement, allocation, the endpoint controller and each node's view."""

from __future__ import annotations

import ipaddress
import textwrap
from dataclasses import replace

import pytest

from kube.manifests import load_manifests
from kube.model import (
    HEADLESS_LABEL,
    PLAN,
    PROXY_NAME_LABEL,
    ZONE_LABEL,
    AddressPlan,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    NodeLabels,
    Pod,
    Service,
    ServicePort,
)
from kube.state import DROP, REJECT, ClusterState, StateError

NODES = (Node.numbered(1), Node.numbered(2))


def pod(name, node=None, labels=None, ready=True, terminating=False, ports=(), ns="ns1"):
    return Pod(ns, name, labels or {"app": "web"}, node, tuple(ports), ready, terminating)


WEB_PORTS = (ServicePort(80, target_port=8080),)


def svc(name="web", ports=WEB_PORTS, ns="ns1", **kw):
    kw.setdefault("selector", {"app": "web"})
    return Service(ns, name, tuple(ports), **kw)


def addrs(endpoints) -> set[str]:
    return {e.addr for e in endpoints}


# --------------------------------------------------------------------------- pods


def test_pods_spread_over_nodes_with_unique_addresses_in_their_node_cidr():
    state = ClusterState.build(NODES, [pod(f"p{i}") for i in range(5)])
    on = {n.name: [p for p in state.pods if p.node_name == n.name] for n in NODES}
    assert [len(on["node1"]), len(on["node2"])] == [3, 2]
    assert [p.node_name for p in state.pods] == ["node1", "node2", "node1", "node2", "node1"]
    assert len({p.ip for p in state.pods}) == 5
    for n in NODES:
        for p in on[n.name]:
            assert ipaddress.ip_address(p.ip) in ipaddress.ip_network(n.pod_cidr)
    assert state.pod("ns1", "p0").ip == "198.18.129.2"  # .0 and .1 are never handed out


def test_pods_pinned_by_node_name_count_for_the_scheduler():
    pods = [pod("a", "node1"), pod("b", "node1"), pod("c"), pod("d")]
    state = ClusterState.build(NODES, pods)
    assert [p.node_name for p in state.pods] == ["node1", "node1", "node2", "node2"]


def test_a_pod_on_an_unknown_node_is_refused():
    with pytest.raises(StateError) as info:
        ClusterState.build(NODES, [pod("p", "node9")])
    message = str(info.value)
    assert "Pod ns1/p" in message and "spec.nodeName 'node9'" in message
    assert "nodes: node1, node2" in message


def test_pods_need_nodes_and_a_node_holds_253():
    with pytest.raises(StateError, match="no nodes"):
        ClusterState.build((), [pod("p")])
    full = ClusterState.build(NODES[:1], [pod(f"p{i}") for i in range(253)])
    assert len({p.ip for p in full.pods}) == 253
    with pytest.raises(StateError, match="node1 is full: at most 253 pods"):
        ClusterState.build(NODES[:1], [pod(f"p{i}") for i in range(254)])


def test_previous_keeps_pod_addresses_and_nodes():
    first = ClusterState.build(NODES, [pod("a"), pod("b"), pod("c")])
    # "a" is gone, "z" is new and listed first: nobody else moves, "z" does not take b's or c's IP.
    second = ClusterState.build(NODES, [pod("z"), pod("b"), pod("c")], previous=first)
    for name in ("b", "c"):
        assert (second.pod("ns1", name).node_name, second.pod("ns1", name).ip) == (
            first.pod("ns1", name).node_name,
            first.pod("ns1", name).ip,
        )
    assert len({p.ip for p in second.pods}) == 3
    # Moving a pod to another node gives it an address there.
    moved = ClusterState.build(NODES, [pod("b", "node1")], previous=first)
    assert first.pod("ns1", "b").node_name == "node2"
    assert moved.pod("ns1", "b").ip.startswith("198.18.129.")


def test_previous_pod_on_a_node_that_left_is_placed_again():
    first = ClusterState.build(NODES, [pod("a"), pod("b")])
    assert first.pod("ns1", "b").node_name == "node2"
    again = ClusterState.build(NODES[:1], [pod("a"), pod("b")], previous=first)
    assert {p.node_name for p in again.pods} == {"node1"}
    assert len({p.ip for p in again.pods}) == 2


def test_pods_that_already_hold_addresses_keep_them_and_are_never_doubled():
    first = ClusterState.build(NODES, [pod("a"), pod("b")])
    grown = ClusterState.build(NODES, [*first.pods, pod("c"), pod("d")])
    assert grown.pod("ns1", "a").ip == first.pod("ns1", "a").ip
    assert len({p.ip for p in grown.pods}) == 4
    clash = replace(first.pod("ns1", "a"), name="twin")
    with pytest.raises(StateError, match="Pod ns1/twin: status.podIP 198.18.129.2 is already used"):
        ClusterState.build(NODES, [first.pod("ns1", "a"), clash])


# --------------------------------------------------------------------------- ClusterIPs


def test_cluster_ips_are_allocated_in_order_around_dns_and_explicit_ones():
    services = [svc(f"s{i}") for i in range(11)] + [svc("fixed", cluster_ip="198.19.0.3")]
    state = ClusterState.build(NODES, services=services)
    ips = [s.cluster_ip for s in state.services]
    assert ips[0] == "198.19.0.1" and ips[-1] == "198.19.0.3"
    assert "198.19.0.10" not in ips  # the cluster DNS address
    assert len(set(ips)) == len(ips)
    assert all(PLAN.in_service_cidr(ip) for ip in ips)


def test_cluster_ip_clash_between_two_services_is_refused():
    services = [svc("a", cluster_ip="198.19.1.1"), svc("b", cluster_ip="198.19.1.1")]
    with pytest.raises(StateError) as info:
        ClusterState.build(NODES, services=services)
    assert str(info.value) == (
        "Service ns1/b: spec.clusterIP 198.19.1.1 is already used by Service ns1/a"
    )


def test_the_dns_address_belongs_to_one_kube_system_service():
    dns = svc("kube-dns", ns="kube-system", cluster_ip=PLAN.dns_ip)
    assert ClusterState.build(NODES, services=[dns]).services[0].cluster_ip == PLAN.dns_ip
    with pytest.raises(StateError, match="already used by the cluster DNS Service"):
        ClusterState.build(NODES, services=[svc("web", cluster_ip=PLAN.dns_ip)])
    other = svc("coredns", ns="kube-system", cluster_ip=PLAN.dns_ip)
    with pytest.raises(
        StateError, match="kube-system/coredns.*used by Service kube-system/kube-dns"
    ):
        ClusterState.build(NODES, services=[dns, other])


def test_the_service_cidr_runs_out():
    plan = AddressPlan(service_cidr="198.19.0.0/29")  # six usable addresses
    ok = ClusterState.build(NODES, services=[svc(f"s{i}") for i in range(6)], plan=plan)
    assert ok.services[-1].cluster_ip == "198.19.0.6"
    with pytest.raises(
        StateError, match="Service ns1/s6: the Service CIDR 198.19.0.0/29 has no free"
    ):
        ClusterState.build(NODES, services=[svc(f"s{i}") for i in range(7)], plan=plan)


def test_previous_keeps_cluster_ips_and_node_ports():
    a = svc("a", type="NodePort")
    b = svc("b", type="NodePort", ports=(ServicePort(80, name="h"), ServicePort(81, name="m")))
    first = ClusterState.build(NODES, services=[a, b])
    c = svc("c", type="NodePort")
    second = ClusterState.build(NODES, services=[c, b, a], previous=first)
    for name in ("a", "b"):
        assert second.service_obj("ns1", name) == first.service_obj("ns1", name)
    new = second.service_obj("ns1", "c")
    assert new.cluster_ip == "198.19.0.3" and new.ports[0].node_port == 30003


def test_previous_headless_service_made_normal_gets_an_address():
    first = ClusterState.build(NODES, services=[svc(cluster_ip="None")])
    second = ClusterState.build(NODES, services=[svc()], previous=first)
    assert second.services[0].cluster_ip == "198.19.0.1"


def test_a_new_service_cannot_take_an_address_an_applied_one_holds():
    first = ClusterState.build(NODES, services=[svc("a", type="NodePort")])
    taken_ip = first.services[0].cluster_ip
    taken_port = first.services[0].ports[0].node_port
    grab_ip = svc("b", cluster_ip=taken_ip)
    with pytest.raises(StateError, match=f"Service ns1/b: spec.clusterIP {taken_ip} is already"):
        ClusterState.build(NODES, services=[grab_ip, svc("a", type="NodePort")], previous=first)
    grab_port = svc("b", type="NodePort", ports=(ServicePort(80, node_port=taken_port),))
    with pytest.raises(StateError, match=r"Service ns1/b: spec.ports\[0\].nodePort 30000 is"):
        ClusterState.build(NODES, services=[grab_port, svc("a", type="NodePort")], previous=first)


# --------------------------------------------------------------------------- NodePorts


def test_node_ports_are_allocated_in_range_around_explicit_ones():
    services = [
        svc("a", type="NodePort", ports=(ServicePort(80, name="h"), ServicePort(81, name="m"))),
        svc("b", type="NodePort", ports=(ServicePort(80, node_port=30000),)),
        svc("c", ports=(ServicePort(80),)),
    ]
    state = ClusterState.build(NODES, services=services)
    a, b, c = state.services
    assert [p.node_port for p in a.ports] == [30001, 30002]  # 30000 was asked for by b
    assert b.ports[0].node_port == 30000
    assert c.ports[0].node_port is None  # a ClusterIP Service gets none
    lo, hi = PLAN.node_port_range
    assert all(lo <= p.node_port <= hi for s in (a, b) for p in s.ports)


def test_one_port_number_over_tcp_and_udp_shares_a_node_port():
    dns = svc(
        "dns",
        type="NodePort",
        ports=(
            ServicePort(53, "TCP", "tcp"),
            ServicePort(53, "UDP", "udp"),
            ServicePort(9153, name="m"),
        ),
    )
    ports = ClusterState.build(NODES, services=[dns]).services[0].ports
    assert [p.node_port for p in ports] == [30000, 30000, 30001]


def test_node_port_clash_between_two_services_is_refused():
    services = [
        svc("a", type="NodePort", ports=(ServicePort(80, node_port=30080),)),
        svc(
            "b",
            type="NodePort",
            ports=(ServicePort(81, name="x"), ServicePort(80, name="y", node_port=30080)),
        ),
    ]
    with pytest.raises(StateError) as info:
        ClusterState.build(NODES, services=services)
    assert str(info.value) == (
        "Service ns1/b: spec.ports[1].nodePort 30080 is already used by Service ns1/a"
    )


def test_node_ports_run_out():
    plan = AddressPlan(node_port_range=(30000, 30001))
    ok = ClusterState.build(
        NODES, services=[svc(f"s{i}", type="NodePort") for i in range(2)], plan=plan
    )
    assert [s.ports[0].node_port for s in ok.services] == [30000, 30001]
    with pytest.raises(StateError, match="Service ns1/s2: no free NodePort left in 30000-30001"):
        ClusterState.build(
            NODES, services=[svc(f"s{i}", type="NodePort") for i in range(3)], plan=plan
        )


# --------------------------------------------------------------------------- endpoints


def test_endpoints_from_selectors_carry_readiness_and_termination():
    pods = [
        pod("ready", "node1"),
        pod("unready", "node1", ready=False),
        pod("leaving", "node2", terminating=True),
        pod("leaving-unready", "node2", ready=False, terminating=True),
        pod("other", "node2", labels={"app": "db"}),
        pod("elsewhere", "node2", ns="ns2"),
    ]
    state = ClusterState.build(NODES, pods, [svc()])
    (sl,) = state.endpoint_slices
    assert (sl.namespace, sl.service_name, sl.ports) == (
        "ns1",
        "web",
        (EndpointPort(8080, "TCP", ""),),
    )
    got = {e.pod_name: (e.ready, e.serving, e.terminating, e.node_name) for e in sl.endpoints}
    assert got == {
        "ready": (True, True, False, "node1"),
        "unready": (False, False, False, "node1"),
        "leaving": (False, True, True, "node2"),
        "leaving-unready": (False, False, True, "node2"),
    }
    sp = state.node_view("node1").service("ns1/web")
    assert len(sp.endpoints) == 4  # every known endpoint, usable or not
    assert addrs(sp.internal_endpoints) == {f"{state.pod('ns1', 'ready').ip}:8080"}
    assert sp.endpoints[0].pod == "ns1/ready"


def test_every_selector_label_must_match():
    pods = [
        pod("fe", labels={"app": "web", "tier": "fe"}),
        pod("be", labels={"app": "web", "tier": "be"}),
        pod("bare", labels={"tier": "fe"}),
    ]
    state = ClusterState.build(NODES, pods, [svc(selector={"app": "web", "tier": "fe"})])
    assert [ep.pod_name for sl in state.endpoint_slices for ep in sl.endpoints] == ["fe"]


def test_named_target_ports_resolve_per_pod():
    pods = [
        pod("a", "node1", ports=[ContainerPort(8080, name="http")]),
        pod("b", "node2", ports=[ContainerPort(9090, name="http")]),
        pod("c", "node2", ports=[ContainerPort(7070, name="metrics")]),  # no "http": no endpoint
    ]
    web = svc(ports=(ServicePort(80, name="web", target_port="http"),))
    state = ClusterState.build(NODES, pods, [web])
    # One slice per port mapping, as the controller does; "c" serves none of the ports.
    by_pod = {ep.pod_name: sl.ports for sl in state.endpoint_slices for ep in sl.endpoints}
    assert by_pod == {
        "a": (EndpointPort(8080, "TCP", "web"),),
        "b": (EndpointPort(9090, "TCP", "web"),),
        "c": (),
    }
    sp = state.node_view("node1").service("ns1/web:web")
    assert addrs(sp.endpoints) == {
        f"{state.pod('ns1', 'a').ip}:8080",
        f"{state.pod('ns1', 'b').ip}:9090",
    }


def test_a_named_target_port_no_selected_pod_declares_is_refused():
    pods = [pod("a", ports=[ContainerPort(8080, name="http"), ContainerPort(53, "UDP", "dns")])]
    web = svc(
        ports=(
            ServicePort(80, name="a", target_port=8080),
            ServicePort(81, name="b", target_port="dns"),
        )
    )
    with pytest.raises(StateError) as info:
        ClusterState.build(NODES, pods, [web])
    assert str(info.value) == (
        "Service ns1/web: spec.ports[1].targetPort 'dns' is not a TCP port name declared by "
        "any selected pod (they declare: http)"
    )
    # With no pod selected yet there is nothing to check.
    assert ClusterState.build(NODES, [], [web]).endpoint_slices[0].endpoints == ()


def test_given_endpoint_slices_replace_the_selector_and_match_ports_by_name():
    slice_ = EndpointSlice(
        "ns1",
        "web-x",
        "web",
        (Endpoint(("198.18.0.5",), node_name="node2"), Endpoint(("198.18.0.6",), ready=False)),
        (EndpointPort(9000, "TCP", "http"), EndpointPort(9001, "TCP", "other")),
    )
    web = svc(ports=(ServicePort(80, name="http"),))
    state = ClusterState.build(NODES, [pod("a")], [web], [slice_])
    assert state.endpoint_slices == (slice_,)
    sp = state.node_view("node1").service("ns1/web:http")
    assert addrs(sp.endpoints) == {"198.18.0.5:9000", "198.18.0.6:9000"}
    assert addrs(sp.internal_endpoints) == {"198.18.0.5:9000"}


def test_a_service_without_selector_has_no_endpoints_unless_slices_are_given():
    state = ClusterState.build(NODES, [pod("a")], [svc(selector=None)])
    assert state.endpoint_slices == ()
    assert state.node_view("node1").service("ns1/web").endpoints == ()


# --------------------------------------------------------------------------- node views


def _spread_state(**service_fields):
    """Two ready pods on node1, one on node2, and one terminating pod on each node."""
    pods = [
        pod("a1", "node1"),
        pod("a2", "node1"),
        pod("b1", "node2"),
        pod("t1", "node1", terminating=True),
        pod("t2", "node2", terminating=True),
    ]
    return ClusterState.build(NODES, pods, [svc(**service_fields)])


def _ips(state, *names):
    return {f"{state.pod('ns1', n).ip}:8080" for n in names}


def test_cluster_policies_use_every_ready_endpoint_on_every_node():
    state = _spread_state(type="NodePort")
    for node in ("node1", "node2"):
        sp = state.node_view(node).service("ns1/web")
        assert addrs(sp.internal_endpoints) == _ips(state, "a1", "a2", "b1")
        assert addrs(sp.external_endpoints) == _ips(state, "a1", "a2", "b1")
        assert not sp.internal_policy_local and not sp.external_policy_local
    locals_ = {e.addr for e in state.node_view("node2").service("ns1/web").endpoints if e.local}
    assert locals_ == _ips(state, "b1", "t2")


def test_internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node():
    state = _spread_state(type="NodePort", internal_traffic_policy="Local")
    one, two = (state.node_view(n).service("ns1/web") for n in ("node1", "node2"))
    assert addrs(one.internal_endpoints) == _ips(state, "a1", "a2")
    assert addrs(two.internal_endpoints) == _ips(state, "b1")
    assert addrs(two.external_endpoints) == _ips(state, "a1", "a2", "b1")
    assert one.internal_policy_local and not one.external_policy_local


def test_external_traffic_policy_local_keeps_node_port_traffic_on_the_node():
    state = _spread_state(type="NodePort", external_traffic_policy="Local")
    one, two = (state.node_view(n).service("ns1/web") for n in ("node1", "node2"))
    assert addrs(one.external_endpoints) == _ips(state, "a1", "a2")
    assert addrs(two.external_endpoints) == _ips(state, "b1")
    assert addrs(two.internal_endpoints) == _ips(state, "a1", "a2", "b1")
    assert one.external_policy_local and one.has_external


def test_external_policy_local_matters_only_for_external_traffic():
    state = _spread_state(external_traffic_policy="Local")  # no NodePort, no externalIPs
    assert not state.node_view("node1").service("ns1/web").external_policy_local
    state = _spread_state(external_traffic_policy="Local", external_ips=("198.18.64.1",))
    sp = state.node_view("node2").service("ns1/web")
    assert sp.external_policy_local and sp.external_ips == ("198.18.64.1",)
    assert addrs(sp.external_endpoints) == _ips(state, "b1")


def test_serving_terminating_endpoints_are_used_only_when_none_is_ready():
    pods = [
        pod("t1", "node1", terminating=True),
        pod("gone", "node1", ready=False, terminating=True),  # not serving: never used
        pod("b1", "node2"),
    ]
    state = ClusterState.build(NODES, pods, [svc(type="NodePort", external_traffic_policy="Local")])
    one, two = (state.node_view(n).service("ns1/web") for n in ("node1", "node2"))
    assert addrs(one.internal_endpoints) == _ips(state, "b1")  # a ready one exists
    assert addrs(one.external_endpoints) == _ips(state, "t1")  # none ready locally: fall back
    assert addrs(two.external_endpoints) == _ips(state, "b1")
    none_ready = ClusterState.build(NODES, pods[:2], [svc()])
    sp = none_ready.node_view("node2").service("ns1/web")
    assert addrs(sp.internal_endpoints) == _ips(none_ready, "t1")
    assert [e.terminating for e in sp.internal_endpoints] == [True]


def test_no_usable_endpoint_leaves_the_sets_empty():
    state = ClusterState.build(
        NODES, [pod("u", "node1", ready=False)], [svc(internal_traffic_policy="Local")]
    )
    for node in ("node1", "node2"):
        sp = state.node_view(node).service("ns1/web")
        assert sp.internal_endpoints == () and sp.external_endpoints == ()
        assert len(sp.endpoints) == 1


BOTH_LOCAL = {"type": "NodePort", "internal_traffic_policy": "Local",
              "external_traffic_policy": "Local"}


def test_both_policies_local_with_local_and_remote_endpoints():
    state = _spread_state(**BOTH_LOCAL)
    sp = state.node_view("node1").service("ns1/web")
    # Reachable from outside, so the cluster-wide set is kept for the short circuit.
    assert addrs(sp.cluster_endpoints) == _ips(state, "a1", "a2", "b1")
    assert addrs(sp.local_endpoints) == _ips(state, "a1", "a2")
    assert sp.internal_endpoints == sp.external_endpoints == sp.local_endpoints
    assert sp.all_reachable_endpoints == sp.cluster_endpoints
    assert sp.has_any_endpoints
    assert sp.internal_traffic_filter is None and sp.external_traffic_filter is None


def test_both_policies_local_with_only_remote_endpoints_drops_and_keeps_the_short_circuit():
    state = ClusterState.build(NODES, [pod("b1", "node2"), pod("b2", "node2")],
                               [svc(**BOTH_LOCAL)])
    sp = state.node_view("node1").service("ns1/web")
    assert addrs(sp.cluster_endpoints) == addrs(sp.all_reachable_endpoints) == _ips(
        state, "b1", "b2")
    assert sp.local_endpoints == sp.internal_endpoints == sp.external_endpoints == ()
    assert sp.has_any_endpoints  # so no REJECT: endpoints exist, on another node
    assert (sp.internal_traffic_filter, sp.external_traffic_filter) == (DROP, DROP)
    there = state.node_view("node2").service("ns1/web")
    assert addrs(there.internal_endpoints) == addrs(there.external_endpoints) == _ips(
        state, "b1", "b2")


def test_both_policies_local_without_endpoints_rejects():
    state = ClusterState.build(NODES, [pod("u", "node1", ready=False)], [svc(**BOTH_LOCAL)])
    sp = state.node_view("node1").service("ns1/web")
    assert sp.cluster_endpoints == sp.local_endpoints == sp.all_reachable_endpoints == ()
    assert not sp.has_any_endpoints
    assert (sp.internal_traffic_filter, sp.external_traffic_filter) == (REJECT, REJECT)


def test_internal_policy_local_without_external_frontends_never_uses_the_cluster_set():
    state = ClusterState.build(NODES, [pod("b1", "node2")], [svc(internal_traffic_policy="Local")])
    sp = state.node_view("node1").service("ns1/web")
    assert sp.cluster_endpoints == sp.local_endpoints == sp.all_reachable_endpoints == ()
    assert sp.has_any_endpoints and sp.internal_traffic_filter == DROP
    assert sp.external_endpoints == () and sp.external_traffic_filter is None


def test_all_reachable_endpoints_joins_a_local_terminating_fallback_to_the_cluster_set():
    pods = [pod("t1", "node1", terminating=True), pod("b1", "node2")]
    state = ClusterState.build(NODES, pods, [svc(**BOTH_LOCAL)])
    sp = state.node_view("node1").service("ns1/web")
    assert addrs(sp.cluster_endpoints) == _ips(state, "b1")  # a ready one exists
    assert addrs(sp.local_endpoints) == _ips(state, "t1")  # none ready here: fall back
    assert addrs(sp.all_reachable_endpoints) == _ips(state, "b1", "t1")
    assert len(sp.all_reachable_endpoints) == 2


def test_the_categorisation_follows_a_replaced_endpoint_list():
    state = ClusterState.build(NODES, [pod("a1", "node1"), pod("b1", "node2")],
                               [svc(**BOTH_LOCAL)])
    sp = state.node_view("node1").service("ns1/web")
    remote_only = replace(sp, endpoints=tuple(e for e in sp.endpoints if not e.local))
    assert remote_only.internal_traffic_filter == DROP and remote_only.local_endpoints == ()
    assert replace(sp, endpoints=()).internal_traffic_filter == REJECT


def test_headless_and_other_proxy_services_are_absent_from_the_view():
    services = [
        svc("plain"),
        svc("headless", cluster_ip="None"),
        svc("theirs", labels={PROXY_NAME_LABEL: "other"}),
        # kube-proxy's informers skip the label whatever its value, ClusterIP or not.
        svc("labelled", labels={HEADLESS_LABEL: ""}),
        svc("labelled-theirs", labels={HEADLESS_LABEL: "true", PROXY_NAME_LABEL: "other"}),
    ]
    state = ClusterState.build(NODES, [pod("a")], services)
    assert state.service_obj("ns1", "labelled").cluster_ip  # allocated, only not proxied
    assert [sp.service for sp in state.node_view("node1").services] == ["plain"]
    assert [sp.service for sp in state.node_view("node1", proxy_name="other").services] == [
        "theirs"
    ]
    with pytest.raises(KeyError):
        state.node_view("node1").service("ns1/headless")


def test_view_flattens_ports_with_affinity_and_node_addresses():
    web = svc(
        ports=(ServicePort(80, name="http", target_port=8080), ServicePort(53, "UDP", "dns", 8080)),
        type="NodePort",
        session_affinity="ClientIP",
        affinity_timeout_s=60,
    )
    state = ClusterState.build(NODES, [pod("a")], [web, svc("aaa", ports=(ServicePort(1),))])
    view = state.node_view("node2")
    assert (view.node, view.node_ip, view.pod_cidr, view.node_ips) == (
        "node2",
        "198.18.0.2",
        "198.18.130.0/24",
        ("198.18.0.2",),
    )
    assert [sp.name for sp in view.services] == ["ns1/aaa", "ns1/web:dns", "ns1/web:http"]
    dns = view.service("ns1/web:dns", "UDP")
    assert (dns.protocol, dns.port, dns.node_port, dns.affinity_timeout_s) == ("UDP", 53, 30001, 60)
    assert dns.session_affinity and dns.key == (dns.cluster_ip, "UDP", "53")
    assert view.services[0].affinity_timeout_s is None and view.services[0].node_port is None
    with pytest.raises(KeyError):
        view.service("ns1/web:dns", "TCP")


# --------------------------------------------------------------------------- from YAML


def test_manifests_to_node_view():
    text = textwrap.dedent(
        """\
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: ns1}
        spec:
          type: NodePort
          externalTrafficPolicy: Local
          selector: {app: web}
          ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
        ---
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Pod, metadata: {name: w1, namespace: ns1, labels: {app: web}},
           spec: {nodeName: node1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}}
        - {apiVersion: v1, kind: Pod, metadata: {name: w2, namespace: ns1, labels: {app: web}},
           spec: {nodeName: node2, containers: [{name: c, ports: [{name: http, containerPort: 8081}]}]}}
        """
    )
    m = load_manifests(text)
    state = ClusterState.build(NODES, m.pods, m.services, m.endpoint_slices)
    sp = state.node_view("node2").service("ns1/web:http")
    assert (sp.port, sp.node_port, sp.cluster_ip) == (80, 30080, "198.19.0.1")
    assert addrs(sp.external_endpoints) == {f"{state.pod('ns1', 'w2').ip}:8081"}
    assert addrs(sp.internal_endpoints) == {
        f"{state.pod('ns1', 'w1').ip}:8080",
        f"{state.pod('ns1', 'w2').ip}:8081",
    }


# --------------------------------------------------------------------------- LoadBalancer


def lb(name="web", **kw):
    kw.setdefault("load_balancer_ips", ("198.18.32.1",))
    return svc(name, type="LoadBalancer", **kw)


def test_load_balancer_gets_node_ports_and_under_local_policy_a_health_check_node_port():
    services = [
        lb("cluster"),
        lb("local", external_traffic_policy="Local"),
        lb("given", external_traffic_policy="Local", health_check_node_port=30000),
        lb("bare", allocate_load_balancer_node_ports=False),
    ]
    state = ClusterState.build(NODES, services=services)
    cluster, local, given, bare = state.services
    assert (cluster.ports[0].node_port, cluster.health_check_node_port) == (30001, None)
    assert (local.ports[0].node_port, local.health_check_node_port) == (30002, 30003)
    assert (given.ports[0].node_port, given.health_check_node_port) == (30004, 30000)
    assert (bare.ports[0].node_port, bare.health_check_node_port) == (None, None)
    again = ClusterState.build(NODES, services=services[::-1], previous=state)
    assert again.service_obj("ns1", "local") == local  # kept across builds, as node ports
    clash = svc("np", type="NodePort", ports=(ServicePort(80, node_port=30000),))
    with pytest.raises(StateError) as info:
        ClusterState.build(NODES, services=[services[2], clash])
    assert str(info.value) == (
        "Service ns1/np: spec.ports[0].nodePort 30000 is already used by Service ns1/given"
    )


def test_load_balancer_view_carries_ingress_ips_source_ranges_and_health_check_port():
    ranges = ("198.18.0.200/32",)
    state = _spread_state(type="LoadBalancer", load_balancer_ips=("198.18.32.1",),
                          load_balancer_source_ranges=ranges, external_traffic_policy="Local")
    sp = state.node_view("node2").service("ns1/web")
    assert sp.load_balancer_ips == ("198.18.32.1",) and sp.load_balancer_source_ranges == ranges
    assert sp.node_port == 30000 and sp.health_check_node_port == 30001
    assert sp.external_policy_local and addrs(sp.external_endpoints) == _ips(state, "b1")
    # An ingress IP alone makes the port reachable from outside, as kube-proxy counts it.
    bare = replace(sp, node_port=None)
    assert bare.has_external and bare.external_endpoints == sp.external_endpoints
    plain = _spread_state(type="NodePort").node_view("node2").service("ns1/web")
    assert (plain.load_balancer_ips, plain.health_check_node_port) == ((), None)


def test_health_check_counts_this_nodes_ready_endpoints_once_per_address():
    """kube-proxy's LocalReadyEndpoints: ready and local, one per address over every port;
    serving+terminating endpoints keep serving but do not count."""
    ports = (ServicePort(80, "TCP", "http", 8080), ServicePort(81, "TCP", "alt", 8081))
    pods = [pod("a1", "node1"), pod("a2", "node1"), pod("b1", "node2"),
            pod("b2", "node2", ready=True, terminating=True)]
    state = ClusterState.build(NODES, pods, [lb(ports=ports, external_traffic_policy="Local")])
    node1, node2 = (state.node_view(n.name) for n in NODES)
    for name in ("ns1/web:http", "ns1/web:alt"):
        assert node1.service(name).health_check_local_endpoints == 2  # a1, a2: not 4
        sp = node2.service(name)
        assert sp.health_check_local_endpoints == 1  # b1; b2 is terminating
        assert sp.health_check_node_port == state.services[0].health_check_node_port
    # Only terminating endpoints here: they still serve the Service (KEP-1669), but the
    # health check fails, so the load balancer drains the node.
    gone = ClusterState.build(NODES, [pod("b1", "node2", terminating=True)],
                              [lb(external_traffic_policy="Local")], previous=state)
    sp = gone.node_view("node2").service("ns1/web")
    assert sp.health_check_local_endpoints == 0 and addrs(sp.local_endpoints) == _ips(gone, "b1")
    # No health-check NodePort (Cluster policy): nothing to count.
    plain = ClusterState.build(NODES, pods, [lb()]).node_view("node1").service("ns1/web")
    assert (plain.health_check_node_port, plain.health_check_local_endpoints) == (None, 0)


# --------------------------------------------------------------------------- readiness


def test_publish_not_ready_addresses_counts_unready_pods_as_ready():
    pods = [pod("unready", "node1", ready=False), pod("leaving", "node2", terminating=True)]
    state = ClusterState.build(NODES, pods, [svc(publish_not_ready_addresses=True)])
    eps = {e.pod_name: e for e in state.endpoint_slices[0].endpoints}
    assert (eps["unready"].ready, eps["unready"].serving) == (True, False)
    assert (eps["leaving"].ready, eps["leaving"].terminating) == (True, True)
    sp = state.node_view("node1").service("ns1/web")
    assert addrs(sp.internal_endpoints) == _ips(state, "unready", "leaving")
    plain = ClusterState.build(NODES, pods, [svc()]).node_view("node1").service("ns1/web")
    assert addrs(plain.internal_endpoints) == _ips(state, "leaving")  # serving+terminating only


# --------------------------------------------------------------------------- topology


def test_nodes_are_one_zone_each_unless_node_manifests_say_otherwise():
    assert [n.zone for n in NODES] == ["zone1", "zone2"]
    east = (NodeLabels("node1", {ZONE_LABEL: "east"}), NodeLabels("node2", {}))
    state = ClusterState.build(NODES, node_labels=east)
    assert [n.zone for n in state.nodes] == ["east", ""]
    with pytest.raises(StateError) as info:
        ClusterState.build(NODES, node_labels=[NodeLabels("node9")])
    assert str(info.value) == (
        "Node node9: metadata.name is not a node of this cluster (nodes: node1, node2; "
        f"the address plan fits at most {PLAN.max_nodes})"
    )


def test_prefer_close_hints_each_ready_endpoint_for_its_own_zone():
    pods = [pod("a1", "node1"), pod("b1", "node2"), pod("u", "node2", ready=False)]
    state = ClusterState.build(NODES, pods, [svc(traffic_distribution="PreferClose")])
    eps = {e.pod_name: e for e in state.endpoint_slices[0].endpoints}
    assert [(eps[n].zone, eps[n].zone_hints) for n in ("a1", "b1", "u")] == [
        ("zone1", ("zone1",)), ("zone2", ("zone2",)), ("zone2", ())]
    plain = ClusterState.build(NODES, pods, [svc()]).endpoint_slices[0].endpoints
    assert [e.zone_hints for e in plain] == [(), (), ()] and plain[0].zone == "zone1"


def test_topology_keeps_cluster_traffic_in_the_zone_when_every_endpoint_is_hinted():
    three = (*NODES, Node.numbered(3))
    pods = [pod("a1", "node1"), pod("a2", "node1"), pod("b1", "node2")]
    services = [svc(type="NodePort", traffic_distribution="PreferClose")]
    state = ClusterState.build(three, pods, services)
    one = state.node_view("node1").service("ns1/web")
    assert one.node_zone == "zone1"
    assert addrs(one.cluster_endpoints) == addrs(one.external_endpoints) == _ips(state, "a1", "a2")
    assert addrs(state.node_view("node2").service("ns1/web").internal_endpoints) == _ips(
        state, "b1")
    # zone3 has no hinted endpoint: all of them, as topology.go falls back.
    assert addrs(state.node_view("node3").service("ns1/web").internal_endpoints) == _ips(
        state, "a1", "a2", "b1")
    # One ready endpoint without hints turns topology off everywhere.
    unhinted = replace(one, endpoints=tuple(
        replace(e, zone_hints=()) if e.ip == state.pod("ns1", "b1").ip else e
        for e in one.endpoints))
    assert addrs(unhinted.cluster_endpoints) == _ips(state, "a1", "a2", "b1")
    assert one.has_any_endpoints and one.internal_traffic_filter is None


def test_topology_leaves_local_policy_alone_and_follows_shared_zones():
    pods = [pod("a1", "node1"), pod("b1", "node2")]
    state = ClusterState.build(NODES, pods, [svc(**BOTH_LOCAL)])
    sp = state.node_view("node1").service("ns1/web")
    # Hand-written hints send zone1's cluster traffic to b1; the local set ignores hints.
    crossed = replace(sp, endpoints=tuple(
        replace(e, zone_hints=("zone2",) if e.local else ("zone1",)) for e in sp.endpoints))
    assert addrs(crossed.cluster_endpoints) == _ips(state, "b1")
    assert addrs(crossed.local_endpoints) == addrs(crossed.internal_endpoints) == _ips(
        state, "a1")
    assert addrs(crossed.all_reachable_endpoints) == _ips(state, "a1", "b1")
    one_zone = [NodeLabels(n.name, {ZONE_LABEL: "east"}) for n in NODES]
    shared = ClusterState.build(NODES, pods, [svc(traffic_distribution="PreferClose")],
                                node_labels=one_zone)
    sp = shared.node_view("node1").service("ns1/web")
    assert sp.node_zone == "east" and addrs(sp.cluster_endpoints) == _ips(shared, "a1", "b1")


# --------------------------------------------------------------------------- ExternalName, SCTP


def test_external_name_gets_no_cluster_ip_no_endpoints_and_no_view():
    alias = Service("ns1", "db", (), type="ExternalName", selector={"app": "web"},
                    external_name="db.example.com")
    state = ClusterState.build(NODES, [pod("a1")], [alias, svc()])
    assert state.service_obj("ns1", "db").cluster_ip is None
    assert [s.service_name for s in state.endpoint_slices] == ["web"]
    assert [sp.service for sp in state.node_view("node1").services] == ["web"]


def test_a_service_turned_external_name_releases_its_addresses_and_leaves_the_view():
    """service.go "should be able to change the type from ClusterIP/NodePort to ExternalName"
    and back: the ClusterIP and NodePort are released, and a new ClusterIP comes back."""
    alias = Service("ns1", "web", WEB_PORTS, type="ExternalName", selector={"app": "web"},
                    external_name="db.example.com")
    before = ClusterState.build(NODES, [pod("a1")], [svc(type="NodePort")])
    ip, node_port = before.services[0].cluster_ip, before.services[0].ports[0].node_port
    after = ClusterState.build(NODES, [pod("a1")], [alias], previous=before)
    turned = after.service_obj("ns1", "web")
    assert (turned.cluster_ip, turned.ports[0].node_port) == (None, None)
    assert after.endpoint_slices == () and after.node_view("node1").services == ()
    # The released addresses are free for the next Service that asks.
    other = svc("other", type="NodePort")
    reused = ClusterState.build(NODES, [pod("a1")], [alias, other], previous=after)
    got = reused.service_obj("ns1", "other")
    assert (got.cluster_ip, got.ports[0].node_port) == (ip, node_port)
    back = ClusterState.build(NODES, [pod("a1")], [svc()], previous=after)
    assert back.services[0].cluster_ip == ip
    assert [sp.service for sp in back.node_view("node1").services] == ["web"]


def test_sctp_ports_reach_the_view():
    ports = (ServicePort(9, "SCTP", "sig", 9999), ServicePort(80, name="http"))
    state = ClusterState.build(NODES, [pod("a1", "node1")], [svc(type="NodePort", ports=ports)])
    sp = state.node_view("node1").service("ns1/web:sig")
    assert (sp.protocol, sp.port, sp.node_port) == ("SCTP", 9, 30000)
    assert addrs(sp.internal_endpoints) == {f"{state.pod('ns1', 'a1').ip}:9999"}
