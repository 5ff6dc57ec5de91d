"""The small clusters the data planes' rendering tests trace packets through."""

from __future__ import annotations

import pytest

from kube.model import (
    POLICY_LOCAL,
    TYPE_LOAD_BALANCER,
    TYPE_NODE_PORT,
    UDP,
    ContainerPort,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState

NODE1_IP = "198.18.0.1"
EXTERNAL_CLIENT = "198.18.0.200"
CLIENT_POD = "198.18.129.200"  # a pod on node1 that backs no Service
NODES = (Node.numbered(1), Node.numbered(2))
EXTERNAL_IP = "198.18.64.10"
# web(**BOTH_LOCAL): a NodePort and an externalIP, both traffic policies Local.
BOTH_LOCAL = {"type": TYPE_NODE_PORT, "node_port": 30000, "external_ips": (EXTERNAL_IP,),
              "internal_traffic_policy": POLICY_LOCAL, "external_traffic_policy": POLICY_LOCAL}
LB_IP = "198.18.32.10"  # in the plan's load-balancer range
# web(**LOAD_BALANCER): a LoadBalancer Service with one ingress IP and NodePort 30001.
LOAD_BALANCER = {"type": TYPE_LOAD_BALANCER, "node_port": 30001, "load_balancer_ips": (LB_IP,)}


def backends(n: int, app: str = "web", nodes=("node1", "node2")) -> list[Pod]:
    """n pods labelled app=<app>, spread over `nodes` in turn, serving TCP and UDP 8080."""
    ports = (ContainerPort(8080), ContainerPort(8080, UDP))
    return [
        Pod("ns1", f"{app}-{i}", labels={"app": app}, node_name=nodes[i % len(nodes)], ports=ports)
        for i in range(n)
    ]


def web(name: str = "svc1", **kw) -> Service:
    """Service ns1/<name>, port p80 80 -> 8080, selecting app=web (or app=<app>)."""
    port = ServicePort(80, name="p80", target_port=8080, node_port=kw.pop("node_port", None))
    return Service("ns1", name, ports=(port,), selector={"app": kw.pop("app", "web")}, **kw)


def view(pods, services, node: str = "node1"):
    return ClusterState.build(NODES, pods, services).node_view(node)



def trace_both_local(render, go, **on_node) -> None:
    """kube-proxy's behaviour for BOTH_LOCAL on node1, traced through a mode's rules.

    render(view) -> text; go(text, src, dst, port, **kw) -> a trace; on_node: go's option
    for a process on the node. Local and remote endpoints, remote ones only, none.
    """

    def frontends(text: str, src: str, **kw) -> list:
        return [go(text, src, NODE1_IP, 30000, **kw), go(text, src, EXTERNAL_IP, 80, **kw)]

    node1 = {"198.18.129.2:8080": 0.5, "198.18.129.3:8080": 0.5}
    node2 = {"198.18.130.2:8080": 0.5, "198.18.130.3:8080": 0.5}
    v = view(backends(3), [web(**BOTH_LOCAL)])
    text, vip = render(v), v.services[0].cluster_ip
    assert go(text, CLIENT_POD, vip, 80).endpoints() == pytest.approx(node1)
    for r in frontends(text, EXTERNAL_CLIENT):
        assert r.endpoints() == pytest.approx(node1) and r.masquerade is False
    # The short circuit: pods and the node itself reach every endpoint.
    every = dict.fromkeys((*node1, "198.18.130.2:8080"), 1 / 3)
    for r in frontends(text, CLIENT_POD) + frontends(text, NODE1_IP, **on_node):
        assert r.endpoints() == pytest.approx(every)

    v = view(backends(2, nodes=("node2",)), [web(**BOTH_LOCAL)])
    text, vip = render(v), v.services[0].cluster_ip
    # Endpoints exist elsewhere: dropped, never rejected.
    assert go(text, CLIENT_POD, vip, 80).verdicts() == {"DROP"}
    assert go(text, NODE1_IP, vip, 80, **on_node).verdicts() == {"DROP"}
    for r in frontends(text, EXTERNAL_CLIENT):
        assert r.verdicts() == {"DROP"}
    for r in frontends(text, CLIENT_POD):
        assert r.endpoints() == pytest.approx(node2) and r.masquerade is False
    for r in frontends(text, NODE1_IP, **on_node):
        assert r.endpoints() == pytest.approx(node2) and r.masquerade is True

    v = view([], [web(**BOTH_LOCAL)])
    text, vip = render(v), v.services[0].cluster_ip
    assert go(text, CLIENT_POD, vip, 80).verdicts() == {"REJECT"}
    for src in (EXTERNAL_CLIENT, CLIENT_POD):
        for r in frontends(text, src):
            assert r.verdicts() == {"REJECT"}, (src, r)


def trace_load_balancer(render, go, **on_node) -> None:
    """kube-proxy's load-balancer IP handling on node1, traced through a mode's rules.

    Like trace_both_local. The LB IP serves outside clients like an externalIP; with
    loadBalancerSourceRanges only sources inside them reach it (pods and the node too),
    others are dropped, never rejected; the NodePort is not filtered; with
    externalTrafficPolicy Local outside clients keep their address and reach node1's
    endpoints only, while pods and the node are short-circuited to every endpoint.
    """
    node1 = {"198.18.129.2:8080": 0.5, "198.18.129.3:8080": 0.5}
    every = dict.fromkeys((*node1, "198.18.130.2:8080"), 1 / 3)
    pods = backends(3)

    def lb(**kw):
        v = view(pods, [web(**LOAD_BALANCER, **kw)])
        return render(v)

    def served(r, endpoints=every):
        assert r.endpoints() == pytest.approx(endpoints), str(r)

    def dropped(r):
        assert r.verdicts() == {"DROP"}, str(r)

    text = lb()
    for r in (go(text, EXTERNAL_CLIENT, LB_IP, 80), go(text, EXTERNAL_CLIENT, LB_IP, 80)):
        served(r)
        assert r.masquerade is True, str(r)
    served(go(text, CLIENT_POD, LB_IP, 80))
    served(go(text, NODE1_IP, LB_IP, 80, **on_node))
    # Another port of the LB IP is nothing of ours.
    assert go(text, EXTERNAL_CLIENT, LB_IP, 81).endpoints() == {}

    # Only the external client's /32: pods and the node are dropped; the NodePort is not
    # filtered, for anyone.
    text = lb(load_balancer_source_ranges=(f"{EXTERNAL_CLIENT}/32",))
    served(go(text, EXTERNAL_CLIENT, LB_IP, 80))
    dropped(go(text, CLIENT_POD, LB_IP, 80))
    dropped(go(text, NODE1_IP, LB_IP, 80, **on_node))
    dropped(go(text, "198.18.0.201", LB_IP, 80))
    served(go(text, "198.18.0.201", NODE1_IP, 30001))
    served(go(text, CLIENT_POD, NODE1_IP, 30001))
    # The pods' network, and a range holding the node's own address.
    text = lb(load_balancer_source_ranges=("198.18.128.0/17",))
    served(go(text, CLIENT_POD, LB_IP, 80))
    dropped(go(text, EXTERNAL_CLIENT, LB_IP, 80))
    text = lb(load_balancer_source_ranges=("198.18.0.0/24", "198.18.128.0/17"))
    served(go(text, NODE1_IP, LB_IP, 80, **on_node))
    served(go(text, EXTERNAL_CLIENT, LB_IP, 80))

    # externalTrafficPolicy Local: node1's endpoints, the client's address kept; pods
    # short-circuited to every endpoint; the source ranges still apply to both.
    text = lb(external_traffic_policy=POLICY_LOCAL)
    r = go(text, EXTERNAL_CLIENT, LB_IP, 80)
    served(r, node1)
    assert r.masquerade is False, str(r)
    served(go(text, CLIENT_POD, LB_IP, 80))
    text = lb(external_traffic_policy=POLICY_LOCAL,
              load_balancer_source_ranges=(f"{EXTERNAL_CLIENT}/32",))
    served(go(text, EXTERNAL_CLIENT, LB_IP, 80), node1)
    dropped(go(text, CLIENT_POD, LB_IP, 80))
    # Endpoints on node2 only: outside clients of node1 are dropped, pods are not.
    v = view(backends(2, nodes=("node2",)), [web(**LOAD_BALANCER,
                                                 external_traffic_policy=POLICY_LOCAL)])
    text = render(v)
    dropped(go(text, EXTERNAL_CLIENT, LB_IP, 80))
    served(go(text, CLIENT_POD, LB_IP, 80), {"198.18.130.2:8080": 0.5, "198.18.130.3:8080": 0.5})
    # No endpoint at all: refused, as every frontend of the Service.
    text = render(view([], [web(**LOAD_BALANCER,
                                load_balancer_source_ranges=(f"{EXTERNAL_CLIENT}/32",))]))
    assert go(text, EXTERNAL_CLIENT, LB_IP, 80).verdicts() == {"REJECT"}
