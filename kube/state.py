"""What each node's proxy must do, computed once for every mode.

`ClusterState.build` is the endpoint controller and the allocator: it places pods on
nodes, gives them IPs, gives Services ClusterIPs and NodePorts, and turns selectors into
endpoints. `ClusterState.node_view` is kube-proxy's change tracker: it flattens a
Service into one `ServicePortView` per (Service, port) with the endpoint sets each kind
of traffic may use. Data planes only render a `NodeView`; they never look at Services.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from kube.model import (
    AFFINITY_CLIENT_IP,
    PLAN,
    POLICY_LOCAL,
    PREFER_CLOSE,
    PREFER_SAME_ZONE,
    TYPE_EXTERNAL_NAME,
    TYPE_LOAD_BALANCER,
    TYPE_NODE_PORT,
    AddressPlan,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    NodeLabels,
    Pod,
    Service,
    ServicePort,
)


class StateError(ValueError):
    """A manifest is valid on its own but not with the rest of the cluster."""


# --------------------------------------------------------------------------- views


@dataclass(frozen=True)
class EndpointView:
    ip: str
    port: int
    node: str | None
    local: bool  # on the node this view is for
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    pod: str | None = None  # "namespace/name" when the endpoint is a pod
    zone: str | None = None
    zone_hints: tuple[str, ...] = ()  # the zones it is hinted for; empty: no hint

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"


# What traffic with no usable endpoint gets (kube-proxy's internal/externalTrafficFilterTarget).
REJECT = "reject"  # the Service has no endpoint anywhere: refused at once
DROP = "drop"  # it has endpoints, none this traffic may use here: dropped, the client times out


@dataclass(frozen=True)
class ServicePortView:
    """One (Service, port) as one node's proxy must serve it.

    kube-proxy's ServicePortName and ServicePort info, with the answers of its
    `CategorizeEndpoints` (pkg/proxy/topology.go) and of each proxier's reject-or-drop
    choice, computed once here: a mode renders these fields and never decides which
    endpoints serve which traffic, nor whether to drop or reject.

    Given (by `ClusterState.node_view`):

    - `endpoints`: every endpoint of the port, usable or not. Per-endpoint facts (`ready`,
      `serving`, `terminating`, `local`) stay readable for what only a mode knows, such as
      SNAT to remote endpoints only.
    - `internal_policy_local`: internalTrafficPolicy is Local (InternalPolicyLocal).
    - `external_policy_local`: externalTrafficPolicy is Local and the port is reachable
      from outside, by a NodePort, an externalIP or a load-balancer IP (ExternalPolicyLocal).
    - `node_zone`: this node's topology.kubernetes.io/zone ("" without one), for the
      topology rule below.
    - `load_balancer_ips` (LoadBalancerVIPs): status.loadBalancer.ingress[].ip; traffic to
      them is external traffic, as to an externalIP.
    - `load_balancer_source_ranges`: the networks allowed to reach `load_balancer_ips`
      (kube-proxy's KUBE-FW chain / firewall-ips map); empty allows every source.
    - `health_check_node_port`: the port on which kube-proxy's health server answers, for
      this Service, whether this node has a local endpoint (HTTP 200 or 503); None for none.
    - `health_check_local_endpoints`: what that server reports as localEndpoints
      (EndpointsMap.LocalReadyEndpoints): the distinct addresses of this node's ready
      endpoints over every port of the Service; serving+terminating ones do not count, so a
      node left with only those fails the check (503). 0 without a health-check NodePort.

    SCTP ports come as `protocol` "SCTP". Endpoints of not-ready pods of a Service with
    publishNotReadyAddresses arrive here already ready, as the endpoint controller makes them.

    Derived from those when the view is made (so `dataclasses.replace` keeps them true):

    - `cluster_endpoints` (clusterEndpoints): the ready endpoints anywhere, or the
      serving+terminating ones when none is ready (KEP-1669). Topology (topology.go): when
      every ready endpoint has zone hints and one is hinted for `node_zone`, only the ready
      endpoints hinted for it. Empty when the port never
      uses Cluster policy, i.e. its internal policy is Local and it is not reachable from
      outside; a port reachable from outside always needs them, for the short circuit below.
    - `local_endpoints` (localEndpoints): the same choice among this node's endpoints.
      Empty when neither policy is Local.
    - `all_reachable_endpoints` (allReachableEndpoints): both, each endpoint once.
    - `has_any_endpoints` (hasAnyEndpoints): some ready or serving+terminating endpoint
      exists somewhere in the cluster, reachable from here or not.
    - `internal_endpoints`: where ClusterIP traffic goes (the internal policy chain):
      `local_endpoints` under internal policy Local, else `cluster_endpoints`.
    - `external_endpoints`: where NodePort and externalIP traffic from outside goes (the
      external policy chain): `local_endpoints` under external policy Local, else
      `cluster_endpoints`; empty when the port has neither. Pods (the cluster CIDR) and the
      node itself reaching a NodePort or externalIP always go to `cluster_endpoints`:
      kube-proxy's short circuit.
    - `internal_traffic_filter` (internalTrafficFilterTarget): None while
      `internal_endpoints` has any; else REJECT when the Service has no endpoint at all,
      DROP when it has some elsewhere.
    - `external_traffic_filter` (externalTrafficFilterTarget): the same for traffic from
      outside to the NodePort and externalIPs (None when the port has neither). DROP
      concerns only outside clients: pods and the node are still short-circuited to
      `cluster_endpoints`, which is never empty then.
    """

    namespace: str
    service: str
    port_name: str
    protocol: str  # "TCP" | "UDP" | "SCTP"
    cluster_ip: str
    port: int
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    affinity_timeout_s: int | None = None  # None: no ClientIP affinity
    external_policy_local: bool = False
    internal_policy_local: bool = False
    endpoints: tuple[EndpointView, ...] = ()  # every known endpoint, usable or not
    node_zone: str = ""
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    health_check_node_port: int | None = None
    health_check_local_endpoints: int = 0
    # Derived in __post_init__ from the fields above; compare=False since they follow them.
    cluster_endpoints: tuple[EndpointView, ...] = field(init=False, compare=False, repr=False)
    local_endpoints: tuple[EndpointView, ...] = field(init=False, compare=False, repr=False)
    all_reachable_endpoints: tuple[EndpointView, ...] = field(
        init=False, compare=False, repr=False
    )
    has_any_endpoints: bool = field(init=False, compare=False, repr=False)
    internal_endpoints: tuple[EndpointView, ...] = field(init=False, compare=False, repr=False)
    external_endpoints: tuple[EndpointView, ...] = field(init=False, compare=False, repr=False)
    internal_traffic_filter: str | None = field(init=False, compare=False, repr=False)
    external_traffic_filter: str | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        external = self.has_external
        external_local = self.external_policy_local and external
        uses_cluster = not self.internal_policy_local or external
        uses_local = self.internal_policy_local or external_local
        cluster = _usable_in_zone(self.endpoints, self.node_zone) if uses_cluster else ()
        local = _usable([e for e in self.endpoints if e.local]) if uses_local else ()
        if not local or local == cluster:
            reachable = cluster or local
        else:
            # Local may hold serving+terminating endpoints that cluster, with ready ones, has not.
            seen = {(e.ip, e.port) for e in cluster}
            reachable = cluster + tuple(e for e in local if (e.ip, e.port) not in seen)
        has_any = bool(cluster) or any(e.ready or (e.serving and e.terminating)
                                       for e in self.endpoints)
        internal = local if self.internal_policy_local else cluster
        outside = local if external_local else cluster
        none = DROP if has_any else REJECT
        # Written once, here, past the frozen __setattr__.
        self.__dict__.update(
            cluster_endpoints=cluster,
            local_endpoints=local,
            all_reachable_endpoints=reachable,
            has_any_endpoints=has_any,
            internal_endpoints=internal,
            external_endpoints=outside if external else (),
            internal_traffic_filter=None if internal else none,
            external_traffic_filter=None if outside or not external else none,
        )

    @property
    def name(self) -> str:
        """kube-proxy's ServicePortName string: "ns/svc:port" (":port" dropped when unnamed)."""
        base = f"{self.namespace}/{self.service}"
        return f"{base}:{self.port_name}" if self.port_name else base

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.cluster_ip, self.protocol, str(self.port))

    @property
    def session_affinity(self) -> bool:
        return self.affinity_timeout_s is not None

    @property
    def has_external(self) -> bool:
        """Reachable from outside: a NodePort, an externalIP or a load-balancer IP (kube-proxy's
        ExternallyAccessible)."""
        return self.node_port is not None or bool(self.external_ips or self.load_balancer_ips)


