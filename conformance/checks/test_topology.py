"""Which endpoints the endpoint controller offers: zones under PreferClose, unready pods
published by publishNotReadyAddresses."""

from __future__ import annotations

import pytest

from clusters.workloads.probe import REFUSED
from conformance.expect import check_cases, silent
from conformance.harness import BACKENDS, Probe, web_service
from kube.model import PREFER_CLOSE

EVERYONE = set(BACKENDS)
NODE1 = {"ns1/web-1"}  # zone1
NODE2 = {"ns1/web-2", "ns1/web-3"}  # zone2
N = 30


@pytest.mark.check(50)
def test_prefer_close_keeps_traffic_in_the_zone_and_falls_back(cluster):
    """trafficDistribution PreferClose: each node's clients reach their zone's endpoints,
    and all of them when their zone has none (none at all, or none ready any more).

    Stands for the e2e tests "Traffic Distribution should route traffic to an endpoint in
    the same zone when using PreferClose" (test/e2e/network/traffic_distribution.go;
    formerly "... when Service has trafficDistribution=PreferClose should route traffic to
    an endpoint that is close to the client", whose last step routes a client of a zone
    without endpoints cluster-wide) and kube-proxy's TestCategorizeEndpoints hint cases
    (pkg/proxy/topology_test.go). Node k is alone in zone<k>; the endpoint controller
    hints every ready endpoint for its own zone, pods and nodes alike follow them.
    """
    close = web_service("close", traffic_distribution=PREFER_CLOSE)
    far = web_service("close-elsewhere", traffic_distribution=PREFER_CLOSE,
                      selector={"app": "web", "node": "node2"})
    plain = web_service("spread")
    cluster.apply([close, far, plain])
    ip, elsewhere, spread = (cluster.cluster_ip(n) for n in ("close", "close-elsewhere",
                                                             "spread"))
    # One client per node and Service wherever two endpoints must both answer: the
    # userspace proxy's round robin, shared by a node's clients, would split them.
    check_cases(cluster, {
        "pod in zone1": (Probe("ns1/client-a", ip, 80, count=20), NODE1),
        "node1 (zone1)": (Probe("node/node1", ip, 80, count=20), NODE1),
        "pod in zone2": (Probe("ns1/client-b", ip, 80, count=N), NODE2),
        "pod in zone1, endpoints only in zone2": (Probe("ns1/client-c", elsewhere, 80, count=N),
                                                  NODE2),
        "node2, endpoints only in zone2": (Probe("node/node2", elsewhere, 80, count=N), NODE2),
        "pod in zone1, no trafficDistribution": (Probe("ns1/client-a", spread, 80, count=N),
                                                 EVERYONE),
    }, "every endpoint ready")
    cluster.apply([close, far, plain], not_ready=("ns1/web-1",))
    check_cases(cluster, {
        "node1 (zone1)": (Probe("node/node1", ip, 80, count=N), NODE2),
        "pod in zone2": (Probe("ns1/client-b", ip, 80, count=N), NODE2),
    }, "zone1's endpoint web-1 not ready")
    cluster.apply([close, far, plain])
    check_cases(cluster, {
        "pod in zone1": (Probe("ns1/client-a", ip, 80, count=20), NODE1),
        "node2 (zone2)": (Probe("node/node2", ip, 80, count=N), NODE2),
    }, "web-1 ready again")


@pytest.mark.check(51)
def test_publish_not_ready_addresses_serves_unready_pods(cluster):
    """A Service with publishNotReadyAddresses serves its unready, even terminating, pods;
    one without serves only ready ones, and refuses when it has none.

    Stands for the e2e tests "Services should create endpoints for unready pods", "Services
    should be able to connect to terminating and unready endpoints if
    PublishNotReadyAddresses is true" and "... should not be able to connect to terminating
    and unready endpoints if PublishNotReadyAddresses is false" (service.go). Here web-2
    fails its readiness probe and web-3 is being deleted as well.
    """
    node2 = {"app": "web", "node": "node2"}
    cluster.apply([
        web_service("published", selector=node2, publish_not_ready_addresses=True),
        web_service("unpublished", selector=node2),
        web_service("published-all", publish_not_ready_addresses=True),
        web_service("unpublished-all"),
    ], not_ready=("ns1/web-2", "ns1/web-3"), terminating=("ns1/web-3",))
    ips = {n: cluster.cluster_ip(n) for n in ("published", "unpublished", "published-all",
                                              "unpublished-all")}
    cases = {}
    for c in ("ns1/client-a", "ns1/client-b"):
        cases[f"published, from {c}"] = (Probe(c, ips["published"], 80, count=N), NODE2)
        cases[f"published-all, from {c}"] = (Probe(c, ips["published-all"], 80, count=N),
                                             EVERYONE)
        cases[f"unpublished-all, from {c}"] = (Probe(c, ips["unpublished-all"], 80, count=20),
                                               NODE1)
        cases[f"unpublished, from {c}"] = (silent(c, ips["unpublished"], 80), REFUSED)
    check_cases(cluster, cases)
