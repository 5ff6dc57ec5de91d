"""`svcbench report`'s flags, apart from the report's code: building the command line must
not import pandas and scipy (every svcbench command builds the whole parser)."""

from __future__ import annotations

import argparse

REPORT_HTML = "report.html"  # the page's name in its run folder


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (bench.csv, run.json, "
                        "conformance*.json)")
    parser.add_argument("--compare", metavar="OLDER_RUN_DIR",
                        help="older run folder: show the change per metric and mode, and judge "
                        "the tracked metrics (exit 1 when one regressed beyond its threshold)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help=f"where to write the page (default RUN_DIR/{REPORT_HTML})")
    parser.add_argument("--json", action="store_true",
                        help="print the page's path (and with --compare the tracked metrics' "
                        "verdicts) as JSON")
    return parser
