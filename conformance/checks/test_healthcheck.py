"""Health-check NodePorts: what a cloud load balancer asks each node under externalTrafficPolicy
Local (kube-proxy's service health server, dataplanes/healthcheck.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conformance.harness import EXTERNAL, web_service
from dataplanes.healthcheck import http_get
from kube.model import POLICY_LOCAL

LB_IP = "198.18.32.10"  # in the plan's load-balancer range; not needed reachable here
NODE2_PODS = ("ns1/web-2", "ns1/web-3")


def _ask(cluster, node: str, port: int) -> tuple[int, dict, dict] | str:
    """(status, headers, JSON body) of a GET from the external client to node:port, or what
    went wrong instead (refused, timeout, ...)."""
    try:
        status, headers, body = cluster.call(EXTERNAL, http_get, cluster.node_ip(node), port,
                                             timeout=2.0)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        return status, headers, json.loads(body)
    except ValueError:
        return f"status {status} with a body that is not JSON: {body[:200]!r}"


def _ask_both(cluster, port: int) -> dict[str, tuple[int, dict, dict] | str]:
    nodes = ("node1", "node2")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(nodes, pool.map(lambda n: _ask(cluster, n, port), nodes), strict=True))


def _expect(answer, node: str, status: int, local: int, when: str) -> None:
    assert not isinstance(answer, str), f"{when}: {node}'s health check did not answer: {answer}"
    got_status, headers, body = answer
    expected = {"service": {"namespace": "ns1", "name": "lb-local"}, "localEndpoints": local,
                "serviceProxyHealthy": True}
    assert (got_status, body) == (status, expected), (
        f"{when}: {node} answered {got_status} {body}, expected {status} {expected}"
    )
    assert headers.get("content-type") == "application/json", headers
    assert headers.get("x-content-type-options") == "nosniff", headers


@pytest.mark.check(60)
def test_health_check_node_port(cluster):
    """The healthCheckNodePort of a LoadBalancer Service with externalTrafficPolicy Local
    answers 200 with the node's count of ready endpoints where it has some, 503 with 0 where
    it has none, and 503 on a node left with only terminating (still serving) endpoints.

    Upstream: service.go "should fail health check node port if there are only terminating
    endpoints"; loadbalancer.go "ExternalTrafficPolicy: Local" "should work for
    type=LoadBalancer" and "should only target nodes with endpoints" (their health-check
    part); kube-proxy's pkg/proxy/healthcheck TestServer (status, JSON payload, headers) and
    EndpointsMap.LocalReadyEndpoints (only ready endpoints count).
    """

    def apply(*endpoints):
        svc = web_service("lb-local", type="LoadBalancer", selector=None,
                          load_balancer_ips=(LB_IP,), external_traffic_policy=POLICY_LOCAL)
        cluster.apply([svc], [cluster.endpoint_slice("lb-local", endpoints)])

    apply(*NODE2_PODS)
    port = cluster.service("lb-local").health_check_node_port
    assert port is not None, "the allocator gave the LoadBalancer no healthCheckNodePort"
    assert port not in {p.node_port for p in cluster.service("lb-local").ports}
    answers = _ask_both(cluster, port)
    _expect(answers["node2"], "node2", 200, 2, "endpoints on node2 only")
    _expect(answers["node1"], "node1", 503, 0, "endpoints on node2 only")

    apply(*(cluster.endpoint(k, ready=False, serving=True, terminating=True) for k in NODE2_PODS))
    answers = _ask_both(cluster, port)
    _expect(answers["node2"], "node2", 503, 0, "node2's endpoints all terminating")
    _expect(answers["node1"], "node1", 503, 0, "node2's endpoints all terminating")

    apply(*NODE2_PODS)
    _expect(_ask(cluster, "node2", port), "node2", 200, 2, "node2's endpoints ready again")
