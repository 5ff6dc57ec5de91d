"""Growth fits: known curves come back with their exponent, flat ones are called flat."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from reports.fit import NotEnoughSizes, decide, fit_growth, fit_table

SIZES = np.repeat([1, 10, 100, 1000, 5000, 10000], 3)


def test_linear_growth_like_iptables_is_found_with_its_exponent():
    # The field notes' shape: 430 µs floor, +470 µs at 10,000 Services.
    rng = np.random.default_rng(7)
    y = 430 + 0.047 * SIZES + rng.normal(0, 10, len(SIZES))
    fit = fit_growth(SIZES, y)
    assert not fit.flat
    assert 0.9 < fit.k < 1.1
    assert fit.k_ci.contains(1.0)
    assert fit.per_1000_ci.contains(47.0)
    assert fit.a_ci.contains(430.0)
    assert fit.verdict == "grows"
    assert fit.added(10_000) == pytest.approx(470, rel=0.1)


def test_flat_mode_is_called_flat():
    rng = np.random.default_rng(3)
    y = 430 + rng.normal(0, 10, len(SIZES))
    fit = fit_growth(SIZES, y)
    assert fit.flat
    assert fit.verdict == "flat"
    assert fit.a_ci.contains(430.0)


def test_square_root_and_superlinear_exponents():
    rng = np.random.default_rng(11)
    for k_true, b_true in ((0.5, 20.0), (1.5, 0.002)):
        y = 100 + b_true * SIZES.astype(float) ** k_true + rng.normal(0, 2, len(SIZES))
        fit = fit_growth(SIZES, y)
        assert abs(fit.k - k_true) < 0.1, (k_true, fit)
        assert fit.k_ci.contains(k_true), (k_true, fit.k_ci)


def test_exact_counts_fit_exactly():
    n = np.array([0, 1, 10, 100, 1000, 10000])
    rules = 11 + 9 * n  # a rule count has no noise: the intervals collapse onto the truth
    fit = fit_growth(n, rules)
    assert fit.k == pytest.approx(1.0, abs=1e-6)
    assert fit.b == pytest.approx(9.0, rel=1e-6)
    assert fit.a == pytest.approx(11.0, abs=1e-3)
    assert fit.per_1000 == pytest.approx(9000.0, rel=1e-6)


def test_intervals_cover_the_true_exponent_about_95_percent_of_the_time():
    rng = np.random.default_rng(2024)
    hits, trials = 0, 200
    for _ in range(trials):
        y = 400 + 0.05 * SIZES + rng.normal(0, 15, len(SIZES))
        hits += fit_growth(SIZES, y).k_ci.contains(1.0)
    assert 0.88 <= hits / trials <= 0.995, hits


def test_too_few_sizes_is_refused_with_the_reason():
    with pytest.raises(NotEnoughSizes, match="needs 3 sizes"):
        fit_growth([1, 1, 10, 10], [1.0, 1.1, 2.0, 2.1])
    with pytest.raises(NotEnoughSizes):
        fit_growth([1, 10, 100], [1.0, 2.0, 3.0])  # no spare point for an interval


def test_fit_table_one_row_per_mode_and_metric_and_a_note_when_unfittable():
    rng = np.random.default_rng(5)
    rows = []
    for n in (1, 10, 100, 1000, 10000):
        for rep in range(3):
            rows.append(dict(kernel="k", mode="iptables", metric="conn_latency_us:last",
                             stat="p50", unit="us", n_services=n,
                             value=430 + 0.047 * n + rng.normal(0, 5), repeat=rep))
            rows.append(dict(kernel="k", mode="nftables", metric="conn_latency_us:last",
                             stat="p50", unit="us", n_services=n,
                             value=430 + rng.normal(0, 5), repeat=rep))
    for n in (1, 10):
        rows.append(dict(kernel="k", mode="ebpf", metric="conn_latency_us:last", stat="p50",
                         unit="us", n_services=n, value=430.0, repeat=0))
    table = fit_table(pd.DataFrame(rows)).set_index("mode")
    assert table.loc["iptables", "verdict"] == "grows"
    assert 0.9 < table.loc["iptables", "k"] < 1.1
    assert table.loc["iptables", "per_1000_low"] > 0
    assert bool(table.loc["nftables", "flat"])
    assert table.loc["nftables", "verdict"] == "flat"
    assert "needs 3 sizes" in table.loc["ebpf", "note"]
    assert math.isnan(float(table.loc["ebpf", "k"] if table.loc["ebpf", "k"] is not None else "nan"))
    assert table.loc["iptables", "unit"] == "us"


def test_flatness_is_read_within_the_sweep_not_extrapolated_beyond_it():
    # A short, noisy, flat sweep (1..100): no growth, and no wild per-1,000 figure decides it.
    rng = np.random.default_rng(13)
    sizes = np.repeat([1, 10, 100], 2)
    hits = 0
    for _ in range(50):
        fit = fit_growth(sizes, 230 + rng.normal(0, 15, len(sizes)))
        hits += fit.flat
    assert hits >= 44, hits
    # and b, read at N = 1, still brackets the truth of a clear O(N) growth
    y = 430 + 0.047 * SIZES + rng.normal(0, 10, len(SIZES))
    fit = fit_growth(SIZES, y)
    assert fit.added_max_ci.low > 0 and fit.n_max == 10_000
    assert fit.b_ci.contains(0.047)


def test_one_verdict_from_the_interval_the_resolution_and_the_floor():
    # what the largest size adds, and its interval
    assert decide(470.0, 440.0, 500.0) == "grows"
    assert decide(5.0, -3.0, 13.0) == "flat"
    assert decide(-20.0, -30.0, -10.0) == "falls"
    # a CPU figure counted in 50 µs steps that rose by one step has not shown growth
    assert decide(50.0, 20.0, 80.0, resolution=50.0) == "flat"
    assert decide(150.0, 100.0, 200.0, resolution=50.0) == "grows"
    assert decide(-50.0, -80.0, -20.0, resolution=50.0) == "flat"
    # a cost not above its floor at the largest size cannot grow, whatever the fit says
    assert decide(60.0, 30.0, 90.0, above_floor=-15.0) == "flat"
    assert decide(60.0, 30.0, 90.0, above_floor=0.0) == "flat"
    assert decide(60.0, 30.0, 90.0, above_floor=12.0) == "grows"
    assert decide(60.0, 30.0, 90.0, above_floor=math.nan) == "grows"  # no floor to hold it to
    # no interval: no verdict
    assert decide(60.0, -math.inf, math.inf) == "unknown"
    assert decide(math.nan, math.nan, math.nan) == "unknown"
