"""Traffic from outside the cluster: NodePorts, external traffic policy, externalIPs."""

from __future__ import annotations

import pytest

from clusters.workloads.probe import OK
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
from kube.model import PLAN, POLICY_LOCAL, TCP, UDP, ServicePort

EXTERNAL_IP = "198.18.64.10"  # in the plan's external-IP range, routed to node1 by the client
NODE2_BACKENDS = {"ns1/web-2", "ns1/web-3"}


@pytest.mark.check(6)
def test_nodeport_on_every_node(cluster):
    """The outside client and a pod reach both nodes' NodePort over TCP, every endpoint
    answering each.

    Stands for service.go "Services should be able to create a functioning NodePort service
    [Conformance]" and networking.go "Networking Granular Checks: Services should function for
    pod-Service: http" (its NodePort half).
    """
    cluster.apply([web_service("nodeport", type="NodePort")])
    port = cluster.node_port("nodeport")
    requests = [Probe(source, cluster.node_ip(node), port, count=60)
                for source in (EXTERNAL, "ns1/client-a") for node in ("node1", "node2")]
    for req, result in zip(requests, cluster.probes(*requests), strict=True):
        assert outcomes(result) == {OK: 60}, f"from {req.source}: {describe(result)}"
        assert_backends(cluster.dataplane, result, BACKENDS, f"from {req.source}")


@pytest.mark.check(7)
def test_external_traffic_policy_local(cluster):
    """externalTrafficPolicy Local: the node with endpoints serves outside clients from its own
    endpoints only, and they see the client's own address; the node without endpoints serves
    nothing.

    Stands for service.go "Services should support externalTrafficPolicy=Local for
    type=NodePort" (v1.30 and before: loadbalancer.go "LoadBalancers ESIPP [Slow] should work
    for type=NodePort").
    """
    svc = web_service("etp-local", type="NodePort", external_traffic_policy=POLICY_LOCAL,
                      selector={"app": "web", "node": "node2"})
    cluster.apply([svc])
    port = cluster.node_port("etp-local")
    local, remote = cluster.probes(
        Probe(EXTERNAL, cluster.node_ip("node2"), port, count=40),
        Probe(EXTERNAL, cluster.node_ip("node1"), port, count=3, timeout=0.5),
    )
    assert outcomes(local) == {OK: 40}, f"through node2 (local endpoints): {describe(local)}"
    assert_backends(cluster.dataplane, local, NODE2_BACKENDS, "through node2")
    seen = {s.seen_client.rsplit(":", 1)[0] for s in local.samples}
    assert seen == {PLAN.external_client_ip}, (
        f"backends saw {seen}, not the external client's own {PLAN.external_client_ip}"
    )
    assert outcomes(remote)[OK] == 0, f"node1 has no local endpoint but served: {describe(remote)}"


@pytest.mark.check(8)
def test_external_traffic_policy_cluster(cluster):
    """externalTrafficPolicy Cluster: both nodes' NodePorts serve outside clients from every
    endpoint, whichever node the endpoint is on.

    No upstream e2e test asserts this on its own: it is the outside-client side of service.go
    "Services should be able to create a functioning NodePort service [Conformance]", which
    probes from a pod. The nearest kube-proxy behaviour is that external traffic of an
    externalTrafficPolicy Cluster Service goes to its cluster-wide endpoints
    (pkg/proxy/topology.go, CategorizeEndpoints).
    """
    cluster.apply([web_service("etp-cluster", type="NodePort")])
    port = cluster.node_port("etp-cluster")
    nodes = ("node1", "node2")
    results = cluster.probes(*(Probe(EXTERNAL, cluster.node_ip(n), port, count=60) for n in nodes))
    for node, result in zip(nodes, results, strict=True):
        assert outcomes(result) == {OK: 60}, f"through {node}: {describe(result)}"
        assert_backends(cluster.dataplane, result, BACKENDS, f"through {node}")


@pytest.mark.check(22)
def test_external_ips_reachable(cluster):
    """An externalIP that is no node's address serves TCP and UDP from outside and TCP from a
    pod, every endpoint answering.

    Stands for service.go "Services should be possible to connect to a service via ExternalIP
    when the external IP is not assigned to a node".
    """
    svc = web_service("external-ip", ServicePort(80, TCP, "tcp", HTTP_PORT),
                      ServicePort(80, UDP, "udp", HTTP_PORT), external_ips=(EXTERNAL_IP,))
    cluster.apply([svc])
    requests = [Probe(EXTERNAL, EXTERNAL_IP, 80, TCP, count=60),
                Probe(EXTERNAL, EXTERNAL_IP, 80, UDP, count=60),
                Probe("ns1/client-b", EXTERNAL_IP, 80, TCP, count=30)]
    for req, result in zip(requests, cluster.probes(*requests), strict=True):
        assert outcomes(result) == {OK: req.count}, (
            f"{req.protocol} {EXTERNAL_IP} from {req.source}: {describe(result)}"
        )
        assert_backends(cluster.dataplane, result, BACKENDS,
                        f"{req.protocol} {EXTERNAL_IP} from {req.source}")
