"""Probe from several sources at once and assert, case by case, who answers.

A case is a `Probe` and what it must get:

- a set of backends ("ns/pod" or "node/<name>"): every sample ok, and exactly those answered;
- an outcome (REFUSED, TIMEOUT, ...): every sample ended that way;
- NOT_SERVED: no sample was answered, however it failed (kube-proxy's modes differ there).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from clusters.workloads.probe import OK, OUTCOMES, ProbeResult
from conformance.harness import Probe, backends, describe, outcomes
from kube.model import TCP

NOT_SERVED = "not served"
Expected = Collection[str] | str

# Probes whose answer should be silence: few samples, short timeouts, no early stop.
SILENT = {"count": 2, "timeout": 0.3, "expect": None}


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
            assert set(backends(result)) == set(want), (
                f"{where} must reach exactly {sorted(want)}: {describe(result)}"
            )
    return dict(zip(names, results, strict=True))
