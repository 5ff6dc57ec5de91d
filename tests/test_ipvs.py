"""The IPVS data plane: what it computes (host, no root) and what it does (inside a guest kernel).

This host's kernel has no IPVS, so the integration tests (`test_guest_*`) run inside one
User-Mode-Linux guest that `test_ipvs_in_guest` boots for the whole module: it runs this
file's guest tests with pytest in the guest and passes when they pass. There they drive a
real two-node NetnsCluster with echo backends and real TCP/UDP traffic.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import replace

import pytest

from dataplanes.base import DataplaneError, Host
from dataplanes.ipvs import IpvsDataplane
from dataplanes.ipvs_codec import (
    CMD_DEL_SERVICE,
    CMD_NEW_DEST,
    CMD_NEW_SERVICE,
    IPSET_CMD_ADD,
    changes_to_messages,
    dest,
    encode_request,
    ipset_request,
    parse_dest,
    parse_service,
    service_full,
)
from dataplanes.ipvs_kernel import IpvsNetlink
from dataplanes.ipvs_layout import (
    IPSETS,
    KUBE_CLUSTER_IP,
    KUBE_DROP_CLUSTER_IP,
    KUBE_DROP_EXTERNAL,
    KUBE_EXTERNAL_IP,
    KUBE_EXTERNAL_IP_LOCAL,
    KUBE_IPVS_IF,
    KUBE_IPVS_IPS,
    KUBE_LOAD_BALANCER,
    KUBE_LOAD_BALANCER_FW,
    KUBE_LOAD_BALANCER_LOCAL,
    KUBE_LOAD_BALANCER_SOURCE_CIDR,
    KUBE_LOAD_BALANCER_SOURCE_IP,
    KUBE_LOOP_BACK,
    KUBE_NODE_PORT_LOCAL_TCP,
    KUBE_NODE_PORT_TCP,
    KUBE_NODE_PORT_UDP,
    IpvsChanges,
    IpvsLayout,
    RealServer,
    VirtualServer,
    desired_layout,
    ipset_restore,
    ipvs_changes,
    parse_ipset_save,
)
from dataplanes.ipvs_rules import JUMPS, SavedRules, iptables_payload, iptables_rules
from kube.model import (
    AFFINITY_CLIENT_IP,
    POLICY_LOCAL,
    TYPE_LOAD_BALANCER,
    TYPE_NODE_PORT,
    UDP,
    ContainerPort,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState
from tests.guest import IN_GUEST, guest_junit

NODES = (Node.numbered(1), Node.numbered(2))
PORTS = (ContainerPort(8080), ContainerPort(8080, UDP))
EXTERNAL_CLIENT = "198.18.0.200"


def pods(ready: dict[str, bool] | None = None) -> list[Pod]:
    """web-1 on node1, web-2 and web-3 on node2, a client pod on node1."""
    ready = ready or {}
    out = [
        Pod("ns1", name, {"app": "web", "node": node}, node, PORTS, ready=ready.get(name, True))
        for name, node in (("web-1", "node1"), ("web-2", "node2"), ("web-3", "node2"))
    ]
    return out + [Pod("ns1", "client", {"app": "client"}, "node1")]


def svc(name: str, ip: str, *, udp: bool = False, selector=None, **kw) -> Service:
    ports = [ServicePort(80, name="tcp", target_port=8080, node_port=kw.pop("node_port", None))]
    if udp:
        ports.append(ServicePort(80, UDP, "udp", 8080))
    return Service("ns1", name, tuple(ports), cluster_ip=ip, selector=selector or {"app": "web"}, **kw)


def view(services, node: str = "node1", ready=None):
    return ClusterState.build(NODES, pods(ready), services).node_view(node)


# --------------------------------------------------------------------------- computed (host)


def test_scheduler_must_be_one_linux_offers():
    assert IpvsDataplane("wrr").scheduler == "wrr"
    with pytest.raises(ValueError, match="accepted: rr, wrr, lc"):
        IpvsDataplane("fastest")


class _NoIpvsHost(Host):
    def has_proc(self, path: str) -> bool:
        return False

    def kernel_config(self, option: str) -> str | None:
        return None


def test_missing_names_the_kernel_feature_and_suggests_the_guest():
    missing = IpvsDataplane(backend="nft").missing(_NoIpvsHost())
    assert any("CONFIG_IP_VS" in m and "--kernel uml" in m for m in missing), missing


def test_layout_has_one_virtual_server_per_vip_port_protocol():
    services = [
        svc("web", "198.19.0.11", udp=True, type=TYPE_NODE_PORT, node_port=30080,
            external_ips=("198.18.64.5",)),
        svc("empty", "198.19.0.12", selector={"app": "nothing"}),
    ]
    layout = desired_layout(view(services), "lc")
    eps = {("198.18.129.2", 8080), ("198.18.130.2", 8080), ("198.18.130.3", 8080)}
    # The UDP port shares the TCP port's NodePort, as Kubernetes allocates it.
    assert set(layout.services) == {
        ("TCP", "198.19.0.11", 80), ("UDP", "198.19.0.11", 80),
        ("TCP", "198.18.0.1", 30080), ("UDP", "198.18.0.1", 30080),
        ("TCP", "198.18.64.5", 80), ("UDP", "198.18.64.5", 80),
        ("TCP", "198.19.0.12", 80),
    }
    assert all(vs.scheduler == "lc" and vs.persistence_s == 0 for vs in layout.services.values())
    for key in (("TCP", "198.19.0.11", 80), ("TCP", "198.18.0.1", 30080), ("TCP", "198.18.64.5", 80)):
        assert set(layout.dests[key]) == eps
    # A Service without endpoints keeps its virtual server: IPVS refuses its connections.
    assert layout.dests[("TCP", "198.19.0.12", 80)] == {}
    assert layout.addresses == {"198.19.0.11", "198.19.0.12", "198.18.64.5"}
    sets = layout.ipsets
    assert sets[KUBE_CLUSTER_IP] == {"198.19.0.11,tcp:80", "198.19.0.11,udp:80", "198.19.0.12,tcp:80"}
    assert sets[KUBE_EXTERNAL_IP] == {"198.18.64.5,tcp:80", "198.18.64.5,udp:80"}
    assert sets[KUBE_NODE_PORT_TCP] == sets[KUBE_NODE_PORT_UDP] == {"30080"}
    assert sets[KUBE_IPVS_IPS] == layout.addresses
    assert "198.18.129.2,tcp:8080,198.18.129.2" in sets[KUBE_LOOP_BACK]
    assert "198.18.130.3,udp:8080,198.18.130.3" in sets[KUBE_LOOP_BACK]


def test_local_policies_and_affinity():
    services = [
        svc("local", "198.19.0.21", type=TYPE_NODE_PORT, node_port=30081,
            external_traffic_policy=POLICY_LOCAL, external_ips=("198.18.64.6",)),
        svc("sticky", "198.19.0.22", session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=30),
        svc("internal", "198.19.0.23", internal_traffic_policy=POLICY_LOCAL),
    ]
    on_node2 = desired_layout(view(services, "node2"))
    # NodePort and externalIP of an externalTrafficPolicy Local Service: local endpoints only.
    assert set(on_node2.dests[("TCP", "198.18.0.2", 30081)]) == {("198.18.130.2", 8080), ("198.18.130.3", 8080)}
    assert set(on_node2.dests[("TCP", "198.18.64.6", 80)]) == {("198.18.130.2", 8080), ("198.18.130.3", 8080)}
    assert len(on_node2.dests[("TCP", "198.19.0.21", 80)]) == 3  # its ClusterIP stays cluster-wide
    assert on_node2.ipsets[KUBE_NODE_PORT_LOCAL_TCP] == {"30081"}
    assert on_node2.ipsets[KUBE_EXTERNAL_IP_LOCAL] == {"198.18.64.6,tcp:80"}
    assert not on_node2.ipsets[KUBE_EXTERNAL_IP]
    assert on_node2.services[("TCP", "198.19.0.22", 80)].persistence_s == 30
    on_node1 = desired_layout(view(services, "node1"))
    assert set(on_node1.dests[("TCP", "198.19.0.23", 80)]) == {("198.18.129.2", 8080)}
    assert on_node1.dests[("TCP", "198.18.0.1", 30081)] == {("198.18.129.2", 8080): RealServer("198.18.129.2", 8080)}


def test_load_balancer_ips_are_virtual_servers_with_kube_proxys_sets():
    ranges = ("198.18.0.200/32", "198.18.128.0/17", "0.0.0.0/0")
    services = [
        svc("lb", "198.19.0.41", udp=True, type=TYPE_LOAD_BALANCER, node_port=30101,
            load_balancer_ips=("198.18.32.5",), load_balancer_source_ranges=ranges),
        svc("lb-local", "198.19.0.42", type=TYPE_LOAD_BALANCER, node_port=30102,
            load_balancer_ips=("198.18.32.6",), external_traffic_policy=POLICY_LOCAL,
            selector={"app": "web", "node": "node2"}),
        svc("lb-node", "198.19.0.43", type=TYPE_LOAD_BALANCER, node_port=30103,
            load_balancer_ips=("198.18.32.7",), load_balancer_source_ranges=("198.18.0.0/24",)),
    ]
    layout = desired_layout(view(services))
    eps = {("198.18.129.2", 8080), ("198.18.130.2", 8080), ("198.18.130.3", 8080)}
    assert set(layout.dests[("TCP", "198.18.32.5", 80)]) == eps
    assert set(layout.dests[("UDP", "198.18.32.5", 80)]) == eps
    assert {"198.18.32.5", "198.18.32.6", "198.18.32.7"} <= layout.addresses
    sets = layout.ipsets
    assert sets[KUBE_LOAD_BALANCER] == {"198.18.32.5,tcp:80", "198.18.32.5,udp:80",
                                        "198.18.32.6,tcp:80", "198.18.32.7,tcp:80"}
    assert sets[KUBE_LOAD_BALANCER_LOCAL] == {"198.18.32.6,tcp:80"}
    assert sets[KUBE_LOAD_BALANCER_FW] == {"198.18.32.5,tcp:80", "198.18.32.5,udp:80",
                                           "198.18.32.7,tcp:80"}
    # As `ipset save` spells them: a /32 bare; 0.0.0.0/0, which hash:ip,port,net refuses,
    # in halves.
    assert {m for m in sets[KUBE_LOAD_BALANCER_SOURCE_CIDR] if m.startswith("198.18.32.5,tcp")} == {
        "198.18.32.5,tcp:80,198.18.0.200", "198.18.32.5,tcp:80,198.18.128.0/17",
        "198.18.32.5,tcp:80,0.0.0.0/1", "198.18.32.5,tcp:80,128.0.0.0/1"}
    # Only a range holding the node's address lets the node in from its own LB IP.
    assert sets[KUBE_LOAD_BALANCER_SOURCE_IP] == {"198.18.32.5,tcp:80,198.18.32.5",
                                                  "198.18.32.5,udp:80,198.18.32.5",
                                                  "198.18.32.7,tcp:80,198.18.32.7"}
    # ETP Local with no endpoint on node1: outsiders dropped, pods and the node served.
    assert sets[KUBE_DROP_EXTERNAL] == {"198.18.0.1,tcp:30102", "198.18.32.6,tcp:80"}
    assert set(layout.dests[("TCP", "198.18.32.6", 80)]) == NODE2_WEB
    rules = iptables_rules("198.18.128.0/17")
    assert rules[("filter", "KUBE-PROXY-FIREWALL")] == rules[("mangle", "KUBE-PROXY-FIREWALL")]
    assert rules[("filter", "KUBE-SOURCE-RANGES-FIREWALL")][-1] == (
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
    nat = rules[("nat", "KUBE-SERVICES")]
    jump = next(i for i, r in enumerate(nat) if r.endswith("-j KUBE-LOAD-BALANCER"))
    node_ports = next(i for i, r in enumerate(nat) if r.endswith("-j KUBE-NODE-PORT"))
    assert jump < node_ports and f"--match-set {KUBE_LOAD_BALANCER} dst,dst -j ACCEPT" in nat[jump + 1]
    assert ("mangle", "OUTPUT", '-m comment --comment "kube-proxy firewall rules" '
            '-j KUBE-PROXY-FIREWALL') in JUMPS


def test_ipset_members_with_a_network_carry_its_prefix():
    with_prefix = ipset_request(IPSET_CMD_ADD, KUBE_LOAD_BALANCER_SOURCE_CIDR,
                                "198.18.32.5,tcp:80,198.18.128.0/17")
    bare = ipset_request(IPSET_CMD_ADD, KUBE_LOAD_BALANCER_SOURCE_CIDR,
                         "198.18.32.5,tcp:80,198.18.0.200")
    cidr2 = struct.pack("=HHB", 5, 21, 17)  # IPSET_ATTR_CIDR2, u8
    assert cidr2 in with_prefix and len(bare) == len(with_prefix) - 8


def _both_local(selector=None):
    return svc("both", "198.19.0.31", type=TYPE_NODE_PORT, node_port=30091,
               external_ips=("198.18.64.7",), internal_traffic_policy=POLICY_LOCAL,
               external_traffic_policy=POLICY_LOCAL, selector=selector)


BOTH_FRONTENDS = (("TCP", "198.19.0.31", 80), ("TCP", "198.18.0.1", 30091),
                  ("TCP", "198.18.64.7", 80))
WEB_1 = {("198.18.129.2", 8080)}
NODE2_WEB = {("198.18.130.2", 8080), ("198.18.130.3", 8080)}


def test_both_policies_local_with_local_and_remote_endpoints_serve_the_local_ones():
    layout = desired_layout(view([_both_local()]))  # node1 holds web-1, node2 web-2 and web-3
    for key in BOTH_FRONTENDS:
        assert set(layout.dests[key]) == WEB_1, key
    assert not layout.ipsets[KUBE_DROP_CLUSTER_IP] and not layout.ipsets[KUBE_DROP_EXTERNAL]
    # The hairpin set holds every endpoint the view says this node may reach.
    hairpin = {m.split(",")[0] for m in layout.ipsets[KUBE_LOOP_BACK]}
    assert hairpin == {"198.18.129.2", "198.18.130.2", "198.18.130.3"}


def test_both_policies_local_with_only_remote_endpoints_drops_and_short_circuits():
    layout = desired_layout(view([_both_local({"node": "node2"})]))
    cluster_ip, node_port, external_ip = BOTH_FRONTENDS
    # ClusterIP: no virtual server (IPVS would refuse), the VIP stays for the DROP rule.
    assert cluster_ip not in layout.services and "198.19.0.31" in layout.addresses
    assert layout.ipsets[KUBE_DROP_CLUSTER_IP] == {"198.19.0.31,tcp:80"}
    # NodePort and externalIP: outsiders dropped, pods and the node reach every endpoint.
    assert set(layout.dests[node_port]) == set(layout.dests[external_ip]) == NODE2_WEB
    assert layout.ipsets[KUBE_DROP_EXTERNAL] == {"198.18.0.1,tcp:30091", "198.18.64.7,tcp:80"}
    filter_rules = iptables_rules("198.18.128.0/17")[("filter", "KUBE-IPVS-FILTER")]
    assert f"--match-set {KUBE_DROP_CLUSTER_IP} dst,dst -j DROP" in filter_rules[0]
    assert filter_rules[1].startswith("-A KUBE-IPVS-FILTER ! -s 198.18.128.0/17 -m addrtype ! "
                                      "--src-type LOCAL")
    assert filter_rules[1].endswith(f"--match-set {KUBE_DROP_EXTERNAL} dst,dst -j DROP")
    on_node2 = desired_layout(view([_both_local({"node": "node2"})], "node2"))
    assert set(on_node2.dests[("TCP", "198.19.0.31", 80)]) == NODE2_WEB
    assert not on_node2.ipsets[KUBE_DROP_CLUSTER_IP] and not on_node2.ipsets[KUBE_DROP_EXTERNAL]


def test_both_policies_local_without_endpoints_keeps_empty_virtual_servers_to_refuse():
    layout = desired_layout(view([_both_local({"app": "nothing"})]))
    for key in BOTH_FRONTENDS:
        assert layout.dests[key] == {}, key  # IPVS answers ICMP port unreachable: REJECT
    assert not layout.ipsets[KUBE_DROP_CLUSTER_IP] and not layout.ipsets[KUBE_DROP_EXTERNAL]


def test_changes_hold_only_the_difference():
    services = [svc("web", "198.19.0.11", udp=True), svc("gone", "198.19.0.12")]
    before = desired_layout(view(services))
    assert len(ipvs_changes(before, before)) == 0
    after = desired_layout(view([svc("web", "198.19.0.11", udp=True, session_affinity=AFFINITY_CLIENT_IP)],
                                ready={"web-3": False}))
    ch = ipvs_changes(before, after)
    assert [str(vs) for vs in ch.edit_services] == ["TCP 198.19.0.11:80", "UDP 198.19.0.11:80"]
    assert sorted((vs.protocol, rs.ip) for vs, rs in ch.delete_dests) == [
        ("TCP", "198.18.130.3"), ("UDP", "198.18.130.3")]
    assert [str(vs) for vs in ch.delete_services] == ["TCP 198.19.0.12:80"]
    assert not ch.add_services and not ch.add_dests and not ch.edit_dests
    # The deleted virtual server takes its real servers along: one message for it.
    whats = [req.what for req in changes_to_messages(ch)]
    assert whats == [
        "delete real server 198.18.130.3:8080 of TCP 198.19.0.11:80",
        "delete real server 198.18.130.3:8080 of UDP 198.19.0.11:80",
        "delete virtual server TCP 198.19.0.12:80",
        "change virtual server TCP 198.19.0.11:80",
        "change virtual server UDP 198.19.0.11:80",
    ]


def test_netlink_requests_decode_as_the_kernel_reads_them():
    """Our struct encoding, read back by pyroute2's own IPVS message class."""
    from pyroute2.netlink.generic.ipvs import ipvsmsg

    vs = VirtualServer("UDP", "198.19.0.11", 53, "sh", 30)
    ch = IpvsChanges(delete_services=[replace(vs, protocol="TCP")], add_services=[vs],
                     add_dests=[(vs, RealServer("198.18.129.2", 5353))])
    delete, add_vs, add_rs = changes_to_messages(ch)
    assert (delete.cmd, add_vs.cmd, add_rs.cmd) == (CMD_DEL_SERVICE, CMD_NEW_SERVICE, CMD_NEW_DEST)

    def decoded(req):
        msg = ipvsmsg(encode_request(0x20, 5, 1, req.cmd, req.attrs))
        msg.decode()
        assert msg["cmd"] == req.cmd and msg["header"]["length"] == len(msg.data)
        return msg

    service = decoded(add_vs).get_attr("IPVS_CMD_ATTR_SERVICE")
    assert service.get_attr("IPVS_SVC_ATTR_PROTOCOL") == socket.IPPROTO_UDP
    assert service.get_attr("IPVS_SVC_ATTR_ADDR") == "198.19.0.11"
    assert service.get_attr("IPVS_SVC_ATTR_PORT") == 53
    assert service.get_attr("IPVS_SVC_ATTR_SCHED_NAME") == "sh"
    assert service.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"] == 1  # persistent: ClientIP affinity
    assert service.get_attr("IPVS_SVC_ATTR_TIMEOUT") == 30
    dest = decoded(add_rs).get_attr("IPVS_CMD_ATTR_DEST")
    assert dest.get_attr("IPVS_DEST_ATTR_ADDR") == "198.18.129.2"
    assert dest.get_attr("IPVS_DEST_ATTR_PORT") == 5353
    assert dest.get_attr("IPVS_DEST_ATTR_FWD_METHOD") == 0  # masquerading (NAT)
    assert dest.get_attr("IPVS_DEST_ATTR_WEIGHT") == 1
    key = decoded(delete).get_attr("IPVS_CMD_ATTR_SERVICE")
    assert key.get_attr("IPVS_SVC_ATTR_PROTOCOL") == socket.IPPROTO_TCP
    assert key.get_attr("IPVS_SVC_ATTR_SCHED_NAME") is None  # a key only


