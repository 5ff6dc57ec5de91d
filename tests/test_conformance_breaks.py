"""Broken on purpose, the iptables data plane fails exactly the checks that guard what it broke.

Each subclass filters its own iptables-restore payloads, so the kernel never sees the
dropped rules; everything else stays kube-proxy's layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from conformance.runner import exit_status, run_conformance
from dataplanes.iptables import IptablesDataplane

pytestmark = pytest.mark.root


class WithoutRules(IptablesDataplane):
    """iptables mode minus every restore line jumping to `dropped_target`."""

    dropped_target = ""

    def _restore(self, node, payload: str) -> None:
        kept = [line for line in payload.splitlines() if f"-j {self.dropped_target}" not in line]
        super()._restore(node, "\n".join(kept) + "\n")


class NoMasquerade(WithoutRules):
    dropped_target = "MASQUERADE"


class NoReject(WithoutRules):
    dropped_target = "REJECT"


class NoRejectDeclared(NoReject):
    deviations = {"no_endpoints_refused_fast": "drops packets for Services without endpoints"}


class NoInvalidDrop(IptablesDataplane):
    """iptables mode without KUBE-FORWARD's drop of packets conntrack finds INVALID."""

    def _restore(self, node, payload: str) -> None:
        kept = [line for line in payload.splitlines() if "--ctstate INVALID" not in line]
        super()._restore(node, "\n".join(kept) + "\n")


def _run(tmp_path, factory, checks: list[str]) -> dict[str, tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    # "test_" + name: pytest -k matches substrings, and some names are inside others.
    keyword = " or ".join(f"test_{name}" for name in checks)
    data = run_conformance("iptables", keyword=keyword, out_dir=str(tmp_path),
                           dataplane_factory=factory, progress=lambda _line: None)
    return {c["name"]: (c["outcome"], c["reason"]) for c in data["checks"]}


def _outcomes(results: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {name: outcome for name, (outcome, _) in results.items()}


def test_without_masquerade_cross_node_and_hairpin_checks_fail(tmp_path):
    results = _run(tmp_path, NoMasquerade, [
        "clusterip_tcp_uniform",  # pod sources reach pods directly: no SNAT needed
        "nodeport_on_every_node",  # replies from another node's pod bypass the DNAT node
        "external_traffic_policy_cluster",
        "external_traffic_policy_local",  # Local policy never SNATs: unaffected
        "hairpin_pod_reaches_itself",  # a pod answering itself replies over its loopback
        "no_endpoints_refused_fast",
    ])
    assert _outcomes(results) == {
        "clusterip_tcp_uniform": "passed",
        "nodeport_on_every_node": "failed",
        "external_traffic_policy_cluster": "failed",
        "external_traffic_policy_local": "passed",
        "hairpin_pod_reaches_itself": "failed",
        "no_endpoints_refused_fast": "passed",
    }, results


def test_without_reject_services_without_endpoints_time_out(tmp_path):
    results = _run(tmp_path, NoReject, [
        "no_endpoints_refused_fast",
        "clusterip_tcp_uniform",
        "deleted_service_stops_serving",
    ])
    assert _outcomes(results) == {
        "no_endpoints_refused_fast": "failed",
        "clusterip_tcp_uniform": "passed",
        "deleted_service_stops_serving": "passed",
    }, results
    assert "must be refused" in results["no_endpoints_refused_fast"][1]


def test_a_declared_deviation_is_recorded_not_passed(tmp_path):
    results = _run(tmp_path, NoRejectDeclared, ["no_endpoints_refused_fast"])
    assert results == {
        "no_endpoints_refused_fast": (
            "deviation", "drops packets for Services without endpoints",
        ),
    }


class HealthCountsServing(IptablesDataplane):
    """Reports every endpoint the node still sends to, terminating ones included, as healthy:
    what kube-proxy's LocalReadyEndpoints refuses to do."""

    def sync(self, node, view, full: bool = False):
        services = tuple(
            replace(sp, health_check_local_endpoints=len({e.ip for e in sp.local_endpoints}))
            if sp.health_check_node_port else sp
            for sp in view.services
        )
        return super().sync(node, replace(view, services=services), full)


def test_a_health_check_counting_terminating_endpoints_fails(tmp_path):
    results = _run(tmp_path, HealthCountsServing, ["health_check_node_port"])
    outcome, reason = results["health_check_node_port"]
    assert outcome == "failed", results
    assert reason.startswith("node2's endpoints all terminating: node2 answered 200"), reason


class StaleDeviation(IptablesDataplane):
    """Rejects as it should, yet still declares that it drops."""

    deviations = NoRejectDeclared.deviations


def test_a_declared_deviation_that_no_longer_holds_fails(tmp_path):
    results = _run(tmp_path, StaleDeviation, ["no_endpoints_refused_fast"])
    outcome, reason = results["no_endpoints_refused_fast"]
    assert outcome == "failed", results
    assert reason == ("the check passed: the declared deviation no longer holds "
                      "(drops packets for Services without endpoints)")
    data = json.loads((tmp_path / "conformance.json").read_text())
    assert exit_status(data) == 1
    assert "<failure" in (tmp_path / "junit.xml").read_text()


class Unusable(IptablesDataplane):
    def missing(self, host) -> list[str]:
        return ["kernel lacks CONFIG_EXAMPLE (the checks need it)"]


def test_a_mode_that_cannot_run_here_is_skipped_with_the_reason(tmp_path):
    # No cluster is made: the data plane's prerequisites are read first (no root needed).
    data = run_conformance("iptables", keyword="clusterip", out_dir=str(tmp_path),
                           dataplane_factory=Unusable, progress=lambda _line: None)
    assert len(data["checks"]) >= 5
    assert {(c["outcome"], c["reason"]) for c in data["checks"]} == {
        ("skipped", "mode iptables cannot run here: kernel lacks CONFIG_EXAMPLE (the checks need it)"),
    }


def test_without_the_invalid_drop_a_stray_segment_resets_the_connection(tmp_path):
    results = _run(tmp_path, NoInvalidDrop, [
        "invalid_conntrack_state_does_not_reset_connections",
        "service_ports_changed_live",
    ])
    assert _outcomes(results) == {
        "invalid_conntrack_state_does_not_reset_connections": "failed",
        "service_ports_changed_live": "passed",
    }, results
    assert "reset" in results["invalid_conntrack_state_does_not_reset_connections"][1]


class DropsSomeSyns(IptablesDataplane):
    """iptables mode plus a rule on every node dropping every third SYN to a pod's port:
    clients retransmit and are served, only the kernel's drop report tells."""

    def sync(self, node, view):
        stats = super().sync(node, view)
        rule = ["-p", "tcp", "--syn", "--dport", "8080", "-m", "statistic", "--mode", "nth",
                "--every", "3", "--packet", "0", "-j", "DROP"]
        if node.run(["iptables", "-w", "-C", "FORWARD", *rule], check=False).returncode:
            node.run(["iptables", "-w", "-I", "FORWARD", *rule])
        return stats


def test_dropped_syns_fail_the_drop_check_naming_the_reason(tmp_path):
    results = _run(tmp_path, DropsSomeSyns, ["no_unexpected_drops_while_services_serve"])
    outcome, reason = results["no_unexpected_drops_while_services_serve"]
    if outcome == "skipped":
        pytest.skip(reason)
    assert outcome == "failed", reason
    assert "packets of the Service dropped: NETFILTER_DROP" in reason and "[SYN]" in reason, reason
