"""Broken on purpose, the iptables data plane fails the traffic checks (29-31) that guard
what it broke, and passes those that do not depend on it."""

from __future__ import annotations

import os

import pytest

from conformance.runner import run_conformance
from dataplanes.iptables import IptablesDataplane

pytestmark = pytest.mark.root


class NoUdpCleanup(IptablesDataplane):
    """iptables mode that never clears stale UDP conntrack entries."""

    def _clear_stale_udp(self, node, old, new) -> int:
        return 0


class NoReject(IptablesDataplane):
    """iptables mode without its REJECT rules: packets to a Service without endpoints are
    routed on untranslated, and their conntrack entries are confirmed without a DNAT."""

    def _restore(self, node, payload: str) -> None:
        kept = [line for line in payload.splitlines() if "-j REJECT" not in line]
        super()._restore(node, "\n".join(kept) + "\n")


class NoRejectNoUdpCleanup(NoReject, NoUdpCleanup):
    pass


class NoMasquerade(IptablesDataplane):
    def _restore(self, node, payload: str) -> None:
        kept = [line for line in payload.splitlines() if "-j MASQUERADE" not in line]
        super()._restore(node, "\n".join(kept) + "\n")


def _outcomes(tmp_path, factory, checks: list[str]) -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    data = run_conformance("iptables", keyword=" or ".join(checks), out_dir=str(tmp_path),
                           dataplane_factory=factory, progress=lambda _line: None)
    return {c["name"]: c["outcome"] for c in data["checks"]}


def test_without_udp_cleanup_flows_stay_on_the_removed_backend(tmp_path):
    assert _outcomes(tmp_path, NoUdpCleanup, ["udp_conntrack_backend_replaced"]) == {
        "udp_conntrack_backend_replaced": "failed"}


def test_entries_recorded_while_nothing_was_ready_must_be_cleared(tmp_path):
    # Without REJECT the untranslated flows are confirmed: only the cleanup at the
    # not-ready-to-ready change lets them reach the endpoint.
    check = ["udp_unready_endpoint_becomes_ready"]
    assert _outcomes(tmp_path / "cleanup", NoReject, check) == {check[0]: "passed"}
    assert _outcomes(tmp_path / "none", NoRejectNoUdpCleanup, check) == {check[0]: "failed"}


def test_without_masquerade_the_source_ip_check_fails(tmp_path):
    assert _outcomes(tmp_path, NoMasquerade, ["source_ip_per_policy"]) == {
        "source_ip_per_policy": "failed"}
