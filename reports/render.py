"""A run folder -> one self-contained HTML page a reviewer reads in a minute.

Reads bench.csv, run.json and conformance*.json with pandas, fits each mode's growth
(reports/fit.py) and writes, in this order: headline findings, the conformance matrix,
one log-log chart per metric (a table for metrics measured at one size), the growth-fit
table, the agreement between passes (reports/agreement.py), the environment and, with an
older run to compare against, the change per metric and mode. Charts are inline SVG drawn
here; the page loads nothing (no fonts, scripts or images from anywhere), so it opens
offline. Every statement has one growth verdict (fit.decide), figures counted in clock
ticks carry their resolution, and a reader never sees nan or inf.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports import agreement
from reports.fit import FLAT, GROWS, UNKNOWN_VERDICT, decide, fit_table
from reports.results import _write_atomic, read_json

BENCH_CSV = "bench.csv"
RUN_JSON = "run.json"
ENVIRONMENT_JSON = "environment.json"
HOST_KERNEL = "host"  # conformance names the host kernel so; bench writes its release
CONFORMANCE_GLOBS = ("conformance*.json", "conformance*/conformance*.json")
REPORT_HTML = "report.html"
NOISE = 0.05  # the bench goal: repeats of a p50 differ by less than 5 %
OUTCOMES = ("passed", "failed", "deviation", "skipped")
OUTCOME_MARK = {"passed": "✓", "failed": "✗", "deviation": "≈", "skipped": "–"}
TARGETS = {"first": "the first Service", "last": "the last Service", "random": "random Services"}
HEADLINE_METRICS = agreement.PRIMARY_SERIES
FLOOR_METRIC = "floor_conn_latency_us"
# Further metrics a headline quotes at the largest size, when the run measured them.
EXTRA_FINDINGS = (("programming_latency_s", "network programming latency"),
                  ("throughput_rps", "throughput"), ("cpu_us_per_conn", "kernel CPU per connection"))
FLOORED = ("conn_latency_us", "podip_conn_latency_us")  # new connections: the floor applies
PERCENTILE_RE = re.compile(r"^p\d+(\.\d+)?$")
# Rows from before bench rows carried their `resolution`: CPU time read in USER_HZ ticks
# (these extras), one tick spread over the connections counted.
TICK_S = 0.01
TICK_EXTRAS = ("host_sys_s", "agents_sys_s")
SECONDS_IN = {"s": 1.0, "ms": 1e3, "us": 1e6, "µs": 1e6}


@dataclass(frozen=True)
class Metric:
    label: str
    higher_is_better: bool = False


METRICS = {
    "conn_latency_us": Metric("New connection to a Service"),
    "podip_conn_latency_us": Metric("New connection to a pod IP, Services programmed"),
    FLOOR_METRIC: Metric("New connection to a pod IP, no Services (floor)"),
    "programming_latency_s": Metric("Network programming latency: change to first connection served"),
    "sync_full_s": Metric("Program all N Services from empty"),
    "sync_one_s": Metric("Change one Service's endpoints at N Services"),
    "sync_s": Metric("Sync of one node"),
    "rr_latency_us": Metric("Request/response on an established connection"),
    "throughput_rps": Metric("Throughput, one new connection per request", higher_is_better=True),
    "cpu_us_per_conn": Metric("Kernel + softirq CPU per new connection"),
    "syn_to_established_us": Metric("Kernel handshake time, SYN to ESTABLISHED"),
    "rules": Metric("Rules, chains and map entries programmed"),
    "kernel_bytes": Metric("Kernel memory programmed"),
}
ORDER = ("conn_latency_us:last", "conn_latency_us:random", "conn_latency_us",
         "conn_latency_us:first", "podip_conn_latency_us", "programming_latency_s",
         "sync_full_s", "sync_one_s", "sync_s", "rr_latency_us", "throughput_rps",
         "cpu_us_per_conn", "syn_to_established_us", "rules", "kernel_bytes")
MODE_COLORS = {"iptables": "#c8334a", "nftables": "#d98a00", "ipvs": "#7b4fb0",
               "ebpf": "#00808f", "userspace": "#7a5c3e"}
PALETTE = ("#3b6fb6", "#5a9e3a", "#b5488f", "#6b6b6b", "#2a9d8f")


class ReportError(ValueError):
    """The run folder cannot be reported on; the message says which and why."""


# --------------------------------------------------------------------------- reading


@dataclass
class Run:
    """What a run folder holds; `problems` says what was missing or unreadable."""

    path: Path
    bench: pd.DataFrame
    checks: pd.DataFrame
    meta: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def complete(self) -> bool | None:
        value = self.meta.get("complete")
        return value if isinstance(value, bool) else None


BENCH_COLUMNS = ("kernel", "mode", "n_services", "metric", "stat", "value", "unit", "repeat")
CHECK_COLUMNS = ("kernel", "mode", "name", "outcome", "reason", "duration_s")


def load_run(path: str | Path) -> Run:
    """Read a run folder, tolerating any missing piece (each becomes a problem to show)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"run folder {str(path)!r} does not exist or is not a folder")
    problems: list[str] = []
    files: list[str] = []
    meta: dict[str, Any] = {}
    if (path / RUN_JSON).exists():
        try:
            data = read_json(path / RUN_JSON)
            if isinstance(data, dict):
                meta = data
                files.append(RUN_JSON)
            else:
                problems.append(f"{RUN_JSON} is not a JSON object; environment unknown")
        except (OSError, ValueError) as exc:
            problems.append(f"{RUN_JSON} is unreadable ({exc}); environment unknown")
    else:
        problems.append(f"no {RUN_JSON}: completeness unknown")
        # A conformance-only folder records its environment beside its results.
        if (path / ENVIRONMENT_JSON).exists():
            try:
                data = read_json(path / ENVIRONMENT_JSON)
                if isinstance(data, dict):
                    meta = data
                    files.append(ENVIRONMENT_JSON)
            except (OSError, ValueError) as exc:
                problems.append(f"{ENVIRONMENT_JSON} is unreadable ({exc})")

    bench = pd.DataFrame(columns=[*BENCH_COLUMNS, "target", "when", "resolution"])
    if (path / BENCH_CSV).exists():
        try:
            raw = pd.read_csv(path / BENCH_CSV)
            bench = normalize_bench(raw, default_kernel=str(meta.get("kernel") or "unknown"))
            files.append(BENCH_CSV)
            dropped = len(raw) - len(bench)
            if dropped:
                problems.append(f"{BENCH_CSV}: {dropped} rows without a numeric value or size were left out")
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            problems.append(f"{BENCH_CSV} is unreadable ({exc}); no measurements shown")
    else:
        problems.append(f"no {BENCH_CSV}: no measurements in this run")

    records: list[dict] = []
    conformance_files = sorted({p for g in CONFORMANCE_GLOBS for p in path.glob(g) if p.is_file()})
    for file in conformance_files:
        rel = str(file.relative_to(path))
        try:
            records.extend(conformance_records(read_json(file), str(meta.get("kernel") or "unknown")))
            files.append(rel)
        except (OSError, ValueError) as exc:
            problems.append(f"{rel} is unreadable ({exc})")
    if not conformance_files:
        problems.append("no conformance*.json: correctness not checked in this run (`nox -s nightly` "
                        "checks it; `svcbench conformance --mode MODE --out RUN_DIR/conformance-MODE` "
                        "adds one mode)")
    checks = pd.DataFrame(records, columns=list(CHECK_COLUMNS))
    host = host_kernel(meta, bench)
    for frame in (bench, checks):
        frame.loc[frame["kernel"] == HOST_KERNEL, "kernel"] = host
    if not files:
        raise ReportError(
            f"run folder {str(path)!r} holds none of {BENCH_CSV}, {RUN_JSON} or conformance*.json"
        )
    return Run(path, bench, checks, meta, problems, files)


def host_kernel(meta: dict[str, Any], bench: pd.DataFrame) -> str:
    """The release the word "host" stands for: run.json's kernel, else bench.csv's commonest."""
    if meta.get("kernel") and meta["kernel"] != HOST_KERNEL:
        return str(meta["kernel"])
    named = bench.loc[bench["kernel"] != HOST_KERNEL, "kernel"] if len(bench) else bench["kernel"]
    return str(named.mode().iloc[0]) if len(named) else HOST_KERNEL


def conformance_records(data: Any, default_kernel: str) -> list[dict]:
    """Checks from one conformance file: one mode's object, a list of them, or {"modes": ...}."""
    if isinstance(data, list):
        return [r for item in data for r in conformance_records(item, default_kernel)]
    if not isinstance(data, dict):
        raise ValueError("expected an object or a list of objects")
    if "checks" not in data and isinstance(data.get("modes"), (list, dict)):
        modes = data["modes"]
        items = modes.values() if isinstance(modes, dict) else modes
        if isinstance(modes, dict):
            items = [{"mode": m, **v} if isinstance(v, dict) else v for m, v in modes.items()]
        return [r for item in items for r in conformance_records(item, data.get("kernel") or default_kernel)]
    mode = str(data.get("mode") or "unknown")
    kernel = str(data.get("kernel") or default_kernel)
    out = []
    for check in data.get("checks") or []:
        if not isinstance(check, dict) or not check.get("name"):
            continue
        outcome = str(check.get("outcome") or "").lower()
        out.append({
            "kernel": kernel, "mode": mode, "name": str(check["name"]),
            "outcome": outcome if outcome in OUTCOMES else (outcome or "unknown"),
            "reason": str(check.get("reason") or ""),
            "duration_s": pd.to_numeric(check.get("duration_s"), errors="coerce"),
        })
    return out


def normalize_bench(raw: pd.DataFrame, default_kernel: str = "unknown") -> pd.DataFrame:
    """bench.csv rows in one shape: a series key per metric (`conn_latency_us:last`)."""
    df = raw.copy()
    missing = [c for c in ("mode", "n_services", "metric", "value") if c not in df.columns]
    if missing:
        raise ValueError(f"missing columns {', '.join(missing)}")
    extras = df["extra"].map(_json_dict) if "extra" in df.columns else \
        pd.Series([{}] * len(df), index=df.index, dtype=object)
    # A writer may keep the per-row extras as one JSON cell.
    for key in ("target", "when", "node"):
        if key not in df.columns:
            df[key] = extras.map(lambda d, key=key: d.get(key))
    if "resolution" not in df.columns:
        df["resolution"] = [_resolution(e, u) for e, u in
                            zip(extras, df["unit"] if "unit" in df.columns else [""] * len(df),
                                strict=True)]
    df["resolution"] = pd.to_numeric(df["resolution"], errors="coerce")
    defaults = {"kernel": default_kernel, "stat": "value", "unit": "", "repeat": 0,
                "target": None, "when": None}
    for col, value in defaults.items():
        if col not in df.columns:
            df[col] = value
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["n_services"] = pd.to_numeric(df["n_services"], errors="coerce")
    df = df[df["value"].notna() & df["n_services"].notna()].copy()
    df["n_services"] = df["n_services"].astype(int)
    for col in ("kernel", "mode", "metric", "stat", "unit"):
        df[col] = df[col].astype(object).fillna(defaults.get(col, "")).astype(str)
    df["when"] = df["when"].astype(object).fillna("").astype(str)
    df["target"] = df["target"].map(lambda t: "" if t is None or pd.isna(t) else str(t))
    df["repeat"] = pd.to_numeric(df["repeat"], errors="coerce").fillna(0).astype(int)
    df["metric"] = [agreement.series_key(m, t) for m, t in zip(df["metric"], df["target"],
                                                            strict=True)]
    df["base"] = df["metric"].str.split(":").str[0]
    return df.reset_index(drop=True)


