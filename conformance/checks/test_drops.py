"""No packet of a healthy Service is dropped: the kernel's own drop reports, watched while
traffic runs."""

from __future__ import annotations

import pytest

from bpf.dropmon import DropMonitor, DropMonitorUnavailable, kernel_problem, netns_inode
from bpf.setup import bcc_missing
from clusters.workloads.probe import OK
from conformance.harness import EXTERNAL, HTTP_PORT, Probe, describe, outcomes, web_service
from kube.lookup import ServiceIndex
from kube.model import TCP, UDP, ServicePort

COUNT = 12
SOURCES = (EXTERNAL, "ns1/client-a", "ns1/client-b", "node/node1", "node/node2")


@pytest.mark.check(71)
def test_no_unexpected_drops_while_services_serve(cluster):
    """While a Service with endpoints on both nodes serves every kind of client (the outside
    client through both nodes' NodePorts; pods on both nodes and both nodes' host network
    through the ClusterIP and the NodePorts; TCP and UDP), the kernel drops none of its
    packets anywhere in the cluster: an `skb:kfree_skb` monitor (svcbench monitor --type
    drop) on every namespace of the run reports no drop whose addresses belong to the
    Service, to its frontends or its endpoints, in either direction.

    Upstream: none; Cilium's connectivity test runs the same assertion after its traffic
    ("no unexpected packet drops", cilium-cli connectivity tests). Drops a view asks for
    (Local policies, no endpoints, source ranges) are the other checks' business.
    """
    problem = kernel_problem()  # first: headers would not help a kernel without tracepoints
    if problem:
        pytest.skip(f"the drop monitor cannot run on this kernel: {problem}")
    missing = bcc_missing()
    if missing:
        pytest.skip("bcc cannot compile the drop monitor here: " + "; ".join(missing))
    ports = (ServicePort(80, TCP, "tcp", HTTP_PORT), ServicePort(80, UDP, "udp", HTTP_PORT))
    cluster.apply([web_service("nodrop", *ports, type="NodePort")])
    ip = cluster.cluster_ip("nodrop")
    inodes = [netns_inode(f"/run/netns/{name}") for name in cluster.cluster.namespaces]
    try:
        monitor = DropMonitor(inodes, max_seconds=300)
    except DropMonitorUnavailable as exc:
        pytest.skip(str(exc))
    probes = []
    for proto in (TCP, UDP):
        node_port = cluster.node_port("nodrop", 80, proto)
        for source in SOURCES:
            probes += [Probe(source, cluster.node_ip(node), node_port, proto, count=COUNT)
                       for node in ("node1", "node2")]
            if source != EXTERNAL:
                probes.append(Probe(source, ip, 80, proto, count=COUNT))
    with monitor:
        results = cluster.probes(*probes)
        drops = monitor.drops(settle_s=0.5)
    unserved = [describe(r) for r in results if outcomes(r) != {OK: COUNT}]
    indexes = []
    for node in cluster.nodes:
        view = cluster.proxy.tracker.node_view(node.name)
        service = [sp for sp in view.services if sp.service == "nodrop"]
        indexes.append(ServiceIndex(service, view.node_ips, view.cluster_cidr))
    ours = [d for d in drops
            if any(ix.lookup(d.protocol, d.src, d.sport, d.dst, d.dport) for ix in indexes)]
    assert not ours, f"{len(ours)} packets of the Service dropped: " + "; ".join(
        f"{d.reason} at {d.location}: {d.protocol} {d.src}:{d.sport} -> {d.dst}:{d.dport}"
        f"{' [' + d.tcp_flags + ']' if d.tcp_flags else ''}" for d in ours[:8]) + (
        f"; and {len(unserved)} probes not served" if unserved else "")
    assert not unserved, (f"not every connection was served (the monitor saw {len(drops)} "
                          "drops, none of the Service's): " + "; ".join(unserved))
