"""The nftables data plane's table, checked by tracing packets through what it renders.

No root needed: render() is pure, and dataplanes.nfttrace follows a new connection's
first packet through the `nft -f` script the way nf_tables would. The per-node mirror's
transactions (nftmirror) are checked here too: what they touch, and that the table they
lead to traces like a fresh render.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from dataplanes.nftables import NftablesDataplane, render_table
from dataplanes.nftlayout import (
    AFFINITY_SCTP,
    AFFINITY_UDP,
    SHORT_CIRCUIT_BASE,
    ServiceClass,
    assign_slots,
)
from dataplanes.nftmirror import Mirror
from dataplanes.nfttrace import Table, TraceError, trace
from kube.model import (
    AFFINITY_CLIENT_IP,
    POLICY_LOCAL,
    SCTP,
    TYPE_NODE_PORT,
    UDP,
    ContainerPort,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState, EndpointView
from tests.scenarios import (
    BOTH_LOCAL,
    CLIENT_POD,
    EXTERNAL_CLIENT,
    LB_IP,
    LOAD_BALANCER,
    NODE1_IP,
    NODES,
    backends,
    trace_both_local,
    trace_load_balancer,
    view,
    web,
)


def script(pods, services, node: str = "node1") -> str:
    return NftablesDataplane().render(view(pods, services, node))


def go(text: str, src: str, dst: str, dport: int, proto: str = "tcp", **kw):
    return trace(text, src, dst, proto, dport, local_addrs=[NODE1_IP], **kw)


THREE = {"198.18.129.2:8080": 1 / 3, "198.18.130.2:8080": 1 / 3, "198.18.129.3:8080": 1 / 3}


# --------------------------------------------------------------------------- layout


def test_table_follows_kube_proxys_nftables_layout():
    text = script(backends(3), [web(type=TYPE_NODE_PORT, node_port=30000)])
    assert text.startswith("add table ip kube-proxy\ndelete table ip kube-proxy\n")
    for name in ("no-endpoint-services", "no-endpoint-nodeports"):
        for verdict in ("reject", "drop"):
            assert f"add set ip kube-proxy {name}-{verdict} {{ typeof" in text
    assert "services ip daddr 198.19.0.0/16 meta l4proto tcp goto cluster-ip-tcp\n" in text
    assert "services fib daddr type local ip daddr != 127.0.0.0/8 goto node-ports\n" in text
    assert "cluster-ip-tcp ip daddr . th dport @cluster-ip-tcp-3 goto cluster-ip-tcp-3\n" in text
    assert "node-port-tcp th dport @node-port-tcp-3 goto node-port-tcp-3\n" in text
    # No verdict map holds an element per Service (see dataplanes/nftlayout.py).
    assert [line.split()[4] for line in text.splitlines()
            if line.startswith("add map") and ": verdict" in line] == ["firewall-sources"]
    assert "numgen random mod 3" in text
    assert "flags dynamic,timeout" in text
    assert "meta mark set meta mark or 0x4000" in text
    assert "masquerade fully-random" in text
    assert "reject-chain reject" in text


def chains(mirror: Mirror) -> set[str]:
    return {line.split()[4] for line in mirror.script().splitlines()
            if line.startswith("add chain ")}


def test_no_service_has_a_chain_of_its_own():
    pods = backends(6)
    few = render_table(view(pods, [web(f"s{i}") for i in range(3)]))
    many = render_table(view(pods, [web(f"s{i}") for i in range(300)]))
    assert chains(few) == chains(many)
    assert {"cluster-ip-tcp", "cluster-ip-tcp-6"} <= chains(many)
    elements = many.table_elements()
    assert len(elements["cluster-ip-tcp-6"]) == len(elements["cluster-ips"]) == 300
    assert len(elements["cluster-ip-tcp-6-endpoints"]) == 300 * 6


def test_class_chain_names_say_their_shape():
    assert ServiceClass("cluster-ip", "tcp", 3).chain == "cluster-ip-tcp-3"
    assert ServiceClass("node-port", "udp", 2, 5).chain == "node-port-udp-local-2-cluster-5"
    assert ServiceClass("cluster-ip", "tcp", 3, None, 10800).chain == \
        "cluster-ip-tcp-3-affinity-10800"
    assert ServiceClass("node-port", "udp", 2, 5).partition == "node-port-udp"
    assert ServiceClass("node-port", "udp", 2, 5).rule == \
        "th dport @node-port-udp-local-2-cluster-5 goto node-port-udp-local-2-cluster-5"
    assert ServiceClass("cluster-ip", "tcp", 3).rule == \
        "ip daddr . th dport @cluster-ip-tcp-3 goto cluster-ip-tcp-3"


# --------------------------------------------------------------------------- ClusterIP


def test_pod_to_cluster_ip_reaches_each_endpoint_equally_without_masquerade():
    v = view(backends(3), [web()])
    vip = v.service("ns1/svc1:p80").cluster_ip
    r = go(NftablesDataplane().render(v), CLIENT_POD, vip, 80)
    assert r.verdicts() == {"DNAT"}
    assert r.endpoints() == pytest.approx(THREE)
    assert r.masquerade is False  # the backend must see the pod's own IP


def test_node_process_to_cluster_ip_is_masqueraded():
    v = view(backends(3), [web()])
    vip = v.service("ns1/svc1:p80").cluster_ip
    r = go(NftablesDataplane().render(v), NODE1_IP, vip, 80, from_node=True)
    assert r.endpoints() == pytest.approx(THREE)
    assert r.masquerade is True


def test_other_addresses_are_left_alone_but_clusterip_ports_rejected_and_the_cidr_dropped():
    """kube-proxy's cluster-ips-check: a port or protocol a ClusterIP does not serve is
    rejected, an unallocated address of the Service CIDR dropped, from pods and the node."""
    v = view(backends(2), [web()])
    text = NftablesDataplane().render(v)
    vip = v.service("ns1/svc1:p80").cluster_ip
    r = go(text, CLIENT_POD, "198.18.130.2", 8080)
    assert r.verdicts() == {"ACCEPT"} and r.masquerade is False
    for src, node in ((CLIENT_POD, False), (NODE1_IP, True)):
        for dst, port, proto, verdict in ((vip, 81, "tcp", "REJECT"), (vip, 80, "udp", "REJECT"),
                                          ("198.19.200.200", 80, "tcp", "DROP")):
            r = go(text, src, dst, port, proto=proto, from_node=node)
            assert r.verdicts() == {verdict}, (src, dst, port, proto)


def test_udp_service_port_uses_the_udp_endpoint_map():
    svc = Service("ns1", "dns", ports=(ServicePort(53, UDP, "dns", 8080),), selector={"app": "web"})
    v = view(backends(2), [svc])
    text = NftablesDataplane().render(v)
    assert "cluster-ip-udp-2-endpoints { " + v.services[0].cluster_ip + " . 53 . 0 :" in text
    r = go(text, CLIENT_POD, v.services[0].cluster_ip, 53, proto="udp")
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.130.2:8080": 0.5})


def test_tcp_and_udp_on_one_port_keep_their_own_endpoints():
    ports = (ServicePort(80, "TCP", "t", "web-tcp"), ServicePort(80, UDP, "u", "web-udp"))
    svc = Service("ns1", "both", ports=ports, selector={"app": "web"})
    both = (ContainerPort(8080, "TCP", "web-tcp"), ContainerPort(8080, UDP, "web-udp"))
    pods = [Pod("ns1", "a", {"app": "web"}, "node1", both),
            Pod("ns1", "b", {"app": "web"}, "node2", (ContainerPort(8080, UDP, "web-udp"),))]
    v = view(pods, [svc])
    text = NftablesDataplane().render(v)
    vip = v.services[0].cluster_ip
    assert go(text, CLIENT_POD, vip, 80).endpoints() == pytest.approx({"198.18.129.2:8080": 1.0})
    assert go(text, CLIENT_POD, vip, 80, proto="udp").endpoints() == pytest.approx(
        {"198.18.129.2:8080": 0.5, "198.18.130.2:8080": 0.5})


def test_hairpin_pod_reaching_itself_is_masqueraded():
    v = view(backends(2), [web()])
    vip = v.service("ns1/svc1:p80").cluster_ip
    me = "198.18.129.2"
    r = go(NftablesDataplane().render(v), me, vip, 80)
    by_dest = {o.to: o for o in r.outcomes}
    assert by_dest[f"{me}:8080"].masquerade is True  # else its reply would bypass the DNAT
    assert by_dest["198.18.130.2:8080"].masquerade is False


def test_service_without_endpoints_rejects_pods_and_node_processes():
    svc = Service("ns1", "empty", ports=(ServicePort(80, name="http"),), selector={"app": "none"})
    v = view(backends(2), [svc])
    text = NftablesDataplane().render(v)
    vip = v.services[0].cluster_ip
    assert go(text, CLIENT_POD, vip, 80).verdicts() == {"REJECT"}
    assert go(text, NODE1_IP, vip, 80, from_node=True).verdicts() == {"REJECT"}
    assert f"no-endpoint-services-reject {{ {vip} . tcp . 80 }}" in text


def test_terminating_endpoints_serve_when_none_is_ready():
    pods = [replace(p, terminating=True) for p in backends(2)]
    v = view(pods, [web()])
    r = go(NftablesDataplane().render(v), CLIENT_POD, v.services[0].cluster_ip, 80)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.130.2:8080": 0.5})


def test_internal_traffic_policy_local():
    v = view(backends(2, nodes=("node2",)), [web(internal_traffic_policy=POLICY_LOCAL)])
    vip = v.services[0].cluster_ip
    assert go(NftablesDataplane().render(v), CLIENT_POD, vip, 80).verdicts() == {"DROP"}
    v2 = view(backends(4), [web(internal_traffic_policy=POLICY_LOCAL)])
    r = go(NftablesDataplane().render(v2), CLIENT_POD, v2.services[0].cluster_ip, 80)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.129.3:8080": 0.5})


# --------------------------------------------------------------------------- affinity


def test_client_ip_affinity_remembers_the_chosen_slot():
    v = view(backends(3), [web(session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=600)])
    sp = v.services[0]
    text = NftablesDataplane().render(v)
    assert "timeout 600s" in text and "cluster-ip-tcp-3-affinity-600" in text
    fresh = go(text, CLIENT_POD, sp.cluster_ip, 80)
    assert fresh.endpoints() == pytest.approx(THREE)
    slots = {}
    for o in fresh.outcomes:
        (key,) = o.recorded  # the fresh choice records client . VIP . port . slot
        assert key[:3] == (CLIENT_POD, sp.cluster_ip, "80")
        slots[o.to] = key
    assert len(set(slots.values())) == 3
    target = "198.18.130.2:8080"
    again = go(text, CLIENT_POD, sp.cluster_ip, 80, remembered=[slots[target]])
    assert [(o.to, o.probability) for o in again.outcomes] == [(target, 1.0)]
    assert again.outcomes[0].recorded == (slots[target],)  # the hit refreshes the timeout
    other = go(text, "198.18.129.201", sp.cluster_ip, 80, remembered=[slots[target]])
    assert other.endpoints() == pytest.approx(THREE)


def test_udp_affinity_keeps_its_own_remembered_slots():
    svc = Service("ns1", "dns", ports=(ServicePort(53, UDP, "dns", 8080),), selector={"app": "web"},
                  session_affinity=AFFINITY_CLIENT_IP)
    v = view(backends(2), [svc])
    r = go(NftablesDataplane().render(v), CLIENT_POD, v.services[0].cluster_ip, 53, proto="udp")
    slots = sorted(int(o.recorded[0][3]) for o in r.outcomes)
    assert slots == [AFFINITY_UDP, AFFINITY_UDP + 1]  # TCP on the same VIP:port stays apart


def test_sctp_service_port_has_its_own_endpoint_maps_and_affinity_slots():
    port = ServicePort(9, SCTP, "sig", 9999, node_port=30009)
    svc = Service("ns1", "sig", ports=(port,), selector={"app": "web"}, type=TYPE_NODE_PORT,
                  session_affinity=AFFINITY_CLIENT_IP)
    v = view(backends(2), [svc])
    text = NftablesDataplane().render(v)
    assert "ip daddr . sctp dport" in text and "goto cluster-ip-sctp\n" in text
    assert f"cluster-ip-sctp-2-affinity-10800 {{ {v.services[0].cluster_ip} . 9 }}" in text
    halves = {"198.18.129.2:9999": 0.5, "198.18.130.2:9999": 0.5}
    r = go(text, CLIENT_POD, v.services[0].cluster_ip, 9, proto="sctp")
    assert r.endpoints() == pytest.approx(halves)
    slots = sorted(int(o.recorded[0][3]) for o in r.outcomes)
    assert slots == [AFFINITY_SCTP, AFFINITY_SCTP + 1]  # apart from TCP and UDP on 9
    outside = go(text, EXTERNAL_CLIENT, NODE1_IP, 30009, proto="sctp")
    assert outside.endpoints() == pytest.approx(halves) and outside.masquerade is True
    # TCP 9 is not the Service's: kube-proxy's cluster-ips-check rejects it.
    assert go(text, CLIENT_POD, v.services[0].cluster_ip, 9).verdicts() == {"REJECT"}


def test_affinity_on_a_node_port_masquerades_and_remembers():
    svc = web(type=TYPE_NODE_PORT, node_port=30000, session_affinity=AFFINITY_CLIENT_IP)
    text = script(backends(2), [svc])
    r = go(text, EXTERNAL_CLIENT, NODE1_IP, 30000)
    assert len(r.endpoints()) == 2 and r.masquerade is True
    assert all(o.recorded[0][:3] == (EXTERNAL_CLIENT, NODE1_IP, "30000") for o in r.outcomes)


# --------------------------------------------------------------------------- NodePort


def test_node_port_cluster_policy_masquerades_to_any_endpoint():
    v = view(backends(3), [web(type=TYPE_NODE_PORT, node_port=30000)])
    r = go(NftablesDataplane().render(v), EXTERNAL_CLIENT, NODE1_IP, 30000)
    assert r.endpoints() == pytest.approx(THREE)
    assert r.masquerade is True
    assert go(NftablesDataplane().render(v), EXTERNAL_CLIENT, NODE1_IP, 30001).verdicts() == {
        "ACCEPT"}


def test_node_port_local_policy_keeps_client_ip_and_uses_local_endpoints():
    svc = web(type=TYPE_NODE_PORT, node_port=30000, external_traffic_policy=POLICY_LOCAL)
    text = script(backends(3), [svc])
    r = go(text, EXTERNAL_CLIENT, NODE1_IP, 30000)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.129.3:8080": 0.5})
    assert r.masquerade is False
    # A pod reaching the NodePort is short-circuited to every endpoint, as kube-proxy does.
    pod = go(text, CLIENT_POD, NODE1_IP, 30000)
    assert pod.endpoints() == pytest.approx(THREE) and pod.masquerade is False
    # So is the node itself, masqueraded since its source is the node IP.
    node = go(text, NODE1_IP, NODE1_IP, 30000, from_node=True)
    assert node.endpoints() == pytest.approx(THREE) and node.masquerade is True
    assert "node-port-tcp-local-2-cluster-3-endpoints { 30000 . 0 :" in text
    assert f"30000 . {SHORT_CIRCUIT_BASE} :" in text


def test_node_port_local_policy_without_local_endpoint_drops_external_clients():
    svc = web(type=TYPE_NODE_PORT, node_port=30000, external_traffic_policy=POLICY_LOCAL)
    text = script(backends(2, nodes=("node2",)), [svc])
    assert go(text, EXTERNAL_CLIENT, NODE1_IP, 30000).verdicts() == {"DROP"}
    assert go(text, CLIENT_POD, NODE1_IP, 30000).endpoints() == pytest.approx(
        {"198.18.130.2:8080": 0.5, "198.18.130.3:8080": 0.5}
    )
    node = go(text, NODE1_IP, NODE1_IP, 30000, from_node=True)
    assert node.verdicts() == {"DNAT"}, "filter-output runs after DNAT: the node is served"


def test_node_port_without_endpoints_rejects():
    text = script([], [web(type=TYPE_NODE_PORT, node_port=30001)])
    assert go(text, EXTERNAL_CLIENT, NODE1_IP, 30001).verdicts() == {"REJECT"}
    assert go(text, NODE1_IP, NODE1_IP, 30001, from_node=True).verdicts() == {"REJECT"}


# --------------------------------------------------------------------------- externalIPs


def test_external_ip_is_served_with_masquerade():
    text = script(backends(2), [web(external_ips=("198.18.64.10",))])
    r = go(text, EXTERNAL_CLIENT, "198.18.64.10", 80)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.130.2:8080": 0.5})
    assert r.masquerade is True
    assert go(text, EXTERNAL_CLIENT, "198.18.64.10", 81).verdicts() == {"ACCEPT"}


def test_external_ip_without_endpoints_rejects():
    text = script([], [web(external_ips=("198.18.64.10",))])
    assert go(text, EXTERNAL_CLIENT, "198.18.64.10", 80).verdicts() == {"REJECT"}


def test_external_ip_local_policy_keeps_client_ip():
    svc = web(external_ips=("198.18.64.10",), external_traffic_policy=POLICY_LOCAL)
    r = go(script(backends(2), [svc]), EXTERNAL_CLIENT, "198.18.64.10", 80)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 1.0})
    assert r.masquerade is False


# --------------------------------------------------------------------------- slots


def ep(i: int) -> EndpointView:
    return EndpointView(f"198.18.129.{i}", 8080, "node1", True)


def test_slots_keep_their_endpoint_and_holes_are_filled():
    before = [f"198.18.129.{i} . 8080" for i in (2, 3, 4)]  # the slots' values
    assert assign_slots(None, [ep(2), ep(3)]) == [ep(2), ep(3)]
    assert assign_slots(before, [ep(2), ep(3), ep(4)]) == [ep(2), ep(3), ep(4)]
    # ep(3) leaves and ep(9) arrives: ep(9) takes the hole, nobody else moves.
    assert assign_slots(before, [ep(2), ep(4), ep(9)]) == [ep(2), ep(9), ep(4)]
    # A hole with nothing new takes the last endpoint.
    assert assign_slots(before, [ep(2), ep(4)]) == [ep(2), ep(4)]
    assert assign_slots(before, [ep(3), ep(4)]) == [ep(4), ep(3)]
    assert assign_slots(before, [ep(4)]) == [ep(4)]
    assert assign_slots(before, []) == []
    assert assign_slots(before, [ep(2), ep(3), ep(4), ep(5)])[3] == ep(5)


# --------------------------------------------------------------------------- incremental


def same(a: Mirror, b: Mirror) -> bool:
    """Two mirrors hold the same table: chains and rules, and every element (idle classes,
    which forward nothing, purged first, as a full sync purges them)."""
    a.purge_idle()
    b.purge_idle()

    def layout(m: Mirror) -> list[str]:
        return [line for line in m.script().splitlines() if "element" not in line]

    return layout(a) == layout(b) and a.table_elements() == b.table_elements()


def step(mirror: Mirror, v) -> tuple[Mirror, object]:
    """The mirror's transaction towards view v, as a sync makes it."""
    delta = mirror.apply(*mirror.changes(v.services), order=v.services)
    return mirror, delta


