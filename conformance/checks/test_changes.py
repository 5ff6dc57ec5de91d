"""A live Service changing under its clients: ports, type, policies, labels, deletion, restarts."""

from __future__ import annotations

import time

import pytest

from clusters.workloads.probe import OK
from conformance.expect import NOT_SERVED, check_cases, silent
from conformance.harness import (
    BACKENDS,
    EXTERNAL,
    HTTP_PORT,
    Conversation,
    Probe,
    describe,
    outcomes,
    web_service,
)
from kube.model import (
    HEADLESS_LABEL,
    PLAN,
    POLICY_LOCAL,
    PROXY_NAME_LABEL,
    TCP,
    TYPE_NODE_PORT,
    UDP,
    ServicePort,
)

EVERYONE = set(BACKENDS)
NODE1 = {"ns1/web-1"}
NODE2 = {"ns1/web-2", "ns1/web-3"}
CLIENTS = ("ns1/client-a", "ns1/client-b")  # node1, node2
HTTP = ServicePort(80, TCP, "http", "http")
N = 30  # samples where the backends must all show up: 3 * (2/3)^30 misses one, about 2e-5
# Probes that run at once never share a node and a Service port where several endpoints must
# all answer: the userspace proxy's round robin, one per Service port and node, would split
# them between the clients.


@pytest.mark.check(40)
def test_service_ports_changed_live(cluster):
    """Ports added to, renumbered in and deleted from a live Service take effect in one sync.

    Stands for the e2e tests "Services should be updated after adding or deleting ports"
    and "Services should serve multiport endpoints from pods" (test/e2e/network/service.go),
    with a named targetPort (web-3 numbers `alt` differently) and TCP and UDP on one port.
    """
    alt = ServicePort(81, TCP, "alt", "alt")
    udp = ServicePort(80, UDP, "udp", HTTP_PORT)
    cluster.apply([web_service("ports", HTTP)])
    ip = cluster.cluster_ip("ports")
    check_cases(cluster, {f"port 80 from {c}": (Probe(c, ip, 80, count=N), EVERYONE)
                          for c in CLIENTS}, "one port")

    cluster.apply([web_service("ports", HTTP, alt, udp)])
    assert cluster.cluster_ip("ports") == ip, "an updated Service keeps its ClusterIP"
    cases = {}
    for c in CLIENTS:
        cases[f"port 80 from {c}"] = (Probe(c, ip, 80, count=N), EVERYONE)
        cases[f"added port 81 from {c}"] = (Probe(c, ip, 81, count=N), EVERYONE)
        cases[f"added UDP port 80 from {c}"] = (Probe(c, ip, 80, UDP, count=N), EVERYONE)
    check_cases(cluster, cases, "after adding TCP 81 and UDP 80")

    renumbered = ServicePort(90, TCP, "http", "http")
    cluster.apply([web_service("ports", renumbered, udp)])
    cases = {}
    for c in CLIENTS:
        cases[f"port 80 renumbered 90, from {c}"] = (Probe(c, ip, 90, count=N), EVERYONE)
        cases[f"old number 80 from {c}"] = (silent(c, ip, 80), NOT_SERVED)
        cases[f"deleted port 81 from {c}"] = (silent(c, ip, 81), NOT_SERVED)
        cases[f"UDP port 80, kept, from {c}"] = (Probe(c, ip, 80, UDP, count=N), EVERYONE)
    check_cases(cluster, cases, "after renumbering 80 to 90 and deleting 81")


