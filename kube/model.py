"""The Kubernetes objects svcbench understands, and the cluster's address plan.

Plain frozen dataclasses: parsing and validation live in manifests.py, the per-node
meaning of these objects lives in state.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

TCP = "TCP"
UDP = "UDP"
SCTP = "SCTP"
PROTOCOLS = (TCP, UDP)  # what the echo backends and the probe open sockets for
# What Services, EndpointSlices and container ports may name; this host has no SCTP sockets
# (CONFIG_IP_SCTP unset), so SCTP ports are programmed but never served or probed.
SERVICE_PROTOCOLS = (TCP, UDP, SCTP)

AFFINITY_NONE = "None"
AFFINITY_CLIENT_IP = "ClientIP"
DEFAULT_AFFINITY_TIMEOUT_S = 10800

POLICY_CLUSTER = "Cluster"
POLICY_LOCAL = "Local"

TYPE_CLUSTER_IP = "ClusterIP"
TYPE_NODE_PORT = "NodePort"
TYPE_LOAD_BALANCER = "LoadBalancer"
TYPE_EXTERNAL_NAME = "ExternalName"
SERVICE_TYPES = (TYPE_CLUSTER_IP, TYPE_NODE_PORT, TYPE_LOAD_BALANCER, TYPE_EXTERNAL_NAME)

# spec.trafficDistribution values that make the endpoint controller hint each endpoint for
# its own zone (PreferSameZone is PreferClose's newer name).
PREFER_CLOSE = "PreferClose"
PREFER_SAME_ZONE = "PreferSameZone"
ZONE_LABEL = "topology.kubernetes.io/zone"

PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
# kube-proxy watches only Services (and EndpointSlices) without this label (v1.IsHeadlessService),
# whatever its value: a labelled Service gets no proxying even with a ClusterIP.
HEADLESS_LABEL = "service.kubernetes.io/headless"
HEADLESS = "None"
DEFAULT_BACKEND_PORT = 8080


@dataclass(frozen=True)
class AddressPlan:
    """Every address the suite uses comes from RFC 2544's 198.18.0.0/15, never routed."""

    node_cidr: str = "198.18.0.0/24"  # node k is .k on the underlay
    external_client_ip: str = "198.18.0.200"
    external_ip_cidr: str = "198.18.64.0/18"  # Service externalIPs, routed to node1 by the external client
    # LoadBalancer ingress IPs written in status.loadBalancer.ingress (no cloud assigns them).
    load_balancer_cidr: str = "198.18.32.0/19"
    cluster_cidr: str = "198.18.128.0/17"  # node k gets 198.18.(128+k).0/24
    service_cidr: str = "198.19.0.0/16"
    dns_ip: str = "198.19.0.10"
    node_port_range: tuple[int, int] = (30000, 32767)
    # The pod's default gateway: a link-local address on the node side of every pod veth.
    pod_gateway: str = "169.254.1.1"
    # What an EndpointSlice may name. `svcbench agent` on a real cluster widens this and the
    # external-IP and load-balancer ranges to every address (the API already validated them).
    endpoint_cidr: str = "198.18.0.0/15"

    @property
    def max_nodes(self) -> int:
        """Node k takes the k-th /24 of the cluster CIDR and .k of the node CIDR below the
        external client; past that it would take a Service's or the client's address."""
        pod_cidrs = 2 ** (24 - ipaddress.ip_network(self.cluster_cidr).prefixlen) - 1  # k >= 1
        underlay = ipaddress.ip_network(self.node_cidr).network_address
        below_client = int(ipaddress.ip_address(self.external_client_ip)) - int(underlay) - 1
        return min(pod_cidrs, below_client)

    def node_ip(self, index: int) -> str:
        return str(ipaddress.ip_network(self.node_cidr)[index])

    def pod_cidr(self, index: int) -> str:
        base = ipaddress.ip_network(self.cluster_cidr).network_address + (index << 8)
        return f"{base}/24"

    def pod_ip(self, node_index: int, pod_index: int) -> str:
        """pod_index counts from 0; .0 and .1 are never handed out."""
        if not 0 <= pod_index < 253:
            raise ValueError(f"node{node_index} holds at most 253 pods")
        return str(ipaddress.ip_network(self.pod_cidr(node_index))[pod_index + 2])

    def in_service_cidr(self, ip: str) -> bool:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(self.service_cidr)

    def in_external_ip_cidr(self, ip: str) -> bool:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(self.external_ip_cidr)