def test_replies_parse_into_what_the_kernel_holds():
    vs = VirtualServer("TCP", "198.19.0.11", 80, "wrr", 0)
    assert parse_service(service_full(vs)) == vs
    assert parse_service(service_full(replace(vs, persistence_s=10800))).persistence_s == 10800
    assert parse_dest(dest(RealServer("198.18.130.3", 8080, 2))) == RealServer("198.18.130.3", 8080, 2)


def test_ipset_restore_round_trips_through_save():
    want = desired_layout(view([svc("web", "198.19.0.11", type=TYPE_NODE_PORT, node_port=30080)])).ipsets
    text, changes = ipset_restore(None, want)
    assert changes == sum(len(v) for v in want.values())
    assert all(f"create {s.name} " in text for s in IPSETS)
    # What `ipset save` would print after that restore reads back as the same members.
    saved = "\n".join(line.replace(" -exist", "") for line in text.splitlines())
    have = parse_ipset_save(saved)
    assert have == {name: members for name, members in want.items()}
    assert ipset_restore(have, want) == ("", 0)
    have[KUBE_CLUSTER_IP].add("198.19.0.99,tcp:80")
    have[KUBE_NODE_PORT_TCP].clear()
    text, changes = ipset_restore(have, want)
    assert changes == 2
    assert text.splitlines() == [f"del {KUBE_CLUSTER_IP} 198.19.0.99,tcp:80 -exist",
                                 f"add {KUBE_NODE_PORT_TCP} 30080 -exist"]


