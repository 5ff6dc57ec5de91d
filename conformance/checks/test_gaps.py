"""Gaps to the upstream e2e suite: shared endpoints, host UDP, released NodePorts, hairpin
through a NodePort and over UDP, endpoints split over EndpointSlices, and
internalTrafficPolicy Local falling back to terminating endpoints on the ClusterIP."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from clusters.workloads.probe import OK, TIMEOUT
from conformance.expect import assert_backends, spreads_one_client
from conformance.harness import (
    BACKENDS,
    EXTERNAL,
    HTTP_PORT,
    NAMESPACE,
    Probe,
    backends,
    describe,
    outcomes,
    web_service,
)
from kube.model import POLICY_LOCAL, TCP, UDP, EndpointPort, EndpointSlice, ServicePort

# Expected silence: a few short tries, any outcome but an answer.
# Where every endpoint must answer, 40+ samples over 3 miss one with p < 1e-6.
SILENT = {"count": 2, "timeout": 0.3, "expect": None}


def _served(cluster, result, count: int, what: str,
            every: set[str] | frozenset[str] = frozenset(BACKENDS)) -> None:
    """Every sample answered, by exactly `every` (or what the mode's algorithm promises one
    client over them: conformance/expect.py)."""
    assert outcomes(result) == {OK: count}, f"{what}: {describe(result)}"
    if not spreads_one_client(cluster.dataplane):
        assert_backends(cluster.dataplane, result, every, f"{what}:")
        return
    assert set(backends(result)) == set(every), (
        f"{what}: expected exactly {sorted(every)} to answer: {describe(result)}"
    )


def _silent(result, what: str) -> None:
    assert outcomes(result)[OK] == 0, f"{what} must no longer answer: {describe(result)}"


@pytest.mark.check(65)
def test_services_sharing_endpoints_one_deleted(cluster):
    """Two NodePort Services of the same shape select the same pods; one is deleted, then
    created again, while the other keeps serving every endpoint on its ClusterIP (TCP and
    UDP) and its NodePort, and a connection open through it across the delete stays up.
    nftables serves both through one class per Service shape (a chain, a member set and an
    endpoint map they share); the
    other modes hold the same endpoint addresses twice (iptables' KUBE-SEP-* chains, IPVS
    real servers, ebpf backends, the userspace proxy's table) and clear conntrack entries
    when a Service goes: deleting one Service must leave the other's rules, backends and
    connections alone, and creating it again must work.

    Upstream: networking.go "Networking Granular Checks: Services should function for
    multiple endpoint-Services with same selector"; service.go "Services should be able to
    up and down services" and "Services should work after the service has been recreated".
    """
    ports = (ServicePort(80, TCP, "tcp", HTTP_PORT), ServicePort(80, UDP, "udp", HTTP_PORT))
    first, second = (web_service(name, *ports, type="NodePort") for name in ("twin-a", "twin-b"))
    node1, node2 = cluster.node_ip("node1"), cluster.node_ip("node2")

    def both_serve(names: tuple[str, ...], when: str, count: int = 40) -> None:
        requests = []
        for name in names:
            ip, port = cluster.cluster_ip(name), cluster.node_port(name)
            requests += [Probe("ns1/client-a", ip, 80, TCP, count=count),
                         Probe("ns1/client-b", ip, 80, UDP, count=count),
                         Probe(EXTERNAL, node1, port, TCP, count=count),
                         Probe(EXTERNAL, node2, port, UDP, count=count)]
        for req, result in zip(requests, cluster.probes(*requests), strict=True):
            _served(cluster, result, count,
                    f"{when}: {req.protocol} {req.ip}:{req.port} from {req.source}")

    cluster.apply([first, second])
    both_serve(("twin-a", "twin-b"), "both Services")
    gone_ip, gone_port = cluster.cluster_ip("twin-a"), cluster.node_port("twin-a")

    kept_ip, kept_port = cluster.cluster_ip("twin-b"), cluster.node_port("twin-b")
    checks = [Probe("ns1/client-a", kept_ip, 80, TCP, count=45),
              Probe("ns1/client-b", kept_ip, 80, UDP, count=45),
              Probe(EXTERNAL, node1, kept_port, TCP, count=45),
              Probe(EXTERNAL, node2, kept_port, UDP, count=45),
              Probe("ns1/client-a", gone_ip, 80, TCP, **SILENT),
              Probe("ns1/client-b", gone_ip, 80, UDP, **SILENT),
              Probe(EXTERNAL, node1, gone_port, TCP, **SILENT),
              Probe(EXTERNAL, node2, gone_port, UDP, **SILENT)]
    # A connection through the kept Service, open across the other's delete and the probes.
    talk = cluster.conversation("ns1/client-c", kept_ip, 80).start()
    assert talk.error is None, f"could not open a connection through twin-b: {talk.error}"
    try:
        cluster.apply([second])
        echoed_at_sync = talk.echoed
        results = cluster.probes(*checks)
    finally:
        talk.stop()
    assert talk.error is None and talk.echoed == talk.sent > echoed_at_sync, (
        f"the connection through twin-b to {talk.backend} broke when twin-a was deleted: "
        f"{talk.echoed} of {talk.sent} messages echoed, {echoed_at_sync} before: {talk.error}"
    )
    for req, result in zip(checks[:4], results[:4], strict=True):
        _served(cluster, result, 45, f"twin-a deleted, twin-b's {req.protocol} "
                f"{req.ip}:{req.port} from {req.source}")
    for req, result in zip(checks[4:], results[4:], strict=True):
        _silent(result, f"the deleted twin-a's {req.protocol} {req.ip}:{req.port}")

    cluster.apply([second, first])
    both_serve(("twin-b", "twin-a"), "twin-a created again")


@pytest.mark.check(66)
def test_host_network_client_udp_clusterip(cluster):
    """UDP from host-network clients (the node itself, on both nodes) to a ClusterIP reaches
    every endpoint, local and remote.

    Upstream: networking.go "Networking Granular Checks: Services should function for
    node-Service: udp" (its ClusterIP half; the NodePort half is check 34's).
    """
    cluster.apply([web_service("hostnet-udp", ServicePort(80, UDP, "", HTTP_PORT))])
    ip = cluster.cluster_ip("hostnet-udp")
    sources = ("node/node1", "node/node2")
    results = cluster.probes(*(Probe(s, ip, 80, UDP, count=60) for s in sources))
    for source, result in zip(sources, results, strict=True):
        _served(cluster, result, 60, f"UDP to the ClusterIP from {source}")


def _port_free(port: int) -> list[str]:
    """Bind 0.0.0.0:port over TCP and UDP in the calling namespace: what refused, if any."""
    taken = []
    for kind, name in ((socket.SOCK_STREAM, TCP), (socket.SOCK_DGRAM, UDP)):
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                # A TIME_WAIT left by traffic is not a listener; only a live socket refuses.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(1)
            except OSError as exc:
                taken.append(f"{name}: {exc.strerror}")
    return taken


@pytest.mark.check(67)
def test_nodeports_released_on_delete(cluster):
    """A NodePort Service with a TCP and a UDP port is deleted: neither NodePort answers
    over TCP or UDP, from outside or from a pod, on either node; no socket holds the
    numbers on a node; a new Service asking for the same two numbers gets them and serves.

    Upstream: service.go "Services should release NodePorts on delete"; networking.go
    "Networking Granular Checks: Services should update nodePort: udp [Slow]" and
    "... should update nodePort: http [Slow]".
    """
    ports = (ServicePort(80, TCP, "tcp", HTTP_PORT), ServicePort(81, UDP, "udp", HTTP_PORT))
    cluster.apply([web_service("released", *ports, type="NodePort")])
    tcp_port, udp_port = cluster.node_port("released", 80, TCP), cluster.node_port("released", 81, UDP)
    assert tcp_port != udp_port
    node1, node2 = cluster.node_ip("node1"), cluster.node_ip("node2")
    # (source, node IP, NodePort, protocol): outside and a pod, both nodes, both ports.
    paths = [(EXTERNAL, node1, tcp_port, TCP), (EXTERNAL, node2, udp_port, UDP),
             ("ns1/client-a", node2, tcp_port, TCP), ("ns1/client-b", node1, udp_port, UDP)]
    before = cluster.probes(*(Probe(s, ip, port, proto, count=10) for s, ip, port, proto in paths))
    for (source, ip, port, proto), result in zip(paths, before, strict=True):
        assert outcomes(result) == {OK: 10}, f"before the delete, {proto} {ip}:{port} from " \
                                             f"{source}: {describe(result)}"

    cluster.apply([])
    # Every NodePort number with both protocols, through both nodes, from outside and a pod.
    after = [(source, ip, port, proto)
             for source in (EXTERNAL, "ns1/client-a")
             for ip in (node1, node2)
             for port in (tcp_port, udp_port)
             for proto in (TCP, UDP)]
    results = cluster.probes(*(Probe(s, ip, port, proto, **SILENT) for s, ip, port, proto in after))
    for (source, ip, port, proto), result in zip(after, results, strict=True):
        _silent(result, f"after the delete, {proto} {ip}:{port} from {source}")
    for node in ("node1", "node2"):
        for port in (tcp_port, udp_port):
            taken = cluster.call(f"node/{node}", _port_free, port)
            assert not taken, f"after the delete a socket on {node} still holds {port}: {taken}"

    reused = (replace(ports[0], node_port=tcp_port), replace(ports[1], node_port=udp_port))
    cluster.apply([web_service("reused", *reused, type="NodePort")])
    assert (cluster.node_port("reused", 80, TCP), cluster.node_port("reused", 81, UDP)) == (
        tcp_port, udp_port)
    again = cluster.probes(*(Probe(s, ip, port, proto, count=40) for s, ip, port, proto in paths))
    for (source, ip, port, proto), result in zip(paths, again, strict=True):
        _served(cluster, result, 40,
                f"the numbers reused by a new Service, {proto} {ip}:{port} from {source}")


@pytest.mark.check(68)
def test_hairpin_through_nodeport_and_udp(cluster):
    """Endpoint pods reach their own Service and sometimes themselves: through a NodePort on
    their own node and on the other node (TCP and UDP), and over UDP through the ClusterIP
    (check 11 covers TCP through the ClusterIP). Every endpoint answers each path.

    Upstream: networking.go "Networking Granular Checks: Services should function for
    endpoint-Service: http" (its NodePort half) and "... should function for
    endpoint-Service: udp" (ClusterIP and NodePort).
    """
    svc = web_service("hairpin", ServicePort(80, TCP, "tcp", HTTP_PORT),
                      ServicePort(80, UDP, "udp", HTTP_PORT), type="NodePort")
    cluster.apply([svc])
    ip, port = cluster.cluster_ip("hairpin"), cluster.node_port("hairpin")
    node1, node2 = cluster.node_ip("node1"), cluster.node_ip("node2")
    count = 45  # a pod misses itself in all of them with probability (2/3)^45 ~ 1e-8
    requests = [
        Probe("ns1/web-1", node1, port, TCP, count=count),  # its own node's NodePort
        Probe("ns1/web-2", node1, port, TCP, count=count),  # the other node's NodePort
        Probe("ns1/web-3", node2, port, UDP, count=count),
        Probe("ns1/web-1", node2, port, UDP, count=count),
        Probe("ns1/web-1", ip, 80, UDP, count=count),  # UDP through the ClusterIP
        Probe("ns1/web-2", ip, 80, UDP, count=count),
    ]
    for req, result in zip(requests, cluster.probes(*requests), strict=True):
        what = f"{req.source} to {req.protocol} {req.ip}:{req.port}"
        _served(cluster, result, count, what)
        if not spreads_one_client(cluster.dataplane):
            continue  # reaching itself needs one client's connections to spread
        assert backends(result)[req.source] > 0, f"{what} never reached itself: {describe(result)}"


def _slice(name: str, service: str, endpoints, ports) -> EndpointSlice:
    return EndpointSlice(NAMESPACE, name, service, tuple(endpoints), tuple(ports))


@pytest.mark.check(69)
def test_endpoints_split_over_slices(cluster):
    """A Service's endpoints and ports come from several EndpointSlices, as the controller
    writes them past 100 endpoints or when pods number a named port differently: every
    endpoint of every slice serves, each port with the number its slice gives.

    `split-ips` (port http): web-1 and web-2 in one slice, web-3 in another.
    `split-ports` (ports http and alt): web-1's http in one slice; web-1 and web-2's alt
    (8081) in a second; web-3's alt (9090) in a third. Port 80 reaches only web-1.

    Upstream: endpointslice.go "EndpointSlice should support a Service with multiple
    endpoint IPs specified in multiple EndpointSlices" and "EndpointSlice should support a
    Service with multiple ports specified in multiple EndpointSlices".
    """
    e = cluster.endpoint
    http, alt = EndpointPort(HTTP_PORT, TCP, "http"), EndpointPort(8081, TCP, "alt")
    ips = web_service("split-ips", ServicePort(80, TCP, "http", HTTP_PORT), selector=None)
    multi = web_service("split-ports", ServicePort(80, TCP, "http", HTTP_PORT),
                        ServicePort(81, TCP, "alt", 8081), selector=None)
    slices = [
        _slice("split-ips-a", "split-ips", [e("ns1/web-1"), e("ns1/web-2")], [http]),
        _slice("split-ips-b", "split-ips", [e("ns1/web-3")], [http]),
        _slice("split-ports-a", "split-ports", [e("ns1/web-1")], [http]),
        _slice("split-ports-b", "split-ports", [e("ns1/web-1"), e("ns1/web-2")], [alt]),
        _slice("split-ports-c", "split-ports", [e("ns1/web-3")],
               [EndpointPort(9090, TCP, "alt")]),
    ]
    cluster.apply([ips, multi], slices)
    ips_ip, multi_ip = cluster.cluster_ip("split-ips"), cluster.cluster_ip("split-ports")
    cases = [  # (probe, the exact set that must answer)
        (Probe("ns1/client-a", ips_ip, 80, count=45), set(BACKENDS)),
        (Probe("ns1/client-b", ips_ip, 80, count=45), set(BACKENDS)),
        (Probe("ns1/client-a", multi_ip, 80, count=20), {"ns1/web-1"}),
        (Probe("ns1/client-b", multi_ip, 80, count=20), {"ns1/web-1"}),
        (Probe("ns1/client-a", multi_ip, 81, count=45), set(BACKENDS)),
        (Probe("ns1/client-b", multi_ip, 81, count=45), set(BACKENDS)),
    ]
    results = cluster.probes(*(req for req, _ in cases))
    for (req, every), result in zip(cases, results, strict=True):
        _served(cluster, result, req.count, f"{req.ip}:{req.port} from {req.source}", every)


@pytest.mark.check(70)
def test_internal_local_falls_back_to_terminating(cluster):
    """internalTrafficPolicy Local on the ClusterIP where node1's only endpoint is
    terminating but still serving and node2 has a ready one: node1's pods and node1 itself
    use the terminating local endpoint, never the ready remote one; node2 uses its ready
    endpoint and not its own terminating one (fallback is per node, only without a ready
    local endpoint). A second Service whose only endpoint is web-1, terminating: node1
    reaches it, node2 has no local endpoint and drops (the Service has endpoints elsewhere).
    TCP and UDP.

    Upstream: service.go "Services should fallback to local terminating endpoints when
    there are no ready endpoints with internalTrafficPolicy=Local"; conntrack.go "Conntrack
    should be able to preserve UDP traffic when server pod cycles for a ClusterIP service
    with InternalTrafficPolicy set to Local" (issue 126934: its endpoints' conditions); and
    kube-proxy's TestCategorizeEndpoints (pkg/proxy/topology_test.go) "iTP: Local, with
    terminating local endpoints".
    """
    e = cluster.endpoint
    ports = (ServicePort(80, TCP, "tcp", HTTP_PORT), ServicePort(80, UDP, "udp", HTTP_PORT))
    slice_ports = (EndpointPort(HTTP_PORT, TCP, "tcp"), EndpointPort(HTTP_PORT, UDP, "udp"))

    def draining(key: str):
        return e(key, ready=False, serving=True, terminating=True)

    mixed = web_service("itp-draining", *ports, selector=None,
                        internal_traffic_policy=POLICY_LOCAL)
    lone = web_service("itp-draining-only", *ports, selector=None,
                       internal_traffic_policy=POLICY_LOCAL)
    cluster.apply([mixed, lone], [
        _slice("itp-draining-1", "itp-draining",
               [draining("ns1/web-1"), e("ns1/web-2"), draining("ns1/web-3")], slice_ports),
        _slice("itp-draining-only-1", "itp-draining-only", [draining("ns1/web-1")],
               slice_ports),
    ])
    ip, lone_ip = cluster.cluster_ip("itp-draining"), cluster.cluster_ip("itp-draining-only")
    node1_only, node2_ready = {"ns1/web-1"}, {"ns1/web-2"}
    silent = {"count": 2, "timeout": 0.3, "expect": TIMEOUT}
    cases = [  # (probe, the exact set that must answer; None: dropped)
        (Probe("ns1/client-a", ip, 80, TCP, count=20), node1_only),
        (Probe("ns1/client-c", ip, 80, UDP, count=20), node1_only),
        (Probe("node/node1", ip, 80, TCP, count=20), node1_only),
        (Probe("node/node1", ip, 80, UDP, count=20), node1_only),
        (Probe("ns1/client-b", ip, 80, TCP, count=20), node2_ready),
        (Probe("ns1/client-b", ip, 80, UDP, count=20), node2_ready),
        (Probe("node/node2", ip, 80, TCP, count=20), node2_ready),
        (Probe("ns1/client-a", lone_ip, 80, TCP, count=20), node1_only),
        (Probe("ns1/client-a", lone_ip, 80, UDP, count=20), node1_only),
        (Probe("ns1/client-b", lone_ip, 80, TCP, **silent), None),
        (Probe("ns1/client-b", lone_ip, 80, UDP, **silent), None),
    ]
    results = cluster.probes(*(req for req, _ in cases))
    for (req, every), result in zip(cases, results, strict=True):
        what = f"{req.protocol} {req.ip}:80 from {req.source}"
        if every is None:
            assert outcomes(result) == {TIMEOUT: req.count}, (
                f"{what}: no local endpoint, one elsewhere: must be dropped, not refused or "
                f"served: {describe(result)}"
            )
        else:
            _served(cluster, result, req.count, what, every)
