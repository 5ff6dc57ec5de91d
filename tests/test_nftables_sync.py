"""The nftables data plane on real nodes: a two-node NetnsCluster with echo agents.

Real TCP and UDP through ClusterIPs and NodePorts, full against incremental syncs, the
table altered from outside, uninstall. One cluster for the module (it takes seconds to
build); each test starts from a fresh install and leaves the table uninstalled.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from clusters.netns import NetnsCluster
from clusters.nsenter import in_netns
from clusters.workloads.probe import OK, probe
from dataplanes.base import DataplaneError
from dataplanes.nftables import NftablesDataplane, render_table
from dataplanes.nftlayout import AFFINITY, FAMILY, TABLE
from kube.model import (
    AFFINITY_CLIENT_IP,
    POLICY_LOCAL,
    TCP,
    TYPE_NODE_PORT,
    UDP,
    ContainerPort,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState

pytestmark = pytest.mark.root

NODES = (Node.numbered(1), Node.numbered(2))
PORTS = (ContainerPort(8080, TCP), ContainerPort(8080, UDP))
PODS = (
    Pod("ns1", "web-1", {"app": "web"}, "node1", PORTS),
    Pod("ns1", "web-2", {"app": "web"}, "node2", PORTS),
    Pod("ns1", "web-3", {"app": "web"}, "node2", PORTS),
    Pod("ns1", "client", {"app": "client"}, "node1"),
)
EXTERNAL_CLIENT = "198.18.0.200"


class Cluster:
    def __init__(self, netns: NetnsCluster):
        self.netns = netns
        self.state = ClusterState.build(NODES, PODS)
        netns.set_pods(self.state.pods)

    def apply(self, dp: NftablesDataplane, services, relabel: dict[str, str] | None = None,
              **sync):
        """Build the state (relabel moves pods to app=<value>) and sync both nodes."""
        relabel = relabel or {}
        ips = {p.name: p.ip for p in self.state.pods}
        pods = [
            Pod(p.namespace, p.name, {"app": relabel.get(p.name, p.labels["app"])}, p.node_name,
                p.ports, ip=ips[p.name])
            for p in PODS
        ]
        self.state = ClusterState.build(NODES, pods, services, previous=self.state)
        return [dp.sync(n, self.state.node_view(n.name), **sync) for n in self.netns.nodes]

    def node(self, name: str = "node1"):
        return self.netns.node(name)

    def pod_ns(self, name: str) -> str:
        return self.netns.pod_netns("ns1", name)

    def pod_ip(self, name: str) -> str:
        return self.state.pod("ns1", name).ip

    def ip(self, service: str) -> str:
        return self.state.service_obj("ns1", service).cluster_ip

    def ask(self, source: str, ip: str, port: int, **kw):
        """Probe from a pod name, "external", or a node name (a process on the node)."""
        if source == "external":
            netns = self.netns.external_netns
        elif source.startswith("node"):
            netns = self.node(source).netns
        else:
            netns = self.pod_ns(source)
        return in_netns(netns, probe, ip, port, **kw)


def served(result) -> Counter:
    return Counter(s.backend for s in result.samples if s.outcome == OK)


def outcomes(result) -> Counter:
    return Counter(s.outcome for s in result.samples)


def seen(result) -> set[str]:
    return {s.seen_client.rsplit(":", 1)[0] for s in result.samples if s.seen_client}


def web(name: str = "web", *ports: ServicePort, **kw) -> Service:
    ports = ports or (ServicePort(80, TCP, "tcp", 8080),)
    return Service("ns1", name, ports, selector={"app": kw.pop("app", "web")}, **kw)


@pytest.fixture(scope="module")
def module_cluster():
    netns = NetnsCluster.create(2)
    try:
        yield Cluster(netns)
    finally:
        netns.destroy()


@pytest.fixture
def cluster(module_cluster):
    dp = NftablesDataplane()
    for node in module_cluster.netns.nodes:
        dp.install(node)
    try:
        yield module_cluster, dp
    finally:
        for node in module_cluster.netns.nodes:
            dp.uninstall(node)


def nft(node, *args: str) -> str:
    return node.run(["nft", *args]).stdout


def endpoint_slots(node) -> set[str]:
    """Every element of the node's endpoint maps (one per class), its map left out."""
    data = json.loads(nft(node, "-j", "list", "table", FAMILY, TABLE))
    return {json.dumps(e, sort_keys=True) for item in data["nftables"] if "map" in item
            and item["map"]["name"].endswith("-endpoints") for e in item["map"].get("elem", [])}