def test_ipset_members_encode_as_ipset_add_does():
    """Our netlink encoding of set members, read back by pyroute2's ipset message class."""
    from pyroute2.netlink.nfnetlink.ipset import ipset_msg

    def data(name: str, entry: str):
        msg = ipset_msg(struct.pack("=IHHII", 16 + len(body := ipset_request(IPSET_CMD_ADD, name, entry)),
                                    0x609, 5, 1, 0) + body)
        msg.decode()
        assert msg.get_attr("IPSET_ATTR_SETNAME") == name and msg.get_attr("IPSET_ATTR_PROTOCOL") == 6
        return msg.get_attr("IPSET_ATTR_DATA")

    # pyroute2 names attributes 1 and 4 by their aliases IPSET_ATTR_IP_FROM / IPSET_ATTR_PORT_FROM.
    hairpin = data(KUBE_LOOP_BACK, "198.18.129.2,udp:8080,198.18.129.3")
    assert hairpin.get_attr("IPSET_ATTR_IP_FROM").get_attr("IPSET_ATTR_IPADDR_IPV4") == "198.18.129.2"
    assert hairpin.get_attr("IPSET_ATTR_IP2").get_attr("IPSET_ATTR_IPADDR_IPV4") == "198.18.129.3"
    assert hairpin.get_attr("IPSET_ATTR_PORT_FROM") == 8080
    assert hairpin.get_attr("IPSET_ATTR_PROTO") == socket.IPPROTO_UDP
    assert data(KUBE_NODE_PORT_TCP, "30080").get_attr("IPSET_ATTR_PORT_FROM") == 30080
    vip = data(KUBE_IPVS_IPS, "198.19.0.11")
    assert vip.get_attr("IPSET_ATTR_IP_FROM").get_attr("IPSET_ATTR_IPADDR_IPV4") == "198.19.0.11"
    assert vip.get_attr("IPSET_ATTR_PORT_FROM") is None