@dataclass(frozen=True)
class NodeView:
    node: str
    node_ip: str
    pod_cidr: str
    cluster_cidr: str
    service_cidr: str
    node_ips: tuple[str, ...]  # addresses NodePorts answer on
    services: tuple[ServicePortView, ...]  # sorted by name, then protocol, then port
    # The cluster's NodePort range (the apiserver's --service-node-port-range), first and
    # last port: a mode that must route the range itself (ebpf's host path) reads it here.
    node_port_range: tuple[int, int] = PLAN.node_port_range

    def service(self, name: str, protocol: str | None = None) -> ServicePortView:
        """Look a port up by its ServicePortName ("ns/svc:port" or "ns/svc")."""
        for sp in self.services:
            if sp.name == name and (protocol is None or sp.protocol == protocol):
                return sp
        raise KeyError(name)


# --------------------------------------------------------------------------- state


def _labelled(nodes: tuple[Node, ...], labels, plan: AddressPlan) -> tuple[Node, ...]:
    """The nodes with the zones their Node manifests give (no zone label: no zone)."""
    by_name = {n.name: n for n in nodes}
    for given in labels:
        if given.name not in by_name:
            names = list(by_name)
            listed = ", ".join(names) if len(names) <= 4 else f"{names[0]} to {names[-1]}"
            raise StateError(
                f"Node {given.name}: metadata.name is not a node of this cluster (nodes: "
                f"{listed or 'none'}; the address plan fits at most {plan.max_nodes})"
            )
        by_name[given.name] = replace(by_name[given.name], zone=given.zone)
    return tuple(by_name.values())


