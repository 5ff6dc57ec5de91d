"""hostNetwork pods as endpoints and as clients: endpoints at a node's own address."""

from __future__ import annotations

import pytest

from clusters.workloads.probe import TIMEOUT
from conformance.expect import NOT_SERVED, SILENT, check_cases, silent
from conformance.harness import EXTERNAL, HOST_PORT, Probe, web_service
from kube.model import POLICY_LOCAL, TCP, TYPE_NODE_PORT, UDP, EndpointPort, ServicePort

HOSTS = {"node/node1", "node/node2"}  # what the node listeners answer as
N = 30  # two backends: 2 * (1/2)^30 misses one


def host_ports() -> tuple[EndpointPort, ...]:
    return (EndpointPort(HOST_PORT, TCP, "tcp"), EndpointPort(HOST_PORT, UDP, "udp"))


def host_service(name: str, **fields) -> object:
    return web_service(name, ServicePort(80, TCP, "tcp", HOST_PORT),
                       ServicePort(80, UDP, "udp", HOST_PORT), selector=None, **fields)


@pytest.mark.check(46)
def test_host_network_endpoints(cluster):
    """Endpoints at the nodes' own addresses (hostNetwork pods), reached from pods, from
    nodes and from outside, by ClusterIP and NodePort, over TCP and UDP.

    Stands for the e2e test "Networking Granular Checks: Services should function for
    service endpoints using hostNetwork" (test/e2e/network/networking.go: pod-Service and
    node-Service with hostNetwork endpoints, http and udp, by ClusterIP and NodePort), and
    "... should function for node-Service: http" / "...: udp" with such endpoints. An
    endpoint on the client's own node is the node's own address: DNAT to it ends in the
    node's stack, not in a pod.
    """
    ends = [cluster.host_endpoint("node1"), cluster.host_endpoint("node2")]
    cluster.apply([host_service("hostnet-ep", type=TYPE_NODE_PORT)],
                  [cluster.endpoint_slice("hostnet-ep", ends, host_ports())])
    ip = cluster.cluster_ip("hostnet-ep")
    tcp_np = cluster.node_port("hostnet-ep", 80, TCP)
    udp_np = cluster.node_port("hostnet-ep", 80, UDP)
    node1, node2 = cluster.node_ip("node1"), cluster.node_ip("node2")
    # Rounds in which no node serves one Service port to two clients at once: the
    # userspace proxy's round robin would split the two endpoints between them.
    rounds = [{
        "pod on node1, ClusterIP TCP": (Probe("ns1/client-a", ip, 80, count=N), HOSTS),
        "node2, ClusterIP UDP": (Probe("node/node2", ip, 80, UDP, count=N), HOSTS),
        "outside, node2's NodePort TCP": (Probe(EXTERNAL, node2, tcp_np, count=N), HOSTS),
    }, {
        "node1, ClusterIP TCP": (Probe("node/node1", ip, 80, count=N), HOSTS),
        "pod on node2, ClusterIP UDP": (Probe("ns1/client-b", ip, 80, UDP, count=N), HOSTS),
        "outside, node1's NodePort UDP": (Probe(EXTERNAL, node1, udp_np, UDP, count=N), HOSTS),
    }, {
        "pod on node1, node2's NodePort": (Probe("ns1/client-c", node2, tcp_np, count=N), HOSTS),
    }]
    for cases in rounds:
        check_cases(cluster, cases)


@pytest.mark.check(47)
def test_internal_traffic_policy_local_host_network(cluster):
    """internalTrafficPolicy Local with hostNetwork clients and a hostNetwork endpoint.

    Stands for the e2e tests "Services should respect internalTrafficPolicy=Local Pod
    (hostNetwork: true) to Pod" and "Services should respect internalTrafficPolicy=Local
    Pod and Node, to Pod (hostNetwork: true)" (service.go): a node reaches only its own
    endpoints, and the one endpoint, on node1's address, serves node1 and its pods while
    node2 and its pods get nothing (the Service has an endpoint, so the packet is dropped).
    """
    pods = web_service("itp-pods", internal_traffic_policy=POLICY_LOCAL)
    host = host_service("itp-host", internal_traffic_policy=POLICY_LOCAL)
    cluster.apply([pods, host], [cluster.endpoint_slice("itp-host", [cluster.host_endpoint(
        "node1")], host_ports())])
    to_pods, to_host = cluster.cluster_ip("itp-pods"), cluster.cluster_ip("itp-host")
    dropped = {**SILENT, "expect": TIMEOUT}
    check_cases(cluster, {
        "node1 to pods": (Probe("node/node1", to_pods, 80, count=20), {"ns1/web-1"}),
        "node2 to pods": (Probe("node/node2", to_pods, 80, count=N), {"ns1/web-2", "ns1/web-3"}),
        "pod on node1 to node1's address": (Probe("ns1/client-a", to_host, 80, count=10),
                                            {"node/node1"}),
        "node1 to its own address": (Probe("node/node1", to_host, 80, UDP, count=10),
                                     {"node/node1"}),
        "pod on node2": (Probe("ns1/client-b", to_host, 80, **dropped), TIMEOUT),
        "node2": (Probe("node/node2", to_host, 80, **dropped), TIMEOUT),
        # A datagram the node's own output path drops fails its send (EPERM) at once.
        "node2, UDP": (silent("node/node2", to_host, 80, UDP), NOT_SERVED),
    })
