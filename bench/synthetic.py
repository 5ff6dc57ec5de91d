"""Synthetic Services at scale over a shared pool of backend pods.

N Services need N ClusterIPs but not N pods: each Service gets `endpoints` pods of the
pool, rotated, through an explicit EndpointSlice (no selector to evaluate N times).
"""

from __future__ import annotations

from kube.model import (
    AFFINITY_CLIENT_IP,
    TCP,
    TYPE_CLUSTER_IP,
    TYPE_NODE_PORT,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Pod,
    Service,
    ServicePort,
)

NAMESPACE = "bench"
SERVICE_PORT = 80


def pool_pods(nodes: list[str], per_node: int) -> list[Pod]:
    """Backend pods, spread over the nodes; they answer on TCP and UDP 8080."""
    return [
        Pod(NAMESPACE, f"backend-{node}-{i}", {"app": "backend"}, node_name=node)
        for node in nodes
        for i in range(per_node)
    ]


def synthetic_services(
    n: int,
    pool: list[Pod],
    endpoints: int = 3,
    nodeport_every: int = 0,
    affinity_every: int = 0,
    target_port: int = 8080,
) -> tuple[list[Service], list[EndpointSlice]]:
    """Services svc-00000 ... with `endpoints` pool pods each (pods must carry IPs)."""
    if endpoints > len(pool):
        raise ValueError(f"endpoints={endpoints} needs at least that many pool pods, have {len(pool)}")
    services, slices = [], []
    width = max(5, len(str(n)))
    for i in range(n):
        name = f"svc-{i:0{width}d}"
        nodeport = bool(nodeport_every) and i % nodeport_every == nodeport_every - 1
        affinity = bool(affinity_every) and i % affinity_every == affinity_every - 1
        services.append(
            Service(
                NAMESPACE,
                name,
                (ServicePort(SERVICE_PORT, TCP, "http", target_port),),
                type=TYPE_NODE_PORT if nodeport else TYPE_CLUSTER_IP,
                session_affinity=AFFINITY_CLIENT_IP if affinity else "None",
            )
        )
        chosen = [pool[(i + k) % len(pool)] for k in range(endpoints)]
        slices.append(
            EndpointSlice(
                NAMESPACE,
                f"{name}-1",
                name,
                tuple(
                    Endpoint((p.ip,), node_name=p.node_name, pod_name=p.name) for p in chosen
                ),
                (EndpointPort(target_port, TCP, "http"),),
            )
        )
    return services, slices
