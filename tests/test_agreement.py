"""Run-to-run agreement from synthetic bench rows: rankings per pass, growth per pass and
under a bootstrap over passes, same-moment floors, every input shape the runner has."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from reports.agreement import agreement
from reports.results import write_bench_csv

SIZES = (1, 10, 100, 1000, 10000)


def latency_rows(mode, base, slope=0.0, passes=3, sizes=SIZES, drift=(), noise=3.0, seed=0,
                 floor=None):
    """p50 rows of the last Service per pass and size; `drift[r]` multiplies pass r, and
    `floor` (a number) adds a same-moment floor row that drifts alike."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(passes):
        scale = drift[r] if r < len(drift) else 1.0
        for n in sizes:
            value = (base + slope * n) * scale + rng.normal(0, noise)
            rows.append(dict(mode=mode, kernel="6.18.0", n_services=n, metric="conn_latency_us",
                             target="last", stat="p50", value=round(value, 1), unit="us",
                             repeat=r, when=""))
            if floor is not None:
                rows.append(dict(mode=mode, kernel="6.18.0", n_services=n,
                                 metric="floor_same_moment_us", target="198.18.130.2", stat="p50",
                                 value=round(floor * scale + rng.normal(0, noise), 1), unit="us",
                                 repeat=r, when=""))
    return rows


def by_size(result):
    return {(r["kernel"], r["n_services"]): r for r in result["ranking"]}


def by_mode(result):
    return {g["mode"]: g for g in result["growth"]}


def test_a_ranking_every_pass_shares_is_the_same_and_a_swapped_pass_is_named():
    rows = (latency_rows("iptables", 440, slope=0.047, seed=1) + latency_rows("nftables", 450, seed=2)
            + latency_rows("ebpf", 400, seed=3))
    # pass 2 at 10 Services: nftables measured on a fast moment, ahead of ebpf
    for row in rows:
        if row["mode"] == "nftables" and row["repeat"] == 2 and row["n_services"] == 10:
            row["value"] = 380.0
    result = agreement(rows)
    assert result["series"] == "conn_latency_us:last" and result["stat"] == "p50"
    sizes = by_size(result)
    assert sizes[("6.18.0", 10000)]["same"] is True
    assert sizes[("6.18.0", 10000)]["order"] == ["ebpf", "nftables", "iptables"]
    assert sizes[("6.18.0", 10000)]["disagreeing"] == []
    ten = sizes[("6.18.0", 10)]
    assert ten["same"] is False and ten["basis"] == "latency"
    assert [d["repeat"] for d in ten["disagreeing"]] == [2]
    assert ten["order"] == ["ebpf", "iptables", "nftables"]
    assert ten["disagreeing"][0]["swapped"] == [["ebpf", "nftables"], ["iptables", "nftables"]]
    assert ten["passes"] == [0, 1, 2]


def test_growth_per_pass_and_bootstrap_over_passes():
    # (one noise draw in twenty fits a flat series as growing or falling: seed 6 does not)
    rows = latency_rows("iptables", 440, slope=0.047, seed=4) + latency_rows("nftables", 440, seed=6)
    result = agreement(rows, resamples=60, seed=1)
    ipt, nft = by_mode(result)["iptables"], by_mode(result)["nftables"]
    assert [p["verdict"] for p in ipt["per_pass"]] == ["grows"] * 3
    assert all(0.85 < p["k"] < 1.15 for p in ipt["per_pass"])
    assert ipt["resamples"] == 60 and ipt["verdicts"] == {"grows": 60}
    assert 4 <= ipt["sets"] <= 7  # three passes have seven non-empty subsets
    k = ipt["k"]
    assert k["low"] <= k["median"] <= k["high"] and 0.85 < k["median"] < 1.15 and k["of"] == 60
    assert [p["verdict"] for p in nft["per_pass"]] == ["flat"] * 3
    assert all(p["k"] is None for p in nft["per_pass"])
    assert nft["verdicts"] == {"flat": 60} and nft["k"] is None
    assert ipt["sizes"] == list(SIZES)
    # the same seed gives the same figures
    assert agreement(rows, resamples=60, seed=1) == result


