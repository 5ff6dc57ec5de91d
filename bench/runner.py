"""`svcbench bench`: every usable mode over the same sweep, into one run folder.

The folder (reports/results.py holds its schema) gets run.json (environment, arguments,
status, skipped modes and metrics, spread of the repeats), bench.csv (one row per
measurement) and raw/<mode>/<phase>.json (every sample), each written atomically while
the sweep runs. Ctrl-C, SIGTERM and SIGHUP, or the end of a `--budget` (once the size
being measured is done), keep what was measured and mark the run incomplete with the
reason; a folder whose process was killed outright is marked killed by the next run or
`svcbench gc`. On a terminal a rich progress bar runs on stderr; elsewhere (CI logs) stderr
gets one line per size visited, with the time spent and an estimate of what remains. A
one-screen summary ends the run.

The CLI calls `add_bench_arguments` and `run_bench_command`; `python -m bench.runner`
does the same on its own. Bad input raises `BenchSpecError` (exit status 2) before
anything is created.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from bench.metrics import catalog, steps_of
from bench.sweep import ModeUnavailable, Row, SweepConfig, SweepListener, load_mode
from reports.results import (
    RAW_DIR,
    environment,
    new_run_dir,
    read_json,
    write_bench_csv,
    write_json,
    write_run_json,
)

DEFAULT_SIZES = (1, 10, 100, 1000, 5000, 10000)
MAX_SERVICES = 60000  # the Service CIDR 198.19.0.0/16 holds 65,534 ClusterIPs
NOISE = 0.05  # the goal: repeats of a p50 differ by less than 5 %
FLUSH_EVERY_S = 2.0  # bench.csv and raw files are rewritten at most this often (and at the end)

# Flag values a preset gives when the flag itself is not given. `bench` is the default and
# what `nox -s bench` runs: every usable mode, 1 to 10,000 Services, then endpoint churn at
# 1,000 and 10,000 (bench/churn.py), sized for 15 minutes on a quiet 2-core machine.
# `nightly`: up to 30,000 Services, more repeats and connections, 30 s of churn per size.
# `quick`: a smoke run of every mode and metric in about a minute.
PRESETS: dict[str, dict[str, str]] = {
    "bench": {"services": "1,10,100,1000,5000,10000", "repeats": "3", "count": "200",
              "load_seconds": "1.5", "load_repeats": "1", "churn": "1000,10000",
              "churn_seconds": "5"},
    "nightly": {"services": "1,10,100,1000,5000,10000,20000,30000", "repeats": "5",
                "count": "1000", "load_seconds": "5", "load_repeats": "3",
                "churn": "1000,10000", "churn_seconds": "30"},
    "quick": {"services": "1,10,100", "repeats": "1", "count": "50", "load_seconds": "0.5",
              "load_repeats": "1", "churn": "100", "churn_seconds": "2"},
}
FLAG_DEFAULTS = {"modes": "all", "kernel": "host", "endpoints": "3", "metrics": "all",
                 "pool_size": "6", "out": "runs"}
NIGHTLY_ARGS = ["--preset", "nightly"]

class BenchSpecError(ValueError):
    """A bench flag the user can fix: one sentence naming the flag and the accepted values."""


@dataclass
class BenchSpec:
    modes: list[str]
    sizes: list[int]
    endpoints: int
    repeats: int
    count: int
    out: str
    kernel: str
    backend: str | None
    metrics: list[str] | None
    pool_size: int
    load_seconds: float
    load_repeats: int
    modes_given: bool = False  # --modes named them: an unusable one is still only skipped
    preset: str = "bench"
    budget_s: float | None = None  # stop after the size being measured once this much has passed
    churn: list[int] = field(default_factory=list)  # bench/churn.py after each mode: its sizes
    churn_seconds: float = 0.0  # of changes per churn size

    def sweep_config(self) -> SweepConfig:
        return SweepConfig(
            modes=self.modes, sizes=self.sizes, endpoints=self.endpoints, count=self.count,
            backend=self.backend, pool_size=self.pool_size, repeats=self.repeats,
            metrics=tuple(self.metrics) if self.metrics else None,
            load_seconds=self.load_seconds, load_repeats=self.load_repeats,
        )


# --------------------------------------------------------------------------- arguments


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `svcbench bench`; values are checked by run_bench_command (BenchSpecError)."""
    bench, nightly = PRESETS["bench"], PRESETS["nightly"]
    parser.add_argument("--preset", default="bench",
                        help=f"defaults for the flags below: bench (nox -s bench) or nightly "
                             f"(up to {nightly['services'].rsplit(',', 1)[1]} Services)")
    parser.add_argument("--modes", help="comma-separated proxy modes, each with its options "
                                        "(ipvs:rr,ipvs:lc compares two schedulers), or all "
                                        "(default: every mode; those this host cannot run are "
                                        "skipped with why)")
    parser.add_argument("--kernel", help="host (default), or uml to run inside a User-Mode-Linux "
                                         "guest kernel")
    parser.add_argument("--services", help="comma-separated numbers of Services, swept up and "
                                           f"back down once per repeat (default {bench['services']})")
    parser.add_argument("--endpoints", help="endpoints per Service (default 3)")
    parser.add_argument("--repeats", help="repeats of every measurement, taken as passes up and "
                                          f"down the sizes (default {bench['repeats']})")
    parser.add_argument("--count", help=f"new connections per latency sample (default {bench['count']})")
    parser.add_argument("--out", help="folder that receives the run folder (default runs)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--backend", help="iptables backend: nft (default) or legacy")
    parser.add_argument("--metrics", help="comma-separated metrics, or all (default)")
    parser.add_argument("--pool-size", help="backend pods shared by every Service (default 6)")
    parser.add_argument("--load-seconds", help="locust window per throughput sample, seconds "
                                               f"(default {bench['load_seconds']})")
    parser.add_argument("--load-repeats", help="throughput samples per size "
                                               f"(default {bench['load_repeats']})")
    parser.add_argument("--budget", help="time for the whole sweep, such as 3h, 90m or 1h30m: "
                                         "past it the run stops after the current size and is "
                                         "marked incomplete (default: no limit)")
    parser.add_argument("--churn", help="after each mode's sweep, endpoint churn at these "
                                        "numbers of Services, or none (default: the preset's, "
                                        f"{bench['churn']}; none when --services is given)")
    parser.add_argument("--churn-seconds", help="seconds of endpoint changes (20 a second) per "
                                                f"churn size (default {bench['churn_seconds']})")
    return parser