@pytest.mark.check(41)
def test_services_up_down_and_recreated(cluster):
    """Services deleted and created around others; one deleted and created again.

    Stands for the e2e tests "Services should be able to up and down services" and
    "Services should work after the service has been recreated" (service.go): a deleted
    Service stops answering while the others keep serving, a new one answers at once, and
    one recreated under its old name works at whatever ClusterIP it gets (here the freed
    address of another goes to a Service with other endpoints: it must serve those).
    """
    up1 = web_service("up-down-1")
    up2 = web_service("up-down-2")
    again = web_service("recreated", selector={"app": "web", "node": "node1"})
    cluster.apply([up1, up2, again])
    ip1, ip2, old_again = (cluster.cluster_ip(n) for n in ("up-down-1", "up-down-2", "recreated"))
    check_cases(cluster, {
        "up-down-1": (Probe("ns1/client-a", ip1, 80, count=N), EVERYONE),
        "up-down-2": (Probe("ns1/client-b", ip2, 80, count=N), EVERYONE),
        "recreated": (Probe("ns1/client-b", old_again, 80, count=10), NODE1),
    }, "three Services up")

    up3 = web_service("up-down-3", selector={"app": "web", "node": "node2"})
    cluster.apply([up3, up2])  # up-down-1 and recreated deleted; up-down-3 is allocated first
    ip3 = cluster.cluster_ip("up-down-3")
    assert ip3 != ip2
    cases = {
        "up-down-2, kept": (Probe("ns1/client-a", ip2, 80, count=N), EVERYONE),
        "up-down-3, new": (Probe("ns1/client-b", ip3, 80, count=N), NODE2),
        "recreated, deleted": (silent("ns1/client-a", old_again, 80), NOT_SERVED),
    }
    if ip3 != ip1:
        cases["up-down-1, deleted"] = (silent("ns1/client-a", ip1, 80), NOT_SERVED)
    check_cases(cluster, cases, "after deleting up-down-1 and recreated, creating up-down-3")

    cluster.apply([up3, up2, again])
    new_again = cluster.cluster_ip("recreated")
    check_cases(cluster, {
        f"recreated from {c}": (Probe(c, new_again, 80, count=10), NODE1) for c in CLIENTS
    } | {
        "up-down-2": (Probe("ns1/client-a", ip2, 80, count=N), EVERYONE),
        "up-down-3": (Probe("ns1/client-b", ip3, 80, count=N), NODE2),
    }, f"recreated at {new_again} (was {old_again})")


@pytest.mark.check(42)
def test_service_type_and_node_ports_changed_live(cluster):
    """ClusterIP to NodePort (TCP and UDP on one port), NodePort renumbered, back to ClusterIP.

    Stands for the e2e tests "Services should be able to update service type to NodePort
    listening on same port number but different protocols" (service.go) and the NodePort
    half of "LoadBalancers should be able to change the type and ports of a TCP service" and
    "... of a UDP service" (loadbalancer.go): each NodePort answers from the sync that gives
    it and stops at the sync that takes it away, on every node, while the ClusterIP serves.
    """
    node1, node2 = cluster.node_ip("node1"), cluster.node_ip("node2")
    tcp = ServicePort(80, TCP, "tcp", HTTP_PORT)
    udp = ServicePort(80, UDP, "udp", HTTP_PORT)
    cluster.apply([web_service("retype", tcp)])
    ip = cluster.cluster_ip("retype")
    check_cases(cluster, {"ClusterIP": (Probe("ns1/client-a", ip, 80, count=10), EVERYONE)},
                "type ClusterIP")

    cluster.apply([web_service("retype", tcp, udp, type=TYPE_NODE_PORT)])
    assert cluster.cluster_ip("retype") == ip
    tcp_np, udp_np = cluster.node_port("retype", 80, TCP), cluster.node_port("retype", 80, UDP)
    check_cases(cluster, {
        "ClusterIP TCP": (Probe("ns1/client-b", ip, 80, count=N), EVERYONE),
        "ClusterIP UDP": (Probe("ns1/client-a", ip, 80, UDP, count=N), EVERYONE),
        "TCP NodePort of node1 from outside": (Probe(EXTERNAL, node1, tcp_np, count=N), EVERYONE),
        "UDP NodePort of node2 from outside": (Probe(EXTERNAL, node2, udp_np, UDP, count=N),
                                               EVERYONE),
    }, "type NodePort, TCP and UDP on port 80")

    moved = max(set(range(PLAN.node_port_range[1] - 2, PLAN.node_port_range[1] + 1))
                - {tcp_np, udp_np})
    renumbered = ServicePort(81, TCP, "tcp", HTTP_PORT, node_port=moved)
    cluster.apply([web_service("retype", renumbered, type=TYPE_NODE_PORT)])
    when = f"port 80 renumbered 81 and its NodePort {tcp_np} moved to {moved}, UDP deleted"
    check_cases(cluster, {
        "port 81": (Probe("ns1/client-a", ip, 81, count=N), EVERYONE),
        "new NodePort of node2": (Probe(EXTERNAL, node2, moved, count=N), EVERYONE),
    }, when)
    check_cases(cluster, {
        "new NodePort of node1": (Probe(EXTERNAL, node1, moved, count=N), EVERYONE),
        "old TCP NodePort of node1": (silent(EXTERNAL, node1, tcp_np), NOT_SERVED),
        "old TCP NodePort of node2": (silent(EXTERNAL, node2, tcp_np), NOT_SERVED),
        "deleted UDP NodePort of node2": (silent(EXTERNAL, node2, udp_np, UDP), NOT_SERVED),
        "old port 80": (silent("ns1/client-a", ip, 80), NOT_SERVED),
    }, when)

    cluster.apply([web_service("retype", ServicePort(81, TCP, "tcp", HTTP_PORT))])
    assert cluster.cluster_ip("retype") == ip
    check_cases(cluster, {
        "ClusterIP port 81": (Probe("ns1/client-b", ip, 81, count=N), EVERYONE),
        "former NodePort of node1": (silent(EXTERNAL, node1, moved), NOT_SERVED),
        "former NodePort of node2": (silent(EXTERNAL, node2, moved), NOT_SERVED),
        "former NodePort of node2 from a pod": (silent("ns1/client-a", node2, moved),
                                                NOT_SERVED),
    }, "back to type ClusterIP")


