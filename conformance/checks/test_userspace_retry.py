"""The userspace mode only: a backend that stops answering costs a retry, not a failed connection.

The kernel modes forward a connection's SYN to the endpoint they chose and cannot take it
back; the userspace proxy connects to the backend itself, so when one does not answer
within its connect timeout it tries the next. Here web-2 silently drops new connections
(its SYNs vanish, as with a wedged process) while it is still a ready endpoint.
"""

from __future__ import annotations

import subprocess

import pytest

from clusters.workloads.probe import OK
from conformance.harness import BACKENDS, Probe, backends, describe, outcomes, web_service

SILENT = "ns1/web-2"
CONNECTIONS = 60
PROBE_TIMEOUT_S = 3.0  # well above the proxy's connect timeout: a retry must fit in one probe
DROP_SYNS = ["INPUT", "-p", "tcp", "--dport", "8080", "--syn", "-j", "DROP"]


def _silence(cluster, on: bool) -> None:
    # Inside the backend pod's own namespace: the node and its rules do not change.
    cluster.call(SILENT, subprocess.run, ["iptables-nft", "-A" if on else "-D", *DROP_SYNS],
                 check=True, capture_output=True, timeout=30)


def _retries(cluster) -> int:
    return sum(cluster.dataplane.stats(node)["retries"] for node in cluster.nodes)


@pytest.mark.check(26)
def test_userspace_silent_backend_costs_a_retry(dataplane, request, record_property):
    """Userspace mode only (skipped elsewhere): with one backend silently dropping SYNs, every
    connection is still served, each one that started there after one retry.

    No upstream e2e test asserts this: it is svcbench's userspace proxy. The nearest kube-proxy
    behaviour is the former userspace proxier's (pkg/proxy/userspace, removed in v1.26):
    TryConnectEndpoints dialled the next endpoint when one did not connect within its
    EndpointDialTimeouts.
    """
    if dataplane.name != "userspace":
        pytest.skip(f"only the userspace proxy can retry another backend; {dataplane.name} "
                    "hands the connection to the endpoint it chose")
    cluster = request.getfixturevalue("cluster")
    cluster.apply([web_service("retry")])
    ip = cluster.cluster_ip("retry")
    clients = ("ns1/client-a", "ns1/client-b")
    warm = cluster.probes(*(Probe(c, ip, 80, count=30) for c in clients))
    for result in warm:
        assert set(backends(result)) == set(BACKENDS), f"before: {describe(result)}"
    before = _retries(cluster)
    _silence(cluster, True)
    try:
        results = cluster.probes(
            *(Probe(c, ip, 80, count=CONNECTIONS, timeout=PROBE_TIMEOUT_S) for c in clients)
        )
    finally:
        _silence(cluster, False)
    retries = _retries(cluster) - before
    for client, result in zip(clients, results, strict=True):
        assert outcomes(result) == {OK: CONNECTIONS}, (
            f"from {client}, with {SILENT} silent, connections failed: {describe(result)}"
        )
        assert SILENT not in backends(result), describe(result)
    # Round robin puts web-2 first on every third connection: each of those is one retry.
    expected = len(clients) * CONNECTIONS // len(BACKENDS)
    slow = sorted(s.latency_us for r in results for s in r.samples)[-expected:]
    record_property("retries", retries)
    record_property("retried_p50_ms", round(slow[len(slow) // 2] / 1e3, 1))
    assert retries >= expected, (
        f"{retries} retries counted for {len(clients) * CONNECTIONS} connections, "
        f"{expected} of which started at the silent {SILENT}"
    )
    after = cluster.probes(*(Probe(c, ip, 80, count=30) for c in clients))
    for result in after:
        assert set(backends(result)) == set(BACKENDS), f"{SILENT} answers again: {describe(result)}"
