"""ClusterIP from pods and nodes: spread, protocols, named ports, client IP, hairpin, payloads."""

from __future__ import annotations

import pytest

from clusters.workloads.probe import OK
from conformance.expect import assert_backends, skip_unless_spread, spreads_one_client
from conformance.harness import (
    BACKENDS,
    EXTERNAL,
    HTTP_PORT,
    Probe,
    backends,
    describe,
    outcomes,
    uniformity_p,
    web_service,
)
from kube.model import TCP, UDP, ServicePort

SPREAD_CONNECTIONS = 600
UNIFORM_P = 0.001
SAME_NODE, OTHER_NODE = "ns1/client-a", "ns1/client-b"  # web-1 is on node1, web-2/3 on node2


def _uniform(cluster, protocol: str) -> None:
    cluster.apply([web_service("spread", ServicePort(80, protocol, "", HTTP_PORT))])
    ip = cluster.cluster_ip("spread")
    clients = (SAME_NODE, OTHER_NODE)
    results = cluster.probes(
        *(Probe(c, ip, 80, protocol=protocol, count=SPREAD_CONNECTIONS) for c in clients)
    )
    for client, result in zip(clients, results, strict=True):
        assert outcomes(result) == {OK: SPREAD_CONNECTIONS}, f"from {client}: {describe(result)}"
        assert_backends(cluster.dataplane, result, BACKENDS, f"from {client}")
    # What remains, the split, means something only where one client spreads.
    skip_unless_spread(cluster.dataplane, "one client's connections spread to test their split")
    for client, result in zip(clients, results, strict=True):
        counts = backends(result)
        p = uniformity_p([counts[b] for b in BACKENDS])
        assert p > UNIFORM_P, (
            f"from {client} the split {dict(counts)} is not uniform: chi-square p = {p:.2g}"
        )


@pytest.mark.check(1)
def test_clusterip_tcp_uniform(cluster):
    """600 TCP connections from a pod on each node to a ClusterIP: all served, every endpoint
    answers, and the split is uniform (chi-square p > 0.001).

    Stands for service.go "Services should serve a basic endpoint from pods [Conformance]" and
    networking.go "Networking Granular Checks: Services should function for pod-Service: http"
    (its ClusterIP half). No upstream e2e test asserts the uniform split (upstream only needs
    every endpoint to answer); the nearest kube-proxy behaviour is its equal-probability random
    endpoint choice (iptables `statistic --mode random`, nftables `numgen random`).
    """
    _uniform(cluster, TCP)


@pytest.mark.check(2)
def test_clusterip_udp_uniform(cluster):
    """600 UDP datagrams (fresh source ports) from a pod on each node to a ClusterIP: all
    answered, every endpoint answers, and the split is uniform (chi-square p > 0.001).

    Stands for networking.go "Networking Granular Checks: Services should function for
    pod-Service: udp" (its ClusterIP half). The uniformity test has no upstream counterpart, as
    in check 1.
    """
    _uniform(cluster, UDP)


@pytest.mark.check(3)
def test_multiport_named_target_ports(cluster):
    """Two Service ports with named targetPorts (numbered differently on web-3) each reach
    every endpoint, from pods on both nodes.

    Stands for service.go "Services should serve multiport endpoints from pods [Conformance]"
    and "Services should connect to the named ports exposed by restartable init containers"
    (to the proxy a sidecar's named port is an ordinary per-endpoint port number).
    """
    # web-3 numbers `alt` 9090, the others 8081: the name must be resolved per endpoint.
    svc = web_service(
        "multiport", ServicePort(80, TCP, "http", "http"), ServicePort(81, TCP, "alt", "alt")
    )
    cluster.apply([svc])
    ip = cluster.cluster_ip("multiport")
    requests = [Probe(c, ip, port, count=60) for c in (SAME_NODE, OTHER_NODE) for port in (80, 81)]
    for req, result in zip(requests, cluster.probes(*requests), strict=True):
        assert outcomes(result) == {OK: 60}, f"port {req.port} from {req.source}: {describe(result)}"
        assert_backends(cluster.dataplane, result, BACKENDS, f"port {req.port} from {req.source}")


@pytest.mark.check(4)
def test_tcp_and_udp_on_one_port(cluster):
    """TCP and UDP on one Service port number are both served; removing either protocol stops
    only it, in one sync.

    Stands for service.go "Services should serve endpoints on same port and different protocols
    [Conformance]".
    """
    tcp = ServicePort(80, TCP, "tcp", HTTP_PORT)
    udp = ServicePort(80, UDP, "udp", HTTP_PORT)
    cluster.apply([web_service("dual", tcp, udp)])
    ip = cluster.cluster_ip("dual")
    for result in cluster.probes(Probe(SAME_NODE, ip, 80, TCP, count=30),
                                 Probe(SAME_NODE, ip, 80, UDP, count=30)):
        assert outcomes(result) == {OK: 30}, f"both protocols served: {describe(result)}"
    for kept, removed in ((tcp, udp), (udp, tcp)):
        cluster.apply([web_service("dual", kept)])
        served, stopped = cluster.probes(
            Probe(SAME_NODE, ip, 80, kept.protocol, count=30),
            Probe(SAME_NODE, ip, 80, removed.protocol, count=3, timeout=0.5),
        )
        assert outcomes(served) == {OK: 30}, f"{kept.protocol} kept: {describe(served)}"
        assert outcomes(stopped)[OK] == 0, (
            f"{removed.protocol} was removed but is still served after the sync: {describe(stopped)}"
        )