@pytest.mark.check(43)
def test_traffic_policies_changed_live(cluster):
    """internal- and externalTrafficPolicy flipped Cluster -> Local -> Cluster on a live Service.

    Stands for the e2e tests "Services should respect internalTrafficPolicy=Local Pod to
    Pod" (service.go) and "Services should implement NodePort and HealthCheckNodePort
    correctly when ExternalTrafficPolicy changes" (service.go; v1.30 and before:
    loadbalancer.go "LoadBalancers ESIPP [Slow] should handle updates to
    ExternalTrafficPolicy field"), whose NodePort half this is: each policy takes effect,
    and is undone, in one sync.
    """
    def svc(policy: str):
        return web_service("policy-flip", type=TYPE_NODE_PORT, internal_traffic_policy=policy,
                           external_traffic_policy=policy)

    cluster.apply([svc("Cluster")])
    ip, port = cluster.cluster_ip("policy-flip"), cluster.node_port("policy-flip")
    node1, node2 = cluster.node_ip("node1"), cluster.node_ip("node2")

    def everywhere(when: str) -> None:
        check_cases(cluster, {
            "pod on node1 to the ClusterIP": (Probe("ns1/client-a", ip, 80, count=N), EVERYONE),
            "outside client through node2": (Probe(EXTERNAL, node2, port, count=N), EVERYONE),
        }, when)

    everywhere("both policies Cluster")
    cluster.apply([svc(POLICY_LOCAL)])
    # (That the outside client's address reaches the backends is check 7's to show.)
    check_cases(cluster, {
        "pod on node1 to the ClusterIP": (Probe("ns1/client-a", ip, 80, count=N), NODE1),
        "pod on node2 to the ClusterIP": (Probe("ns1/client-b", ip, 80, count=N), NODE2),
        "outside client through node1": (Probe(EXTERNAL, node1, port, count=20), NODE1),
    }, "both policies Local")
    check_cases(cluster, {
        "outside client through node2": (Probe(EXTERNAL, node2, port, count=N), NODE2),
    }, "both policies Local")
    cluster.apply([svc("Cluster")])
    everywhere("both policies Cluster again")


@pytest.mark.check(44)
def test_proxy_name_and_headless_labels_toggled(cluster):
    """Labels that take a Service from this proxy and give it back, on live Services.

    Stands for the e2e tests "Services should implement service.kubernetes.io/service-proxy-name"
    and "Services should implement service.kubernetes.io/headless" (service.go): a Service
    created with the label is never served; one labelled while live stops being served,
    and is served again once the label is removed. kube-proxy's informers skip objects
    with either label (the headless one whatever its value, even with a ClusterIP).
    """
    foreign = {PROXY_NAME_LABEL: "foo-bar"}
    headless = {HEADLESS_LABEL: ""}
    disabled = [web_service("proxy-disabled", labels=foreign),
                web_service("headless-disabled", labels=headless)]

    def toggled(labelled: bool):
        return [web_service("proxy-toggled", labels=foreign if labelled else {}),
                web_service("headless-toggled", labels=headless if labelled else {})]

    cluster.apply([*disabled, *toggled(False)])
    ips = {n: cluster.cluster_ip(n) for n in ("proxy-disabled", "headless-disabled",
                                              "proxy-toggled", "headless-toggled")}

    def served(on: bool):
        want = EVERYONE if on else NOT_SERVED
        cases = {n: (Probe("ns1/client-a", ips[n], 80, count=N) if on else
                     silent("ns1/client-a", ips[n], 80), want)
                 for n in ("proxy-toggled", "headless-toggled")}
        for n in ("proxy-disabled", "headless-disabled"):
            cases[n] = (silent("ns1/client-b", ips[n], 80), NOT_SERVED)
        return cases

    check_cases(cluster, served(True), "created unlabelled")
    cluster.apply([*disabled, *toggled(True)])
    check_cases(cluster, served(False), "labels added")
    cluster.apply([*disabled, *toggled(False)])
    check_cases(cluster, served(True), "labels removed")