BUDGET_RE = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_budget(text: str | None) -> float | None:
    """Seconds in a --budget such as 3h, 90m, 1h30m, 600s or 600; None for no budget."""
    if text is None:
        return None
    value = str(text).strip()
    match = BUDGET_RE.fullmatch(value)
    if value.isdigit():
        seconds = float(value)
    elif value and match:
        h, m, sec = (int(g or 0) for g in match.groups())
        seconds = float(h * 3600 + m * 60 + sec)
    else:
        seconds = 0.0
    if not 1 <= seconds <= 7 * 86400:
        raise BenchSpecError(f"--budget must be a time from 1s to 168h such as 3h, 90m, 1h30m "
                             f"or 600s, not {text!r}")
    return seconds


def _flags(args: argparse.Namespace) -> argparse.Namespace:
    """The flags with the preset's values, then the defaults, where none was given."""
    preset = getattr(args, "preset", None) or "bench"
    if preset not in PRESETS:
        raise BenchSpecError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    values = {**FLAG_DEFAULTS, **PRESETS[preset]}
    if getattr(args, "services", None) is not None:
        values["churn"] = "none"  # a hand-picked sweep churns only when --churn asks
    filled = argparse.Namespace(**vars(args))
    for key, value in values.items():
        if getattr(filled, key, None) is None:
            setattr(filled, key, value)
    return filled


