"""The nightly's regression gate: `svcbench report --compare OLD NEW`.

Which metrics are tracked, and how much worse each may get, is declared once, in the metric
catalog (bench/metrics.py's `track=`, written into run.json): a series (metric, stat,
target), a size and a threshold. For each tracked series, mode and kernel both runs
measured, at the declared size where both have it (else the largest size both have), the
gate compares the medians over repeats; a series the catalog gives a floor (a new
connection's) is compared as its ratio to the floor measured in the same pass, so that the
machine's own drift, which moves both, cancels. A change is a regression only when both hold:

- the newer median is worse than the older by more than the threshold, and
- it lies outside what the older run measured (above its largest value when lower is
  better, below its smallest when higher is): a change within the older run's own spread
  over repeats is noise, whatever its size.

Conformance is tracked too: a check that passed in the older run and runs in the newer one
must still pass (no pass may be lost). A mode or series only one run has is listed, never a
regression (a sweep stopped by its budget, a mode this machine could not run).

Kernels are compared within themselves; where each run measured a mode on one kernel only,
the two are paired even when the release differs (a CI runner's kernel moves between
nights), and the row says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from reports.catalog import Catalog, MetricInfo, Track, series_key
from reports.load import Run
from reports.text import esc, fmt, fmt_n, metric_cell

REGRESSION = "regression"
IMPROVEMENT = "improvement"
WITHIN_SPREAD = "within spread"
OK = "ok"
ONLY_OLD = "not measured now"
ONLY_NEW = "new"
CONFORMANCE = "conformance"
PASSED = "passed"
RULE = ("a regression: the newer median worse than the older by more than the metric's "
        "threshold and outside the older run's range over repeats; a conformance check that "
        "passed before and fails now")


@dataclass
class GateRow:
    """One tracked series (or one mode's conformance) of one mode, old against new."""

    kind: str  # "metric" or "conformance"
    metric: str
    title: str
    mode: str
    kernel: str
    old_kernel: str
    verdict: str
    stat: str = ""
    unit: str = ""
    n: int | None = None
    threshold: float | None = None
    old_median: float | None = None
    new_median: float | None = None
    old_range: tuple[float, float] | None = None
    new_range: tuple[float, float] | None = None
    change: float | None = None
    over_floor_change: float | None = None  # what the verdict read, where a floor was measured
    note: str = ""
    lost: list[str] = field(default_factory=list)  # conformance: passed before, not now

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("old_range", "new_range"):
            out[key] = list(out[key]) if out[key] else None
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in out.items()}


@dataclass
class Gate:
    old: Run
    new: Run
    rows: list[GateRow]

    @property
    def regressions(self) -> list[GateRow]:
        return [r for r in self.rows if r.verdict == REGRESSION]

    @property
    def compared(self) -> list[GateRow]:
        return [r for r in self.rows if r.verdict not in (ONLY_OLD, ONLY_NEW)]

    def as_dict(self) -> dict[str, Any]:
        return {"old": str(self.old.path), "new": str(self.new.path), "rule": RULE,
                "regressions": len(self.regressions), "compared": len(self.compared),
                "rows": [r.as_dict() for r in self.rows]}


def pair_kernels(old: Iterable[str], new: Iterable[str]) -> list[tuple[str | None, str | None]]:
    """(old kernel, new kernel) pairs: the same release, or the only one on each side."""
    old, new = sorted(set(old)), sorted(set(new))
    if len(old) == 1 and len(new) == 1:
        return [(old[0], new[0])]
    pairs: list[tuple[str | None, str | None]] = [(k, k) for k in new if k in old]
    pairs += [(None, k) for k in new if k not in old]
    pairs += [(k, None) for k in old if k not in new]
    return pairs


