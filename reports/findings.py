"""What the report states: one sentence per mode with one growth verdict, the modes side by
side, the scorecard, why a run is partial, the growth fits, the agreement between passes
and the change since an older run.

Every statement is written from the data; which metric is the headline, which stands on a
floor, which a mode's sentence quotes and which the scorecard shows come from the run's
catalog (reports/catalog.py), with its titles and units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from reports import agreement
from reports.catalog import Catalog, MetricInfo, in_sentence, split_key
from reports.fit import FLAT, GROWS, UNKNOWN_VERDICT
from reports.load import RUN_JSON, Run
from reports.series import (
    MODE_COLORS,
    NOISE,
    PERCENTILE_RE,
    Overhead,
    chart_series,
    fit_row,
    headline_keys,
    mode_color,
    modes_of,
    overheads,
    points,
    primary_stat,
    unit_of,
)
from reports.text import (
    ci,
    ci_fmt,
    esc,
    finite,
    fmt,
    fmt_measured,
    fmt_n,
    html_table,
    metric_cell,
    pct,
    resolution_note,
    value_html,
    with_unit,
)


@dataclass
class Quote:
    """A metric a mode's findings quote at the largest size it measured it at."""

    info: MetricInfo
    key: str
    stat: str
    n: int
    value: float
    unit: str
    resolution: float = math.nan
    over: Overhead | None = None  # what the Services add over its floor, when it has one
    fit: dict | None = None  # its growth fit, for the catalog's `verdict` metrics


@dataclass
class ModeSummary:
    kernel: str
    mode: str
    max_n: int = 0
    sizes: int = 0  # how many sizes above zero the mode measured anything at
    metric: str = ""  # the headline series
    stat: str = "p50"
    unit: str = ""
    latency: float = math.nan
    over: Overhead | None = None  # what the Services add over the floor at max_n
    fit: dict | None = None
    failed: int = 0
    checks: dict[str, int] = field(default_factory=dict)
    findings: list[Quote] = field(default_factory=list)  # the catalog's `finding` metrics
    cards: dict[str, Quote] = field(default_factory=dict)  # the catalog's `scorecard` ones
    growth: list[Quote] = field(default_factory=list)  # the catalog's `verdict` ones, fitted
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


def _quote(bench: pd.DataFrame, catalog: Catalog, info: MetricInfo, kernel: str, mode: str,
           rows: pd.DataFrame) -> Quote | None:
    """The metric's summary stat at the largest size this mode measured it at."""
    stat = next(iter(primary_stat(rows.loc[rows["metric"] == info.name, "stat"])), None)
    pts = points(bench, kernel, mode, info.name, stat) if stat else []
    if not pts:
        return None
    top = pts[-1]
    over = (overheads(bench, kernel, mode, info.name, stat, catalog).get(top.n)
            if info.floor else None)
    return Quote(info, info.name, stat, top.n, top.median, unit_of(bench, info.name, catalog),
                 top.resolution, over)


def summarize_modes(run: Run, fits: pd.DataFrame, agreed: dict | None = None) -> list[ModeSummary]:
    bench, checks, catalog = run.bench, run.checks, run.catalog
    headline_series = headline_keys(bench, catalog)
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
            for metric in headline_series:
                # p50 where the rows have it, else the metric's own summary (a bare `value`)
                stat = next(iter(primary_stat(rows.loc[rows["metric"] == metric, "stat"])), "p50")
                pts = points(bench, kernel, mode, metric, stat)
                if pts:
                    s.metric, s.stat, s.latency, s.max_n = metric, stat, pts[-1].median, pts[-1].n
                    s.unit = unit_of(bench, metric, catalog)
                    s.fit = fit_row(fits, kernel, mode, metric, stat)
                    s.over = overheads(bench, kernel, mode, metric, stat, catalog).get(s.max_n)
                    if (agreed or {}).get("series") == metric:
                        s.passes = growth.get((kernel, mode))
                    break
            for info in catalog.findings():
                quote = _quote(bench, catalog, info, kernel, mode, rows)
                if quote:
                    s.findings.append(quote)
            for info in catalog.scorecard():
                quote = _quote(bench, catalog, info, kernel, mode, rows)
                if quote:
                    s.cards[info.name] = quote
            for info in catalog.verdicts():
                quote = _quote(bench, catalog, info, kernel, mode, rows)
                if quote:
                    quote.fit = fit_row(fits, kernel, mode, info.name, quote.stat)
                    s.growth.append(quote)
            s.failed = int(rows.loc[rows["stat"] == "failed", "value"].sum())
            mc = checks[(checks["kernel"] == kernel) & (checks["mode"] == mode)]
            s.checks = {k: int(v) for k, v in mc["outcome"].value_counts().items()}
            out.append(s)
    return out


