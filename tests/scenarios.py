"""The small clusters the data planes' rendering tests trace packets through."""

from __future__ import annotations

import pytest

from kube.model import (
    POLICY_LOCAL,
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
