"""The nftables mode's `update` against full syncs, on real nodes (no traffic).

Random change sequences (tests/incremental.py) and targeted ones: after each change went
through `update`, every node's table as `kernel_state` reads it back equals what a proxy
restart (uninstall, install, one full sync) leaves. Also: what `update` does when
someone else changed the table (the nf_tables generation moved: it raises
FullSyncNeeded, and the full sync that follows repairs the table), and when the kernel
refuses its transaction (the same, with the mirror dropped).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from clusters.netns import NetnsCluster
from dataplanes.base import DataplaneError, FullSyncNeeded
from dataplanes.nftables import NftablesDataplane
from dataplanes.nftlayout import FAMILY, TABLE
from dataplanes.proxy import ServiceProxy
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
from kube.tracker import ChangeTracker, NodeChanges
from tests.incremental import Outcome, _Counting, run_against_full_syncs

pytestmark = pytest.mark.root

NODES = [Node.numbered(1), Node.numbered(2)]
PORTS = (ContainerPort(8080), ContainerPort(8080, UDP))
LB_IP = "198.18.32.7"


def state(dp: NftablesDataplane, cluster: NetnsCluster) -> dict:
    return {n.name: dp.kernel_state(n) for n in cluster.nodes}


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_changes_leave_the_table_a_full_sync_leaves(seed):
    out = run_against_full_syncs(NftablesDataplane, NftablesDataplane().kernel_state,
                                 seed=seed, steps=40, check_every=8)
    assert out.updates > 0, out
    assert out.fallbacks == 0, out
    assert out.checkpoints >= 2, out


# --------------------------------------------------------------------------- targeted


class Rig:
    """A ServiceProxy of the mode over the module's two nodes, its syncs counted."""

    def __init__(self, cluster: NetnsCluster) -> None:
        self.cluster = cluster
        self.dp = NftablesDataplane()
        self.out = Outcome()
        self.tracker = ChangeTracker(NODES)
        self.proxy = ServiceProxy(_Counting(self.dp, self.out), cluster.nodes, self.tracker)
        self.pods = {f"web-{i}": Pod("ns1", f"web-{i}", {"app": "web"}, f"node{1 + i % 2}", PORTS)
                     for i in range(4)}

    def apply(self, **kw):
        updates, fallbacks = self.out.updates, self.out.fallbacks
        stats = self.proxy.apply(**kw)
        assert stats, "the change reached no node"
        return stats, self.out.updates - updates, self.out.fallbacks - fallbacks

    def pod(self, name: str, **kw) -> Pod:
        self.pods[name] = replace(self.pods[name], **kw)
        return self.pods[name]

    def same_as_a_restart(self) -> None:
        got = state(self.dp, self.cluster)
        self.proxy.restart()
        assert got == state(self.dp, self.cluster)


@pytest.fixture(scope="module")
def nodes():
    with NetnsCluster.create(2, agents=False) as cluster:
        yield cluster


@pytest.fixture
def rig(nodes):
    r = Rig(nodes)
    r.proxy.install()
    r.proxy.apply(pods=list(r.pods.values()))
    try:
        yield r
    finally:
        r.proxy.uninstall()


def web(name: str = "web", **kw) -> Service:
    ports = kw.pop("ports", (ServicePort(80, name="http", target_port=8080),))
    return Service("ns1", name, ports, selector={"app": kw.pop("app", "web")}, **kw)


def test_a_service_added_changed_and_removed(rig):
    stats, updates, _ = rig.apply(services=[web(), web("other", app="nobody")])
    assert updates == 2 and not any(s.full for s in stats)
    rig.same_as_a_restart()
    # Renumbered, and a UDP port added: the old frontend goes, two come.
    ports = (ServicePort(81, name="http", target_port=8080),
             ServicePort(53, UDP, "dns", target_port=8080))
    stats, updates, _ = rig.apply(services=[web(ports=ports)])
    assert updates == 2 and stats[0].extra["services_changed"] == 3  # one gone, two new
    rig.same_as_a_restart()
    stats, updates, _ = rig.apply(delete_services=[("ns1", "web")])
    assert updates == 2 and stats[0].extra["elements_added"] == 0
    rig.same_as_a_restart()


def test_endpoints_going_unready_and_back_move_between_classes(rig):
    rig.apply(services=[web()])
    for i in range(4):  # 4 endpoints down to none: REJECT, then back
        _, updates, _ = rig.apply(pods=[rig.pod(f"web-{i}", ready=False)])
        assert updates == 2
    reject = rig.dp.kernel_state(rig.cluster.nodes[0])["sets"]["no-endpoint-services-reject"]
    assert len(reject["elements"]) == 1
    for i in range(4):
        rig.apply(pods=[rig.pod(f"web-{i}", ready=True)])
    rig.same_as_a_restart()


