"""Balancing algorithms: each mode's new connections follow the algorithm it says it uses.

Every data plane names its algorithm in `balancing` (dataplanes/base.py): "random"
(iptables, nftables, ebpf, `userspace:random`), "rr" (userspace's default, IPVS's default
scheduler) or the IPVS scheduler a mode spec chose (`--mode ipvs:lc`). Each check below
concerns some algorithms and asserts their distribution with real connections; a mode whose
algorithm it does not concern skips it, saying which algorithm the mode has and what the
check is for.

Upstream: kube-proxy's IPVS mode takes its scheduler from `--ipvs-scheduler` (rr by default;
pkg/proxy/ipvs/proxier.go), its iptables and nftables modes choose at random (`statistic
--mode random --probability`, `numgen random mod N`), and the userspace proxy it dropped in
1.26 went round robin (pkg/proxy/userspace/roundrobin.go). No upstream e2e test checks an
algorithm: test/e2e/network has none, and the IPVS schedulers are only passed through to the
kernel (proxier_test.go checks the scheduler name on each virtual server, not the traffic).
Every IPVS real server has weight 1, as Kubernetes endpoints carry no weight, so wrr
balances as rr, wlc as lc and sed as nq.
"""

from __future__ import annotations

import socket
import time
from collections import Counter

import pytest
from scipy.stats import chisquare

from clusters.workloads.probe import OK
from conformance.harness import (
    BACKENDS,
    HTTP_PORT,
    Probe,
    backends,
    describe,
    outcomes,
    web_service,
)
from dataplanes.modes import OPTION_VALUES
from kube.model import TCP, UDP, ServicePort

ROUND_ROBIN = ("rr", "wrr")  # wrr with equal weights is rr
RANDOM = ("random",)
SOURCE_HASHING = ("sh", "mh")  # hash of the client's address (mh: Maglev's table)
# One backend per node for every client while connections come one at a time: dh hashes
# the VIP; fo keeps the first of equal weights; ovf the first whose active connections are
# below its weight (1); lblc and lblcr keep the server (set) they gave the VIP while it is
# not overloaded (more active connections than its weight).
DESTINATION_FIXED = ("dh", "fo", "ovf", "lblc", "lblcr")
LEAST_CONNECTION = ("lc", "wlc", "sed", "nq")
WHAT = {
    "rr": "round robin", "wrr": "weighted round robin (equal weights: round robin)",
    "random": "at random", "sh": "by source hashing", "mh": "by Maglev source hashing",
    "dh": "by destination hashing", "fo": "by weighted failover",
    "lc": "to the least connected", "wlc": "to the least connected by weight",
    "sed": "by shortest expected delay", "nq": "by never queue",
    "lblc": "by locality-based least connection", "lblcr": "by locality-based least "
    "connection with replication", "ovf": "by weighted overflow",
}
PER_BACKEND = 10  # check 72: rounds of the rotation
RANDOM_SAMPLES = 180  # check 73: per client; 90 disjoint pairs
# Four tests (two clients, counts and pairs) at 2e-5 each: a correct random mode fails
# fewer than 1 run in 10^4; round robin's pairs give p near 1e-34 at this size.
RANDOM_P_MIN = 2e-5
STICKY_SAMPLES = 6  # check 74: per client
STICKY_CLIENTS = ("ns1/client-a", "ns1/client-c", "ns1/web-1", "kube-system/coredns",
                  "ns1/client-b", "ns1/web-2", "ns1/web-3")  # seven addresses, two nodes
HELD_TIMEOUT_S = 2.0
CLOSE_SETTLE_S = 0.1


def _balancing(dataplane, wanted: tuple[str, ...], topic: str) -> str:
    """The mode's algorithm, or a skip saying what it balances with and what the check is for."""
    algorithm = getattr(dataplane, "balancing", None)
    if algorithm is None:
        pytest.skip(f"{dataplane.name} does not say how it balances (no `balancing`); this "
                    f"check is for {topic}")
    if algorithm not in wanted:
        how = WHAT.get(algorithm, f"with {algorithm}")
        # As its mode spec names it: ipvs:lc, userspace:random; iptables has no such option.
        chosen = set(OPTION_VALUES.get(dataplane.name, {})) & {"scheduler", "balancing"}
        mode = f"{dataplane.name}:{algorithm}" if chosen else dataplane.name
        pytest.skip(f"{mode} balances {how}; this check is for {topic} ({', '.join(wanted)})")
    return algorithm