RESTART_TALK_S = 0.5
RESTART_TIMEOUT_S = 5.0


@pytest.mark.check(45)
def test_connections_survive_proxy_restart(cluster, record_property):
    """Connections opened before a proxy restart keep talking after it; new ones work.

    Stands for the e2e test "Services should work after restarting kube-proxy
    [Disruptive]" (service.go), with established connections on top: kube-proxy neither
    flushes conntrack nor its rules when it restarts, so a connection through a ClusterIP
    or a NodePort (SNATed) must outlive the restart (here every node's proxy is
    uninstalled, installed and synced). Each connection keeps its backend: any other would
    reset it.
    """
    svc1 = web_service("restart-proxy-1")
    svc2 = web_service("restart-proxy-2", type=TYPE_NODE_PORT)
    cluster.apply([svc1, svc2])
    ip1, ip2 = cluster.cluster_ip("restart-proxy-1"), cluster.cluster_ip("restart-proxy-2")
    port = cluster.node_port("restart-proxy-2")
    # Six connections to three endpoints each: a proxy that forgets them and picks a backend
    # afresh keeps them all by chance once in 3^6 = 729 runs.
    ends = {
        "client-a to restart-proxy-1": ("ns1/client-a", ip1, 80),
        "client-b to restart-proxy-1": ("ns1/client-b", ip1, 80),
        "client-c to restart-proxy-2": ("ns1/client-c", ip2, 80),
        "node2 to restart-proxy-2": ("node/node2", ip2, 80),
        "outside client to node1's NodePort": (EXTERNAL, cluster.node_ip("node1"), port),
        "outside client to node2's NodePort": (EXTERNAL, cluster.node_ip("node2"), port),
    }
    talks = {what: Conversation(cluster.netns(src), ip, p, timeout=RESTART_TIMEOUT_S)
             for what, (src, ip, p) in ends.items()}
    for talk in talks.values():
        talk.start()
    try:
        for what, talk in talks.items():
            assert talk.error is None, f"{what}: could not open the connection: {talk.error}"
        time.sleep(RESTART_TALK_S)
        before = {what: talk.echoed for what, talk in talks.items()}
        started = time.perf_counter()
        cluster.restart()
        restarted = time.perf_counter() - started
        record_property("restart_s", round(restarted, 2))
        deadline = time.perf_counter() + RESTART_TIMEOUT_S
        after_restart = {what: talk.echoed for what, talk in talks.items()}
        while time.perf_counter() < deadline and any(
            talk.error is None and talk.echoed < after_restart[what] + 20
            for what, talk in talks.items()
        ):
            time.sleep(0.05)
    finally:
        for talk in talks.values():
            talk.stop()
    for what, talk in talks.items():
        assert talk.error is None, (
            f"{what} (backend {talk.backend}): the connection broke across the restart after "
            f"{talk.echoed} messages ({before[what]} before it): {talk.error}"
        )
        assert talk.echoed >= after_restart[what] + 20, (
            f"{what}: only {talk.echoed - after_restart[what]} messages came back in "
            f"{RESTART_TIMEOUT_S:.0f} s after the restart"
        )
    requests = [Probe(c, ip, 80, count=20) for c in CLIENTS for ip in (ip1, ip2)]
    requests.append(Probe(EXTERNAL, cluster.node_ip("node2"), port, count=20))
    for req, result in zip(requests, cluster.probes(*requests), strict=True):
        assert outcomes(result) == {OK: 20}, (
            f"a new connection after the restart, from {req.source}: {describe(result)}"
        )
