"""The ebpf mode's `update(node, changes)` against full syncs, on a real namespace cluster.

Random change sequences (tests/incremental.py) compare the maps, hooks, routes and health
ports as `kernel_state` reads them back after updates with what a restart's full sync
leaves. Targeted cases check what an update writes for one change (a Service added,
changed, removed; an endpoint unready; NodePort, load-balancer, affinity and policy
changes), what Services share (an element two Services render, an externalIP's host
route, a health-check port), and state removed by others:

- a map element deleted by hand is not looked for by `update` (that would read the whole
  map back): the next `sync`/`resync` reads lb4_services back and writes it again;
- a flushed map (its canary gone) or a node written by another data plane object (its
  canary holds another token) makes `update` raise FullSyncNeeded, so ServiceProxy syncs.
"""

from __future__ import annotations

import socket

import pytest

from bpf import maps, syscall
from clusters.netns import NetnsCluster
from dataplanes.base import FullSyncNeeded
from dataplanes.ebpf import CANARY_KEY, HOST_TABLE, EbpfDataplane
from dataplanes.proxy import ServiceProxy
from kube.model import (
    AFFINITY_CLIENT_IP,
    POLICY_LOCAL,
    TCP,
    TYPE_LOAD_BALANCER,
    TYPE_NODE_PORT,
    UDP,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Service,
    ServicePort,
)
from kube.tracker import ChangeTracker, NodeChanges, view_key
from tests.incremental import run_against_full_syncs

pytestmark = pytest.mark.root
NS = "ns1"
NODES = [Node.numbered(1), Node.numbered(2)]
LB_IP = "198.18.32.7"
EXTERNAL_IP = "198.18.64.21"
POD1 = "198.18.129.10"  # node1's pod CIDR
POD2 = "198.18.130.10"  # node2's


@pytest.fixture(scope="module")
def cluster():
    from dataplanes.base import Host
    from dataplanes.modes import make

    missing = make("ebpf").missing(Host())
    if missing:
        pytest.skip("; ".join(missing))
    with NetnsCluster.create(2, agents=False) as c:
        yield c


def _mode() -> EbpfDataplane:
    return EbpfDataplane()


@pytest.mark.parametrize("seed", [1, 7, 23])
def test_updates_leave_the_state_a_full_sync_leaves(seed):
    from dataplanes.base import Host

    missing = EbpfDataplane().missing(Host())
    if missing:
        pytest.skip("; ".join(missing))
    made: list[EbpfDataplane] = []

    def make() -> EbpfDataplane:
        made.append(EbpfDataplane())
        return made[-1]

    out = run_against_full_syncs(make, lambda node: made[0].kernel_state(node), seed=seed,
                                 steps=32, check_every=8)
    assert out.updates > 0 and out.fallbacks == 0 and out.checkpoints >= 2, out


# --------------------------------------------------------------------------- targeted


def svc(name: str, *ports: ServicePort, **fields) -> Service:
    return Service(NS, name, ports or (ServicePort(80, TCP, "http", 8080),), **fields)


def eps(name: str, *ips: tuple[str, str, bool], port: int = 8080) -> EndpointSlice:
    """A slice of (ip, node, ready) endpoints for Service `name`'s "http" (and "dns") port."""
    return EndpointSlice(NS, f"{name}-1", name,
                         tuple(Endpoint((ip,), ready=ready, node_name=node)
                               for ip, node, ready in ips),
                         (EndpointPort(port, TCP, "http"), EndpointPort(5353, UDP, "dns")))


class Lab:
    """A ServiceProxy of a fresh ebpf mode on the cluster, and its tracker."""

    def __init__(self, cluster: NetnsCluster) -> None:
        self.cluster = cluster
        self.dp = EbpfDataplane()
        self.tracker = ChangeTracker(NODES)
        self.proxy = ServiceProxy(self.dp, cluster.nodes, self.tracker)
        self.node = cluster.nodes[0]

    def apply(self, **kwargs):
        return {s.node: s for s in self.proxy.apply(**kwargs)}

    def state(self, node=None) -> dict:
        return self.dp.kernel_state(node or self.node)

    def frontends(self, node=None) -> dict[tuple[str, str], dict]:
        return {(f["frontend"], f["scope"]): f
                for g in self.state(node)["services"] for f in g["frontends"]}

    def restarted(self) -> dict:
        """Every node's state after a restart (a full sync of the same view)."""
        self.proxy.restart()
        return {n.name: self.dp.kernel_state(n) for n in self.cluster.nodes}


@pytest.fixture
def lab(cluster):
    lab = Lab(cluster)
    lab.proxy.install()
    lab.proxy.resync()
    try:
        yield lab
    finally:
        lab.proxy.uninstall()


def _cluster_ip(lab: Lab, name: str) -> str:
    return lab.tracker.services[(NS, name)].cluster_ip


