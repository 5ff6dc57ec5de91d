"""Where results go: a run folder per run, files written atomically, the environment recorded.

Shared by every writer (conformance, bench): a reader never sees half a file, and every
run folder says what it ran on (kernel, CPU, Python, tool versions, git revision, argv).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
KIND_RE = re.compile(r"^[a-z][a-z0-9-]*$")
# (tool, argv printing its version): what the measured data planes are built from.
TOOL_VERSIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("iptables", ("iptables", "--version")),
    ("nft", ("nft", "--version")),
    ("ip", ("ip", "-V")),
    ("conntrack", ("conntrack", "--version")),
    ("ipset", ("ipset", "--version")),
)
PYTHON_PACKAGES = ("pyroute2", "dnspython", "pytest", "uvloop", "PyYAML", "rich")


def _write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomically write `data` as indented JSON (keys in the order given)."""
    return _write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_csv(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    fieldnames: Sequence[str] | None = None,
) -> Path:
    """Atomically write rows as CSV; columns are `fieldnames` or every key, first seen first."""
    rows = list(rows)
    if fieldnames is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        fieldnames = list(seen)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return _write_atomic(path, buf.getvalue())


def _cell(value: Any) -> Any:
    # Nested values stay machine-readable in one cell.
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else value


def new_run_dir(base: str | os.PathLike = "runs", kind: str = "run") -> Path:
    """Make and return a fresh folder `base/<kind>-<UTC time>-<random>` (never reused)."""
    if not KIND_RE.match(kind):
        raise ValueError(f"run kind {kind!r} must be lower-case letters, digits and dashes")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    while True:
        path = base / f"{kind}-{stamp}-{secrets.token_hex(2)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _first_line(argv: Sequence[str]) -> str | None:
    if shutil.which(argv[0], path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        return None
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def cpuinfo_field(name: str) -> str | None:
    """The first CPU's `name` line of /proc/cpuinfo ("model name", "flags"), None if absent."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def _git_revision() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": bool(status) if status is not None else None}


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What a run ran on: kernel, CPU, Python, tool and package versions, git revision, argv."""
    uname = os.uname()
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": uname.nodename,
        "kernel": uname.release,
        "kernel_version": uname.version,
        "machine": uname.machine,
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "tools": {name: _first_line(cmd) for name, cmd in TOOL_VERSIONS},
        "packages": {name: _package_version(name) for name in PYTHON_PACKAGES},
        "git": _git_revision(),
        "argv": list(sys.argv if argv is None else argv),
    }


# --------------------------------------------------------------------------- bench runs
# A bench run folder: run.json (environment, arguments, status), bench.csv (one row per
# measurement) and raw/<mode>/<phase>.json (every sample behind the rows).

BENCH_CSV = "bench.csv"
RUN_JSON = "run.json"
RAW_DIR = "raw"
# target: first/last/random names a series, an address names what was probed;
# when: "start"/"end" for the floor; extra: the rest as one JSON object.
BENCH_COLUMNS = ("mode", "kernel", "n_services", "metric", "target", "stat", "value", "unit",
                 "repeat", "when", "extra")


def bench_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A measurement in bench.csv's columns; `target` and `when` are lifted out of `extra`."""
    extra = dict(row.get("extra") or {})
    out = {col: row.get(col, "") for col in BENCH_COLUMNS}
    out["target"] = row.get("target") or extra.pop("target", "") or ""
    out["when"] = row.get("when") or extra.pop("when", "") or ""
    extra.pop("target", None)
    extra.pop("when", None)
    out["extra"] = extra
    return out


def write_bench_csv(run_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Atomically (re)write run_dir/bench.csv from measurement rows (dicts or bench_row()s)."""
    return write_csv(Path(run_dir) / BENCH_CSV, (bench_row(r) for r in rows), BENCH_COLUMNS)


def append_bench_csv(run_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Add measurement rows to run_dir/bench.csv (rewritten atomically); returns how many."""
    path = Path(run_dir) / BENCH_CSV
    old = read_bench_csv(path) if path.exists() else []
    new = list(rows)
    write_bench_csv(run_dir, [*old, *new])
    return len(new)


def read_bench_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """bench.csv back as dicts with numbers as numbers and `extra` as a dict."""
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            row["n_services"] = int(row["n_services"])
            row["value"] = float(row["value"])
            row["repeat"] = int(row["repeat"] or 0)
            row["extra"] = json.loads(row["extra"]) if row.get("extra") else {}
            out.append(row)
    return out


def write_run_json(run_dir: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Atomically (re)write run_dir/run.json."""
    return write_json(Path(run_dir) / RUN_JSON, dict(data))
