"""`--kernel uml` on the command line: which guest kernel a command line runs in, and how.

`clusters/uml.py` owns the guests (boot, command channel, stop); this module reads the
command line: `up` boots a kept guest that keeps the cluster; apply/delete/probe/status/service/down
go to the guest holding the run; anything else (bench, conformance) runs in a one-shot
guest. `--kernel uml` is dropped from what the guest runs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from clusters.uml import (
    BENCH_MEM,
    DEFAULT_MEM,
    FORWARD_TIMEOUT_S,
    run_in_guest,
    run_in_kept_guest,
    up_in_guest,
)
from clusters.uml_host import UmlError

RUN_COMMANDS = ("apply", "delete", "probe", "status", "down", "service")


def drop_kernel_flag(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--kernel" and i + 1 < len(argv):
            skip = True
            continue
        if arg.startswith("--kernel="):
            continue
        out.append(arg)
    return out


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def reads_stdin(argv: Sequence[str]) -> bool:
    return any(
        (a in ("-f", "--file") and i + 1 < len(argv) and argv[i + 1] == "-")
        or a in ("-f-", "--file=-")
        for i, a in enumerate(argv)
    )


def guest_mem(default: str = DEFAULT_MEM) -> str:
    mem = os.environ.get("SVCBENCH_UML_MEM", default)
    if not re.fullmatch(r"\d+[KMG]", mem):
        raise UmlError(f"SVCBENCH_UML_MEM {mem!r} must be a size such as 1024M or 2G")
    return mem


def forward_timeout() -> float:
    try:
        return float(os.environ.get("SVCBENCH_UML_TIMEOUT", FORWARD_TIMEOUT_S))
    except ValueError:
        return FORWARD_TIMEOUT_S


def forward(argv: Sequence[str]) -> int:
    """Run a svcbench command line in a guest kernel; its exit status (1 when no guest could
    run it, with the reason on stderr)."""
    argv = drop_kernel_flag(argv)
    command = argv[0] if argv else ""
    try:
        stdin = sys.stdin.buffer.read() if reads_stdin(argv) else None
        if command == "up":
            return up_in_guest(argv, stdin=stdin, mem=guest_mem(), timeout=forward_timeout())
        if command in RUN_COMMANDS:
            return run_in_kept_guest(flag_value(argv, "--run"), argv, stdin=stdin,
                                     timeout=forward_timeout())
        mem = guest_mem(BENCH_MEM if command == "bench" else DEFAULT_MEM)
        return run_in_guest(argv, timeout=forward_timeout(), mem=mem,
                            out_dir=flag_value(argv, "--out") or "runs")
    except UmlError as exc:
        sys.stderr.write(f"svcbench: {exc}\n")
        return 1
