"""IPVS mode's `update`: changes applied from the mirror equal full syncs.

On the host (pure): `LayoutMirror.change` after random change sequences equals the whole
layout, and its difference, applied strictly to a model of the kernel (adding what exists
or deleting what does not fails, as netlink does), turns the old layout into the new one.

In the guest (`test_guest_*`, run by `test_incremental_ipvs_in_guest` inside one
User-Mode-Linux guest, since this host's kernel has no IPVS): `run_against_full_syncs`
compares the kernel state after updates with a restart's, and targeted changes check what
one update writes. Kernel state removed by hand: an update that touches it is refused by
the kernel, marks the node dirty and asks for a full sync (FullSyncNeeded), which repairs
it; state no update touches stays missing until the next full sync (`resync`), as
kube-proxy's periodic full sync repairs it.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest

from bench.synthetic import one_endpoint_fewer, sync_view
from clusters.netns import NetnsCluster
from dataplanes import ipvs_layout
from dataplanes.base import FullSyncNeeded
from dataplanes.ipvs import IpvsDataplane
from dataplanes.ipvs_codec import changes_to_messages
from dataplanes.ipvs_kernel import IpvsNetlink
from dataplanes.ipvs_layout import (
    KUBE_LOAD_BALANCER,
    KUBE_LOAD_BALANCER_FW,
    KUBE_LOAD_BALANCER_SOURCE_CIDR,
    KUBE_LOOP_BACK,
    KUBE_NODE_PORT_LOCAL_TCP,
    KUBE_NODE_PORT_TCP,
    IpvsChanges,
    IpvsLayout,
    LayoutDelta,
    LayoutMirror,
    VirtualServer,
    desired_layout,
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
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState, StateError
from kube.tracker import ChangeTracker, NodeChanges, view_key
from tests.changes import NODES, Oracle, random_step
from tests.guest import guest_junit
from tests.incremental import run_against_full_syncs

# --------------------------------------------------------------------------- a kernel model


class KernelModel:
    """What IPVS, the ipsets and kube-ipvs0 hold, changed as strictly as the kernel does."""

    def __init__(self, layout: IpvsLayout) -> None:
        self.layout = layout

    def apply(self, delta: LayoutDelta) -> None:
        held, ch = self.layout, delta.ipvs
        gone = {vs.key for vs in ch.delete_services}
        for vs, rs in ch.delete_dests:
            assert vs.key not in gone, f"{rs} of {vs}: deleted with its virtual server"
            assert rs.key in held.dests[vs.key], f"delete missing real server {rs} of {vs}"
            del held.dests[vs.key][rs.key]
        for vs in ch.delete_services:
            assert vs.key in held.services, f"delete missing virtual server {vs}"
            del held.services[vs.key], held.dests[vs.key]
        for vs in ch.add_services:
            assert vs.key not in held.services, f"add existing virtual server {vs}"
            held.services[vs.key], held.dests[vs.key] = vs, {}
        for vs in ch.edit_services:
            assert held.services[vs.key] != vs, f"edit {vs} to what it is"
            held.services[vs.key] = vs
        for vs, rs in ch.add_dests:
            assert rs.key not in held.dests[vs.key], f"add existing real server {rs} to {vs}"
            held.dests[vs.key][rs.key] = rs
        for vs, rs in ch.edit_dests:
            assert held.dests[vs.key][rs.key] != rs
            held.dests[vs.key][rs.key] = rs
        for name, entry in delta.delete_members:
            held.ipsets[name].remove(entry)
        for name, entry in delta.add_members:
            assert entry not in held.ipsets[name], (name, entry)
            held.ipsets[name].add(entry)
        for ip in delta.delete_addresses:
            held.addresses.remove(ip)
        for ip in delta.add_addresses:
            assert ip not in held.addresses, ip
            held.addresses.add(ip)


def _counts(layout: IpvsLayout) -> tuple[int, ...]:
    return tuple(len(layout.ipsets[s.name]) for s in ipvs_layout.IPSETS)


# --------------------------------------------------------------------------- host: pure


def _crowded(rng: random.Random, kwargs: dict, services: dict) -> None:
    """Squeeze the step's Services onto few load-balancer IPs and externalIPs, so that
    Services share virtual servers, VIPs and set members."""
    crowded = []
    for svc in kwargs.get("services", ()):
        if svc.type == TYPE_LOAD_BALANCER:
            svc = replace(svc, load_balancer_ips=(f"198.18.32.{rng.randint(1, 2)}",))
        if svc.type != "ExternalName" and rng.random() < 0.5:
            svc = replace(svc, external_ips=("198.18.64.1",))
        services[svc.key] = svc
        crowded.append(svc)
    kwargs["services"] = crowded


@pytest.mark.parametrize("seed", range(10))
def test_mirror_follows_random_changes_exactly(seed):
    rng = random.Random(seed)
    oracle = Oracle()
    tracker = ChangeTracker(NODES)
    counter = [0]
    mirrors = {n.name: LayoutMirror.of(tracker.node_view(n.name)) for n in NODES}
    kernels = {n.name: KernelModel(desired_layout(tracker.node_view(n.name))) for n in NODES}
    applied = shared = 0
    for step in range(60):
        kwargs, pods, services, slices = random_step(rng, oracle, tracker, counter)
        _crowded(rng, kwargs, services)
        try:
            changes = tracker.apply(**kwargs)
        except StateError:
            continue
        applied += 1
        oracle.pods, oracle.services, oracle.slices = pods, services, slices
        for node in NODES:
            mirror, change = mirrors[node.name], changes[node.name]
            delta = mirror.change(change.updated, change.removed)
            want = desired_layout(tracker.node_view(node.name))
            got = mirror.layout()
            where = f"seed {seed} step {step} {node.name}"
            assert (got.services, got.dests) == (want.services, want.dests), where
            assert (got.addresses, got.ipsets) == (want.addresses, want.ipsets), where
            assert mirror.set_counts() == _counts(want), where
            assert mirror.real_servers == want.real_server_count, where
            kernels[node.name].apply(delta)
            assert kernels[node.name].layout == want, where
            shared += sum(len(c) > 1 for c in mirror.claims.values())
    assert applied >= 40
    assert shared > 0  # Services sharing a load-balancer IP or externalIP on one port


NODES2 = (Node.numbered(1), Node.numbered(2))
PORTS = (ContainerPort(8080), ContainerPort(8080, UDP))


def _pods(ready: dict[str, bool] | None = None) -> list[Pod]:
    ready = ready or {}
    return [Pod("ns1", name, {"app": "web"}, node, PORTS, ready=ready.get(name, True))
            for name, node in (("web-1", "node1"), ("web-2", "node2"), ("web-3", "node2"))]


def _lb(name: str, ip: str, selector: dict, **kw) -> Service:
    return Service("ns1", name, (ServicePort(80, TCP, "http", 8080),), cluster_ip=ip,
                   selector=selector, type=TYPE_LOAD_BALANCER,
                   load_balancer_ips=("198.18.32.5",), **kw)


def _views(services, ready=None, node="node1"):
    state = ClusterState.build(NODES2, _pods(ready), services)
    return {view_key(v): v for v in state.node_view(node).services}, state.node_view(node)


def test_shared_load_balancer_ip_goes_to_the_last_port_and_stays_while_one_holds_it():
    a = _lb("a", "198.19.0.21", {"app": "web"})
    b = _lb("b", "198.19.0.22", {"app": "none"}, load_balancer_source_ranges=("198.18.0.0/24",))
    views, whole = _views([a, b])
    mirror = LayoutMirror.of(whole)
    lb = ("TCP", "198.18.32.5", 80)
    assert mirror.layout().dests[lb] == {}  # b's (no endpoints), the last in view order
    kernel = KernelModel(mirror.layout())
    (key_b,) = [k for k in views if k[1] == "b"]
    delta = mirror.change({}, [key_b])
    kernel.apply(delta)
    # a's real servers take over; the VIP and a's set members stay; b's firewall entries go.
    assert {(vs.ip, rs.ip) for vs, rs in delta.ipvs.add_dests} == {
        ("198.18.32.5", ip) for ip in ("198.18.129.2", "198.18.130.2", "198.18.130.3")}
    # b's own ClusterIP and NodePort go; the shared virtual server stays, with a's.
    assert {str(vs) for vs in delta.ipvs.delete_services} == {
        "TCP 198.19.0.22:80", f"TCP 198.18.0.1:{views[key_b].node_port}"}
    assert not delta.ipvs.add_services
    assert "198.18.32.5" not in delta.delete_addresses
    assert (KUBE_LOAD_BALANCER, "198.18.32.5,tcp:80") not in delta.delete_members
    assert (KUBE_LOAD_BALANCER_FW, "198.18.32.5,tcp:80") in delta.delete_members
    assert any(m[0] == KUBE_LOAD_BALANCER_SOURCE_CIDR for m in delta.delete_members)
    assert kernel.layout == desired_layout(_views([a])[1])
    (key_a,) = [k for k in views if k[1] == "a"]
    delta = mirror.change({}, [key_a])
    kernel.apply(delta)
    assert {str(vs) for vs in delta.ipvs.delete_services} == {
        "TCP 198.19.0.21:80", f"TCP 198.18.0.1:{views[key_a].node_port}", "TCP 198.18.32.5:80"}
    assert "198.18.32.5" in delta.delete_addresses
    assert kernel.layout == desired_layout(_views([])[1]) and not mirror.claims


def test_one_changed_port_is_laid_out_alone(monkeypatch):
    view = sync_view(2000)
    mirror = LayoutMirror.of(view)
    kernel = KernelModel(mirror.layout())
    changed = one_endpoint_fewer(view, 1000).services[1000]
    calls = []
    real = ipvs_layout.port_layout
    monkeypatch.setattr(ipvs_layout, "port_layout", lambda *a: calls.append(a) or real(*a))
    delta = mirror.change({view_key(changed): changed})
    assert len(calls) == 1
    # One real server goes; its hairpin entry stays: other Services share that endpoint.
    assert len(delta.ipvs) == len(delta.ipvs.delete_dests) == 1
    assert not delta.add_members and not delta.delete_members
    kernel.apply(delta)
    assert kernel.layout == desired_layout(one_endpoint_fewer(view, 1000))
    assert not mirror.change({view_key(changed): changed})  # the same again: nothing


def test_policy_affinity_and_nodeport_changes_make_only_their_difference():
    web = Service("ns1", "web", (ServicePort(80, TCP, "http", 8080),), cluster_ip="198.19.0.31",
                  selector={"app": "web"}, type=TYPE_NODE_PORT)
    views, whole = _views([web], node="node2")
    mirror = LayoutMirror.of(whole)
    kernel = KernelModel(mirror.layout())
    (key,) = views
    node_port = views[key].node_port
    for changed, check in (
        (replace(web, session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=60),
         lambda d: len(d.ipvs) == len(d.ipvs.edit_services) == 2),  # ClusterIP and NodePort
        (replace(web, external_traffic_policy=POLICY_LOCAL),
         lambda d: d.add_members == [(KUBE_NODE_PORT_LOCAL_TCP, str(node_port))]
         and d.delete_members == [(KUBE_NODE_PORT_TCP, str(node_port))]
         and [rs.ip for _, rs in d.ipvs.delete_dests] == ["198.18.129.2"]),
    ):
        after, whole = _views([changed], node="node2")
        delta = mirror.change(after)
        assert check(delta), delta
        kernel.apply(delta)
        assert kernel.layout == desired_layout(whole)


def test_update_without_a_full_sync_asks_for_one():
    class Node:
        name, netns = "node1", "nowhere"

    with pytest.raises(FullSyncNeeded, match="no full sync"):
        IpvsDataplane().update(Node(), NodeChanges("node1"))


# --------------------------------------------------------------------------- the guest


@pytest.mark.root
@pytest.mark.timeout(900)
def test_incremental_ipvs_in_guest(tmp_path):
    """Boot one guest kernel and run this module's guest tests in it."""
    report = guest_junit(__file__, tmp_path)
    assert report.count("<testcase") >= 3 and "<skipped" not in report
    assert "<failure" not in report and "<error" not in report


