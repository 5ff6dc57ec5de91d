"""Run-to-run agreement: does every pass rank the modes alike, and how far does the growth
exponent move from one pass to another?

A pass is one repeat of the sweep (bench.csv's `repeat`: up the sizes, then down). On a
machine whose latency drifts, a ranking or an O(N) verdict read off the pooled passes can
hide that the passes disagree; these figures say how far they can be trusted here.

- Ranking, per kernel and size: the modes ordered by the headline series (the catalog's,
  reports/catalog.py; median per pass), in every pass; whether every pass gives the order
  of the pooled medians, and which passes do not (with the pairs they swap). Where the
  bench measured a floor at every size (a floor's rows beside the Service rows, same mode,
  size, repeat, stat and unit), a mode's figure is its latency minus that same-moment
  floor, so drift between the moments the modes ran does not rank them.
- Growth, per kernel and mode: the fit of reports/fit.py on each pass alone, and a
  bootstrap over passes (draw as many passes as there are, with replacement, refit): how
  often each verdict comes out (read from the distinct passes drawn), and the exponent's median and 2.5-97.5 % range over the
  resamples that grow. As in the report, a cost that is not above its floor at the
  largest size (same-moment floor, else the start/end one) is not said to grow.

Pure: rows in (bench.csv as a DataFrame, read_bench_csv's dicts or Row.as_dict()s) and
the run's metric catalog (without one, the catalog's fallback conventions), a JSON-ready
dict out (no NaN: what cannot be computed is None). bench/runner.py stores it in run.json
under `agreement`; the report renders it from there or computes it itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from reports.catalog import Catalog, series_key
from reports.fit import GROWS, NotEnoughSizes, decide, fit_growth

PRIMARY_STAT = "p50"
RESAMPLES = 200
PERCENTILES = (2.5, 97.5)
FRAME_COLUMNS = ("kernel", "mode", "n_services", "metric", "stat", "value", "unit", "repeat")


def _extra(cell: Any) -> dict:
    if isinstance(cell, Mapping):
        return dict(cell)
    if isinstance(cell, str) and cell.startswith("{"):
        try:
            value = json.loads(cell)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def bench_frame(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Bench rows in one shape: FRAME_COLUMNS with `metric` as a series key, numbers numeric."""
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty or not {"mode", "n_services", "metric", "value"} <= set(df.columns):
        return pd.DataFrame(columns=list(FRAME_COLUMNS))
    extras = df["extra"].map(_extra) if "extra" in df.columns else pd.Series([{}] * len(df),
                                                                             index=df.index)
    target = df["target"] if "target" in df.columns else pd.Series([None] * len(df), index=df.index)
    # Row.as_dict() keeps the target in `extra`; bench.csv has a column of its own.
    target = [t if isinstance(t, str) and t else e.get("target") for t, e in zip(target, extras,
                                                                                  strict=True)]
    for col, default in (("kernel", "unknown"), ("stat", "value"), ("unit", ""), ("repeat", 0)):
        if col not in df.columns:
            df[col] = default
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["n_services"] = pd.to_numeric(df["n_services"], errors="coerce")
    df["repeat"] = pd.to_numeric(df["repeat"], errors="coerce").fillna(0)
    df["metric"] = [series_key(str(m), t) for m, t in zip(df["metric"], target, strict=True)]
    df = df[np.isfinite(df["value"]) & df["n_services"].notna()].copy()
    df["n_services"] = df["n_services"].astype(int)
    df["repeat"] = df["repeat"].astype(int)
    for col in ("kernel", "mode", "stat", "unit"):
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
    return df[list(FRAME_COLUMNS)].reset_index(drop=True)


def floor_rows(frame: pd.DataFrame, catalog: Catalog | None = None) -> pd.Series:
    """Which rows measure a floor (a path with no Services), by the catalog."""
    catalog = catalog or Catalog()
    floors = [m for m in frame["metric"].unique() if catalog.is_floor(m)]
    return frame["metric"].isin(floors)


def same_moment_floors(frame: pd.DataFrame, catalog: Catalog | None = None) -> pd.Series:
    """The floor measured at each size between the Service connections: value per
    (kernel, mode, n_services, repeat, stat, unit), median over nodes. Empty when the run
    measured the floor only at the start and the end (size 0)."""
    keys = ["kernel", "mode", "n_services", "repeat", "stat", "unit"]
    sel = frame[floor_rows(frame, catalog) & (frame["n_services"] > 0)]
    if sel.empty:
        return pd.Series(dtype=float, index=pd.MultiIndex.from_tuples([], names=keys))
    return sel.groupby(keys)["value"].median()


def start_end_floors(frame: pd.DataFrame,
                     catalog: Catalog | None = None) -> tuple[pd.Series, pd.Series]:
    """The floor measured at the start and the end of each mode's sweep (size 0): median per
    (kernel, mode, stat, unit), and per (kernel, stat, unit) for a mode without its own."""
    sel = frame[floor_rows(frame, catalog) & (frame["n_services"] == 0)]
    return (sel.groupby(["kernel", "mode", "stat", "unit"])["value"].median(),
            sel.groupby(["kernel", "stat", "unit"])["value"].median())


