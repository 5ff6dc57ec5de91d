"""The iptables data plane's rules, checked by tracing packets through what it renders.

No root needed: render() is pure, and dataplanes.iptrace follows a packet through the
payload the way netfilter would (kube-proxy's proxier tests work the same way).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from dataplanes.iptables import (
    IptablesDataplane,
    endpoint_chain,
    external_chain,
    firewall_chain,
    port_proto_hash,
    probability,
    render_ruleset,
    service_chain,
)
from dataplanes.iptrace import TraceError, parse_rule, trace
from kube.model import (
    AFFINITY_CLIENT_IP,
    POLICY_LOCAL,
    SCTP,
    TYPE_NODE_PORT,
    UDP,
    Service,
    ServicePort,
)
from tests.scenarios import (
    BOTH_LOCAL,
    CLIENT_POD,
    EXTERNAL_CLIENT,
    LB_IP,
    LOAD_BALANCER,
    NODE1_IP,
    backends,
    trace_both_local,
    trace_load_balancer,
    view,
    web,
)


def payload(pods, services, node: str = "node1") -> str:
    return IptablesDataplane().render(view(pods, services, node))


def go(text: str, src: str, dst: str, dport: int, proto: str = "tcp", **kw):
    return trace(text, src, dst, proto, dport, local_addrs=[NODE1_IP], **kw)


# --------------------------------------------------------------------------- names


def test_chain_names_are_kube_proxys():
    v = view(backends(1), [web()])
    sp = v.service("ns1/svc1:p80")
    assert service_chain(sp) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    # Names every real cluster shows for its API server and DNS Services.
    assert port_proto_hash("default/kubernetes:https", "tcp") == "NPX46M4PTMTKRN6Y"
    assert port_proto_hash("kube-system/kube-dns:dns", "udp") == "TCOU7JCQXEZGVUNU"
    assert port_proto_hash("kube-system/kube-dns:dns-tcp", "tcp") == "ERIFXISQEP7F7OF4"
    text = IptablesDataplane().render(v)
    assert ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]" in text
    sep = endpoint_chain(sp, sp.internal_endpoints[0])
    assert sep.startswith("KUBE-SEP-") and len(sep) == len("KUBE-SEP-") + 16
    assert f"-j DNAT --to-destination {sp.internal_endpoints[0].addr}" in text


def test_probabilities_are_formatted_like_kube_proxy():
    assert [probability(n) for n in (4, 3, 2)] == ["0.2500000000", "0.3333333333", "0.5000000000"]
    rs = render_ruleset(view(backends(3), [web()]))
    rules = rs.nat["KUBE-SVC-XPGD46QRK7WJZT7O"]
    assert "--probability 0.3333333333" in rules[1]
    assert "--probability 0.5000000000" in rules[2]
    assert "statistic" not in rules[3]  # the last endpoint takes what is left


# --------------------------------------------------------------------------- ClusterIP


def test_pod_to_cluster_ip_reaches_each_endpoint_equally_without_masquerade():
    v = view(backends(3), [web()])
    vip = v.service("ns1/svc1:p80").cluster_ip
    r = go(IptablesDataplane().render(v), CLIENT_POD, vip, 80)
    assert r.verdicts() == {"DNAT"}
    assert r.endpoints() == pytest.approx(
        {"198.18.129.2:8080": 1 / 3, "198.18.130.2:8080": 1 / 3, "198.18.129.3:8080": 1 / 3}
    )
    assert r.masquerade is False  # the backend must see the pod's own IP


def test_node_process_to_cluster_ip_is_masqueraded():
    v = view(backends(3), [web()])
    vip = v.service("ns1/svc1:p80").cluster_ip
    r = go(IptablesDataplane().render(v), NODE1_IP, vip, 80, hook="OUTPUT")
    assert set(r.endpoints()) == {"198.18.129.2:8080", "198.18.130.2:8080", "198.18.129.3:8080"}
    assert r.masquerade is True


def test_other_ports_and_addresses_are_left_alone():
    v = view(backends(2), [web()])
    text = IptablesDataplane().render(v)
    vip = v.service("ns1/svc1:p80").cluster_ip
    for dst, port, proto in ((vip, 81, "tcp"), (vip, 80, "udp"), ("198.18.130.2", 8080, "tcp")):
        r = go(text, CLIENT_POD, dst, port, proto=proto)
        assert r.verdicts() == {"ACCEPT"} and r.masquerade is False, (dst, port, proto)


def test_udp_service_port():
    svc = Service("ns1", "dns", ports=(ServicePort(53, UDP, "dns", 8080),), selector={"app": "web"})
    v = view(backends(2), [svc])
    r = go(IptablesDataplane().render(v), CLIENT_POD, v.services[0].cluster_ip, 53, proto="udp")
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.130.2:8080": 0.5})


def test_sctp_service_port_renders_like_kube_proxy():
    port = ServicePort(9, SCTP, "sig", 9999, node_port=30009)
    svc = Service("ns1", "sig", ports=(port,), selector={"app": "web"}, type=TYPE_NODE_PORT)
    v = view(backends(2), [svc])
    text = IptablesDataplane().render(v)
    assert "-p sctp -m comment --comment \"ns1/sig:sig cluster IP\" -m sctp --dport 9 " in text
    halves = {"198.18.129.2:9999": 0.5, "198.18.130.2:9999": 0.5}
    vip = v.services[0].cluster_ip
    assert go(text, CLIENT_POD, vip, 9, proto="sctp").endpoints() == pytest.approx(halves)
    assert go(text, EXTERNAL_CLIENT, NODE1_IP, 30009, proto="sctp").endpoints() == pytest.approx(
        halves)
    assert go(text, CLIENT_POD, vip, 9, proto="tcp").verdicts() == {"ACCEPT"}  # SCTP only


def test_hairpin_pod_reaching_itself_is_masqueraded():
    v = view(backends(2), [web()])
    vip = v.service("ns1/svc1:p80").cluster_ip
    me = "198.18.129.2"
    r = go(IptablesDataplane().render(v), me, vip, 80)
    by_dest = {o.to: o for o in r.outcomes}
    assert by_dest[f"{me}:8080"].masquerade is True  # else its reply would bypass the DNAT
    assert by_dest["198.18.130.2:8080"].masquerade is False


def test_service_without_endpoints_rejects_pods_and_node_processes():
    svc = Service("ns1", "empty", ports=(ServicePort(80, name="http"),), selector={"app": "none"})
    v = view(backends(2), [svc])
    text = IptablesDataplane().render(v)
    vip = v.services[0].cluster_ip
    assert go(text, CLIENT_POD, vip, 80).verdicts() == {"REJECT"}
    assert go(text, NODE1_IP, vip, 80, hook="OUTPUT").verdicts() == {"REJECT"}
    assert "icmp-port-unreachable" in text


def test_terminating_endpoints_serve_when_none_is_ready():
    pods = [replace(p, terminating=True) for p in backends(2)]
    v = view(pods, [web()])
    r = go(IptablesDataplane().render(v), CLIENT_POD, v.services[0].cluster_ip, 80)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.130.2:8080": 0.5})


def test_internal_traffic_policy_local_without_local_endpoint_drops():
    v = view(backends(2, nodes=("node2",)), [web(internal_traffic_policy=POLICY_LOCAL)])
    vip = v.services[0].cluster_ip
    assert go(IptablesDataplane().render(v), CLIENT_POD, vip, 80).verdicts() == {"DROP"}
    v2 = view(backends(4), [web(internal_traffic_policy=POLICY_LOCAL)])
    r = go(IptablesDataplane().render(v2), CLIENT_POD, v2.services[0].cluster_ip, 80)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.129.3:8080": 0.5})


# --------------------------------------------------------------------------- affinity


def test_client_ip_affinity_remembers_the_chosen_endpoint():
    v = view(backends(3), [web(session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=600)])
    sp = v.services[0]
    text = IptablesDataplane().render(v)
    seps = {e.addr: endpoint_chain(sp, e) for e in sp.internal_endpoints}
    assert all(f"--rcheck --seconds 600 --reap -j {c}" in text for c in seps.values())
    fresh = go(text, CLIENT_POD, sp.cluster_ip, 80)
    assert fresh.endpoints() == pytest.approx(dict.fromkeys(seps, 1 / 3))
    for o in fresh.fresh():  # the SEP chain records the client in its own list
        assert o.recorded == (seps[o.to],)
    assert fresh.remembered() == {chain: addr for addr, chain in seps.items()}
    # A client the kernel remembers for one endpoint goes there, every time.
    target = "198.18.130.2:8080"
    again = go(text, CLIENT_POD, sp.cluster_ip, 80, recent_state={seps[target]: [CLIENT_POD]})
    assert [(o.to, o.probability) for o in again.outcomes] == [(target, 1.0)]


# --------------------------------------------------------------------------- NodePort


def test_node_port_cluster_policy_masquerades_to_any_endpoint():
    v = view(backends(3), [web(type=TYPE_NODE_PORT, node_port=30000)])
    r = go(IptablesDataplane().render(v), EXTERNAL_CLIENT, NODE1_IP, 30000)
    assert len(r.endpoints()) == 3 and sum(r.endpoints().values()) == pytest.approx(1)
    assert r.masquerade is True


def test_node_port_local_policy_keeps_client_ip_and_uses_local_endpoints():
    svc = web(type=TYPE_NODE_PORT, node_port=30000, external_traffic_policy=POLICY_LOCAL)
    text = payload(backends(3), [svc])
    r = go(text, EXTERNAL_CLIENT, NODE1_IP, 30000)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.129.3:8080": 0.5})
    assert r.masquerade is False
    # A pod reaching the NodePort is short-circuited to every endpoint, as kube-proxy does.
    pod = go(text, CLIENT_POD, NODE1_IP, 30000)
    assert len(pod.endpoints()) == 3 and pod.masquerade is False
    # So is the node itself, masqueraded since its source is the node IP.
    node = go(text, NODE1_IP, NODE1_IP, 30000, hook="OUTPUT")
    assert len(node.endpoints()) == 3 and node.masquerade is True


def test_node_port_local_policy_without_local_endpoint_drops_external_clients():
    svc = web(type=TYPE_NODE_PORT, node_port=30000, external_traffic_policy=POLICY_LOCAL)
    text = payload(backends(2, nodes=("node2",)), [svc])
    assert go(text, EXTERNAL_CLIENT, NODE1_IP, 30000).verdicts() == {"DROP"}
    assert go(text, CLIENT_POD, NODE1_IP, 30000).endpoints() == pytest.approx(
        {"198.18.130.2:8080": 0.5, "198.18.130.3:8080": 0.5}
    )


def test_node_port_without_endpoints_rejects():
    svc = web(type=TYPE_NODE_PORT, node_port=30001)
    text = payload([], [svc])
    assert go(text, EXTERNAL_CLIENT, NODE1_IP, 30001).verdicts() == {"REJECT"}


# --------------------------------------------------------------------------- externalIPs


def test_external_ip_is_served_with_masquerade():
    svc = web(external_ips=("198.18.64.10",))
    text = payload(backends(2), [svc])
    r = go(text, EXTERNAL_CLIENT, "198.18.64.10", 80)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 0.5, "198.18.130.2:8080": 0.5})
    assert r.masquerade is True
    assert go(text, EXTERNAL_CLIENT, "198.18.64.10", 81).verdicts() == {"ACCEPT"}


def test_external_ip_without_endpoints_rejects():
    svc = web(external_ips=("198.18.64.10",))
    text = payload([], [svc])
    assert go(text, EXTERNAL_CLIENT, "198.18.64.10", 80).verdicts() == {"REJECT"}


def test_external_ip_local_policy_keeps_client_ip():
    svc = web(external_ips=("198.18.64.10",), external_traffic_policy=POLICY_LOCAL)
    r = go(payload(backends(2), [svc]), EXTERNAL_CLIENT, "198.18.64.10", 80)
    assert r.endpoints() == pytest.approx({"198.18.129.2:8080": 1.0})
    assert r.masquerade is False


# --------------------------------------------------------------------------- payload shape


def test_payload_is_a_noflush_restore_of_kube_chains_only():
    text = payload(backends(3), [web(type=TYPE_NODE_PORT, node_port=30000)])
    assert text.startswith("*filter\n") and text.endswith("COMMIT\n")
    assert text.count("COMMIT") == 2 and "*nat\n" in text
    for line in text.splitlines():
        if line.startswith((":", "-A")):
            assert line.lstrip(":").split()[0 if line[0] == ":" else 1].startswith("KUBE-"), line
    nat_services = [x for x in text.splitlines() if x.startswith("-A KUBE-SERVICES")][-1]
    assert "-m addrtype --dst-type LOCAL" in nat_services and nat_services.endswith(
        "-j KUBE-NODEPORTS"
    )
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000" in text
    assert "-j MASQUERADE --random-fully" in text


def test_large_clusters_drop_endpoint_comments():
    pods = backends(40)
    services = [
        Service(
            "ns1",
            f"s{i}",
            ports=(ServicePort(80, name="http", target_port=8080),),
            selector={"app": "web"},
        )
        for i in range(30)
    ]  # 1,200 endpoint chains: above kube-proxy's 1,000
    rs = render_ruleset(view(pods, services))
    seps = [rules for name, rules in rs.nat.items() if name.startswith("KUBE-SEP-")]
    assert seps and all("--comment" not in r for rules in seps for r in rules)
    small = render_ruleset(view(backends(2), [web()]))
    assert any("--comment" in r for n, rules in small.nat.items() if "SEP" in n for r in rules)


def test_tracer_refuses_what_it_does_not_model():
    with pytest.raises(TraceError):
        parse_rule("-A X -m string --string foo -j DROP")
    with pytest.raises(TraceError):
        trace(
            "*nat\n:X - [0:0]\n-A KUBE-SERVICES -j NOWHERE\nCOMMIT\n",
            "1.1.1.1",
            "2.2.2.2",
            "tcp",
            1,
            hooks={("nat", "PREROUTING"): ["-A PREROUTING -j KUBE-SERVICES"]},
        )


# --------------------------------------------------------------------------- both policies Local


def test_both_policies_local_as_kube_proxy():
    trace_both_local(IptablesDataplane().render, go, hook="OUTPUT")
    remote_only = payload(backends(2, nodes=("node2",)), [web(**BOTH_LOCAL)])
    assert "has no endpoints" not in remote_only
    assert '"ns1/svc1:p80 has no local endpoints"' in remote_only


# --------------------------------------------------------------------------- load balancers


def test_load_balancer_ips_as_kube_proxy():
    trace_load_balancer(IptablesDataplane().render, go, hook="OUTPUT")


def test_load_balancer_source_ranges_use_a_firewall_chain():
    plain = render_ruleset(view(backends(2), [web(**LOAD_BALANCER)]))
    sp = view(backends(2), [web(**LOAD_BALANCER)]).services[0]
    ext, fw = external_chain(sp), firewall_chain(sp)
    lb_rules = [r for r in plain.nat["KUBE-SERVICES"] if f"-d {LB_IP}/32" in r]
    assert len(lb_rules) == 1 and lb_rules[0].endswith(f"-j {ext}")
    assert fw not in plain.nat and plain.filter["KUBE-PROXY-FIREWALL"] == []

    ranges = ("198.18.0.200/32", "198.18.1.0/24")
    rs = render_ruleset(view(backends(2), [web(**LOAD_BALANCER, load_balancer_source_ranges=ranges)]))
    lb_rules = [r for r in rs.nat["KUBE-SERVICES"] if f"-d {LB_IP}/32" in r]
    assert len(lb_rules) == 1 and lb_rules[0].endswith(f"-j {fw}")
    tag = '-m comment --comment "ns1/svc1:p80 loadbalancer IP"'
    assert rs.nat[fw] == [
        f"-A {fw} {tag} -s 198.18.0.200/32 -j {ext}",
        f"-A {fw} {tag} -s 198.18.1.0/24 -j {ext}",
        f'-A {fw} -m comment --comment "other traffic to ns1/svc1:p80 will be dropped by '
        'KUBE-PROXY-FIREWALL"',
    ]
    assert rs.filter["KUBE-PROXY-FIREWALL"] == [
        f"-A KUBE-PROXY-FIREWALL -d {LB_IP}/32 -p tcp -m comment --comment "
        f'"ns1/svc1:p80 traffic not accepted by {fw}" -m tcp --dport 80 -j DROP'
    ]
    # The NodePort goes straight to the EXT chain.
    assert any(r.endswith(f"--dport 30001 -j {ext}") for r in rs.nat["KUBE-NODEPORTS"])
    # A range holding the node's address lets the LB IP itself in as a source, as kube-proxy.
    rs = render_ruleset(view(backends(2), [web(**LOAD_BALANCER,
                                               load_balancer_source_ranges=("198.18.0.0/24",))]))
    assert f"-A {fw} {tag} -s {LB_IP}/32 -j {ext}" in rs.nat[fw]
