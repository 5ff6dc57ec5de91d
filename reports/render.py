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
  run, the change per metric and mode.

The page loads nothing (no fonts, scripts or images from anywhere), so it opens offline;
figures counted in clock ticks carry their resolution, and a reader never sees nan or
inf. No metric is named in reports/: titles, units and roles come from run.json's catalog.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reports.findings import compare_runs, measured_elsewhere
from reports.load import ReportError, Run, load_run, normalize_bench
from reports.page import REPORT_HTML, render_html, write_report


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
    "measured_elsewhere", "normalize_bench", "render_html", "run_report_command",
    "write_report",
]
