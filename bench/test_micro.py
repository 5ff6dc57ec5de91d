"""Micro benchmarks (pytest-benchmark): render and sync of each mode at 1,000 and 10,000 Services.

Not part of `tests/` (they take minutes at 10,000 Services). `nox -s nightly` runs them
with noxfile.MICRO_COMPARE_ARGS: timings saved as JSON under runs/micro and compared with
the previous saved run. By hand:

    python -m pytest bench/test_micro.py --benchmark-autosave --benchmark-storage=file://runs/micro

Render needs no root and runs for modes with a text form (`render(view) -> str`); sync
programs a fresh, agentless node namespace from empty in every round (its first full sync
through dataplanes/proxy.py's ServiceProxy) and needs root.
A mode this host cannot run is skipped with its reason.
"""

from __future__ import annotations

import functools
import os

import pytest

from bench.sweep import NAMESPACE_SCOPED, ModeUnavailable, load_mode
from bench.synthetic import AFFINITY_EVERY, NODEPORT_EVERY, pool_pods, synthetic_services
from dataplanes.modes import MODES, make
from kube.model import Node
from kube.state import ClusterState, NodeView

pytest.importorskip("pytest_benchmark")

SIZES = (1000, 10000)
ROUNDS = {1000: 3, 10000: 1}  # a sync of 10,000 Services takes seconds to a minute


@functools.cache
def tracker(n: int):
    """A ChangeTracker holding the sweep's n synthetic Services (NodePorts and affinity mixed
    in) over a pool of six pods on node2."""
    from kube.tracker import ChangeTracker

    nodes = [Node.numbered(1), Node.numbered(2)]
    pool = list(ClusterState.build(nodes, pool_pods(["node2"], 6)).pods)
    services, slices = synthetic_services(n, pool, 3, NODEPORT_EVERY, AFFINITY_EVERY)
    made = ChangeTracker(nodes)
    made.apply(pods=pool, services=services, slices=slices)
    return made


def view(n: int) -> NodeView:
    """node1's view of them (cached by the tracker)."""
    return tracker(n).node_view("node1")


def _loadable(mode: str):
    try:
        return make(mode)
    except ImportError as exc:
        pytest.skip(f"{mode}: its data plane does not load here ({exc})")


@pytest.fixture(scope="module")
def root_untouched():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    from clusters.safety import guard_root

    with guard_root():
        yield


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", list(MODES))
def test_render(benchmark, mode, n):
    dp = _loadable(mode)
    if not callable(getattr(dp, "render", None)):
        pytest.skip(f"{mode} programs the kernel directly and has no text form to render")
    v = view(n)
    text = benchmark.pedantic(dp.render, args=(v,), rounds=ROUNDS[n] + 2, iterations=1)
    benchmark.extra_info.update(services=n, bytes=len(text))
    # Every Service is in the text: the last one's ClusterIP as much as the first one's.
    assert v.services[0].cluster_ip in text and v.services[-1].cluster_ip in text


@pytest.mark.root
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", list(MODES))
def test_sync(benchmark, root_untouched, mode, n):
    from clusters.netns import NetnsCluster

    try:
        load_mode(mode)
    except ModeUnavailable as exc:
        pytest.skip(f"{mode} cannot run here: {exc}")
    from dataplanes.proxy import ServiceProxy

    v = view(n)  # made before the rounds: svcbench's own work stays outside the timing
    rounds: list[tuple[NetnsCluster, ServiceProxy]] = []

    def drop_rounds() -> None:
        while rounds:
            cluster, proxy = rounds.pop()
            try:
                if mode not in NAMESPACE_SCOPED:
                    proxy.uninstall()
            finally:
                cluster.destroy()

    def fresh_node():
        drop_rounds()  # the previous round's namespace goes before the next is timed
        cluster = NetnsCluster.create(1, agents=False)
        proxy = ServiceProxy(make(mode), [cluster.nodes[0]], tracker(n))
        rounds.append((cluster, proxy))
        proxy.install()
        return (proxy,), {}

    try:
        # the first sync after install: a full one, from empty
        (stats,) = benchmark.pedantic(lambda proxy: proxy.resync(), setup=fresh_node,
                                      rounds=ROUNDS[n], iterations=1)
    finally:
        drop_rounds()
    benchmark.extra_info.update(services=n, rules=stats.rules, payload_bytes=stats.payload_bytes)
    # the sync saw every Service port (what `rules` counts is each mode's own business)
    assert stats.services == len(v.services)


TRACKER_SERVICES = 50_000  # two ports each: 100,000 Service ports, as many as the /16 allows


@functools.cache
def tracker_at_scale():
    """A ChangeTracker holding 50,000 Services of two ports each over the sweep's pool."""
    from dataclasses import replace as with_fields

    from kube.model import ServicePort
    from kube.tracker import ChangeTracker

    nodes = [Node.numbered(1), Node.numbered(2)]
    pool = list(ClusterState.build(nodes, pool_pods(["node2"], 6)).pods)
    services, slices = synthetic_services(TRACKER_SERVICES, pool, 3, 0, AFFINITY_EVERY)
    services = [with_fields(s, ports=(*s.ports, ServicePort(443, s.ports[0].protocol, "tls",
                                                            s.ports[0].target_port)))
                for s in services]
    tracker = ChangeTracker(nodes)
    tracker.apply(pods=pool, services=services, slices=slices)
    return tracker, slices


def test_tracker_applies_one_change_at_100k_service_ports(benchmark):
    """kube/tracker.py: one Service's endpoints change in a state of 100,000 Service ports."""
    from dataclasses import replace as with_fields

    tracker, slices = tracker_at_scale()
    changed = slices[TRACKER_SERVICES // 2]
    fewer = with_fields(changed, endpoints=changed.endpoints[:-1])
    flip = [fewer, changed]

    def one_change():
        flip.reverse()
        return tracker.apply(slices=[flip[0]])

    changes = benchmark.pedantic(one_change, rounds=50, iterations=1)
    benchmark.extra_info.update(service_ports=2 * TRACKER_SERVICES)
    # Only that Service's port with endpoints changed, on each node.
    assert all([k[1] for k in c.updated] == [changed.service_name] and not c.removed
               for c in changes.values())