def _level(over: Overhead, unit: str) -> str:
    """Where a cost that does not grow stands against its floor."""
    floor = "the floor" if over.same_moment else "the floor (measured at the start and end)"
    ci = (f", 95 % CI {fmt(over.low, unit, signed=True)} to {fmt(over.high, unit, signed=True)}"
          if over.known else "")
    if abs(over.ratio) <= NOISE:  # below the floor by this little is noise too
        return f"within {abs(over.ratio) * 100:.0f} % of {floor}"
    if over.value < 0:
        return (f"{fmt(-over.value, unit)} below {floor} ({pct(over.ratio)}{ci}): the Services "
                f"add nothing measurable")
    return f"at {fmt(over.value, unit, signed=True)} ({pct(over.ratio)}{ci}) over {floor}"


def _exponent(fit: dict, unit: str) -> str:
    """A growing cost's exponent, with its interval; never one the fit did not determine."""
    if not (finite(fit.get("k")) and finite(fit.get("k_low")) and finite(fit.get("k_high"))):
        return "growing with N (its exponent is not determined by these sizes)"
    text = (f"growing as N<sup>{fit['k']:.2f}</sup> (95 % CI {fit['k_low']:.2f}–"
            f"{fit['k_high']:.2f})")
    if finite(fit.get("per_1000")):
        text += f", {fmt(fit['per_1000'], unit, signed=True)} per 1,000 Services"
    return text


def _finding(q: Quote, max_n: int) -> str | None:
    """A quoted metric in a mode's sentence: its value, or what it stands over its floor."""
    words = esc(q.info.finding)
    if q.info.floor:
        # Only a clear rise says something: every connection pays for the rules then.
        if q.over and q.over.ratio > NOISE and q.over.above_floor > 0:
            return f"{words} {pct(q.over.ratio)} over the floor"
        return None
    at = f" at {fmt_n(q.n)} Services" if q.n != max_n else ""
    return (f"{words} {esc(fmt_measured(q.value, q.unit, q.resolution))}"
            f"{resolution_note(q.resolution, q.unit)}{at}")


def _growth_finding(q: Quote, max_n: int) -> str:
    """A `verdict` metric in a mode's sentence: its growth verdict, then its value at the
    largest size; an exponent only for a cost that grows."""
    words = esc(q.info.phrase)
    at = f"{esc(fmt_measured(q.value, q.unit, q.resolution))} at {fmt_n(q.n)} Services"
    fit = q.fit or {}
    verdict = fit.get("verdict")
    if verdict == GROWS:
        return f"{words} {_exponent(fit, q.unit)}, {at}"
    if verdict == FLAT:
        why = f"; {esc(fit['why'])}" if fit.get("why") else ""
        return f"{words} flat, {at}{why}"
    if verdict == "falls":
        return f"{words} flat, {at} (it fell as Services were added: drift)"
    note = fit.get("note") or ("measured at one size" if not fit else "the fit has no interval")
    return f"{words} {at} (no growth verdict: {esc(note)})"