# --------------------------------------------------------------------------- traffic


def test_cluster_ip_serves_every_endpoint_and_keeps_the_pod_ip(cluster):
    c, dp = cluster
    stats = c.apply(dp, [web(), web("dns", ServicePort(53, UDP, "dns", 8080))])
    assert all(s.full for s in stats)
    tcp = c.ask("client", c.ip("web"), 80, count=60)
    assert outcomes(tcp) == {OK: 60}
    assert set(served(tcp)) == {"ns1/web-1", "ns1/web-2", "ns1/web-3"}
    assert seen(tcp) == {c.pod_ip("client")}, "a pod's own address must reach the backend"
    udp = c.ask("client", c.ip("dns"), 53, protocol=UDP, count=30)
    assert outcomes(udp) == {OK: 30} and len(served(udp)) == 3
    node = c.ask("node1", c.ip("web"), 80, count=30)
    assert outcomes(node) == {OK: 30} and "ns1/web-1" in served(node)
    # Masqueraded: towards its own pod the node speaks from the pod veth's address.
    local = {s.seen_client.rsplit(":", 1)[0] for s in node.samples if s.backend == "ns1/web-1"}
    assert local == {"169.254.1.1"}, local


def test_node_port_and_large_udp_from_an_external_client(cluster):
    c, dp = cluster
    both = web("np", ServicePort(80, TCP, "tcp", 8080), ServicePort(80, UDP, "udp", 8080),
               type=TYPE_NODE_PORT)
    c.apply(dp, [both])
    port = next(p.node_port for p in c.state.service_obj("ns1", "np").ports)
    payload = bytes(range(256)) * 8  # 2,048 bytes: UDP goes as fragments
    for node_ip in ("198.18.0.1", "198.18.0.2"):
        for proto in (TCP, UDP):
            r = c.ask("external", node_ip, port, protocol=proto, count=10, payload=payload)
            assert outcomes(r) == {OK: 10}, (node_ip, proto, r.summary())
            assert EXTERNAL_CLIENT not in seen(r), "Cluster policy masquerades"


def test_external_traffic_policy_local_keeps_the_client_address(cluster):
    c, dp = cluster
    svc = web("local", type=TYPE_NODE_PORT, external_traffic_policy=POLICY_LOCAL)
    c.apply(dp, [svc])
    port = c.state.service_obj("ns1", "local").ports[0].node_port
    r = c.ask("external", "198.18.0.1", port, count=10)  # node1 holds web-1 only
    assert served(r) == {"ns1/web-1": 10} and seen(r) == {EXTERNAL_CLIENT}
    c.apply(dp, [svc], relabel={"web-1": "moved"})  # node1 has no local endpoint now
    r = c.ask("external", "198.18.0.1", port, count=3, timeout=0.3)
    assert OK not in outcomes(r), r.summary()
    pod = c.ask("client", "198.18.0.1", port, count=10)  # pods short-circuit to every endpoint
    assert outcomes(pod) == {OK: 10} and set(served(pod)) <= {"ns1/web-2", "ns1/web-3"}


def test_hairpin_and_no_endpoints(cluster):
    c, dp = cluster
    c.apply(dp, [web("self", app="hairpin"), web("empty", app="nobody")],
            relabel={"web-1": "hairpin"})
    r = c.ask("web-1", c.ip("self"), 80, count=5)
    assert served(r) == {"ns1/web-1": 5}
    assert c.pod_ip("web-1") not in seen(r), "a pod reaching itself must be masqueraded"
    for source in ("client", "node1"):
        r = c.ask(source, c.ip("empty"), 80, count=5, timeout=1.0)
        assert outcomes(r) == {"refused": 5}, (source, r.summary())


def test_client_ip_affinity_sticks_and_forgets_removed_endpoints(cluster):
    c, dp = cluster
    svc = web("sticky", session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=60)
    c.apply(dp, [svc])
    r = c.ask("client", c.ip("sticky"), 80, count=20)
    assert outcomes(r) == {OK: 20} and len(served(r)) == 1, r.summary()
    chosen = next(iter(served(r))).split("/")[1]
    node1 = c.node("node1")
    assert AFFINITY in nft(node1, "list", "set", FAMILY, TABLE, AFFINITY)
    stats = c.apply(dp, [svc], relabel={chosen: "gone"})
    assert not stats[0].full and stats[0].extra["affinity_forgotten"] >= 1
    r = c.ask("client", c.ip("sticky"), 80, count=20)
    assert outcomes(r) == {OK: 20} and len(served(r)) == 1
    assert f"ns1/{chosen}" not in served(r)