PLAN = AddressPlan()


@dataclass(frozen=True)
class Node:
    name: str  # the Kubernetes node name, "node1"
    index: int  # 1-based; fixes the node's addresses in the plan
    ip: str
    pod_cidr: str
    zone: str = ""  # its topology.kubernetes.io/zone label; "" when it has none

    @classmethod
    def numbered(cls, index: int, plan: AddressPlan = PLAN) -> Node:
        """Node k in the plan, alone in its own zone "zone<k>" until a Node manifest says else."""
        if not 1 <= index <= plan.max_nodes:
            raise ValueError(f"node{index} does not fit the address plan ({plan.max_nodes} nodes)")
        return cls(f"node{index}", index, plan.node_ip(index), plan.pod_cidr(index), f"zone{index}")


@dataclass(frozen=True)
class NodeLabels:
    """What a v1 Node manifest tells about a node the cluster made: its labels."""

    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> tuple[str, str]:
        return ("", self.name)  # cluster-scoped: no namespace

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: str = TCP
    name: str | None = None


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    node_name: str | None = None
    ports: tuple[ContainerPort, ...] = ()
    ready: bool = True
    terminating: bool = False
    ip: str | None = None  # assigned by the cluster state, not read from manifests

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def backend_ports(self) -> tuple[ContainerPort, ...]:
        """The ports its echo backend listens on: the declared TCP and UDP ones (this host has
        no SCTP sockets), or TCP+UDP 8080 when it declares none."""
        if self.ports:
            return tuple(p for p in self.ports if p.protocol in PROTOCOLS)
        return (
            ContainerPort(DEFAULT_BACKEND_PORT, TCP),
            ContainerPort(DEFAULT_BACKEND_PORT, UDP),
        )


@dataclass(frozen=True)
class ServicePort:
    port: int
    protocol: str = TCP
    name: str = ""
    target_port: int | str | None = None  # None means "same as port"
    node_port: int | None = None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    type: str = TYPE_CLUSTER_IP
    cluster_ip: str | None = None  # None: allocate; "None": headless
    selector: dict[str, str] | None = field(default=None, hash=False)
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    external_ips: tuple[str, ...] = ()
    session_affinity: str = AFFINITY_NONE
    affinity_timeout_s: int = DEFAULT_AFFINITY_TIMEOUT_S
    external_traffic_policy: str = POLICY_CLUSTER
    internal_traffic_policy: str = POLICY_CLUSTER
    # LoadBalancer: status.loadBalancer.ingress[].ip, spec.loadBalancerSourceRanges (networks),
    # spec.healthCheckNodePort (allocated under externalTrafficPolicy Local),
    # spec.allocateLoadBalancerNodePorts.
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    health_check_node_port: int | None = None
    allocate_load_balancer_node_ports: bool = True
    publish_not_ready_addresses: bool = False
    traffic_distribution: str | None = None  # PREFER_CLOSE, PREFER_SAME_ZONE or None
    external_name: str | None = None  # type ExternalName: the DNS name it aliases

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def headless(self) -> bool:
        return self.cluster_ip == HEADLESS

    @property
    def has_node_ports(self) -> bool:
        """NodePort and LoadBalancer Services get NodePorts (unless a LoadBalancer opts out)."""
        return self.type == TYPE_NODE_PORT or (
            self.type == TYPE_LOAD_BALANCER and self.allocate_load_balancer_node_ports
        )

    @property
    def needs_health_check_node_port(self) -> bool:
        """Kubernetes allocates one to a LoadBalancer whose externalTrafficPolicy is Local."""
        return self.type == TYPE_LOAD_BALANCER and self.external_traffic_policy == POLICY_LOCAL

    @property
    def proxy_name(self) -> str | None:
        return self.labels.get(PROXY_NAME_LABEL)

    @property
    def labelled_headless(self) -> bool:
        """Carries the service.kubernetes.io/headless label, which kube-proxy's informers
        filter out (its value does not matter)."""
        return HEADLESS_LABEL in self.labels


@dataclass(frozen=True)
class EndpointPort:
    port: int
    protocol: str = TCP
    name: str = ""


@dataclass(frozen=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    pod_name: str | None = None  # targetRef, when the endpoint is a pod
    zone: str | None = None
    zone_hints: tuple[str, ...] = ()  # hints.forZones[].name; empty: no hint


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str  # the kubernetes.io/service-name label
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)
