"""Synthetic Services at scale over a shared pool of backend pods.

N Services need N ClusterIPs but not N pods: each Service gets `endpoints` pods of the
pool, rotated, through an explicit EndpointSlice (no selector to evaluate N times), so
30,000 Services run on tens of pods. Given `nodeport_every`/`affinity_every` (the sweep
passes NODEPORT_EVERY/AFFINITY_EVERY; 0 means none), every so many Services is a NodePort
or has ClientIP affinity; the first and the last Service stay plain ClusterIPs, so probes
to them compare like with like at every size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kube.model import (
    AFFINITY_CLIENT_IP,
    AFFINITY_NONE,
    PLAN,
    TCP,
    TYPE_CLUSTER_IP,
    TYPE_NODE_PORT,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState, NodeView
from kube.tracker import ChangeTracker

NAMESPACE = "bench"
SERVICE_PORT = 80
BACKEND_PORT = 8080
# 30,000 Services / 20 = 1,500 NodePorts, inside the 2,768 of 30000-32767.
NODEPORT_EVERY = 20
AFFINITY_EVERY = 100
# NodePorts are a scarce range (30000-32767): at 50,000 Services one in 20 gets one.
MAX_NODE_PORTS = 2500
# The plan's /16 Service CIDR holds 65,534 ClusterIPs: larger views repeat the first
# DISTINCT Services on further ports (each is still its own frontend and map element).
DISTINCT = 50000
SYNC_POOL_PER_NODE = 50


def pool_pods(nodes: list[str], per_node: int) -> list[Pod]:
    """Backend pods, spread over the nodes; they answer on TCP and UDP 8080."""
    return [
        Pod(NAMESPACE, f"backend-{node}-{i}", {"app": "backend"}, node_name=node)
        for node in nodes
        for i in range(per_node)
    ]


def service_name(i: int, n: int) -> str:
    return f"svc-{i:0{max(5, len(str(n)))}d}"


def pool_endpoints(pool: list[Pod], i: int, endpoints: int) -> list[Pod]:
    """The pool pods backing Service i: `endpoints` consecutive pods starting at i."""
    return [pool[(i + k) % len(pool)] for k in range(endpoints)]


def endpoint_slice(name: str, pods: list[Pod], target_port: int = BACKEND_PORT,
                   port_names: tuple[str, ...] = ("http",)) -> EndpointSlice:
    """Service `name`'s one EndpointSlice: `pods`, on `target_port` for each named port."""
    return EndpointSlice(
        NAMESPACE,
        f"{name}-1",
        name,
        tuple(Endpoint((p.ip,), node_name=p.node_name, pod_name=p.name) for p in pods),
        tuple(EndpointPort(target_port, TCP, port) for port in port_names),
    )


def synthetic_services(
    n: int,
    pool: list[Pod],
    endpoints: int = 3,
    nodeport_every: int = 0,
    affinity_every: int = 0,
    target_port: int = BACKEND_PORT,
) -> tuple[list[Service], list[EndpointSlice]]:
    """Services svc-00000 ... with `endpoints` pool pods each (pods must carry IPs).

    Service i's name, type and endpoints depend on i alone, so the first n Services of a
    larger sweep are the n Services of a smaller one: a sweep grows by adding Services.
    """
    if endpoints > len(pool):
        raise ValueError(f"endpoints={endpoints} needs at least that many pool pods, have {len(pool)}")
    services, slices = [], []
    for i in range(n):
        name = service_name(i, n)
        plain = i == 0 or i == n - 1
        nodeport = not plain and bool(nodeport_every) and i % nodeport_every == nodeport_every // 2
        affinity = not plain and bool(affinity_every) and i % affinity_every == affinity_every // 2 + 1
        services.append(
            Service(
                NAMESPACE,
                name,
                (ServicePort(SERVICE_PORT, TCP, "http", target_port),),
                type=TYPE_NODE_PORT if nodeport else TYPE_CLUSTER_IP,
                session_affinity=AFFINITY_CLIENT_IP if affinity else AFFINITY_NONE,
            )
        )
        slices.append(endpoint_slice(name, pool_endpoints(pool, i, endpoints), target_port))
    return services, slices


def with_endpoints(state: ClusterState, service: str, pods: list[Pod]) -> ClusterState:
    """`state` with Service `service`'s EndpointSlice holding exactly `pods`.

    Nothing is reallocated: an endpoint change at 30,000 Services costs one tuple copy.
    """
    slices = list(state.endpoint_slices)
    for k, sl in enumerate(slices):
        if sl.namespace == NAMESPACE and sl.service_name == service:
            port = sl.ports[0].port if sl.ports else BACKEND_PORT
            slices[k] = endpoint_slice(service, pods, port)
            return replace(state, endpoint_slices=tuple(slices))
    raise KeyError(f"no EndpointSlice for Service {NAMESPACE}/{service}")


