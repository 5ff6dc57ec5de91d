"""The report takes every metric's title, unit, meaning and role from run.json's catalog
(bench/metrics.py `catalog()`): a metric it has never heard of renders under its catalog
title and unit, no metric id is spelled in reports/, and a run.json from before a field
existed still renders, with the id made readable."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

from bench.metrics import catalog
from reports.render import compare_runs, load_run, write_report
from reports.results import write_csv, write_json
from tests.test_report import synthetic_rows

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 10, 100, 1000)

MADE_UP = [
    {"name": "hop_floor_us", "unit": "us", "title": "One hop with nothing on the path",
     "doc": "A hop no mode programs."},
    {"name": "hop_latency_us", "unit": "us", "title": "One hop through the proxy", "short": "hop",
     "doc": "One hop through whatever the mode programmed.", "headline": [""],
     "floor": "hop_floor_us"},
    {"name": "widget_flux_ms", "unit": "ms", "title": "Widget flux settling time",
     "short": "widget flux", "doc": "How long the widget flux takes to settle.",
     "finding": "widget flux", "scorecard": True, "better": "lower"},
    {"name": "gadget_count", "unit": "gadgets", "title": "Gadgets left behind",
     "doc": "Gadgets a sync leaves behind, counted once."},
    {"name": "rewire_ms", "unit": "ms", "title": "Rewiring one widget", "short": "rewire",
     "doc": "One widget rewired among N.", "verdict": True},
]


def made_up_rows() -> list[dict]:
    """Two modes: `alpha` adds 0.5 µs per Service to a hop, `beta` adds nothing."""
    rng = np.random.default_rng(4)
    rows = []
    for mode, slope in (("alpha", 0.5), ("beta", 0.0)):
        for rep in range(3):
            for when in ("start", "end"):
                rows.append(dict(mode=mode, kernel="6.18.0", n_services=0, metric="hop_floor_us",
                                 stat="p50", value=round(200 + rng.normal(0, 1), 1), unit="us",
                                 repeat=rep, target="198.18.130.2", when=when))
            for n in SIZES:
                rows.append(dict(mode=mode, kernel="6.18.0", n_services=n, metric="hop_latency_us",
                                 stat="p50", value=round(210 + slope * n + rng.normal(0, 1), 1),
                                 unit="us", repeat=rep, target="198.19.0.1", when=""))
                rows.append(dict(mode=mode, kernel="6.18.0", n_services=n, metric="widget_flux_ms",
                                 stat="value", value=12.0 + rep * 0.01, unit="ms", repeat=rep,
                                 target="", when=""))
                # alpha rewires in O(N), beta in O(1)
                rows.append(dict(mode=mode, kernel="6.18.0", n_services=n, metric="rewire_ms",
                                 stat="value", value=round(5 + slope * n * 0.1
                                                           + abs(rng.normal(0, 0.05)), 3),
                                 unit="ms", repeat=rep, target="", when=""))
        rows.append(dict(mode=mode, kernel="6.18.0", n_services=1000, metric="gadget_count",
                         stat="count", value=7, unit="gadgets", repeat=0, target="", when=""))
    return rows


def page_text(page: str, section: str) -> str:
    part = page.split(f"id='{section}'")[1].split("</section>")[0]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", part))


def captions(page: str) -> list[str]:
    return re.findall(r"<figcaption.*?</figcaption>", page)


def test_a_made_up_metric_renders_with_its_catalog_title_and_unit(tmp_path):
    write_csv(tmp_path / "bench.csv", made_up_rows())
    write_json(tmp_path / "run.json", {"kernel": "6.18.0", "complete": True, "status": "complete",
                                       "finished": "now", "metrics": MADE_UP,
                                       "metrics_skipped": {"gamma": {"gadget_count": "no gadgets"}}})
    page = write_report(tmp_path).read_text()
    banner = re.sub(r"<[^>]+>", "", page.split("<div class='banner")[1].split("</div>")[0])
    assert "Gadgets left behind (gadget_count) not measured in gamma: no gadgets" in banner
    caps = captions(page)
    # chart titles: the catalog's title with its unit, what it measures on hover, the id aside
    flux = next(c for c in caps if "widget_flux_ms" in c)
    assert "<b>Widget flux settling time (ms)</b>" in flux
    assert "title='How long the widget flux takes to settle.'" in flux
    hop = next(c for c in caps if "hop_latency_us" in c)
    assert "<b>One hop through the proxy (µs)</b>" in hop
    assert not any("hop_floor_us" in c for c in caps)  # a floor is drawn in its metric's chart
    # the catalog's headline, floor, finding and scorecard roles, for metrics it alone names
    findings = page_text(page, "findings")
    assert re.search(r"alpha at 1,000 Services: \+[\d.]+ µs per hop over the floor "
                     r"\(one hop through the proxy, p50", findings), findings
    assert "growing as N" in findings and "widget flux 12.0 ms" in findings
    assert "Fastest: beta" in findings
    # a `verdict` metric: every mode's sentence states its growth, an exponent only if it grows
    alpha, beta = findings.split(" beta at ")
    assert re.search(r"rewire growing as N [\d.]+ \(95 % CI [\d.]+–[\d.]+\), .* at 1,000 "
                     r"Services", alpha), alpha
    assert re.search(r"rewire flat, 5\.\d+ ms at 1,000 Services", beta), beta
    assert "rewire growing" not in beta
    score = page.split("<table class='score'>")[1].split("</table>")[0]
    assert ">hop p50<" in score and ">widget flux<" in score
    assert "title='Widget flux settling time (ms): How long" in score
    heads = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th>(.*?)</th>", score)]
    column = heads.index("rewire: growth")
    cells = {re.sub(r"<[^>]+>", "", c[0]): c[column] for c in
             (re.findall(r"<td>(.*?)</td>", row) for row in score.split("<tr>")[2:])}
    assert "N<sup>" in cells["alpha"] and re.sub(r"<[^>]+>", "", cells["beta"]) == "flat"
    # a metric measured at one size: the table shows its title and unit
    single = page.split("<table class='single'>")[1].split("</table>")[0]
    assert "Gadgets left behind</span> <span class='muted'>count, gadgets</span>" in single
    assert "7 gadgets" in single
    fits = page_text(page, "fits")
    assert "One hop through the proxy p50, µs" in fits
    assert "One hop through the proxy" in page_text(page, "agreement")


def literals(path: Path) -> tuple[list[str], list[str]]:
    """(docstrings, every other string literal, f-string parts included) of one module."""
    tree = ast.parse(path.read_text(), str(path))
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}
    strings = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return ([n.value for n in strings if id(n) in docs],
            [n.value for n in strings if id(n) not in docs])


def test_no_metric_id_is_spelled_in_reports():
    ids = {m["name"] for m in catalog()}
    assert ids and "conn_latency_us" in ids  # the catalog is what this test reads
    found = []
    for path in sorted((ROOT / "reports").glob("*.py")):
        docs, code = literals(path)
        for name in ids:
            token = re.compile(rf"(?<!\w){re.escape(name)}(?!\w)")
            # a plain word ("rules") may be English in a docstring, never a literal
            texts = code + (docs if "_" in name else [])
            found += [f"{path.name}: {name} in {text[:60]!r}" for text in texts
                      if token.search(text)]
    assert found == []


def old_catalog() -> list[dict]:
    """run.json's catalog as the runner wrote it before the report's fields existed."""
    return [{k: m[k] for k in ("name", "unit", "doc", "phase", "group", "targets", "budget_s")
             if k in m} for m in catalog() if "phase" in m and m.get("group")]


def test_an_old_run_json_without_the_report_fields_still_renders(tmp_path):
    rows = synthetic_rows(modes=("iptables", "nftables"), sizes=(1, 10, 100, 1000, 10000))
    rows += [dict(mode=m, kernel="6.18.0", n_services=n, metric=metric, stat="value",
                  value=v * (1 + n / 1e4) + 0.01 * rep, unit="s", repeat=rep, target="", when="")
             for m in ("iptables", "nftables") for n in (10, 1000) for rep in range(2)
             for metric, v in (("sync_one_s", 0.02), ("queue_wait_s", 0.5))]
    for name, meta in (("old", {"metrics": old_catalog()}), ("none", {})):
        folder = tmp_path / name
        folder.mkdir()
        write_csv(folder / "bench.csv", rows)
        write_json(folder / "run.json", {"kernel": "6.18.0", "complete": True, **meta})
        page = write_report(folder).read_text()
        caps = captions(page)
        # the id made readable, with the unit; never the id as a title
        assert any("<b>Sync one (seconds)</b>" in c for c in caps), caps
        assert any("<b>Queue wait (seconds)</b>" in c for c in caps), caps
        assert not any(re.search(r"<b>[^<]*_", c) for c in caps), caps
        # the headline series stands on the floor (a catalog that names none: by convention)
        last = page.split("<code>conn_latency_us:last</code>")[1].split("</figure>")[0]
        assert "<g class='floor'>" in last
        # the headline falls back on the series named by a target word, the last first
        findings = page_text(page, "findings")
        assert re.search(r"iptables at 10,000 Services: \+[\d.]+ µs over the floor \(the last "
                         r"Service, p50", findings), findings
        assert "nan" not in findings.lower()

    # which way is better is unknown in an old catalog: a change beyond noise is only that
    faster = [dict(r, value=r["value"] * (0.5 if r["metric"] == "queue_wait_s" else 1.0))
              for r in rows]
    (tmp_path / "newer").mkdir()
    write_csv(tmp_path / "newer" / "bench.csv", faster)
    write_json(tmp_path / "newer" / "run.json", {"kernel": "6.18.0", "metrics": old_catalog()})
    table = compare_runs(load_run(tmp_path / "newer"), load_run(tmp_path / "old"))
    wait = table[table["metric"] == "queue_wait_s"]
    assert set(wait["verdict"]) == {"changed"}, table
    assert set(table[table["metric"] != "queue_wait_s"]["verdict"]) == {"within noise"}