def test_saved_rules_find_our_chains_and_missing_jumps():
    rules = iptables_rules("198.18.128.0/17")
    payload = iptables_payload(rules)
    # The payload as iptables-save prints it afterwards: declarations, rules, jumps as -A.
    saved_text = "\n".join(
        line.replace("-I ", "-A ", 1).replace(" 1 -m comment", " -m comment") if line.startswith("-I ") else line
        for line in payload.splitlines()
    )
    saved = SavedRules.parse(saved_text + "\n*nat\n-A OUTPUT -j OTHER\nCOMMIT\n")
    assert saved.chains == rules
    assert saved.missing_jumps() == []
    partial = SavedRules.parse("*nat\n:KUBE-SERVICES - [0:0]\n" + "\n".join(
        f"-A {chain} {spec}" for table, chain, spec in JUMPS[1:] if table == "nat") + "\nCOMMIT\n")
    assert partial.missing_jumps()[0] == JUMPS[0]
    assert partial.chains == {("nat", "KUBE-SERVICES"): []}


def test_render_shows_what_a_sync_programs():
    text = IpvsDataplane("sh").render(view([svc("web", "198.19.0.11", session_affinity=AFFINITY_CLIENT_IP,
                                                affinity_timeout_s=60)]))
    assert "-A -t 198.19.0.11:80 -s sh -p 60" in text
    assert "-a -t 198.19.0.11:80 -r 198.18.130.3:8080 -m -w 1" in text
    assert f"add {KUBE_CLUSTER_IP} 198.19.0.11,tcp:80" in text
    assert "-j MASQUERADE --random-fully" in text


