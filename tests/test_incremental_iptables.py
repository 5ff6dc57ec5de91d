"""The iptables mode's `update` against full syncs, on real nodes (no traffic).

Random change sequences (tests/incremental.py) and targeted ones, through a ServiceProxy:
after each change went through `update`, every node's KUBE-* chains and hooks as
`kernel_state` reads them back (iptables-save) equal what a proxy restart (uninstall,
install, one full sync) leaves. Also what `update` does when someone else changed the
rules: a flushed table (the canary check in its restore fails) or a deleted Service chain
that the update's restore refers to makes it raise FullSyncNeeded, and the full sync that
follows reads the kernel back and rewrites what is missing; a deleted chain nothing in the
update refers to stays missing until the next full sync (`ServiceProxy.resync`).
"""

from __future__ import annotations

import shlex
import shutil

import pytest

from clusters.netns import NetnsCluster
from dataplanes import healthcheck
from dataplanes.base import FullSyncNeeded
from dataplanes.iptables import (
    LARGE_CLUSTER_ENDPOINTS,
    IptablesDataplane,
    external_chain,
    firewall_chain,
    local_chain,
    service_chain,
)
from dataplanes.proxy import ServiceProxy
from kube.model import (
    AFFINITY_CLIENT_IP,
    POLICY_LOCAL,
    TCP,
    TYPE_LOAD_BALANCER,
    TYPE_NODE_PORT,
    UDP,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
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
LB_IP = "198.18.32.9"


def _needs(backend: str) -> None:
    if not shutil.which(f"iptables-{backend}-restore", path="/usr/sbin:/sbin:/usr/bin"):
        pytest.skip(f"iptables-{backend}-restore not installed")


@pytest.mark.parametrize(("seed", "backend"), [(21, "nft"), (22, "nft"), (23, "legacy")])
def test_random_changes_leave_the_rules_a_full_sync_leaves(seed, backend):
    _needs(backend)
    out = run_against_full_syncs(lambda: IptablesDataplane(backend),
                                 IptablesDataplane(backend).kernel_state,
                                 seed=seed, steps=32, check_every=8)
    assert out.updates > 0, out
    assert out.fallbacks == 0, out
    assert out.checkpoints >= 2, out


# --------------------------------------------------------------------------- targeted


class Rig:
    """A ServiceProxy of the iptables mode on the module's cluster, its calls counted."""

    def __init__(self, cluster: NetnsCluster, backend: str = "nft") -> None:
        self.cluster = cluster
        self.out = Outcome()
        self.dp = IptablesDataplane(backend)
        self.tracker = ChangeTracker(NODES)
        self.proxy = ServiceProxy(_Counting(self.dp, self.out), cluster.nodes, self.tracker)

    def apply(self, **kw):
        return {s.node: s for s in self.proxy.apply(**kw)}

    def state(self) -> dict:
        return {n.name: self.dp.kernel_state(n) for n in self.cluster.nodes}

    def nat_chains(self, node: str = "node1") -> set[str]:
        return set(self.state()[node]["nat"])

    def assert_as_full_sync(self) -> None:
        """What the updates left equals what a restart's full sync leaves."""
        got = self.state()
        self.proxy.restart()
        assert got == self.state()


@pytest.fixture(scope="module")
def cluster():
    _needs("nft")
    with NetnsCluster.create(2, agents=False) as made:
        yield made


@pytest.fixture
def rig(cluster):
    r = Rig(cluster)
    with r.proxy:
        pods = [Pod("ns1", f"web-{k}-{i}", {"app": "web"}, f"node{k}", PORTS)
                for k in (1, 2) for i in (1, 2)]
        r.apply(pods=pods)
        yield r


def web(name: str = "web", **kw) -> Service:
    port = ServicePort(80, kw.pop("protocol", TCP), "http", 8080, kw.pop("node_port", None))
    return Service("ns1", name, (port,), selector={"app": "web"}, **kw)


def view_of(r: Rig, name: str, node: str = "node1"):
    return next(v for v in r.tracker.views[node].values() if v.service == name)


def test_a_service_added_changed_and_removed(rig):
    rig.apply(services=[web("a")])
    assert rig.out.syncs == 2  # the first after install (the pods' apply) was full
    added = rig.apply(services=[web("b")])
    assert rig.out.updates == 4 and not added["node1"].full
    b = view_of(rig, "b")
    assert service_chain(b) in added["node1"].extra["changed_chains"]
    assert added["node1"].extra["shared_chains"] == ["nat/KUBE-SERVICES"]
    rig.assert_as_full_sync()
    # Its port renumbered: a new view key, the same chain names (kube-proxy hashes the name).
    renumbered = Service("ns1", "b", (ServicePort(81, TCP, "http", 8080),), selector={"app": "web"})
    rig.apply(services=[renumbered])
    assert service_chain(view_of(rig, "b")) in rig.nat_chains()
    rig.assert_as_full_sync()
    removed = rig.apply(delete_services=[("ns1", "b")])["node1"]
    assert not removed.full
    assert removed.extra["chains_deleted"] == 1 + len(b.all_reachable_endpoints)
    assert service_chain(b) not in rig.nat_chains()
    assert rig.out.fallbacks == 0
    rig.assert_as_full_sync()


def test_an_endpoint_going_unready_rewrites_only_its_service(rig):
    rig.apply(services=[web("a"), web("u", protocol=UDP)])
    before = rig.nat_chains()
    stats = rig.apply(pods=[Pod("ns1", "web-2-1", {"app": "web"}, "node2", PORTS, ready=False)])
    one = stats["node1"]
    assert not one.full and one.extra["shared_chains"] == [], one.extra
    # Each Service port: its SVC chain rewritten, the pod's SEP chain deleted.
    assert one.extra["chains_written"] == 2 and one.extra["chains_deleted"] == 2
    assert len(rig.nat_chains()) == len(before) - 2
    rig.assert_as_full_sync()


def test_nodeport_load_balancer_affinity_and_policy_changes(rig):
    rig.apply(services=[web("s")])
    updates = rig.out.updates
    steps = [
        (web("s", type=TYPE_NODE_PORT), {"nat/KUBE-NODEPORTS"}, external_chain),
        (web("s", type=TYPE_LOAD_BALANCER, load_balancer_ips=(LB_IP,),
             load_balancer_source_ranges=("198.18.0.0/24",)),
         {"nat/KUBE-SERVICES", "filter/KUBE-PROXY-FIREWALL"}, firewall_chain),
        (web("s", type=TYPE_LOAD_BALANCER, load_balancer_ips=(LB_IP,),
             external_traffic_policy=POLICY_LOCAL), {"filter/KUBE-PROXY-FIREWALL"}, local_chain),
        (web("s", type=TYPE_LOAD_BALANCER, load_balancer_ips=(LB_IP,),
             external_traffic_policy=POLICY_LOCAL, session_affinity=AFFINITY_CLIENT_IP),
         set(), local_chain),
        (web("s", internal_traffic_policy=POLICY_LOCAL), {"nat/KUBE-NODEPORTS"}, local_chain),
    ]
    for svc, shared, chain in steps:
        stats = rig.apply(services=[svc])["node1"]
        assert not stats.full, stats
        assert shared <= set(stats.extra["shared_chains"]), (svc, stats.extra)
        assert chain(view_of(rig, "s")) in rig.nat_chains()
        if svc.external_traffic_policy == POLICY_LOCAL:
            # The health server follows updates too: node1 has local endpoints.
            port = str(view_of(rig, "s").health_check_node_port)
            assert healthcheck.status(rig.cluster.nodes[0])["ports"][port][2] == 2
        rig.assert_as_full_sync()
    assert rig.out.fallbacks == 0 and rig.out.updates == updates + 2 * len(steps)


def test_a_flushed_nat_table_makes_the_update_ask_for_a_full_sync(rig):
    rig.apply(services=[web("a")])
    updates, syncs = rig.out.updates, rig.out.syncs
    node = rig.cluster.nodes[0]
    for flag in ("-F", "-X"):
        node.run([*rig.dp.iptables_cmd, "-t", "nat", flag])
    rig.apply(services=[web("b")])
    # node1's update failed its canary check and the proxy synced it whole; node2's went on.
    assert rig.out.fallbacks == 1 and rig.out.syncs == syncs + 1, rig.out
    assert rig.out.updates == updates + 1, rig.out
    assert service_chain(view_of(rig, "a")) in rig.nat_chains()
    rig.assert_as_full_sync()


def test_a_service_chain_deleted_by_hand(rig):
    other = Service("ns1", "b", (ServicePort(80, TCP, "http", 8080),), selector={"app": "b"})
    rig.apply(services=[web("a"), other],
              pods=[Pod("ns1", "b-1", {"app": "b"}, "node1", PORTS)])
    node = rig.cluster.nodes[0]
    a = view_of(rig, "a")
    chain = service_chain(a)
    nat = [*rig.dp.iptables_cmd, "-t", "nat"]
    jump = next(r for r in rig.state()["node1"]["nat"]["KUBE-SERVICES"] if r.endswith(chain))
    node.run([*nat, "-D", "KUBE-SERVICES", *shlex.split(jump)[2:]])
    node.run([*nat, "-F", chain])
    node.run([*nat, "-X", chain])
    # An endpoint change of b rewrites b's chains only: it cannot notice, and succeeds.
    rig.apply(pods=[Pod("ns1", "b-2", {"app": "b"}, "node2", PORTS)])
    assert rig.out.fallbacks == 0 and chain not in rig.nat_chains()
    # A new Service rebuilds KUBE-SERVICES, whose restore fails on the missing chain as a
    # whole: FullSyncNeeded, and the full sync puts it back.
    rig.apply(services=[web("c")])
    assert rig.out.fallbacks == 1 and chain in rig.nat_chains()
    rig.assert_as_full_sync()
    # A resync (full) finds what an update cannot see.
    node.run([*nat, "-F", chain])
    assert rig.proxy.resync()[0].extra["written"] == [f"nat/{chain}"]
    rig.assert_as_full_sync()


def test_crossing_the_large_cluster_threshold_is_a_full_sync(rig):
    def slice_of(n: int) -> EndpointSlice:
        eps = tuple(Endpoint((f"198.18.{160 + i // 250}.{1 + i % 250}",)) for i in range(n))
        return EndpointSlice("ns1", "big-1", "big", eps, (EndpointPort(8080, TCP, "http"),))

    big = Service("ns1", "big", (ServicePort(80, TCP, "http", 8080),))
    rig.apply(services=[big], slices=[slice_of(LARGE_CLUSTER_ENDPOINTS - 1)])
    assert not rig.apply(slices=[slice_of(LARGE_CLUSTER_ENDPOINTS)])["node1"].full
    # One endpoint chain more: no per-endpoint comments any more, on every chain.
    crossed = rig.apply(slices=[slice_of(LARGE_CLUSTER_ENDPOINTS + 1)])["node1"]
    assert crossed.full and crossed.extra["large_cluster"] and rig.out.fallbacks == 2
    assert not rig.apply(slices=[slice_of(LARGE_CLUSTER_ENDPOINTS + 2)])["node1"].full
    rig.assert_as_full_sync()


def test_update_without_memory_asks_for_a_full_sync(cluster):
    dp = IptablesDataplane("nft")
    with pytest.raises(FullSyncNeeded):
        dp.update(cluster.nodes[0], NodeChanges("node1"))
