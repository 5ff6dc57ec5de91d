"""bench/churn.py: endpoints change at a steady rate through ServiceProxy while a probe in a
pod on every node connects to the changed ClusterIPs. Every change gets the SLI's latency
(its due time to the first connection served by the new endpoint set from every node),
every failed connection is counted, and a change some node never shows is unprogrammed.

The real runs are small (tens of Services, 1.5 s of changes on a 3-node namespace cluster);
one programs a mode that drops the endpoints of some Services, so failures are certain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench.churn import Change, ChurnResult, run_churn
from reports.results import read_bench_csv, read_json

ROOT = Path(__file__).resolve().parents[1]
NODES = ["node1", "node2", "node3"]
S = 1_000_000_000  # ns


def result_with(changes: list[Change], failures: list[dict]) -> ChurnResult:
    applies = [{"start_ns": c.due_ns, "seconds": 0.01, "changes": 1, "nodes": {}} for c in changes]
    return ChurnResult("nftables", 10, 20.0, 1.0, NODES, changes, applies, failures,
                       connections=500, setup_s=0.5, started_ns=0)


def test_a_change_counts_when_every_node_showed_it_and_failures_are_counted():
    seen = [Change(0, "svc-00000", "198.19.0.1", 0, seen={n: 0.1 * S for n in NODES}),
            # the SLI is the latest node's moment: 0.4 s, though node1 saw it at 0.1 s
            Change(1, "svc-00001", "198.19.0.2", S, seen={"node1": 1.1 * S, "node2": 1.2 * S,
                                                          "node3": 1.4 * S}),
            # one node never showed it: unprogrammed, and no latency
            Change(2, "svc-00002", "198.19.0.3", 2 * S, seen={"node1": 2.1 * S, "node2": None,
                                                              "node3": 2.2 * S})]
    failures = [{"node": "node2", "ip": "198.19.0.3", "outcome": "refused", "change": 2,
                 "at_s": 2.05}] * 3
    result = result_with(seen, failures)
    assert result.latencies == pytest.approx([0.1, 0.4])
    assert result.unprogrammed == 1
    rows = {(r.metric, r.stat): r for r in result.rows("6.18")}
    assert rows[("churn_programming_latency_s", "p50")].value == pytest.approx(0.25)
    assert rows[("churn_programming_latency_s", "p99")].value == pytest.approx(0.397)
    assert rows[("churn_programming_latency_s", "failed")].value == 3
    assert rows[("churn_programming_latency_s", "failed")].unit == "connections"
    assert rows[("churn_programming_latency_s", "unprogrammed")].value == 1
    assert rows[("churn_programming_latency_s", "changes")].value == 3
    assert {r.unit for (m, _), r in rows.items() if m == "churn_apply_s"} == {"s", "changes"}
    raw = result.raw()
    assert raw["phase"] == "churn-n10" and len(raw["failures"]) == 3
    assert [c["latency_s"] for c in raw["changes"]] == pytest.approx([0.1, 0.4, None])


@pytest.mark.root
def test_a_small_churn_run_writes_its_rows_and_samples_to_the_run_folder(tmp_path):
    folder = tmp_path / "bench-x"
    folder.mkdir()
    (folder / "run.json").write_text('{"status": "complete"}')
    result = subprocess.run(
        [sys.executable, "-m", "bench.churn", "--modes", "nftables", "--services", "20",
         "--seconds", "1.5", "--out", str(folder)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_bench_csv(folder / "bench.csv")
    by = {(r["metric"], r["stat"]): r for r in rows}
    assert {r["mode"] for r in rows} == {"nftables"} and {r["n_services"] for r in rows} == {20}
    lat = [by[("churn_programming_latency_s", s)]["value"] for s in ("p50", "p90", "p99")]
    assert 0 < lat[0] <= lat[1] <= lat[2] < 5
    assert by[("churn_programming_latency_s", "changes")]["value"] == 30  # 20/s for 1.5 s
    assert by[("churn_programming_latency_s", "unprogrammed")]["value"] == 0
    assert by[("churn_programming_latency_s", "failed")]["value"] == 0
    assert by[("churn_apply_s", "p50")]["value"] > 0
    raw = read_json(folder / "raw" / "nftables" / "churn-n20.json")[0]
    # every change was seen from every node, after it was due
    assert len(raw["changes"]) == 30
    assert all(set(c["seen_s"]) == {"node1", "node2", "node3"} and
               all(v is not None and v >= 0 for v in c["seen_s"].values())
               for c in raw["changes"])
    assert raw["connections"] > 30 and raw["failures"] == []
    assert read_json(folder / "run.json")["churn"]["nftables"]["status"] == "done"


class DropsSomeEndpoints:
    """nftables, except that a Service port whose endpoints include one pod (the pool's
    last) is programmed with no endpoints: its ClusterIP rejects, and a change to an
    endpoint set holding that pod never shows."""

    def __init__(self, pod_name: str):
        from dataplanes.nftables import NftablesDataplane

        self.inner = NftablesDataplane()
        self.name = self.inner.name
        self.pod_name = pod_name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _break(self, view):
        if any(e.pod == f"bench/{self.pod_name}" for e in view.endpoints):
            return replace(view, endpoints=())
        return view

    def sync(self, node, view):
        return self.inner.sync(node, replace(view, services=tuple(
            self._break(v) for v in view.services)))

    def update(self, node, changes):
        from dataplanes.base import FullSyncNeeded

        if not callable(getattr(self.inner, "update", None)):
            raise FullSyncNeeded("nftables has no update here")
        return self.inner.update(node, replace(changes, updated={
            k: self._break(v) for k, v in changes.updated.items()}))


@pytest.mark.root
def test_failed_connections_and_unprogrammed_changes_are_counted():
    dp = DropsSomeEndpoints("backend-node3-1")
    result = run_churn("nftables", 12, 1.5, dp=dp, timeout_s=0.8)
    rows = {(r.metric, r.stat): r.value for r in result.rows(os.uname().release)}
    broken = {c.id for c in result.changes if c.latency_s(result.nodes) is None}
    # about half the changes move a Service onto the dropped pod's set: never seen
    assert broken and len(broken) < len(result.changes)
    assert rows[("churn_programming_latency_s", "unprogrammed")] == len(broken)
    # the probes' connections to those ClusterIPs were refused, and each one was counted
    assert rows[("churn_programming_latency_s", "failed")] == len(result.failures) > 0
    assert {f["outcome"] for f in result.failures} <= {"refused", "reset", "timeout"}
    vips = {c.ip for c in result.changes}
    assert all(f["ip"] in vips and f["node"] in result.nodes for f in result.failures)
    # the changes that moved Services off the dropped pod were seen from every node
    assert len(result.latencies) == len(result.changes) - len(broken) > 0
    assert json.dumps(result.raw())  # the samples are JSON as the run folder keeps them
