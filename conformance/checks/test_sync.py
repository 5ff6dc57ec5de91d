"""Syncing under load: live connections, stale UDP flows, rules removed by others, restarts."""

from __future__ import annotations

import time

import pytest

from clusters.workloads.probe import OK
from conformance.harness import (
    EXTERNAL,
    HTTP_PORT,
    Probe,
    backends,
    describe,
    outcomes,
    web_service,
)
from conformance.sabotage import sabotage_for
from kube.model import UDP, EndpointPort, ServicePort

UNRELATED_SYNCS = 60  # every churn pattern (i % 5, i % 3) four times over
STALE_UDP_LIMIT_S = 5.0
UDP_SOURCE_PORT = 40404


@pytest.mark.check(19)
def test_established_connection_survives_syncs(cluster, record_property):
    """One TCP connection through a ClusterIP keeps echoing across 60 syncs of unrelated
    Services and endpoints coming and going.

    No upstream e2e test asserts this. The nearest kube-proxy behaviour: a sync replaces its
    rules atomically (one iptables-restore, one nft transaction) and leaves established
    conntrack entries alone, clearing only those of removed UDP endpoints.
    """
    steady = web_service("steady")
    cluster.apply([steady])
    talk = cluster.conversation("ns1/client-a", cluster.cluster_ip("steady"), 80).start()
    assert talk.error is None, f"could not open the connection: {talk.error}"
    started = time.perf_counter()
    first_sync = len(cluster.sync_seconds)
    syncs = 0
    try:
        for i in range(UNRELATED_SYNCS):
            # Unrelated Services come and go, and one keeps changing its endpoints.
            churn = [web_service(f"churn-{j}") for j in range(i % 5)]
            flap = cluster.endpoint_slice("flap", ["ns1/web-1", "ns1/web-2", "ns1/web-3"][: 1 + i % 3])
            cluster.apply([steady, *churn, web_service("flap", selector=None)], [flap])
            syncs += 1
            # A message crosses between any two syncs, however fast they are (an
            # incremental update takes well under the conversation's 5 ms trickle).
            echoed, deadline = talk.echoed, time.monotonic() + 1.0
            while talk.echoed == echoed and talk.error is None and time.monotonic() < deadline:
                time.sleep(0.001)
            if talk.error:
                break
    finally:
        talk.stop()
    seconds = time.perf_counter() - started
    record_property("node_syncs", syncs * len(cluster.nodes))
    record_property("messages", talk.echoed)
    record_property("seconds", round(seconds, 1))
    durations = sorted(cluster.sync_seconds[first_sync:])
    if durations:
        record_property("node_sync_p50_ms", round(durations[len(durations) // 2] * 1e3, 1))
    assert talk.error is None, (
        f"the connection to {talk.backend} broke after {syncs} syncs and {talk.echoed} "
        f"messages: {talk.error}"
    )
    assert syncs == UNRELATED_SYNCS
    assert talk.echoed == talk.sent and talk.echoed >= UNRELATED_SYNCS, (
        f"{talk.sent} messages sent, {talk.echoed} echoed over {syncs} syncs"
    )


@pytest.mark.check(20)
def test_udp_stale_conntrack_cleared(cluster, record_property):
    """A UDP flow from a fixed source port reaches the remaining endpoint within 5 s after its
    own endpoint is removed (pod to ClusterIP).

    Stands for conntrack.go "Conntrack should be able to preserve UDP traffic when server pod
    cycles for a ClusterIP service" and networking.go "Networking Granular Checks: Services
    should update endpoints: udp"; kube-proxy clears such stale UDP entries after each sync
    (pkg/proxy/conntrack, CleanStaleEntries).
    """
    svc = web_service("udp-stale", ServicePort(80, UDP, "", HTTP_PORT), selector=None)
    ports = (EndpointPort(HTTP_PORT, UDP),)
    both = ["ns1/web-1", "ns1/web-2"]
    cluster.apply([svc], [cluster.endpoint_slice("udp-stale", both, ports)])
    ip = cluster.cluster_ip("udp-stale")
    first = cluster.probe("ns1/client-a", ip, 80, protocol=UDP, count=5, interval_s=0.05,
                          source_port=UDP_SOURCE_PORT)
    assert outcomes(first) == {OK: 5}, describe(first)
    assert len(backends(first)) == 1, f"one source port, one flow, one backend: {describe(first)}"
    gone = next(iter(backends(first)))
    remaining = next(b for b in both if b != gone)
    # Traffic keeps flowing through the change: that is what keeps a stale flow alive.
    with cluster.probe_loop("ns1/client-a", ip, 80, protocol=UDP, timeout=0.2, interval_s=0.05,
                            source_port=UDP_SOURCE_PORT, limit_s=STALE_UDP_LIMIT_S + 5,
                            until=lambda s: s.backend == remaining) as loop:
        changed = time.perf_counter()
        cluster.apply([svc], [cluster.endpoint_slice("udp-stale", [remaining], ports)])
        moved = loop.wait(STALE_UDP_LIMIT_S - (time.perf_counter() - changed))
    if moved:
        first_hit = next(t for t, s in loop.samples if s.backend == remaining)
        record_property("udp_flow_moved_ms", round((first_hit - changed) * 1e3, 1))
    assert moved, (
        f"UDP from source port {UDP_SOURCE_PORT} still reaches the removed {gone} "
        f"{STALE_UDP_LIMIT_S} s after the change: stale conntrack entries were not cleared"
    )
    after = cluster.probe("ns1/client-a", ip, 80, protocol=UDP, count=5,
                          source_port=UDP_SOURCE_PORT)
    assert set(backends(after)) == {remaining}, describe(after)


@pytest.mark.check(21)
def test_rules_restored_after_removal_and_restart(cluster):
    """After the mode's state on a node is removed from outside (nat table or nft ruleset
    flushed, XDP detached, IPVS and ipsets flushed), one sync brings back ClusterIP TCP and
    UDP, NodePorts and cluster DNS; and again after a proxy restart.

    Stands for networking.go "Networking should recreate its iptables rules if they are deleted
    [Disruptive]" (upstream deletes every KUBE-* iptables chain; here each mode's own state is
    removed, and the sync is asked for rather than detected: kube-proxy notices a flush through
    its KUBE-PROXY-CANARY chains and resyncs) and service.go "Services should work after
    restarting kube-proxy [Disruptive]".
    """
    if sabotage_for(cluster.dataplane) is None:
        pytest.skip(f"no way to remove {cluster.dataplane.name} rules from outside is known "
                    "(conformance/sabotage.py)")
    cluster.apply([web_service("kept"),
                   web_service("kept-udp", ServicePort(80, UDP, "", HTTP_PORT)),
                   web_service("kept-nodeport", type="NodePort")])
    tcp_ip, udp_ip = cluster.cluster_ip("kept"), cluster.cluster_ip("kept-udp")
    port = cluster.node_port("kept-nodeport")

    def every_service_works(when: str) -> None:
        requests = [Probe("ns1/client-a", tcp_ip, 80, count=20),
                    Probe("ns1/client-b", udp_ip, 80, UDP, count=20)]
        requests += [Probe(EXTERNAL, cluster.node_ip(n), port, count=20) for n in ("node1", "node2")]
        for req, result in zip(requests, cluster.probes(*requests), strict=True):
            assert outcomes(result) == {OK: 20}, f"{when}, from {req.source}: {describe(result)}"
        answer = cluster.resolve("ns1/client-b", "kept.ns1.svc.cluster.local")
        assert [str(r) for rrset in answer.answer for r in rrset] == [tcp_ip], (
            f"{when}: cluster DNS through its Service answered {answer.answer}"
        )

    every_service_works("before")
    done = cluster.sabotage()
    broken = cluster.probe("ns1/client-a", tcp_ip, 80, count=3, timeout=0.5)
    assert outcomes(broken)[OK] == 0, (
        f"the sabotage ({'; '.join(done)}) left the Service working, so it proves nothing"
    )
    cluster.sync()
    every_service_works("after a sync following the removal")
    cluster.restart()
    every_service_works("after a proxy restart")