def _usable(endpoints: list[EndpointView]) -> tuple[EndpointView, ...]:
    """Ready endpoints; when none is ready, serving ones that are terminating (KEP-1669)."""
    ready = [e for e in endpoints if e.ready]
    if ready:
        return tuple(ready)
    return tuple(e for e in endpoints if e.serving and e.terminating)


def _usable_in_zone(endpoints, zone: str) -> tuple[EndpointView, ...]:
    """kube-proxy's topology rule: when every ready endpoint has zone hints and one is hinted
    for this node's zone, the ready endpoints hinted for it; otherwise `_usable`."""
    ready = [e for e in endpoints if e.ready]
    if zone and ready and all(e.zone_hints for e in ready):
        hinted = tuple(e for e in ready if zone in e.zone_hints)
        if hinted:
            return hinted
    return _usable(endpoints)


DNS_OWNER = "the cluster DNS Service"


class Allocator:
    """ClusterIPs and NodePorts (health-check NodePorts from the same range) of a cluster.

    `ClusterState.build` uses one for every Service at once; `kube.tracker` keeps one and
    allocates per change. Each allocation is the lowest free value, as the apiserver's
    bitmap allocators in order would give; a Service's values are released with it.
    """

    def __init__(self, plan: AddressPlan = PLAN) -> None:
        self.plan = plan
        net = ipaddress.ip_network(plan.service_cidr)
        self.first_ip, self.last_ip = int(net.network_address) + 1, int(net.broadcast_address)
        self.ips: dict[str, str] = {plan.dns_ip: DNS_OWNER}
        self.ports: dict[int, str] = {}
        self.owned: dict[str, tuple[set[str], set[int]]] = {}
        self._ip_cursor = self.first_ip  # every address below it is taken, but the freed ones
        self._port_cursor = plan.node_port_range[0]
        self._freed_ips: list[int] = []  # heaps of freed values below the cursors
        self._freed_ports: list[int] = []

    @staticmethod
    def ident(svc: Service) -> str:
        return f"Service {svc.namespace}/{svc.name}"

    # ------------------------------------------------------------------ taking

    def _take_ip(self, svc: Service, ip: str) -> None:
        owner = self.ips.get(ip)
        me = self.ident(svc)
        dns = owner == DNS_OWNER and svc.namespace == "kube-system"
        if owner and owner != me and not dns:
            raise StateError(f"{me}: spec.clusterIP {ip} is already used by {owner}")
        self.ips[ip] = me
        self.owned.setdefault(me, (set(), set()))[0].add(ip)

    def _take_port(self, svc: Service, index: int | None, port: int) -> None:
        """index None: the Service's healthCheckNodePort, from the same range."""
        owner = self.ports.get(port)
        me = self.ident(svc)
        if owner and owner != me:
            at = f"spec.ports[{index}].nodePort" if index is not None else (
                "spec.healthCheckNodePort")
            raise StateError(f"{me}: {at} {port} is already used by {owner}")
        self.ports[port] = me
        self.owned.setdefault(me, (set(), set()))[1].add(port)

    def _free_ip(self, svc: Service) -> str:
        while self._freed_ips:
            candidate = str(ipaddress.ip_address(heapq.heappop(self._freed_ips)))
            if candidate not in self.ips:
                return candidate
        while str(ipaddress.ip_address(self._ip_cursor)) in self.ips:
            self._ip_cursor += 1
        if self._ip_cursor >= self.last_ip:
            raise StateError(f"{self.ident(svc)}: the Service CIDR {self.plan.service_cidr} has "
                             "no free ClusterIP left")
        self._ip_cursor += 1
        return str(ipaddress.ip_address(self._ip_cursor - 1))

    def _free_port(self, svc: Service) -> int:
        lo, hi = self.plan.node_port_range
        while self._freed_ports:
            candidate = heapq.heappop(self._freed_ports)
            if candidate not in self.ports:
                return candidate
        while self._port_cursor in self.ports:
            self._port_cursor += 1
        if self._port_cursor > hi:
            raise StateError(f"{self.ident(svc)}: no free NodePort left in {lo}-{hi}")
        self._port_cursor += 1
        return self._port_cursor - 1

    # ------------------------------------------------------------------ the three steps

    def keep(self, svc: Service, prev: Service | None) -> Service:
        """`svc` with the values `prev` (its earlier version) was allocated, held."""
        if prev is None:
            return svc
        # A Service that becomes ExternalName releases its ClusterIP (DNS only).
        if svc.cluster_ip is None and prev.cluster_ip and not prev.headless and (
            svc.type != TYPE_EXTERNAL_NAME
        ):
            svc = replace(svc, cluster_ip=prev.cluster_ip)
            self._take_ip(svc, svc.cluster_ip)
        if svc.has_node_ports:
            prev_np = {(p.port, p.protocol): p.node_port for p in prev.ports}
            ports = []
            for i, p in enumerate(svc.ports):
                if p.node_port is None and prev_np.get((p.port, p.protocol)):
                    p = replace(p, node_port=prev_np[p.port, p.protocol])
                    self._take_port(svc, i, p.node_port)
                ports.append(p)
            svc = replace(svc, ports=tuple(ports))
        check = prev.health_check_node_port
        if svc.needs_health_check_node_port and svc.health_check_node_port is None and check:
            svc = replace(svc, health_check_node_port=check)
            self._take_port(svc, None, check)
        return svc

    def take_explicit(self, svc: Service) -> None:
        """Hold the values `svc` asks for (StateError when another Service has one)."""
        if svc.cluster_ip and not svc.headless:
            self._take_ip(svc, svc.cluster_ip)
        for i, p in enumerate(svc.ports):
            if p.node_port is not None:
                self._take_port(svc, i, p.node_port)
        if svc.health_check_node_port is not None:
            self._take_port(svc, None, svc.health_check_node_port)

    def allocate(self, svc: Service) -> Service:
        """`svc` with every value it still lacks allocated."""
        if svc.cluster_ip is None and svc.type != TYPE_EXTERNAL_NAME:
            svc = replace(svc, cluster_ip=self._free_ip(svc))
            self._take_ip(svc, svc.cluster_ip)
        if svc.has_node_ports:
            ports = []
            for i, p in enumerate(svc.ports):
                if p.node_port is None:
                    # As Kubernetes does, one port number served over TCP and UDP shares
                    # one NodePort.
                    shared = [q.node_port for q in ports
                              if q.port == p.port and q.protocol != p.protocol and q.node_port]
                    p = replace(p, node_port=shared[0] if shared else self._free_port(svc))
                    self._take_port(svc, i, p.node_port)
                ports.append(p)
            svc = replace(svc, ports=tuple(ports))
        if svc.needs_health_check_node_port and svc.health_check_node_port is None:
            svc = replace(svc, health_check_node_port=self._free_port(svc))
            self._take_port(svc, None, svc.health_check_node_port)
        return svc

    def release(self, svc: Service) -> None:
        """Free every value held for `svc`'s namespace/name."""
        ips, ports = self.owned.pop(self.ident(svc), (set(), set()))
        for ip in ips:
            if self.ips.get(ip) == self.ident(svc):
                del self.ips[ip]
                if int(ipaddress.ip_address(ip)) < self._ip_cursor:
                    heapq.heappush(self._freed_ips, int(ipaddress.ip_address(ip)))
        for port in ports:
            if self.ports.get(port) == self.ident(svc):
                del self.ports[port]
                if port < self._port_cursor:
                    heapq.heappush(self._freed_ports, port)


