"""Cluster DNS: Kubernetes naming (kube/dns.py) and the dnspython server (clusters/workloads/dns.py)."""

from __future__ import annotations

import json
import os
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from clusters.workloads.dns import RecordTable, answer
from kube.dns import records
from kube.model import (
    HEADLESS,
    PROXY_NAME_LABEL,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState
from reports.results import write_json

NODES = [Node.numbered(1), Node.numbered(2)]


def _state() -> ClusterState:
    pods = [Pod("ns1", f"web-{i}", {"app": "web"}, f"node{1 + i % 2}") for i in range(1, 4)]
    services = [
        Service("ns1", "web", (ServicePort(80),), selector={"app": "web"}),
        Service("ns1", "web-headless", (ServicePort(80),), cluster_ip=HEADLESS),
        Service("ns1", "empty-headless", (ServicePort(80),), cluster_ip=HEADLESS,
                selector={"app": "none"}),
        Service("ns2", "theirs", (ServicePort(80),), labels={PROXY_NAME_LABEL: "other"}),
    ]
    slices = [EndpointSlice("ns1", "web-headless-1", "web-headless", (
        Endpoint(("198.18.130.9",), node_name="node2"),
        Endpoint(("198.18.129.30",), node_name="node1"),
        Endpoint(("198.18.129.4",), node_name="node1"),
        Endpoint(("198.18.129.5",), ready=False, node_name="node1"),
    ), (EndpointPort(80),))]
    return ClusterState.build(NODES, pods, services, slices)


def test_records_follow_kubernetes_dns_naming():
    state = _state()
    names = records(state)
    assert names == {
        "web.ns1.svc.cluster.local": [state.service_obj("ns1", "web").cluster_ip],
        # Ready endpoints only, in numeric (not string) order.
        "web-headless.ns1.svc.cluster.local": ["198.18.129.4", "198.18.129.30", "198.18.130.9"],
        # The proxy-name label picks a proxy, not whether the Service has a name.
        "theirs.ns2.svc.cluster.local": [state.service_obj("ns2", "theirs").cluster_ip],
    }
    assert "empty-headless.ns1.svc.cluster.local" not in names
    assert set(records(state, domain="example.org.")) == {
        n.replace("cluster.local", "example.org") for n in names
    }


def test_external_name_services_are_aliases():
    alias = Service("ns1", "db", (), type="ExternalName", external_name="DB.Example.com.")
    state = ClusterState.build(NODES, services=[alias, Service("ns1", "web", (ServicePort(80),))])
    assert records(state) == {
        "db.ns1.svc.cluster.local": "DB.Example.com",  # a target name, not addresses
        "web.ns1.svc.cluster.local": [state.service_obj("ns1", "web").cluster_ip],
    }


def _ask(table: RecordTable, name: str, rdtype: str = "A", *, udp: bool = True,
         edns: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0 if edns else None)
    wire = answer(table, query.to_wire(), udp=udp)
    assert wire is not None
    return dns.message.from_wire(wire)


def _ips(response: dns.message.Message) -> list[str]:
    return [r.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A
            for r in rrset]


@pytest.fixture()
def table(tmp_path):
    path = tmp_path / "records.json"
    write_json(path, {"web.ns1.svc.cluster.local": ["198.19.0.1"],
                      "pods.ns1.svc.cluster.local": ["198.18.129.2", "198.18.130.2"]})
    return RecordTable(str(path))


def test_answers_known_unknown_and_empty_names(table):
    web = _ask(table, "web.ns1.svc.cluster.local")
    assert web.rcode() == dns.rcode.NOERROR and _ips(web) == ["198.19.0.1"]
    assert web.flags & dns.flags.AA
    assert _ips(_ask(table, "WEB.Ns1.svc.cluster.local.")) == ["198.19.0.1"]
    assert sorted(_ips(_ask(table, "pods.ns1.svc.cluster.local"))) == ["198.18.129.2",
                                                                        "198.18.130.2"]
    assert _ask(table, "nothing.ns1.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert _ask(table, "example.com").rcode() == dns.rcode.NXDOMAIN
    # An empty non-terminal and a known name without AAAA: the name exists, no data.
    for name, rdtype in (("ns1.svc.cluster.local", "A"), ("web.ns1.svc.cluster.local", "AAAA")):
        response = _ask(table, name, rdtype)
        assert response.rcode() == dns.rcode.NOERROR and response.answer == []


def _cnames(response: dns.message.Message) -> list[tuple[str, str]]:
    return [(rrset.name.to_text(), r.target.to_text()) for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.CNAME for r in rrset]


def test_aliases_answer_cname_and_follow_names_of_the_table(tmp_path):
    path = tmp_path / "records.json"
    write_json(path, {
        "web.ns1.svc.cluster.local": ["198.19.0.1"],
        "db.ns1.svc.cluster.local": "db.example.com",
        "alias.ns1.svc.cluster.local": "Web.ns1.svc.cluster.local",
        "hop.ns1.svc.cluster.local": "alias.ns1.svc.cluster.local",
        "loop-a.ns1.svc.cluster.local": "loop-b.ns1.svc.cluster.local",
        "loop-b.ns1.svc.cluster.local": "loop-a.ns1.svc.cluster.local",
    })
    table = RecordTable(str(path))
    # dns.go "should provide DNS for ExternalName services": the CNAME, whatever is asked.
    for rdtype in ("CNAME", "A", "AAAA", "TXT"):
        db = _ask(table, "db.ns1.svc.cluster.local", rdtype)
        assert db.rcode() == dns.rcode.NOERROR, rdtype
        assert _cnames(db) == [("db.ns1.svc.cluster.local.", "db.example.com.")], rdtype
        assert _ips(db) == [], f"{rdtype}: an outside target is left to the client's resolver"
    # A target in the cluster is followed, as CoreDNS's kubernetes plugin does.
    alias = _ask(table, "alias.ns1.svc.cluster.local")
    assert _cnames(alias) == [("alias.ns1.svc.cluster.local.", "Web.ns1.svc.cluster.local.")]
    assert [(rrset.name.to_text(), r.address) for rrset in alias.answer
            if rrset.rdtype == dns.rdatatype.A for r in rrset] == [
        ("Web.ns1.svc.cluster.local.", "198.19.0.1")]
    assert _ips(_ask(table, "hop.ns1.svc.cluster.local", udp=False)) == ["198.19.0.1"]
    assert len(_cnames(_ask(table, "hop.ns1.svc.cluster.local"))) == 2
    assert _ips(_ask(table, "alias.ns1.svc.cluster.local", "CNAME")) == []  # only what was asked
    assert _cnames(_ask(table, "alias.ns1.svc.cluster.local", "AAAA"))  # the alias, no AAAA
    # A loop ends once every name was seen.
    loop = _ask(table, "loop-a.ns1.svc.cluster.local")
    assert loop.rcode() == dns.rcode.NOERROR and len(_cnames(loop)) == 2 and _ips(loop) == []
    # An alias file line without a target is a broken file: the last good table stays.
    write_json(path, {"db.ns1.svc.cluster.local": "."})
    assert _cnames(_ask(table, "db.ns1.svc.cluster.local"))[0][1] == "db.example.com."


def test_reloads_the_file_when_it_changes(table):
    assert _ips(_ask(table, "web.ns1.svc.cluster.local")) == ["198.19.0.1"]
    write_json(table.path, {"web.ns1.svc.cluster.local": ["198.19.0.7"]})
    assert _ips(_ask(table, "web.ns1.svc.cluster.local")) == ["198.19.0.7"]
    assert _ask(table, "pods.ns1.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    # A broken write keeps the last good table instead of forgetting every name.
    with open(table.path, "w") as fh:
        fh.write("{not json")
    assert _ips(_ask(table, "web.ns1.svc.cluster.local")) == ["198.19.0.7"]


def test_large_answers_truncate_over_udp_and_fit_over_tcp(tmp_path):
    path = tmp_path / "records.json"
    ips = [f"198.18.129.{i}" for i in range(2, 52)]  # ~850 bytes: over 512, under 1232
    write_json(path, {"big.ns1.svc.cluster.local": ips})
    table = RecordTable(str(path))
    udp = _ask(table, "big.ns1.svc.cluster.local")
    assert udp.flags & dns.flags.TC and udp.answer == []
    assert len(_ips(_ask(table, "big.ns1.svc.cluster.local", edns=True))) == 50  # EDNS: 1232 bytes
    assert sorted(_ips(_ask(table, "big.ns1.svc.cluster.local", udp=False))) == sorted(ips)


def test_garbage_and_responses_get_no_answer(table):
    assert answer(table, b"\x00\x01garbage", udp=True) is None
    response = dns.message.make_response(dns.message.make_query("web.ns1.svc.cluster.local", "A"))
    assert answer(table, response.to_wire(), udp=True) is None


# --------------------------------------------------------------------------- the daemon


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.root
def test_daemon_serves_udp_and_tcp_reloads_and_exits_with_its_namespace(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    from clusters.netns import NetnsCluster, netns_delete
    from clusters.nsenter import in_netns
    from clusters.workloads.dns import query, spawn

    state = ClusterState.build([Node.numbered(1)], [Pod("kube-system", "coredns", node_name="node1")])
    pod = state.pods[0]
    path = tmp_path / "records.json"
    write_json(path, {"web.ns1.svc.cluster.local": ["198.19.0.1"]})
    with NetnsCluster.create(1, agents=False) as cluster:
        cluster.set_pods(state.pods)
        pod_netns = cluster.pod_netns("kube-system", "coredns")
        node = cluster.nodes[0]
        pid = spawn(pod_netns, str(path), str(tmp_path / "dns.log"))
        try:
            for tcp in (False, True):
                got = in_netns(node.netns, query, pod.ip, "web.ns1.svc.cluster.local", tcp=tcp)
                assert _ips(got) == ["198.19.0.1"], f"tcp={tcp}: {got}"
                missing = in_netns(node.netns, query, pod.ip, "gone.ns1.svc.cluster.local", tcp=tcp)
                assert missing.rcode() == dns.rcode.NXDOMAIN
            write_json(path, {"web.ns1.svc.cluster.local": ["198.19.0.2", "198.19.0.3"]})
            got = in_netns(node.netns, query, pod.ip, "web.ns1.svc.cluster.local")
            assert sorted(_ips(got)) == ["198.19.0.2", "198.19.0.3"]
            # The namespace goes away without anyone killing the daemon: it leaves by itself.
            netns_delete(pod_netns)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(pid), "the DNS daemon outlived its network namespace"
            log = (tmp_path / "dns.log").read_text()
            assert f"netns {pod_netns} was deleted" in log, log
        finally:
            if _alive(pid):
                os.kill(pid, 9)
    assert json.loads(path.read_text())  # the records file is the caller's, left in place