def _whole(flag: str, text: Any, lo: int, hi: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise BenchSpecError(f"{flag} must be a whole number from {lo:,} to {hi:,}, not {text!r}")
    return value


def _list(flag: str, text: str, accepted: Sequence[str]) -> list[str] | None:
    words = [w.strip() for w in str(text).split(",") if w.strip()]
    if words == ["all"]:
        return None
    bad = [w for w in words if w not in accepted]
    if not words or bad:
        raise BenchSpecError(f"{flag} must be all or a comma-separated list of: "
                             f"{', '.join(accepted)}; got {text!r}")
    return list(dict.fromkeys(words))


def _modes(text: str) -> list[str] | None:
    """--modes: all (None), or mode specs (dataplanes/modes.py), each by its canonical label:
    `ipvs:rr,ipvs:lc` sweeps IPVS twice, one series per scheduler."""
    from dataplanes.modes import UnknownMode, parse_modes

    if str(text).strip() == "all":
        return None
    try:
        return [spec.label for spec in parse_modes(text, "--modes")]
    except UnknownMode as exc:
        raise BenchSpecError(f"{exc} (or all)") from None


def parse_spec(args: argparse.Namespace) -> BenchSpec:
    """The sweep the flags ask for, or BenchSpecError naming the flag and its accepted values."""
    from bench.metrics import BY_NAME
    from dataplanes.modes import IPTABLES_BACKENDS, MODES

    args = _flags(args)
    modes = _modes(args.modes)
    sizes_text = str(args.services)
    try:
        sizes = sorted({int(x) for x in sizes_text.split(",") if x.strip()})
    except ValueError:
        sizes = []
    if not sizes or not all(1 <= n <= MAX_SERVICES for n in sizes):
        raise BenchSpecError(f"--services must be comma-separated whole numbers from 1 to "
                             f"{MAX_SERVICES:,}, such as 1,10,100,1000; got {sizes_text!r}")
    kernel = str(args.kernel)
    if kernel not in ("host", "uml"):
        raise BenchSpecError(f"--kernel must be host or uml, not {kernel!r}")
    if kernel == "uml" and not in_guest():
        raise BenchSpecError("--kernel uml runs through `svcbench bench --kernel uml`, which boots "
                             "the guest kernel; this entry point only measures the kernel it runs on")
    backend = getattr(args, "backend", None)
    if backend is not None and backend not in IPTABLES_BACKENDS:
        raise BenchSpecError(f"--backend must be one of {', '.join(IPTABLES_BACKENDS)}, not {backend!r}")
    pool = _whole("--pool-size", args.pool_size, 2, 250)
    endpoints = _whole("--endpoints", args.endpoints, 1, 100)
    if endpoints >= pool:
        raise BenchSpecError(f"--endpoints must be smaller than --pool-size ({pool}) so a Service "
                             f"can move to a pod it does not use; got {endpoints}")
    try:
        load_seconds = float(args.load_seconds)
    except ValueError:
        load_seconds = -1.0
    if not 0.5 <= load_seconds <= 120:
        raise BenchSpecError(f"--load-seconds must be a number from 0.5 to 120, not {args.load_seconds!r}")
    out = str(args.out)
    if Path(out).exists() and not Path(out).is_dir():
        raise BenchSpecError(f"--out must be a folder, and {out!r} is a file")
    churn_text = str(args.churn).strip()
    try:
        churn = ([] if churn_text == "none" else
                 sorted({int(x) for x in churn_text.split(",") if x.strip()}))
    except ValueError:
        churn = [0]
    if churn_text != "none" and (not churn or not all(1 <= n <= MAX_SERVICES for n in churn)):
        raise BenchSpecError(f"--churn must be none or comma-separated whole numbers from 1 to "
                             f"{MAX_SERVICES:,}, such as 1000,10000; got {churn_text!r}")
    try:
        churn_seconds = float(args.churn_seconds)
    except ValueError:
        churn_seconds = -1.0
    if not 0.5 <= churn_seconds <= 3600:
        raise BenchSpecError(f"--churn-seconds must be a number from 0.5 to 3600, not "
                             f"{args.churn_seconds!r}")
    return BenchSpec(
        modes=modes or list(MODES),
        sizes=sizes,
        endpoints=endpoints,
        repeats=_whole("--repeats", args.repeats, 1, 100),
        count=_whole("--count", args.count, 10, 100_000),
        out=out,
        kernel=kernel,
        backend=backend,
        metrics=_list("--metrics", args.metrics, list(BY_NAME)),
        pool_size=pool,
        load_seconds=load_seconds,
        load_repeats=_whole("--load-repeats", args.load_repeats, 1, 20),
        modes_given=modes is not None,
        preset=args.preset or "bench",
        budget_s=parse_budget(getattr(args, "budget", None)),
        churn=churn,
        churn_seconds=churn_seconds,
    )


def in_guest() -> bool:
    """True inside the User-Mode-Linux guest clusters/uml.py boots."""
    return os.environ.get("SVCBENCH_KERNEL") == "uml"


def nightly_args() -> list[str]:
    """What `nox -s nightly` passes to `svcbench bench`."""
    return list(NIGHTLY_ARGS)


# --------------------------------------------------------------------------- the run folder


@dataclass
class RunFolder:
    """Everything the run measured so far, on disk: run.json, bench.csv, raw/."""

    path: Path
    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    raw: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    _dirty: set[tuple[str, str]] = field(default_factory=set)
    _rows_dirty: bool = False
    _flushed: float = 0.0

    def add(self, rows: list[Row], raw: dict) -> None:
        self.rows.extend(rows)
        self._rows_dirty = self._rows_dirty or bool(rows)
        when = raw.get("when") or ""
        phase = raw.get("phase") or (f"floor-{when}" if when else f"n{raw.get('n_services', 0)}")
        key = (raw.get("mode", "unknown"), phase)
        self.raw.setdefault(key, []).append(raw)
        self._dirty.add(key)
        if time.monotonic() - self._flushed >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self._rows_dirty:
            write_bench_csv(self.path, [r.as_dict() for r in self.rows])
            self._rows_dirty = False
        for mode, phase in sorted(self._dirty):
            write_json(self.path / RAW_DIR / mode / f"{phase}.json", self.raw[(mode, phase)])
        self._dirty.clear()
        self._flushed = time.monotonic()

    def save_meta(self) -> None:
        write_run_json(self.path, self.meta)


class BudgetSpent(Exception):
    """The --budget ran out; raised between two sizes so the mode's cleanup runs as usual."""


def _clock(seconds: float) -> str:
    """1h02m, 14m05s, 42s."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class SweepClock:
    """When each (mode, pass, size) visit ended; what the visits left should take.

    A size not visited yet in this mode is guessed from the same size in modes already
    swept, else from this mode's visits so far: a rough figure in the first pass, a good one
    from the second on.
    """

    def __init__(self, visits: list[tuple[int, int]], budget_s: float | None):
        self.visits, self.budget_s = visits, budget_s
        self.modes: list[str] = []  # the modes that will be swept, in order
        self.started = self.last = time.monotonic()
        self.took: dict[tuple[str, int], list[float]] = {}
        self.done = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def mode_started(self) -> None:
        self.last = time.monotonic()

    def visited(self, mode: str, n: int) -> float:
        now = time.monotonic()
        took, self.last = now - self.last, now
        self.took.setdefault((mode, n), []).append(took)
        self.done += 1
        return took

    def _guess(self, mode: str, n: int) -> float:
        same = self.took.get((mode, n))
        same_n = [t for (_, size), ts in self.took.items() if size == n for t in ts]
        mine = [t for (m, _), ts in self.took.items() if m == mode for t in ts]
        pool = same or same_n or mine or [t for ts in self.took.values() for t in ts]
        return sum(pool) / len(pool) if pool else 0.0

    def remaining(self, mode: str) -> float:
        """Seconds the visits after the current one should take, this mode and those after it."""
        index = self.modes.index(mode)
        per_mode = len(self.visits)
        left_here = self.visits[self.done - index * per_mode:]
        total = sum(self._guess(mode, n) for _, n in left_here)
        for later in self.modes[index + 1:]:
            total += sum(self._guess(later, n) for _, n in self.visits)
        return total

    def over_budget(self) -> bool:
        return self.budget_s is not None and self.elapsed() >= self.budget_s


class _Listener(SweepListener):
    def __init__(self, folder: RunFolder, progress: Progress | None, task: Any, err: Console,
                 clock: SweepClock | None = None, lines: bool = False):
        self.folder, self.bar, self.task, self.err = folder, progress, task, err
        self.clock, self.lines = clock, lines

    def progress(self, message: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=message)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def observed(self, rows: list[Row], raw: dict) -> None:
        self.folder.add(rows, raw)

    def visited(self, mode: str, repeat: int, n_services: int) -> None:
        if self.clock is None:
            return
        took = self.clock.visited(mode, n_services)
        if self.lines:
            passes = len(self.clock.visits) // max(1, len(self.folder.meta["args"]["sizes"]))
            way = "up" if repeat % 2 == 0 else "down"
            self.err.print(f"bench: {mode} pass {repeat + 1}/{passes} ({way}) {n_services:,} Services "
                           f"in {_clock(took)}; {_clock(self.clock.elapsed())} so far, about "
                           f"{_clock(self.clock.remaining(mode))} left", markup=False, highlight=False)
        if self.clock.over_budget():
            self.folder.meta["stopped_at"] = {
                "mode": mode, "pass": repeat + 1, "n_services": n_services,
                "elapsed_s": round(self.clock.elapsed(), 1), "budget_s": self.clock.budget_s}
            raise BudgetSpent(f"the {_clock(self.clock.budget_s)} budget ran out after {mode} "
                              f"pass {repeat + 1} at {n_services:,} Services")

    def cluster_created(self, mode: str, run_id: str) -> None:
        self.folder.meta["modes"].setdefault(mode, {})["cluster"] = run_id
        self.folder.save_meta()

    def metric_skipped(self, mode: str, metric: str, reason: str) -> None:
        self.folder.meta["metrics_skipped"].setdefault(mode, {})[metric] = reason
        self.folder.save_meta()

    def metric_failed(self, mode: str, metric: str, n_services: int, error: str) -> None:
        self.folder.meta["errors"].append(
            {"mode": mode, "metric": metric, "n_services": n_services, "error": error})
        self.folder.save_meta()
        self.err.print(f"[yellow]{mode}: {metric} at {n_services:,} Services failed:[/] {error}",
                       markup=True, highlight=False)


# --------------------------------------------------------------------------- spread


def spread(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (mode, size, metric, target, noise stat): repeats' values and their spread."""
    from bench.metrics import BY_NAME

    groups: dict[tuple, list[float]] = {}
    for r in rows:
        metric = BY_NAME.get(r.metric)
        if metric is None or metric.noise_stat != r.stat or r.value != r.value:  # NaN
            continue
        key = (r.mode, r.n_services, r.metric, r.extra.get("target", ""), r.extra.get("when", ""),
               r.stat)
        groups.setdefault(key, []).append(float(r.value))
    out = []
    for (mode, n, metric, target, when, stat), values in groups.items():
        if len(values) < 2:
            continue
        mid = sorted(values)[len(values) // 2]
        width = (max(values) - min(values)) / mid if mid else float("inf")
        out.append({"mode": mode, "n_services": n, "metric": metric, "target": target,
                    "when": when, "stat": stat, "values": values, "spread": round(width, 4),
                    "noisy": width > NOISE})
    return out


# --------------------------------------------------------------------------- the command


def run_bench_command(args: argparse.Namespace, out: Console | None = None,
                      err: Console | None = None, argv: Sequence[str] | None = None) -> int:
    """Sweep every selected mode into a new run folder.

    Exit status: 0 done, 1 a mode or a measurement failed (the rest is kept), 130 Ctrl-C.
    """
    out = out or Console(highlight=False)
    err = err or Console(stderr=True, highlight=False)
    spec = parse_spec(args)  # BenchSpecError before anything exists
    cfg = spec.sweep_config()
    from bench.metrics import passes, selected, sweep_order
    from clusters.netns import owner
    from clusters.safety import guard_root

    for line in mark_killed(spec.out):
        err.print(line, highlight=False, markup=False)
    clock = SweepClock(sweep_order(cfg.sizes, passes(selected(cfg), cfg)), spec.budget_s)

    folder = RunFolder(new_run_dir(spec.out, "bench"), {})
    env = environment(argv)
    folder.meta = {
        **env,
        "kind": "bench",
        "cpu": env.get("cpu_model"),
        "versions": {**(env.get("tools") or {}), **(env.get("packages") or {})},
        "kernel_kind": "uml" if in_guest() else "host",
        "args": {k: v for k, v in asdict(spec).items() if k != "modes_given"},
        "started": env["time_utc"],
        "finished": None,
        "complete": False,
        "status": "running",
        "owner": owner(),  # a folder left "running" by a dead owner is marked "killed"
        "modes": {},
        "modes_skipped": {},
        "metrics_skipped": {},
        "errors": [],
        "metrics": catalog(),
        "noisy": [],
        "spread": [],
        "wall_s": None,
    }
    folder.save_meta()
    started = time.perf_counter()
    status = "complete"
    usable: list[tuple[str, Any]] = []
    for mode in spec.modes:
        try:
            usable.append((mode, load_mode(mode, spec.backend)))
        except ModeUnavailable as exc:
            folder.meta["modes_skipped"][mode] = str(exc)
            folder.meta["modes"][mode] = {"status": "skipped", "reason": str(exc)}
    folder.save_meta()
    for mode, reason in folder.meta["modes_skipped"].items():
        err.print(f"[dim]{mode}: skipped: {reason}[/]", highlight=False)
    clock.modes = [m for m, _ in usable]
    # rich draws nothing where stderr is no terminal (a CI log): one line per size there
    lines = not err.is_terminal
    progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=False,
                        disable=lines)
    task = progress.add_task("starting",
                             total=max(1, (steps_of(cfg) + len(spec.churn)) * len(usable)))
    listener = _Listener(folder, progress, task, err, clock, lines)
    failure: BaseException | None = None
    try:
        with guard_root(), progress:
            for index, (mode, dp) in enumerate(usable, 1):
                if clock.over_budget():
                    folder.meta["modes"][mode] = {"status": "not run", "reason": "the budget ran out"}
                    folder.meta.setdefault("stopped_at", {"before_mode": mode,
                                                          "elapsed_s": round(clock.elapsed(), 1),
                                                          "budget_s": spec.budget_s})
                    status = "incomplete"
                    continue
                if lines:
                    err.print(f"bench: {mode}: mode {index} of {len(usable)}, {len(cfg.sizes)} sizes, "
                              f"{len(clock.visits)} visits", markup=False, highlight=False)
                clock.mode_started()
                mode_started = time.perf_counter()
                # Other work on the host shows up as noise; the load says how much there was.
                folder.meta["modes"][mode] = {"status": "running", "loadavg_start": os.getloadavg()}
                folder.save_meta()
                try:
                    from bench.metrics import run_mode

                    run_mode(cfg, mode, dp, listener)
                    run_churn_sizes(spec, mode, listener, clock)
                    folder.meta["modes"][mode]["status"] = "done"
                except KeyboardInterrupt:
                    folder.meta["modes"][mode]["status"] = "interrupted"
                    raise
                except BudgetSpent as exc:
                    folder.meta["modes"][mode].update(status="stopped", reason=str(exc))
                    status = "incomplete"
                    err.print(f"bench: {exc}; stopping here (run.json says incomplete)",
                              markup=False, highlight=False)
                except Exception as exc:  # noqa: BLE001 - one mode failing leaves the others to run
                    folder.meta["modes"][mode].update(status="failed",
                                                      error=f"{type(exc).__name__}: {exc}")
                    status = "failed"
                    err.print(f"[red]{mode} failed:[/] {type(exc).__name__}: {exc}", highlight=False)
                folder.meta["modes"][mode]["wall_s"] = round(time.perf_counter() - mode_started, 1)
                folder.meta["modes"][mode]["loadavg_end"] = os.getloadavg()
                folder.flush()
                folder.save_meta()
    except KeyboardInterrupt:
        status = "incomplete"
        folder.meta["incomplete_reason"] = "interrupted"
    except Exception as exc:  # the root-namespace guard, or a bug: recorded, then raised
        status, failure = "failed", exc
        folder.meta["errors"].append({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        if status == "incomplete":
            folder.meta.setdefault("incomplete_reason", "budget")
        _finish(folder, status, time.perf_counter() - started)
    if failure is not None:
        raise failure
    if not usable and status == "complete":
        status = "failed"
        err.print("svcbench bench: no selected mode can run here: "
                  + "; ".join(f"{m}: {r}" for m, r in folder.meta["modes_skipped"].items()))
    _print_summary(folder, out, err, as_json=bool(getattr(args, "json", False)))
    budget_stop = status == "incomplete" and folder.meta["incomplete_reason"] == "budget"
    if (status == "complete" or budget_stop) and folder.meta["errors"]:
        return 1  # every mode ran, but some measurement failed: a failure while working
    if budget_stop:
        return 0  # stopping at the budget is what was asked for
    return {"complete": 0, "failed": 1, "incomplete": 130}[status]


def run_churn_sizes(spec: BenchSpec, mode: str, listener: _Listener, clock: SweepClock) -> None:
    """bench/churn.py at each --churn size, after the mode's sweep, on a cluster of its own;
    its rows and samples go to the run folder like the sweep's. A size that fails is recorded
    (run.json errors) and the next one still runs; past the budget none starts."""
    from bench.churn import run_churn
    from bench.sweep import host_kernel_label

    for n in spec.churn:
        if clock.over_budget():
            listener.metric_skipped(mode, "churn_programming_latency_s",
                                    f"the budget ran out before churn at {n:,} Services")
            break
        started = time.monotonic()
        listener.progress(f"{mode}: churn at {n:,} Services")
        try:
            result = run_churn(mode, n, spec.churn_seconds, backend=spec.backend,
                               say=listener.progress)
        except Exception as exc:  # noqa: BLE001 - recorded; the next size still runs
            listener.metric_failed(mode, "churn_programming_latency_s", n,
                                   f"{type(exc).__name__}: {exc}")
            continue
        finally:
            listener.step()
        listener.observed(result.rows(host_kernel_label()), result.raw())
        if listener.lines:
            listener.err.print(f"bench: {mode} churn {n:,} Services in "
                               f"{_clock(time.monotonic() - started)}: {len(result.changes)} "
                               f"changes, p50 {_fmt(_p50(result.latencies) * 1000)} ms, "
                               f"{len(result.failures)} failed connections",
                               markup=False, highlight=False)


def _p50(values: list[float]) -> float:
    from bench.sweep import percentile

    return percentile(values, 0.5) if values else float("nan")


def mark_killed(base: str | os.PathLike) -> list[str]:
    """Mark bench run folders under `base` that a killed process left "running" as "killed".

    Only owners under this kernel can be judged; a folder a guest kernel wrote is judged
    once no guest kernel runs here any more. Returns one line per folder marked.
    """
    from clusters.netns import boot_id, process_alive
    from clusters.uml import list_guests

    marked = []
    for path in sorted(Path(base).glob("bench-*/run.json")):
        try:
            meta = read_json(path)
        except (OSError, ValueError):
            continue
        owner = meta.get("owner") or {}
        if meta.get("status") != "running" or not owner:
            continue  # finished, or written before owners were recorded
        if owner.get("boot") == boot_id():
            if process_alive(owner.get("pid"), owner.get("start")):
                continue
        elif in_guest() or any(g.uml_alive() for g in list_guests()):
            continue
        meta["status"] = "killed"
        write_run_json(path.parent, meta)
        marked.append(f"bench run {path.parent}: marked killed (its owner pid {owner.get('pid')} "
                      "is gone)")
    return marked


def _finish(folder: RunFolder, status: str, wall_s: float) -> None:
    folder.flush()
    rows_spread = spread(folder.rows)
    folder.meta.update(
        status=status,
        complete=status == "complete",
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        wall_s=round(wall_s, 1),
        spread=rows_spread,
        noisy=[s for s in rows_spread if s["noisy"]],
        rows=len(folder.rows),
        # Do the passes rank the modes alike at every size, and how far does the growth
        # exponent move between them (a bootstrap over passes)?
        agreement=_agreement([r.as_dict() for r in folder.rows]),
    )
    folder.save_meta()


# --------------------------------------------------------------------------- summary

SUMMARY_COLUMNS = (
    # (header, metric, target or None for any, stat, scale to the shown unit)
    ("full", "sync_full_s", "", "value", 1000.0),
    ("one", "sync_one_s", "", "value", 1000.0),
    ("prog", "programming_latency_s", None, "value", 1000.0),
    ("1st", "conn_latency_us", "first", "p50", 1.0),
    ("last", "conn_latency_us", "last", "p50", 1.0),
    ("rand", "conn_latency_us", "random", "p50", 1.0),
    ("pod", "podip_conn_latency_us", None, "p50", 1.0),
    ("floor", "floor_conn_latency_us", None, "p50", 1.0),
    ("rr", "rr_latency_us", None, "p50", 1.0),
    ("rps", "throughput_rps", None, "value", 1.0),
    ("cpu", "cpu_us_per_conn", None, "tasks", 1.0),
    ("rules", "rules", "", "count", 1.0),
)
SUMMARY_LEGEND = ("full/one/prog: ms to program all Services from empty, one Service's change, "
                  "change to first connection served; 1st/last/rand/pod: p50 µs of a new "
                  "connection; floor: p50 µs pod to pod across two unprogrammed nodes, at the same "
                  "moments; rr: p50 µs "
                  "request/response; rps: new connections/s (locust); cpu: kernel µs per "
                  "connection; yellow = repeats spread > 5 %")
SHORT_MODE = {"iptables": "ipt", "nftables": "nft", "userspace": "user"}


def _short_mode(label: str) -> str:
    """The summary's mode column: "userspace:random" -> "user:random"."""
    name, colon, options = label.partition(":")
    return SHORT_MODE.get(name, name) + colon + options


def summary_lines(rows: list[Row], noisy: list[dict]) -> list[dict[str, Any]]:
    """One line per (mode, size): the median over repeats of each column; '!' marks noise."""
    flagged = {(s["mode"], s["n_services"], s["metric"], s["target"], s["when"]) for s in noisy}
    cells: dict[tuple[str, int, str], dict[str, list[float]]] = {}
    marks: dict[tuple[str, int, str], set[str]] = {}
    for r in rows:
        when = r.extra.get("when", "")
        line_key = (r.mode, r.n_services, when)
        target = r.extra.get("target", "")
        for header, metric, want, stat, scale in SUMMARY_COLUMNS:
            if r.metric == metric and r.stat == stat and (want is None or want == target):
                cells.setdefault(line_key, {}).setdefault(header, []).append(r.value * scale)
                if (r.mode, r.n_services, r.metric, target, when) in flagged:
                    marks.setdefault(line_key, set()).add(header)
    lines = []
    for (mode, n, when), columns in cells.items():
        line: dict[str, Any] = {"mode": mode, "services": n, "when": when}
        for header, values in columns.items():
            good = sorted(v for v in values if v == v)
            line[header] = good[len(good) // 2] if good else None
        line["noisy"] = sorted(marks.get((mode, n, when), ()))
        lines.append(line)
    order = {"start": 0, "": 1, "end": 2}
    return sorted(lines, key=lambda ln: (ln["mode"], order.get(ln["when"], 1), ln["services"]))


def _fmt(value: Any) -> str:
    """At most five characters: 433, 1.2k, 12k, 0.52, 61."""
    if value is None:
        return "-"
    v = float(value)
    if v != v:
        return "-"
    if abs(v) >= 99_500:
        return f"{v / 1e6:.1f}M" if abs(v) >= 999_500 else f"{v / 1e3:.0f}k"
    if abs(v) >= 9_950:
        return f"{v / 1e3:.0f}k"
    if abs(v) >= 1000:
        return f"{v / 1e3:.1f}k"
    if abs(v) >= 100 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) >= 1 else f"{v:.2g}"


def churn_lines(rows: list[Row]) -> list[str]:
    """One line per mode that churned: programming latency percentiles and failures per size."""
    got: dict[str, dict[int, dict[str, float]]] = {}
    rates: dict[str, Any] = {}
    for r in rows:
        if r.metric == "churn_programming_latency_s":
            got.setdefault(r.mode, {}).setdefault(r.n_services, {})[r.stat] = r.value
            rates[r.mode] = r.extra.get("rate")
    lines = []
    for mode, sizes in got.items():
        parts = [f"{n:,}: p50/p90/p99 {_fmt(s.get('p50', float('nan')) * 1000)}/"
                 f"{_fmt(s.get('p90', float('nan')) * 1000)}/"
                 f"{_fmt(s.get('p99', float('nan')) * 1000)} ms, "
                 f"{int(s.get('failed', 0))} failed connections"
                 + (f", {int(s['unprogrammed'])} unprogrammed" if s.get("unprogrammed") else "")
                 for n, s in sorted(sizes.items())]
        lines.append(f"{mode} churn (programming latency, {rates[mode]:g} changes/s): "
                     + "; ".join(parts))
    return lines


def _print_summary(folder: RunFolder, out: Console, err: Console, as_json: bool) -> None:
    meta = folder.meta
    lines = summary_lines(folder.rows, meta.get("noisy", []))
    if as_json:
        import json

        sys.stdout.write(json.dumps({"run": str(folder.path), "status": meta["status"],
                                     "wall_s": meta["wall_s"], "modes": meta["modes"],
                                     "lines": lines, "churn": churn_lines(folder.rows),
                                     "noisy": len(meta["noisy"])}, indent=2) + "\n")
        return
    from rich import box

    headers = [h for h, *_ in SUMMARY_COLUMNS]
    # 13 columns of at most five characters and one space: 78 columns, one screen.
    table = Table("mode", "N", *headers, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1),
                  title=f"{folder.path}: {meta['status']} in {meta['wall_s']:.0f} s")
    for column in table.columns[1:]:
        column.justify = "right"
    table.columns[0].overflow = "fold"  # a mode spec (user:random) wraps rather than ends in …
    previous = None
    for line in lines:
        if previous is not None and line["mode"] != previous:
            table.add_section()
        shown = _short_mode(line["mode"]) if line["mode"] != previous else ""
        previous = line["mode"]
        n = line["when"] or str(line["services"])
        # Noise is a colour, not a character: every cell keeps to five characters.
        table.add_row(shown, n, *(Text(_fmt(line.get(h)), style="yellow" if h in line["noisy"] else "")
                                  for h in headers))
    out.print(table)
    out.print(SUMMARY_LEGEND, highlight=False, markup=False, style="dim")
    for line in churn_lines(folder.rows):
        out.print(line, highlight=False, markup=False)
    for mode, info in meta["modes"].items():
        if info.get("status") != "done":
            out.print(f"{mode}: {info.get('status')}: {info.get('reason') or info.get('error') or ''}",
                      highlight=False, markup=False)
    for mode, metrics in meta["metrics_skipped"].items():
        for metric, reason in metrics.items():
            out.print(f"{mode}: {metric} skipped: {reason}", highlight=False, markup=False)
    if meta.get("incomplete_reason") == "budget":
        at = meta["stopped_at"]
        where = (f"after {at['mode']} pass {at['pass']} at {at['n_services']:,} Services"
                 if "mode" in at else f"before {at['before_mode']}")
        out.print(f"incomplete: the {_clock(at['budget_s'])} budget ran out {where}; later sizes and "
                  "modes were not measured (run.json 'stopped_at')", highlight=False, markup=False)
    if meta["errors"]:
        out.print(f"{len(meta['errors'])} measurement(s) failed (run.json 'errors')", highlight=False)
    if meta["noisy"]:
        out.print(f"{len(meta['noisy'])} of {len(meta['spread'])} repeated measurements spread more "
                  f"than 5 % between repeats (run.json 'noisy')", highlight=False)


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.runner",
                                     description="Sweep the number of Services in every usable mode.")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    err = Console(stderr=True, highlight=False)
    from clusters.signals import interrupt_on_signals

    try:
        with interrupt_on_signals():  # the CLI's signal path: TERM and HUP unwind like Ctrl-C
            return run_bench_command(args, Console(highlight=False), err,
                                     argv=["svcbench", "bench", *argv])
    except BenchSpecError as exc:
        err.print(f"svcbench bench: error: {exc}", markup=False)
        return 2
    except KeyboardInterrupt:
        err.print("svcbench bench: interrupted")
        return 130



def _agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    # scipy's import (a second) only when a sweep ends, not for every command's parser
    from reports.agreement import agreement

    return agreement(rows, catalog=catalog())


if __name__ == "__main__":
    sys.exit(main())