# Each check's own Service port. Earlier checks leave flows behind towards the lowest
# ClusterIPs, which the allocator hands out again: a conntrack entry a SYN left untranslated
# at an address no Service held (kept 120 s), an IPVS UDP connection (kept 300 s). A new
# connection whose source port comes round to one of them reaches no endpoint or the old
# one, which a distribution check would count against the algorithm.
ROTATION_PORT, DICE_PORT, HASHED_PORT, LEAST_PORT = 7200, 7300, 7400, 7500


def _service(cluster, name: str, *ports: ServicePort) -> str:
    cluster.apply([web_service(name, *ports)])
    return cluster.cluster_ip(name)


@pytest.mark.check(72)
def test_balancing_round_robin(cluster, dataplane):
    """Round robin (rr; wrr with equal weights): 30 TCP connections from one pod and 30 UDP
    datagrams (fresh source ports) from another each give the three endpoints exactly 10,
    in the order of one rotation repeated (connection i reaches the endpoint connection
    i - 3 reached).

    Stands for kube-proxy's `--ipvs-scheduler=rr` (its default) and the round robin of its
    former userspace proxy; no upstream e2e test checks the algorithm (e2e has none).
    """
    algorithm = _balancing(dataplane, ROUND_ROBIN, "round robin")
    ip = _service(cluster, "rotation", ServicePort(ROTATION_PORT, TCP, "tcp", HTTP_PORT),
                  ServicePort(ROTATION_PORT, UDP, "udp", HTTP_PORT))
    count = PER_BACKEND * len(BACKENDS)
    requests = (Probe("ns1/client-a", ip, ROTATION_PORT, TCP, count=count),
                Probe("ns1/client-b", ip, ROTATION_PORT, UDP, count=count))
    for req, result in zip(requests, cluster.probes(*requests), strict=True):
        where = f"{req.protocol} from {req.source} ({algorithm})"
        assert outcomes(result) == {OK: count}, f"{where}: {describe(result)}"
        order = [s.backend for s in result.samples]
        assert backends(result) == dict.fromkeys(BACKENDS, PER_BACKEND), (
            f"{where}: not {PER_BACKEND} each: {describe(result)}")
        broken = [i for i in range(len(BACKENDS), count) if order[i] != order[i - len(BACKENDS)]]
        assert not broken, (
            f"{where}: connection {broken[0]} reached {order[broken[0]]}, not "
            f"{order[broken[0] - len(BACKENDS)]} as the rotation {order[:len(BACKENDS)]} "
            f"would; order {order}")


def _pairs(order: list[str]) -> list[int]:
    """Counts of the 9 ordered pairs of backends over disjoint pairs (0-1, 2-3, ...)."""
    pairs = Counter(zip(order[0::2], order[1::2], strict=False))
    return [pairs[(a, b)] for a in BACKENDS for b in BACKENDS]


@pytest.mark.check(73)
def test_balancing_random_uniform(cluster, dataplane):
    """Random: 180 TCP connections from a pod on each node to three endpoints are uniform
    by a chi-square test (p > 2e-5), and so are the 9 ordered pairs of 90 disjoint
    consecutive pairs (each choice independent of the last: round robin fails this with p
    near 1e-34). Four tests at 2e-5: a correct mode fails fewer than 1 run in 10^4.

    Stands for kube-proxy's iptables `statistic --mode random --probability 1/n` and
    nftables `numgen random mod n` endpoint choice; service.go only needs every endpoint to
    answer (no upstream e2e test checks the distribution: e2e has none).
    """
    _balancing(dataplane, RANDOM, "random choice")
    ip = _service(cluster, "dice", ServicePort(DICE_PORT, TCP, "", HTTP_PORT))
    clients = ("ns1/client-a", "ns1/client-b")
    results = cluster.probes(*(Probe(c, ip, DICE_PORT, count=RANDOM_SAMPLES)
                               for c in clients))
    for client, result in zip(clients, results, strict=True):
        assert outcomes(result) == {OK: RANDOM_SAMPLES}, f"from {client}: {describe(result)}"
        counts = backends(result)
        p = chisquare([counts[b] for b in BACKENDS]).pvalue
        assert p > RANDOM_P_MIN, (
            f"from {client} the split {dict(counts)} is not uniform: chi-square p = {p:.2g}")
        pairs = _pairs([s.backend for s in result.samples])
        p = chisquare(pairs).pvalue
        assert p > RANDOM_P_MIN, (
            f"from {client} consecutive choices are not independent: pairs "
            f"{dict(zip([f'{a[-1]}{b[-1]}' for a in BACKENDS for b in BACKENDS], pairs, strict=True))}"
            f", chi-square p = {p:.2g}")