# --------------------------------------------------------------------------- the guest


@pytest.mark.root
@pytest.mark.timeout(900)
def test_ipvs_in_guest(tmp_path, request):
    """Boot one guest kernel and run this module's guest tests in it, with real traffic (and
    tests/test_agent.py's, which share the boot: tests/guest.py SHARED_BOOT)."""
    report = guest_junit(__file__, tmp_path, request)
    assert report.count("<testcase") >= 9 and "<skipped" not in report and "<failure" not in report


def test_guest_kernel_is_its_own():
    if not IN_GUEST:
        pytest.skip("checks the guest kernel from inside (test_ipvs_in_guest runs it there)")
    mounts = [line.split() for line in open("/proc/mounts")]
    assert ["tmpfs"] == [m[2] for m in mounts if m[1] == "/run"]  # not the host's /run
    assert os.environ["TMPDIR"] == "/run/tmp"
    assert os.path.exists("/proc/net/ip_vs") and os.path.exists("/proc/config.gz")
    with open("/proc/sys/kernel/modprobe") as fh:
        assert fh.read().startswith("/run/")  # modules load on demand from the package's tree


GUEST_SERVICES = [
    svc("web", "198.19.0.11", udp=True),
    svc("np", "198.19.0.12", type=TYPE_NODE_PORT, node_port=30080),
    svc("local", "198.19.0.13", type=TYPE_NODE_PORT, node_port=30081, external_traffic_policy=POLICY_LOCAL,
        selector={"app": "web", "node": "node2"}),
    svc("eip", "198.19.0.14", external_ips=("198.18.64.5",)),
    svc("self", "198.19.0.15", selector={"app": "web", "node": "node1"}),
    svc("empty", "198.19.0.16", selector={"app": "nothing"}),
    # The external client's /32 and a /24: `ipset save` must read back what a sync wrote.
    svc("lb", "198.19.0.19", type=TYPE_LOAD_BALANCER, node_port=30082,
        load_balancer_ips=("198.18.32.5",),
        load_balancer_source_ranges=(f"{EXTERNAL_CLIENT}/32", "198.18.1.0/24")),
]


