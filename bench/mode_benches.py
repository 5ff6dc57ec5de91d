"""Mode goals the common sweep does not reach, written into the sweep's run folder.

- Sync of one node at sizes past the sweep: nftables at 10,000, 30,000 and 100,000 Service
  ports (goal: a full sync under 2 s and one changed Service under 100 ms at 10,000), the
  ebpf maps at 10,000 and 100,000. The node is programmed as the CLI programs one: through
  dataplanes/proxy.py's ServiceProxy over a ChangeTracker of `bench.synthetic.sync_objects`
  (built once per size and shared by the modes, outside every timing: about 1 s at 10,000
  and 9 s at 100,000 here, recorded in run.json). Each full sync is the first after an
  install (untimed uninstall and install before it), then one Service's EndpointSlice
  loses an endpoint and gets it back, each an `apply` (the mode's `update` where it has
  one), then a `resync` with nothing changed. Rows: metric `sync_s` (the mode's own
  SyncStats.seconds; the whole call in `call_s`) and `sync_cpu_s` (this process and its
  children: nft, bpftool), stat `full`, `one_changed` or `unchanged`.
- The userspace proxy's connection rate and added latency (bench/userspace_rate.py).

`python -m bench.mode_benches --out RUN_DIR` appends the rows to RUN_DIR/bench.csv, so the
report shows them beside the sweep, and records what ran (or why not) in run.json under
`mode_benches`. A mode that cannot run here is skipped with its reason; the exit status
is 1 when a bench failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.sweep import Row, summarize
from bench.synthetic import SyncObjects, sync_objects
from bench.userspace_rate import bench_userspace
from clusters.netns import NetnsCluster
from dataplanes.base import Host
from dataplanes.modes import make
from dataplanes.proxy import ServiceProxy
from kube.tracker import ChangeTracker
from reports.results import RUN_JSON, append_bench_csv, read_json, write_run_json

# mode -> sizes, per preset; the sweep covers 1 to 10,000 for every mode already.
SYNC_SIZES = {
    "default": {"nftables": (10000, 30000, 100000), "ebpf": (10000, 100000)},
    "nightly": {"nftables": (10000, 30000, 100000), "ebpf": (10000, 100000)},
    "quick": {"nftables": (100,), "ebpf": (100,)},
}
FULL_REPEATS = {"default": 3, "nightly": 5, "quick": 1}
CHANGED_REPEATS = {"default": 10, "nightly": 20, "quick": 2}
BENCHES = ("nftables", "ebpf", "userspace")

Say = Callable[[str], None]


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Trackers:
    """ChangeTrackers of `sync_objects(n)`, built once per size and shared by the modes
    (each mode leaves its tracker as it found it). Building one is svcbench's own work, kept
    out of every timing; how long it took is recorded (`build_s`)."""

    def __init__(self, say: Say = lambda _m: None):
        self.say = say
        self._made: dict[int, tuple[SyncObjects, ChangeTracker]] = {}
        self.build_s: dict[int, float] = {}

    def get(self, n: int) -> tuple[SyncObjects, ChangeTracker]:
        if n not in self._made:
            self.say(f"building the change tracker of {n:,} Service ports")
            started = time.perf_counter()
            objects = sync_objects(n)
            tracker = objects.tracker()
            for node in objects.nodes:
                tracker.node_view(node.name)
            self.build_s[n] = round(time.perf_counter() - started, 2)
            self.say(f"the tracker of {n:,} Service ports took {self.build_s[n]:.1f} s to build")
            self._made[n] = (objects, tracker)
        return self._made[n]


def bench_sync(mode: str, sizes: Sequence[int], full_repeats: int, changed_repeats: int,
               say: Say = lambda _m: None, trackers: Trackers | None = None) -> list[Row]:
    """Rows of one node's sync times for `mode` at each size (see the module's text)."""
    dp = make(mode)
    missing = dp.missing(Host())
    if missing:
        raise RuntimeError(f"the {mode} mode cannot run here: " + "; ".join(missing))
    trackers = trackers or Trackers(say)
    rows: list[Row] = []
    with NetnsCluster.create(1, agents=False) as cluster:
        for n in sizes:
            objects, tracker = trackers.get(n)
            proxy = ServiceProxy(dp, [cluster.nodes[0]], tracker)
            try:
                rows += _sync_at(proxy, objects, n, full_repeats, changed_repeats, say,
                                 trackers.build_s.get(n))
            finally:
                proxy.uninstall()
    return rows


def _sync_at(proxy: ServiceProxy, objects: SyncObjects, n: int, full_repeats: int,
             changed_repeats: int, say: Say, build_s: float | None) -> list[Row]:
    mode, (node,), tracker = proxy.dataplane.name, proxy.nodes, proxy.tracker
    base = dict(mode=mode, kernel=os.uname().release, n_services=n)
    middle = len(objects.slices) // 2
    original = objects.slices[middle]
    flips = [objects.one_endpoint_fewer(middle), original]
    rows: list[Row] = []

    def measure(call: Callable[[], list], stat: str, repeat: int) -> None:
        tracker.node_view(node.name)  # made (and cached) outside the timing
        cpu0, wall0 = _cpu_s(), time.perf_counter()
        (stats,) = call()
        wall, cpu = time.perf_counter() - wall0, _cpu_s() - cpu0
        extra = {"full": stats.full, "changed": stats.changed, "rules": stats.rules,
                 "payload_bytes": stats.payload_bytes, "call_s": round(wall, 6),
                 "tracker_build_s": build_s,
                 **{k: v for k, v in stats.extra.items() if isinstance(v, (int, float, str))}}
        rows.append(Row(**base, repeat=repeat, metric="sync_s", stat=stat,
                        value=round(stats.seconds, 6), unit="s", extra=extra))
        rows.append(Row(**base, repeat=repeat, metric="sync_cpu_s", stat=stat,
                        value=round(cpu, 6), unit="s"))

    for r in range(full_repeats):
        say(f"{mode}: full sync of {n:,} Services ({r + 1}/{full_repeats})")
        proxy.uninstall()
        proxy.install()
        measure(proxy.resync, "full", r)  # the first sync after install: from empty
    say(f"{mode}: one changed Service among {n:,}")
    for r in range(changed_repeats):
        measure(lambda changed=flips[r % 2]: proxy.apply(slices=[changed]), "one_changed", r)
    if changed_repeats % 2:
        proxy.apply(slices=[original])  # the tracker back as the next mode expects it
    measure(proxy.resync, "unchanged", 0)  # a full sync of what the node already holds
    return rows


def run_benches(names: Sequence[str], preset: str, say: Say) -> tuple[list[Row], dict[str, Any]]:
    """(rows, status per bench): a bench that cannot run or fails is recorded, not fatal."""
    rows: list[Row] = []
    status: dict[str, Any] = {}
    trackers = Trackers(say)  # one per size, shared by nftables and ebpf
    for name in names:
        started = time.perf_counter()
        try:
            if name == "userspace":
                quick = preset == "quick"
                seconds = {"quick": 1.0, "default": 3.0}.get(preset, 5.0)  # nox -s bench: 15 min
                got = bench_userspace(seconds, 32, 1 if quick else 3,
                                      (1, 10) if quick else (1, 10, 100, 1000, 10000),
                                      50 if quick else 500, progress=say)
            else:
                got = bench_sync(name, SYNC_SIZES[preset][name], FULL_REPEATS[preset],
                                 CHANGED_REPEATS[preset], say, trackers)
        except RuntimeError as exc:
            status[name] = {"status": "skipped", "reason": str(exc)}
            say(f"{name}: skipped: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one bench failing must not lose the others
            status[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
            continue
        rows += got
        status[name] = {"status": "done", "rows": len(got),
                        "seconds": round(time.perf_counter() - started, 1)}
        if name != "userspace":
            status[name]["tracker_build_s"] = {
                str(n): trackers.build_s[n] for n in SYNC_SIZES[preset][name]
                if n in trackers.build_s}
    return rows, status


def append_to_run(run_dir: Path, rows: Sequence[Row], status: dict[str, Any]) -> None:
    """Add the rows to run_dir's bench.csv and the status to its run.json (atomically)."""
    append_bench_csv(run_dir, (r.as_dict() for r in rows))
    meta = read_json(run_dir / RUN_JSON) if (run_dir / RUN_JSON).exists() else {}
    meta.setdefault("mode_benches", {}).update(status)
    write_run_json(run_dir, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mode_benches",
                                     description="Sync of nftables and ebpf past the sweep's sizes, "
                                                 "and the userspace proxy's connection rate.")
    parser.add_argument("--out", metavar="RUN_DIR", help="a run folder of `svcbench bench`: the "
                        "rows are added to its bench.csv")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated subset of {', '.join(BENCHES)}")
    parser.add_argument("--preset", default="default", choices=sorted(SYNC_SIZES))
    parser.add_argument("--json", action="store_true", help="print the summary as JSON lines")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCHES]
    if bad or not names:
        print(f"svcbench: --only must name some of {', '.join(BENCHES)}, not {args.only!r}",
              file=sys.stderr)
        return 2
    run_dir = Path(args.out) if args.out else None
    if run_dir is not None and not (run_dir / RUN_JSON).is_file():
        print(f"svcbench: --out {str(run_dir)!r} is not a run folder (no {RUN_JSON})", file=sys.stderr)
        return 2
    rows, status = run_benches(names, args.preset, lambda m: print(m, file=sys.stderr, flush=True))
    if run_dir is not None:
        append_to_run(run_dir, rows, status)
    lines = summarize(rows)
    if args.json:
        for line in lines:
            print(json.dumps(line))
    else:
        for ln in lines:
            print(f"{ln['mode']:10} {ln['metric']:32} {ln['stat']:12} {ln['services']:>7,}  "
                  f"median {ln['median']:g} {ln['unit']} (min {ln['min']:g}, max {ln['max']:g}, "
                  f"n={ln['repeats']})")
    for name, st in status.items():
        if st["status"] != "done":
            print(f"{name}: {st['status']}: {st['reason']}", file=sys.stderr)
    return 1 if any(st["status"] == "failed" for st in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