def test_update_touches_only_the_changed_service():
    pods = backends(4)
    services = [web(f"s{i}") for i in range(50)]
    v1 = view(pods, services)
    mirror = render_table(v1)
    old = mirror.table_elements()
    _, nothing = step(mirror, view(pods, services))
    assert nothing.script() == "" and nothing.services == []
    # s7 selects a new app, with one pod.
    services2 = list(services)
    services2[7] = web("s7", app="other")
    other = [*pods, Pod("ns1", "x", {"app": "other"}, "node2", pods[0].ports)]
    v2 = view(other, services2)
    _, delta = step(mirror, v2)
    assert [k[1] for k in delta.services] == ["s7"]
    vip = v2.service("ns1/s7:p80").cluster_ip
    lines = delta.script().splitlines()
    assert all(vip in line for line in lines if "element" in line and "hairpin" not in line)
    # A class never seen: its set, its chain, its rule in the ClusterIP TCP chain.
    t = "ip kube-proxy"
    assert [line for line in lines if "element" not in line] == [
        f"add set {t} cluster-ip-tcp-1 {{ typeof ip daddr . th dport ; }}",
        f"add map {t} cluster-ip-tcp-1-endpoints {{ typeof ip daddr . th dport . "
        "numgen random mod 1 : ip daddr . tcp dport ; }",
        f"add chain {t} cluster-ip-tcp-1",
        f"add rule {t} cluster-ip-tcp-1 ip saddr != 198.18.128.0/17 "
        "meta mark set meta mark or 0x4000",
        f"add rule {t} cluster-ip-tcp-1 meta l4proto tcp dnat to ip daddr . th dport "
        ". numgen random mod 1 map @cluster-ip-tcp-1-endpoints",
        # appended: the other classes' rules are not bound again (that walks their members)
        f"add rule {t} cluster-ip-tcp ip daddr . th dport @cluster-ip-tcp-1 goto cluster-ip-tcp-1",
    ]
    assert same(mirror, render_table(v2))
    # Back again: the class, emptied, stays idle (no chain rewritten) until a full sync
    # purges it, after the elements.
    _, undo = step(mirror, v1)
    assert not [line for line in undo.script().splitlines() if "element" not in line]
    assert mirror.idle == {"cluster-ip-tcp-1"}
    assert mirror.purge_idle().splitlines()[-3:] == [
        f"delete chain {t} cluster-ip-tcp-1", f"delete set {t} cluster-ip-tcp-1",
        f"delete map {t} cluster-ip-tcp-1-endpoints"]
    assert mirror.table_elements() == old and same(mirror, render_table(v1))


