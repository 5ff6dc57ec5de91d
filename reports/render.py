"""`svcbench report RUN_DIR`: a run folder -> one self-contained HTML page a reviewer reads
in a minute.

The page is built in four steps, one module each:

- reports/load.py reads the folder: bench.csv, run.json (with the metric catalog,
  reports/catalog.py), conformance*.json, and the agreement between passes;
- reports/findings.py writes what the page states: one sentence per mode with one growth
  verdict (fit.decide), the scorecard, why a run is partial, the growth fits
  (reports/fit.py), the agreement (reports/agreement.py), the change since an older run;
- reports/charts.py draws one log-log chart per series (a table for series measured at
  one size), inline SVG, from the rows as series (reports/series.py);
- reports/page.py assembles them in reading order: headline findings, the conformance
  matrix, the charts, the growth fits, the agreement, the environment and, with an older
  run, the tracked metrics' gate (reports/gate.py: exit 1 on a regression) and the change
  per metric and mode.

The page loads nothing (no fonts, scripts or images from anywhere), so it opens offline;
figures counted in clock ticks carry their resolution, and a reader never sees nan or
inf. No metric is named in reports/: titles, units and roles come from run.json's catalog.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from reports.args import add_report_arguments
from reports.catalog import Catalog
from reports.findings import compare_runs, measured_elsewhere
from reports.gate import Gate, text_table
from reports.gate import compare as gate_compare
from reports.load import ReportError, Run, load_run, normalize_bench
from reports.page import render_html, write_page, write_report


def run_report_command(args: argparse.Namespace, fallback: Catalog | None = None) -> int:
    """`svcbench report`: write the page, print its path; with --compare print the tracked
    metrics' table too and return 1 when one regressed. 2 when a run folder is unusable or
    the two share nothing tracked. `fallback`: a catalog for runs whose run.json lacks one."""
    as_json = getattr(args, "json", False)
    try:
        run = load_run(args.run_dir)
        older = load_run(args.compare) if args.compare else None
        gate: Gate | None = gate_compare(run, older, fallback) if older is not None else None
        if gate is not None and not gate.compared:
            raise ReportError(
                f"nothing to compare: {args.compare!r} and {args.run_dir!r} share no tracked "
                f"metric measured by the same mode, nor a mode's conformance checks")
        path = write_page(run, older, args.output, gate)
    except ReportError as exc:
        print(f"svcbench report: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"svcbench report: cannot write the report: {exc}", file=sys.stderr)
        return 1
    if as_json:
        doc = {"report": str(path), **({"compare": gate.as_dict()} if gate else {})}
        print(json.dumps(doc, indent=2))
    else:
        if gate is not None:
            print(text_table(gate))
        print(path)
    return 1 if gate is not None and gate.regressions else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="svcbench report",
                                     description="render a run folder as one HTML page")
    add_report_arguments(parser)
    return run_report_command(parser.parse_args(argv))


__all__ = [
    "ReportError", "Run", "add_report_arguments", "compare_runs", "load_run", "main",
    "measured_elsewhere", "normalize_bench", "render_html", "run_report_command",
    "write_report",
]
