"""The small clusters the data planes' rendering tests trace packets through."""

from __future__ import annotations

from kube.model import UDP, ContainerPort, Node, Pod, Service, ServicePort
from kube.state import ClusterState

NODE1_IP = "198.18.0.1"
EXTERNAL_CLIENT = "198.18.0.200"
CLIENT_POD = "198.18.129.200"  # a pod on node1 that backs no Service
NODES = (Node.numbered(1), Node.numbered(2))


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