def _paired(a_all: pd.DataFrame, b_all: pd.DataFrame):
    """(mode, old kernel, new kernel, old rows, new rows) for every mode either run has and
    each pair of its kernels (`pair_kernels`); rows None where only one run has the pair."""
    if not len(a_all) + len(b_all):
        return
    for mode in dict.fromkeys([*b_all["mode"], *a_all["mode"]]):
        a_mode, b_mode = a_all[a_all["mode"] == mode], b_all[b_all["mode"] == mode]
        for old_k, new_k in pair_kernels(a_mode["kernel"], b_mode["kernel"]):
            if old_k is None or new_k is None:
                yield mode, old_k, new_k, None, None
            else:
                yield (mode, old_k, new_k, a_mode[a_mode["kernel"] == old_k],
                       b_mode[b_mode["kernel"] == new_k])


def compare(new: Run, old: Run, fallback: Catalog | None = None) -> Gate:
    """The gate's rows: every tracked series of every mode, then conformance per mode."""
    catalog = new.catalog.merged(old.catalog)
    if fallback is not None:
        catalog = catalog.merged(fallback)
    # The gates of the first catalog that declares any: the newer run's, the older's, else
    # the fallback (run.json files from before `track` existed describe the metrics without)
    declared = next((c.tracked() for c in (new.catalog, old.catalog, fallback or Catalog())
                     if c.tracked()), [])
    rows: list[GateRow] = []
    for info, track in declared:
        rows += _series_rows(new, old, catalog, info, track)
    rows += _conformance_rows(new, old)
    return Gate(old, new, rows)


def _values(bench: pd.DataFrame, key: str, stat: str) -> pd.DataFrame:
    if bench.empty:
        return bench
    return bench[(bench["metric"] == key) & (bench["stat"] == stat) & (bench["n_services"] > 0)]


def _series_rows(new: Run, old: Run, catalog: Catalog, info: MetricInfo,
                 track: Track) -> list[GateRow]:
    key = series_key(info.name, track.target)
    title = catalog.title(key)
    a_all, b_all = _values(old.bench, key, track.stat), _values(new.bench, key, track.stat)
    higher = catalog.higher_is_better(key)
    out = []
    for mode, old_k, new_k, a, b in _paired(a_all, b_all):
        base = GateRow("metric", key, title, mode, new_k or "", old_k or "", ONLY_NEW,
                       stat=track.stat, unit=catalog.unit(key) or "",
                       threshold=track.threshold)
        if a is None or b is None:
            base.verdict = ONLY_NEW if old_k is None else ONLY_OLD
            out.append(base)
            continue
        common = sorted(set(a["n_services"]) & set(b["n_services"]))
        if not common:
            base.verdict = ONLY_OLD
            base.note = "no size in common"
            out.append(base)
            continue
        n = track.size if track.size in common else common[-1]
        notes = []
        if track.size is not None and n != track.size:
            notes.append(f"{fmt_n(track.size)} Services not measured by both runs")
        if old_k != new_k:
            notes.append(f"kernel {old_k} before")
        a_n, b_n = a[a["n_services"] == n], b[b["n_services"] == n]
        over = (_over_floor(old.bench, a_n, info.floor, track.stat, mode, old_k, n),
                _over_floor(new.bench, b_n, info.floor, track.stat, mode, new_k, n))
        out.append(_judge(base, n, a_n["value"], b_n["value"], track.threshold, higher,
                          notes, *over))
    return out


