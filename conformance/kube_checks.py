"""The conformance checks that run over the API on a real cluster (`svcbench conformance
--cluster kind|kubeconfig`).

The namespace set (conformance/checks/) needs the host's view of every node; these need only
what the API gives: the run's probe pods (one per node on the pod network, one on the node's
own network, kube/deploy.py's probe DaemonSets), echo pods and Services made through the
run's objects, and `python -m clusters.workloads.probe` run in a pod by exec. The echo reply
names the pod that answered and the client address it saw, so every assertion is on real
connections through whatever proxies the cluster's Services (kube-proxy, or svcbench's
agent).

What a run creates for them, in one apply before the first check (`objects`):
- in `svb-<run>-bench` (bench/kube_bench.py's objects): two echo pods, `svc-0` selecting both
  and the latency Service selecting neither (the first three checks);
- in `svb-<run>-conf`: one echo pod on each of the first ECHO_NODES nodes (pinned by
  nodeName; TCP 8080 "http", UDP 8080 "udp", TCP 9090 "alt") and one Service per check.

Checks that expect traffic to be served retry until SETTLE_S after the objects were made
(endpoints reach a proxy a moment after their pods are ready); checks that expect silence
run once, after a served check has shown the proxies caught up. Each result has the shape
of the namespace set's conformance.json entries: name, upstream (the e2e test title in
test/e2e/network), outcome (passed, failed, skipped), reason, duration_s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kube import deploy
from kube.model import (
    AFFINITY_CLIENT_IP,
    POLICY_LOCAL,
    PROXY_NAME_LABEL,
    TCP,
    TYPE_NODE_PORT,
    UDP,
    ContainerPort,
    Pod,
    Service,
    ServicePort,
)

NS = "conf"
APP = "svcbench-conf"
NODE_LABEL = "svcbench.io/node"  # the echo pod's node, 1-based, as the suite's node<k>
LOCAL_LABEL = "svcbench.io/local-set"  # the echo pods the internalTrafficPolicy Service selects
ECHO_NODES = 3  # echo pods on at most this many nodes: a large cluster is probed, not filled
SETTLE_S = 30.0  # a served check retries until this long after the objects were made
SILENT_TIMEOUT_S = 0.5
ECHO_PORTS = (ContainerPort(8080, TCP, "http"), ContainerPort(8080, UDP, "udp"),
              ContainerPort(9090, TCP, "alt"))

OK = "ok"


def echo_name(k: int) -> str:
    return f"conf-echo-{k}"


def services() -> list[Service]:
    """One Service per check, in the conf namespace (addresses left to the cluster)."""
    app = {"app": APP}
    web = (ServicePort(80, TCP, "http", 8080),)
    return [
        Service(NS, "nodeport", web, type=TYPE_NODE_PORT, selector=app),
        Service(NS, "affinity", web, selector=app, session_affinity=AFFINITY_CLIENT_IP),
        Service(NS, "multiport", (ServicePort(80, TCP, "http", "http"),
                                  ServicePort(81, TCP, "alt", "alt")), selector=app),
        Service(NS, "udp", (ServicePort(53, UDP, "dns", "udp"),), selector=app),
        Service(NS, "itp-local", web, selector={**app, LOCAL_LABEL: "yes"},
                internal_traffic_policy=POLICY_LOCAL),
        Service(NS, "etp-local", web, type=TYPE_NODE_PORT, selector={**app, NODE_LABEL: "1"},
                external_traffic_policy=POLICY_LOCAL),
        Service(NS, "hairpin", web, selector={**app, NODE_LABEL: "1"}),
        Service(NS, "other-proxy", web, selector=app, labels={PROXY_NAME_LABEL: "other"}),
    ]


def local_nodes(echo_nodes: int) -> range:
    """The nodes (1-based) whose echo pod the internalTrafficPolicy Service selects: all of
    them but the last when there are two or more, so one node has none."""
    return range(1, echo_nodes if echo_nodes > 1 else 2)


def objects(run: str, nodes: list[str], image: str = deploy.DEFAULT_IMAGE,
            host: str | None = None) -> list[dict[str, Any]]:
    """The conf namespace, its echo pods (one per node of the first ECHO_NODES) and Services."""
    echo = nodes[:ECHO_NODES]
    local = local_nodes(len(echo))
    node_names = {f"node{k}": n for k, n in enumerate(echo, start=1)}
    pods = [Pod(NS, echo_name(k), {"app": APP, NODE_LABEL: str(k),
                                   **({LOCAL_LABEL: "yes"} if k in local else {})},
                node_name=f"node{k}", ports=ECHO_PORTS)
            for k in range(1, len(echo) + 1)]
    echo_pods = [deploy.echo_pod(run, p, node_names, image) for p in pods]
    for obj in echo_pods:  # placed by nodeName, on a control-plane node too (its taints)
        obj["spec"]["tolerations"] = [{"operator": "Exists"}]
    return ([deploy.namespace(run, NS, host)]
            + [deploy.service(run, s) for s in services()] + echo_pods)


# --------------------------------------------------------------------------- the run


def _check(name: str, upstream: str, fn: Callable[[], str | None]) -> dict[str, Any]:
    """Run one check: None passes, a string is a skip's reason, AssertionError fails, and
    so does any other error (an exec or API call that failed), named, so the checks after it
    still run."""
    started = time.perf_counter()
    try:
        skipped = fn()
        outcome, reason = ("passed", None) if skipped is None else ("skipped", skipped)
    except AssertionError as exc:
        outcome, reason = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - recorded as this check's failure
        outcome, reason = "failed", f"{type(exc).__name__}: {exc}"

    return {"name": name, "upstream": upstream, "outcome": outcome, "reason": reason,
            "duration_s": round(time.perf_counter() - started, 3)}


def _outcomes(result) -> dict[str, int]:
    return result.summary()["outcomes"]


def _backends(result) -> set[str]:
    return {s.backend for s in result.samples if s.outcome == OK}


def _seen_ips(result) -> set[str]:
    return {s.seen_client.rsplit(":", 1)[0] for s in result.samples
            if s.outcome == OK and s.seen_client}


@dataclass
class BenchObjects:
    """What the first three checks use of the bench's objects (bench/kube_bench.py, a floor
    this package does not import; svcbench/cmd_kube.py hands them over): its namespace (as a
    manifest namespace), the Service selecting both echo pods, the one selecting none, and
    the programming-latency measurement (seconds per selector switch and node)."""

    namespace: str
    web: str
    empty: str
    programming: Callable[[int], list[float]]  # changes -> values


class Checks:
    """One run's API checks: the Services and pods it made, and a function per check."""

    def __init__(self, cluster, bench: BenchObjects,
                 say: Callable[[str], None] = lambda _m: None, settle_s: float | None = None):
        self.cluster, self.say, self.bench = cluster, say, bench
        self.deadline = time.monotonic() + (SETTLE_S if settle_s is None else settle_s)
        self.bench_ns = deploy.namespace_name(cluster.run, bench.namespace)
        self.ns = deploy.namespace_name(cluster.run, NS)
        self.svc = {s.metadata.name: s for s in cluster.core.list_namespaced_service(
            self.bench_ns).items}
        self.conf = {s.metadata.name: s for s in cluster.core.list_namespaced_service(
            self.ns).items}
        pods = cluster.core.list_namespaced_pod(self.ns, label_selector=f"app={APP}").items
        self.echo = {int(p.metadata.labels[NODE_LABEL]): p for p in pods}  # k -> pod
        self.echo_node = {k: p.spec.node_name for k, p in self.echo.items()}
        self.node_of_echo = {f"{self.ns}/{p.metadata.name}": p.spec.node_name
                             for p in self.echo.values()}
        self.all_echo = set(self.node_of_echo)

    def eventually(self, fn: Callable[[], None]) -> None:
        """fn until it passes or the settle time is over (then its last failure)."""
        while True:
            try:
                fn()
                return
            except AssertionError:
                if time.monotonic() >= self.deadline:
                    raise
            time.sleep(1.0)

    def _port(self, svc, name: str | None = None) -> Any:
        return next(p for p in svc.spec.ports if name is None or p.name == name)

    # ---- the checks: each returns None (passed) or a reason to skip; asserts otherwise

    def clusterip_every_node(self) -> None:
        """Services "should serve a basic endpoint from pods" and "should be able to up and
        down services": 20 connections from every node's probe pod reach the bench's web
        Service (svc-0) and both of its echo pods answer."""
        web = self.svc[self.bench.web]

        def served() -> None:
            for node, r in self.cluster.probes(web.spec.cluster_ip, 80, count=20,
                                               timeout=1.0).items():
                s = r.summary()
                assert s["outcomes"] == {OK: 20}, f"{node}: {s['outcomes']}"
                assert len(s["backends"]) == 2, f"{node}: backends {s['backends']}"
        self.eventually(served)

    def no_endpoints_rejected(self) -> None:
        """Services "should be rejected when no endpoints exist": a Service without
        endpoints refuses at once from every node (kube-proxy's REJECT)."""
        empty = self.svc[self.bench.empty]
        for node, r in self.cluster.probes(empty.spec.cluster_ip, 80, count=3,
                                           timeout=SILENT_TIMEOUT_S).items():
            assert _outcomes(r) == {"refused": 3}, f"{node}: {_outcomes(r)}"

    def endpoint_switch_programmed(self) -> None:
        """Services "should update endpoints: http" (networking.go "Networking Granular
        Checks: Services should update endpoints: http") and the network programming latency
        SLI: a selector switch between two echo pods serves from every node within 60 s."""
        values = self.bench.programming(2)
        nodes = len(self.cluster.probe_pods())
        assert len(values) == 2 * nodes, f"{len(values)} of {2 * nodes} node changes served"

    def nodeport_every_node(self) -> None:
        """Services "should be able to create a functioning NodePort service": from every
        node's own network (the host-network probe pods), each echo node's address at the
        NodePort answers, and every echo pod serves some of it."""
        svc = self.conf["nodeport"]
        port = self._port(svc).node_port
        addrs = self.cluster.node_addresses()
        targets = [addrs[n] for n in sorted(set(self.echo_node.values())) if n in addrs]
        assert targets, "no node has an InternalIP or ExternalIP to reach the NodePort on"
        hosts = self.cluster.probe_pods(host_network=True)
        assert hosts, "no host-network probe pod runs"
        requests = [(pod, None, ip, port, {"count": 6, "timeout": 1.0})
                    for _node, pod in sorted(hosts.items()) for ip in targets]
        where = [(node, ip) for node in sorted(hosts) for ip in targets]

        def served() -> None:
            seen: set[str] = set()
            for (node, ip), r in zip(where, self.cluster.probe_from(requests), strict=True):
                assert _outcomes(r) == {OK: 6}, f"from {node} to {ip}:{port}: {_outcomes(r)}"
                seen |= _backends(r)
            assert seen == self.all_echo, f"backends {sorted(seen)}, not {sorted(self.all_echo)}"
        self.eventually(served)

    def session_affinity_clientip(self) -> str | None:
        """Services "should have session affinity work for service with type clusterIP":
        with sessionAffinity ClientIP every one of 20 connections from one probe pod reaches
        the same echo pod (and probe pods together reach the Service)."""
        svc = self.conf["affinity"]
        if len(self.echo) < 2:
            return "one echo pod: affinity cannot be told from chance"

        def served() -> None:
            for node, r in self.cluster.probes(svc.spec.cluster_ip, 80, count=20,
                                               timeout=1.0).items():
                assert _outcomes(r) == {OK: 20}, f"{node}: {_outcomes(r)}"
                assert len(_backends(r)) == 1, (
                    f"{node}: 20 connections reached {r.summary()['backends']}")
        self.eventually(served)
        return None

    def multiport_named_target(self) -> None:
        """Services "should serve multiport endpoints from pods": one Service, port 80 to
        the pods' port named "http" (8080) and port 81 to the one named "alt" (9090); both
        answer from every node and every echo pod serves each."""
        svc = self.conf["multiport"]
        ip = svc.spec.cluster_ip
        pods = self.cluster.probe_pods()
        requests = [(pod, None, ip, port, {"count": 10, "timeout": 1.0})
                    for _n, pod in sorted(pods.items()) for port in (80, 81)]
        where = [(node, port) for node in sorted(pods) for port in (80, 81)]

        def served() -> None:
            seen: dict[int, set[str]] = {80: set(), 81: set()}
            for (node, port), r in zip(where, self.cluster.probe_from(requests), strict=True):
                assert _outcomes(r) == {OK: 10}, f"{node} to port {port}: {_outcomes(r)}"
                seen[port] |= _backends(r)
            for port, got in seen.items():
                assert got == self.all_echo, f"port {port}: backends {sorted(got)}"
        self.eventually(served)

    def udp_clusterip(self) -> None:
        """Networking Granular Checks: Services "should function for pod-Service: udp" (its
        ClusterIP half): datagrams to a UDP Service port (53 to the pods' port named "udp")
        are answered from every node, by every echo pod over all."""
        svc = self.conf["udp"]

        def served() -> None:
            seen: set[str] = set()
            for node, r in self.cluster.probes(svc.spec.cluster_ip, 53, udp=True, count=10,
                                               timeout=1.0).items():
                assert _outcomes(r) == {OK: 10}, f"{node}: {_outcomes(r)}"
                seen |= _backends(r)
            assert seen == self.all_echo, f"backends {sorted(seen)}, not {sorted(self.all_echo)}"
        self.eventually(served)

    def internal_traffic_policy_local(self) -> None:
        """Services "should respect internalTrafficPolicy=Local Pod to Pod": the Service
        selects the echo pods of every echo node but the last; a probe pod on a node with one
        reaches only that one, a probe pod on a node without one gets no answer at all."""
        svc = self.conf["itp-local"]
        local = {self.echo_node[k]: f"{self.ns}/{self.echo[k].metadata.name}"
                 for k in local_nodes(len(self.echo)) if k in self.echo}
        pods = self.cluster.probe_pods()
        with_local = sorted(n for n in pods if n in local)
        without = sorted(n for n in pods if n not in local)
        assert with_local, "no probe pod runs on a node with a selected echo pod"

        def served() -> None:
            results = self.cluster.probe_from([(pods[n], None, svc.spec.cluster_ip, 80,
                                                {"count": 10, "timeout": 1.0})
                                               for n in with_local])
            for node, r in zip(with_local, results, strict=True):
                assert _outcomes(r) == {OK: 10}, f"{node}: {_outcomes(r)}"
                assert _backends(r) == {local[node]}, (
                    f"{node}: reached {sorted(_backends(r))}, not its own {local[node]}")
        self.eventually(served)
        results = self.cluster.probe_from([(pods[n], None, svc.spec.cluster_ip, 80,
                                            {"count": 3, "timeout": SILENT_TIMEOUT_S})
                                           for n in without])
        for node, r in zip(without, results, strict=True):
            assert OK not in _outcomes(r), (
                f"{node} has no local endpoint but reached {sorted(_backends(r))}")

    def external_traffic_policy_local(self) -> str | None:
        """Services "should support externalTrafficPolicy=Local for type=NodePort"
        (loadbalancer.go before v1.31: "LoadBalancers ESIPP [Slow] should work for
        type=NodePort"): the NodePort Service selects node 1's echo pod only. From node 2's
        own network, node 1's address at the NodePort is served by that pod, which sees node
        2's address as the client (no SNAT); from node 1's own network, node 2's address at
        the NodePort (no local endpoint there) gets no answer."""
        if len(self.echo) < 2:
            return "needs two nodes: one with the Service's echo pod, one without"
        svc = self.conf["etp-local"]
        port = self._port(svc).node_port
        addrs = self.cluster.node_addresses()
        hosts = self.cluster.probe_pods(host_network=True)
        one, two = self.echo_node[1], self.echo_node[2]
        if one not in hosts or two not in hosts or one not in addrs or two not in addrs:
            return f"nodes {one} and {two} need a host-network probe pod and an address"
        backend = f"{self.ns}/{self.echo[1].metadata.name}"

        def served() -> None:
            (r,) = self.cluster.probe_from([(hosts[two], None, addrs[one], port,
                                             {"count": 6, "timeout": 1.0})])
            assert _outcomes(r) == {OK: 6}, f"from {two} to {addrs[one]}:{port}: {_outcomes(r)}"
            assert _backends(r) == {backend}, f"reached {sorted(_backends(r))}, not {backend}"
            assert _seen_ips(r) == {addrs[two]}, (
                f"the backend saw {sorted(_seen_ips(r))}, not the client {addrs[two]}")
        self.eventually(served)
        (r,) = self.cluster.probe_from([(hosts[one], None, addrs[two], port,
                                         {"count": 3, "timeout": SILENT_TIMEOUT_S})])
        assert OK not in _outcomes(r), (
            f"{two} has no local endpoint but from {one} reached {sorted(_backends(r))}")
        return None

    def hairpin(self) -> None:
        """Services "should allow pods to hairpin back to themselves through services": the
        echo pod a Service selects alone connects to that Service's ClusterIP and reaches
        itself."""
        svc = self.conf["hairpin"]
        pod = self.echo[1].metadata.name

        def served() -> None:
            (r,) = self.cluster.probe_from([(pod, self.ns, svc.spec.cluster_ip, 80,
                                             {"count": 5, "timeout": 1.0})])
            assert _outcomes(r) == {OK: 5}, f"{pod} to its own Service: {_outcomes(r)}"
            assert _backends(r) == {f"{self.ns}/{pod}"}, f"reached {sorted(_backends(r))}"
        self.eventually(served)

    def service_proxy_name_other(self) -> None:
        """Services "should implement service.kubernetes.io/service-proxy-name": a Service
        labelled for another proxy (service-proxy-name=other), selecting the same echo pods
        as the others, is not served from any node."""
        svc = self.conf["other-proxy"]
        for node, r in self.cluster.probes(svc.spec.cluster_ip, 80, count=3,
                                           timeout=SILENT_TIMEOUT_S).items():
            assert OK not in _outcomes(r), (
                f"{node} reached {sorted(_backends(r))} through a Service for another proxy")

    def run(self) -> list[dict[str, Any]]:
        """Every check, served ones before the silent ones they vouch for."""
        return [
            _check("clusterip-every-node", "should serve a basic endpoint from pods",
                   self.clusterip_every_node),
            _check("no-endpoints-rejected", "should be rejected when no endpoints exist",
                   self.no_endpoints_rejected),
            _check("endpoint-switch-programmed", "should update endpoints: http",
                   self.endpoint_switch_programmed),
            _check("nodeport-every-node", "should be able to create a functioning NodePort "
                   "service", self.nodeport_every_node),
            _check("session-affinity-clientip", "should have session affinity work for "
                   "service with type clusterIP", self.session_affinity_clientip),
            _check("multiport-named-target-port", "should serve multiport endpoints from pods",
                   self.multiport_named_target),
            _check("udp-clusterip", "should function for pod-Service: udp",
                   self.udp_clusterip),
            _check("internal-traffic-policy-local", "should respect internalTrafficPolicy="
                   "Local Pod to Pod", self.internal_traffic_policy_local),
            _check("external-traffic-policy-local", "should support externalTrafficPolicy="
                   "Local for type=NodePort", self.external_traffic_policy_local),
            _check("hairpin", "should allow pods to hairpin back to themselves through "
                   "services", self.hairpin),
            _check("service-proxy-name-other", "should implement service.kubernetes.io/"
                   "service-proxy-name", self.service_proxy_name_other),
        ]


def run(cluster, bench: BenchObjects, say: Callable[[str], None] = lambda _m: None,
        settle_s: float | None = None) -> list[dict[str, Any]]:
    """The API checks on a cluster whose run already holds `objects` and the bench's."""
    return Checks(cluster, bench, say, settle_s).run()
