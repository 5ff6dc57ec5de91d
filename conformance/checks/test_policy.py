"""Which Services and endpoints a node's proxy may use: internal traffic policy, proxy name, headless."""

from __future__ import annotations

import pytest

from clusters.workloads.probe import OK, REFUSED
from conformance.harness import HTTP_PORT, Probe, backends, describe, outcomes, web_service
from kube.model import HEADLESS, POLICY_LOCAL, PROXY_NAME_LABEL, TCP, ServicePort

NODE1_BACKENDS = {"ns1/web-1"}
NODE2_BACKENDS = {"ns1/web-2", "ns1/web-3"}


@pytest.mark.check(9)
def test_internal_traffic_policy_local(cluster):
    everywhere = web_service("itp-local", internal_traffic_policy=POLICY_LOCAL)
    node2_only = web_service("itp-node2", internal_traffic_policy=POLICY_LOCAL,
                             selector={"app": "web", "node": "node2"})
    cluster.apply([everywhere, node2_only])
    ip, ip2 = cluster.cluster_ip("itp-local"), cluster.cluster_ip("itp-node2")
    on_node1, on_node2, far, near = cluster.probes(
        Probe("ns1/client-a", ip, 80, count=60),
        Probe("ns1/client-b", ip, 80, count=60),
        Probe("ns1/client-a", ip2, 80, count=3, timeout=0.5),
        Probe("ns1/client-b", ip2, 80, count=30),
    )
    assert outcomes(on_node1) == {OK: 60}, f"client on node1: {describe(on_node1)}"
    assert set(backends(on_node1)) == NODE1_BACKENDS, (
        f"client on node1 must reach only node1's endpoint: {describe(on_node1)}"
    )
    assert outcomes(on_node2) == {OK: 60}, f"client on node2: {describe(on_node2)}"
    assert set(backends(on_node2)) == NODE2_BACKENDS, (
        f"client on node2 must reach only node2's endpoints: {describe(on_node2)}"
    )
    assert outcomes(near) == {OK: 30}, f"client on node2, node2-only Service: {describe(near)}"
    assert outcomes(far)[OK] == 0, (
        f"client on node1 has no local endpoint of itp-node2 but was served: {describe(far)}"
    )


@pytest.mark.check(23)
def test_other_proxy_and_headless_not_handled(cluster):
    other = web_service("other-proxy", labels={PROXY_NAME_LABEL: "other"})
    headless = web_service("headless", ServicePort(80, TCP, "", HTTP_PORT), cluster_ip=HEADLESS)
    cluster.apply([web_service("ours"), other, headless])
    ours, theirs, direct = cluster.probes(
        Probe("ns1/client-a", cluster.cluster_ip("ours"), 80, count=20),
        Probe("ns1/client-a", cluster.cluster_ip("other-proxy"), 80, count=3, timeout=0.5),
        # The headless Service's port 80 means nothing on the pod: no rewrite to 8080.
        Probe("ns1/client-a", cluster.pod_ip("ns1/web-2"), 80, count=5, expect=REFUSED),
    )
    assert outcomes(ours) == {OK: 20}, f"an unlabelled Service in the same sync: {describe(ours)}"
    assert outcomes(theirs)[OK] == 0, (
        f"a Service for proxy 'other' got VIP handling: {describe(theirs)}"
    )
    assert outcomes(direct) == {REFUSED: 5}, (
        f"port 80 of a headless Service's pod was redirected: {describe(direct)}"
    )