def _over_floor(bench: pd.DataFrame, rows: pd.DataFrame, floor: str | None, stat: str,
                mode: str, kernel: str, n: int) -> pd.Series | None:
    """Per pass, the series' value over its floor measured in the same pass at the same size
    (a new connection over one that crosses the same path without Services): what the
    machine's own drift moves alike cancels. None without a floor there."""
    if not floor or "base" not in bench.columns or "repeat" not in rows.columns:
        return None
    f = bench[(bench["base"] == floor) & (bench["stat"] == stat) & (bench["mode"] == mode)
              & (bench["kernel"] == kernel) & (bench["n_services"] == n)]
    if f.empty:
        return None
    # the sweep's floor series names its target (`:floor`); another bench may have written
    # rows of the same metric without one, measured elsewhere: the named series first
    keys = sorted(set(f["metric"]), key=lambda k: (":" not in k, k))
    f = f[f["metric"] == keys[0]]
    base = f.groupby("repeat")["value"].median()
    mine = rows.groupby("repeat")["value"].median()
    common = mine.index.intersection(base.index[base > 0])
    ratios = (mine[common] / base[common]).dropna()
    return ratios if len(ratios) else None


def _ratio(m0: float, m1: float) -> float:
    if m0 == 0:
        return 0.0 if m1 == 0 else math.inf
    return m1 / m0 - 1


def _judge(row: GateRow, n: int, a: pd.Series, b: pd.Series, threshold: float,
           higher: bool | None, notes: list[str], a_floor: pd.Series | None = None,
           b_floor: pd.Series | None = None) -> GateRow:
    """The verdict on the medians (over the floor of the same passes where both runs have
    one); the row shows the values themselves."""
    row.n = int(n)
    row.old_median, row.new_median = float(a.median()), float(b.median())
    row.old_range = (float(a.min()), float(a.max()))
    row.new_range = (float(b.min()), float(b.max()))
    row.change = _ratio(row.old_median, row.new_median)
    judged_a, judged_b = a, b
    if a_floor is not None and b_floor is not None:
        judged_a, judged_b = a_floor, b_floor
        row.over_floor_change = _ratio(float(a_floor.median()), float(b_floor.median()))
        notes = [f"judged over the floor of the same passes: "
                 f"{'−' if row.over_floor_change < 0 else '+'}"
                 f"{abs(row.over_floor_change) * 100:.1f} %", *notes]
    m0, m1 = float(judged_a.median()), float(judged_b.median())
    lo, hi = float(judged_a.min()), float(judged_a.max())
    change = _ratio(m0, m1)
    # worse: how much worse the newer median is, as a fraction; beyond: outside the old range
    if higher:
        worse, beyond_old, better_beyond = -change, m1 < lo, m1 > hi
    else:
        worse, beyond_old, better_beyond = change, m1 > hi, m1 < lo
    if worse > threshold:
        row.verdict = REGRESSION if beyond_old else WITHIN_SPREAD
    elif -worse > threshold and better_beyond:
        row.verdict = IMPROVEMENT
    else:
        row.verdict = OK
    row.note = "; ".join(notes)
    return row


def _conformance_rows(new: Run, old: Run) -> list[GateRow]:
    out = []
    a_all, b_all = old.checks, new.checks
    for mode, old_k, new_k, a, b in _paired(a_all, b_all):
        row = GateRow(CONFORMANCE, CONFORMANCE, "Conformance checks passed", mode,
                      new_k or "", old_k or "", ONLY_NEW, unit="checks", threshold=0.0)
        if a is None or b is None:
            row.verdict = ONLY_NEW if old_k is None else ONLY_OLD
            out.append(row)
            continue
        before = set(a.loc[a["outcome"] == PASSED, "name"])
        now = dict(zip(b["name"], b["outcome"], strict=True))
        row.old_median = float(len(before))
        row.new_median = float(sum(1 for o in now.values() if o == PASSED))
        row.change = row.new_median - row.old_median
        row.lost = sorted(name for name in before if name in now and now[name] != PASSED)
        gone = sorted(before - set(now))
        notes = [f"{name}: {now[name]}" for name in row.lost]
        if gone:
            notes.append(f"{len(gone)} passed before and no longer run: {', '.join(gone)}")
        if old_k != new_k:
            notes.append(f"kernel {old_k} before")
        row.note = "; ".join(notes)
        gained = row.change > 0 and not row.lost
        row.verdict = REGRESSION if row.lost else IMPROVEMENT if gained else OK
        out.append(row)
    return out