def _needs_ipvs() -> None:
    if not os.path.exists("/proc/net/ip_vs"):
        pytest.skip("needs a kernel with IPVS: test_incremental_ipvs_in_guest runs this inside "
                    "the UML guest")


@pytest.mark.parametrize("seed", [1])  # one: processes start slowly in the guest
def test_guest_updates_equal_full_syncs(seed):
    _needs_ipvs()
    out = run_against_full_syncs(IpvsDataplane, IpvsDataplane().kernel_state, seed=seed,
                                 steps=24, check_every=12)
    print(f"seed {seed}: {out}")
    assert out.updates > 0 and out.fallbacks == 0 and out.checkpoints >= 2, out


class Guest:
    """A two-node NetnsCluster (no agents) with IPVS mode fed by a ServiceProxy."""

    def __init__(self, cluster, proxy, dp: IpvsDataplane, tracker: ChangeTracker) -> None:
        self.cluster, self.proxy, self.dp, self.tracker = cluster, proxy, dp, tracker

    def apply(self, **kwargs) -> dict:
        return {s.node: s for s in self.proxy.apply(**kwargs)}

    def state(self, node: str = "node1") -> dict:
        return self.dp.kernel_state(self.cluster.node(node))

    def servers(self, node: str = "node1") -> dict:
        return self.state(node)["virtual_servers"]

    def ip(self, pod: str) -> str:
        return self.tracker.pods[("ns1", pod)].ip

    def matches_a_restart(self) -> None:
        got = {n.name: self.dp.kernel_state(n) for n in self.cluster.nodes}
        self.proxy.restart()
        assert got == {n.name: self.dp.kernel_state(n) for n in self.cluster.nodes}


