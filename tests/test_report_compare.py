"""`svcbench report --compare OLD NEW`: the nightly's regression gate over the tracked
metrics the catalog declares (bench/metrics.py `track=`), on small synthetic run folders."""

from __future__ import annotations

import json
import re

import pytest

from bench.metrics import catalog
from reports.catalog import Catalog
from reports.gate import IMPROVEMENT, OK, REGRESSION, WITHIN_SPREAD
from reports.gate import compare as gate_compare
from reports.load import load_run
from reports.render import main as report_main
from reports.results import write_csv, write_json
from svcbench.cli import main as cli_main
from tests.test_report import conformance_doc, synthetic_rows

SIZES = (1, 100, 10000)


def sync_one_rows(mode, values, kernel="6.18.0"):
    """One change's sync time per repeat at every size."""
    return [dict(mode=mode, kernel=kernel, n_services=n, metric="sync_one_s", stat="value",
                 value=v, unit="s", repeat=rep, target="", when="")
            for n in SIZES for rep, v in enumerate(values)]


def write_run(path, rows, conformance, kernel="6.18.0", metrics=True):
    path.mkdir(parents=True)
    write_csv(path / "bench.csv", [{**r, "kernel": kernel} for r in rows])
    metrics = catalog() if metrics is True else metrics
    write_json(path / "run.json", {"kernel": kernel, "complete": True,
                                   **({"metrics": metrics} if metrics else {})})
    for mode, failed in conformance.items():
        write_json(path / f"conformance-{mode}.json", conformance_doc(mode, failed))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """old; `steady` (another night like it, on a newer kernel); `worse` (regressed)."""
    base = tmp_path_factory.mktemp("compare")
    old = write_run(base / "old", synthetic_rows(sizes=SIZES, seed=1)
                    + sync_one_rows("iptables", (0.010, 0.011, 0.030))
                    + sync_one_rows("nftables", (0.0010, 0.0011, 0.0012)),
                    {"iptables": (), "nftables": ()})
    # +55 % on iptables' one change, but inside the 10-30 ms the old run measured: spread
    steady = write_run(base / "steady", synthetic_rows(sizes=SIZES, seed=2)
                       + sync_one_rows("iptables", (0.017, 0.017, 0.018))
                       + sync_one_rows("nftables", (0.0010, 0.0012, 0.0011)),
                       {"iptables": (), "nftables": ()}, kernel="6.19.0")
    worse_rows = [{**r, "value": r["value"] * 1.2} if r["metric"] == "sync_full_s" else r
                  for r in synthetic_rows(sizes=SIZES, seed=3, slope=0.094)]
    worse = write_run(base / "worse", worse_rows
                      + sync_one_rows("iptables", (0.004, 0.004, 0.005))
                      + sync_one_rows("nftables", (0.0024, 0.0025, 0.0026)),
                      {"iptables": (), "nftables": ("session_affinity_switch",)})
    return old, steady, worse


def verdicts(gate):
    return {(r.metric, r.mode): r for r in gate.rows}


def test_the_catalog_declares_the_tracked_metrics_with_thresholds():
    tracked = {(m.name, t.stat, t.target): t for m, t in Catalog(catalog()).tracked()}
    assert {k[0] for k in tracked} == {"conn_latency_us", "sync_one_s", "sync_full_s"}
    assert tracked[("sync_one_s", "value", "")].threshold == 0.5
    assert tracked[("sync_full_s", "value", "")].size == 10000
    assert tracked[("conn_latency_us", "p50", "last")].threshold == 0.3


def test_a_night_like_the_last_passes_and_a_change_within_the_spread_is_not_one(runs):
    old, steady, _ = runs
    gate = gate_compare(load_run(steady), load_run(old))
    rows = verdicts(gate)
    assert not gate.regressions, [r.as_dict() for r in gate.regressions]
    one = rows[("sync_one_s", "iptables")]
    assert one.change > 0.5 and one.verdict == WITHIN_SPREAD and one.n == 10000
    # the runner's kernel moved: the one kernel of each run is paired, and the row says so
    assert "kernel 6.18.0 before" in one.note and one.kernel == "6.19.0"
    assert rows[("conn_latency_us:last", "iptables")].verdict == OK
    assert rows[("conformance", "nftables")].verdict == OK
    assert rows[("conformance", "nftables")].new_median == 3