def _node_port(lab: Lab, name: str) -> int:
    return lab.tracker.services[(NS, name)].ports[0].node_port


def test_one_service_added_changed_and_removed_costs_a_few_elements(lab):
    stats = lab.apply(services=[svc("web", selector=None)],
                      slices=[eps("web", (POD1, "node1", True), (POD2, "node2", True))])
    assert not stats["node1"].full and stats["node1"].changed == 1  # one ClusterIP element
    vip = _cluster_ip(lab, "web")
    assert lab.frontends()[(f"{vip}:80/TCP", "all")]["backends"] == [
        f"{POD1}:8080 local", f"{POD2}:8080"]
    # an endpoint going unready: the same element rewritten, nothing else
    stats = lab.apply(slices=[eps("web", (POD1, "node1", True), (POD2, "node2", False))])
    assert not stats["node1"].full and stats["node1"].changed == 1
    assert lab.frontends()[(f"{vip}:80/TCP", "all")]["backends"] == [f"{POD1}:8080 local"]
    # both unready: no endpoint anywhere, the frontend stays and rejects
    stats = lab.apply(slices=[eps("web", (POD1, "node1", False))])
    row = lab.frontends()[(f"{vip}:80/TCP", "all")]
    assert row["backends"] == [] and "drop-empty" not in row["flags"]
    got = {n.name: lab.state(n) for n in lab.cluster.nodes}
    assert lab.restarted() == got
    stats = lab.apply(delete_services=[(NS, "web")])
    assert not stats["node1"].full and stats["node1"].changed == 1
    assert lab.state()["services"] == []


def test_nodeport_affinity_and_policy_changes_follow_with_few_writes(lab):
    lab.apply(services=[svc("np", type=TYPE_NODE_PORT, selector=None)],
              slices=[eps("np", (POD2, "node2", True))])
    vip, port = _cluster_ip(lab, "np"), _node_port(lab, "np")
    rows = lab.frontends()
    assert set(rows) == {(f"{vip}:80/TCP", "all"), (f"198.18.0.1:{port}/TCP", "all")}
    # affinity on: both frontends carry it, nothing else changes
    stats = lab.apply(services=[svc("np", type=TYPE_NODE_PORT, selector=None,
                                    session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=9)])
    assert stats["node1"].changed == 2
    assert {r["affinity_timeout_s"] for r in lab.frontends().values()} == {9}
    # externalTrafficPolicy Local on node1 (no local endpoint): outsiders dropped, pods and
    # the node itself short-circuited to the cluster-wide endpoints (an internal scope)
    lab.apply(services=[svc("np", type=TYPE_NODE_PORT, selector=None,
                            external_traffic_policy=POLICY_LOCAL)])
    rows = lab.frontends()
    assert rows[(f"198.18.0.1:{port}/TCP", "all")]["backends"] == []
    assert "drop-empty" in rows[(f"198.18.0.1:{port}/TCP", "all")]["flags"]
    assert rows[(f"198.18.0.1:{port}/TCP", "internal")]["backends"] == [f"{POD2}:8080"]
    # a new nodePort: the old frontends go, the new ones come
    new_port = 30000 + (port - 30000 + 7) % 2768
    lab.apply(services=[svc("np", ServicePort(80, TCP, "http", 8080, node_port=new_port),
                            type=TYPE_NODE_PORT, selector=None)])
    assert set(lab.frontends()) == {(f"{vip}:80/TCP", "all"),
                                    (f"198.18.0.1:{new_port}/TCP", "all")}
    want = lab.restarted()
    assert want["node1"] == lab.state()