@pytest.fixture
def guest():
    _needs_ipvs()
    tracker = ChangeTracker(NODES2)
    dp = IpvsDataplane()
    with NetnsCluster.create(2, agents=False) as cluster, \
            ServiceProxy(dp, cluster.nodes, tracker) as proxy:
        proxy.resync()
        yield Guest(cluster, proxy, dp, tracker)


def _web(**kw) -> Service:
    ports = (ServicePort(80, TCP, "tcp", 8080), ServicePort(80, UDP, "udp", 8080))
    return Service("ns1", "web", ports, cluster_ip="198.19.0.11", selector={"app": "web"}, **kw)


def _updates(stats: dict) -> bool:
    return all(s.extra.get("update") for s in stats.values())


def _half_open(node, sport: int, reply_src: str) -> list[str]:
    """A SYN_SENT flow from a pod-network address to 198.19.0.11:80, its replies expected
    from `reply_src` (the VIP itself: recorded untranslated)."""
    client = "198.18.129.250"
    return ["conntrack", "-I", "-p", "tcp", "--state", "SYN_SENT", "-t", "120", "-s", client,
            "-d", "198.19.0.11", "--sport", str(sport), "--dport", "80", "-r", reply_src,
            "-q", client, "--reply-port-src", "80" if reply_src == "198.19.0.11" else "8080",
            "--reply-port-dst", str(sport)]