def headline(s: ModeSummary, several_kernels: bool, catalog: Catalog | None = None) -> str:
    """One sentence per mode, written from the data, with one growth verdict."""
    catalog = catalog or Catalog()
    who = f"<b>{esc(s.mode)}</b>" + (f" ({esc(s.kernel)})" if several_kernels else "")
    if s.max_n:
        who += f" at {fmt_n(s.max_n)} Services"
    parts = []
    if math.isfinite(s.latency):
        target = esc(catalog.subject(s.metric))
        # "per new connection": what one measurement is, when the catalog says
        short = catalog.info(s.metric).short
        per = f" per {esc(short)}" if short else ""
        unit = s.unit
        fit = s.fit or {}
        verdict = fit.get("verdict") or UNKNOWN_VERDICT
        over = s.over
        if verdict in (FLAT, "falls"):
            level = _level(over, unit) if over else f"at {fmt(s.latency, unit)}{per}"
            why = f"; {fit['why']}" if fit.get("why") and not (over and over.value < 0) else ""
            if verdict == "falls":
                why = "; it fell as Services were added: drift, not their cost"
            parts.append(f"flat, {level} ({target}, {esc(s.stat)}){why}"
                         f"{_held(s.passes, verdict)}")
        else:
            if over:
                ci = (f", 95 % CI {fmt(over.low, unit, signed=True)} to "
                      f"{fmt(over.high, unit, signed=True)}" if over.known else "")
                text = (f"{fmt(over.value, unit, signed=True)}{per} over the floor "
                        f"({target}, {esc(s.stat)}, {pct(over.ratio)}{ci})")
            else:
                text = f"{fmt(s.latency, unit)}{per} ({target}, {esc(s.stat)})"
            if verdict == GROWS:
                text += f", {_exponent(fit, unit)}{_held(s.passes, GROWS)}"
            elif fit.get("note"):
                text += f"; no growth verdict: {esc(fit['note'])}"
            else:
                text += "; no growth verdict: the fit has no interval"
            parts.append(text)
    if not math.isfinite(s.latency) and s.sizes == 1:
        parts.append("measured at one size only (the table under the charts)")
    parts.extend(p for p in (_finding(q, s.max_n) for q in s.findings) if p)
    parts.extend(_growth_finding(q, s.max_n) for q in s.growth)
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


def comparison_sentence(summaries: list[ModeSummary], agreed: dict | None = None,
                        catalog: Catalog | None = None) -> str:
    """The modes side by side at the largest size most of them reached, per kernel."""
    catalog = catalog or Catalog()
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
        unit = ranked[0].unit
        floors = [s.floor for s in group if math.isfinite(s.floor)]
        text = ", ".join(f"{esc(s.mode)} {fmt(s.latency, s.unit)}" + (
            f" (at {fmt_n(s.max_n)})" if s.max_n != n else "") for s in ranked)
        floor = f"; floor {fmt(sorted(floors)[len(floors) // 2], unit)}" if floors else ""
        where = f" on kernel {esc(kernel)}" if several else ""
        # One series for every mode names its target; else the metric's title.
        series = {s.metric for s in group}
        what = catalog.title(series.pop() if len(series) == 1 else split_key(ranked[0].metric)[0])
        stats = {s.stat for s in group}
        stat = f" ({esc(stats.pop())})" if len(stats) == 1 else ""
        out.append(f"At {fmt_n(n)} Services{where}, {esc(in_sentence(what))}{stat}: "
                   f"{text}{floor}. Fastest: <b>{esc(ranked[0].mode)}</b>."
                   f"{ranking_sentence(agreed, kernel)}")
    return " ".join(out)


def _header(info: MetricInfo, stat: str, unit: str) -> str:
    """A table header from the catalog: the short name (and a percentile), its title and
    unit on hover."""
    text = info.phrase + (f" {stat}" if PERCENTILE_RE.match(stat or "") else "")
    hover = with_unit(info.heading, unit) + (f": {info.doc}" if info.doc else "")
    return f"<span title='{esc(hover)}'>{esc(text)}</span>"


def section_headline(summaries: list[ModeSummary], agreed: dict | None = None,
                     catalog: Catalog | None = None) -> str:
    if not summaries:
        return "<p class='muted'>No measurements and no conformance results.</p>"
    several = len({s.kernel for s in summaries}) > 1
    out = []
    lead = comparison_sentence(summaries, agreed, catalog)
    if lead:
        out.append(f"<p class='lead'>{lead}</p>")
    out.append("<ul class='findings'>")
    out.extend(f"<li><span class='swatch' style='background:{mode_color(s.mode, MODE_COLORS)}'>"
               f"</span>{headline(s, several, catalog)}</li>" for s in summaries)
    out.append("</ul>")
    out.append(scorecard(summaries, several, catalog))
    return "".join(out)


