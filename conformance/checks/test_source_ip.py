"""The client address a backend sees, per entry point and traffic policy."""

from __future__ import annotations

import pytest

from conformance.checks.flows import check_all, served
from conformance.harness import EXTERNAL, HTTP_PORT, Probe, web_service
from kube.model import PLAN, POLICY_LOCAL, TCP, UDP, EndpointPort, ServicePort

COUNT = 10


@pytest.mark.check(31)
def test_source_ip_per_policy(cluster):
    """Masquerade where replies would otherwise miss the translating node, nowhere else.

    `masq` (NodePort, Cluster policies) has one endpoint, web-1 on node1; `esipp`
    (NodePort, externalTrafficPolicy Local) has web-2 and web-3 on node2. Over TCP and UDP:

    - pods to the ClusterIP, on the endpoint's node and on the other: the pod's own IP;
    - an outside client through node2's NodePort (the endpoint is on node1): node2's IP,
      so the reply comes back through node2, which holds the translation;
    - a pod on node1 through node2's NodePort (the endpoint is beside the client): node2's
      IP, for the same reason;
    - node2 itself to the ClusterIP: node2's IP;
    - an outside client through node2's NodePort of `esipp`: the client's own IP.

    Where the endpoint is on the translating node itself (node1 to the ClusterIP, an
    outside client through node1's NodePort) the reply passes that node anyway: kube-proxy
    masquerades these too (the backend sees the node's address on the pod's veth), Cilium
    keeps the client's address; either is allowed and neither is asserted.

    Upstream: test/e2e/network/service.go "Services should preserve source pod IP for
    traffic thru service cluster IP [LinuxOnly]", "Services should support
    externalTrafficPolicy=Local for type=NodePort" (v1.30 and before: loadbalancer.go
    "LoadBalancers ESIPP [Slow] should work for type=NodePort"); kube-proxy's
    TestInternalExternalMasquerade (pkg/proxy/iptables/proxier_test.go: "pod to ClusterIP"
    not masqueraded, "pod to NodePort", "node to ClusterIP" and "external to NodePort"
    masqueraded, "external to NodePort with eTP:Local" not).
    """
    ports = (ServicePort(80, TCP, "tcp", HTTP_PORT), ServicePort(80, UDP, "udp", HTTP_PORT))
    ep_ports = (EndpointPort(HTTP_PORT, TCP, "tcp"), EndpointPort(HTTP_PORT, UDP, "udp"))
    masq = web_service("masq", *ports, type="NodePort", selector=None)
    esipp = web_service("esipp", *ports, type="NodePort", selector=None,
                        external_traffic_policy=POLICY_LOCAL)
    cluster.apply([masq, esipp], [
        cluster.endpoint_slice("masq", ["ns1/web-1"], ep_ports),
        cluster.endpoint_slice("esipp", ["ns1/web-2", "ns1/web-3"], ep_ports),
    ])
    ip = cluster.cluster_ip("masq")
    np_masq, np_esipp = cluster.node_port("masq"), cluster.node_port("esipp")
    node2 = cluster.node_ip("node2")
    web1, node2_pods = {"ns1/web-1"}, {"ns1/web-2", "ns1/web-3"}
    cases = {}
    for proto in (TCP, UDP):
        cases |= {
            f"{proto} pod on node1 to the ClusterIP": served(
                Probe("ns1/client-a", ip, 80, proto, count=COUNT), web1,
                cluster.pod_ip("ns1/client-a")),
            f"{proto} pod on node2 to the ClusterIP": served(
                Probe("ns1/client-b", ip, 80, proto, count=COUNT), web1,
                cluster.pod_ip("ns1/client-b")),
            f"{proto} outside client through node2's NodePort": served(
                Probe(EXTERNAL, node2, np_masq, proto, count=COUNT), web1, node2),
            f"{proto} pod on node1 through node2's NodePort": served(
                Probe("ns1/client-a", node2, np_masq, proto, count=COUNT), web1, node2),
            f"{proto} node2 to the ClusterIP": served(
                Probe("node/node2", ip, 80, proto, count=COUNT), web1, node2),
            f"{proto} outside client through node2's NodePort, externalTrafficPolicy Local":
                served(Probe(EXTERNAL, node2, np_esipp, proto, count=COUNT), node2_pods,
                       PLAN.external_client_ip),
        }
    check_all(cluster, cases)