def placed(n: int) -> list[Pod]:
    """Pods with their addresses fixed, so a subset keeps them."""
    return list(ClusterState.build(NODES, backends(n)).pods)


def test_removed_services_and_endpoints_leave_the_maps():
    pods = placed(3)  # slots of a: web-0 129.2, web-2 129.3, web-1 130.2
    mirror = render_table(view(pods, [web("a"), web("b")]))
    b = mirror.views["ns1", "b", "p80", "TCP", 80].cluster_ip
    _, delta = step(mirror, view(pods[:2], [web("a")]))  # web-2 and b leave
    # Both leave the 3-endpoint class: their members and 3 slots each are deleted, and the
    # class, emptied, stays idle until a full sync; deleted besides: web-2's hairpin pair
    # and b's ClusterIP. Added: a in the 2-endpoint class, and its 2 slots.
    assert delta.counts() == (1 + 2, 2 + 6 + 1 + 1)  # (added, deleted)
    assert delta.deleted == [] and mirror.idle == {"cluster-ip-tcp-3"}
    assert "198.18.129.3 . 198.18.129.3" not in mirror.hairpin
    assert b not in mirror.cluster_ips
    assert f"delete element ip kube-proxy cluster-ips {{ {b} }}" in delta.script()


def test_endpoint_changes_within_classes_in_use_write_only_elements():
    """Nothing a Service's change writes makes the kernel walk a per-Service verdict map
    (there is none); once its classes are in use it writes no rule either."""
    pods = placed(4)
    keep = [web("k2", app="two"), web("k3", app="three")]  # keep the 2 and 3 classes in use
    two = [Pod("ns1", f"t{i}", {"app": "two"}, "node2", pods[0].ports) for i in range(2)]
    three = [Pod("ns1", f"h{i}", {"app": "three"}, "node2", pods[0].ports) for i in range(3)]
    mirror = render_table(view([*pods[:3], *two, *three], [web("a"), *keep]))
    for chosen in (pods[1:], pods[:2], pods[2:], pods[:3]):
        _, delta = step(mirror, view([*chosen, *two, *three], [web("a"), *keep]))
        text = delta.script()
        assert text and all(line.startswith(("add element", "delete element"))
                            for line in text.splitlines()), text
        assert "goto" not in text and "jump" not in text