def scorecard(summaries: list[ModeSummary], several_kernels: bool,
              catalog: Catalog | None = None) -> str:
    catalog = catalog or Catalog()
    lead = next((s for s in summaries if s.metric), None)
    if lead:
        cost = _header(catalog.info(lead.metric), lead.stat, lead.unit)
    else:
        described = [m for m in catalog.entries.values() if m.headline]
        cost = _header(described[0], "p50", described[0].unit) if described else "cost"
    cards = [m for m in catalog.scorecard() if any(m.name in s.cards for s in summaries)]
    grown = [m for m in catalog.verdicts() if any(q.info.name == m.name for s in summaries
                                                  for q in s.growth)]
    head = ["mode", *(["kernel"] if several_kernels else []), "largest N", cost,
            "over floor", "growth",
            *(_header(m, next(s.cards[m.name].stat for s in summaries if m.name in s.cards),
                      m.unit) for m in cards),
            *(f"<span title='{esc(with_unit(m.heading, m.unit))}'>{esc(m.phrase)}: growth</span>"
              for m in grown),
            "conformance"]
    rows = []
    for s in summaries:
        growth = growth_cell(s.fit or {}) if s.fit else "–"
        checks = s.checks
        conf = (f"{checks.get('passed', 0)}/{sum(checks.values())}" if checks else "–")
        conf_cls = "bad" if checks.get("failed") else ("good" if checks else "muted")
        over = (f"{fmt(s.overhead, s.unit, signed=True)} ({pct(s.overhead_ratio)})"
                if math.isfinite(s.latency) and math.isfinite(s.floor) else "–")
        card = [fmt(s.cards[m.name].value, s.cards[m.name].unit) if m.name in s.cards else "–"
                for m in cards]
        fitted = {q.info.name: q for q in s.growth}
        verdicts = [growth_cell(fitted[m.name].fit or {}) if m.name in fitted else "–"
                    for m in grown]
        cells = [f"<b>{esc(s.mode)}</b>", *([esc(s.kernel)] if several_kernels else []),
                 fmt_n(s.max_n) if s.max_n else "–", fmt(s.latency, s.unit), over, growth,
                 *card, *verdicts, f"<span class='{conf_cls}'>{conf}</span>"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table class='score'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _held(passes: dict | None, verdict: str) -> str:
    """How often the bootstrap over passes gave the same verdict."""
    # One set of passes behind every resample is one fit, not an agreement.
    if not passes or not passes.get("resamples") or int(passes.get("sets") or 0) < 2:
        return ""
    done = int(passes["resamples"])
    same = int((passes.get("verdicts") or {}).get(verdict, 0))
    return (f" <span class='muted'>(the same verdict in {same * 100 // done} % of {done} "
            f"resamples of its {len(passes['passes'])} passes)</span>")


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
    catalog = run.catalog
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
        for name, value in metrics_skipped.items():
            # the runner's: mode -> {metric: reason}; older runs: metric -> reason
            per_mode = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
            for metric, reason in (value.items() if per_mode else [(name, value)]):
                notes.append(f"{esc(catalog.title(metric))} (<code>{esc(metric)}</code>) not "
                             f"measured{' in <b>' + esc(name) + '</b>' if per_mode else ''}: "
                             f"{value_html(reason)}")
    errors = run.meta.get("errors")
    if isinstance(errors, list) and errors:
        notes.append(f"<span class='bad'>{len(errors)} measurement(s) failed</span>: "
                     + "; ".join(value_html(e) for e in errors[:5])
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
    drift = floor_drift(run.bench, catalog)
    notes.extend(drift)
    if not notes:
        return ""
    cls = ("banner warn" if complete is False or status in STOPPED or run.problems
           or run.meta.get("errors") else "banner")
    return f"<div class='{cls}'><ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul></div>"


def floor_drift(bench: pd.DataFrame, catalog: Catalog | None = None) -> list[str]:
    """The floor is measured at the start and the end of each sweep; a drift means noise."""
    out = []
    sel = bench[agreement.floor_rows(bench, catalog) & (bench["n_services"] == 0)
                & (bench["stat"] == "p50")]
    for (_kernel, mode, unit), g in sel.groupby(["kernel", "mode", "unit"]):
        start, end = g[g["when"] == "start"]["value"], g[g["when"] == "end"]["value"]
        if len(start) and len(end) and start.median() > 0:
            change = end.median() / start.median() - 1
            if abs(change) > NOISE:
                out.append(f"The floor of <b>{esc(mode)}</b> moved {pct(change)} between "
                           f"the start and the end of its sweep ({fmt(start.median(), unit)} to "
                           f"{fmt(end.median(), unit)}): the machine was not quiet.")
    return out


def growth_cell(fit: dict) -> str:
    """A fit's one verdict in a table cell: N^k only for a cost that grows."""
    verdict = fit.get("verdict")
    if verdict == GROWS:
        return (f"<span class='grow'>N<sup>{fit['k']:.2f}</sup></span>" if finite(fit.get("k_low"))
                and finite(fit.get("k_high")) and finite(fit.get("k"))
                else "<span class='grow'>grows</span> <span class='muted'>(k not determined)</span>")
    if verdict == FLAT:
        return "<span class='good'>flat</span>"
    if verdict == "falls":
        return "flat <span class='muted'>(fell: drift)</span>"
    return "<span class='muted'>" + ("needs 3 sizes" if fit.get("note") else "no verdict") + "</span>"


def section_fits(fits: pd.DataFrame, several_kernels: bool,
                 catalog: Catalog | None = None, headline: list[str] = ()) -> str:
    catalog = catalog or Catalog()
    if fits.empty:
        return "<p class='muted'>No series to fit.</p>"
    head = ["metric", "mode", *(["kernel"] if several_kernels else []), "growth", "k (95 % CI)",
            "added at the largest N (95 % CI)", "per 1,000 Services (95 % CI)",
            "b per Service (95 % CI)", "a: does not grow", "sizes", "points"]
    rows = []
    modes = list(MODE_COLORS)
    ordered = fits.assign(
        _m=fits["metric"].map(lambda m: catalog.rank(m, headline)),
        _o=fits["mode"].map(lambda m: modes.index(m) if m in modes else 99),
    ).sort_values(["_m", "metric", "_o", "mode"])
    for r in ordered.to_dict("records"):
        r = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        unit = r.get("unit") or ""
        label = metric_cell(catalog, r["metric"], r["stat"], unit)
        mode = f"<b>{esc(r['mode'])}</b>"
        kern = [esc(r["kernel"])] if several_kernels else []
        if not finite(r.get("a")):
            rows.append(f"<tr><td>{label}</td><td>{mode}</td>{''.join(f'<td>{k}</td>' for k in kern)}"
                        f"<td colspan='8' class='muted'>{esc(r.get('note') or 'no fit')}</td></tr>")
            continue
        grows = r.get("verdict") == GROWS
        growth = growth_cell(r)
        res = r.get("resolution")
        # A constant series fits its added part at 1e-15 of its level: that is a zero.
        dust = 1e-9 * max(abs(r["a"]), abs(r.get("level") or 0.0))
        for key in ("added_max", "added_max_low", "added_max_high"):
            if finite(r.get(key)) and abs(r[key]) < dust:
                r[key] = 0.0
        if finite(res) and max(abs(r["added_max_low"] or 0), abs(r["added_max_high"] or 0)) < res:
            added = f"within the resolution ({fmt(res, unit)})"
        else:
            added = ci_fmt(r["added_max"], r["added_max_low"], r["added_max_high"], unit,
                            signed=True)
        added += f" <span class='muted'>at {fmt_n(r['max_n'])}</span>"
        if not grows:
            # No growth to quote: its exponent and rates would be read from noise, and the
            # part that does not grow is then simply the mean.
            k = per = b = "<span class='muted'>– (not growing)</span>"
            a = (esc(fmt_measured(r["level"], unit, res)) if finite(res) and r["level"] < res
                 else ci_fmt(r["level"], r["level_low"], r["level_high"], unit))
            a += " <span class='muted'>mean</span>"
        else:
            k = ci(r["k"], r["k_low"], r["k_high"], "{:.2f}")
            per = ci_fmt(r["per_1000"], r["per_1000_low"], r["per_1000_high"], unit, signed=True)
            if r["max_n"] < 1000:
                per += " <span class='muted'>extrapolated beyond the sweep</span>"
            b = ci_fmt(r["b"], r["b_low"], r["b_high"], unit)
            a = ci_fmt(r["a"], r["a_low"], r["a_high"], unit)
        notes = [n for n in (r.get("why"), r.get("note") if grows else None) if n]
        if finite(res) and "resolution" not in (r.get("why") or ""):
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


def growth_cells(g: dict, several_kernels: bool) -> list[str]:
    each = ", ".join(
        f"{esc(p.get('verdict') or 'no fit')}"
        + (f" (k {float(p['k']):.2f})" if finite(p.get("k")) else "")
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
              if k and all(finite(k.get(x)) for x in ("median", "low", "high"))
              else "<span class='muted'>– (growth is not the usual verdict)</span>")
    return [f"<b>{esc(g.get('mode'))}</b>", *([esc(g.get("kernel"))] if several_kernels else []),
            each, boot, k_text]


def section_agreement(agreed: dict | None, source: str, several_kernels: bool,
                      catalog: Catalog | None = None) -> str:
    catalog = catalog or Catalog()
    if not agreed or not agreed.get("series"):
        return "<p class='muted'>No headline series to compare across passes.</p>"
    series, stat = str(agreed["series"]), str(agreed.get("stat") or agreement.PRIMARY_STAT)
    kernel = ["kernel"] if several_kernels else []
    out = [f"<p class='muted'>A pass is one trip over the sizes (up, then down in the next). "
           f"{esc(catalog.title(series))}, {esc(stat)}: each pass ranks the modes by its own "
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
                              [growth_cells(g, several_kernels) for g in growth]))
    return "".join(out)


def compare_runs(new: Run, old: Run) -> pd.DataFrame:
    """Change per metric and mode at the largest size both runs measured, against the noise."""
    rows = []
    catalog = new.catalog.merged(old.catalog)
    for kernel, metric, stat in chart_series(new.bench, catalog):
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
            res = max((x.resolution / abs(a.median) for x in (a, b) if finite(x.resolution)),
                      default=0.0)
            noise = max(NOISE, a.spread, b.spread, res)
            higher = catalog.higher_is_better(metric)
            worse = -change if higher else change
            verdict = ("within noise" if abs(change) <= noise
                       # which way is better is not known: a change, neither way named
                       else "changed" if higher is None
                       else "regression" if worse > noise else "improvement")
            rows.append({"kernel": kernel, "metric": metric, "stat": stat, "mode": mode, "n": n,
                         "old": a.median, "new": b.median, "change": change, "noise": noise,
                         "verdict": verdict, "unit": unit_of(new.bench, metric, catalog)})
    return pd.DataFrame(rows)


def section_compare(new: Run, old: Run) -> str:
    table = compare_runs(new, old)
    catalog = new.catalog.merged(old.catalog)
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
    count = table["verdict"].value_counts()
    regressions = int(count.get("regression", 0))
    changed = int(count.get("changed", 0))
    # A metric whose catalog entry does not say which way is better only changes.
    unsure = (f", {changed} changed beyond noise (which way is better is not known)"
              if changed else "")
    summary = (f"<p class='{'bad' if regressions else 'good'}'><b>{regressions} regression"
               f"{'' if regressions == 1 else 's'}</b> beyond noise, "
               f"{int(count.get('improvement', 0))} improvements, "
               f"{int(count.get('within noise', 0))} within noise{unsure}.</p>")
    rows = []
    for r in table.to_dict("records"):
        cls = {"regression": "regress", "improvement": "improve"}.get(r["verdict"], "")
        rows.append(
            f"<tr class='{cls}'><td>{metric_cell(catalog, r['metric'], r['stat'], r['unit'])}"
            f"</td><td><b>{esc(r['mode'])}</b></td><td>{fmt_n(r['n'])}</td>"
            f"<td>{fmt(r['old'], r['unit'])}</td><td>{fmt(r['new'], r['unit'])}</td>"
            f"<td>{'−' if r['change'] < 0 else '+'}{abs(r['change']) * 100:.1f} %</td><td>±{r['noise'] * 100:.1f} %</td>"
            f"<td>{esc(r['verdict'])}</td></tr>")
    return (intro + summary + "<table class='compare'><thead><tr><th>metric</th><th>mode</th>"
            "<th>Services</th><th>before</th><th>now</th><th>change</th><th>noise</th>"
            "<th>verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
