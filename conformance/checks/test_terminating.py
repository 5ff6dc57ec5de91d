"""Terminating endpoints behind NodePorts and traffic policies (KEP-1669's fallback)."""

from __future__ import annotations

import pytest

from clusters.workloads.probe import TIMEOUT
from conformance.checks.flows import check_all, dropped, served
from conformance.harness import EXTERNAL, Probe, web_service
from kube.model import POLICY_LOCAL

COUNT = 20
SILENT = {"count": 2, "timeout": 0.4, "expect": TIMEOUT}


@pytest.mark.check(28)
def test_nodeport_terminating_fallback(cluster):
    """With no ready endpoint, serving terminating ones take the traffic; never the others.

    Placement: web-1 on node1, web-2 and web-3 on node2. Four selector-less Services:

    - `fb-cluster` (NodePort, both policies Cluster): web-1 terminating and serving,
      web-2 terminating and not serving, web-3 not ready. Every source, through either
      node's NodePort or the ClusterIP, reaches web-1 alone. Then web-3 becomes ready:
      from then on it alone is served, the terminating web-1 gets nothing.
    - `fb-itp` (internalTrafficPolicy Local): web-1 terminating and serving on node1;
      node2 has web-2 terminating and not serving, web-3 not ready. A pod on node1 falls
      back to web-1; a pod on node2 has no usable local endpoint and is dropped.
    - `fb-etp` (NodePort, externalTrafficPolicy Local): the only endpoint, web-1 on node1,
      is terminating and serving. Outside clients are served by it through node1 and
      dropped by node2 (no local endpoint, but endpoints exist); pods on either node
      reaching node1's NodePort are served by it too (short circuit to the cluster-wide
      set, which falls back alike).
    - `fb-etp-ready` (NodePort, externalTrafficPolicy Local): node1's only endpoint web-1 is
      terminating and not serving; node2 has web-2 ready and web-3 terminating and
      serving. Outside clients are dropped by node1 and served by web-2 alone through node2.

    Upstream (test/e2e/network/service.go): "Services should fallback to terminating
    endpoints when there are no ready endpoints with externallTrafficPolicy=Cluster"
    [sic], "... with internalTrafficPolicy=Cluster", "Services should fallback to local
    terminating endpoints when there are no ready endpoints with internalTrafficPolicy=Local",
    "... with externalTrafficPolicy=Local"; kube-proxy's TestCategorizeEndpoints
    (pkg/proxy/topology_test.go: local and cluster endpoints fall back to serving
    terminating ones separately, each only when it has no ready one).
    """
    e = cluster.endpoint

    def terminating(key: str, serving: bool = True):
        return e(key, ready=False, serving=serving, terminating=True)

    def slices(fb_cluster_third):
        return [
            cluster.endpoint_slice("fb-cluster", [terminating("ns1/web-1"),
                                                  terminating("ns1/web-2", serving=False),
                                                  fb_cluster_third]),
            cluster.endpoint_slice("fb-itp", [terminating("ns1/web-1"),
                                              terminating("ns1/web-2", serving=False),
                                              e("ns1/web-3", ready=False)]),
            cluster.endpoint_slice("fb-etp", [terminating("ns1/web-1")]),
            cluster.endpoint_slice("fb-etp-ready", [terminating("ns1/web-1", serving=False),
                                                    e("ns1/web-2"), terminating("ns1/web-3")]),
        ]

    services = [
        web_service("fb-cluster", type="NodePort", selector=None),
        web_service("fb-itp", internal_traffic_policy=POLICY_LOCAL, selector=None),
        web_service("fb-etp", type="NodePort", external_traffic_policy=POLICY_LOCAL,
                    selector=None),
        web_service("fb-etp-ready", type="NodePort", external_traffic_policy=POLICY_LOCAL,
                    selector=None),
    ]
    cluster.apply(services, slices(e("ns1/web-3", ready=False)))
    node1, node2 = cluster.node_ip("node1"), cluster.node_ip("node2")
    np_cluster, np_etp = cluster.node_port("fb-cluster"), cluster.node_port("fb-etp")
    np_ready = cluster.node_port("fb-etp-ready")
    ip_cluster, ip_itp = cluster.cluster_ip("fb-cluster"), cluster.cluster_ip("fb-itp")
    web1, web2 = {"ns1/web-1"}, {"ns1/web-2"}

    def fb_cluster(only: set[str]) -> dict:
        return {
            f"fb-cluster: outside client through {name}": served(
                Probe(EXTERNAL, ip, np_cluster, count=COUNT), only)
            for name, ip in (("node1", node1), ("node2", node2))
        } | {
            "fb-cluster: pod on node2 through node1's NodePort": served(
                Probe("ns1/client-b", node1, np_cluster, count=COUNT), only),
            "fb-cluster: pod on node1 to the ClusterIP": served(
                Probe("ns1/client-a", ip_cluster, 80, count=COUNT), only),
            "fb-cluster: pod on node2 to the ClusterIP": served(
                Probe("ns1/client-b", ip_cluster, 80, count=COUNT), only),
        }

    check_all(cluster, fb_cluster(web1) | {
        "fb-itp: pod on node1": served(Probe("ns1/client-a", ip_itp, 80, count=COUNT), web1),
        "fb-itp: pod on node2 (no usable local endpoint)": dropped(
            Probe("ns1/client-b", ip_itp, 80, **SILENT)),
        "fb-etp: outside client through node1": served(
            Probe(EXTERNAL, node1, np_etp, count=COUNT), web1),
        "fb-etp: outside client through node2 (no local endpoint)": dropped(
            Probe(EXTERNAL, node2, np_etp, **SILENT)),
        "fb-etp: pod on node1 through node1": served(
            Probe("ns1/client-a", node1, np_etp, count=COUNT), web1),
        "fb-etp: pod on node2 through node1": served(
            Probe("ns1/client-b", node1, np_etp, count=COUNT), web1),
        "fb-etp-ready: outside client through node1": dropped(
            Probe(EXTERNAL, node1, np_ready, **SILENT)),
        "fb-etp-ready: outside client through node2": served(
            Probe(EXTERNAL, node2, np_ready, count=COUNT), web2),
    })
    # A ready endpoint appears: the serving terminating one gets no new connection.
    cluster.apply(services, slices(e("ns1/web-3")))
    check_all(cluster, fb_cluster({"ns1/web-3"}))