@dataclass(frozen=True)
class ClusterState:
    """The whole desired state, with every allocation made."""

    nodes: tuple[Node, ...]
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    endpoint_slices: tuple[EndpointSlice, ...] = ()
    plan: AddressPlan = field(default=PLAN)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        nodes: tuple[Node, ...] | list[Node],
        pods=(),
        services=(),
        endpoint_slices=(),
        previous: ClusterState | None = None,
        plan: AddressPlan = PLAN,
        node_labels: tuple[NodeLabels, ...] | list[NodeLabels] = (),
    ) -> ClusterState:
        """Allocate what is missing and derive EndpointSlices from selectors.

        Allocations already made in `previous` are kept, so applying a manifest again never
        moves a pod or renumbers a Service. `node_labels` (Node manifests) set the zones of
        nodes of this cluster. Raises StateError naming object and field.
        """
        nodes = _labelled(tuple(nodes), node_labels, plan)
        by_node = {n.name: n for n in nodes}
        prev_pods = {p.key: p for p in previous.pods} if previous else {}
        prev_svcs = {s.key: s for s in previous.services} if previous else {}

        placed = cls._place_pods(list(pods), nodes, by_node, prev_pods, plan)
        allocated = cls._allocate_services(list(services), prev_svcs, plan)
        slices = [s for s in endpoint_slices]
        given = {(s.namespace, s.service_name) for s in slices}
        # Pods by (namespace, label, value): a selector looks at its candidates only, so
        # 10,000 Services over thousands of pods is not a product of the two.
        labelled: dict[tuple[str, str, str], list[Pod]] = {}
        for pod in placed:
            for k, v in pod.labels.items():
                labelled.setdefault((pod.namespace, k, v), []).append(pod)
        zones = {n.name: n.zone for n in nodes}
        for svc in allocated:
            # The endpoint controller leaves ExternalName Services without endpoints.
            if svc.type == TYPE_EXTERNAL_NAME:
                continue
            if svc.selector is not None and svc.key not in given:
                candidates = min(
                    (labelled.get((svc.namespace, k, v), []) for k, v in svc.selector.items()),
                    key=len,
                    default=[],
                )
                slices.extend(cls._endpoint_slices_for(svc, candidates, zones))
        return cls(nodes, tuple(placed), tuple(allocated), tuple(slices), plan)

    @staticmethod
    def _place_pods(pods, nodes, by_node, prev_pods, plan) -> list[Pod]:
        if pods and not nodes:
            raise StateError("the cluster has no nodes to place pods on")
        used: dict[str, set[str]] = {n.name: set() for n in nodes}
        out: list[Pod] = []
        pending: list[Pod] = []
        for pod in pods:
            if pod.node_name is not None and pod.node_name not in by_node:
                names = list(by_node)
                listed = ", ".join(names) if len(names) <= 4 else f"{names[0]} to {names[-1]}"
                raise StateError(
                    f"Pod {pod.namespace}/{pod.name}: spec.nodeName {pod.node_name!r} is not a node "
                    f"of this cluster (nodes: {listed}; the address plan fits at most "
                    f"{plan.max_nodes})"
                )
            prev = prev_pods.get(pod.key)
            if (
                prev is not None
                and prev.ip
                and prev.node_name in by_node  # its node may have left the cluster
                and pod.node_name in (None, prev.node_name)
            ):
                pod = replace(pod, node_name=prev.node_name, ip=prev.ip)
            elif pod.ip is not None and pod.node_name is None:
                pod = replace(pod, ip=None)  # an address means nothing without its node
            if pod.ip is not None:
                # Kept addresses are reserved before any allocation so none is handed out twice.
                if pod.ip in used[pod.node_name]:
                    raise StateError(
                        f"Pod {pod.namespace}/{pod.name}: status.podIP {pod.ip} is already used "
                        f"by another pod on {pod.node_name}"
                    )
                used[pod.node_name].add(pod.ip)
            pending.append(pod)
        counts = {n.name: 0 for n in nodes}
        cursor: dict[str, int] = {}
        for pod in pending:
            if pod.node_name:
                counts[pod.node_name] += 1
        for pod in pending:
            if pod.node_name is None:  # the scheduler: fewest pods first, then by name
                target = min(nodes, key=lambda n: (counts[n.name], n.index)).name
                counts[target] += 1
                pod = replace(pod, node_name=target)
            if pod.ip is None:
                node = by_node[pod.node_name]
                # A cursor per node: addresses below it are taken, so placing n pods is O(n).
                i = cursor.get(node.name, 0)
                while i < 253 and plan.pod_ip(node.index, i) in used[node.name]:
                    i += 1
                if i == 253:
                    raise StateError(f"node {node.name} is full: at most 253 pods per node")
                ip = plan.pod_ip(node.index, i)
                cursor[node.name] = i + 1
                used[node.name].add(ip)
                pod = replace(pod, ip=ip)
            out.append(pod)
        return out

    @staticmethod
    def _allocate_services(services, prev_svcs, plan) -> list[Service]:
        # What earlier builds allocated is held first: an applied Service keeps its
        # addresses, and a new Service asking for one of them is the one refused. Then
        # explicit values, so an allocation never steals an address asked for later.
        allocator = Allocator(plan)
        kept = [allocator.keep(svc, prev_svcs.get(svc.key)) for svc in services]
        for svc in kept:
            allocator.take_explicit(svc)
        return [allocator.allocate(svc) for svc in kept]

    @staticmethod
    def _endpoint_slices_for(
        svc: Service, pods: list[Pod], zones: dict[str, str] | None = None
    ) -> list[EndpointSlice]:
        """The endpoint controller: pods matching the selector, ports resolved by name.

        `pods` may be any superset of the selected ones, in placement order; `zones` maps
        node names to their zone. An endpoint carries its node's zone; under
        trafficDistribution PreferClose each ready one is hinted for that zone (the
        controller's preferClose heuristic: no balancing between zones). With
        publishNotReadyAddresses every endpoint is ready.
        """
        zones = zones or {}
        prefer_close = svc.traffic_distribution in (PREFER_CLOSE, PREFER_SAME_ZONE)
        selected = [
            p
            for p in pods
            if p.namespace == svc.namespace
            and svc.selector
            and all(p.labels.get(k) == v for k, v in svc.selector.items())
        ]
        for index, sp in enumerate(svc.ports):
            if isinstance(sp.target_port, str) and selected:
                declared = sorted(
                    {cp.name for p in selected for cp in p.ports if cp.protocol == sp.protocol}
                    - {None}
                )
                if sp.target_port not in declared:
                    raise StateError(
                        f"Service {svc.namespace}/{svc.name}: spec.ports[{index}].targetPort "
                        f"{sp.target_port!r} is not a {sp.protocol} port name declared by any "
                        f"selected pod (they declare: {', '.join(declared) or 'none'})"
                    )
        # One slice per distinct port mapping, as the controller does for named ports.
        groups: dict[tuple[EndpointPort, ...], list[Endpoint]] = {}
        for pod in selected:
            ports = []
            for sp in svc.ports:
                target = _resolve_target(sp, pod)
                if target is not None:
                    ports.append(EndpointPort(target, sp.protocol, sp.name))
            ready = svc.publish_not_ready_addresses or (pod.ready and not pod.terminating)
            zone = zones.get(pod.node_name) or None
            ep = Endpoint(
                addresses=(pod.ip,),
                ready=ready,
                serving=pod.ready,
                terminating=pod.terminating,
                node_name=pod.node_name,
                pod_name=pod.name,
                zone=zone,
                zone_hints=(zone,) if prefer_close and ready and zone else (),
            )
            groups.setdefault(tuple(ports), []).append(ep)
        if not groups:
            return [EndpointSlice(svc.namespace, f"{svc.name}-auto", svc.name, (), ())]
        # A slice holds one port mapping; pods that number a named port differently get their own.
        return [
            EndpointSlice(svc.namespace, f"{svc.name}-auto{i}", svc.name, tuple(eps), ports)
            for i, (ports, eps) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0])))
        ]

    # ------------------------------------------------------------------ lookups

    def pod(self, namespace: str, name: str) -> Pod:
        for p in self.pods:
            if p.namespace == namespace and p.name == name:
                return p
        raise KeyError(f"{namespace}/{name}")

    def service_obj(self, namespace: str, name: str) -> Service:
        for s in self.services:
            if s.namespace == namespace and s.name == name:
                return s
        raise KeyError(f"{namespace}/{name}")

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # ------------------------------------------------------------------ per-node view

    def proxied_services(self, proxy_name: str | None = None) -> list[Service]:
        """Services a proxy handles (see `proxied`)."""
        return [s for s in self.services if proxied(s, proxy_name)]

    def node_view(self, node_name: str, proxy_name: str | None = None) -> NodeView:
        node = self.node(node_name)
        slices_by_svc: dict[tuple[str, str], list[EndpointSlice]] = {}
        for sl in self.endpoint_slices:
            slices_by_svc.setdefault((sl.namespace, sl.service_name), []).append(sl)
        views: list[ServicePortView] = []
        for svc in self.proxied_services(proxy_name):
            views += service_port_views(svc, slices_by_svc.get(svc.key, []), node)
        return make_node_view(node, views, self.plan)


