"""`python -m reports.merge RUN_DIR OTHER_RUN_DIR`: one report over two kernels.

`nox -s bench` sweeps the host's modes on the host kernel and IPVS (with iptables beside
it, so the guest has its own O(N) reference) inside the User-Mode-Linux guest, which
writes a run folder of its own. This adds the other run's bench.csv rows (their `kernel`
column already names the kernel that ran them) to RUN_DIR's, and records the other run's
environment and status in RUN_DIR's run.json under `other_runs`, so the report shows both
kernels side by side; numbers are compared only within a kernel. Both writes are atomic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from reports.results import (
    BENCH_CSV,
    RUN_JSON,
    append_bench_csv,
    read_bench_csv,
    read_json,
    write_run_json,
)

KEPT_META = ("kernel", "kernel_kind", "status", "complete", "started", "finished", "modes",
             "args", "metrics_skipped")


def merge_runs(run_dir: Path, other: Path) -> int:
    """Add `other`'s rows to run_dir; returns how many rows were added."""
    for folder in (run_dir, other):
        if not (folder / RUN_JSON).is_file():
            raise ValueError(f"{str(folder)!r} is not a run folder (no {RUN_JSON})")
    meta = read_json(run_dir / RUN_JSON)
    key = str(other.resolve())
    if key in meta.get("other_runs", {}):
        return 0  # merged before: adding the rows again would count them twice
    theirs = read_bench_csv(other / BENCH_CSV) if (other / BENCH_CSV).exists() else []
    added = append_bench_csv(run_dir, theirs)
    other_meta: dict[str, Any] = read_json(other / RUN_JSON)
    meta.setdefault("other_runs", {})[key] = {k: other_meta[k] for k in KEPT_META if k in other_meta}
    write_run_json(run_dir, meta)
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.merge", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run folder the report is made from")
    parser.add_argument("other", type=Path, help="a run folder whose rows are added to it")
    args = parser.parse_args(argv)
    try:
        added = merge_runs(args.run_dir, args.other)
    except ValueError as exc:
        print(f"svcbench: {exc}", file=sys.stderr)
        return 2
    print(f"added {added} rows of {args.other} to {args.run_dir / BENCH_CSV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