def test_a_regressed_night_names_each_regression_and_nothing_else(runs):
    old, _, worse = runs
    gate = gate_compare(load_run(worse), load_run(old))
    rows = verdicts(gate)
    assert {(r.metric, r.mode) for r in gate.regressions} == {
        ("conn_latency_us:last", "iptables"),  # +50 % at 10,000 (threshold 30 %)
        ("sync_one_s", "nftables"),  # +127 % (threshold 50 %)
        ("conformance", "nftables"),  # a check that passed fails now
    }
    full = rows[("sync_full_s", "iptables")]  # +20 %, under its 30 %
    assert full.verdict == OK and full.n == 10000 and 0.15 < full.change < 0.25
    assert rows[("sync_one_s", "iptables")].verdict == IMPROVEMENT
    assert rows[("conformance", "nftables")].lost == ["session_affinity_switch"]


def test_the_command_exits_1_on_a_regression_with_a_table_and_json(runs, capsys, tmp_path):
    old, steady, worse = runs
    assert cli_main(["report", "--compare", str(old), str(steady)]) == 0
    out = capsys.readouterr().out
    assert "no tracked regression" in out and out.strip().endswith("report.html")
    assert cli_main(["report", "--compare", str(old), str(worse), "-o",
                     str(tmp_path / "r.html")]) == 1
    out = capsys.readouterr().out
    assert re.search(r"New connection to the last Service \(p50\)\s+iptables\s+10,000\s+.*"
                     r"regression", out), out
    assert "3 tracked regressions" in out
    assert cli_main(["report", "--compare", str(old), str(worse), "--json", "-o",
                     str(tmp_path / "r.html")]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["report"] == str(tmp_path / "r.html") and doc["compare"]["regressions"] == 3
    row = next(r for r in doc["compare"]["rows"]
               if r["metric"] == "sync_one_s" and r["mode"] == "nftables")
    assert row["verdict"] == REGRESSION and row["old_median"] == 0.0011
    assert row["new_median"] == 0.0025 and row["threshold"] == 0.5
    # the page gets the section, its regressions marked
    page = (tmp_path / "r.html").read_text()
    section = page.split("id='tracked'")[1].split("</section>")[0]
    assert section.count("<tr class='regress'>") == 3 and "3 tracked regressions" in section
    assert page.index("id='tracked'") < page.index("id='compare'")


def test_a_bad_folder_or_nothing_in_common_exits_2_in_one_sentence(runs, capsys, tmp_path):
    old, _, _ = runs
    assert cli_main(["report", "--compare", str(tmp_path / "missing"), str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    # a run.json from before the catalog had `track`, no conformance: the command falls back
    # on this version's catalog; the report module alone has nothing tracked to compare
    rows = synthetic_rows(modes=("iptables",), sizes=SIZES)
    a = write_run(tmp_path / "a", rows, {}, metrics=False)
    b = write_run(tmp_path / "b", rows, {}, metrics=False)
    assert report_main([str(b), "--compare", str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to compare" in err[0]
    assert cli_main(["report", "--compare", str(a), str(b)]) == 0
    assert "no tracked regression (2 compared)" in capsys.readouterr().out
    # a catalog written before `track` existed describes the metrics, but declares no gate
    untracked = [{k: v for k, v in m.items() if k != "track"} for m in catalog()]
    c = write_run(tmp_path / "c", rows, {}, metrics=untracked)
    assert cli_main(["report", "--compare", str(c), str(b)]) == 0
    assert "no tracked regression (2 compared)" in capsys.readouterr().out


def test_a_new_connection_is_judged_over_the_floor_of_the_same_passes(tmp_path):
    """A machine that is slower tonight moves the floor too: no regression; the Services'
    own cost growing is one."""
    def latency_rows(conn, floor):
        return [dict(mode="iptables", kernel="6.18.0", n_services=n, metric=metric, stat="p50",
                     value=value * (1 + 0.01 * rep), unit="us", repeat=rep, target=target,
                     when="")
                for n in SIZES for rep in range(3)
                for metric, target, value in (("conn_latency_us", "last", conn),
                                              ("floor_conn_latency_us", "floor", floor))]

    old = write_run(tmp_path / "old", latency_rows(900, 400), {})
    slower = write_run(tmp_path / "slower", latency_rows(1350, 600), {})
    worse = write_run(tmp_path / "worse", latency_rows(1350, 400), {})
    row = verdicts(gate_compare(load_run(slower), load_run(old)))[("conn_latency_us:last",
                                                                   "iptables")]
    assert row.change == pytest.approx(0.5) and abs(row.over_floor_change) < 1e-9
    assert row.verdict == OK and "judged over the floor of the same passes" in row.note
    row = verdicts(gate_compare(load_run(worse), load_run(old)))[("conn_latency_us:last",
                                                                  "iptables")]
    assert row.over_floor_change == pytest.approx(0.5) and row.verdict == REGRESSION
