"""NodePorts from every kind of client, and NodePorts that change."""

from __future__ import annotations

import time

import pytest

from clusters.workloads.probe import OK
from conformance.checks.flows import check_all, served
from conformance.harness import (
    BACKENDS,
    EXTERNAL,
    HTTP_PORT,
    Probe,
    describe,
    outcomes,
    web_service,
)
from kube.model import TCP, UDP, ServicePort

SPREAD = 45  # every one of three backends answers: all but 3 * (2/3)**45 of the time
NODES = ("node1", "node2")


def _ports(port: int = 80, node_port: int | None = None) -> tuple[ServicePort, ...]:
    return (ServicePort(port, TCP, "tcp", HTTP_PORT, node_port),
            ServicePort(port, UDP, "udp", HTTP_PORT, node_port))


@pytest.mark.check(34)
def test_nodeport_from_every_source(cluster):
    """Both nodes' NodePorts serve every kind of client over TCP and UDP.

    Clients: the outside client, a pod on each node, an endpoint pod (web-1, which may
    reach itself), and each node's host network, through node1's and node2's NodePort;
    the host-network and endpoint clients also through the ClusterIP. Every connection is
    served and all three endpoints answer each client.

    Upstream: test/e2e/network/service.go "Services should be able to create a functioning
    NodePort service [Conformance]"; networking.go "Networking Granular Checks: Services
    should function for node-Service: http", "... node-Service: udp", "... pod-Service:
    http", "... pod-Service: udp", "... endpoint-Service: http", "... endpoint-Service: udp".
    """
    cluster.apply([web_service("np-all", *_ports(), type="NodePort")])
    ip = cluster.cluster_ip("np-all")
    sources = (EXTERNAL, "ns1/client-a", "ns1/client-b", "ns1/web-1", "node/node1", "node/node2")
    cases = {}
    for proto in (TCP, UDP):
        port = cluster.node_port("np-all", 80, proto)
        for source in sources:
            for node in NODES:
                cases[f"{proto} from {source} through {node}'s NodePort"] = served(
                    Probe(source, cluster.node_ip(node), port, proto, count=SPREAD), BACKENDS)
            if source in ("ns1/web-1", "node/node1", "node/node2"):
                cases[f"{proto} from {source} to the ClusterIP"] = served(
                    Probe(source, ip, 80, proto, count=SPREAD), BACKENDS)
    check_all(cluster, cases)


MOVED_FROM, MOVED_TO, RETYPED = 30555, 30556, 30557
EARLY_SOURCE_PORT = 40431
EARLY_LIMIT_S = 5.0


@pytest.mark.check(35)
def test_nodeport_update(cluster):
    """A changed nodePort answers at once and the old one no longer does; a ClusterIP
    Service turned NodePort (TCP and UDP on one port number) with a new port serves there.

    `np-move` keeps its TCP and UDP port 80 but its nodePort goes from 30555 to 30556;
    `np-retype` goes from ClusterIP port 80 to NodePort port 81 with nodePort 30557 for
    both protocols. Through both nodes, over TCP and UDP: 30556 and 30557 serve, 30555 and
    the ClusterIP's port 80 answer nothing.

    Upstream: test/e2e/network/networking.go "Networking Granular Checks: Services should
    update nodePort: http [Slow]", "... should update nodePort: udp [Slow]"; service.go
    "Services should be able to update service type to NodePort listening on same port
    number but different protocols"; loadbalancer.go (v1.30 and before) "LoadBalancers
    should be able to change the type and ports of a TCP service [Slow]" (and "... of a UDP
    service [Slow]"), their NodePort steps.
    """
    cluster.apply([web_service("np-move", *_ports(80, MOVED_FROM), type="NodePort"),
                   web_service("np-retype", *_ports(80))])
    retype_ip = cluster.cluster_ip("np-retype")
    before = [Probe(EXTERNAL, cluster.node_ip(n), MOVED_FROM, p, count=10)
              for n in NODES for p in (TCP, UDP)]
    before += [Probe("ns1/client-a", retype_ip, 80, p, count=10) for p in (TCP, UDP)]
    for req, result in zip(before, cluster.probes(*before), strict=True):
        assert outcomes(result) == {OK: 10}, f"before the change, from {req.source}: {describe(result)}"

    # A UDP client already sending to the port np-move is about to take: refused until then,
    # its untranslated conntrack entry must not outlive the change.
    early = cluster.probe_loop(EXTERNAL, cluster.node_ip("node1"), MOVED_TO, protocol=UDP,
                               timeout=0.2, interval_s=0.05, source_port=EARLY_SOURCE_PORT,
                               limit_s=EARLY_LIMIT_S + 5, until=lambda s: s.outcome == OK)
    with early:
        time.sleep(0.3)
        assert not early.hit.is_set(), f"{MOVED_TO} answered before it was a nodePort"
        changed = time.perf_counter()
        cluster.apply([web_service("np-move", *_ports(80, MOVED_TO), type="NodePort"),
                       web_service("np-retype", *_ports(81, RETYPED), type="NodePort")])
        reached = early.wait(max(0.0, EARLY_LIMIT_S - (time.perf_counter() - changed)))
    assert reached, (
        f"UDP from source port {EARLY_SOURCE_PORT}, sent to {MOVED_TO} while it was no nodePort, "
        f"still unanswered {EARLY_LIMIT_S:.0f} s after it became one: "
        f"{sorted({s.outcome for t, s in early.samples if t > changed + 1})}")
    assert cluster.cluster_ip("np-retype") == retype_ip
    cases, gone = {}, []
    for proto in (TCP, UDP):
        for node in NODES:
            node_ip = cluster.node_ip(node)
            cases[f"{proto} np-move's new nodePort on {node}"] = served(
                Probe(EXTERNAL, node_ip, MOVED_TO, proto, count=SPREAD), BACKENDS)
            cases[f"{proto} np-retype's nodePort on {node}"] = served(
                Probe(EXTERNAL, node_ip, RETYPED, proto, count=SPREAD), BACKENDS)
            gone.append(Probe(EXTERNAL, node_ip, MOVED_FROM, proto, count=2, timeout=0.4,
                              expect=None))
        cases[f"{proto} np-retype's new port 81 on its ClusterIP"] = served(
            Probe("ns1/client-a", retype_ip, 81, proto, count=SPREAD), BACKENDS)
        gone.append(Probe("ns1/client-a", retype_ip, 80, proto, count=2, timeout=0.4,
                          expect=None))
    check_all(cluster, cases)
    for req, result in zip(gone, cluster.probes(*gone), strict=True):
        assert outcomes(result)[OK] == 0, (
            f"{req.protocol} {req.ip}:{req.port} from {req.source} was removed but still "
            f"answers: {describe(result)}")