def test_load_balancer_ranges_shared_addresses_and_health_ports(lab):
    lb = dict(type=TYPE_LOAD_BALANCER, selector=None, load_balancer_ips=(LB_IP,),
              external_ips=(EXTERNAL_IP,))
    lab.apply(services=[svc("a", **lb, load_balancer_source_ranges=("198.18.0.0/24",)),
                        svc("b", **lb, external_traffic_policy=POLICY_LOCAL)],
              slices=[eps("a", (POD1, "node1", True)), eps("b", (POD2, "node2", True))])
    node = lab.node
    routes = lab.state()["routes"][str(HOST_TABLE)]
    assert any(r.startswith(f"{EXTERNAL_IP}/32") for r in routes)
    assert any(r.startswith(f"{LB_IP}/32") for r in routes)
    # "b" is later in the view's order: it holds the shared load-balancer frontend
    shared = lab.frontends()[(f"{LB_IP}:80/TCP", "all")]
    assert shared["backends"] == [] and "drop-empty" in shared["flags"]
    health = lab.tracker.services[(NS, "b")].health_check_node_port
    assert lab.state()["health_ports"] == {str(health): [NS, "b", 0]}
    # "b" goes: "a" takes the frontend back, with its source ranges; the route stays
    stats = lab.apply(delete_services=[(NS, "b")])
    assert not stats["node1"].full
    state = lab.state()
    shared = lab.frontends()[(f"{LB_IP}:80/TCP", "all")]
    assert shared["backends"] == [f"{POD1}:8080 local"] and "source-ranges" in shared["flags"]
    group = next(g for g in state["services"]
                 if any(f["frontend"] == f"{LB_IP}:80/TCP" for f in g["frontends"]))
    assert group["source_ranges"] == ["198.18.0.0/24"]
    assert any(r.startswith(f"{LB_IP}/32") for r in state["routes"][str(HOST_TABLE)])
    assert state["health_ports"] == {}
    # ranges changed live, then the last user of the addresses goes: routes and keys go
    lab.apply(services=[svc("a", **lb, load_balancer_source_ranges=("198.18.0.200/32",))])
    assert [g["source_ranges"] for g in lab.state()["services"]
            if any(f["frontend"] == f"{LB_IP}:80/TCP" for f in g["frontends"])] == [
        ["198.18.0.200/32"]]
    want = lab.restarted()
    assert want[node.name] == lab.state()
    lab.apply(delete_services=[(NS, "a")])
    state = lab.state()
    assert state["services"] == [] and state["source_ranges_without_frontend"] == []
    assert not any(EXTERNAL_IP in r or LB_IP in r for r in state["routes"][str(HOST_TABLE)])


def _map(lab: Lab, name: str) -> maps.BpfMap:
    """The node's map opened anew by id, as another tool (bpftool) would."""
    objects = lab.dp._nodes[lab.node.netns].objects
    map_id = syscall.map_info(objects.map(name).fd)["id"]
    fd = syscall.map_fd_by_id(map_id)
    return maps.BpfMap(fd, maps.LAYOUTS[name])


def test_an_element_deleted_by_hand_comes_back_with_the_next_sync(lab):
    lab.apply(services=[svc("web", selector=None), svc("other", selector=None)],
              slices=[eps("web", (POD1, "node1", True)), eps("other", (POD2, "node2", True))])
    before = lab.state()
    vip = _cluster_ip(lab, "web")
    other = _map(lab, "lb4_services")
    try:
        key = maps.LB4_KEY.pack(socket.inet_aton(vip), socket.htons(80), 0, socket.IPPROTO_TCP,
                                maps.LB_SCOPE_ALL, 0)
        assert other.delete(key)
    finally:
        syscall.close(other.fd)
    assert (f"{vip}:80/TCP", "all") not in lab.frontends()
    # an update of another Service does not look for it (documented)...
    stats = lab.apply(slices=[eps("other", (POD2, "node2", True), (POD1, "node1", True))])
    assert not stats["node1"].full
    assert (f"{vip}:80/TCP", "all") not in lab.frontends()
    # ...the next sync reads lb4_services back and writes it again
    stats = {s.node: s for s in lab.proxy.resync()}
    assert any("rewrote 1 map elements" in line for line in stats["node1"].extra["repaired"])
    rows = lab.frontends()
    assert rows[(f"{vip}:80/TCP", "all")]["backends"] == [f"{POD1}:8080 local"]
    assert before["services"] != lab.state()["services"]  # "other" changed meanwhile
    assert lab.restarted()["node1"] == lab.state()


def test_a_flushed_map_or_another_writer_makes_update_ask_for_a_full_sync(lab):
    lab.apply(services=[svc("web", selector=None)], slices=[eps("web", (POD1, "node1", True))])
    vip = _cluster_ip(lab, "web")
    other = _map(lab, "lb4_services")
    try:  # someone empties the map, the canary with it
        for key in other.dump():
            other.delete(key[0])
    finally:
        syscall.close(other.fd)
    changed = next(iter(lab.tracker.views["node1"].values()))
    with pytest.raises(FullSyncNeeded):
        lab.dp.update(lab.node, NodeChanges("node1", updated={view_key(changed): changed}))
    stats = lab.apply(slices=[eps("web", (POD1, "node1", True), (POD2, "node2", True))])
    assert stats["node1"].full  # ServiceProxy fell back to a sync
    assert lab.frontends()[(f"{vip}:80/TCP", "all")]["backends"] == [
        f"{POD1}:8080 local", f"{POD2}:8080"]
    # another data plane object (another process) syncs the node: its token in the canary
    second = EbpfDataplane()
    try:
        second.sync(lab.node, lab.tracker.node_view("node1"))
        objects = lab.dp._nodes[lab.node.netns].objects
        assert objects.map("lb4_services").lookup(CANARY_KEY) != lab.dp._nodes[
            lab.node.netns].canary
    finally:
        for st in second._nodes.values():
            st.objects.close()
    stats = lab.apply(delete_services=[(NS, "web")])
    assert stats["node1"].full
    assert lab.state()["services"] == []
