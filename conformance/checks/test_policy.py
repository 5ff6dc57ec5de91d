"""Which Services and endpoints a node's proxy may use: traffic policies, proxy name, headless."""

from __future__ import annotations

import pytest

from clusters.workloads.probe import OK, REFUSED, TIMEOUT
from conformance.expect import assert_backends
from conformance.harness import (
    EXTERNAL,
    HTTP_PORT,
    Probe,
    describe,
    outcomes,
    web_service,
)
from kube.model import HEADLESS, POLICY_LOCAL, PROXY_NAME_LABEL, TCP, ServicePort

NODE1_BACKENDS = {"ns1/web-1"}
NODE2_BACKENDS = {"ns1/web-2", "ns1/web-3"}
EXTERNAL_IP = "198.18.64.11"  # in the plan's external-IP range, routed to node1 by the client


@pytest.mark.check(9)
def test_internal_traffic_policy_local(cluster):
    """internalTrafficPolicy Local: pods reach only their own node's endpoints; a Service with
    endpoints on node2 only serves node2's pod and not node1's.

    Stands for service.go "Services should respect internalTrafficPolicy=Local Pod to Pod".
    """
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
    assert_backends(cluster.dataplane, on_node1, NODE1_BACKENDS, "client on node1")
    assert outcomes(on_node2) == {OK: 60}, f"client on node2: {describe(on_node2)}"
    assert_backends(cluster.dataplane, on_node2, NODE2_BACKENDS, "client on node2")
    assert outcomes(near) == {OK: 30}, f"client on node2, node2-only Service: {describe(near)}"
    assert outcomes(far)[OK] == 0, (
        f"client on node1 has no local endpoint of itp-node2 but was served: {describe(far)}"
    )


@pytest.mark.check(23)
def test_other_proxy_and_headless_not_handled(cluster):
    """A Service labelled for another proxy gets no VIP handling; a headless (clusterIP: None)
    Service's port is not rewritten on its pods; an unlabelled Service in the same sync serves.

    Stands for service.go "Services should implement service.kubernetes.io/service-proxy-name"
    (a Service created with the label; check 44 toggles it live). No e2e test asserts the
    headless part; it is kube-proxy's service change tracking, which skips Services whose
    clusterIP is None or empty.
    """
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


@pytest.mark.check(27)
def test_both_policies_local(cluster):
    """internalTrafficPolicy and externalTrafficPolicy Local, endpoints on node2 only.

    Stands for kube-proxy's TestCategorizeEndpoints cases "iTP: Local, eTP: Local, all
    endpoints remote" and "... some endpoints local" (pkg/proxy/topology_test.go: a port
    reachable from outside keeps its cluster-wide endpoints for the short circuit, and
    hasAnyEndpoints turns "no local endpoint" into a drop, not a reject), and the e2e tests
    loadbalancer.go "LoadBalancers ExternalTrafficPolicy: Local [Feature:LoadBalancer] [Slow]
    should work from pods" (v1.30 and before: "LoadBalancers ESIPP [Slow] should work from
    pods") and service.go "Services should respect internalTrafficPolicy=Local Pod to Pod"
    (test/e2e/network).
    """
    svc = web_service("both-local", type="NodePort", external_ips=(EXTERNAL_IP,),
                      internal_traffic_policy=POLICY_LOCAL, external_traffic_policy=POLICY_LOCAL,
                      selector={"app": "web", "node": "node2"})
    cluster.apply([svc])
    ip, port = cluster.cluster_ip("both-local"), cluster.node_port("both-local")
    node1, node2 = cluster.node_ip("node1"), cluster.node_ip("node2")
    silent = {"count": 3, "timeout": 0.5, "expect": TIMEOUT}
    requests = {
        # node1 has no local endpoint: its pods and node1 itself are short-circuited to
        # every endpoint. (node1 itself to its own NodePort is not probed here; check 34
        # probes each node's host network through its own NodePort, under policy Cluster.)
        "pod on node1 to node1's NodePort": Probe("ns1/client-a", node1, port, count=30),
        "pod on node1 to the externalIP": Probe("ns1/client-a", EXTERNAL_IP, 80, count=30),
        "node1 to the externalIP": Probe("node/node1", EXTERNAL_IP, 80, count=30),
        "outside client through node2": Probe(EXTERNAL, node2, port, count=30),
        "pod on node2 to the ClusterIP": Probe("ns1/client-b", ip, 80, count=30),
        # Endpoints exist, none on node1: its outside clients and ClusterIP users get nothing.
        "outside client to node1's NodePort": Probe(EXTERNAL, node1, port, **silent),
        "outside client to the externalIP (node1)": Probe(EXTERNAL, EXTERNAL_IP, 80, **silent),
        "pod on node1 to the ClusterIP": Probe("ns1/client-a", ip, 80, **silent),
    }
    results = dict(zip(requests, cluster.probes(*requests.values()), strict=True))
    for what, result in results.items():
        req = requests[what]
        if req.expect == OK:
            assert outcomes(result) == {OK: req.count}, f"{what}: {describe(result)}"
            assert_backends(cluster.dataplane, result, NODE2_BACKENDS, f"{what}:")
        else:
            assert outcomes(result) == {TIMEOUT: req.count}, (
                f"{what} must be dropped (endpoints exist on node2), not refused or served: "
                f"{describe(result)}"
            )
