"""conformance/expect.py: what one client's connections must reach, by balancing algorithm."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conformance.expect import (
    PINNED,
    SOME,
    SPREAD,
    backends_miss,
    not_spread_reason,
    one_client_spread,
    spreads_one_client,
)
from dataplanes.ipvs_layout import SCHEDULERS

EVERY = ("ns1/web-1", "ns1/web-2", "ns1/web-3")


def mode(name: str, balancing: str | None) -> SimpleNamespace:
    return SimpleNamespace(name=name, balancing=balancing)


@pytest.mark.parametrize("name,balancing", [("iptables", "random"), ("nftables", "random"),
                                            ("ebpf", "random"), ("userspace", "rr"),
                                            ("userspace", "random"), ("ipvs", "rr"),
                                            ("ipvs", "wrr"), ("ipvs", None)])
def test_default_algorithms_need_exactly_every_eligible_backend(name, balancing):
    dp = mode(name, balancing)
    assert spreads_one_client(dp)
    assert backends_miss(dp, EVERY, EVERY) is None
    assert backends_miss(dp, EVERY[:2], EVERY) == f"must reach exactly {list(EVERY)}"
    assert backends_miss(dp, EVERY, EVERY[:2]) is not None


def test_every_ipvs_scheduler_has_a_promise():
    kinds = {s: one_client_spread(mode("ipvs", s)) for s in SCHEDULERS}
    assert {s for s, k in kinds.items() if k == SPREAD} == {"rr", "wrr"}
    assert {s for s, k in kinds.items() if k == SOME} == {"lc", "wlc", "sed", "nq", "twos", "ovf",
                                                              "lblc", "lblcr"}
    assert {s for s, k in kinds.items() if k == PINNED} == {"sh", "mh", "dh", "fo"}


def test_pinned_needs_one_eligible_backend():
    dp = mode("ipvs", "sh")
    assert backends_miss(dp, ["ns1/web-2"], EVERY) is None
    assert "one of" in backends_miss(dp, EVERY[:2], EVERY)
    assert backends_miss(dp, ["ns1/web-1"], EVERY[1:]) is not None  # not eligible
    assert backends_miss(dp, [], EVERY) is not None
    assert backends_miss(dp, ["ns1/web-1"], ["ns1/web-1"]) is None
    assert "ipvs:sh pins a client to one backend; this check needs" in not_spread_reason(dp)


def test_least_connection_needs_only_eligible_backends():
    dp = mode("ipvs", "lc")
    assert backends_miss(dp, ["ns1/web-3"], EVERY) is None
    assert backends_miss(dp, EVERY, EVERY) is None
    assert backends_miss(dp, EVERY, EVERY[:2]) is not None
    assert backends_miss(dp, [], EVERY) is not None
    assert not_spread_reason(dp).startswith("ipvs:lc ")