def proxied(svc: Service, proxy_name: str | None = None) -> bool:
    """A proxy handles the Service: not headless nor ExternalName (DNS only: never
    programmed), with a ClusterIP, labelled for it (or unlabelled). As kube-proxy's informers
    select only objects without the service.kubernetes.io/service-proxy-name (for another
    proxy) and service.kubernetes.io/headless labels (cmd/kube-proxy), a Service carrying the
    headless label is skipped even when it has a ClusterIP."""
    return (not svc.headless and bool(svc.cluster_ip) and svc.type != TYPE_EXTERNAL_NAME
            and svc.proxy_name == proxy_name and not svc.labelled_headless)


def service_port_views(svc: Service, slices: list[EndpointSlice], node: Node
                       ) -> list[ServicePortView]:
    """One ServicePortView per port of `svc` (a proxied Service) as `node` must serve it."""
    views = []
    lb = svc.type == TYPE_LOAD_BALANCER
    is_np = svc.type == TYPE_NODE_PORT or lb
    port_eps = [_endpoints_for_port(svc, sp, slices, node.name) for sp in svc.ports]
    health_port = svc.health_check_node_port if lb else None
    # kube-proxy's LocalReadyEndpoints: ready, on this node, counted once per address.
    local_ready = len({e.ip for eps in port_eps for e in eps if e.local and e.ready})
    for sp, eps in zip(svc.ports, port_eps, strict=True):
        views.append(
            ServicePortView(
                namespace=svc.namespace,
                service=svc.name,
                port_name=sp.name,
                protocol=sp.protocol,
                cluster_ip=svc.cluster_ip,
                port=sp.port,
                node_port=sp.node_port if is_np else None,
                external_ips=svc.external_ips,
                affinity_timeout_s=svc.affinity_timeout_s
                if svc.session_affinity == AFFINITY_CLIENT_IP
                else None,
                external_policy_local=(is_np or bool(svc.external_ips))
                and svc.external_traffic_policy == POLICY_LOCAL,
                internal_policy_local=svc.internal_traffic_policy == POLICY_LOCAL,
                endpoints=tuple(eps),
                node_zone=node.zone,
                load_balancer_ips=svc.load_balancer_ips if lb else (),
                load_balancer_source_ranges=svc.load_balancer_source_ranges if lb else (),
                health_check_node_port=health_port,
                health_check_local_endpoints=local_ready if health_port else 0,
            )
        )
    return views