class GuestCluster:
    """A two-node NetnsCluster with IPVS mode on both nodes (inside the guest)."""

    def __init__(self, cluster, dataplane: IpvsDataplane):
        self.cluster = cluster
        self.dp = dataplane

    def apply(self, services, ready=None, dp: IpvsDataplane | None = None) -> dict:
        state = ClusterState.build(NODES, pods(ready), services)
        dp = dp or self.dp
        return {n.name: dp.sync(n, state.node_view(n.name)) for n in self.cluster.nodes}

    def netns(self, source: str) -> str:
        if source == "external":
            return self.cluster.external_netns
        if source.startswith("node/"):
            return self.cluster.node(source[5:]).netns
        return self.cluster.pod_netns("ns1", source)

    def probe(self, source: str, ip: str, port: int, count: int = 12, protocol: str = "TCP",
              timeout: float = 1.0):
        from clusters.nsenter import in_netns
        from clusters.workloads.probe import probe

        return in_netns(self.netns(source), probe, ip, port, protocol=protocol, count=count,
                        timeout=timeout)

    def silent(self, *requests: tuple[str, str, int]) -> list:
        """Probes (source, ip, port) expected to go unanswered: at once, 2 samples of 0.5 s."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(lambda r: self.probe(*r, count=2, timeout=0.5), requests))

    def kernel(self, node: str) -> IpvsLayout:
        from clusters.nsenter import in_netns

        def read() -> IpvsLayout:
            with IpvsNetlink() as nl:
                return nl.layout()

        return in_netns(self.cluster.node(node).netns, read)


@pytest.fixture(scope="module")
def guest():
    if not os.path.exists("/proc/net/ip_vs"):
        pytest.skip("needs a kernel with IPVS: test_ipvs_in_guest runs these inside the UML guest")
    from clusters.netns import NetnsCluster, gc

    state_dir = tempfile.mkdtemp(prefix="svbt")
    cluster = None
    try:
        cluster = NetnsCluster.create(2, state_dir=state_dir)
        cluster.set_pods(ClusterState.build(NODES, pods()).pods)
        dp = IpvsDataplane()
        for node in cluster.nodes:
            dp.install(node)
        g = GuestCluster(cluster, dp)
        g.apply(GUEST_SERVICES)
        yield g
    finally:
        if cluster is not None:
            cluster.destroy()
            gc(all_runs=True, state_dir=state_dir, run_ids=[cluster.run_id])
        shutil.rmtree(state_dir, ignore_errors=True)


def _outcomes(result) -> dict[str, int]:
    return result.summary()["outcomes"]


def _backends(result) -> set[str]:
    return set(result.summary()["backends"])


def _clients(result) -> set[str]:
    return {s.seen_client.rsplit(":", 1)[0] for s in result.samples if s.seen_client}


def test_guest_clusterip_from_pods_and_nodes(guest):
    tcp = guest.probe("client", "198.19.0.11", 80)
    assert _outcomes(tcp) == {"ok": 12}
    assert _backends(tcp) == {"ns1/web-1", "ns1/web-2", "ns1/web-3"}
    client_ip = ClusterState.build(NODES, pods()).pod("ns1", "client").ip
    assert _clients(tcp) == {client_ip}  # the client pod's own address: no masquerade
    udp = guest.probe("client", "198.19.0.11", 80, protocol="UDP")
    assert _outcomes(udp) == {"ok": 12} and len(_backends(udp)) == 3
    node = guest.probe("node/node2", "198.19.0.11", 80)
    assert _outcomes(node) == {"ok": 12}


def test_guest_nodeport_external_ips_and_local_policy(guest):
    for node_ip in ("198.18.0.1", "198.18.0.2"):
        res = guest.probe("external", node_ip, 30080)
        assert _outcomes(res) == {"ok": 12}, node_ip
        assert EXTERNAL_CLIENT not in _clients(res)  # masqueraded, so replies come back through the node
    local = guest.probe("external", "198.18.0.2", 30081)
    assert _outcomes(local) == {"ok": 12}
    assert _backends(local) == {"ns1/web-2", "ns1/web-3"}
    assert _clients(local) == {EXTERNAL_CLIENT}  # externalTrafficPolicy Local keeps the client's address
    eip = guest.probe("external", "198.18.64.5", 80)
    assert _outcomes(eip) == {"ok": 12}
    lb = guest.probe("external", "198.18.32.5", 80)
    assert _outcomes(lb) == {"ok": 12}
    # unanswered: node1 has no local endpoint of `local`; pods and nodes are not in the LB's
    # source ranges
    for res in guest.silent(("external", "198.18.0.1", 30081), ("client", "198.18.32.5", 80),
                            ("node/node1", "198.18.32.5", 80)):
        assert "ok" not in _outcomes(res), res.target


def test_guest_hairpin(guest):
    res = guest.probe("web-1", "198.19.0.15", 80, count=6)
    assert _outcomes(res) == {"ok": 6} and _backends(res) == {"ns1/web-1"}
    assert "198.18.129.2" not in _clients(res)  # KUBE-LOOP-BACK masquerades a pod reaching itself


def test_guest_no_endpoints_and_unserved_ports_are_refused(guest):
    for ip, port in (("198.19.0.16", 80), ("198.19.0.11", 81)):
        started = time.monotonic()
        res = guest.probe("client", ip, port, count=4)
        assert _outcomes(res) == {"refused": 4}, (ip, port)
        assert time.monotonic() - started < 4.0


def test_guest_service_list_check_finds_a_removed_real_server(guest):
    """`svcbench service list --check` in IPVS mode: the rows read back from the node's
    virtual servers and ipsets equal the view's, every kind (ClusterIP, NodePort with a
    Local policy dropping outsiders, externalIP, load balancer with source ranges, no
    endpoints); one real server deleted by hand is exactly one difference."""
    from clusters.nsenter import in_netns
    from dataplanes import servicelist as sl

    node = guest.cluster.node("node1")
    want = view(GUEST_SERVICES)
    intended = sl.intended_rows(want, sl.skipped_protocols("ipvs"))

    def check() -> list[dict]:
        return sl.differences("node1", intended, sl.kernel_rows("ipvs", guest.dp, node, want))

    assert check() == []
    rows = {r.frontend: r for r in sl.kernel_rows("ipvs", guest.dp, node, want)}
    assert rows["198.19.0.16:80/TCP"].no_endpoints == "reject"
    assert rows["198.18.0.1:30081/TCP"].no_endpoints == "drop"
    assert rows["198.18.32.5:80/TCP"].source_ranges == ["198.18.0.200/32", "198.18.1.0/24"]
    assert rows["198.19.0.11:80/TCP"].objects[0] == "TCP 198.19.0.11:80 rr"
    web = guest.kernel("node1").services[("TCP", "198.19.0.11", 80)]
    gone = next(rs for rs in guest.kernel("node1").dests[web.key].values()
                if rs.ip == "198.18.130.3")

    def remove() -> None:
        with IpvsNetlink() as nl:
            assert not nl.apply(changes_to_messages(IpvsChanges(delete_dests=[(web, gone)])))

    in_netns(node.netns, remove)
    assert [(d["frontend"], d["what"], d["have"], d["want"]) for d in check()] == [
        ("198.19.0.11:80/TCP", "backend missing", None, "198.18.130.3:8080")]
    guest.apply(GUEST_SERVICES)  # put it back for the tests below
    assert check() == []


def test_guest_sync_applies_only_the_difference(guest):
    again = guest.apply(GUEST_SERVICES)
    for stats in again.values():
        assert stats.changed == 0, stats.extra
        assert stats.extra["netlink_messages"] == 0 and not stats.extra["iptables_written"]
    before = ClusterState.build(NODES, pods(), GUEST_SERVICES)
    state = ClusterState.build(NODES, pods({"web-3": False}), GUEST_SERVICES)
    changed = guest.apply(GUEST_SERVICES, ready={"web-3": False})
    for node in ("node1", "node2"):
        old, want = (desired_layout(s.node_view(node)) for s in (before, state))
        # Exactly one real server deleted per virtual server web-3 stood behind, nothing else.
        removed = ipvs_changes(old, want)
        assert len(removed) == len(removed.delete_dests) > 0
        assert changed[node].extra["netlink_messages"] == len(removed)
        assert changed[node].extra["ipset_changes"] == 2  # web-3's hairpin entries, TCP and UDP
        held = guest.kernel(node)
        assert held.services == want.services and held.dests == want.dests
        saved = guest.cluster.node(node).run(["ipset", "save"]).stdout
        assert parse_ipset_save(saved) == want.ipsets  # members changed over netlink, exactly
    res = guest.probe("client", "198.19.0.11", 80, count=30)
    assert _outcomes(res) == {"ok": 30} and "ns1/web-3" not in _backends(res)
    guest.apply(GUEST_SERVICES)
    assert "ns1/web-3" in _backends(guest.probe("client", "198.19.0.11", 80, count=30))


def test_guest_repairs_what_others_removed(guest):
    from clusters.nsenter import in_netns

    node = guest.cluster.node("node1")
    held = guest.kernel("node1")
    web = held.services[("TCP", "198.19.0.11", 80)]

    def break_ipvs() -> None:
        with IpvsNetlink() as nl:
            assert not nl.apply(changes_to_messages(IpvsChanges(delete_services=[web])))
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=KUBE_IPVS_IF)[0]
            ipr.addr("del", index=index, address="198.19.0.12", prefixlen=32)

    in_netns(node.netns, break_ipvs)
    iptables = f"iptables-{guest.dp.backend}"
    node.run([iptables, "-w", "-t", "nat", "-F"])
    node.run([iptables, "-w", "-t", "nat", "-X"])
    node.run(["ipset", "flush", KUBE_CLUSTER_IP])
    assert "ok" not in _outcomes(guest.probe("client", "198.19.0.11", 80, count=2))
    stats = guest.apply(GUEST_SERVICES)["node1"]
    assert stats.extra["iptables_written"] and stats.extra["addresses_added"] == 1
    assert stats.extra["netlink_messages"] == 4  # the virtual server and its three real servers
    assert _outcomes(guest.probe("client", "198.19.0.11", 80)) == {"ok": 12}
    assert _outcomes(guest.probe("node/node1", "198.19.0.12", 80)) == {"ok": 12}  # masqueraded again


def test_guest_scheduler_and_affinity(guest):
    sticky = [*GUEST_SERVICES, svc("sticky", "198.19.0.17", session_affinity=AFFINITY_CLIENT_IP,
                                   affinity_timeout_s=60)]
    guest.apply(sticky, dp=IpvsDataplane("sh"))
    held = guest.kernel("node1")
    assert held.services[("TCP", "198.19.0.17", 80)] == VirtualServer("TCP", "198.19.0.17", 80, "sh", 60)
    assert held.services[("TCP", "198.19.0.11", 80)].scheduler == "sh"
    res = guest.probe("client", "198.19.0.17", 80, count=10)
    assert _outcomes(res) == {"ok": 10} and len(_backends(res)) == 1
    guest.apply(GUEST_SERVICES)
    assert ("TCP", "198.19.0.17", 80) not in guest.kernel("node1").services
    assert guest.kernel("node1").services[("TCP", "198.19.0.11", 80)].scheduler == "rr"


def test_guest_unknown_scheduler_is_refused_by_name(guest):
    dp = IpvsDataplane("twos")  # Linux offers it; this guest kernel was built without it
    with pytest.raises(DataplaneError, match="IPVS refused .* virtual server"):
        guest.apply(GUEST_SERVICES + [svc("new", "198.19.0.18")], dp=dp)
    guest.apply(GUEST_SERVICES)


def test_guest_summary_counts_what_the_kernel_holds(guest):
    """`svcbench status`'s per-node summary of the IPVS mode agrees with the kernel."""
    for name in ("node1", "node2"):
        node = guest.cluster.node(name)
        kernel = guest.kernel(name)
        s = guest.dp.summary(node)
        assert s["virtual_servers"] == len(kernel.services) > 0, s
        assert s["real_servers"] == sum(len(d) for d in kernel.dests.values()) > 0, s
        addresses = node.run(["ip", "-o", "-4", "addr", "show", "dev", KUBE_IPVS_IF]).stdout
        assert s["addresses"] == len(addresses.splitlines()) > 0, s
        members = node.run(["ipset", "save", KUBE_CLUSTER_IP]).stdout
        assert s["members_by_set"][KUBE_CLUSTER_IP] == members.count("\nadd ") > 0, s
        assert s["chains"] > 0 and s["rules"] > 0 and s["jumps"] > 0, s
        assert s["options"]["scheduler"] == guest.dp.scheduler, s
        assert s["health_server"]["running"], s


def test_guest_uninstall_then_restart(guest):
    node = guest.cluster.node("node2")
    guest.dp.uninstall(node)
    saved = node.run([f"iptables-{guest.dp.backend}-save"]).stdout
    assert "KUBE-" not in saved
    assert not any(name in node.run(["ipset", "list", "-n"]).stdout for name in (KUBE_CLUSTER_IP, KUBE_LOOP_BACK))
    assert guest.kernel("node2").services == {}
    assert KUBE_IPVS_IF not in node.run(["ip", "-o", "link"]).stdout
    guest.dp.install(node)
    guest.apply(GUEST_SERVICES)
    assert _outcomes(guest.probe("node/node2", "198.19.0.11", 80)) == {"ok": 12}
