"""Random sequences of object changes, as users apply them: pods placed and moved, Services of
every type and policy created, changed and deleted, EndpointSlices given by hand. Shared by
the tracker's test (views against whole builds) and the modes' incremental tests (kernel
state after `update`s against a full sync's)."""

from __future__ import annotations

import random

from kube.model import (
    HEADLESS,
    POLICY_LOCAL,
    PREFER_CLOSE,
    PROXY_NAME_LABEL,
    TCP,
    UDP,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState
from kube.tracker import ChangeTracker, view_key

NODES = [Node.numbered(k) for k in (1, 2, 3)]
NS = "ns1"


def random_pod(rng: random.Random, name: str, nodes: list[Node] = NODES) -> Pod:
    return Pod(NS, name, {"app": rng.choice("abc"), "tier": rng.choice("xy")},
               node_name=rng.choice([None, None, *(n.name for n in nodes)]),
               ports=(ContainerPort(8080, TCP, "http"), ContainerPort(8080, UDP, "dns"),
                      ContainerPort(rng.choice([9090, 9091]), TCP, "alt")),
               ready=rng.random() > 0.2, terminating=rng.random() < 0.15)


def random_service(rng: random.Random, name: str) -> Service:
    kind = rng.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName"])
    ports = [ServicePort(80, TCP, "http", "http")]
    if rng.random() < 0.5:
        ports.append(ServicePort(53, UDP, "dns", "dns"))
    if rng.random() < 0.3:
        ports.append(ServicePort(81, TCP, "alt", "alt"))
    fields: dict = {"type": kind}
    selector = rng.choice([{"app": "a"}, {"app": "b", "tier": "x"}, {"tier": "y"}, None])
    fields["selector"] = selector
    if kind == "ExternalName":
        fields["external_name"] = "example.org"
    if kind == "LoadBalancer":
        fields["load_balancer_ips"] = (f"198.18.32.{rng.randint(1, 50)}",)
        if rng.random() < 0.4:
            fields["load_balancer_source_ranges"] = rng.choice(
                [("198.18.64.0/24",), ("198.18.64.0/25", "198.18.70.0/24"), ("198.18.0.0/15",)])
    if rng.random() < 0.3:
        fields["internal_traffic_policy"] = POLICY_LOCAL
    if kind in ("NodePort", "LoadBalancer") and rng.random() < 0.4:
        fields["external_traffic_policy"] = POLICY_LOCAL
    if rng.random() < 0.2:
        fields["session_affinity"] = "ClientIP"
        fields["affinity_timeout_s"] = 30
    if rng.random() < 0.2:
        fields["traffic_distribution"] = PREFER_CLOSE
    if rng.random() < 0.1:
        fields["labels"] = {PROXY_NAME_LABEL: "other"}
    if kind == "ClusterIP" and rng.random() < 0.1:
        fields["cluster_ip"] = HEADLESS
    elif kind != "ExternalName" and rng.random() < 0.1:
        fields["cluster_ip"] = f"198.19.0.{rng.randint(1, 30)}"  # may collide: refused
    if rng.random() < 0.1 and kind == "NodePort":
        ports[0] = ServicePort(80, TCP, "http", "http", node_port=30000 + rng.randint(0, 20))
    return Service(NS, name, tuple(ports), **fields)


def random_slice(rng: random.Random, service: str, index: int, pods: dict) -> EndpointSlice:
    placed = [p for p in pods.values() if p.ip]
    chosen = rng.sample(placed, k=min(len(placed), rng.randint(0, 4)))
    eps = tuple(Endpoint((p.ip,), ready=rng.random() > 0.2, serving=rng.random() > 0.1,
                         terminating=rng.random() < 0.2, node_name=p.node_name,
                         pod_name=p.name) for p in chosen)
    ports = (EndpointPort(8080, TCP, "http"), EndpointPort(5353, UDP, "dns"))
    return EndpointSlice(NS, f"{service}-{index}", service, eps, ports)


class Oracle:
    """The desired objects as a user applied them, built whole each time."""

    def __init__(self, nodes: list[Node] = NODES) -> None:
        self.nodes = nodes
        self.pods: dict = {}
        self.services: dict = {}
        self.slices: dict = {}
        self.built = ClusterState.build(nodes)

    def build(self, pods, services, slices) -> ClusterState:
        return ClusterState.build(self.nodes, list(pods.values()), list(services.values()),
                                  list(slices.values()), previous=self.built)


def views_by_key(state: ClusterState) -> dict[str, dict]:
    return {n.name: {view_key(v): v for v in state.node_view(n.name).services}
            for n in state.nodes}


def random_step(rng: random.Random, oracle: Oracle, tracker: ChangeTracker, counter: list[int]):
    """One random change: (kwargs for tracker.apply, the oracle's new object dicts)."""
    pods, services, slices = dict(oracle.pods), dict(oracle.services), dict(oracle.slices)
    kwargs: dict = {}
    for _ in range(rng.randint(1, 3)):
        what = rng.random()
        counter[0] += 1
        n = counter[0]
        if what < 0.25:
            name = rng.choice([*(k[1] for k in pods), f"p{n}"]) if pods else f"p{n}"
            pod = random_pod(rng, name, oracle.nodes)
            if (NS, name) in pods and rng.random() < 0.5:
                pod = Pod(NS, name, pod.labels, None, pod.ports, pod.ready, pod.terminating)
            pods[(NS, name)] = pod
            kwargs.setdefault("pods", []).append(pod)
        elif what < 0.35 and pods:
            key = rng.choice(list(pods))
            del pods[key]
            kwargs.setdefault("delete_pods", []).append(key)
        elif what < 0.65:
            name = rng.choice([*(k[1] for k in services), f"s{n}"]) if services else f"s{n}"
            svc = random_service(rng, name)
            services[(NS, name)] = svc
            kwargs.setdefault("services", []).append(svc)
        elif what < 0.75 and services:
            key = rng.choice(list(services))
            del services[key]
            kwargs.setdefault("delete_services", []).append(key)
        elif what < 0.92:
            owner = rng.choice([*(k[1] for k in services), "not-yet"])
            sl = random_slice(rng, owner, rng.randint(1, 2), tracker.pods)
            slices[sl.key] = sl
            kwargs.setdefault("slices", []).append(sl)
        elif slices:
            key = rng.choice(list(slices))
            del slices[key]
            kwargs.setdefault("delete_slices", []).append(key)
    # One change says what ends up: an object created and deleted in it is only deleted, one
    # deleted and created again is only created (the tracker deletes first, then creates).
    for field_name, gone, final in (("pods", "delete_pods", pods),
                                    ("services", "delete_services", services),
                                    ("slices", "delete_slices", slices)):
        last = {obj.key: obj for obj in kwargs.get(field_name, ())}
        # In the order build sees them: the order of the whole list.
        kwargs[field_name] = [last[key] for key in final if key in last]
        kwargs[gone] = sorted({key for key in kwargs.get(gone, ()) if key not in final})
    return kwargs, pods, services, slices
