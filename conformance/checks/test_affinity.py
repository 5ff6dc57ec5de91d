"""Session affinity ClientIP: stickiness per client, expiry, switching on and off; ClusterIP,
NodePorts and UDP."""

from __future__ import annotations

import time

import pytest

from clusters.workloads.probe import OK
from conformance.expect import assert_backends, skip_unless_spread, spreads_one_client
from conformance.harness import (
    BACKENDS,
    CLIENTS,
    EXTERNAL,
    HTTP_PORT,
    Probe,
    backends,
    describe,
    outcomes,
    web_service,
    with_affinity,
)
from kube.model import TCP, UDP, ServicePort

AFFINITY_TIMEOUT_S = 2
SILENCE_S = 3.0
MAX_ROUNDS = 4  # each round re-rolls three clients: P(no change in 4 rounds) = 27**-4


def _sticky(cluster, ip: str, count: int) -> dict[str, str]:
    """Each client's `count` connections in a row: all served, all by one backend."""
    results = cluster.probes(*(Probe(c, ip, 80, count=count) for c in CLIENTS))
    choice = {}
    for client, result in zip(CLIENTS, results, strict=True):
        assert outcomes(result) == {OK: count}, f"from {client}: {describe(result)}"
        assert len(backends(result)) == 1, (
            f"{count} connections in a row from {client} did not stick: {describe(result)}"
        )
        choice[client] = next(iter(backends(result)))
    return choice


@pytest.mark.check(12)
def test_session_affinity_client_ip(cluster, record_property):
    """ClientIP affinity on a ClusterIP: each of three clients sticks to one backend, not all
    to the same one, and after timeoutSeconds of silence a client gets a new one.

    Stands for service.go "Services should have session affinity work for service with type
    clusterIP [LinuxOnly] [Conformance]", "Services should have session affinity timeout work
    for service with type clusterIP [LinuxOnly]", and networking.go "Networking Granular
    Checks: Services should function for client IP based session affinity: http [LinuxOnly]".
    """
    cluster.apply([with_affinity(web_service("sticky"), AFFINITY_TIMEOUT_S)])
    ip = cluster.cluster_ip("sticky")
    choice = _sticky(cluster, ip, 30)
    apart = len(set(choice.values())) > 1
    afresh = False
    rounds = 0
    while not (apart and afresh) and rounds < MAX_ROUNDS:
        rounds += 1
        time.sleep(SILENCE_S)  # longer than timeoutSeconds: every client's choice expires
        again = _sticky(cluster, ip, 5)
        afresh = afresh or any(again[c] != choice[c] for c in CLIENTS)
        choice = again
        apart = apart or len(set(choice.values())) > 1
    record_property("expiry_rounds", rounds)
    assert apart, f"three clients always landed on one backend ({choice}): affinity is not per client"
    assert afresh, (
        f"after {SILENCE_S} s of silence ({rounds} times) no client got a new backend: "
        f"timeoutSeconds {AFFINITY_TIMEOUT_S} was not honoured"
    )


@pytest.mark.check(13)
def test_session_affinity_switch(cluster):
    """sessionAffinity None (spread), ClientIP (sticky), None (spread) again on a live ClusterIP
    Service, each in one sync.

    Stands for service.go "Services should be able to switch session affinity for service with
    type clusterIP [LinuxOnly] [Conformance]".
    """
    base = web_service("switch")
    clients = CLIENTS[:2]
    for affinity in (None, 10800, None):
        cluster.apply([with_affinity(base, affinity)])
        ip = cluster.cluster_ip("switch")
        count = 30 if affinity else 60
        results = cluster.probes(*(Probe(c, ip, 80, count=count) for c in clients))
        for client, result in zip(clients, results, strict=True):
            assert outcomes(result) == {OK: count}, f"from {client}: {describe(result)}"
            spread = len(backends(result))
            if affinity:
                assert spread == 1, f"affinity ClientIP on, {client} not sticky: {describe(result)}"
            elif not spreads_one_client(cluster.dataplane):
                assert_backends(cluster.dataplane, result, BACKENDS,
                                f"affinity None, from {client}")
            else:
                assert spread > 1, f"affinity None, yet {client} stuck to one backend: {describe(result)}"
    skip_unless_spread(cluster.dataplane, "several backends from one client to tell "
                       "sessionAffinity None from ClientIP (ClientIP's stickiness held)")