# --------------------------------------------------------------------------- showing it


def _change_text(row: GateRow) -> str:
    if row.change is None:
        return "–"
    if row.kind == CONFORMANCE:
        return f"{'−' if row.change < 0 else '+'}{abs(row.change):.0f}"
    if not math.isfinite(row.change):
        return "+∞"
    return f"{'−' if row.change < 0 else '+'}{abs(row.change) * 100:.1f} %"


def _threshold_text(row: GateRow) -> str:
    if row.kind == CONFORMANCE:
        return "no pass lost"
    return "–" if row.threshold is None else f"{row.threshold * 100:.0f} %"


def _value_text(value: float | None, row: GateRow) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if row.kind == CONFORMANCE else fmt(value, row.unit)


def text_table(gate: Gate) -> str:
    """The gate as plain text, one line per row, the verdicts' summary last."""
    head = ("metric", "mode", "Services", "old median", "new median", "change", "threshold",
            "verdict")
    lines = [head]
    for r in gate.rows:
        what = r.title + (f" ({r.stat})" if r.stat not in ("", "value") else "")
        lines.append((what, r.mode, fmt_n(r.n) if r.n else "–",
                      _value_text(r.old_median, r), _value_text(r.new_median, r),
                      _change_text(r), _threshold_text(r),
                      r.verdict + (f" ({r.note})" if r.note else "")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    text = ["  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
            for line in lines]
    text.append(summary(gate))
    return "\n".join(text)


def summary(gate: Gate) -> str:
    bad = gate.regressions
    if bad:
        which = ", ".join(f"{r.title} in {r.mode}" for r in bad)
        return f"{len(bad)} tracked regression{'s' if len(bad) > 1 else ''}: {which}"
    return f"no tracked regression ({len(gate.compared)} compared)"


def section_gate(gate: Gate, catalog: Catalog) -> str:
    """The page's section: the tracked metrics' table with each verdict."""
    intro = (f"<p>Against <code>{esc(gate.old.path)}</code>: the tracked metrics (the metric "
             f"catalog declares each one's threshold) at the declared size, else the largest "
             f"size both runs measured. {esc(RULE[0].upper() + RULE[1:])}. "
             f"<code>svcbench report --compare</code> exits 1 on any regression.</p>")
    if not gate.rows:
        return intro + "<p class='muted'>Neither run holds a tracked metric or conformance.</p>"
    bad = gate.regressions
    head = (f"<p class='{'bad' if bad else 'good'}'><b>{esc(summary(gate))}</b>.</p>")
    rows = []
    for r in gate.rows:
        cls = {REGRESSION: "regress", IMPROVEMENT: "improve"}.get(r.verdict, "")
        what = (esc(r.title) if r.kind == CONFORMANCE
                else metric_cell(catalog, r.metric, r.stat, r.unit))
        rng = "" if r.old_range is None else (
            f" <span class='muted'>({fmt(r.old_range[0], r.unit)} to "
            f"{fmt(r.old_range[1], r.unit)})</span>")
        note = f" <span class='muted'>{esc(r.note)}</span>" if r.note else ""
        rows.append(
            f"<tr class='{cls}'><td>{what}</td><td><b>{esc(r.mode)}</b></td>"
            f"<td>{fmt_n(r.n) if r.n else '–'}</td><td>{_value_text(r.old_median, r)}{rng}</td>"
            f"<td>{_value_text(r.new_median, r)}</td><td>{_change_text(r)}</td>"
            f"<td>{_threshold_text(r)}</td><td>{esc(r.verdict)}{note}</td></tr>")
    return (intro + head + "<table class='compare gate'><thead><tr><th>tracked</th><th>mode</th>"
            "<th>Services</th><th>old median (range)</th><th>new median</th><th>change</th>"
            "<th>threshold</th><th>verdict</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")