# --------------------------------------------------------------------------- syncs


def test_incremental_sync_touches_only_the_changed_service(cluster):
    c, dp = cluster
    services = [web("a"), web("b"), web("c", app="other")]
    c.apply(dp, services)
    node = c.node("node1")
    before = endpoint_slots(node)
    stats = c.apply(dp, services, relabel={"web-3": "other"})  # web-3 leaves a, b; joins c
    s = stats[0]
    assert not s.full
    assert s.extra["services_changed"] == 3, s.extra  # a, b and c; nothing else
    assert s.changed == s.extra["elements_added"] + s.extra["elements_deleted"] + len(
        s.extra["chains_written"]) + len(s.extra["chains_deleted"])
    # a and b move to the 2-endpoint class (membership, and their 2 slots to its map) from
    # the 3-endpoint class (membership, 3 slots each), which this full sync then purges;
    # c: out of no-endpoint-services-reject, into the 1-endpoint class with its slot;
    # web-3 stays in the hairpin set.
    assert s.extra["elements_added"] + s.extra["elements_deleted"] == 2 * 3 + 2 + 2 * 4 + 1, (
        s.extra)
    assert s.extra["chains_deleted"] == ["cluster-ip-tcp-3"]
    after = endpoint_slots(node)
    # web-1 and web-2 keep their slots in a and b (affinity stays valid).
    assert len(before & after) >= 4, "endpoints that stayed moved to other slots"
    r = c.ask("client", c.ip("c"), 80, count=10)
    assert served(r) == {"ns1/web-3": 10}
    r = c.ask("client", c.ip("a"), 80, count=30)
    assert set(served(r)) == {"ns1/web-1", "ns1/web-2"}
    again = c.apply(dp, services, relabel={"web-3": "other"})
    assert not again[0].full and again[0].changed == 0 and again[0].payload_bytes == 0


def test_table_altered_from_outside_forces_a_full_sync(cluster):
    c, dp = cluster
    services = [web("a")]
    c.apply(dp, services)
    node = c.node("node1")
    nft(node, "flush", "chain", FAMILY, TABLE, "cluster-ip-tcp")  # no ClusterIP is served
    r = c.ask("client", c.ip("a"), 80, count=2, timeout=0.3)
    assert OK not in outcomes(r)
    stats = c.apply(dp, services)
    assert stats[0].full, "the generation moved: the next sync must be full"
    assert outcomes(c.ask("client", c.ip("a"), 80, count=5)) == {OK: 5}
    node.run(["nft", "delete", "table", FAMILY, TABLE])
    assert c.apply(dp, services)[0].full
    assert outcomes(c.ask("client", c.ip("a"), 80, count=5)) == {OK: 5}


def test_udp_flows_move_when_their_endpoint_leaves(cluster):
    c, dp = cluster
    svc = web("udp", ServicePort(53, UDP, "dns", 8080))
    c.apply(dp, [svc])
    first = c.ask("client", c.ip("udp"), 53, protocol=UDP, count=5, source_port=40053)
    assert len(served(first)) == 1, "one source port, one conntrack flow, one backend"
    gone = next(iter(served(first))).split("/")[1]
    stats = c.apply(dp, [svc], relabel={gone: "elsewhere"})
    assert stats[0].extra["conntrack_deletes"] >= 1
    after = c.ask("client", c.ip("udp"), 53, protocol=UDP, count=5, source_port=40053)
    assert outcomes(after) == {OK: 5} and f"ns1/{gone}" not in served(after)


def test_uninstall_removes_the_table_and_a_failed_sync_is_reported(cluster):
    c, dp = cluster
    c.apply(dp, [web()])
    node = c.node("node1")
    assert TABLE in nft(node, "list", "tables")
    assert render_table(c.state.node_view("node1")).total_elements() > 0
    dp.uninstall(node)
    assert TABLE not in nft(node, "list", "tables")
    dp.uninstall(node)  # nothing left to remove is fine
    assert dp.sync(node, c.state.node_view("node1")).full
    view = c.state.node_view("node1")
    from dataclasses import replace

    broken = replace(view, services=(replace(view.services[0], cluster_ip="198.19.0.999"),))
    with pytest.raises(DataplaneError, match=r"198\.19\.0\.999"):
        dp.sync(node, broken, full=True)
    assert dp.sync(node, view).full, "a failed sync leaves nothing half-remembered"