def sync_view(n: int, endpoints: int = 3) -> NodeView:
    """node1's view of n Service ports over a pool of 2 x 50 pods, with the sweep's mix of
    NodePorts and affinity, for sync benchmarks (no traffic, so no cluster needs them).

    Above DISTINCT the ClusterIPs repeat on ports 81, 82, ... so 100,000 fit the plan.
    """
    nodes = [Node.numbered(1), Node.numbered(2)]
    pool = pool_pods(["node1", "node2"], SYNC_POOL_PER_NODE)
    pods = list(ClusterState.build(nodes, pool).pods)
    lo, hi = PLAN.node_port_range
    distinct = min(n, DISTINCT)
    every = max(NODEPORT_EVERY, -(-distinct // min(MAX_NODE_PORTS, hi - lo)))
    services, slices = synthetic_services(distinct, pods, endpoints, nodeport_every=every,
                                          affinity_every=AFFINITY_EVERY)
    view = ClusterState.build(nodes, pods, services, slices).node_view("node1")
    if n == distinct:
        return view
    extra = [
        replace(sp, port=sp.port + 1 + i // distinct, port_name=f"p{1 + i // distinct}",
                node_port=None)
        for i, sp in ((i, view.services[i % distinct]) for i in range(n - distinct))
    ]
    return replace(view, services=view.services + tuple(extra))


def one_endpoint_fewer(view: NodeView, index: int) -> NodeView:
    """The view with Service `index` losing its last endpoint (the smallest real change)."""
    sp = view.services[index]
    changed = replace(sp, endpoints=sp.endpoints[:-1])  # the view derives the rest
    services = list(view.services)
    services[index] = changed
    return replace(view, services=tuple(services))


# --------------------------------------------------------------------------- as objects


@dataclass
class SyncObjects:
    """`sync_view(n)`'s Services as the objects a ChangeTracker takes: n Service ports over
    a pool of 2 x 50 pods. Above DISTINCT Services each Service has several ports (80, 81,
    ...), so 100,000 Service ports are 50,000 Services of two ports; their NodePort
    Services are spaced so that every port's NodePort fits the range."""

    nodes: list[Node]
    pool: list[Pod]  # with the IPs the tracker gave them
    services: list[Service]
    slices: list[EndpointSlice]

    def tracker(self) -> ChangeTracker:
        """A ChangeTracker holding them all (O(N): seconds at 100,000 ports)."""
        tracker = ChangeTracker(self.nodes)
        tracker.apply(pods=self.pool)
        tracker.apply(services=self.services, slices=self.slices)
        return tracker

    def one_endpoint_fewer(self, index: int) -> EndpointSlice:
        """Service `index`'s slice without its last endpoint (the smallest real change)."""
        sl = self.slices[index]
        return replace(sl, endpoints=sl.endpoints[:-1])


def sync_objects(n: int, endpoints: int = 3) -> SyncObjects:
    """The objects behind `sync_view(n)` (see SyncObjects), for benchmarks that go through
    a ChangeTracker and dataplanes/proxy.py's ServiceProxy."""
    nodes = [Node.numbered(1), Node.numbered(2)]
    pods = list(ClusterState.build(nodes, pool_pods(["node1", "node2"], SYNC_POOL_PER_NODE)).pods)
    distinct = min(n, DISTINCT)
    ports = -(-n // distinct)
    lo, hi = PLAN.node_port_range
    every = max(NODEPORT_EVERY, -(-distinct * ports // min(MAX_NODE_PORTS, hi - lo)))
    services, slices = synthetic_services(distinct, pods, endpoints, nodeport_every=every,
                                          affinity_every=AFFINITY_EVERY)
    if ports > 1:
        out_svcs, out_slices = [], []
        for i, (svc, sl) in enumerate(zip(services, slices, strict=True)):
            count = 1 + sum(1 for k in range(1, ports) if (k - 1) * distinct + i < n - distinct)
            extra = tuple(replace(svc.ports[0], port=SERVICE_PORT + k, name=f"p{k}")
                          for k in range(1, count))
            out_svcs.append(replace(svc, ports=svc.ports + extra))
            names = tuple(p.name for p in out_svcs[-1].ports)
            out_slices.append(replace(sl, ports=tuple(
                EndpointPort(sl.ports[0].port, TCP, name) for name in names)))
        services, slices = out_svcs, out_slices
    return SyncObjects(nodes, pods, services, slices)
