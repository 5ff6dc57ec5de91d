"""The userspace mode's `update(node, changes)` against full syncs, on a real namespace
cluster.

Random change sequences (tests/incremental.py) compare the proxy's table (as it reports it
over its control channel), the portal sets, our iptables rules and the health ports after
updates with what a restart's full sync leaves. Targeted cases check what an update sends
and writes for one change, what Services share (a load-balancer portal two Services name,
its source ranges), and state changed by others:

- a set member or a rule someone removed is not looked for by `update` (that would read
  them all back): the next `sync`/`resync` rewrites the sets and rules;
- a proxy killed, restarted, or fed a table by another process makes `update` raise
  FullSyncNeeded (the proxy refuses a delta for a table it does not hold), so ServiceProxy
  syncs the node, restarting the proxy if needed.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from clusters.netns import NetnsCluster
from dataplanes.base import FullSyncNeeded, Host
from dataplanes.proxy import ServiceProxy
from dataplanes.userspace import (
    CHAINS,
    SET_FIREWALL,
    SET_FIREWALL_SOURCES,
    SET_REDIRECT,
    SET_REJECT,
    UserspaceDataplane,
)
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
LB_IP = "198.18.32.9"
POD1 = "198.18.129.10"  # node1's pod CIDR
POD2 = "198.18.130.10"  # node2's


def _skip_if_missing() -> None:
    missing = UserspaceDataplane().missing(Host())
    if missing:
        pytest.skip("; ".join(missing))


@pytest.fixture(scope="module")
def cluster():
    _skip_if_missing()
    with NetnsCluster.create(2, agents=False) as c:
        yield c


@pytest.mark.parametrize("seed", [2, 11])
def test_updates_leave_the_state_a_full_sync_leaves(seed):
    _skip_if_missing()
    made: list[UserspaceDataplane] = []

    def make() -> UserspaceDataplane:
        made.append(UserspaceDataplane())
        return made[-1]

    out = run_against_full_syncs(make, lambda node: made[0].kernel_state(node), seed=seed,
                                 steps=24, check_every=8)
    assert out.updates > 0 and out.fallbacks == 0 and out.checkpoints >= 2, out


# --------------------------------------------------------------------------- targeted


def svc(name: str, *ports: ServicePort, **fields) -> Service:
    return Service(NS, name, ports or (ServicePort(80, TCP, "http", 8080),), **fields)


def eps(name: str, *ips: tuple[str, str, bool]) -> EndpointSlice:
    return EndpointSlice(NS, f"{name}-1", name,
                         tuple(Endpoint((ip,), ready=ready, node_name=node)
                               for ip, node, ready in ips),
                         (EndpointPort(8080, TCP, "http"), EndpointPort(5353, UDP, "dns")))


class Lab:
    def __init__(self, cluster: NetnsCluster) -> None:
        self.cluster = cluster
        self.dp = UserspaceDataplane()
        self.tracker = ChangeTracker(NODES)
        self.proxy = ServiceProxy(self.dp, cluster.nodes, self.tracker)
        self.node = cluster.nodes[0]

    def apply(self, **kwargs):
        return {s.node: s for s in self.proxy.apply(**kwargs)}

    def state(self, node=None) -> dict:
        return self.dp.kernel_state(node or self.node)

    def members(self, name: str, node=None) -> list[str]:
        return self.state(node)["sets"][name]["members"]

    def entry(self, name: str, protocol: str = TCP) -> dict:
        return next(e for e in self.state()["proxy"]["services"]
                    if (e["name"], e["protocol"]) == (f"{NS}/{name}", protocol))

    def restarted(self) -> dict:
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


def test_one_service_added_changed_and_removed_sends_only_its_entry(lab):
    stats = lab.apply(services=[svc("web", selector=None)],
                      slices=[eps("web", (POD1, "node1", True), (POD2, "node2", True))])
    assert not stats["node1"].full and stats["node1"].rules == 1  # one entry sent
    assert stats["node1"].changed == 1  # one set member: the ClusterIP portal redirected
    vip = _cluster_ip(lab, "web")
    assert lab.members(SET_REDIRECT) == [f"{vip},tcp:80"]
    assert lab.entry("web:http")["internal"] == [[POD1, 8080], [POD2, 8080]]
    # an endpoint going unready: the entry again, no set member moves
    stats = lab.apply(slices=[eps("web", (POD1, "node1", True), (POD2, "node2", False))])
    assert not stats["node1"].full and stats["node1"].changed == 0
    assert lab.entry("web:http")["internal"] == [[POD1, 8080]]
    # none left: the portal moves from the redirect set to the reject set
    stats = lab.apply(slices=[eps("web", (POD1, "node1", False))])
    assert stats["node1"].changed == 2
    assert lab.members(SET_REDIRECT) == [] and lab.members(SET_REJECT) == [f"{vip},tcp:80"]
    got = {n.name: lab.state(n) for n in lab.cluster.nodes}
    assert lab.restarted() == got
    stats = lab.apply(delete_services=[(NS, "web")])
    assert not stats["node1"].full and stats["node1"].changed == 1
    state = lab.state()
    assert state["proxy"]["services"] == [] and state["sets"][SET_REJECT]["members"] == []


def test_nodeport_affinity_policy_and_shared_load_balancer_portals(lab):
    lb = dict(type=TYPE_LOAD_BALANCER, selector=None, load_balancer_ips=(LB_IP,))
    lab.apply(services=[svc("a", **lb, load_balancer_source_ranges=("198.18.0.0/24",)),
                        svc("b", **lb, external_traffic_policy=POLICY_LOCAL),
                        svc("np", type=TYPE_NODE_PORT, selector=None)],
              slices=[eps("a", (POD1, "node1", True)), eps("b", (POD2, "node2", True)),
                      eps("np", (POD2, "node2", True))])
    portals = {(p[1], p[2]): p for p in lab.state()["proxy"]["portals"]}
    # "b", later in the view's order, holds the shared load-balancer portal (outsiders
    # dropped on node1: its only endpoint is on node2); "a"'s source ranges stay in force
    assert portals[(LB_IP, 80)][3] == f"{NS}/b:http" and portals[(LB_IP, 80)][6] == (
        "external-local")
    assert lab.members(SET_FIREWALL) == [f"{LB_IP},tcp:80"]
    assert lab.members(SET_FIREWALL_SOURCES) == [f"{LB_IP},tcp:80,198.18.0.0/24"]
    health = lab.tracker.services[(NS, "b")].health_check_node_port
    assert lab.state()["health_ports"] == {str(health): [NS, "b", 0]}
    # "b" goes: "a" takes the portal back; the health port closes
    stats = lab.apply(delete_services=[(NS, "b")])
    assert not stats["node1"].full
    portals = {(p[1], p[2]): p for p in lab.state()["proxy"]["portals"]}
    assert portals[(LB_IP, 80)][3] == f"{NS}/a:http" and portals[(LB_IP, 80)][6] == "redirect"
    assert lab.state()["health_ports"] == {}
    # ranges changed live; affinity on; a new nodePort
    np_port = lab.tracker.services[(NS, "np")].ports[0].node_port
    new_port = 30000 + (np_port - 30000 + 5) % 2768
    stats = lab.apply(services=[
        svc("a", **lb, load_balancer_source_ranges=("198.18.0.200/32",)),
        svc("np", ServicePort(80, TCP, "http", 8080, node_port=new_port), type=TYPE_NODE_PORT,
            selector=None, session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=7)])
    assert not stats["node1"].full
    assert lab.members(SET_FIREWALL_SOURCES) == [f"{LB_IP},tcp:80,198.18.0.200"]  # /32 bare
    assert lab.entry("np:http")["affinity_s"] == 7
    redirected = lab.members(SET_REDIRECT)
    assert f"198.18.0.1,tcp:{new_port}" in redirected
    assert f"198.18.0.1,tcp:{np_port}" not in redirected
    got = {n.name: lab.state(n) for n in lab.cluster.nodes}
    assert lab.restarted() == got


def test_members_and_rules_removed_by_hand_come_back_with_the_next_sync(lab):
    lab.apply(services=[svc("web", selector=None)], slices=[eps("web", (POD1, "node1", True))])
    vip = _cluster_ip(lab, "web")
    node = lab.node
    node.run(["ipset", "del", SET_REDIRECT, f"{vip},tcp:80"])
    node.run(["iptables-nft", "-t", "nat", "-F"])
    # an update of another Service does not look for them (documented)...
    stats = lab.apply(services=[svc("other", selector=None)],
                      slices=[eps("other", (POD2, "node2", True))])
    assert not stats["node1"].full
    state = lab.state()
    assert f"{vip},tcp:80" not in state["sets"][SET_REDIRECT]["members"]
    # ...the next sync swaps the sets whole and rewrites the rules
    stats = {s.node: s for s in lab.proxy.resync()}
    assert stats["node1"].extra["rules_rewritten"]
    assert f"{vip},tcp:80" in lab.members(SET_REDIRECT)
    got = {n.name: lab.state(n) for n in lab.cluster.nodes}
    assert lab.restarted() == got


def test_a_proxy_restarted_or_fed_by_another_process_makes_update_ask_for_a_sync(lab):
    lab.apply(services=[svc("web", selector=None)], slices=[eps("web", (POD1, "node1", True))])
    node = lab.node
    # another process (a second data plane object) sends the node a whole table
    second = UserspaceDataplane()
    second.sync(node, lab.tracker.node_view("node1"))
    view = next(iter(lab.tracker.views["node1"].values()))
    with pytest.raises(FullSyncNeeded):
        lab.dp.update(node, NodeChanges("node1", updated={view_key(view): view}))
    stats = lab.apply(slices=[eps("web", (POD1, "node1", True), (POD2, "node2", True))])
    assert stats["node1"].full and lab.entry("web:http")["internal"] == [[POD1, 8080], [POD2, 8080]]
    # the proxy is killed: the next change restarts it through a full sync
    pid = lab.dp.proxy_pid(node)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while lab.dp.proxy_pid(node) == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = lab.apply(delete_services=[(NS, "web")])
    assert stats["node1"].full and stats["node1"].extra["proxy_spawned"]
    assert lab.dp.proxy_pid(node) not in (None, pid)
    assert lab.state()["proxy"]["services"] == []


def test_a_set_gone_makes_update_ask_for_a_sync_which_makes_it_again(lab):
    lab.apply(services=[svc("web", selector=None)], slices=[eps("web", (POD1, "node1", True))])
    node = lab.node
    for table, chain in CHAINS:  # someone empties our chains and destroys a set
        node.run(["iptables-nft", "-t", table, "-F", chain])
    node.run(["ipset", "destroy", SET_REDIRECT])
    view = next(iter(lab.tracker.views["node1"].values()))
    with pytest.raises(FullSyncNeeded):  # the portal's member has no set to leave
        lab.dp.update(node, NodeChanges("node1", removed={view_key(view): view}))
    stats = lab.apply(services=[svc("web", selector=None), svc("two", selector=None)],
                      slices=[eps("two", (POD2, "node2", True))])
    assert stats["node1"].full and stats["node1"].extra["rules_rewritten"]
    assert lab.members(SET_REDIRECT) == sorted(
        f"{_cluster_ip(lab, n)},tcp:80" for n in ("two", "web"))
    got = {n.name: lab.state(n) for n in lab.cluster.nodes}
    assert lab.restarted() == got