def _flows(node) -> str:
    return node.run(["conntrack", "-L", "-p", "tcp", "-d", "198.19.0.11"], check=False).stdout


def test_guest_one_service_through_its_changes(guest):
    # A SYN sent to 198.19.0.11 before a Service had it left a half-open flow recorded
    # untranslated: the Service's first sync deletes it (IPVS could not translate a client
    # port that comes round again to it); a translated one stays.
    node1 = guest.cluster.node("node1")
    for argv in (_half_open(node1, 41001, "198.19.0.11"), _half_open(node1, 41003, "198.18.129.2")):
        node1.run(argv)
    assert "sport=41001" in _flows(node1) and "sport=41003" in _flows(node1)
    first = guest.apply(pods=_pods(), services=[_web()])
    assert _updates(first)
    flows = _flows(node1)
    assert "sport=41001" not in flows and "sport=41003" in flows, flows
    # Two virtual servers (TCP, UDP) with three real servers each; the ClusterIP on kube-ipvs0.
    assert first["node1"].extra["netlink_messages"] == 8
    held = guest.servers()
    eps = {f"{guest.ip(p)}:8080": 1 for p in ("web-1", "web-2", "web-3")}
    assert held["TCP 198.19.0.11:80"] == {"scheduler": "rr", "persistence_s": 0,
                                          "real_servers": eps}
    assert "198.19.0.11" in guest.state()["addresses"]

    unready = guest.apply(pods=_pods({"web-3": False}))
    for stats in unready.values():
        # web-3's real server out of both virtual servers, its two hairpin entries, and the
        # UDP flows towards it.
        assert stats.extra["update"] and stats.extra["netlink_messages"] == 2
        assert stats.extra["ipset_changes"] == 2 and stats.extra["conntrack_deletes"] == 1
    assert f"{guest.ip('web-3')}:8080" not in guest.servers()["UDP 198.19.0.11:80"]["real_servers"]
    loop_back = guest.state("node2")["ipsets"][KUBE_LOOP_BACK]
    assert not any(m.startswith(guest.ip("web-3") + ",") for m in loop_back)

    node_port = guest.apply(services=[_web(type=TYPE_NODE_PORT)])
    assert _updates(node_port)
    np = guest.tracker.services[("ns1", "web")].ports[0].node_port
    assert f"TCP 198.18.0.2:{np}" in guest.servers("node2")
    assert guest.state()["ipsets"][KUBE_NODE_PORT_TCP] == [str(np)]

    sticky = guest.apply(services=[_web(type=TYPE_NODE_PORT, session_affinity=AFFINITY_CLIENT_IP,
                                        affinity_timeout_s=60)])
    assert sticky["node1"].extra["netlink_messages"] == 4  # four virtual servers edited
    assert sticky["node1"].extra["ipset_changes"] == 0
    assert guest.servers()[f"UDP 198.18.0.1:{np}"]["persistence_s"] == 60

    local = guest.apply(services=[_web(type=TYPE_NODE_PORT, external_traffic_policy=POLICY_LOCAL)])
    assert _updates(local)
    # node1 keeps only web-1 behind its NodePort; the port moves to the Local set.
    assert guest.servers()[f"TCP 198.18.0.1:{np}"]["real_servers"] == {
        f"{guest.ip('web-1')}:8080": 1}
    assert guest.state()["ipsets"][KUBE_NODE_PORT_LOCAL_TCP] == [str(np)]
    assert guest.state()["ipsets"][KUBE_NODE_PORT_TCP] == []

    ranges = ("198.18.0.200/32",)
    lb = _web(type=TYPE_LOAD_BALANCER, load_balancer_ips=("198.18.32.5",),
              load_balancer_source_ranges=ranges)
    assert _updates(guest.apply(services=[lb]))
    assert "TCP 198.18.32.5:80" in guest.servers()
    narrowed = guest.apply(services=[replace(lb, load_balancer_source_ranges=("198.18.1.0/24",))])
    # Only the source-range members change (TCP and UDP: one out, one in each).
    assert narrowed["node1"].extra["netlink_messages"] == 0
    assert narrowed["node1"].extra["ipset_changes"] == 4
    assert guest.state()["ipsets"][KUBE_LOAD_BALANCER_SOURCE_CIDR] == [
        "198.18.32.5,tcp:80,198.18.1.0/24", "198.18.32.5,udp:80,198.18.1.0/24"]
    guest.matches_a_restart()

    gone = guest.apply(delete_services=[("ns1", "web")])
    assert _updates(gone)
    state = guest.state()
    assert state["virtual_servers"] == {} and state["addresses"] == []
    assert all(members == [] for members in state["ipsets"].values())
    guest.matches_a_restart()