def per_pass(frame: pd.DataFrame, series: str, stat: str = PRIMARY_STAT,
             catalog: Catalog | None = None) -> pd.DataFrame:
    """One row per (kernel, mode, n_services, repeat): the series' value (median over nodes),
    its floor and `added` (value - floor). The floor is the one measured at the same moment
    (`same_moment`), else the mode's start/end floor, else the kernel's; NaN when none."""
    keys = ["kernel", "mode", "n_services", "repeat", "stat", "unit"]
    sel = frame[(frame["metric"] == series) & (frame["stat"] == stat) & (frame["n_services"] > 0)]
    if sel.empty:
        return pd.DataFrame(columns=[*keys[:4], "value", "floor", "same_moment", "added"])
    values = sel.groupby(keys)["value"].median()
    out = values.rename("value").reset_index()
    same = same_moment_floors(frame, catalog).reindex(values.index).to_numpy()
    by_mode, by_kernel = start_end_floors(frame, catalog)
    fallback = [by_mode.get((k, m, st, u), by_kernel.get((k, st, u), math.nan))
                for k, m, st, u in zip(out["kernel"], out["mode"], out["stat"], out["unit"],
                                       strict=True)]
    out["same_moment"] = ~np.isnan(same)
    out["floor"] = np.where(out["same_moment"], same, np.asarray(fallback, dtype=float))
    out["added"] = out["value"] - out["floor"]
    return out.drop(columns=["stat", "unit"])


def primary_series(frame: pd.DataFrame, stat: str = PRIMARY_STAT,
                   catalog: Catalog | None = None) -> str | None:
    """The catalog's best headline series the rows hold at a size above zero."""
    present = frame.loc[(frame["stat"] == stat) & (frame["n_services"] > 0), "metric"]
    return next(iter((catalog or Catalog()).headline_series(present)), None)


# --------------------------------------------------------------------------- ranking


def _order(values: Mapping[str, float]) -> list[str]:
    return sorted(values, key=lambda m: (values[m], m))


def _swaps(reference: list[str], order: list[str]) -> list[list[str]]:
    """Pairs (a, b) with a before b in `reference` and after it in `order`."""
    at = {m: i for i, m in enumerate(order)}
    return [[a, b] for i, a in enumerate(reference) for b in reference[i + 1:] if at[a] > at[b]]


def ranking(passes: pd.DataFrame) -> list[dict[str, Any]]:
    """Per kernel and size with two modes or more: is the order of the modes the same in
    every pass? (passes: per_pass's frame)."""
    out = []
    for (kernel, n), at_n in passes.groupby(["kernel", "n_services"], sort=True):
        repeats = sorted(set(at_n["repeat"]))
        # Modes measured in every pass at this size: only they can be ranked alike.
        modes = sorted(set.intersection(*(set(at_n.loc[at_n["repeat"] == r, "mode"])
                                          for r in repeats)))
        if len(modes) < 2:
            continue
        at_n = at_n[at_n["mode"].isin(modes)]
        # Drift between the moments the modes ran cancels in the same-moment difference.
        same_moment = bool(at_n["same_moment"].all())
        column = "added" if same_moment else "value"
        orders = {int(r): _order(dict(zip(g["mode"], g[column], strict=True)))
                  for r, g in at_n.groupby("repeat")}
        pooled = _order(at_n.groupby("mode")[column].median().to_dict())
        disagree = [{"repeat": r, "order": o, "swapped": _swaps(pooled, o)}
                    for r, o in orders.items() if o != pooled]
        out.append({
            "kernel": kernel, "n_services": int(n),
            "basis": "added over the same-moment floor" if same_moment else "latency",
            "passes": [int(r) for r in repeats], "order": pooled,
            "same": (not disagree) if len(repeats) > 1 else None,
            "disagreeing": disagree,
        })
    return out


# --------------------------------------------------------------------------- growth


def t_interval(a: np.ndarray, b: np.ndarray | None = None,
               centre: float | None = None) -> tuple[float, float]:
    """95 % t interval of a's mean (or of a's minus b's: Welch's standard error with the
    smaller sample's degrees of freedom), around `centre` (default: a's median); NaN when a
    sample has a single value."""
    samples = [np.asarray(a, float)] if b is None else [np.asarray(a, float), np.asarray(b, float)]
    if any(len(x) < 2 for x in samples):
        return math.nan, math.nan
    se = math.sqrt(sum(float(np.var(x, ddof=1)) / len(x) for x in samples))
    half = float(stats.t.ppf(0.975, min(len(x) for x in samples) - 1)) * se
    mid = float(np.median(samples[0])) if centre is None else centre
    return mid - half, mid + half


def above_floor(diffs: np.ndarray) -> float | None:
    """How far a cost stands above its floor, at worst: the low end of t_interval of the
    differences, or the difference itself when there is one; None: no floor."""
    if not len(diffs):
        return None
    low, _ = t_interval(diffs)
    return low if math.isfinite(low) else float(np.median(diffs))


