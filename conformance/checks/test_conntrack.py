"""UDP flows that outlive an endpoint change: stale conntrack entries must go.

A UDP client that keeps one source port keeps one conntrack entry alive (each datagram
renews it), and that entry keeps the flow on whatever it was translated to, or not
translated at all. When the endpoint set changes, the proxy must clear what changed so the
next datagram is balanced again. Check 20 covers a pod and a ClusterIP; these cover the
other entry points and the not-ready-to-ready transition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from clusters.workloads.probe import OK
from conformance.harness import EXTERNAL, HTTP_PORT, Probe, describe, outcomes, web_service
from kube.model import POLICY_LOCAL, UDP, EndpointPort, ServicePort

MOVE_LIMIT_S = 5.0
UDP_PORTS = (EndpointPort(HTTP_PORT, UDP),)
WARM = 3


@dataclass(frozen=True)
class Flow:
    """One UDP client with a fixed source port, and where it must end up."""

    name: str
    source: str
    ip: str
    port: int
    source_port: int
    before: str | None  # the backend it reaches before the change; None: none (not served)
    after: str  # the backend it must reach after the change


def _follow(cluster, record_property, flows: list[Flow], change) -> None:
    """Warm every flow, keep them all sending through `change()`, and require each to reach
    its new backend within MOVE_LIMIT_S."""
    warm = cluster.probes(*(
        Probe(f.source, f.ip, f.port, UDP, count=WARM, timeout=0.3, interval_s=0.05,
              source_port=f.source_port, expect=OK if f.before else None)
        for f in flows))
    for flow, result in zip(flows, warm, strict=True):
        if flow.before is None:
            # Refused from pods and outside; a host socket may see its send fail instead.
            assert outcomes(result)[OK] == 0, (
                f"{flow.name}, before: no ready endpoint, yet served: {describe(result)}")
        else:
            assert {s.backend for s in result.samples} == {flow.before}, (
                f"{flow.name}, before: {describe(result)}")
    loops = [
        cluster.probe_loop(f.source, f.ip, f.port, protocol=UDP, timeout=0.2, interval_s=0.05,
                           source_port=f.source_port, limit_s=MOVE_LIMIT_S + 5,
                           until=lambda s, after=f.after: s.backend == after)
        for f in flows
    ]
    for loop in loops:
        loop.__enter__()
    try:
        changed = time.perf_counter()
        change()
        moved = [loop.wait(max(0.0, MOVE_LIMIT_S - (time.perf_counter() - changed)))
                 for loop in loops]
    finally:
        for loop in loops:
            loop.stop()
    stuck = []
    for flow, loop, ok in zip(flows, loops, moved, strict=True):
        if ok:
            first = next(t for t, s in loop.samples if s.backend == flow.after)
            record_property(f"{flow.name}_moved_ms", round((first - changed) * 1e3, 1))
            continue
        late = [s for t, s in loop.samples if t > changed + 1.0]
        seen = sorted({s.backend or s.outcome for s in late})
        stuck.append(f"{flow.name} (source port {flow.source_port}) still got {seen} "
                     f"{MOVE_LIMIT_S:.0f} s after the change, never {flow.after}")
    assert not stuck, "stale UDP conntrack entries: " + "; ".join(stuck)


@pytest.mark.check(29)
def test_udp_conntrack_backend_replaced(cluster, record_property):
    """A UDP flow whose backend leaves moves to the new one, whatever its entry point.

    `udp-swap` (NodePort) goes from web-1 to web-2 while three clients keep their source
    ports: an outside client through node1's NodePort, a pod on node1 through node2's
    NodePort (upstream's layout: client and server on different nodes), and node1 itself
    (host network) through the ClusterIP. `udp-itp` (internalTrafficPolicy Local) goes from
    web-2 to web-3, both on node2, while a pod on node2 sends to its ClusterIP.

    Upstream (test/e2e/network/conntrack.go): "Conntrack should be able to preserve UDP
    traffic when server pod cycles for a NodePort service" and "... for a ClusterIP service".
    """
    swap = web_service("udp-swap", ServicePort(80, UDP, "", HTTP_PORT), type="NodePort",
                       selector=None)
    itp = web_service("udp-itp", ServicePort(80, UDP, "", HTTP_PORT), selector=None,
                      internal_traffic_policy=POLICY_LOCAL)

    def slices(swap_to: str, itp_to: str):
        return [cluster.endpoint_slice("udp-swap", [swap_to], UDP_PORTS),
                cluster.endpoint_slice("udp-itp", [itp_to], UDP_PORTS)]

    cluster.apply([swap, itp], slices("ns1/web-1", "ns1/web-2"))
    node_port = cluster.node_port("udp-swap", 80, UDP)
    swap_ip, itp_ip = cluster.cluster_ip("udp-swap"), cluster.cluster_ip("udp-itp")
    flows = [
        Flow("outside_via_node1", EXTERNAL, cluster.node_ip("node1"), node_port, 40411,
             "ns1/web-1", "ns1/web-2"),
        Flow("pod_node1_via_node2", "ns1/client-a", cluster.node_ip("node2"), node_port, 40412,
             "ns1/web-1", "ns1/web-2"),
        Flow("node1_to_clusterip", "node/node1", swap_ip, 80, 40413, "ns1/web-1", "ns1/web-2"),
        Flow("itp_local_pod_node2", "ns1/client-b", itp_ip, 80, 40414, "ns1/web-2", "ns1/web-3"),
    ]
    _follow(cluster, record_property, flows,
            lambda: cluster.apply([swap, itp], slices("ns1/web-2", "ns1/web-3")))


@pytest.mark.check(30)
def test_udp_unready_endpoint_becomes_ready(cluster, record_property):
    """Datagrams sent while the only endpoint is not ready reach it once it is ready.

    `udp-late` (NodePort) has one endpoint, web-2, not ready: every datagram is refused.
    Three clients keep sending with fixed source ports (a pod on node1 to the ClusterIP,
    node1 itself to the ClusterIP, an outside client through node1's NodePort); web-2
    becomes ready, and each flow must reach it (the entries recorded while nothing was
    ready carry no translation and must be cleared).

    Upstream (test/e2e/network/conntrack.go): "Conntrack should be able to preserve UDP
    traffic when initial unready endpoints get ready"; kube-proxy clears a UDP Service's
    flows when it goes from no endpoint to some (pkg/proxy/conntrack/cleanup.go).
    """
    late = web_service("udp-late", ServicePort(80, UDP, "", HTTP_PORT), type="NodePort",
                       selector=None)
    cluster.apply([late], [cluster.endpoint_slice(
        "udp-late", [cluster.endpoint("ns1/web-2", ready=False)], UDP_PORTS)])
    ip, node_port = cluster.cluster_ip("udp-late"), cluster.node_port("udp-late", 80, UDP)
    flows = [
        Flow("pod_to_clusterip", "ns1/client-a", ip, 80, 40421, None, "ns1/web-2"),
        Flow("node1_to_clusterip", "node/node1", ip, 80, 40422, None, "ns1/web-2"),
        Flow("outside_via_node1", EXTERNAL, cluster.node_ip("node1"), node_port, 40423,
             None, "ns1/web-2"),
    ]
    _follow(cluster, record_property, flows,
            lambda: cluster.apply([late], [cluster.endpoint_slice("udp-late", ["ns1/web-2"],
                                                                  UDP_PORTS)]))
