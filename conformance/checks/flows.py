"""Expected outcomes for many probes at once: who must answer, what they must see, or silence.

Used by the checks of issue 14's traffic set (28-35): each check names its probes in a dict,
runs them all in parallel with one `cluster.probes` call and reports every miss by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from clusters.workloads.probe import OK, TIMEOUT
from conformance.expect import backends_miss
from conformance.harness import Probe, backends, describe, outcomes


@dataclass(frozen=True)
class Expect:
    """One probe and what it must show.

    `backends`: every sample answered, by exactly these pods (each of them at least once;
    under an algorithm that does not spread one client, what it promises: expect.py);
    None: every sample dropped (timed out: no answer, no refusal). `seen`: the client
    address every answering backend saw (without the port), when given.
    """

    probe: Probe
    backends: frozenset[str] | None
    seen: str | None = None


def served(probe: Probe, pods: Iterable[str], seen: str | None = None) -> Expect:
    return Expect(probe, frozenset(pods), seen)


def dropped(probe: Probe) -> Expect:
    return Expect(probe, None)


def seen_ips(result) -> set[str]:
    return {s.seen_client.rsplit(":", 1)[0] for s in result.samples if s.outcome == OK}


def check_all(cluster, cases: dict[str, Expect]) -> None:
    """Run every probe at once; one assertion message listing each case that missed."""
    results = cluster.probes(*(e.probe for e in cases.values()))
    misses = []
    for (what, want), result in zip(cases.items(), results, strict=True):
        req = want.probe
        if want.backends is None:
            if outcomes(result) != {TIMEOUT: req.count}:
                misses.append(f"{what} must be dropped: {describe(result)}")
            continue
        if outcomes(result) != {OK: req.count}:
            misses.append(f"{what}: {describe(result)}")
        elif miss := backends_miss(cluster.dataplane, backends(result), want.backends):
            misses.append(f"{what} {miss}: {describe(result)}")
        elif want.seen is not None and seen_ips(result) != {want.seen}:
            misses.append(f"{what}: the backend saw {sorted(seen_ips(result))}, "
                          f"expected {want.seen}")
    assert not misses, "; ".join(misses)
