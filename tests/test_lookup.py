"""kube/lookup.py: a packet's addresses name the Service port they belong to, and the verdict
the view gives that traffic (drop under a Local policy with endpoints elsewhere, reject
without endpoints, drop outside loadBalancerSourceRanges; never for pods or the node)."""

from __future__ import annotations

from kube.lookup import CLUSTER_IP, ENDPOINT, LOAD_BALANCER, NODE_PORT, ServiceIndex
from kube.model import POLICY_LOCAL, TCP, Node, Pod, Service, ServicePort
from kube.state import DROP, REJECT, ClusterState

NODES = [Node.numbered(1), Node.numbered(2)]


def _index(node: str) -> tuple[ServiceIndex, ClusterState]:
    pods = [Pod("ns1", "far", {"app": "far"}, "node2")]
    services = [
        Service("ns1", "far", (ServicePort(80, TCP, "http", 8080),), type="LoadBalancer",
                selector={"app": "far"}, external_traffic_policy=POLICY_LOCAL,
                load_balancer_ips=("198.18.32.7",),
                load_balancer_source_ranges=("198.18.64.0/24",)),
        Service("ns1", "empty", (ServicePort(81, TCP),), selector={"app": "none"}),
    ]
    state = ClusterState.build(NODES, pods, services)
    view = state.node_view(node)
    return ServiceIndex(view.services, view.node_ips, view.cluster_cidr), state


def test_frontends_endpoints_replies_and_verdicts():
    index, state = _index("node1")
    far = [s for s in state.services if s.name == "far"][0]
    empty = [s for s in state.services if s.name == "empty"][0]
    node_port = far.ports[0].node_port
    pod_ip = state.pods[0].ip
    outside = "198.18.64.9"
    m = index.lookup(TCP, outside, 40000, NODES[0].ip, node_port)
    assert (m.service, m.via, m.reply, m.verdict) == ("ns1/far:http", NODE_PORT, False, DROP)
    # From a pod: kube-proxy's short circuit to the cluster's endpoints, no drop.
    assert index.lookup(TCP, "198.18.129.9", 40000, NODES[0].ip, node_port).verdict is None
    m = index.lookup(TCP, outside, 40000, "198.18.32.7", 80)
    assert (m.via, m.verdict) == (LOAD_BALANCER, DROP)
    assert index.lookup(TCP, "198.18.65.1", 40000, "198.18.32.7", 80).verdict == DROP
    m = index.lookup(TCP, "198.18.129.9", 40000, empty.cluster_ip, 81)
    assert (m.service, m.via, m.verdict) == ("ns1/empty", CLUSTER_IP, REJECT)
    m = index.lookup(TCP, pod_ip, 8080, "198.18.129.9", 40000)
    assert (m.via, m.reply, m.verdict) == (ENDPOINT, True, None)
    assert index.lookup(TCP, outside, 1, "198.18.200.1", 80) is None
    # On node2 the endpoint is local: nothing to drop from outside.
    index2, _ = _index("node2")
    assert index2.lookup(TCP, outside, 40000, NODES[1].ip, node_port).verdict is None
