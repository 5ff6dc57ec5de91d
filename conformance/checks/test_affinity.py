"""Session affinity ClientIP: stickiness per client, expiry, switching on and off."""

from __future__ import annotations

import time

import pytest

from clusters.workloads.probe import OK
from conformance.harness import (
    CLIENTS,
    Probe,
    backends,
    describe,
    outcomes,
    web_service,
    with_affinity,
)

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
            else:
                assert spread > 1, f"affinity None, yet {client} stuck to one backend: {describe(result)}"