def test_node_port_load_balancer_affinity_and_policy_changes(rig):
    svc = web()
    rig.apply(services=[svc])
    for change in (
        {"type": TYPE_NODE_PORT},
        {"type": TYPE_LOAD_BALANCER, "load_balancer_ips": (LB_IP,)},
        {"type": TYPE_LOAD_BALANCER, "load_balancer_ips": (LB_IP,),
         "load_balancer_source_ranges": ("198.18.0.0/24",)},
        {"type": TYPE_LOAD_BALANCER, "load_balancer_ips": (LB_IP,),
         "external_traffic_policy": POLICY_LOCAL},
        {"type": TYPE_NODE_PORT, "session_affinity": AFFINITY_CLIENT_IP,
         "affinity_timeout_s": 60},
        {"internal_traffic_policy": POLICY_LOCAL},
        {},
    ):
        stats, updates, fallbacks = rig.apply(services=[web(**change)])
        assert updates == 2 and fallbacks == 0, change
        rig.same_as_a_restart()


def test_an_element_removed_by_hand_makes_update_ask_for_a_full_sync(rig):
    rig.apply(services=[web()])
    node = rig.cluster.nodes[0]
    vip = rig.tracker.services["ns1", "web"].cluster_ip
    node.run(["nft", "delete", "element", FAMILY, TABLE, "cluster-ip-tcp-4-endpoints",
              f"{{ {vip} . 80 . 0 }}"])
    damaged = rig.dp.kernel_state(node)
    stats, updates, fallbacks = rig.apply(pods=[rig.pod("web-3", ready=False)])
    assert fallbacks == 1, "node1's generation moved: its update must not be trusted"
    assert updates == 1  # node2 was not touched
    assert [s.full for s in stats] == [True, False]
    assert rig.dp.kernel_state(node) != damaged
    rig.same_as_a_restart()


def test_a_chain_removed_by_hand_is_repaired_by_the_full_sync_update_asks_for(rig):
    rig.apply(services=[web()])
    node = rig.cluster.nodes[1]
    node.run(["nft", "flush", "chain", FAMILY, TABLE, "cluster-ip-tcp"])
    node.run(["nft", "delete", "chain", FAMILY, TABLE, "cluster-ip-tcp-4"])
    # update itself refuses, and keeps refusing: it forgot the node.
    change = NodeChanges(node.name)
    with pytest.raises(FullSyncNeeded):
        rig.dp.update(node, change)
    with pytest.raises(FullSyncNeeded):
        rig.dp.update(node, change)
    rig.proxy.resync()
    rig.same_as_a_restart()


def test_a_transaction_the_kernel_refuses_drops_the_mirror(rig, monkeypatch):
    rig.apply(services=[web()])
    real = rig.dp._transact

    def refuse(node, script):
        raise DataplaneError(f"nft -f failed on {node.name}: refused for the test")

    monkeypatch.setattr(rig.dp, "_transact", refuse)
    node = rig.cluster.nodes[0]
    with pytest.raises(FullSyncNeeded, match="refused for the test"):
        rig.dp.update(node, rig.tracker.apply(pods=[rig.pod("web-0", ready=False)])["node1"])
    monkeypatch.setattr(rig.dp, "_transact", real)
    with pytest.raises(FullSyncNeeded):  # no memory of node1 any more
        rig.dp.update(node, NodeChanges(node.name))
    rig.proxy.resync()
    rig.same_as_a_restart()


def test_a_class_comes_with_its_first_member_and_goes_at_a_full_sync(rig):
    """A new class appends its one rule to its path's chain; an emptied class stays idle
    (taking its rule out would bind every other class's set again, a walk of all their
    members) until the next full sync purges it; back in use, it costs no chain."""
    rig.apply(services=[web()])
    node = rig.cluster.nodes[0]
    stats, _, _ = rig.apply(pods=[rig.pod("web-0", ready=False)])  # 4 -> 3 endpoints
    assert stats[0].extra["chains_written"] == ["cluster-ip-tcp-3", "cluster-ip-tcp"]
    assert stats[0].extra["chains_deleted"] == []
    chains = node.run(["nft", "list", "chains", FAMILY]).stdout
    assert "cluster-ip-tcp-3" in chains and "cluster-ip-tcp-4" in chains  # 4: idle
    stats, _, _ = rig.apply(pods=[rig.pod("web-0", ready=True)])  # back to 4: no chain written
    assert stats[0].extra["chains_written"] == [] and stats[0].extra["chains_deleted"] == []
    stats, _, _ = rig.apply(pods=[rig.pod("web-0", ready=False)])
    assert stats[0].extra["chains_written"] == []
    (full,) = [s for s in rig.proxy.resync() if s.node == node.name]
    assert full.extra["chains_deleted"] == ["cluster-ip-tcp-4"]
    assert "cluster-ip-tcp-4" not in node.run(["nft", "list", "chains", FAMILY]).stdout
    rig.same_as_a_restart()
