"""Kubernetes cluster DNS for Services (the DNS specification's A and CNAME records, IPv4).

`<service>.<namespace>.svc.<domain>` names the Service's ClusterIP; a headless Service's
name lists the addresses of its ready endpoints; an ExternalName Service's name is an alias
(CNAME) of its `spec.externalName`, as CoreDNS's kubernetes plugin answers it; a headless
Service with no ready endpoint, and every other name, does not exist. Services labelled for
another proxy still get DNS: the label picks a proxy, not a name.

The records are JSON-ready: name -> a list of IPv4 addresses (A), or name -> one target
name (CNAME, without the trailing dot).
"""

from __future__ import annotations

import ipaddress

from kube.model import TYPE_EXTERNAL_NAME
from kube.state import ClusterState

DEFAULT_DOMAIN = "cluster.local"


def service_name(service: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """The Service's fully qualified name, lower case, without the trailing dot."""
    return f"{service}.{namespace}.svc.{domain.strip('.')}".lower()


def records(state: ClusterState, domain: str = DEFAULT_DOMAIN) -> dict[str, list[str] | str]:
    """Name -> IPv4 addresses (sorted) for every Service that has one, or -> the alias
    target of an ExternalName Service."""
    ready: dict[tuple[str, str], set[str]] = {}
    for sl in state.endpoint_slices:
        ips = ready.setdefault((sl.namespace, sl.service_name), set())
        for ep in sl.endpoints:
            if ep.ready:
                ips.update(ep.addresses)
    out: dict[str, list[str] | str] = {}
    for svc in state.services:
        if svc.type == TYPE_EXTERNAL_NAME:
            if svc.external_name:
                target = svc.external_name.rstrip(".")
                out[service_name(svc.name, svc.namespace, domain)] = target
            continue
        if svc.headless:
            ips = ready.get(svc.key, set())
        elif svc.cluster_ip:
            ips = {svc.cluster_ip}
        else:
            ips = set()
        if ips:
            out[service_name(svc.name, svc.namespace, domain)] = sorted(
                ips, key=ipaddress.ip_address
            )
    return dict(sorted(out.items()))