def test_stale_affinity_names_slots_whose_endpoint_changed():
    pods = placed(3)
    sticky = web("a", session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=60)
    mirror = render_table(view(pods, [sticky]))
    _, delta = step(mirror, view(pods[1:], [sticky]))  # web-0 (slot 0) leaves
    ((where, slots),) = delta.stale.items()
    assert where[0] == "tcp" and slots == {0, 2}  # slot 2 moved to slot 0
    _, delta2 = step(mirror, view(pods[1:], [web("a")]))
    assert delta2.stale == {where: {0, 1}}


def test_colliding_load_balancer_ips_go_to_the_first_service_whatever_the_history():
    """Two Services with one load-balancer IP and port: the frontend is the one of the
    smaller (namespace, name, port), in a full render and after any updates alike."""
    pods = placed(3)
    a = web("a", **LOAD_BALANCER)
    b = web("b", app="other", **{**LOAD_BALANCER, "node_port": 30002})
    others = [*pods, Pod("ns1", "o", {"app": "other"}, "node2", pods[0].ports)]
    both = view(others, [a, b])
    mirror = render_table(view(others, [b]))
    _, delta = step(mirror, both)  # a arrives: the LB IP's slots change hands
    assert same(mirror, render_table(both))
    assert delta.touched[("external-ip-tcp-3-endpoints", f"{LB_IP} . 80 . 0")][1] in {
        f"{p.ip} . 8080" for p in pods}
    assert ("external-ip-tcp-1", f"{LB_IP} . 80") in delta.touched  # b's class: left
    step(mirror, view(others, [b]))  # a leaves: b's frontend comes back
    assert same(mirror, render_table(view(others, [b])))


