"""Probe from several sources at once and assert, case by case, who answers.

A case is a `Probe` and what it must get:

- a set of backends ("ns/pod" or "node/<name>"): every sample ok, and exactly those answered;
- an outcome (REFUSED, TIMEOUT, ...): every sample ended that way;
- NOT_SERVED: no sample was answered, however it failed (kube-proxy's modes differ there).

Which backends one client's connections reach depends on the mode's balancing algorithm
(`Dataplane.balancing`), and only there: `one_client_spread` says what the algorithm
promises for connections one client makes one after another to one Service, and
`backends_miss` / `assert_backends` judge a probe's backends by it. Every check that needs
one client to reach several backends asks these, so a mode spec such as `ipvs:sh` or
`ipvs:lc` is held to what its algorithm promises and not to the default algorithms' spread.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import pytest

from clusters.workloads.probe import OK, OUTCOMES, ProbeResult
from conformance.harness import Probe, backends, describe, outcomes
from dataplanes.modes import OPTION_VALUES
from kube.model import TCP

NOT_SERVED = "not served"
Expected = Collection[str] | str

# Probes whose answer should be silence: few samples, short timeouts, no early stop.
SILENT = {"count": 2, "timeout": 0.3, "expect": None}


# What one client's connections to one Service, made one after another, reach (other
# clients may be connecting to it at the same time):
SPREAD = "spread"  # every eligible endpoint, given enough of them
PINNED = "pinned"  # one eligible endpoint, always the same
SOME = "some"  # eligible endpoints only, maybe just one
SPREADING = ("random", "rr", "wrr")  # wrr: Kubernetes endpoints all weigh 1
# A hash of the client's address (sh; mh: Maglev's table), of the Service's address (dh),
# or the first of equal weights (fo): the same endpoint every time.
PINNING = ("sh", "mh", "dh", "fo")
# By the endpoints' load: least connected (lc, wlc, sed, nq), the less loaded of two random
# (twos), the first not overloaded (ovf), the endpoint (set) the address had while it is
# not overloaded (lblc, lblcr). Short connections one after another need not move on, and
# other clients' connections at the same time may move them.
LOAD_BASED = ("lc", "wlc", "sed", "nq", "twos", "ovf", "lblc", "lblcr")

def one_client_spread(dataplane: Any) -> str:
    """SPREAD, PINNED or SOME for the mode's algorithm; SPREAD when it names none."""
    algorithm = getattr(dataplane, "balancing", None)
    if algorithm in PINNING:
        return PINNED
    if algorithm in LOAD_BASED:
        return SOME
    return SPREAD


def spreads_one_client(dataplane: Any) -> bool:
    """Whether one client's sequential connections reach every eligible endpoint."""
    return one_client_spread(dataplane) == SPREAD


def mode_label(dataplane: Any) -> str:
    """The mode as its spec names its algorithm: ipvs:sh, userspace:random, iptables."""
    algorithm = getattr(dataplane, "balancing", None)
    chosen = set(OPTION_VALUES.get(dataplane.name, {})) & {"scheduler", "balancing"}
    return f"{dataplane.name}:{algorithm}" if chosen and algorithm else dataplane.name


def not_spread_reason(dataplane: Any, needs: str = "several backends from one client") -> str:
    """Why a part that needs one client to reach several backends does not apply."""
    kind = one_client_spread(dataplane)
    if kind == PINNED:
        promise = "pins a client to one backend"
    elif kind == SOME:
        promise = ("sends each connection by the backends' load, so one client's short "
                   "connections need not reach several backends")
    else:
        promise = "spreads one client's connections"
    return f"{mode_label(dataplane)} {promise}; this check needs {needs}"


def skip_unless_spread(dataplane: Any, needs: str = "several backends from one client") -> None:
    """Skip (the rest of) a check that means nothing unless one client spreads."""
    if not spreads_one_client(dataplane):
        pytest.skip(not_spread_reason(dataplane, needs))


def backends_miss(dataplane: Any, reached: Collection[str], eligible: Collection[str]
                  ) -> str | None:
    """None when the backends one client reached are what the algorithm promises over
    `eligible`; else what was expected. SPREAD: exactly the eligible ones; PINNED: exactly
    one of them; SOME: only eligible ones."""
    got, want = set(reached), set(eligible)
    kind = one_client_spread(dataplane)
    if kind == SPREAD or len(want) <= 1:
        return None if got == want else f"must reach exactly {sorted(want)}"
    label = mode_label(dataplane)
    if kind == PINNED:
        return None if len(got) == 1 and got <= want else (
            f"must reach exactly one of {sorted(want)} ({label} pins a client)")
    return None if got and got <= want else f"must reach only {sorted(want)} ({label})"


def assert_backends(dataplane: Any, result: ProbeResult, eligible: Collection[str],
                    where: str) -> None:
    """Assert a probe's backends are what the mode's algorithm promises over `eligible`."""
    miss = backends_miss(dataplane, backends(result), eligible)
    assert miss is None, f"{where} {miss}: {describe(result)}"


def silent(source: str, ip: str, port: int, protocol: str = TCP) -> Probe:
    return Probe(source, ip, port, protocol, **SILENT)


def check_cases(cluster, cases: Mapping[str, tuple[Probe, Expected]],
                when: str = "") -> dict[str, ProbeResult]:
    """Run every case's probe at once; assert each got what it must. Results by case name."""
    names = list(cases)
    results = cluster.probes(*(cases[n][0] for n in names))
    prefix = f"{when}: " if when else ""
    for name, result in zip(names, results, strict=True):
        req, want = cases[name]
        where = f"{prefix}{name} ({req.protocol} {req.ip}:{req.port} from {req.source})"
        if want == NOT_SERVED:
            assert outcomes(result)[OK] == 0, f"{where} must not be served: {describe(result)}"
        elif isinstance(want, str):
            assert want in OUTCOMES, want
            assert outcomes(result) == {want: len(result.samples)} and result.samples, (
                f"{where} must end {want}: {describe(result)}"
            )
        else:
            assert outcomes(result) == {OK: req.count}, f"{where}: {describe(result)}"
            miss = backends_miss(cluster.dataplane, backends(result), want)
            assert miss is None, f"{where} {miss}: {describe(result)}"
    return dict(zip(names, results, strict=True))