def _resolution(extra: dict, unit: Any) -> float:
    """The smallest step a row's value can take: its own `resolution`, else one clock tick
    over the connections of a tick-counted CPU figure, else NaN (finer than shown)."""
    if _finite(extra.get("resolution")):
        return float(extra["resolution"])
    count = extra.get("count")
    if any(k in extra for k in TICK_EXTRAS) and _finite(count) and str(unit) in SECONDS_IN:
        failed = float(extra["failed"]) if _finite(extra.get("failed")) else 0.0
        return TICK_S * SECONDS_IN[str(unit)] / max(1.0, float(count) - failed)
    return math.nan


def _json_dict(cell: Any) -> dict:
    if isinstance(cell, dict):
        return cell
    if isinstance(cell, str) and cell.startswith("{"):
        try:
            value = json.loads(cell)
            return value if isinstance(value, dict) else {}
        except ValueError:
            return {}
    return {}


# --------------------------------------------------------------------------- numbers


def metric_label(key: str) -> str:
    base, _, target = key.partition(":")
    info = METRICS.get(base)
    label = info.label if info else base.replace("_", " ")
    if target:
        label = label.replace("a Service", TARGETS.get(target, f"Service {target}"))
        if base != "conn_latency_us":
            label += f" ({target})"
    return label


def higher_is_better(key: str) -> bool:
    info = METRICS.get(key.partition(":")[0])
    return bool(info and info.higher_is_better)


def significant(v: float, digits: int = 3) -> str:
    if not _finite(v):
        return "–"  # a reader never sees nan or inf
    if v == 0:
        return "0"
    if abs(v) < 1e-3:  # a per-Service coefficient can be tiny: scientific, not 12 zeros
        return f"{v:.{digits - 1}e}"
    decimals = max(digits - 1 - int(math.floor(math.log10(abs(v)))), 0)
    return f"{v:,.{decimals}f}"


def fmt(v: float, unit: str, signed: bool = False, digits: int = 3) -> str:
    """A value with a unit a reader knows: 430 µs, 0.90 ms, 4.1 s, 12 MiB, 140,006 rules."""
    if not _finite(v):
        return "–"
    v = float(v)

    def num(x: float) -> str:
        text = significant(x, digits)
        # A 2-digit axis label drops the zeros a 3-digit figure keeps: 90 ms, not 90.0 ms.
        return text.rstrip("0").rstrip(".") if digits < 3 and "." in text and "e" not in text else text

    sign = "+" if signed and v > 0 else ("−" if v < 0 else "")
    a = abs(v)
    unit = unit or ""
    if unit in ("us", "µs"):
        text = f"{num(a / 1000)} ms" if a >= 1000 else f"{num(a)} µs"
    elif unit == "ms":
        text = f"{num(a / 1000)} s" if a >= 1000 else f"{num(a)} ms"
    elif unit == "s":
        text = (f"{num(a)} s" if a >= 1 else f"{num(a * 1000)} ms" if a >= 1e-3
                else f"{num(a * 1e6)} µs")
    elif unit in ("bytes", "B"):
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if a >= scale:
                text = f"{num(a / scale)} {name}"
                break
        else:
            text = f"{a:,.0f} B"
    elif a >= 1000 and float(a).is_integer():
        text = f"{a:,.0f} {unit}".strip()
    else:
        text = f"{num(a)} {unit}".strip()
    return sign + text


def fmt_measured(v: float, unit: str, resolution: float = math.nan) -> str:
    """A value that cannot be finer than `resolution`: below it, "< resolution"."""
    if _finite(resolution) and _finite(v) and v < resolution:
        return f"< {fmt(resolution, unit)}"
    return fmt(v, unit)


def resolution_note(resolution: float, unit: str) -> str:
    return f" (resolution {fmt(resolution, unit)})" if _finite(resolution) else ""


def fmt_tick(v: float, unit: str) -> str:
    """A short axis label: durations and sizes with their unit, counts as 140k."""
    if unit in ("us", "µs", "ms", "s", "bytes", "B"):
        return fmt(v, unit, digits=2)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def fmt_n(n: float) -> str:
    return f"{int(n):,}"


def fmt_tick_n(n: float) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else f"{n:g}"


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
        return _finite(self.resolution) and self.median < self.resolution


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
                         int(main.count()), others, float(res) if _finite(res) else math.nan))
    return out


def floor_values(bench: pd.DataFrame, kernel: str, mode: str | None, stat: str = "p50") -> pd.Series:
    """The floor measured at the start and the end of a sweep (no Services)."""
    sel = bench[(bench["kernel"] == kernel) & (bench["n_services"] == 0) & (bench["stat"] == stat)
                & bench["metric"].map(agreement.is_floor)]
    if mode is not None:
        sel = sel[sel["mode"] == mode]
    return sel["value"]


def same_moment_floor(bench: pd.DataFrame, kernel: str, stat: str,
                      unit: str) -> dict[int, list[float]]:
    """The floor measured at each size beside the Service connections, every mode and pass:
    size -> values. Empty when the run measured it only at the start and the end."""
    sel = bench[(bench["kernel"] == kernel) & (bench["n_services"] > 0) & (bench["stat"] == stat)
                & (bench["unit"] == unit) & bench["metric"].map(agreement.is_floor)]
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
        return self.value / self.floor if _finite(self.floor) and self.floor else math.nan

    @property
    def known(self) -> bool:
        return _finite(self.low) and _finite(self.high)

    @property
    def above_floor(self) -> float:
        """The low end of the interval, or the value itself when there is no interval."""
        return self.low if self.known else self.value


def overheads(bench: pd.DataFrame, kernel: str, mode: str, metric: str,
              stat: str = "p50") -> dict[int, Overhead]:
    """Per size, the series minus its floor: against the floor of the same moments (one
    difference per pass) where the bench measured one at every size, else against the
    floor of the start and the end of the sweep (two samples, taken at other moments)."""
    frame = bench[bench["kernel"] == kernel]
    rows = agreement.per_pass(frame, metric, stat)
    rows = rows[rows["mode"] == mode]
    start_end = floor_values(bench, kernel, mode, stat)
    if start_end.empty:
        start_end = floor_values(bench, kernel, None, stat)
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


UNIT_SUFFIXES = {"us": "us", "s": "s", "ms": "ms", "rps": "rps", "bytes": "bytes"}
COUNT_STATS = ("failed", "events")  # counts beside a metric, in their own unit


def unit_of(bench: pd.DataFrame, metric: str) -> str:
    """The metric's own unit: what its name ends in, else the commonest unit of its values."""
    rows = bench[(bench["metric"] == metric) & ~bench["stat"].isin(COUNT_STATS)]
    units = rows["unit"][rows["unit"] != ""]
    suffix = UNIT_SUFFIXES.get(metric.partition(":")[0].rsplit("_", 1)[-1])
    if suffix and (units.empty or suffix in set(units)):
        return suffix
    return str(units.mode().iloc[0]) if len(units) else (suffix or "")


def modes_of(bench: pd.DataFrame, checks: pd.DataFrame) -> list[str]:
    seen = list(dict.fromkeys([*bench["mode"].tolist(), *checks["mode"].tolist()]))
    known = [m for m in MODE_COLORS if m in seen]
    return known + sorted(m for m in seen if m not in MODE_COLORS)


def mode_color(mode: str, modes: Sequence[str]) -> str:
    if mode in MODE_COLORS:
        return MODE_COLORS[mode]
    extra = [m for m in modes if m not in MODE_COLORS]
    return PALETTE[extra.index(mode) % len(PALETTE)] if mode in extra else PALETTE[0]