def test_load_balancer_source_ranges_change_incrementally():
    pods = backends(2)
    mirror = render_table(view(pods, [web(**LOAD_BALANCER,
                                          load_balancer_source_ranges=("198.18.0.200/32",))]))
    _, delta = step(mirror, view(pods, [web(**LOAD_BALANCER,
                                            load_balancer_source_ranges=("198.18.2.0/24",))]))
    text = delta.script()
    assert f"delete element ip kube-proxy firewall-sources {{ {LB_IP} . tcp . 80 . " \
           "198.18.0.200/32 }" in text
    assert f"add element ip kube-proxy firewall-sources {{ {LB_IP} . tcp . 80 . " \
           "198.18.2.0/24 : return }" in text
    step(mirror, view(pods, [web(**LOAD_BALANCER)]))
    elements = mirror.table_elements()
    assert elements["firewall-ips"] == {} and elements["firewall-sources"] == {}


# --------------------------------------------------------------------------- tracer


def test_tracer_refuses_what_it_does_not_model():
    with pytest.raises(TraceError):
        Table.parse("add rule ip t nowhere accept\n")
    text = "add chain ip t c { type nat hook prerouting priority dstnat ; }\n" \
           "add rule ip t c tcp flags syn accept\n"
    with pytest.raises(TraceError):
        trace(text, "1.1.1.1", "2.2.2.2", "tcp", 1)


