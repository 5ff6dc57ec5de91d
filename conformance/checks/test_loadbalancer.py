"""LoadBalancer Services: ingress IPs, loadBalancerSourceRanges, their traffic policy.

No cloud stands in front: a Service's load-balancer IPs are written in its status (from
the plan's load-balancer range) and the external client routes that range to node1, as a
load balancer that delivers to one node would. Each check uses IPs of its own, so no
flow of an earlier check meets a later one.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from clusters.workloads.probe import OK, TIMEOUT
from conformance.expect import assert_backends
from conformance.harness import (
    BACKENDS,
    EXTERNAL,
    HTTP_PORT,
    Probe,
    describe,
    outcomes,
    web_service,
)
from kube.model import (
    PLAN,
    POLICY_LOCAL,
    TCP,
    TYPE_CLUSTER_IP,
    TYPE_LOAD_BALANCER,
    TYPE_NODE_PORT,
    UDP,
    ServicePort,
)

NODE1_BACKENDS = {"ns1/web-1"}
NODE2_BACKENDS = {"ns1/web-2", "ns1/web-3"}
SILENT = {"count": 2, "timeout": 0.4, "expect": TIMEOUT}
TCP_UDP = (ServicePort(80, TCP, "tcp", HTTP_PORT), ServicePort(80, UDP, "udp", HTTP_PORT))


def load_balancer(name: str, *ips: str, ports=TCP_UDP, **fields):
    """A LoadBalancer Service in ns1 over every web pod, with these ingress IPs."""
    return web_service(name, *ports, type=TYPE_LOAD_BALANCER, load_balancer_ips=ips, **fields)


def check_all(cluster, requests: dict[str, Probe], served_by: dict[str, set[str]] | None = None):
    """Run every request at once; OK ones must be served throughout (by `served_by[what]`
    when given), TIMEOUT ones dropped: timed out every time, never refused."""
    served_by = served_by or {}
    results = dict(zip(requests, cluster.probes(*requests.values()), strict=True))
    for what, result in results.items():
        req = requests[what]
        if req.expect == OK:
            assert outcomes(result) == {OK: req.count}, f"{what}: {describe(result)}"
            if what in served_by:
                assert_backends(cluster.dataplane, result, served_by[what], f"{what}:")
        else:
            assert outcomes(result) == {TIMEOUT: req.count}, (
                f"{what} must be dropped (the client times out), not refused or served: "
                f"{describe(result)}"
            )
    return results


@pytest.mark.check(55)
def test_load_balancer_ingress_reachable(cluster):
    """Load-balancer IPs serve TCP and UDP from outside, from pods and from nodes.

    Stands for the e2e test "LoadBalancers should be able to create LoadBalancer Service
    without NodePort and change it" (test/e2e/network/loadbalancer.go: a Service with
    allocateLoadBalancerNodePorts false is served on its ingress IP alone) and kube-proxy's
    TestLoadBalancer (pkg/proxy/iptables/proxier_test.go: every endpoint behind the
    ingress IP, for pods and the node too).
    """
    lb, bare = "198.18.32.10", "198.18.32.11"
    cluster.apply([
        load_balancer("lb", lb),
        load_balancer("lb-no-nodeport", bare, ports=TCP_UDP[:1],
                      allocate_load_balancer_node_ports=False),
    ])
    assert cluster.service("lb-no-nodeport").ports[0].node_port is None
    node_port = cluster.node_port("lb")
    every = set(BACKENDS)
    requests = {
        "TCP from outside": Probe(EXTERNAL, lb, 80, TCP, count=60),
        "UDP from outside": Probe(EXTERNAL, lb, 80, UDP, count=60),
        "TCP from a pod on node2": Probe("ns1/client-b", lb, 80, TCP, count=30),
        "UDP from a pod on node1": Probe("ns1/client-a", lb, 80, UDP, count=30),
        "TCP from node2": Probe("node/node2", lb, 80, TCP, count=30),
        "its NodePort from outside": Probe(EXTERNAL, cluster.node_ip("node2"), node_port,
                                           TCP, count=10),
        "the Service without NodePorts from outside": Probe(EXTERNAL, bare, 80, TCP, count=30),
    }
    served_by = {what: every for what, req in requests.items() if req.count >= 30}
    check_all(cluster, requests, served_by)


@pytest.mark.check(56)
def test_load_balancer_source_ranges(cluster):
    """loadBalancerSourceRanges: only sources inside them reach the ingress IP, live.

    Stands for the e2e test "LoadBalancers should only allow access from service
    loadbalancer source ranges" (test/e2e/network/loadbalancer.go: an accepted and a
    dropped exec pod, the ranges swapped, then removed) and kube-proxy's
    TestLoadBalancer / TestOnlyLocalLoadBalancing firewall cases (KUBE-FW chain: other
    sources are dropped, never rejected). The Service's NodePort is not filtered ("For
    better or for worse, nodeports are not subject to loadBalancerSourceRanges", proxier.go).
    """
    lb = "198.18.32.20"
    accept, drop = cluster.pod_ip("ns1/client-a"), cluster.pod_ip("ns1/client-b")
    client = PLAN.external_client_ip
    svc = load_balancer("lb-ranges", lb, load_balancer_source_ranges=(f"{client}/32",
                                                                        f"{accept}/32"))
    cluster.apply([svc])
    node_port = cluster.node_port("lb-ranges")
    node1 = cluster.node_ip("node1")
    check_all(cluster, {
        "TCP from the external client (in range)": Probe(EXTERNAL, lb, 80, TCP, count=20),
        "UDP from the external client (in range)": Probe(EXTERNAL, lb, 80, UDP, count=20),
        "the accepted pod (in range)": Probe("ns1/client-a", lb, 80, count=10),
        "the other pod (out of range)": Probe("ns1/client-b", lb, 80, **SILENT),
        "node1 (out of range)": Probe("node/node1", lb, 80, **SILENT),
        "the NodePort from outside": Probe(EXTERNAL, node1, node_port, count=10),
    })

    # Swapped in a live apply: the external client and the accepted pod are now out.
    cluster.apply([replace(svc, load_balancer_source_ranges=(f"{drop}/32",))])
    check_all(cluster, {
        "TCP from the external client (now out of range)": Probe(EXTERNAL, lb, 80, TCP,
                                                                 **SILENT),
        "UDP from the external client (now out of range)": Probe(EXTERNAL, lb, 80, UDP,
                                                                 **SILENT),
        "the formerly accepted pod": Probe("ns1/client-a", lb, 80, **SILENT),
        "the formerly dropped pod (now in range)": Probe("ns1/client-b", lb, 80, count=10),
        "the NodePort from the same external client": Probe(EXTERNAL, node1, node_port,
                                                            count=10),
    })

    # Removed: every source again.
    cluster.apply([replace(svc, load_balancer_source_ranges=())])
    check_all(cluster, {
        "the external client, ranges removed": Probe(EXTERNAL, lb, 80, count=10),
        "the first pod, ranges removed": Probe("ns1/client-a", lb, 80, count=10),
        "the second pod, ranges removed": Probe("ns1/client-b", lb, 80, count=10),
    })


@pytest.mark.check(57)
def test_load_balancer_external_traffic_policy_local(cluster):
    """externalTrafficPolicy Local on an ingress IP: the node the load balancer delivers
    to serves from its own endpoints with the client's address, or drops.

    Stands for the e2e tests "LoadBalancers ExternalTrafficPolicy: Local
    [Feature:LoadBalancer] [Slow] should work for type=LoadBalancer", "... should only
    target nodes with endpoints" and "... should work from pods" (v1.30 and before:
    "LoadBalancers ESIPP [Slow] should work for type=LoadBalancer", "... should only target
    nodes with endpoints", "... should work from pods"; test/e2e/network/loadbalancer.go:
    the source IP is preserved; a node without an endpoint does not serve outside clients;
    pods reach the Service from any node) and kube-proxy's TestOnlyLocalLoadBalancing.
    """
    everywhere, remote = "198.18.32.30", "198.18.32.31"
    cluster.apply([
        load_balancer("lb-local", everywhere, ports=TCP_UDP[:1],
                      external_traffic_policy=POLICY_LOCAL),
        load_balancer("lb-local-node2", remote, ports=TCP_UDP[:1],
                      external_traffic_policy=POLICY_LOCAL,
                      selector={"app": "web", "node": "node2"}),
    ])
    requests = {
        # The load balancer delivers to node1, whose only local endpoint is web-1.
        "outside client to node1's local endpoint": Probe(EXTERNAL, everywhere, 80, count=30),
        "a pod on node2": Probe("ns1/client-b", everywhere, 80, count=20),
        # node1 has no endpoint of lb-local-node2: outside clients get nothing from it, its
        # pods are still served (by node2's endpoints).
        "outside client through node1 without endpoints": Probe(EXTERNAL, remote, 80,
                                                                **SILENT),
        "a pod on node1 to the Service with node2's endpoints": Probe("ns1/client-a", remote,
                                                                       80, count=20),
    }
    results = check_all(cluster, requests, {
        "outside client to node1's local endpoint": NODE1_BACKENDS,
        "a pod on node1 to the Service with node2's endpoints": NODE2_BACKENDS,
    })
    for what, address in (
        ("outside client to node1's local endpoint", PLAN.external_client_ip),
        ("a pod on node2", cluster.pod_ip("ns1/client-b")),
    ):
        seen = {s.seen_client.rsplit(":", 1)[0] for s in results[what].samples}
        assert seen == {address}, f"{what}: backends saw {seen}, not the client's own {address}"


@pytest.mark.check(58)
def test_load_balancer_type_and_ports_change(cluster):
    """A Service turned from NodePort into LoadBalancer, its port changed, then turned
    into ClusterIP: each ingress IP:port is served exactly while the Service has it.

    Stands for the e2e tests "LoadBalancers should be able to change the type and ports of
    a TCP service" and "... of a UDP service" (test/e2e/network/loadbalancer.go: NodePort
    -> LoadBalancer, then a new port, then back to ClusterIP, checking reachability and
    unreachability each time).
    """
    lb = "198.18.32.40"
    tcp, udp = TCP_UDP
    svc = web_service("lb-change", tcp, udp, type=TYPE_NODE_PORT)
    cluster.apply([svc])
    node_port = cluster.node_port("lb-change")
    node1 = cluster.node_ip("node1")

    cluster.apply([replace(svc, type=TYPE_LOAD_BALANCER, load_balancer_ips=(lb,))])
    assert cluster.node_port("lb-change") == node_port, "the NodePort must stay allocated"
    check_all(cluster, {
        "TCP ingress IP": Probe(EXTERNAL, lb, 80, TCP, count=10),
        "UDP ingress IP": Probe(EXTERNAL, lb, 80, UDP, count=10),
        "the NodePort it kept": Probe(EXTERNAL, node1, node_port, count=10),
    })

    moved = (replace(tcp, port=81), replace(udp, port=81))
    cluster.apply([replace(svc, ports=moved, type=TYPE_LOAD_BALANCER, load_balancer_ips=(lb,))])
    gone_tcp, gone_udp, new_tcp, new_udp = cluster.probes(
        Probe(EXTERNAL, lb, 80, TCP, count=2, timeout=0.4, expect=None),
        Probe(EXTERNAL, lb, 80, UDP, count=2, timeout=0.4, expect=None),
        Probe(EXTERNAL, lb, 81, TCP, count=10),
        Probe(EXTERNAL, lb, 81, UDP, count=10),
    )
    for result in (new_tcp, new_udp):
        assert outcomes(result) == {OK: 10}, f"the new port: {describe(result)}"
    for result in (gone_tcp, gone_udp):
        assert outcomes(result)[OK] == 0, f"the old port is still served: {describe(result)}"

    cluster.apply([replace(svc, ports=moved, type=TYPE_CLUSTER_IP)])
    gone_tcp, gone_udp, inside = cluster.probes(
        Probe(EXTERNAL, lb, 81, TCP, count=2, timeout=0.4, expect=None),
        Probe(EXTERNAL, lb, 81, UDP, count=2, timeout=0.4, expect=None),
        Probe("ns1/client-a", cluster.cluster_ip("lb-change"), 81, count=10),
    )
    for result in (gone_tcp, gone_udp):
        assert outcomes(result)[OK] == 0, (
            f"the ingress IP is still served after the type became ClusterIP: {describe(result)}"
        )
    assert outcomes(inside) == {OK: 10}, f"the ClusterIP: {describe(inside)}"