def _nodeport_sessions(cluster, name: str, sources, count: int, sticky: bool,
                       protocol: str = TCP) -> dict[tuple[str, str], str]:
    """`count` connections from each source through each node's NodePort, all at once: each
    (source, node) pair sticks to one backend (sticky) or spreads over several."""
    port = cluster.node_port(name, 80, protocol)
    pairs = [(s, n) for s in sources for n in ("node1", "node2")]
    results = cluster.probes(*(Probe(s, cluster.node_ip(n), port, protocol, count=count)
                               for s, n in pairs))
    choice = {}
    for (source, node), result in zip(pairs, results, strict=True):
        where = f"{protocol} from {source} through {node}'s NodePort"
        assert outcomes(result) == {OK: count}, f"{where}: {describe(result)}"
        spread = len(backends(result))
        if sticky:
            assert spread == 1, f"{where}, affinity ClientIP, did not stick: {describe(result)}"
        elif not spreads_one_client(cluster.dataplane):
            assert_backends(cluster.dataplane, result, BACKENDS, f"{where}, affinity None,")
        else:
            assert spread > 1, f"{where}, affinity None, stuck to one: {describe(result)}"
        choice[source, node] = next(iter(backends(result)))
    return choice


@pytest.mark.check(32)
def test_session_affinity_nodeport_and_udp(cluster):
    """ClientIP affinity through NodePorts, over TCP and UDP, switched off again.

    `sticky` (NodePort, TCP and UDP port 80, every web pod): an outside client and pods on
    both nodes, through either node's NodePort, each stay on one backend for 30 new
    connections (TCP) or 30 datagrams from fresh source ports (UDP); pods sending UDP to
    the ClusterIP likewise. Then sessionAffinity None: the same clients spread.

    Upstream (test/e2e/network/service.go): "Services should have session affinity work
    for NodePort service [LinuxOnly] [Conformance]", "Services should be able to switch
    session affinity for NodePort service [LinuxOnly] [Conformance]"; networking.go
    "Networking Granular Checks: Services should function for client IP based session
    affinity: udp [LinuxOnly]".
    """
    svc = web_service("sticky", ServicePort(80, TCP, "tcp", HTTP_PORT),
                      ServicePort(80, UDP, "udp", HTTP_PORT), type="NodePort")
    sources = (EXTERNAL, "ns1/client-a", "ns1/client-b")
    for affinity, count in ((10800, 30), (None, 45)):
        cluster.apply([with_affinity(svc, affinity)])
        sticky = affinity is not None
        for protocol in (TCP, UDP):
            _nodeport_sessions(cluster, "sticky", sources, count, sticky, protocol)
        ip = cluster.cluster_ip("sticky")
        clients = ("ns1/client-a", "ns1/client-b")
        results = cluster.probes(*(Probe(c, ip, 80, UDP, count=count) for c in clients))
        for client, result in zip(clients, results, strict=True):
            assert outcomes(result) == {OK: count}, f"UDP from {client}: {describe(result)}"
            if not sticky and not spreads_one_client(cluster.dataplane):
                assert_backends(cluster.dataplane, result, BACKENDS,
                                f"UDP to the ClusterIP from {client}, affinity None,")
                continue
            assert (len(backends(result)) == 1) == sticky, (
                f"UDP to the ClusterIP from {client}, affinity {affinity}: {describe(result)}")
    skip_unless_spread(cluster.dataplane, "several backends from one client to tell "
                       "sessionAffinity None from ClientIP (ClientIP's stickiness held)")


NODEPORT_TIMEOUT_S = 1
NODEPORT_SILENCE_S = 2.0


@pytest.mark.check(33)
def test_session_affinity_nodeport_timeout(cluster, record_property):
    """A NodePort's ClientIP affinity ends after timeoutSeconds of silence.

    `sticky-short` (NodePort, timeoutSeconds 1): eight (client, node) pairs (an outside
    client and three pods, through each node's NodePort) each stick to one backend for 10
    connections; after 2 s of silence at least one pair lands elsewhere (all eight keeping
    their backend by chance: 3**-8; up to three rounds).

    Upstream (test/e2e/network/service.go): "Services should have session affinity timeout
    work for NodePort service [LinuxOnly]".
    """
    cluster.apply([with_affinity(web_service("sticky-short", type="NodePort"),
                                 NODEPORT_TIMEOUT_S)])
    sources = (EXTERNAL, *CLIENTS)
    choice = _nodeport_sessions(cluster, "sticky-short", sources, 10, True)
    for rounds in range(1, 4):
        time.sleep(NODEPORT_SILENCE_S)
        again = _nodeport_sessions(cluster, "sticky-short", sources, 10, True)
        if again != choice:
            record_property("expiry_rounds", rounds)
            return
        choice = again
    raise AssertionError(
        f"after {NODEPORT_SILENCE_S} s of silence (3 times) every (client, node) pair kept "
        f"its backend ({choice}): timeoutSeconds {NODEPORT_TIMEOUT_S} was not honoured")