def chart_series(bench: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(kernel, metric, stat) for every chart, in reading order."""
    if bench.empty:
        return []
    data = bench[bench["n_services"] > 0]
    keys = []
    for (kernel, metric), group in data.groupby(["kernel", "metric"], sort=False):
        # A stat in another unit than the metric's counts something else (events, failures).
        unit = unit_of(bench, metric)
        own = group[(group["unit"] == unit) | (group["unit"] == "")]
        for stat in primary_stat(own["stat"] if len(own) else group["stat"]):
            keys.append((kernel, metric, stat))

    def rank(k: tuple[str, str, str]) -> tuple:
        metric = k[1]
        order = ORDER.index(metric) if metric in ORDER else (
            ORDER.index(metric.partition(":")[0]) + 0.5 if metric.partition(":")[0] in ORDER
            else len(ORDER))
        return (order, metric, k[0], k[2])

    return sorted(keys, key=rank)


def split_series(bench: pd.DataFrame, keys: list[tuple[str, str, str]]
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
        elif not agreement.is_floor(metric):
            charted.append(key)
    return charted, single


def fits_for(bench: pd.DataFrame, series: list[tuple[str, str, str]]) -> pd.DataFrame:
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
    verdicts, reasons, resolutions = [], [], []
    for r in table.to_dict("records"):
        sel = bench[(bench["kernel"] == r["kernel"]) & (bench["mode"] == r["mode"])
                    & (bench["metric"] == r["metric"]) & (bench["stat"] == r["stat"])]
        res = sel["resolution"].max() if "resolution" in sel.columns and len(sel) else math.nan
        res = float(res) if _finite(res) else math.nan
        above = None
        if r["metric"].partition(":")[0] in FLOORED and _finite(r.get("max_n")):
            top = overheads(bench, r["kernel"], r["mode"], r["metric"], r["stat"]).get(
                int(r["max_n"]))
            above = top.above_floor if top else None
        numbers = (r.get("added_max"), r.get("added_max_low"), r.get("added_max_high"))
        if not all(_finite(v) for v in numbers):
            verdicts.append(None)
            reasons.append("")
            resolutions.append(res)
            continue
        numbers = tuple(float(v) for v in numbers)
        verdict = decide(*numbers, resolution=res if _finite(res) else 0.0, above_floor=above)
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


# --------------------------------------------------------------------------- text


def esc(text: Any) -> str:
    """HTML-escape, and write URL schemes so that the file never holds a fetchable address."""
    out = html.escape(str(text), quote=True)
    return re.sub(r"(?i)(https?):/", r"\1&#58;/", out)


@dataclass
class ModeSummary:
    kernel: str
    mode: str
    max_n: int = 0
    sizes: int = 0  # how many sizes above zero the mode measured anything at
    metric: str = ""
    stat: str = "p50"
    latency: float = math.nan
    over: Overhead | None = None  # what the Services add over the floor at max_n
    fit: dict | None = None
    podip: Overhead | None = None  # a pod IP with the Services installed, over the floor
    podip_latency: float = math.nan
    sync: tuple[str, float, str] | None = None
    rules: float = math.nan
    failed: int = 0
    checks: dict[str, int] = field(default_factory=dict)
    # (words, value, unit, resolution) of further metrics at max_n
    extras: list[tuple[str, float, str, float]] = field(default_factory=list)
    passes: dict | None = None  # agreement's growth entry for this kernel and mode

    @property
    def floor(self) -> float:
        return self.over.floor if self.over else math.nan

    @property
    def overhead(self) -> float:
        return self.over.value if self.over else math.nan

    @property
    def overhead_ratio(self) -> float:
        return self.over.ratio if self.over else math.nan


def summarize_modes(run: Run, fits: pd.DataFrame, agreed: dict | None = None) -> list[ModeSummary]:
    bench, checks = run.bench, run.checks
    kernels = list(dict.fromkeys([*bench["kernel"].tolist(), *checks["kernel"].tolist()]))
    growth = {(g.get("kernel"), g.get("mode")): g for g in (agreed or {}).get("growth") or []
              if isinstance(g, dict)}
    out = []
    for kernel in kernels:
        for mode in modes_of(bench[bench["kernel"] == kernel], checks[checks["kernel"] == kernel]):
            s = ModeSummary(kernel, mode)
            rows = bench[(bench["kernel"] == kernel) & (bench["mode"] == mode)]
            s.max_n = int(rows["n_services"].max()) if len(rows) else 0
            s.sizes = int(rows.loc[rows["n_services"] > 0, "n_services"].nunique())
            for metric in HEADLINE_METRICS:
                # p50 where the rows have it, else the metric's own summary (a bare `value`)
                stat = next(iter(primary_stat(rows.loc[rows["metric"] == metric, "stat"])), "p50")
                pts = points(bench, kernel, mode, metric, stat)
                if pts:
                    s.metric, s.stat, s.latency, s.max_n = metric, stat, pts[-1].median, pts[-1].n
                    s.fit = fit_row(fits, kernel, mode, metric, stat)
                    s.over = overheads(bench, kernel, mode, metric, stat).get(s.max_n)
                    if (agreed or {}).get("series") == metric:
                        s.passes = growth.get((kernel, mode))
                    break
            pts = points(bench, kernel, mode, "podip_conn_latency_us", "p50")
            if pts:
                s.podip_latency = pts[-1].median
                s.podip = overheads(bench, kernel, mode, "podip_conn_latency_us").get(pts[-1].n)
            for metric in ("sync_full_s", "sync_s"):
                for stat in primary_stat(rows.loc[rows["metric"] == metric, "stat"]):
                    pts = points(bench, kernel, mode, metric, stat)
                    if pts and s.sync is None:
                        s.sync = (metric, pts[-1].median, f"{fmt_n(pts[-1].n)}")
            pts = points(bench, kernel, mode, "rules", "count") or points(bench, kernel, mode, "rules", "value")
            s.rules = pts[-1].median if pts else math.nan
            for metric, words in EXTRA_FINDINGS:
                stat = next(iter(primary_stat(rows.loc[rows["metric"] == metric, "stat"])), None)
                pts = points(bench, kernel, mode, metric, stat) if stat else []
                if pts and pts[-1].n == s.max_n:
                    s.extras.append((words, pts[-1].median, unit_of(bench, metric),
                                     pts[-1].resolution))
            s.failed = int(rows.loc[rows["stat"] == "failed", "value"].sum())
            mc = checks[(checks["kernel"] == kernel) & (checks["mode"] == mode)]
            s.checks = {k: int(v) for k, v in mc["outcome"].value_counts().items()}
            out.append(s)
    return out


def _level(over: Overhead) -> str:
    """Where a cost that does not grow stands against its floor."""
    floor = "the floor" if over.same_moment else "the floor (measured at the start and end)"
    ci = (f", 95 % CI {fmt(over.low, 'us', signed=True)} to {fmt(over.high, 'us', signed=True)}"
          if over.known else "")
    if abs(over.ratio) <= NOISE:  # below the floor by this little is noise too
        return f"within {abs(over.ratio) * 100:.0f} % of {floor}"
    if over.value < 0:
        return (f"{fmt(-over.value, 'us')} below {floor} ({pct(over.ratio)}{ci}): the Services "
                f"add nothing measurable")
    return f"at {fmt(over.value, 'us', signed=True)} ({pct(over.ratio)}{ci}) over {floor}"


def _exponent(fit: dict) -> str:
    """A growing cost's exponent, with its interval; never one the fit did not determine."""
    if not (_finite(fit.get("k")) and _finite(fit.get("k_low")) and _finite(fit.get("k_high"))):
        return "growing with N (its exponent is not determined by these sizes)"
    text = (f"growing as N<sup>{fit['k']:.2f}</sup> (95 % CI {fit['k_low']:.2f}–"
            f"{fit['k_high']:.2f})")
    if _finite(fit.get("per_1000")):
        text += f", {fmt(fit['per_1000'], 'us', signed=True)} per 1,000 Services"
    return text


def _held(passes: dict | None, verdict: str) -> str:
    """How often the bootstrap over passes gave the same verdict."""
    # One set of passes behind every resample is one fit, not an agreement.
    if not passes or not passes.get("resamples") or int(passes.get("sets") or 0) < 2:
        return ""
    done = int(passes["resamples"])
    same = int((passes.get("verdicts") or {}).get(verdict, 0))
    return (f" <span class='muted'>(the same verdict in {same * 100 // done} % of {done} "
            f"resamples of its {len(passes['passes'])} passes)</span>")


def headline(s: ModeSummary, several_kernels: bool) -> str:
    """One sentence per mode, written from the data, with one growth verdict."""
    who = f"<b>{esc(s.mode)}</b>" + (f" ({esc(s.kernel)})" if several_kernels else "")
    if s.max_n:
        who += f" at {fmt_n(s.max_n)} Services"
    parts = []
    if math.isfinite(s.latency):
        target = metric_label(s.metric).replace("New connection to ", "")
        fit = s.fit or {}
        verdict = fit.get("verdict") or UNKNOWN_VERDICT
        over = s.over
        if verdict in (FLAT, "falls"):
            level = _level(over) if over else f"at {fmt(s.latency, 'us')} per new connection"
            why = f"; {fit['why']}" if fit.get("why") and not (over and over.value < 0) else ""
            if verdict == "falls":
                why = "; it fell as Services were added: drift, not their cost"
            parts.append(f"flat, {level} ({target}, {esc(s.stat)}){why}"
                         f"{_held(s.passes, verdict)}")
        else:
            if over:
                ci = (f", 95 % CI {fmt(over.low, 'us', signed=True)} to "
                      f"{fmt(over.high, 'us', signed=True)}" if over.known else "")
                text = (f"{fmt(over.value, 'us', signed=True)} per new connection over the floor "
                        f"({target}, {esc(s.stat)}, {pct(over.ratio)}{ci})")
            else:
                text = f"{fmt(s.latency, 'us')} per new connection ({target}, {esc(s.stat)})"
            if verdict == GROWS:
                text += f", {_exponent(fit)}{_held(s.passes, GROWS)}"
            elif fit.get("note"):
                text += f"; no growth verdict: {esc(fit['note'])}"
            else:
                text += "; no growth verdict: the fit has no interval"
            parts.append(text)
    if s.podip and s.podip.ratio > NOISE and s.podip.above_floor > 0:
        # every connection pays for the rules, Service traffic or not
        parts.append(f"connections straight to a pod IP {pct(s.podip.ratio)} with the Services "
                     f"installed")
    if not math.isfinite(s.latency) and s.sizes == 1:
        parts.append("measured at one size only (the table under the charts)")
    for label, value, unit, res in s.extras:
        parts.append(f"{label} {esc(fmt_measured(value, unit, res))}{resolution_note(res, unit)}")
    if s.sync:
        metric, value, n = s.sync
        verb = "programs" if metric == "sync_full_s" else "syncs"
        parts.append(f"{verb} {n} Services in {fmt(value, 's')}")
    if s.failed:
        parts.append(f"<span class='bad'>{s.failed} failed connections</span>")
    if s.checks:
        total = sum(s.checks.values())
        text = f"conformance {s.checks.get('passed', 0)}/{total} passed"
        bad = [f"{s.checks[o]} {o}" for o in ("failed", "deviation", "skipped") if s.checks.get(o)]
        if bad:
            text += " (" + ", ".join(bad) + ")"
        cls = "bad" if s.checks.get("failed") else ""
        parts.append(f"<span class='{cls}'>{text}</span>" if cls else text)
    else:
        parts.append("<span class='muted'>no conformance results</span>")
    return f"{who}: " + "; ".join(parts) + "."


def pct(ratio: float) -> str:
    if not _finite(ratio):
        return "–"
    return f"{'−' if ratio < 0 else '+'}{abs(ratio) * 100:.0f} %"


def _finite(v: Any) -> bool:
    try:
        return v is not None and not isinstance(v, bool) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def ranking_sentence(agreed: dict | None, kernel: str) -> str:
    """Whether every pass ranked the modes alike, at each size of one kernel."""
    rows = [r for r in (agreed or {}).get("ranking") or []
            if isinstance(r, dict) and r.get("kernel") == kernel and r.get("same") is not None]
    if not rows:
        return ""
    passes = max(len(r.get("passes") or []) for r in rows)
    differ = [r for r in rows if not r["same"]]
    if not differ:
        return f" Every one of the {passes} passes ranked the modes alike at every size."
    sizes = ", ".join(fmt_n(r["n_services"]) for r in differ)
    return (f" The passes ranked the modes differently at {sizes} Services (of "
            f"{len(rows)} sizes; see <a href='#agreement'>agreement</a>).")


def comparison_sentence(summaries: list[ModeSummary], agreed: dict | None = None) -> str:
    """The modes side by side at the largest size most of them reached, per kernel."""
    out = []
    several = len({s.kernel for s in summaries}) > 1
    for kernel in dict.fromkeys(s.kernel for s in summaries):
        group = [s for s in summaries if s.kernel == kernel and math.isfinite(s.latency)]
        if len(group) < 2:
            continue
        n = max(s.max_n for s in group)
        at_n = [s for s in group if s.max_n == n]
        if len(at_n) < 2:
            n = min(s.max_n for s in group)
        ranked = sorted(group, key=lambda s: s.latency)
        floors = [s.floor for s in group if math.isfinite(s.floor)]
        text = ", ".join(f"{esc(s.mode)} {fmt(s.latency, 'us')}" + (
            f" (at {fmt_n(s.max_n)})" if s.max_n != n else "") for s in ranked)
        floor = f"; floor {fmt(sorted(floors)[len(floors) // 2], 'us')}" if floors else ""
        where = f" on kernel {esc(kernel)}" if several else ""
        out.append(f"At {fmt_n(n)} Services{where}, a new connection (p50) costs: {text}{floor}. "
                   f"Fastest: <b>{esc(ranked[0].mode)}</b>.{ranking_sentence(agreed, kernel)}")
    return " ".join(out)


# --------------------------------------------------------------------------- charts

W, H = 560, 300
ML, MR, MT, MB = 66, 74, 14, 42


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks on a log axis: decades, then 2 and 5, then round steps when the range is narrow."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 5)):
        ticks = [m * 10.0**e for e in range(first, last + 1) for m in mantissas]
        ticks = [t for t in ticks if lo <= t * (1 + 1e-9) and t <= hi * (1 + 1e-9)]
        if len(ticks) >= 3:
            return ticks
    step = 10 ** math.floor(math.log10((hi - lo) / 4))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (m * step) <= 6:
            step *= m
            break
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _domain(values: list[float], pad: float) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi / lo < 1.5:  # a near-constant series still gets an axis with labelled ticks
        mid = math.sqrt(lo * hi)
        lo, hi = mid / 1.3, mid * 1.3
    span = math.log10(hi / lo)
    return lo / 10 ** (span * pad), hi * 10 ** (span * pad)


@dataclass
class Series:
    mode: str
    color: str
    points: list[Point]
    fit: dict | None = None


def svg_chart(chart_id: str, series: list[Series], unit: str, stat: str,
              floor: pd.Series | None = None,
              floor_by_n: dict[int, list[float]] | None = None) -> str:
    """One log-log chart: a line per mode, its spread as a band, the floor as a reference
    (a line along N where it was measured at every size, else a level), and the region
    below the values' resolution shaded."""
    xs = [p.n for s in series for p in s.points]
    ys = [v for s in series for p in s.points for v in (p.low, p.high, p.median) if v > 0]
    by_n = {n: sorted(v for v in vals if v > 0) for n, vals in (floor_by_n or {}).items()}
    by_n = {n: vals for n, vals in sorted(by_n.items()) if vals}
    if len(by_n) < 2:  # one size cannot draw a line: its values are a level like the others
        floor = pd.Series([v for vals in by_n.values() for v in vals]) if by_n else floor
        by_n = {}
    floor_vals = [v for v in (floor if floor is not None else []) if v > 0]
    ys += floor_vals + [v for vals in by_n.values() for v in vals]
    resolution = max((p.resolution for s in series for p in s.points if _finite(p.resolution)),
                     default=math.nan)
    if _finite(resolution) and resolution > 0:
        ys.append(resolution)
    if not xs or not ys:
        return "<p class='muted'>nothing positive to draw on log axes</p>"
    x0, x1 = _domain([float(x) for x in xs], 0.06)
    y0, y1 = _domain(ys, 0.08)
    pw, ph = W - ML - MR, H - MT - MB

    def sx(x: float) -> float:
        return ML + pw * math.log10(x / x0) / math.log10(x1 / x0)

    def sy(y: float) -> float:
        return MT + ph * (1 - math.log10(max(y, y0) / y0) / math.log10(y1 / y0))

    out = [f"<svg class='chart' id='{esc(chart_id)}' viewBox='0 0 {W} {H}' role='img' "
           f"preserveAspectRatio='xMidYMid meet'>"]
    out.append(f"<rect class='plot' x='{ML}' y='{MT}' width='{pw}' height='{ph}'/>")
    for t in log_ticks(x0, x1):
        x = sx(t)
        out.append(f"<line class='grid' x1='{x:.1f}' y1='{MT}' x2='{x:.1f}' y2='{MT + ph}'/>")
        out.append(f"<text class='tick' x='{x:.1f}' y='{MT + ph + 15}' text-anchor='middle'>"
                   f"{fmt_tick_n(t)}</text>")
    labelled = math.inf
    for t in log_ticks(y0, y1):
        y = sy(t)
        out.append(f"<line class='grid' x1='{ML}' y1='{y:.1f}' x2='{ML + pw}' y2='{y:.1f}'/>")
        if labelled - y >= 14:  # a label too close to the one below stays a grid line only
            labelled = y
            out.append(f"<text class='tick' x='{ML - 6}' y='{y + 4:.1f}' text-anchor='end'>"
                       f"{esc(fmt_tick(t, unit))}</text>")
    out.append(f"<text class='axis' x='{ML + pw / 2}' y='{H - 6}' text-anchor='middle'>"
               f"Services (log)</text>")
    out.append(f"<text class='axis' transform='translate(13 {MT + ph / 2}) rotate(-90)' "
               f"text-anchor='middle'>{esc(axis_label(stat, unit))} (log)</text>")
    if _finite(resolution) and resolution > 0:
        top = sy(resolution)
        why = (f"below {fmt(resolution, unit)}: finer than the values can show (their "
               f"resolution: one clock tick over the connections counted)")
        out.append(f"<g class='resolution'><title>{esc(why)}</title>"
                   f"<rect x='{ML}' y='{top:.1f}' width='{pw}' height='{max(MT + ph - top, 0):.1f}'/>"
                   f"<text x='{ML + 4}' y='{min(top + 12, MT + ph - 3):.1f}'>below the resolution, "
                   f"{esc(fmt(resolution, unit))}</text></g>")
    ends: list[list] = []  # [y, x, series or None for the floor] of each line's name
    if by_n:
        mids = {n: vals[len(vals) // 2] for n, vals in by_n.items()}
        upper = " ".join(f"{sx(n):.1f},{sy(vals[-1]):.1f}" for n, vals in by_n.items())
        lower = " ".join(f"{sx(n):.1f},{sy(vals[0]):.1f}" for n, vals in reversed(by_n.items()))
        title = (f"floor: new connection on a path no mode touches, {stat}, measured at every "
                 f"size between the Service connections (median and range over modes and passes)")
        out.append(f"<g class='floor'><title>{esc(title)}</title>"
                   f"<polygon points='{upper} {lower}'/><polyline points='"
                   + " ".join(f"{sx(n):.1f},{sy(v):.1f}" for n, v in mids.items()) + "'/></g>")
        last = list(mids)[-1]
        ends.append([sy(mids[last]) + 4, sx(last) + 6, None])
    elif floor_vals:
        fl = sorted(floor_vals)
        mid = fl[len(fl) // 2]
        lo_y, hi_y = sy(fl[-1]), sy(fl[0])
        title = (f"floor: new connection to a pod IP with no Services, {stat} "
                 f"{fmt(mid, unit)} (range {fmt(fl[0], unit)}–{fmt(fl[-1], unit)}, "
                 f"{len(fl)} measurements: every mode, start and end of its sweep)")
        out.append(f"<g class='floor'><title>{esc(title)}</title>"
                   f"<rect x='{ML}' y='{lo_y:.1f}' width='{pw}' height='{max(hi_y - lo_y, 0.5):.1f}'/>"
                   f"<line x1='{ML}' y1='{sy(mid):.1f}' x2='{ML + pw}' y2='{sy(mid):.1f}'/></g>")
        ends.append([sy(mid) + 4, ML + pw + 4, None])
    for s in series:
        pts = sorted(s.points, key=lambda p: p.n)
        g = [f"<g class='series' data-mode='{esc(s.mode)}' style='--c:{s.color}'>"]
        if len(pts) > 1:
            upper = " ".join(f"{sx(p.n):.1f},{sy(p.high):.1f}" for p in pts)
            lower = " ".join(f"{sx(p.n):.1f},{sy(p.low):.1f}" for p in reversed(pts))
            g.append(f"<polygon class='band' points='{upper} {lower}'><title>{esc(s.mode)}: "
                     f"range over repeats</title></polygon>")
        fit = s.fit or {}
        if fit.get("verdict") == GROWS and _finite(fit.get("k")) and _finite(fit.get("a")) \
                and _finite(fit.get("b")) and len(pts) > 1:
            # The fitted curve, dotted, between the smallest and the largest size.
            n_lo, n_hi = pts[0].n, pts[-1].n
            curve = []
            for i in range(33):
                n = n_lo * (n_hi / n_lo) ** (i / 32)
                v = fit["a"] + fit["b"] * n ** fit["k"]
                if v > 0:
                    curve.append(f"{sx(n):.1f},{sy(min(max(v, y0), y1)):.1f}")
            if len(curve) > 1:
                g.append(f"<polyline class='fit' points='{' '.join(curve)}'><title>{esc(s.mode)} "
                         f"fit: {esc(_fit_text(fit, unit))}</title></polyline>")
        if len(pts) > 1:
            line = " ".join(f"{sx(p.n):.1f},{sy(p.median):.1f}" for p in pts)
            g.append(f"<polyline class='line' points='{line}'/>")
        for p in pts:
            noisy = p.count > 1 and p.spread > NOISE and not p.below_resolution
            others = ", ".join(f"{k} {fmt(v, unit)}" for k, v in sorted(p.others.items()))
            res = p.resolution
            title = (f"{s.mode} at {fmt_n(p.n)} Services: {stat} "
                     f"{fmt_measured(p.median, unit, res)}{resolution_note(res, unit)}"
                     + (f" ({others})" if others else "")
                     + (f"\n{p.count} measurements, {fmt_measured(p.low, unit, res)} to "
                        f"{fmt_measured(p.high, unit, res)}"
                        + (f" (spread {p.spread * 100:.1f} %)" if not _finite(res) else "")
                        if p.count > 1 else "")
                     + ("\nnoisy: repeats differ by more than 5 %" if noisy else ""))
            cls = "pt" + (" noisy" if noisy else "") + (" under" if p.below_resolution else "")
            g.append(f"<circle class='{cls}' cx='{sx(p.n):.1f}' "
                     f"cy='{sy(p.median):.1f}' r='3.5'><title>{esc(title)}</title></circle>")
        if pts:
            ends.append([sy(pts[-1].median) + 4, sx(pts[-1].n) + 6, s])
        g.append("</g>")
        out.extend(g)
    # Lines that end close together get their names pushed apart, never on top of each other.
    ends.sort(key=lambda e: e[0])
    for prev, cur in zip(ends, ends[1:], strict=False):
        cur[0] = max(cur[0], prev[0] + 12)
    if ends and ends[-1][0] > MT + ph + 4:  # pushed off the bottom: pull the stack back up
        ends[-1][0] = MT + ph + 4
        for cur, below in zip(reversed(ends[:-1]), reversed(ends[1:]), strict=False):
            cur[0] = min(cur[0], below[0] - 12)
    for y, x, s in ends:
        if s is None:
            out.append(f"<g class='floor'><text x='{x:.1f}' y='{y:.1f}'>floor</text></g>")
            continue
        out.append(f"<g class='series' data-mode='{esc(s.mode)}' style='--c:{s.color}'>"
                   f"<text class='end' x='{x:.1f}' y='{y:.1f}'>{esc(s.mode)}</text></g>")
    out.append("</svg>")
    return "".join(out)


UNIT_WORDS = {"us": "µs", "s": "seconds", "ms": "ms", "rps": "requests/s", "bytes": "bytes"}


def axis_label(stat: str, unit: str) -> str:
    if PERCENTILE_RE.match(stat):
        return f"{stat}, {UNIT_WORDS.get(unit, unit)}"
    return UNIT_WORDS.get(unit, unit) or stat


def _fit_text(fit: dict, unit: str) -> str:
    """The hover text of a growing series' fitted curve."""
    return (f"{fmt(fit['a'], unit)} + {significant(fit['b'])}·N^{fit['k']:.2f}; "
            f"{fmt(fit.get('per_1000'), unit, signed=True)} per 1,000 Services")


# --------------------------------------------------------------------------- sections


STOPPED = {  # run.json status -> what the banner says
    "incomplete": "<b>Partial run</b>: it stopped before the end",
    "killed": "<b>Killed run</b>: it was stopped from outside before the end",
}



def measured_elsewhere(meta: dict) -> dict[str, str]:
    """Modes a merged run (the guest kernel's) measured: mode -> that run's kernel."""
    out: dict[str, str] = {}
    others = meta.get("other_runs") if isinstance(meta, dict) else None
    for other in (others or {}).values():
        modes = other.get("modes") if isinstance(other, dict) else None
        for mode, info in (modes or {}).items():
            if isinstance(info, dict) and info.get("status") in ("done", "complete"):
                out.setdefault(mode, str(other.get("kernel") or "another kernel"))
    return out

def section_status(run: Run, summaries: list[ModeSummary]) -> str:
    notes = []
    complete = run.complete
    status = run.meta.get("status")
    if isinstance(status, str) and status in STOPPED:
        reason = next((run.meta[k] for k in (f"{status}_reason", "reason")
                       if isinstance(run.meta.get(k), str) and run.meta[k]), None)
        notes.append(STOPPED[status] + (f" ({esc(reason)})" if reason else " (no reason recorded)")
                     + "; everything measured until then is shown.")
    elif complete is False:
        notes.append("<b>Incomplete run</b>: it stopped before the end (interrupted or failed); "
                     "everything measured until then is shown.")
    elif complete is None and RUN_JSON in run.files:
        notes.append("run.json does not say whether the run completed.")
    if run.meta and not run.meta.get("finished") and complete is not True:
        notes.append("No finish time recorded.")
    skipped = run.meta.get("modes_skipped") or {}
    elsewhere = measured_elsewhere(run.meta)
    if isinstance(skipped, dict):
        for mode, reason in skipped.items():
            where = elsewhere.get(mode)
            notes.append(f"Mode <b>{esc(mode)}</b> skipped: {esc(reason)}"
                         + (f"; measured on kernel {esc(where)} instead." if where else ""))
    elif isinstance(skipped, list):
        notes.extend(f"Mode skipped: {esc(m)}" for m in skipped)
    if isinstance(status, str) and status not in ("complete", "done", *STOPPED):
        notes.append(f"Run status: <b>{esc(status)}</b>.")
    modes = run.meta.get("modes")
    if isinstance(modes, dict):
        for mode, info in modes.items():
            mode_status = info.get("status") if isinstance(info, dict) else None
            if mode_status == "skipped" and mode in elsewhere:
                continue  # said above, with the kernel it ran on
            if mode_status and mode_status not in ("done", "complete"):
                notes.append(f"Mode <b>{esc(mode)}</b> ended <b>{esc(mode_status)}</b>"
                             + (f": {esc(info['error'])}" if info.get("error") else "."))
    metrics_skipped = run.meta.get("metrics_skipped")
    if isinstance(metrics_skipped, dict):
        for metric, reason in metrics_skipped.items():
            notes.append(f"Metric <code>{esc(metric)}</code> not measured: {_value_html(reason)}")
    errors = run.meta.get("errors")
    if isinstance(errors, list) and errors:
        notes.append(f"<span class='bad'>{len(errors)} measurement(s) failed</span>: "
                     + "; ".join(_value_html(e) for e in errors[:5])
                     + (" …" if len(errors) > 5 else ""))
    notes.extend(esc(p) for p in run.problems)
    for kernel in dict.fromkeys(s.kernel for s in summaries):
        group = [s for s in summaries if s.kernel == kernel and s.max_n and s.sizes > 1]
        if not group:
            continue
        top = max(s.max_n for s in group)
        for s in group:
            if s.max_n < top:
                notes.append(f"<b>{esc(s.mode)}</b> stopped at {fmt_n(s.max_n)} Services "
                             f"(the sweep reached {fmt_n(top)}): its larger sizes are missing.")
    drift = floor_drift(run.bench)
    notes.extend(drift)
    if not notes:
        return ""
    cls = ("banner warn" if complete is False or status in STOPPED or run.problems
           or run.meta.get("errors") else "banner")
    return f"<div class='{cls}'><ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul></div>"


def floor_drift(bench: pd.DataFrame) -> list[str]:
    """The floor is measured at the start and the end of each sweep; a drift means noise."""
    out = []
    sel = bench[bench["metric"].map(agreement.is_floor) & (bench["n_services"] == 0)
                & (bench["stat"] == "p50")]
    for (_kernel, mode), g in sel.groupby(["kernel", "mode"]):
        start, end = g[g["when"] == "start"]["value"], g[g["when"] == "end"]["value"]
        if len(start) and len(end) and start.median() > 0:
            change = end.median() / start.median() - 1
            if abs(change) > NOISE:
                out.append(f"The floor of <b>{esc(mode)}</b> moved {pct(change)} between "
                           f"the start and the end of its sweep ({fmt(start.median(), 'us')} to "
                           f"{fmt(end.median(), 'us')}): the machine was not quiet.")
    return out


def section_headline(summaries: list[ModeSummary], agreed: dict | None = None) -> str:
    if not summaries:
        return "<p class='muted'>No measurements and no conformance results.</p>"
    several = len({s.kernel for s in summaries}) > 1
    out = []
    lead = comparison_sentence(summaries, agreed)
    if lead:
        out.append(f"<p class='lead'>{lead}</p>")
    out.append("<ul class='findings'>")
    out.extend(f"<li><span class='swatch' style='background:{mode_color(s.mode, MODE_COLORS)}'>"
               f"</span>{headline(s, several)}</li>" for s in summaries)
    out.append("</ul>")
    out.append(scorecard(summaries, several))
    return "".join(out)


def scorecard(summaries: list[ModeSummary], several_kernels: bool) -> str:
    head = ["mode", *(["kernel"] if several_kernels else []), "largest N", "new conn p50",
            "over floor", "growth", "pod IP p50", "sync", "rules", "conformance"]
    rows = []
    for s in summaries:
        growth = _growth_cell(s.fit or {}) if s.fit else "–"
        checks = s.checks
        conf = (f"{checks.get('passed', 0)}/{sum(checks.values())}" if checks else "–")
        conf_cls = "bad" if checks.get("failed") else ("good" if checks else "muted")
        over = (f"{fmt(s.overhead, 'us', signed=True)} ({pct(s.overhead_ratio)})"
                if math.isfinite(s.latency) and math.isfinite(s.floor) else "–")
        cells = [f"<b>{esc(s.mode)}</b>", *([esc(s.kernel)] if several_kernels else []),
                 fmt_n(s.max_n) if s.max_n else "–", fmt(s.latency, "us"), over, growth,
                 fmt(s.podip_latency, "us"), fmt(s.sync[1], "s") if s.sync else "–",
                 fmt(s.rules, "") if math.isfinite(s.rules) else "–",
                 f"<span class='{conf_cls}'>{conf}</span>"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table class='score'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _growth_cell(fit: dict) -> str:
    """A fit's one verdict in a table cell: N^k only for a cost that grows."""
    verdict = fit.get("verdict")
    if verdict == GROWS:
        return (f"<span class='grow'>N<sup>{fit['k']:.2f}</sup></span>" if _finite(fit.get("k_low"))
                and _finite(fit.get("k_high")) and _finite(fit.get("k"))
                else "<span class='grow'>grows</span> <span class='muted'>(k not determined)</span>")
    if verdict == FLAT:
        return "<span class='good'>flat</span>"
    if verdict == "falls":
        return "flat <span class='muted'>(fell: drift)</span>"
    return "<span class='muted'>" + ("needs 3 sizes" if fit.get("note") else "no verdict") + "</span>"


def section_conformance(checks: pd.DataFrame) -> str:
    if checks.empty:
        return "<p class='muted'>No conformance results in this run.</p>"
    several = checks["kernel"].nunique() > 1
    columns = []
    for kernel, mode in checks[["kernel", "mode"]].drop_duplicates().itertuples(index=False):
        columns.append((kernel, mode))
    modes = modes_of(checks.iloc[0:0], checks)
    columns.sort(key=lambda km: (km[0], modes.index(km[1]) if km[1] in modes else 99))
    names = list(dict.fromkeys(checks["name"]))
    cell = {(r.kernel, r.mode, r.name): r for r in checks.itertuples(index=False)}
    head = "".join(f"<th>{esc(m)}{'<br><small>' + esc(k) + '</small>' if several else ''}</th>"
                   for k, m in columns)
    totals = []
    for kernel, mode in columns:
        sel = checks[(checks["kernel"] == kernel) & (checks["mode"] == mode)]
        counts = sel["outcome"].value_counts()
        cls = "bad" if counts.get("failed", 0) else "good"
        totals.append(f"<td class='{cls}'>{counts.get('passed', 0)}/{len(sel)}</td>")
    rows = [f"<tr class='total'><th>passed</th>{''.join(totals)}</tr>"]
    for name in names:
        tds = []
        for kernel, mode in columns:
            r = cell.get((kernel, mode, name))
            if r is None:
                tds.append("<td class='none' title='not run'></td>")
                continue
            dur = f" in {r.duration_s:.2f} s" if _finite(r.duration_s) else ""
            title = f"{mode}: {r.outcome}{dur}" + (f": {r.reason}" if r.reason else "")
            tds.append(f"<td class='o-{esc(r.outcome)}' title='{esc(title)}'>"
                       f"{OUTCOME_MARK.get(r.outcome, '?')} {esc(r.outcome)}</td>")
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(tds)}</tr>")
    legend = ("<p class='muted'>✓ passed · ✗ failed · ≈ deviation (declared, explained on hover) · "
              "– skipped · hover a cell for its reason.</p>")
    return (f"<table class='matrix'><thead><tr><th>check</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{legend}")


def metric_docs(run: Run) -> dict[str, str]:
    """What each metric measures, from run.json's catalog."""
    catalog = run.meta.get("metrics")
    return {m["name"]: str(m.get("doc") or "") for m in catalog
            if isinstance(m, dict) and m.get("name")} if isinstance(catalog, list) else {}


def section_charts(run: Run, series_keys: list[tuple[str, str, str]], fits: pd.DataFrame,
                   single: list[tuple[str, str, str]] = ()) -> str:
    bench = run.bench
    if not series_keys and not single:
        return "<p class='muted'>No measurements to chart.</p>"
    several = len({k for k, _, _ in [*series_keys, *single]}) > 1
    modes = modes_of(bench, run.checks)
    docs = metric_docs(run)
    out = []
    if series_keys:
        legend = "".join(f"<button class='key' data-mode='{esc(m)}' "
                         f"style='--c:{mode_color(m, modes)}'>{esc(m)}</button>"
                         for m in modes if m in set(bench["mode"]))
        out.append(f"<div class='legend'>{legend}<span class='key floor-key'>floor (no Services "
                   f"on its path)</span><span class='muted'> · line: median over repeats · band: "
                   f"range over repeats · dotted: growth fit · ringed point: spread over 5 % · "
                   f"hollow point: below the resolution (shaded) · click a mode to hide it"
                   f"</span></div><div class='charts'>")
    for i, (kernel, metric, stat) in enumerate(series_keys):
        unit = unit_of(bench, metric)
        series = []
        for mode in modes:
            pts = points(bench, kernel, mode, metric, stat)
            if pts:
                series.append(Series(mode, mode_color(mode, modes), pts,
                                     fit_row(fits, kernel, mode, metric, stat)))
        floor = by_n = None
        if metric.partition(":")[0] in FLOORED:
            floor = floor_values(bench, kernel, None, stat)
            by_n = same_moment_floor(bench, kernel, stat, unit)
        title = metric_label(metric)
        doc = docs.get(metric.partition(":")[0], "")
        sub = f"{stat}, {unit}" if stat not in ("value", "count") else unit
        kern = f" · kernel {esc(kernel)}" if several else ""
        out.append(f"<figure><figcaption title='{esc(doc)}'><b>{esc(title)}</b> "
                   f"<span class='muted'>{esc(sub)}{kern} · <code>{esc(metric)}</code></span>"
                   f"</figcaption>"
                   f"{svg_chart(f'chart-{i}', series, unit, stat, floor, by_n)}</figure>")
    if series_keys:
        out.append("</div>")
    if single:
        out.append(single_size_table(run, single, several))
    return "".join(out)


def single_size_table(run: Run, keys: list[tuple[str, str, str]], several_kernels: bool) -> str:
    """Series measured at one size only: a line needs two, so they are a table."""
    bench, docs = run.bench, metric_docs(run)
    head = ["metric", "mode", *(["kernel"] if several_kernels else []), "Services", "median",
            "range over repeats", "measurements"]
    rows = []
    for kernel, metric, stat in keys:
        unit = unit_of(bench, metric)
        for mode in modes_of(bench, run.checks):
            for p in points(bench, kernel, mode, metric, stat):
                res = p.resolution
                spread = (esc(f"{fmt_measured(p.low, unit, res)} to {fmt_measured(p.high, unit, res)}")
                          if p.count > 1 else "<span class='muted'>one measurement</span>")
                cells = [f"<span title='{esc(docs.get(metric.partition(':')[0], ''))}'>"
                         f"{esc(metric_label(metric))}</span> <span class='muted'>{esc(stat)}"
                         f"</span>", f"<b>{esc(mode)}</b>",
                         *([esc(kernel)] if several_kernels else []), fmt_n(p.n),
                         esc(fmt_measured(p.median, unit, res)) + resolution_note(res, unit), spread,
                         str(p.count)]
                rows.append(cells)
    return ("<h3>Measured at one size</h3><p class='muted'>A line needs two sizes; these were "
            "measured at one.</p>" + html_table("single", head, rows))


def section_fits(fits: pd.DataFrame, several_kernels: bool) -> str:
    if fits.empty:
        return "<p class='muted'>No series to fit.</p>"
    head = ["metric", "mode", *(["kernel"] if several_kernels else []), "growth", "k (95 % CI)",
            "added at the largest N (95 % CI)", "per 1,000 Services (95 % CI)",
            "b per Service (95 % CI)", "a: does not grow", "sizes", "points"]
    rows = []
    modes = list(MODE_COLORS)
    ordered = fits.assign(
        _m=fits["metric"].map(lambda m: ORDER.index(m) if m in ORDER else len(ORDER)),
        _o=fits["mode"].map(lambda m: modes.index(m) if m in modes else 99),
    ).sort_values(["_m", "metric", "_o", "mode"])
    for r in ordered.to_dict("records"):
        r = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        unit = r.get("unit") or ""
        label = f"{esc(metric_label(r['metric']))} <span class='muted'>{esc(r['stat'])}</span>"
        mode = f"<b>{esc(r['mode'])}</b>"
        kern = [esc(r["kernel"])] if several_kernels else []
        if not _finite(r.get("a")):
            rows.append(f"<tr><td>{label}</td><td>{mode}</td>{''.join(f'<td>{k}</td>' for k in kern)}"
                        f"<td colspan='8' class='muted'>{esc(r.get('note') or 'no fit')}</td></tr>")
            continue
        grows = r.get("verdict") == GROWS
        growth = _growth_cell(r)
        res = r.get("resolution")
        # A constant series fits its added part at 1e-15 of its level: that is a zero.
        dust = 1e-9 * max(abs(r["a"]), abs(r.get("level") or 0.0))
        for key in ("added_max", "added_max_low", "added_max_high"):
            if _finite(r.get(key)) and abs(r[key]) < dust:
                r[key] = 0.0
        if _finite(res) and max(abs(r["added_max_low"] or 0), abs(r["added_max_high"] or 0)) < res:
            added = f"within the resolution ({fmt(res, unit)})"
        else:
            added = _ci_fmt(r["added_max"], r["added_max_low"], r["added_max_high"], unit,
                            signed=True)
        added += f" <span class='muted'>at {fmt_n(r['max_n'])}</span>"
        if not grows:
            # No growth to quote: its exponent and rates would be read from noise, and the
            # part that does not grow is then simply the mean.
            k = per = b = "<span class='muted'>– (not growing)</span>"
            a = (esc(fmt_measured(r["level"], unit, res)) if _finite(res) and r["level"] < res
                 else _ci_fmt(r["level"], r["level_low"], r["level_high"], unit))
            a += " <span class='muted'>mean</span>"
        else:
            k = _ci(r["k"], r["k_low"], r["k_high"], "{:.2f}")
            per = _ci_fmt(r["per_1000"], r["per_1000_low"], r["per_1000_high"], unit, signed=True)
            if r["max_n"] < 1000:
                per += " <span class='muted'>extrapolated beyond the sweep</span>"
            b = _ci_fmt(r["b"], r["b_low"], r["b_high"], unit)
            a = _ci_fmt(r["a"], r["a_low"], r["a_high"], unit)
        notes = [n for n in (r.get("why"), r.get("note") if grows else None) if n]
        if _finite(res) and "resolution" not in (r.get("why") or ""):
            notes.append(f"values resolve to {fmt(res, unit)}")
        note = "".join(f" <span class='muted'>({esc(n)})</span>" for n in notes)
        cells = [label, mode, *kern, growth + note, k, added, per, b, a,
                 esc(str(r["sizes"]).replace(",", ", ")), str(int(r["n_points"]))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<p class='muted'>cost = a + b·N<sup>k</sup> by least squares over every measurement "
            "(repeats are points), 95 % confidence intervals. One verdict per row: it grows only "
            "when the interval of what the largest size adds lies above zero, that growth exceeds "
            "the values' resolution, and a new connection stands above its floor at the largest "
            "size; otherwise flat, and k is not quoted.</p><table class='fits'><thead><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def run_agreement(run: Run) -> tuple[dict | None, str]:
    """(agreement figures, where they come from): run.json's when they cover every kernel
    and mode the rows hold (a merged guest run adds some), else computed from the rows."""
    stored = run.meta.get("agreement")
    if isinstance(stored, dict) and isinstance(stored.get("growth"), list) \
            and isinstance(stored.get("ranking"), list):
        bench = run.bench
        sel = bench[(bench["metric"] == stored.get("series")) & (bench["n_services"] > 0)
                    & (bench["stat"] == stored.get("stat", agreement.PRIMARY_STAT))]
        covered = {(g.get("kernel"), g.get("mode")) for g in stored["growth"] if isinstance(g, dict)}
        if stored.get("series") and set(zip(sel["kernel"], sel["mode"], strict=True)) <= covered:
            return stored, RUN_JSON
    if run.bench.empty:
        return None, ""
    return agreement.agreement(run.bench), BENCH_CSV


def html_table(cls: str, head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of HTML cells under a header row."""
    return (f"<table class='{cls}'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
            + "</tbody></table>")


def _ranking_cells(r: dict, several_kernels: bool) -> list[str]:
    same = r.get("same")
    if same is None:
        verdict = "<span class='muted'>one pass: nothing to compare</span>"
    elif same:
        verdict = "<span class='good'>yes</span>"
    else:
        verdict = "<span class='bad'>no</span>: " + "; ".join(
            f"pass {int(d['repeat']) + 1} put "
            + ", ".join(f"{esc(b)} before {esc(a)}" for a, b in d.get("swapped") or [])
            for d in r.get("disagreeing") or [] if isinstance(d, dict))
    order = " &lt; ".join(esc(m) for m in r.get("order") or [])
    if r.get("basis") != "latency":
        order += " <span class='muted'>(over the same-moment floor)</span>"
    return [fmt_n(r.get("n_services", 0)), *([esc(r.get("kernel"))] if several_kernels else []),
            order, str(len(r.get("passes") or [])), verdict]


def _growth_cells(g: dict, several_kernels: bool) -> list[str]:
    each = ", ".join(
        f"{esc(p.get('verdict') or 'no fit')}"
        + (f" (k {float(p['k']):.2f})" if _finite(p.get("k")) else "")
        for p in g.get("per_pass") or [] if isinstance(p, dict)) or "–"
    done = int(g.get("resamples") or 0)
    if done:
        sets = int(g.get("sets") or 0)
        boot = ", ".join(f"{esc(v)} {int(c) * 100 // done} %" for v, c in
                         sorted((g.get("verdicts") or {}).items(), key=lambda x: -x[1]))
        boot += (f" <span class='muted'>of {done} resamples"
                 + (f", {sets} distinct set{'s' if sets != 1 else ''} of passes"
                    if sets < 4 else "") + "</span>")
    else:
        boot = "<span class='muted'>needs two passes or more</span>"
    k = g.get("k") if isinstance(g.get("k"), dict) else None
    k_text = (f"{float(k['median']):.2f} <span class='muted'>({float(k['low']):.2f}–"
              f"{float(k['high']):.2f})</span>"
              if k and all(_finite(k.get(x)) for x in ("median", "low", "high"))
              else "<span class='muted'>– (growth is not the usual verdict)</span>")
    return [f"<b>{esc(g.get('mode'))}</b>", *([esc(g.get("kernel"))] if several_kernels else []),
            each, boot, k_text]


def section_agreement(agreed: dict | None, source: str, several_kernels: bool) -> str:
    if not agreed or not agreed.get("series"):
        return "<p class='muted'>No new-connection latency to compare across passes.</p>"
    series, stat = str(agreed["series"]), str(agreed.get("stat") or agreement.PRIMARY_STAT)
    kernel = ["kernel"] if several_kernels else []
    out = [f"<p class='muted'>A pass is one trip over the sizes (up, then down in the next). "
           f"{esc(metric_label(series))}, {esc(stat)}: each pass ranks the modes by its own "
           f"median (by what the Services add over the floor of the same moments, where one was "
           f"measured at every size), and each mode's growth is fitted on each pass alone and "
           f"on passes drawn with replacement (bootstrap). From {esc(source)}.</p>"]
    ranking = [r for r in agreed.get("ranking") or [] if isinstance(r, dict)]
    out.append(html_table("agree", ["Services", *kernel, "ranking (fastest first)", "passes",
                                    "same in every pass?"],
                          [_ranking_cells(r, several_kernels) for r in ranking]) if ranking
               else "<p class='muted'>No size with two modes or more measured in every pass.</p>")
    growth = [g for g in agreed.get("growth") or [] if isinstance(g, dict)]
    if growth:
        out.append(html_table("agree", ["mode", *kernel, "each pass alone",
                                        "bootstrap over passes", "k: median (2.5–97.5 %)"],
                              [_growth_cells(g, several_kernels) for g in growth]))
    return "".join(out)


def _ci(v: float, lo: float, hi: float, form: str) -> str:
    if not _finite(v):
        return "–"
    if not (_finite(lo) and _finite(hi)):
        return form.format(v) + " <span class='muted'>(CI unknown)</span>"
    return f"{form.format(v)} <span class='muted'>({form.format(lo)} to {form.format(hi)})</span>"


def _ci_fmt(v: float, lo: float, hi: float, unit: str, signed: bool = False) -> str:
    if not (_finite(lo) and _finite(hi)):
        return fmt(v, unit, signed) + " <span class='muted'>(CI unknown)</span>"
    return (f"{fmt(v, unit, signed)} <span class='muted'>({fmt(lo, unit, signed)} to "
            f"{fmt(hi, unit, signed)})</span>")


ENV_KEYS = (
    ("kernel", "kernel"), ("kernel_version", "kernel build"), ("cpu", "CPU"),
    ("cpu_model", "CPU"), ("cpus", "CPUs"), ("machine", "machine"), ("hostname", "host"),
    ("python", "Python"), ("git", "git revision"), ("started", "started"),
    ("time_utc", "recorded"), ("finished", "finished"), ("complete", "complete"),
    ("versions", "versions"), ("tools", "tools"), ("packages", "Python packages"),
    ("args", "arguments"), ("argv", "command line"), ("modes_skipped", "modes skipped"),
    ("noisy", "flagged noisy"), ("python_implementation", "Python implementation"),
    ("kernel_kind", "kernel kind"), ("status", "status"), ("wall_s", "wall time, s"),
    ("rows", "measurements"), ("modes", "modes"), ("metrics_skipped", "metrics skipped"),
    ("errors", "errors"), ("metrics", "metrics"),
)
# A key that says it all makes these others repeat it (results.environment() vs run.json).
SUPERSEDES = {"cpu": ("cpu_model",), "versions": ("tools", "packages")}


def _value_html(value: Any) -> str:
    if isinstance(value, dict):
        if not value:
            return "<span class='muted'>none</span>"
        if "revision" in value:  # git: {"revision", "dirty"}
            dirty = " <span class='bad'>with uncommitted changes</span>" if value.get("dirty") else ""
            return f"<code>{esc(str(value.get('revision') or 'unknown')[:12])}</code>{dirty}"
        if all(not isinstance(v, dict) and not (isinstance(v, list) and any(
                isinstance(x, (dict, list)) for x in v)) for v in value.values()):
            return " · ".join(f"<span class='muted'>{esc(k)}</span> {_value_html(v)}"
                              for k, v in value.items())
        return ("<table class='kv'>" + "".join(
            f"<tr><th>{esc(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in value.items())
            + "</table>")
    if isinstance(value, list):
        if not value:
            return "<span class='muted'>none</span>"
        if all(not isinstance(v, (dict, list)) for v in value):
            return "<code>" + esc(" ".join(str(v) for v in value)) + "</code>"
        return "<ul>" + "".join(f"<li>{_value_html(v)}</li>" for v in value) + "</ul>"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "<span class='muted'>unknown</span>"
    return esc(value)


def _noisy_html(noisy: list, spread: Any) -> str:
    """The runner's noisy rows: a count up front, the rows folded away."""
    total = f" of {len(spread)}" if isinstance(spread, list) and spread else ""
    if not noisy:
        return f"<span class='muted'>none{total + ' repeated measurements' if total else ''}</span>"
    rows = []
    for item in noisy:
        if not isinstance(item, dict):
            rows.append(f"<tr><td colspan='6'>{_value_html(item)}</td></tr>")
            continue
        values = item.get("values")
        rows.append(
            f"<tr><td>{esc(item.get('mode', ''))}</td><td>{esc(item.get('n_services', ''))}"
            f"{' ' + esc(item['when']) if item.get('when') else ''}</td>"
            f"<td>{esc(item.get('metric', ''))}</td><td>{esc(item.get('target', ''))}</td>"
            f"<td>{esc(item.get('stat', ''))}</td><td>"
            + (f"{float(item['spread']) * 100:.1f} %" if _finite(item.get("spread"))
               else "no median to compare with")
            + (f" <span class='muted'>{esc(', '.join(str(v) if _finite(v) else '–' for v in values))}</span>"
               if isinstance(values, list) else "") + "</td></tr>")
    return (f"<b>{len(noisy)}{total}</b> repeated measurements spread more than 5 % between "
            f"repeats<details><summary>which</summary><table class='kv'><tr><th>mode</th>"
            f"<th>N</th><th>metric</th><th>target</th><th>stat</th><th>spread, values</th></tr>"
            + "".join(rows) + "</table></details>")


def _catalog_html(metrics: list) -> str:
    rows = "".join(
        f"<tr><th>{esc(m.get('name', ''))}</th><td>{esc(m.get('unit', ''))}</td>"
        f"<td>{esc(m.get('doc', ''))}</td></tr>" for m in metrics if isinstance(m, dict))
    return (f"{len(metrics)} metrics<details><summary>what each measures</summary>"
            f"<table class='kv'>{rows}</table></details>")


def _modes_html(modes: dict) -> str:
    parts = []
    for mode, info in modes.items():
        if not isinstance(info, dict):
            parts.append(f"<b>{esc(mode)}</b> {_value_html(info)}")
            continue
        text = f"<b>{esc(mode)}</b> {esc(info.get('status', ''))}"
        if _finite(info.get("wall_s")):
            text += f" in {float(info['wall_s']):.0f} s"
        load = [info.get("loadavg_start"), info.get("loadavg_end")]
        if all(isinstance(v, list) and v for v in load):
            text += (f" <span class='muted'>(load {float(load[0][0]):.1f} → "
                     f"{float(load[1][0]):.1f})</span>")
        parts.append(text)
    return " · ".join(parts)


def section_environment(run: Run) -> str:
    meta = run.meta
    pairs = []  # (label, html, warn, wide)
    shown = {k for key, others in SUPERSEDES.items() if meta.get(key) for k in others}
    shown.add("spread")  # summarised with `noisy`
    special = {
        "noisy": lambda v: _noisy_html(v, meta.get("spread")) if isinstance(v, list) else None,
        "metrics": lambda v: _catalog_html(v) if isinstance(v, list) else None,
        "modes": lambda v: _modes_html(v) if isinstance(v, dict) else None,
    }
    wide = {"versions", "argv", "noisy", "metrics", "args", "modes_skipped", "errors"}

    def add(key: str, label: str) -> None:
        shown.add(key)
        value = meta[key]
        html_value = special[key](value) if key in special else None
        pairs.append((label, html_value if html_value is not None else _value_html(value),
                      key in ("noisy", "errors") and bool(value), key in wide))

    for key, label in ENV_KEYS:
        if key in meta and key not in shown:
            add(key, label)
    for key in list(meta):
        if key not in shown:
            add(key, key.replace("_", " "))
    bench = run.bench
    kernels = sorted(set(bench["kernel"])) if len(bench) else []
    if kernels and "kernel" not in meta:
        pairs.append(("kernel (from bench.csv)", esc(", ".join(kernels)), False, False))
    pairs.append(("run folder", f"<code>{esc(run.path)}</code>", False, False))
    pairs.append(("files read", f"{esc(', '.join(run.files))} <span class='muted'>({len(bench)} "
                  f"measurements, {len(run.checks)} check results)</span>", False, False))
    # Long values take a whole row; short ones pair up two to a row.
    pairs.sort(key=lambda p: p[3])
    return "<div class='env'>" + "".join(
        f"<div class='k{' warn' if warn else ''}'>{esc(label)}</div>"
        f"<div class='v{' warn' if warn else ''}{' wide' if is_wide else ''}'>{value}</div>"
        for label, value, warn, is_wide in pairs
    ) + "</div>"


def compare_runs(new: Run, old: Run) -> pd.DataFrame:
    """Change per metric and mode at the largest size both runs measured, against the noise."""
    rows = []
    for kernel, metric, stat in chart_series(new.bench):
        for mode in modes_of(new.bench, new.checks):
            now = {p.n: p for p in points(new.bench, kernel, mode, metric, stat)}
            before = {p.n: p for p in points(old.bench, kernel, mode, metric, stat)}
            common = sorted(set(now) & set(before))
            if not common:
                continue
            n = common[-1]
            a, b = before[n], now[n]
            if not a.median:
                continue
            change = b.median / a.median - 1
            # A value counted in clock ticks moves by a tick without anything changing.
            res = max((x.resolution / abs(a.median) for x in (a, b) if _finite(x.resolution)),
                      default=0.0)
            noise = max(NOISE, a.spread, b.spread, res)
            worse = -change if higher_is_better(metric) else change
            verdict = ("regression" if worse > noise else "improvement" if worse < -noise
                       else "within noise")
            rows.append({"kernel": kernel, "metric": metric, "stat": stat, "mode": mode, "n": n,
                         "old": a.median, "new": b.median, "change": change, "noise": noise,
                         "verdict": verdict, "unit": unit_of(new.bench, metric)})
    return pd.DataFrame(rows)


def section_compare(new: Run, old: Run) -> str:
    table = compare_runs(new, old)
    intro = (f"<p>Against <code>{esc(old.path)}</code>"
             f" ({esc(old.meta.get('started') or old.meta.get('time_utc') or 'time unknown')}): each "
             f"metric and mode at the largest size both runs measured, on the same kernel. A change "
             f"is a regression when it is worse by more than the noise: the larger of 5 % and "
             f"either run's spread over repeats.</p>")
    if table.empty:
        kernels_new = sorted(set(new.bench["kernel"])) if len(new.bench) else []
        kernels_old = sorted(set(old.bench["kernel"])) if len(old.bench) else []
        return intro + (f"<p class='muted'>Nothing to compare: no metric, mode and size in common "
                        f"(kernels {esc(', '.join(kernels_new) or 'none')} now, "
                        f"{esc(', '.join(kernels_old) or 'none')} before).</p>")
    regressions = int((table["verdict"] == "regression").sum())
    summary = (f"<p class='{'bad' if regressions else 'good'}'><b>{regressions} regression"
               f"{'' if regressions == 1 else 's'}</b> beyond noise, "
               f"{int((table['verdict'] == 'improvement').sum())} improvements, "
               f"{int((table['verdict'] == 'within noise').sum())} within noise.</p>")
    rows = []
    for r in table.to_dict("records"):
        cls = {"regression": "regress", "improvement": "improve"}.get(r["verdict"], "")
        rows.append(
            f"<tr class='{cls}'><td>{esc(metric_label(r['metric']))} <span class='muted'>"
            f"{esc(r['stat'])}</span></td><td><b>{esc(r['mode'])}</b></td><td>{fmt_n(r['n'])}</td>"
            f"<td>{fmt(r['old'], r['unit'])}</td><td>{fmt(r['new'], r['unit'])}</td>"
            f"<td>{'−' if r['change'] < 0 else '+'}{abs(r['change']) * 100:.1f} %</td><td>±{r['noise'] * 100:.1f} %</td>"
            f"<td>{esc(r['verdict'])}</td></tr>")
    return (intro + summary + "<table class='compare'><thead><tr><th>metric</th><th>mode</th>"
            "<th>Services</th><th>before</th><th>now</th><th>change</th><th>noise</th>"
            "<th>verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


# --------------------------------------------------------------------------- page

CSS = """
:root{--fg:#1d2430;--muted:#6a7280;--line:#d9dde3;--bg:#fff;--soft:#f5f6f8;--bad:#b3261e;
--good:#1b7f3b;--warn:#8a5a00}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);
background:var(--bg);margin:0;padding:20px 28px 60px;max-width:1320px}
h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;
border-bottom:2px solid var(--line)}
.sub{color:var(--muted);margin-bottom:12px}
.chip{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
vertical-align:middle;margin-left:8px}
.chip.ok{background:#e3f3e8;color:var(--good)}.chip.partial{background:#fdecc8;color:var(--warn)}
.banner{border-left:4px solid #8a9099;background:var(--soft);padding:6px 12px;margin:10px 0}
.banner.warn{border-color:#d98a00;background:#fff6e0}.banner ul{margin:0;padding-left:18px}
.muted{color:var(--muted)}.bad{color:var(--bad);font-weight:600}.good{color:var(--good)}
.grow{color:var(--bad);font-weight:600}
.lead{font-size:15px;margin:6px 0}
ul.findings{list-style:none;padding:0;margin:6px 0 10px}ul.findings li{margin:4px 0;padding-left:18px;
position:relative}
.swatch{position:absolute;left:0;top:6px;width:11px;height:11px;border-radius:2px}
table{border-collapse:collapse;font-size:13px}
th,td{padding:3px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:var(--soft);font-weight:600}
table.score td:nth-child(n+3),table.fits td:nth-child(n+4),table.single td:nth-child(n+3)
{font-variant-numeric:tabular-nums}h3{font-size:14px;margin:16px 0 4px}table.agree{margin:8px 0}
table.matrix td{text-align:center;min-width:92px;cursor:help}
table.matrix th{font-weight:500}table.matrix thead th{text-align:center;font-weight:600}
table.matrix tr.total td{font-weight:600}
.o-passed{background:#e3f3e8;color:var(--good)}.o-failed{background:#fbe1df;color:var(--bad);
font-weight:600}.o-deviation{background:#fdecc8;color:var(--warn)}.o-skipped{background:#eef0f3;
color:var(--muted)}td.none{background:repeating-linear-gradient(45deg,#fff,#fff 4px,#f1f2f4 4px,
#f1f2f4 8px)}
.legend{margin:4px 0 8px;display:flex;flex-wrap:wrap;gap:6px;align-items:center}
.key{border:1px solid var(--line);background:#fff;border-radius:12px;padding:1px 10px 1px 22px;
font:inherit;font-size:12.5px;position:relative;cursor:pointer}
.key::before{content:"";position:absolute;left:7px;top:50%;width:10px;height:3px;margin-top:-1px;
background:var(--c)}
.key.off{opacity:.4;text-decoration:line-through}
.floor-key{cursor:default}.floor-key::before{background:none;border-top:2px dashed #707780}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px 22px}
figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:8px 8px 2px}
figcaption{font-size:13px;margin:0 0 2px 4px}
svg.chart{width:100%;height:auto;display:block}
svg .plot{fill:#fcfcfd;stroke:#c5cad1}svg .grid{stroke:#eceef1}
svg .tick{font-size:10.5px;fill:#5f6672}svg .axis{font-size:11px;fill:#5f6672}
svg .floor rect,svg .floor polygon{fill:#8a9099;opacity:.11}
svg .floor line,svg .floor polyline{fill:none;stroke:#707780;stroke-width:1.5;stroke-dasharray:6 4}
svg .floor text{font-size:11px;fill:#5f6672}
svg .resolution rect{fill:#6b6b6b;opacity:.09}svg .resolution text{font-size:10.5px;fill:#5f6672}
svg .series .pt.under{fill:#fff;stroke:var(--c);stroke-width:1.6}
svg .series .band{fill:var(--c);opacity:.18}
svg .series .line{fill:none;stroke:var(--c);stroke-width:2.2}
svg .series .fit{fill:none;stroke:var(--c);stroke-width:1.3;stroke-dasharray:1.5 3;opacity:.9}
svg .series .pt{fill:var(--c);stroke:#fff;stroke-width:1}
svg .series .pt.noisy{stroke:#d98a00;stroke-width:2.2}
svg .series .pt:hover{r:6}
svg .series .end{font-size:11px;font-weight:600;fill:var(--c)}
svg .series.off{display:none}
.env{display:grid;grid-template-columns:150px minmax(0,1fr) 150px minmax(0,1fr);gap:0;
font-size:13px}.env>div{padding:3px 9px;border-bottom:1px solid var(--line);overflow-wrap:anywhere}
.env .k{font-weight:600;color:#3d4552}.env .warn{background:#fff6e0}
.env .wide{grid-column:span 3}details{margin-top:2px}summary{cursor:pointer;color:#3b6fb6}
table.kv th{font-weight:600;width:180px;color:#3d4552}table.kv table.kv th{width:auto;
font-weight:500}
table.kv table.kv td,table.kv table.kv th{border-bottom:none;padding:1px 9px 1px 0}
tr.warn th,tr.warn td{background:#fff6e0}
tr.regress td{background:#fbe1df}tr.regress td:nth-child(6){color:var(--bad);font-weight:700}
tr.improve td{background:#e3f3e8}
code{font-size:12px;background:var(--soft);padding:0 3px;border-radius:3px}
footer{margin-top:30px;color:var(--muted);font-size:12px}
"""

# Clicking a mode in the legend hides its line in every chart.
SCRIPT = """
document.querySelectorAll('button.key').forEach(function (b) {
  b.addEventListener('click', function () {
    var off = b.classList.toggle('off');
    document.querySelectorAll('g.series').forEach(function (g) {
      if (g.dataset.mode === b.dataset.mode) g.classList.toggle('off', off);
    });
  });
});
"""


def render_html(run: Run, older: Run | None = None) -> str:
    """The whole report as one HTML string (no external resources)."""
    series_keys, single = split_series(run.bench, chart_series(run.bench))
    fits = fits_for(run.bench, series_keys)
    agreed, agreed_from = run_agreement(run)
    summaries = summarize_modes(run, fits, agreed)
    several_kernels = len({s.kernel for s in summaries}) > 1
    complete = run.complete
    status = run.meta.get("status")
    chip = ("<span class='chip ok'>complete</span>" if complete
            else f"<span class='chip partial'>{esc(status)}</span>" if status in STOPPED
            else "<span class='chip partial'>incomplete</span>" if complete is False
            else "<span class='chip partial'>completeness unknown</span>")
    kernels = ", ".join(dict.fromkeys([*run.bench["kernel"], *run.checks["kernel"]])) or \
        str(run.meta.get("kernel") or "unknown")
    sizes = sorted({int(n) for n in run.bench["n_services"] if n > 0})
    when = run.meta.get("started") or run.meta.get("time_utc") or ""
    sub = (f"kernel {esc(kernels)} · modes {esc(', '.join(s.mode for s in summaries) or 'none')} · "
           f"Services {esc(', '.join(fmt_n(n) for n in sizes) or 'none')}"
           + (f" · {esc(when)}" if when else ""))
    sections = [
        ("findings", "1. Headline findings", section_headline(summaries, agreed)),
        ("conformance", "2. Conformance: does each mode behave like a Service proxy?",
         section_conformance(run.checks)),
        ("charts", "3. Cost against the number of Services (log-log)",
         section_charts(run, series_keys, fits, single)),
        ("fits", "4. Growth fits", section_fits(fits, several_kernels)),
        ("agreement", "5. Agreement between passes",
         section_agreement(agreed, agreed_from, several_kernels)),
        ("environment", "6. Environment", section_environment(run)),
    ]
    if older is not None:
        sections.append(("compare", "7. Change since the older run", section_compare(run, older)))
    body = "".join(f"<section id='{sid}'><h2>{title}</h2>{content}</section>"
                   for sid, title, content in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        # Forbid every fetch: the page must work from a file with no network.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">"
        f"<title>svcbench report: {esc(run.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>svcbench report: {esc(run.name)} {chip}</h1><div class='sub'>{sub}</div>"
        f"{section_status(run, summaries)}{body}"
        f"<footer>Generated by svcbench from {esc(', '.join(run.files))}. Every chart and style "
        f"is inside this file.</footer><script>{SCRIPT}</script></body></html>"
    )


def write_report(run_dir: str | Path, output: str | Path | None = None,
                 compare: str | Path | None = None) -> Path:
    """Render RUN_DIR (and optionally the change since COMPARE) to one HTML file; its path."""
    run = load_run(run_dir)
    older = load_run(compare) if compare else None
    path = Path(output) if output else run.path / REPORT_HTML
    _write_atomic(path, render_html(run, older))
    return path


# --------------------------------------------------------------------------- command


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (bench.csv, run.json, "
                        "conformance*.json)")
    parser.add_argument("--compare", metavar="OLDER_RUN_DIR",
                        help="older run folder: show the change per metric and mode")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help=f"where to write the page (default RUN_DIR/{REPORT_HTML})")
    return parser


def run_report_command(args: argparse.Namespace) -> int:
    """`svcbench report`: write the page, print its path; 2 when the run folder is unusable."""
    try:
        path = write_report(args.run_dir, args.output, args.compare)
    except ReportError as exc:
        print(f"svcbench report: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"svcbench report: cannot write the report: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="svcbench report",
                                     description="render a run folder as one HTML page")
    add_report_arguments(parser)
    return run_report_command(parser.parse_args(argv))


__all__ = [
    "ReportError", "Run", "add_report_arguments", "compare_runs", "load_run", "main",
    "normalize_bench", "render_html", "run_report_command", "write_report",
]