# --------------------------------------------------------------------------- both policies Local


def test_both_policies_local_as_kube_proxy():
    trace_both_local(NftablesDataplane().render, go, from_node=True)
    pods = backends(2, nodes=("node2",))
    elements = render_table(view(pods, [web(**BOTH_LOCAL)])).table_elements()
    assert elements["no-endpoint-services-drop"] and elements["no-endpoint-nodeports-drop"]
    assert not elements["no-endpoint-services-reject"]
    assert not elements["no-endpoint-nodeports-reject"]
    # A node process is rejected too when there is no endpoint at all (filter-output).
    text = script([], [web(**BOTH_LOCAL)])
    vip = view([], [web(**BOTH_LOCAL)]).services[0].cluster_ip
    assert go(text, NODE1_IP, vip, 80, from_node=True).verdicts() == {"REJECT"}
    assert go(text, NODE1_IP, NODE1_IP, 30000, from_node=True).verdicts() == {"REJECT"}


# --------------------------------------------------------------------------- load balancers


def test_load_balancer_ips_as_kube_proxy():
    trace_load_balancer(NftablesDataplane().render, go, from_node=True)


def test_load_balancer_source_ranges_fill_the_firewall_maps():
    plain = render_table(view(backends(2), [web(**LOAD_BALANCER)])).table_elements()
    assert f"{LB_IP} . 80" in plain["external-ip-tcp-2"]
    assert plain["firewall-ips"] == {} and plain["firewall-sources"] == {}

    ranges = ("198.18.0.200/32", "198.18.1.0/24", "198.18.1.128/25")
    lb = web(**LOAD_BALANCER, load_balancer_source_ranges=ranges)
    maps = render_table(view(backends(2), [lb])).table_elements()
    key = f"{LB_IP} . tcp . 80"
    assert maps["firewall-ips"] == {key: None}
    # Overlapping networks merged: an interval map may refuse them.
    assert maps["firewall-sources"] == {f"{key} . 198.18.0.200/32": "return",
                                        f"{key} . 198.18.1.0/24": "return"}
    # The NodePort is not filtered.
    assert "30001" in maps["node-port-tcp-2"]
    # A range holding the node's address admits the LB IP itself, as kube-proxy does.
    maps = render_table(view(backends(2), [web(**LOAD_BALANCER, load_balancer_source_ranges=(
        "198.18.0.0/24",))])).table_elements()
    assert set(maps["firewall-sources"]) == {f"{key} . 198.18.0.0/24", f"{key} . {LB_IP}/32"}