def _verdict(sizes: np.ndarray, values: np.ndarray, added: np.ndarray) -> str | None:
    """The verdict of one fit, None when the points cannot be fitted. As in the report, a
    cost not above its floor at the largest size does not grow."""
    try:
        fit = fit_growth(sizes, values)
    except NotEnoughSizes:
        return None
    top = added[(sizes == sizes.max()) & ~np.isnan(added)]
    return decide(fit.added_max, fit.added_max_ci.low, fit.added_max_ci.high,
                  above_floor=above_floor(top))


def _exponent(sizes: np.ndarray, values: np.ndarray) -> float | None:
    try:
        fit = fit_growth(sizes, values)
    except NotEnoughSizes:
        return None
    return round(fit.k, 4) if fit.k_determined else None


def growth(passes: pd.DataFrame, resamples: int = RESAMPLES, seed: int = 0) -> list[dict[str, Any]]:
    """Per kernel and mode: the verdict and exponent of each pass alone, and their spread
    under a bootstrap over passes (passes: per_pass's frame).

    A resample's exponent is the usual bootstrap refit, a drawn pass counted as often as it
    was drawn. Its verdict is read from a fit of the distinct passes drawn: a pass counted
    twice would narrow the fit's interval as if it had been measured twice, and call noise
    growth. Fits are cached per draw: three passes have ten distinct draws.
    """
    out = []
    rng = np.random.default_rng(seed)
    for (kernel, mode), rows in passes.groupby(["kernel", "mode"], sort=True):
        by_pass = {int(r): (g["n_services"].to_numpy(float), g["value"].to_numpy(float),
                            g["added"].to_numpy(float))
                   for r, g in rows.groupby("repeat")}

        def joined(drawn: tuple[int, ...], by_pass=by_pass) -> list[np.ndarray]:
            return [np.concatenate([by_pass[r][i] for r in drawn]) for i in range(3)]

        verdict_of: dict[tuple[int, ...], str | None] = {}
        exponent_of: dict[tuple[int, ...], float | None] = {}

        def verdict(drawn: tuple[int, ...], cache=verdict_of, joined=joined) -> str | None:
            key = tuple(sorted(set(drawn)))
            if key not in cache:
                cache[key] = _verdict(*joined(key))
            return cache[key]

        def exponent(drawn: tuple[int, ...], cache=exponent_of, joined=joined) -> float | None:
            key = tuple(sorted(drawn))
            if key not in cache:
                cache[key] = _exponent(*joined(key)[:2])
            return cache[key]

        repeats = sorted(by_pass)
        entry: dict[str, Any] = {
            "kernel": kernel, "mode": mode, "passes": repeats,
            "sizes": sorted(int(n) for n in set(rows["n_services"])),
            "per_pass": [], "resamples": 0, "sets": 0, "verdicts": {}, "k": None,
        }
        for r in repeats:
            v = verdict((r,))
            entry["per_pass"].append({"repeat": r, "verdict": v,
                                      "k": exponent((r,)) if v == GROWS else None})
        if len(repeats) > 1:
            verdicts: dict[str, int] = {}
            ks = []
            sets = set()
            for _ in range(resamples):
                drawn = tuple(int(r) for r in rng.choice(repeats, size=len(repeats)))
                v = verdict(drawn)
                if v is None:
                    continue
                sets.add(frozenset(drawn))
                verdicts[v] = verdicts.get(v, 0) + 1
                k = exponent(drawn) if v == GROWS else None
                if k is not None:
                    ks.append(k)
            done = sum(verdicts.values())
            entry["resamples"] = done
            entry["sets"] = len(sets)  # distinct sets of passes behind the verdicts
            entry["verdicts"] = dict(sorted(verdicts.items()))
            # An exponent's spread means something only where growth is the usual verdict.
            if ks and verdicts.get(GROWS, 0) * 2 > done:
                low, mid, high = np.percentile(ks, [PERCENTILES[0], 50, PERCENTILES[1]])
                entry["k"] = {"median": round(float(mid), 3), "low": round(float(low), 3),
                              "high": round(float(high), 3), "of": len(ks)}
        out.append(entry)
    return out


def agreement(rows: pd.DataFrame | Iterable[Mapping[str, Any]], series: str | None = None,
              stat: str = PRIMARY_STAT, resamples: int = RESAMPLES, seed: int = 0,
              catalog: Catalog | Iterable[Any] | None = None) -> dict[str, Any]:
    """Ranking and growth agreement across passes, for `series` (default: the headline one
    of `catalog`, run.json's `metrics`)."""
    catalog = Catalog.of(catalog)
    frame = bench_frame(rows)
    series = series or primary_series(frame, stat, catalog)
    if series is None:
        return {"series": None, "stat": stat, "ranking": [], "growth": []}
    passes = per_pass(frame, series, stat, catalog)
    return {"series": series, "stat": stat, "resamples": resamples,
            "ranking": ranking(passes), "growth": growth(passes, resamples, seed)}
