"""The orchestration object on a real two-node namespace cluster with the iptables mode:
install, apply (only nodes whose views changed are synced), replace, a refused change,
resync, restart and teardown, with real traffic through the Services."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from clusters.workloads.probe import OK, probe
from dataplanes.base import FullSyncNeeded
from dataplanes.iptables import IptablesDataplane
from dataplanes.proxy import ServiceProxy
from kube.model import ContainerPort, Node, Pod, Service, ServicePort
from kube.state import StateError
from kube.tracker import ChangeTracker

pytestmark = pytest.mark.root
NS = "ns1"


class Recording:
    """The real iptables mode, with every call it gets written down (its `update` may be
    told to ask for a full sync, as a mode that lost track of a node does)."""

    def __init__(self, tracker: ChangeTracker) -> None:
        self.tracker = tracker
        self.mode = IptablesDataplane()
        self.name = "iptables"
        self.calls: list[tuple[str, str, object]] = []

    def missing(self, host):
        return self.mode.missing(host)

    def install(self, node):
        self.calls.append(("install", node.name, None))
        self.mode.install(node)

    def uninstall(self, node):
        self.calls.append(("uninstall", node.name, None))
        self.mode.uninstall(node)

    def sync(self, node, view):
        self.calls.append(("sync", node.name, None))
        return self.mode.sync(node, view)

    lost: set[str] = set()  # nodes whose update asks for a full sync

    def update(self, node, changes):
        self.calls.append(("update", node.name, changes))
        if node.name in self.lost:
            raise FullSyncNeeded(f"{node.name} forgotten")
        stats = self.mode.update(node, changes)
        assert not stats.full
        return stats


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    from clusters.netns import NetnsCluster
    from kube.state import ClusterState

    nodes = [Node.numbered(1), Node.numbered(2)]
    pods = [Pod(NS, f"web-{k}", {"app": "web"}, f"node{k}", (ContainerPort(8080),))
            for k in (1, 2)] + [Pod(NS, "client", {"app": "client"}, "node1")]
    with NetnsCluster.create(2) as made:
        placed = ClusterState.build(nodes, pods).pods
        made.set_pods(placed)
        yield made, nodes, placed


def _served(made, ip: str, count: int = 20) -> Counter:
    from clusters.nsenter import in_netns

    result = in_netns(made.pod_netns(NS, "client"), probe, ip, 80, count=count, timeout=0.5)
    return Counter(s.backend if s.outcome == OK else s.outcome for s in result.samples)


def test_the_proxy_installs_applies_changes_and_tears_down(cluster):
    made, nodes, pods = cluster
    tracker = ChangeTracker(nodes)
    mode = Recording(tracker)
    tracker.apply(pods=pods)
    web = Service(NS, "web", (ServicePort(80, target_port=8080),), selector={"app": "web"})
    with ServiceProxy(mode, made.nodes, tracker) as proxy:
        assert [c[:2] for c in mode.calls] == [("install", "node1"), ("install", "node2")]
        stats = proxy.apply(services=[web])
        # The first sync after install is a full one on every node.
        assert [(c[0], c[1]) for c in mode.calls[2:]] == [("sync", "node1"), ("sync", "node2")]
        assert [s.node for s in stats] == ["node1", "node2"]
        ip = tracker.services[(NS, "web")].cluster_ip
        assert set(_served(made, ip)) == {"ns1/web-1", "ns1/web-2"}

        # A change every node sees reaches the mode as that node's changes.
        del mode.calls[:]
        only_1 = Service(NS, "web", (ServicePort(80, target_port=8080),),
                         selector={"app": "web"}, internal_traffic_policy="Local")
        proxy.apply(services=[only_1])
        assert [c[:2] for c in mode.calls] == [("update", "node1"), ("update", "node2")]
        changes = mode.calls[0][2]
        assert [k[1] for k in changes.updated] == ["web"] and not changes.removed
        assert set(_served(made, ip)) == {"ns1/web-1"}  # the client runs on node1

        # A mode that lost track of a node gets a full sync of it instead.
        del mode.calls[:]
        mode.lost = {"node2"}
        proxy.apply(services=[web])
        assert [c[:2] for c in mode.calls] == [("update", "node1"), ("update", "node2"),
                                               ("sync", "node2")]
        mode.lost = set()
        proxy.apply(services=[only_1])

        # A change no view holds (a pod no Service selects) syncs nothing.
        del mode.calls[:]
        assert proxy.apply(pods=[Pod(NS, "client", {"app": "client", "x": "y"}, "node1")]) == []
        assert mode.calls == []

        # A refused change syncs nothing and keeps the state.
        thief = Service(NS, "thief", (ServicePort(80),), cluster_ip=ip)
        with pytest.raises(StateError, match="already used"):
            proxy.apply(services=[thief])
        assert mode.calls == [] and set(tracker.services) == {(NS, "web")}

        # replace(): the given Services are the only ones.
        proxy.replace(services=[])
        assert tracker.services == {}
        assert OK not in _served(made, ip, count=3)

        # A restart: uninstall, install, full sync, and the Service works again.
        proxy.replace(services=[web])
        del mode.calls[:]
        proxy.restart()
        assert [c[0] for c in mode.calls] == ["uninstall", "uninstall", "install", "install",
                                              "sync", "sync"]
        assert set(_served(made, tracker.services[(NS, "web")].cluster_ip)) == {
            "ns1/web-1", "ns1/web-2"}
    assert [c[:2] for c in mode.calls[-2:]] == [("uninstall", "node2"), ("uninstall", "node1")]
    # Torn down: the ClusterIP no longer leads anywhere.
    assert OK not in _served(made, ip, count=3)


def test_nodes_outside_the_state_are_refused(cluster):
    made, nodes, _ = cluster
    with pytest.raises(ValueError, match="node2 are not in the desired state"):
        ServiceProxy(IptablesDataplane(), made.nodes, ChangeTracker(nodes[:1]))
