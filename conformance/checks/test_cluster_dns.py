"""Cluster DNS, served by a pod behind the kube-dns Service at the plan's DNS address."""

from __future__ import annotations

import dns.rcode
import pytest

from clusters.workloads.probe import OK
from conformance.harness import HTTP_PORT, describe, outcomes, web_service
from kube.model import HEADLESS, TCP, ServicePort


def _addresses(response) -> set[str]:
    return {r.address for rrset in response.answer for r in rrset}


@pytest.mark.check(25)
def test_cluster_dns_resolves_services(cluster):
    headless = web_service("web-headless", ServicePort(80, TCP, "", HTTP_PORT),
                           cluster_ip=HEADLESS, selector=None)
    ready = ["ns1/web-1", "ns1/web-2"]
    endpoints = [cluster.endpoint(k) for k in ready] + [cluster.endpoint("ns1/web-3", ready=False)]
    cluster.apply([web_service("web"), headless],
                  [cluster.endpoint_slice("web-headless", endpoints)])
    web_ip = cluster.cluster_ip("web")
    pod_ips = {cluster.pod_ip(k) for k in ready}
    for source in ("ns1/client-a", "ns1/client-b"):
        for tcp in (False, True):
            how = f"from {source} over {'TCP' if tcp else 'UDP'}"
            web = cluster.resolve(source, "web.ns1.svc.cluster.local", tcp=tcp)
            assert web.rcode() == dns.rcode.NOERROR and _addresses(web) == {web_ip}, (
                f"web.ns1.svc.cluster.local {how}: {dns.rcode.to_text(web.rcode())} "
                f"{_addresses(web)}, expected {web_ip}"
            )
            pods = cluster.resolve(source, "web-headless.ns1.svc.cluster.local", tcp=tcp)
            assert pods.rcode() == dns.rcode.NOERROR and _addresses(pods) == pod_ips, (
                f"headless {how}: {_addresses(pods)}, expected the ready pods {sorted(pod_ips)}"
            )
            unknown = cluster.resolve(source, "nothing.ns1.svc.cluster.local", tcp=tcp)
            assert unknown.rcode() == dns.rcode.NXDOMAIN, (
                f"unknown name {how}: {dns.rcode.to_text(unknown.rcode())}, expected NXDOMAIN"
            )
    served = cluster.probe("ns1/client-b", web_ip, 80, count=20)
    assert outcomes(served) == {OK: 20}, f"the resolved ClusterIP serves: {describe(served)}"
