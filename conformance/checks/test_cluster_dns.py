"""Cluster DNS, served by a pod behind the kube-dns Service at the plan's DNS address."""

from __future__ import annotations

import dns.rcode
import dns.rdatatype
import pytest

from clusters.workloads.probe import OK
from conformance.harness import EXTERNAL, HTTP_PORT, Probe, describe, outcomes, web_service
from kube.model import HEADLESS, TCP, TYPE_EXTERNAL_NAME, Service, ServicePort


def _addresses(response) -> set[str]:
    return {r.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A
            for r in rrset}


@pytest.mark.check(25)
def test_cluster_dns_resolves_services(cluster):
    """The cluster DNS behind its ClusterIP answers a Service's ClusterIP, a headless Service's
    ready pods and NXDOMAIN for an unknown name, over UDP and TCP from pods on both nodes.

    Stands for dns.go "DNS should provide DNS for services [Conformance]" (test/e2e/network,
    outside the seven files docs/CONFORMANCE.md counts): what the proxy adds is the DNS
    Service's ClusterIP, over both protocols.
    """
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


def _cnames(response) -> list[str]:
    return [r.target.to_text() for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.CNAME for r in rrset]


@pytest.mark.check(61)
def test_external_name_service(cluster):
    """An ExternalName Service is a DNS alias: its name answers a CNAME to spec.externalName
    (followed to the target's A record when the target is a cluster name, as CoreDNS does),
    and nothing is proxied. Turning a ClusterIP or NodePort Service into ExternalName releases
    its ClusterIP and NodePort, which stop serving, and its name turns into the alias; turning
    it back gives it a ClusterIP again, an A record and traffic.

    Upstream: dns.go "should provide DNS for ExternalName services"; service.go "should be able
    to change the type from ClusterIP to ExternalName", "should be able to change the type from
    NodePort to ExternalName", "should be able to change the type from ExternalName to
    ClusterIP" (only partly "... from ExternalName to NodePort": the Service turned back here
    becomes a ClusterIP one, never a NodePort one).
    """
    outside = Service("ns1", "db", (), type=TYPE_EXTERNAL_NAME, external_name="db.example.com")
    # web exists throughout, so the addresses the aliases release stay unallocated.
    cluster.apply([web_service("web"), web_service("alias"),
                   web_service("alias-np", type="NodePort"), outside])
    old_ip, old_np = cluster.cluster_ip("alias"), cluster.node_port("alias-np")
    np_ip = cluster.cluster_ip("alias-np")
    served = cluster.probes(Probe("ns1/client-a", old_ip, 80, count=10),
                            Probe(EXTERNAL, cluster.node_ip("node2"), old_np, count=10))
    assert all(outcomes(r) == {OK: 10} for r in served), [describe(r) for r in served]
    for tcp in (False, True):
        for rdtype in ("CNAME", "A"):
            db = cluster.resolve("ns1/client-b", "db.ns1.svc.cluster.local", rdtype=rdtype,
                                 tcp=tcp)
            assert db.rcode() == dns.rcode.NOERROR and _cnames(db) == ["db.example.com."], (
                f"db.ns1.svc.cluster.local {rdtype} over {'TCP' if tcp else 'UDP'}: "
                f"{dns.rcode.to_text(db.rcode())} {db.answer}, expected CNAME db.example.com."
            )
            assert _addresses(db) == set(), f"an outside alias has no A record here: {db.answer}"

    # ClusterIP -> ExternalName and NodePort -> ExternalName (an alias of a cluster name).
    target = "web.ns1.svc.cluster.local"
    aliases = [Service("ns1", name, (), type=TYPE_EXTERNAL_NAME, external_name=target)
               for name in ("alias", "alias-np")]
    cluster.apply([web_service("web"), *aliases, outside])
    assert cluster.service("alias").cluster_ip is None, "the ClusterIP was not released"
    web_ip = cluster.cluster_ip("web")
    gone = cluster.probes(
        Probe("ns1/client-a", old_ip, 80, count=2, timeout=0.4, expect=None),
        Probe("ns1/client-b", np_ip, 80, count=2, timeout=0.4, expect=None),
        Probe(EXTERNAL, cluster.node_ip("node2"), old_np, count=2, timeout=0.4, expect=None),
        Probe("ns1/client-b", web_ip, 80, count=10),
    )
    for what, result in zip(("the old ClusterIP", "the NodePort Service's old ClusterIP",
                             "the old NodePort"), gone[:3], strict=True):
        assert outcomes(result)[OK] == 0, f"{what} still serves as ExternalName: {describe(result)}"
    assert outcomes(gone[3]) == {OK: 10}, f"the alias target: {describe(gone[3])}"
    for name in ("alias", "alias-np"):
        got = cluster.resolve("ns1/client-a", f"{name}.ns1.svc.cluster.local")
        assert _cnames(got) == [target + "."] and _addresses(got) == {web_ip}, (
            f"{name} as ExternalName: {got.answer}, expected CNAME {target}. and A {web_ip}"
        )

    # ExternalName -> ClusterIP: an address, an A record and traffic again.
    cluster.apply([web_service("web"), web_service("alias"), outside])
    new_ip = cluster.cluster_ip("alias")
    back = cluster.resolve("ns1/client-a", "alias.ns1.svc.cluster.local")
    assert _cnames(back) == [] and _addresses(back) == {new_ip}, (
        f"alias back to ClusterIP: {back.answer}, expected only A {new_ip}"
    )
    served = cluster.probe("ns1/client-b", new_ip, 80, count=20)
    assert outcomes(served) == {OK: 20}, f"alias back to ClusterIP: {describe(served)}"
