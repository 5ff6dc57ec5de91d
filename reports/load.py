"""Reading a run folder: bench.csv, run.json (its metric catalog too), conformance*.json,
and the agreement between passes (run.json's figures, else computed from the rows).

Any piece may be missing or unreadable: each becomes a problem the page shows, and only a
folder with none of them is refused (ReportError).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from reports import agreement
from reports.catalog import Catalog, series_key
from reports.results import read_json
from reports.text import finite

BENCH_CSV = "bench.csv"
RUN_JSON = "run.json"
ENVIRONMENT_JSON = "environment.json"
HOST_KERNEL = "host"  # conformance names the host kernel so; bench writes its release
CONFORMANCE_GLOBS = ("conformance*.json", "conformance*/conformance*.json")
OUTCOMES = ("passed", "failed", "deviation", "skipped")


# Rows from before bench rows carried their `resolution`: CPU time read in USER_HZ ticks
# (these extras), one tick spread over the connections counted.
TICK_S = 0.01
TICK_EXTRAS = ("host_sys_s", "agents_sys_s")
SECONDS_IN = {"s": 1.0, "ms": 1e3, "us": 1e6, "µs": 1e6}


class ReportError(ValueError):
    """The run folder cannot be reported on; the message says which and why."""


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
    def catalog(self) -> Catalog:
        """run.json's metric catalog (empty without one: the report then falls back)."""
        return Catalog.from_meta(self.meta)

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
    """bench.csv rows in one shape: a series key per metric (`metric:last`)."""
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
    df["metric"] = [series_key(m, t) for m, t in zip(df["metric"], df["target"],
                                                            strict=True)]
    df["base"] = df["metric"].str.split(":").str[0]
    return df.reset_index(drop=True)


def _resolution(extra: dict, unit: Any) -> float:
    """The smallest step a row's value can take: its own `resolution`, else one clock tick
    over the connections of a tick-counted CPU figure, else NaN (finer than shown)."""
    if finite(extra.get("resolution")):
        return float(extra["resolution"])
    count = extra.get("count")
    if any(k in extra for k in TICK_EXTRAS) and finite(count) and str(unit) in SECONDS_IN:
        failed = float(extra["failed"]) if finite(extra.get("failed")) else 0.0
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
    return agreement.agreement(run.bench, catalog=run.catalog), BENCH_CSV