@pytest.mark.check(5)
def test_host_network_client_reaches_clusterip(cluster):
    """Both nodes' host network reach a ClusterIP over TCP, every endpoint answering.

    Stands for networking.go "Networking Granular Checks: Services should function for
    node-Service: http" (its ClusterIP half; the NodePort half is check 34's, UDP check 66's).
    """
    cluster.apply([web_service("hostnet")])
    ip = cluster.cluster_ip("hostnet")
    sources = ("node/node1", "node/node2")
    for source, result in zip(sources, cluster.probes(*(Probe(s, ip, 80, count=60) for s in sources)),
                              strict=True):
        assert outcomes(result) == {OK: 60}, f"from {source}: {describe(result)}"
        assert_backends(cluster.dataplane, result, BACKENDS, f"from {source}")


@pytest.mark.check(10)
def test_clusterip_preserves_client_pod_ip(cluster):
    """Backends see the client pod's own IP through a ClusterIP, over TCP and UDP, from pods
    on both nodes.

    Stands for service.go "Services should preserve source pod IP for traffic thru service
    cluster IP [LinuxOnly]".
    """
    cluster.apply([web_service("source", ServicePort(80, TCP, "tcp", HTTP_PORT),
                               ServicePort(80, UDP, "udp", HTTP_PORT))])
    ip = cluster.cluster_ip("source")
    requests = [Probe(c, ip, 80, proto, count=30)
                for c in (SAME_NODE, OTHER_NODE) for proto in (TCP, UDP)]
    for req, result in zip(requests, cluster.probes(*requests), strict=True):
        assert outcomes(result) == {OK: 30}, f"from {req.source}: {describe(result)}"
        seen = {s.seen_client.rsplit(":", 1)[0] for s in result.samples}
        assert seen == {cluster.pod_ip(req.source)}, (
            f"{req.protocol} from {req.source} ({cluster.pod_ip(req.source)}): backends saw {seen}"
        )


@pytest.mark.check(11)
def test_hairpin_pod_reaches_itself(cluster):
    """A Service's only endpoint reaches itself through its ClusterIP; an endpoint of a shared
    Service sometimes lands on itself.

    Stands for service.go "Services should allow pods to hairpin back to themselves through
    services" and networking.go "Networking Granular Checks: Services should function for
    endpoint-Service: http" (its ClusterIP half).
    """
    only = cluster.endpoint_slice("self", ["ns1/web-1"])
    alone = web_service("self", selector=None)
    cluster.apply([alone, web_service("shared")], [only])
    self_ip, shared_ip = cluster.cluster_ip("self"), cluster.cluster_ip("shared")
    solo, shared = cluster.probes(Probe("ns1/web-1", self_ip, 80, count=30),
                                  Probe("ns1/web-2", shared_ip, 80, count=90))
    assert outcomes(solo) == {OK: 30}, f"web-1 through its own Service: {describe(solo)}"
    assert set(backends(solo)) == {"ns1/web-1"}, describe(solo)
    assert outcomes(shared) == {OK: 90}, f"web-2 through a shared Service: {describe(shared)}"
    if not spreads_one_client(cluster.dataplane):
        # Landing on itself needs one client's connections to spread; what remains is what
        # the algorithm promises.
        assert_backends(cluster.dataplane, shared, BACKENDS, "web-2 through a shared Service")
        return
    assert backends(shared)["ns1/web-2"] > 0, f"web-2 never picked itself: {describe(shared)}"


@pytest.mark.check(24)
def test_large_payloads_pass(cluster):
    """2,000-byte TCP and UDP (fragmented) payloads are echoed through a ClusterIP from a pod
    and, from outside, through a NodePort.

    Stands for networking.go "Networking Granular Checks: Services should be able to handle
    large requests: http" and "... should be able to handle large requests: udp" (2,000-byte
    messages from a pod to the ClusterIP; the NodePort from outside is svcbench's addition).
    """
    payload = bytes(range(256)) * 7 + bytes(208)  # 2,000 bytes: fragments as UDP
    assert len(payload) == 2000
    svc = web_service("large", ServicePort(80, TCP, "tcp", HTTP_PORT),
                      ServicePort(80, UDP, "udp", HTTP_PORT), type="NodePort")
    cluster.apply([svc])
    ip = cluster.cluster_ip("large")
    node_port = cluster.node_port("large")
    node2 = cluster.node_ip("node2")
    requests = [Probe(SAME_NODE, ip, 80, proto, count=20, payload=payload) for proto in (TCP, UDP)]
    requests += [Probe(EXTERNAL, node2, node_port, proto, count=20, payload=payload)
                 for proto in (TCP, UDP)]
    for req, result in zip(requests, cluster.probes(*requests), strict=True):
        assert outcomes(result) == {OK: 20}, (
            f"2,000-byte {req.protocol} from {req.source}: {describe(result)}"
        )