def view_order(view: ServicePortView) -> tuple[str, str, int]:
    """The order of a NodeView's services: by name, then protocol, then port."""
    return (view.name, view.protocol, view.port)


def make_node_view(node: Node, views: list[ServicePortView], plan: AddressPlan) -> NodeView:
    views.sort(key=view_order)
    return NodeView(
        node=node.name,
        node_ip=node.ip,
        pod_cidr=node.pod_cidr,
        cluster_cidr=plan.cluster_cidr,
        service_cidr=plan.service_cidr,
        node_ips=(node.ip,),
        services=tuple(views),
        node_port_range=plan.node_port_range,
    )


def _resolve_target(sp: ServicePort, pod: Pod) -> int | None:
    if sp.target_port is None:
        return sp.port
    if isinstance(sp.target_port, int):
        return sp.target_port
    for cp in pod.ports:
        if cp.name == sp.target_port and cp.protocol == sp.protocol:
            return cp.port
    return None  # this pod does not serve the named port: not an endpoint for it


def _endpoints_for_port(
    svc: Service, sp: ServicePort, slices: list[EndpointSlice], node_name: str
) -> list[EndpointView]:
    out: dict[tuple[str, int], EndpointView] = {}
    for sl in slices:
        port = None
        for ep_port in sl.ports:
            if ep_port.name == sp.name and ep_port.protocol == sp.protocol:
                port = ep_port.port
                break
        if port is None:
            continue
        for ep in sl.endpoints:
            for addr in ep.addresses:
                out[(addr, port)] = EndpointView(
                    ip=addr,
                    port=port,
                    node=ep.node_name,
                    local=ep.node_name == node_name,
                    ready=ep.ready,
                    serving=ep.serving,
                    terminating=ep.terminating,
                    pod=f"{sl.namespace}/{ep.pod_name}" if ep.pod_name else None,
                    zone=ep.zone,
                    zone_hints=ep.zone_hints,
                )
    return sorted(out.values(), key=lambda e: (ipaddress.ip_address(e.ip), e.port))


# --------------------------------------------------------------------------- persistence


def allocations(pods: Iterable[Pod], services: Iterable[Service]) -> dict:
    """The choices made for these placed pods and allocated Services (pod placement and IPs,
    ClusterIPs, NodePorts), as JSON data."""
    return {
        "pods": [[p.namespace, p.name, p.node_name, p.ip] for p in pods],
        "services": [
            [
                s.namespace,
                s.name,
                s.cluster_ip,
                [[p.port, p.protocol, p.node_port] for p in s.ports],
                s.health_check_node_port,
            ]
            for s in services
        ],
    }


def previous_from_allocations(nodes, data: dict) -> ClusterState:
    """A ClusterState that build(previous=...) reads to keep earlier allocations stable."""
    pods = tuple(
        Pod(ns, name, node_name=node, ip=ip) for ns, name, node, ip in data.get("pods", [])
    )
    services = tuple(
        Service(
            ns,
            name,
            tuple(ServicePort(port, proto, node_port=np) for port, proto, np in ports),
            cluster_ip=ip,
            health_check_node_port=check[0] if check else None,
        )
        for ns, name, ip, ports, *check in data.get("services", [])  # older runs lack check
    )
    return ClusterState(tuple(nodes), pods, services)
