"""The charts: one log-log SVG per series (a line per mode, its range as a band, the growth
fit dotted, the floor as a reference, the region below the values' resolution shaded),
and a table for series measured at one size. Drawn here, inline: the page loads nothing.
Titles, units and what a metric measures come from the run's catalog."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from reports.fit import GROWS
from reports.load import Run
from reports.series import (
    NOISE,
    PERCENTILE_RE,
    Point,
    fit_row,
    floor_values,
    headline_keys,
    mode_color,
    modes_of,
    points,
    same_moment_floor,
    unit_of,
)
from reports.text import (
    esc,
    finite,
    fmt,
    fmt_measured,
    fmt_n,
    fmt_tick,
    fmt_tick_n,
    html_table,
    metric_cell,
    resolution_note,
    significant,
    unit_word,
    with_unit,
)

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
              floor_by_n: dict[int, list[float]] | None = None,
              resolution_doc: str = "") -> str:
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
    resolution = max((p.resolution for s in series for p in s.points if finite(p.resolution)),
                     default=math.nan)
    if finite(resolution) and resolution > 0:
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
    if finite(resolution) and resolution > 0:
        top = sy(resolution)
        why = (f"below {fmt(resolution, unit)}: finer than the values can show"
               + (f" (their resolution: {resolution_doc})" if resolution_doc else ""))
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
        if fit.get("verdict") == GROWS and finite(fit.get("k")) and finite(fit.get("a")) \
                and finite(fit.get("b")) and len(pts) > 1:
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
                        + (f" (spread {p.spread * 100:.1f} %)" if not finite(res) else "")
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


def axis_label(stat: str, unit: str) -> str:
    if PERCENTILE_RE.match(stat):
        return f"{stat}, {unit_word(unit)}"
    return unit_word(unit) or stat


def _fit_text(fit: dict, unit: str) -> str:
    """The hover text of a growing series' fitted curve."""
    return (f"{fmt(fit['a'], unit)} + {significant(fit['b'])}·N^{fit['k']:.2f}; "
            f"{fmt(fit.get('per_1000'), unit, signed=True)} per 1,000 Services")


def section_charts(run: Run, series_keys: list[tuple[str, str, str]], fits: pd.DataFrame,
                   single: list[tuple[str, str, str]] = ()) -> str:
    bench, catalog = run.bench, run.catalog
    if not series_keys and not single:
        return "<p class='muted'>No measurements to chart.</p>"
    headline = headline_keys(bench, catalog)
    several = len({k for k, _, _ in [*series_keys, *single]}) > 1
    modes = modes_of(bench, run.checks)
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
        unit = unit_of(bench, metric, catalog)
        series = []
        for mode in modes:
            pts = points(bench, kernel, mode, metric, stat)
            if pts:
                series.append(Series(mode, mode_color(mode, modes), pts,
                                     fit_row(fits, kernel, mode, metric, stat)))
        floor = by_n = None
        if catalog.floored(metric, headline):
            floor = floor_values(bench, kernel, None, stat, catalog)
            by_n = same_moment_floor(bench, kernel, stat, unit, catalog)
        title = with_unit(catalog.title(metric), unit)
        sub = f"{stat} · " if stat not in ("value", "count") else ""
        kern = f"kernel {esc(kernel)} · " if several else ""
        chart = svg_chart(f"chart-{i}", series, unit, stat, floor, by_n,
                          catalog.resolution_doc(metric))
        out.append(f"<figure><figcaption title='{esc(catalog.doc(metric))}'><b>{esc(title)}</b> "
                   f"<span class='muted'>{esc(sub)}{kern}<code>{esc(metric)}</code></span>"
                   f"</figcaption>{chart}</figure>")
    if series_keys:
        out.append("</div>")
    if single:
        out.append(single_size_table(run, single, several))
    return "".join(out)


def single_size_table(run: Run, keys: list[tuple[str, str, str]], several_kernels: bool) -> str:
    """Series measured at one size only: a line needs two, so they are a table."""
    bench, catalog = run.bench, run.catalog
    head = ["metric", "mode", *(["kernel"] if several_kernels else []), "Services", "median",
            "range over repeats", "measurements"]
    rows = []
    for kernel, metric, stat in keys:
        unit = unit_of(bench, metric, catalog)
        for mode in modes_of(bench, run.checks):
            for p in points(bench, kernel, mode, metric, stat):
                res = p.resolution
                spread = (esc(f"{fmt_measured(p.low, unit, res)} to {fmt_measured(p.high, unit, res)}")
                          if p.count > 1 else "<span class='muted'>one measurement</span>")
                cells = [metric_cell(catalog, metric, stat, unit), f"<b>{esc(mode)}</b>",
                         *([esc(kernel)] if several_kernels else []), fmt_n(p.n),
                         esc(fmt_measured(p.median, unit, res)) + resolution_note(res, unit), spread,
                         str(p.count)]
                rows.append(cells)
    return ("<h3>Measured at one size</h3><p class='muted'>A line needs two sizes; these were "
            "measured at one.</p>" + html_table("single", head, rows))
