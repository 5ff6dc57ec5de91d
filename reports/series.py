"""The rows as series: points per size (median and range over repeats), floors, what the
Services add over them, growth fits with one verdict each, and which series get a chart.

A series is (kernel, metric, stat), the metric a series key (`metric:last`). Which series
is the headline, which is a floor and which stand on one comes from the run's catalog
(reports/catalog.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports import agreement
from reports.catalog import UNIT_SUFFIX, Catalog, split_key
from reports.fit import FLAT, GROWS, decide, fit_table
from reports.text import finite, fmt

NOISE = 0.05  # the bench goal: repeats of a p50 differ by less than 5 %
PERCENTILE_RE = re.compile(r"^p\d+(\.\d+)?$")
MODE_COLORS = {"iptables": "#c8334a", "nftables": "#d98a00", "ipvs": "#7b4fb0",
               "ebpf": "#00808f", "userspace": "#7a5c3e"}
PALETTE = ("#3b6fb6", "#5a9e3a", "#b5488f", "#6b6b6b", "#2a9d8f")

SUMMARY_STATS = ("median", "mean", "value", "count", "min", "max", "std", "stdev", "failed")
PREFERRED_STATS = ("p50", "median", "mean", "value", "count")


def primary_stat(stats: Iterable[str]) -> list[str]:
    """Stats that get a chart: one summary (p50 first), plus stats that name a variant of the
    measurement itself (a sync's `full` and `partial`); counts of failures never."""
    stats = list(dict.fromkeys(str(s) for s in stats))
    summary = next((s for s in PREFERRED_STATS if s in stats), None)
    variants = [s for s in stats if s not in SUMMARY_STATS and not PERCENTILE_RE.match(s)]
    chosen = ([summary] if summary else []) + variants
    if not chosen:
        chosen = [s for s in stats if PERCENTILE_RE.match(s)][:1]
    return chosen


@dataclass
class Point:
    n: int
    median: float
    low: float
    high: float
    count: int
    others: dict[str, float]  # the other percentiles at this point, for the hover text
    resolution: float = math.nan  # the step the values come in (clock ticks), NaN when finer

    @property
    def spread(self) -> float:
        return (self.high - self.low) / abs(self.median) if self.median else 0.0

    @property
    def below_resolution(self) -> bool:
        return finite(self.resolution) and self.median < self.resolution


def points(bench: pd.DataFrame, kernel: str, mode: str, metric: str, stat: str,
           positive_n: bool = True) -> list[Point]:
    """Median and range over repeats (and nodes) per size, for one series."""
    sel = bench[(bench["kernel"] == kernel) & (bench["mode"] == mode) & (bench["metric"] == metric)]
    if positive_n:
        sel = sel[sel["n_services"] > 0]
    out = []
    for n, group in sel.groupby("n_services"):
        rows = group[group["stat"] == stat]
        main = rows["value"]
        if main.empty:
            continue
        others = {}
        if PERCENTILE_RE.match(stat):
            for s, g in group.groupby("stat"):
                if s != stat and PERCENTILE_RE.match(str(s)):
                    others[str(s)] = float(g["value"].median())
        res = rows["resolution"].max() if "resolution" in rows.columns else math.nan
        out.append(Point(int(n), float(main.median()), float(main.min()), float(main.max()),
                         int(main.count()), others, float(res) if finite(res) else math.nan))
    return out


def floor_values(bench: pd.DataFrame, kernel: str, mode: str | None, stat: str = "p50",
                 catalog: Catalog | None = None) -> pd.Series:
    """The floor measured at the start and the end of a sweep (no Services)."""
    sel = bench[(bench["kernel"] == kernel) & (bench["n_services"] == 0) & (bench["stat"] == stat)
                & agreement.floor_rows(bench, catalog)]
    if mode is not None:
        sel = sel[sel["mode"] == mode]
    return sel["value"]


def same_moment_floor(bench: pd.DataFrame, kernel: str, stat: str, unit: str,
                      catalog: Catalog | None = None) -> dict[int, list[float]]:
    """The floor measured at each size beside the Service connections, every mode and pass:
    size -> values. Empty when the run measured it only at the start and the end."""
    sel = bench[(bench["kernel"] == kernel) & (bench["n_services"] > 0) & (bench["stat"] == stat)
                & (bench["unit"] == unit) & agreement.floor_rows(bench, catalog)]
    return {int(n): g["value"].tolist() for n, g in sel.groupby("n_services")}


@dataclass
class Overhead:
    """What the Services add over the floor at one size: median over passes, and its interval."""

    n: int
    value: float
    floor: float
    low: float = math.nan
    high: float = math.nan
    same_moment: bool = False  # the floor was measured between the same connections

    @property
    def ratio(self) -> float:
        return self.value / self.floor if finite(self.floor) and self.floor else math.nan

    @property
    def known(self) -> bool:
        return finite(self.low) and finite(self.high)

    @property
    def above_floor(self) -> float:
        """The low end of the interval, or the value itself when there is no interval."""
        return self.low if self.known else self.value


def overheads(bench: pd.DataFrame, kernel: str, mode: str, metric: str,
              stat: str = "p50", catalog: Catalog | None = None) -> dict[int, Overhead]:
    """Per size, the series minus its floor: against the floor of the same moments (one
    difference per pass) where the bench measured one at every size, else against the
    floor of the start and the end of the sweep (two samples, taken at other moments)."""
    frame = bench[bench["kernel"] == kernel]
    rows = agreement.per_pass(frame, metric, stat, catalog)
    rows = rows[rows["mode"] == mode]
    start_end = floor_values(bench, kernel, mode, stat, catalog)
    if start_end.empty:
        start_end = floor_values(bench, kernel, None, stat, catalog)
    out = {}
    for n, g in rows.groupby("n_services"):
        if g["same_moment"].all():
            diffs = g["added"].to_numpy(float)
            low, high = agreement.t_interval(diffs)
            out[int(n)] = Overhead(int(n), float(np.median(diffs)),
                                   float(np.median(g["floor"])), low, high, same_moment=True)
        elif len(start_end):
            values, floors = g["value"].to_numpy(float), start_end.to_numpy(float)
            value = float(np.median(values) - np.median(floors))
            low, high = agreement.t_interval(values, floors, centre=value)
            out[int(n)] = Overhead(int(n), value, float(np.median(floors)), low, high)
    return out


COUNT_STATS = ("failed", "events")  # counts beside a metric, in their own unit


def unit_of(bench: pd.DataFrame, metric: str, catalog: Catalog | None = None) -> str:
    """The metric's own unit: the catalog's, else the commonest unit of its values, else the
    one its id ends in (`_us`)."""
    unit = (catalog or Catalog()).unit(metric)
    if unit:
        return unit
    rows = bench[(bench["metric"] == metric) & ~bench["stat"].isin(COUNT_STATS)]
    units = rows["unit"][rows["unit"] != ""]
    if len(units):
        return str(units.mode().iloc[0])
    suffix = UNIT_SUFFIX.search(split_key(metric)[0])
    return suffix.group(1) if suffix else ""


def headline_keys(bench: pd.DataFrame, catalog: Catalog | None = None) -> list[str]:
    """The headline series the rows hold, best first (reports/catalog.py)."""
    present = bench.loc[bench["n_services"] > 0, "metric"] if len(bench) else []
    return (catalog or Catalog()).headline_series(present)


def modes_of(bench: pd.DataFrame, checks: pd.DataFrame) -> list[str]:
    seen = list(dict.fromkeys([*bench["mode"].tolist(), *checks["mode"].tolist()]))
    known = [m for m in MODE_COLORS if m in seen]
    return known + sorted(m for m in seen if m not in MODE_COLORS)


def mode_color(mode: str, modes: Sequence[str]) -> str:
    if mode in MODE_COLORS:
        return MODE_COLORS[mode]
    extra = [m for m in modes if m not in MODE_COLORS]
    return PALETTE[extra.index(mode) % len(PALETTE)] if mode in extra else PALETTE[0]


def chart_series(bench: pd.DataFrame, catalog: Catalog | None = None) -> list[tuple[str, str, str]]:
    """(kernel, metric, stat) for every chart, in reading order: the headline series, then
    the catalog's order, then metrics it does not describe."""
    if bench.empty:
        return []
    catalog = catalog or Catalog()
    headline = headline_keys(bench, catalog)
    data = bench[bench["n_services"] > 0]
    keys = []
    for (kernel, metric), group in data.groupby(["kernel", "metric"], sort=False):
        # A stat in another unit than the metric's counts something else (events, failures).
        unit = unit_of(bench, metric, catalog)
        own = group[(group["unit"] == unit) | (group["unit"] == "")]
        for stat in primary_stat(own["stat"] if len(own) else group["stat"]):
            keys.append((kernel, metric, stat))

    return sorted(keys, key=lambda k: (catalog.rank(k[1], headline), k[1], k[0], k[2]))


def split_series(bench: pd.DataFrame, keys: list[tuple[str, str, str]],
                 catalog: Catalog | None = None
                 ) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(charted, measured at one size): a line needs two sizes in some mode; a floor measured
    at every size is drawn in the charts it is the floor of, not on its own."""
    charted, single = [], []
    for key in keys:
        kernel, metric, stat = key
        sel = bench[(bench["kernel"] == kernel) & (bench["metric"] == metric)
                    & (bench["stat"] == stat) & (bench["n_services"] > 0)]
        several = bool(len(sel)) and int(sel.groupby("mode")["n_services"].nunique().max()) > 1
        if not several:
            single.append(key)
        elif not (catalog or Catalog()).is_floor(metric):
            charted.append(key)
    return charted, single


def fits_for(bench: pd.DataFrame, series: list[tuple[str, str, str]],
             catalog: Catalog | None = None) -> pd.DataFrame:
    """Growth fits for every charted series, over every measurement (repeats are points),
    with one verdict each (fit.decide): the growth must exceed the values' resolution, and
    a new connection's cost must stand above its floor at the largest size."""
    frames = []
    for kernel, metric, stat in series:
        sel = bench[(bench["kernel"] == kernel) & (bench["metric"] == metric) & (bench["stat"] == stat)]
        frames.append(sel)
    if not frames:
        return fit_table(pd.DataFrame(columns=["kernel", "mode", "metric", "stat", "n_services", "value"]))
    table = fit_table(pd.concat(frames, ignore_index=True))
    catalog = catalog or Catalog()
    headline = headline_keys(bench, catalog)
    verdicts, reasons, resolutions = [], [], []
    for r in table.to_dict("records"):
        sel = bench[(bench["kernel"] == r["kernel"]) & (bench["mode"] == r["mode"])
                    & (bench["metric"] == r["metric"]) & (bench["stat"] == r["stat"])]
        res = sel["resolution"].max() if "resolution" in sel.columns and len(sel) else math.nan
        res = float(res) if finite(res) else math.nan
        above = None
        if catalog.floored(r["metric"], headline) and finite(r.get("max_n")):
            top = overheads(bench, r["kernel"], r["mode"], r["metric"], r["stat"],
                            catalog).get(int(r["max_n"]))
            above = top.above_floor if top else None
        numbers = (r.get("added_max"), r.get("added_max_low"), r.get("added_max_high"))
        if not all(finite(v) for v in numbers):
            verdicts.append(None)
            reasons.append("")
            resolutions.append(res)
            continue
        numbers = tuple(float(v) for v in numbers)
        verdict = decide(*numbers, resolution=res if finite(res) else 0.0, above_floor=above)
        reason = ""
        if verdict == FLAT and decide(*numbers) == GROWS:
            reason = ("at the largest size not clearly above the floor"
                      if above is not None and not above > 0 else
                      f"grows by less than the resolution ({fmt(res, r.get('unit') or '')})")
        verdicts.append(verdict)
        reasons.append(reason)
        resolutions.append(res)
    table["verdict"] = verdicts
    table["why"] = reasons
    table["resolution"] = resolutions
    return table


def fit_row(fits: pd.DataFrame, kernel: str, mode: str, metric: str, stat: str) -> dict | None:
    """One fit as a dict; what the fit could not compute is None, never NaN."""
    if fits.empty:
        return None
    sel = fits[(fits["kernel"] == kernel) & (fits["mode"] == mode) & (fits["metric"] == metric)
               & (fits["stat"] == stat)]
    if not len(sel):
        return None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in sel.iloc[0].to_dict().items()}