@pytest.mark.check(74)
def test_balancing_hashing_sticky(cluster, dataplane):
    """Hashing: 6 TCP connections from each of seven pods (four on node1, three on node2).
    Source hashing (sh, mh): each pod always reaches one endpoint, and the pods together
    reach more than one (the hash spreads addresses). Destination hashing, failover,
    overflow and locality-based least connection (dh, fo, ovf, lblc, lblcr), with one
    connection at a time: every pod through a node reaches the same one endpoint (the VIP
    hashes alike; equal weights keep the first; a server with no other connection is never
    overloaded).

    Stands for kube-proxy's `--ipvs-scheduler=sh` (and mh, dh, fo, ovf, lblc, lblcr, which
    it passes to the kernel as well); no upstream e2e test checks the algorithm (e2e has
    none).
    """
    algorithm = _balancing(dataplane, SOURCE_HASHING + DESTINATION_FIXED,
                           "hashing, failover and locality")
    ip = _service(cluster, "hashed", ServicePort(HASHED_PORT, TCP, "", HTTP_PORT))
    requests = [Probe(c, ip, HASHED_PORT, count=STICKY_SAMPLES) for c in STICKY_CLIENTS]
    if algorithm in SOURCE_HASHING:
        results = cluster.probes(*requests)  # at once: the hash ignores the load
    else:
        results = [cluster.probes(req)[0] for req in requests]  # one connection at a time
    chosen: dict[str, str] = {}
    for client, result in zip(STICKY_CLIENTS, results, strict=True):
        assert outcomes(result) == {OK: STICKY_SAMPLES}, f"from {client}: {describe(result)}"
        reached = backends(result)
        assert len(reached) == 1, (
            f"{algorithm}: {client} reached more than one endpoint: {describe(result)}")
        chosen[client] = next(iter(reached))
    if algorithm in SOURCE_HASHING:
        assert len(set(chosen.values())) > 1, (
            f"{algorithm}: seven client addresses all hashed to one endpoint: {chosen}")
    else:
        for node in ("node1", "node2"):
            here = {c: b for c, b in chosen.items() if cluster.node_of(c) == node}
            assert len(set(here.values())) == 1, (
                f"{algorithm}: clients through {node} reached different endpoints: {here}")


def _hold(ip: str, port: int) -> tuple[socket.socket, str]:
    """A connection kept open, and the backend whose greeting it got (in the caller's netns)."""
    sock = socket.create_connection((ip, port), timeout=HELD_TIMEOUT_S)
    line = b""
    try:
        while not line.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                raise ConnectionResetError("closed before the greeting")
            line += chunk
    except BaseException:
        sock.close()
        raise
    return sock, line.split(b" ", 1)[0].decode()


@pytest.mark.check(75)
def test_balancing_least_connection(cluster, dataplane):
    """Least connection (lc, wlc, sed, nq): one pod opens six connections and holds them;
    each reaches an endpoint holding the fewest of them (two each at the end). Then both
    connections to one endpoint close (the second's, not the one a rotation would pick
    next): the next two connections both go to it, as it holds none.

    Stands for kube-proxy's `--ipvs-scheduler=lc` (and wlc, sed, nq); no upstream e2e test
    checks the algorithm (e2e has none).
    """
    algorithm = _balancing(dataplane, LEAST_CONNECTION, "least connection")
    ip = _service(cluster, "least", ServicePort(LEAST_PORT, TCP, "", HTTP_PORT))
    held: list[tuple[socket.socket, str]] = []

    def hold_one(step: str) -> str:
        loads = Counter({b: 0 for b in BACKENDS})
        loads.update(b for _, b in held)
        fewest = min(loads.values())
        sock, backend = cluster.call("ns1/client-a", _hold, ip, LEAST_PORT)
        held.append((sock, backend))
        assert loads.get(backend) == fewest, (
            f"{algorithm}, {step}: connection {len(held)} reached {backend}, which held "
            f"{loads.get(backend)} of the open connections {dict(loads)}, not the fewest")
        return backend

    try:
        order = [hold_one("opening six") for _ in range(2 * len(BACKENDS))]
        emptied = order[1]
        for sock, _ in [h for h in held if h[1] == emptied]:
            sock.close()
        held[:] = [h for h in held if h[1] != emptied]
        time.sleep(CLOSE_SETTLE_S)  # the FINs reach the proxy before the next SYN
        for _ in range(2):
            backend = hold_one(f"after closing both connections to {emptied}")
            assert backend == emptied, f"{algorithm}: reached {backend}, not {emptied}"
    finally:
        for sock, _ in held:
            sock.close()
