"""The page: one self-contained HTML file (styles and the legend's script inline, nothing
fetched), its sections in reading order, and the conformance matrix and environment that
only this page shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.args import REPORT_HTML
from reports.catalog import Catalog
from reports.charts import section_charts
from reports.findings import (
    STOPPED,
    section_agreement,
    section_compare,
    section_fits,
    section_headline,
    section_status,
    summarize_modes,
)
from reports.gate import Gate, section_gate
from reports.gate import compare as gate_compare
from reports.load import Run, load_run, run_agreement
from reports.results import _write_atomic
from reports.series import chart_series, fits_for, headline_keys, modes_of, split_series
from reports.text import esc, finite, fmt_n, unit_word, value_html

OUTCOME_MARK = {"passed": "✓", "failed": "✗", "deviation": "≈", "skipped": "–"}


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
            dur = f" in {r.duration_s:.2f} s" if finite(r.duration_s) else ""
            title = f"{mode}: {r.outcome}{dur}" + (f": {r.reason}" if r.reason else "")
            tds.append(f"<td class='o-{esc(r.outcome)}' title='{esc(title)}'>"
                       f"{OUTCOME_MARK.get(r.outcome, '?')} {esc(r.outcome)}</td>")
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(tds)}</tr>")
    legend = ("<p class='muted'>✓ passed · ✗ failed · ≈ deviation (declared, explained on hover) · "
              "– skipped · hover a cell for its reason.</p>")
    return (f"<table class='matrix'><thead><tr><th>check</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{legend}")


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


def _noisy_html(noisy: list, spread: Any, catalog: Catalog) -> str:
    """The runner's noisy rows: a count up front, the rows folded away."""
    total = f" of {len(spread)}" if isinstance(spread, list) and spread else ""
    if not noisy:
        return f"<span class='muted'>none{total + ' repeated measurements' if total else ''}</span>"
    rows = []
    for item in noisy:
        if not isinstance(item, dict):
            rows.append(f"<tr><td colspan='6'>{value_html(item)}</td></tr>")
            continue
        values = item.get("values")
        rows.append(
            f"<tr><td>{esc(item.get('mode', ''))}</td><td>{esc(item.get('n_services', ''))}"
            f"{' ' + esc(item['when']) if item.get('when') else ''}</td>"
            f"<td>{_metric_name(catalog, item.get('metric'))}</td>"
            f"<td>{esc(item.get('target', ''))}</td>"
            f"<td>{esc(item.get('stat', ''))}</td><td>"
            + (f"{float(item['spread']) * 100:.1f} %" if finite(item.get("spread"))
               else "no median to compare with")
            + (f" <span class='muted'>{esc(', '.join(str(v) if finite(v) else '–' for v in values))}</span>"
               if isinstance(values, list) else "") + "</td></tr>")
    return (f"<b>{len(noisy)}{total}</b> repeated measurements spread more than 5 % between "
            f"repeats<details><summary>which</summary><table class='kv'><tr><th>mode</th>"
            f"<th>N</th><th>metric</th><th>target</th><th>stat</th><th>spread, values</th></tr>"
            + "".join(rows) + "</table></details>")


def _metric_name(catalog: Catalog, metric: Any) -> str:
    """A metric in a table: its title, the id on hover."""
    if not isinstance(metric, str) or not metric:
        return esc(metric or "")
    return f"<span title='{esc(metric)}'>{esc(catalog.title(metric))}</span>"


def _catalog_html(catalog: Catalog) -> str:
    rows = "".join(
        f"<tr><th>{esc(m.heading)}</th><td><code>{esc(m.name)}</code></td>"
        f"<td>{esc(unit_word(m.unit))}</td><td>{esc(m.doc)}</td></tr>"
        for m in catalog.entries.values())
    metrics = catalog.entries
    return (f"{len(metrics)} metrics<details><summary>what each measures</summary>"
            f"<table class='kv'>{rows}</table></details>")


def _modes_html(modes: dict) -> str:
    parts = []
    for mode, info in modes.items():
        if not isinstance(info, dict):
            parts.append(f"<b>{esc(mode)}</b> {value_html(info)}")
            continue
        text = f"<b>{esc(mode)}</b> {esc(info.get('status', ''))}"
        if finite(info.get("wall_s")):
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
        "noisy": lambda v: (_noisy_html(v, meta.get("spread"), run.catalog)
                            if isinstance(v, list) else None),
        "metrics": lambda v: _catalog_html(run.catalog) if isinstance(v, list) else None,
        "modes": lambda v: _modes_html(v) if isinstance(v, dict) else None,
    }
    wide = {"versions", "argv", "noisy", "metrics", "args", "modes_skipped", "errors"}

    def add(key: str, label: str) -> None:
        shown.add(key)
        value = meta[key]
        html_value = special[key](value) if key in special else None
        pairs.append((label, html_value if html_value is not None else value_html(value),
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


def render_html(run: Run, older: Run | None = None, gate: Gate | None = None) -> str:
    """The whole report as one HTML string (no external resources); with an older run, the
    tracked metrics' gate (computed here unless given) and the change per metric."""
    catalog = run.catalog
    series_keys, single = split_series(run.bench, chart_series(run.bench, catalog), catalog)
    fits = fits_for(run.bench, series_keys, catalog)
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
        ("findings", "1. Headline findings", section_headline(summaries, agreed, catalog)),
        ("conformance", "2. Conformance: does each mode behave like a Service proxy?",
         section_conformance(run.checks)),
        ("charts", "3. Cost against the number of Services (log-log)",
         section_charts(run, series_keys, fits, single)),
        ("fits", "4. Growth fits",
         section_fits(fits, several_kernels, catalog, headline_keys(run.bench, catalog))),
        ("agreement", "5. Agreement between passes",
         section_agreement(agreed, agreed_from, several_kernels, catalog)),
        ("environment", "6. Environment", section_environment(run)),
    ]
    if older is not None:
        gate = gate or gate_compare(run, older)
        sections.append(("tracked", "7. Tracked metrics against the older run",
                          section_gate(gate, catalog.merged(older.catalog))))
        sections.append(("compare", "8. Change since the older run", section_compare(run, older)))
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
    return write_page(run, older, output)


def write_page(run: Run, older: Run | None = None, output: str | Path | None = None,
               gate: Gate | None = None) -> Path:
    """Write the page of runs already read; its path."""
    path = Path(output) if output else run.path / REPORT_HTML
    _write_atomic(path, render_html(run, older, gate))
    return path