def test_guest_state_removed_by_hand(guest):
    guest.apply(pods=_pods(), services=[_web()])
    node1 = guest.cluster.node("node1")
    tcp = VirtualServer("TCP", "198.19.0.11", 80, "rr")

    def delete_by_hand() -> None:
        with IpvsNetlink() as nl:
            assert not nl.apply(changes_to_messages(IpvsChanges(delete_services=[tcp])))

    node1.call(delete_by_hand)
    # An update that does not touch it leaves it missing (a full sync repairs it) ...
    other = Service("ns1", "other", (ServicePort(81, TCP, "tcp", 8080),), cluster_ip="198.19.0.12",
                    selector={"app": "web"})
    assert _updates(guest.apply(services=[other]))
    assert "TCP 198.19.0.11:80" not in guest.servers()
    # ... one that touches it is refused by the kernel and becomes a full sync, which repairs.
    repaired = guest.apply(pods=_pods({"web-2": False}))
    assert "update" not in repaired["node1"].extra and repaired["node2"].extra["update"]
    assert set(guest.servers()["TCP 198.19.0.11:80"]["real_servers"]) == {
        f"{guest.ip(p)}:8080" for p in ("web-1", "web-3")}

    # kube-ipvs0 deleted by hand: the next update fails, marks the node dirty, and every
    # update after asks for a full sync until one ran.
    node1.run(["ip", "link", "del", "kube-ipvs0"])
    third = Service("ns1", "third", (ServicePort(82, TCP, "tcp", 8080),),
                    cluster_ip="198.19.0.13", selector={"app": "web"})
    with pytest.raises(FullSyncNeeded, match="kube-ipvs0 is gone"):
        guest.dp.update(node1, guest.tracker.apply(services=[third])["node1"])
    fourth = replace(third, name="fourth", cluster_ip="198.19.0.14")
    with pytest.raises(FullSyncNeeded, match="earlier write"):
        guest.dp.update(node1, guest.tracker.apply(services=[fourth])["node1"])
    guest.proxy.resync()
    assert {"198.19.0.11", "198.19.0.13", "198.19.0.14"} <= set(guest.state()["addresses"])
    assert _updates(guest.apply(delete_services=[("ns1", "fourth")]))
    guest.matches_a_restart()
