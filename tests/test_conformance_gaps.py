"""Checks 65-70 fail when the iptables mode is broken in the way each guards against.

Each break is a subclass of the iptables data plane: one forgets no Service it ever
rendered, one ignores internalTrafficPolicy, one drops the hairpin masquerade rules.
A check left untouched by the break runs beside it as a control.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from conformance.runner import run_conformance
from dataplanes.iptables import IptablesDataplane

pytestmark = pytest.mark.root


class Remembers(IptablesDataplane):
    """Renders every Service port it was ever given: a deleted Service is never removed."""

    def sync(self, node, view, full=False):
        seen = self.__dict__.setdefault("seen", {}).setdefault(node.name, {})
        seen.update({(sp.name, sp.protocol, sp.port): sp for sp in view.services})
        services = tuple(sorted(seen.values(), key=lambda v: (v.name, v.protocol, v.port)))
        return super().sync(node, replace(view, services=services), full)


class ClusterWide(IptablesDataplane):
    """Ignores internalTrafficPolicy: the ClusterIP always uses the cluster-wide endpoints."""

    def sync(self, node, view, full=False):
        services = tuple(replace(sp, internal_policy_local=False) for sp in view.services)
        return super().sync(node, replace(view, services=services), full)


class NoHairpin(IptablesDataplane):
    """Without the KUBE-SEP-* rule that marks an endpoint's own traffic for masquerade."""

    def _restore(self, node, payload: str) -> None:
        kept = [line for line in payload.splitlines()
                if not (line.startswith("-A KUBE-SEP-") and "-j KUBE-MARK-MASQ" in line)]
        super()._restore(node, "\n".join(kept) + "\n")


def _run(tmp_path, factory, checks: list[str]) -> dict[str, tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    data = run_conformance("iptables", keyword=" or ".join(checks), out_dir=str(tmp_path),
                           dataplane_factory=factory, progress=lambda _line: None)
    return {c["name"]: (c["outcome"], c["reason"]) for c in data["checks"]}


@pytest.mark.parametrize("check", ["services_sharing_endpoints_one_deleted",
                                   "nodeports_released_on_delete"])
def test_a_mode_that_keeps_deleted_services_fails(tmp_path, check):
    # One check per cluster: a remembered Service would collide with the next check's.
    results = _run(tmp_path, Remembers, [check])
    outcome, reason = results[check]
    assert outcome == "failed", results
    assert "must no longer answer" in reason, reason


def test_a_mode_ignoring_internal_traffic_policy_fails_the_fallback(tmp_path):
    results = _run(tmp_path, ClusterWide, ["internal_local_falls_back_to_terminating",
                                           "endpoints_split_over_slices"])
    assert {name: outcome for name, (outcome, _) in results.items()} == {
        "internal_local_falls_back_to_terminating": "failed",
        "endpoints_split_over_slices": "passed",
    }, results
    assert "expected exactly ['ns1/web-1']" in results[
        "internal_local_falls_back_to_terminating"][1]


def test_a_mode_without_hairpin_masquerade_fails_udp_hairpin(tmp_path):
    results = _run(tmp_path, NoHairpin, ["hairpin_through_nodeport_and_udp",
                                         "host_network_client_udp_clusterip"])
    assert {name: outcome for name, (outcome, _) in results.items()} == {
        "hairpin_through_nodeport_and_udp": "failed",
        "host_network_client_udp_clusterip": "passed",
    }, results
    # NodePort traffic is masqueraded anyway; the UDP ClusterIP path needs the hairpin rule.
    assert "to UDP 198.19." in results["hairpin_through_nodeport_and_udp"][1], results