def test_a_cost_below_its_same_moment_floor_does_not_grow():
    # The latency rises with N but stays under the floor measured beside it: no growth.
    rows = latency_rows("nftables", 350, slope=0.005, seed=6, floor=430.0)
    per_pass = by_mode(agreement(rows, resamples=20))["nftables"]["per_pass"]
    assert [p["verdict"] for p in per_pass] == ["flat"] * 3
    # and the same series above its floor grows
    rows = latency_rows("nftables", 450, slope=0.005, seed=6, floor=430.0, noise=1.0)
    per_pass = by_mode(agreement(rows, resamples=20))["nftables"]["per_pass"]
    assert [p["verdict"] for p in per_pass] == ["grows"] * 3


def test_same_moment_floors_rank_by_what_the_services_add():
    # Each mode ran its passes at other moments: nftables' second pass on a slow machine
    # (+30 %). Raw latency ranks it behind iptables there; over the floor of the same moments
    # it stays ahead at every size.
    rows = (latency_rows("iptables", 440, slope=0.01, seed=7, floor=420.0, noise=0.5)
            + latency_rows("nftables", 430, seed=8, floor=420.0, drift=(1.0, 1.3, 1.0), noise=0.5))
    result = agreement(rows, resamples=10)
    for r in result["ranking"]:
        assert r["basis"] == "added over the same-moment floor"
        assert r["same"] is True and r["order"] == ["nftables", "iptables"], r
    # without the floor rows, the slow pass reorders the small sizes
    plain = [r for r in rows if not r["metric"].startswith("floor_")]
    small = by_size(agreement(plain, resamples=10))[("6.18.0", 1)]
    assert small["basis"] == "latency" and small["same"] is False
    assert small["disagreeing"][0]["repeat"] == 1


def test_one_pass_says_nothing_can_be_compared_and_stays_json():
    rows = (latency_rows("ipvs", 900, passes=1, sizes=(1, 1000, 10000))
            + latency_rows("iptables", 900, slope=0.08, passes=1, sizes=(1, 1000, 10000)))
    result = agreement(rows)
    assert all(r["same"] is None for r in result["ranking"])
    for g in result["growth"]:
        # three points cannot hold a three-parameter fit with an interval
        assert g["per_pass"] == [{"repeat": 0, "verdict": None, "k": None}]
        assert g["resamples"] == 0 and g["sets"] == 0 and g["verdicts"] == {} and g["k"] is None
    json.dumps(result, allow_nan=False)  # no NaN or Infinity reaches run.json


def test_sizes_where_a_mode_is_missing_rank_only_the_modes_every_pass_measured():
    rows = latency_rows("iptables", 440, seed=9) + latency_rows("nftables", 450, seed=10)
    rows += latency_rows("ebpf", 400, passes=2, sizes=(1, 10), seed=11)
    rows = [r for r in rows if not (r["mode"] == "nftables" and r["n_services"] == 10000)]
    sizes = by_size(agreement(rows, resamples=10))
    assert sizes[("6.18.0", 1)]["order"] == ["iptables", "nftables"]  # ebpf missed pass 2
    assert ("6.18.0", 10000) not in sizes  # one mode: nothing to rank


def test_bench_csv_frames_and_runner_rows_give_the_same_figures(tmp_path):
    rows = latency_rows("iptables", 440, slope=0.047, seed=12) + latency_rows("nftables", 440, seed=13)
    write_bench_csv(tmp_path, rows)
    from_csv = agreement(pd.read_csv(tmp_path / "bench.csv"), resamples=30)
    # Row.as_dict(): the target lives in `extra`
    runner_rows = [{**{k: v for k, v in r.items() if k not in ("target", "when")},
                    "extra": {"target": r["target"]}} for r in rows]
    assert agreement(runner_rows, resamples=30) == from_csv
    assert agreement(rows, resamples=30) == from_csv
    assert agreement([]) == {"series": None, "stat": "p50", "ranking": [], "growth": []}
