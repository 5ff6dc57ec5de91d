"""Run the conformance checks for one mode and write the run folder.

pytest runs in-process over conformance/checks with a plugin that carries the data plane
(so a test can hand in a deliberately broken one) and turns pytest's reports into
conformance.json:

    {"mode", "kernel", "kernel_kind", "checks": [{"name", "outcome", "reason", "duration_s"}]}

with outcome passed | failed | skipped | deviation (a declared deviation whose check passes
is failed: the declaration no longer holds); kernel is the release that ran the
checks (as in bench.csv's kernel column), kernel_kind "host" or "uml". Beside it: junit.xml (pytest's),
measurements.json (numbers checks record, such as network programming latency),
environment.json and, when progress goes to a callback, pytest.log (pytest's own output).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reports.results import environment, new_run_dir, write_json

PLUGIN_NAME = "svcbench_conformance"
CHECKS_DIR = Path(__file__).resolve().parent / "checks"
REPO_ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("host", "uml")  # uml: forwarded into the guest by the CLI before it gets here
PASSED, FAILED, SKIPPED, DEVIATION = "passed", "failed", "skipped", "deviation"
OUTCOMES = (PASSED, FAILED, SKIPPED, DEVIATION)
REASON_CHARS = 500
CHECK_TIMEOUT_S = 120  # a wedged check fails alone instead of hanging the run
# Processes start slowly in the UML guest (about 50 ms each): check 19's 200 iptables syncs
# of 3 nodes took 316 s there, while every other check took under 25 s.
GUEST_TIMEOUT_FACTOR = 5


class ConformanceError(ValueError):
    """The run could not start or its checks could not be collected (one sentence why)."""


def check_name(test_name: str) -> str:
    """test_clusterip_tcp_uniform -> clusterip_tcp_uniform: the name conformance.json uses."""
    return test_name[5:] if test_name.startswith("test_") else test_name


def _short(text: str) -> str:
    """The first meaningful line of a failure, without pytest's assertion introspection."""
    text = text.split("\nassert ", 1)[0].strip()
    for prefix in ("AssertionError: ", "Failed: ", "Skipped: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = " ".join(text.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


XPASS_STRICT = "[XPASS(strict)] "  # pytest's failure text for a strict xfail that passed


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, lineno, "Skipped: why")
        return _short(str(longrepr[2]))
    if isinstance(longrepr, str) and longrepr.startswith(XPASS_STRICT):
        declared = longrepr[len(XPASS_STRICT):]
        return _short(f"the check passed: the declared deviation no longer holds ({declared})")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return _short(crash.message)
    return _short(str(longrepr or ""))


class ConformancePlugin:
    """Holds the data plane for the session and collects one outcome per check."""

    def __init__(self, mode: str, backend: str | None = None, *, kernel: str = "host",
                 dataplane_factory: Callable[[], Any] | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.__name__ = PLUGIN_NAME  # the name pytest registers it under; the conftest looks it up
        self.mode = mode
        self.backend = backend
        self.kernel = kernel
        self.factory = dataplane_factory
        self.progress = progress
        self._dataplane = None
        self.order: list[str] = []  # nodeids in run order
        self.numbers: dict[str, int | None] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.measurements: list[dict[str, Any]] = []
        self.collect_errors: list[str] = []
        self.interrupted = False
        self.run_id: str | None = None
        self.config = None
        self.terminal_file = None  # where pytest's own report goes instead of the screen

    def dataplane(self):
        if self._dataplane is None:
            if self.factory is not None:
                self._dataplane = self.factory()
            else:
                from dataplanes.modes import make

                self._dataplane = make(self.mode, backend=self.backend)
        return self._dataplane

    def say(self, message: str) -> None:
        if self.progress is None:
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager") if self.config else None
        # Inside a check pytest captures output; progress is for the user's eyes now.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            self.progress(message)

    # ------------------------------------------------------------------ pytest hooks

    @pytest.hookimpl(trylast=True)
    def pytest_configure(self, config) -> None:
        self.config = config
        if self.terminal_file is None:
            return
        from _pytest.terminal import TerminalReporter

        # pytest's report goes to the run folder's pytest.log instead of the screen.
        shown = config.pluginmanager.get_plugin("terminalreporter")
        if shown is not None:
            config.pluginmanager.unregister(shown)
            config.pluginmanager.register(TerminalReporter(config, self.terminal_file),
                                          "terminalreporter")

    def pytest_unconfigure(self, config) -> None:
        self.config = None

    def pytest_collection_finish(self, session) -> None:
        for item in session.items:
            self.order.append(item.nodeid)
            marker = item.get_closest_marker("check")
            self.numbers[item.nodeid] = marker.args[0] if marker else None
            self.records[item.nodeid] = {
                "name": check_name(item.name), "number": self.numbers[item.nodeid],
                "outcome": None, "reason": "", "duration_s": 0.0,
            }

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.collect_errors.append(f"{report.nodeid}: {_reason(report)}")

    def pytest_keyboard_interrupt(self, excinfo) -> None:
        self.interrupted = True

    def pytest_runtest_logreport(self, report) -> None:
        rec = self.records.get(report.nodeid)
        if rec is None:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            rec["duration_s"] = round(report.duration, 3)
        if report.failed:
            if rec["outcome"] != FAILED:
                where = "" if report.when == "call" else f"{report.when}: "
                rec["outcome"], rec["reason"] = FAILED, where + _reason(report)
        elif report.skipped:
            if hasattr(report, "wasxfail"):
                rec["outcome"], rec["reason"] = DEVIATION, report.wasxfail
            else:
                rec["outcome"], rec["reason"] = SKIPPED, _reason(report)
        elif report.when == "call" and rec["outcome"] is None:
            rec["outcome"] = PASSED
        if report.when == "teardown":  # the last report carries every recorded property
            for metric, value in report.user_properties:
                self.measurements.append({"check": rec["name"], "metric": metric, "value": value})
            self._announce(report.nodeid, rec)

    def _announce(self, nodeid: str, rec: dict[str, Any]) -> None:
        number = self.numbers.get(nodeid)
        label = f"{number:>2}. " if number else ""
        why = f": {rec['reason']}" if rec["reason"] and rec["outcome"] != PASSED else ""
        self.say(f"{label}{rec['name']} {rec['outcome']} ({rec['duration_s']:.1f} s){why}")

    # ------------------------------------------------------------------ results

    def checks(self) -> list[dict[str, Any]]:
        """One entry per check that started, in run order (a check never run is left out)."""
        return [dict(self.records[n]) for n in self.order if self.records[n]["outcome"]]


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_conformance(
    mode: str,
    *,
    backend: str | None = None,
    kernel: str = "host",
    keyword: str | None = None,
    out_dir: str | None = None,
    dataplane_factory: Callable[[], Any] | None = None,
    progress: Callable[[str], None] | None = None,
    shard: str | None = None,
) -> dict:
    """Run the checks (those matching `keyword`, pytest -k syntax) for `mode`; the conformance.json data.

    Writes junit.xml, conformance.json, measurements.json and environment.json into
    `out_dir` (default: a new runs/conformance-* folder). Raises KeyboardInterrupt after
    writing what finished when interrupted, ConformanceError when nothing could run.
    """
    # Inside the guest (svcbench forwarded `--kernel uml` there) this is the guest's kernel.
    here = os.environ.get("SVCBENCH_KERNEL", "host")
    if kernel == "uml" and here != "uml":
        raise ConformanceError(
            "--kernel uml: this process runs on the host kernel; use `svcbench conformance "
            "--kernel uml`, which boots the guest and runs the checks there"
        )
    kernel = here
    if kernel not in KERNELS:
        raise ConformanceError(
            f"--kernel {kernel!r} is not supported yet; accepted: {', '.join(KERNELS)}"
        )
    plugin = ConformancePlugin(mode, backend, kernel=kernel, dataplane_factory=dataplane_factory,
                               progress=progress)
    try:
        plugin.dataplane()  # an unknown mode or bad option fails here, before any namespace exists
    except ValueError as exc:  # modes.UnknownMode, or a data plane refusing an option
        raise ConformanceError(str(exc)) from None
    out = Path(out_dir) if out_dir else new_run_dir(kind="conformance")
    out.mkdir(parents=True, exist_ok=True)
    args = [
        str(CHECKS_DIR),
        "--rootdir", str(REPO_ROOT),
        "-p", "no:cacheprovider",
        "-o", "addopts=",
        "-o", f"timeout={CHECK_TIMEOUT_S * (GUEST_TIMEOUT_FACTOR if kernel == 'uml' else 1)}",
        "-o", "junit_family=xunit1",
        "-o", f"junit_suite_name=conformance-{mode}",
        f"--junitxml={out / 'junit.xml'}",
        f"--mode={mode}",
    ]
    if backend:
        args.append(f"--backend={backend}")
    if keyword:
        args += ["-k", keyword]
    if shard:
        args.append(f"--shard={shard}")
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["-p", "pytest_timeout"]
    plugin.say(f"conformance of {mode} ({kernel} kernel) into {out}")
    # Only the plugins the checks use: others installed here (hypothesis's costs seconds) stay out.
    with _environ(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"):
        if progress is None:
            exit_code = pytest.main(args, plugins=[plugin])
        else:
            # Progress lines replace pytest's own output, which is kept in the run folder.
            with open(out / "pytest.log", "w", encoding="utf-8") as log:
                plugin.terminal_file = log
                exit_code = pytest.main([*args, "-rfE", "--color=no"], plugins=[plugin])
    if exit_code in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR):
        raise ConformanceError(f"pytest could not run the checks (exit {int(exit_code)})")
    data = {"mode": mode, "kernel": os.uname().release, "kernel_kind": kernel,
            "checks": plugin.checks()}
    write_json(out / "conformance.json", data)
    write_json(out / "measurements.json", plugin.measurements)
    write_json(out / "environment.json", environment())
    if plugin.interrupted:
        raise KeyboardInterrupt
    if plugin.collect_errors:
        raise ConformanceError("the checks could not be collected: " + "; ".join(plugin.collect_errors))
    if exit_code == pytest.ExitCode.NO_TESTS_COLLECTED and not shard:
        # (A shard may be empty: -k selected fewer checks than there are shards.)
        raise ConformanceError(f"-k {keyword!r} selects no check; see conformance/checks for names")
    return data


def default_jobs() -> int:
    """Shards run at once by default: one per core, at most two (each builds its own cluster;
    a guest kernel runs on one core, so two guests use both)."""
    return max(1, min(2, os.cpu_count() or 1))


def run_sharded(
    mode: str,
    *,
    jobs: int,
    backend: str | None = None,
    kernel: str = "host",
    keyword: str | None = None,
    out_dir: str,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The checks split over `jobs` processes, each with its own cluster (and, for
    `kernel="uml"`, its own guest kernel), merged into one run folder.

    Shard i runs checks i, i+jobs, ... of the ordered list into `out_dir/shard-i`; their
    conformance.json, measurements.json and junit.xml are merged into `out_dir` in check
    order. Same errors as `run_conformance`.
    """
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    children: list[tuple[int, subprocess.Popen, Path]] = []
    lines: dict[int, list[str]] = {}
    threads = []

    def relay(index: int, stream) -> None:
        for raw in stream:
            line = raw.rstrip()
            if line:
                lines[index].append(line)
                say(f"[{index}/{jobs}] {line}")

    try:
        for index in range(1, jobs + 1):
            shard_dir = out / f"shard-{index}"
            argv = [sys.executable, "-m", "svcbench", "conformance", "--mode", mode,
                    "--kernel", kernel, "--jobs", "1", "--shard", f"{index}/{jobs}",
                    "--out", str(shard_dir), "--json"]
            if backend:
                argv += ["--backend", backend]
            if keyword:
                argv += ["-k", keyword]
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, cwd=REPO_ROOT,
                                    env={**os.environ, "SVCBENCH_PROGRESS_LINES": "1"})
            children.append((index, proc, shard_dir))
            lines[index] = []
            thread = threading.Thread(target=relay, args=(index, proc.stderr), daemon=True)
            thread.start()
            threads.append(thread)
        codes = {index: proc.wait() for index, proc, _ in children}
    except KeyboardInterrupt:
        for _, proc, _ in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # each shard removes its cluster, then exits
        for _, proc, _ in children:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        _merge_shards(mode, kernel, out, [d for _, _, d in children])
        raise
    for thread in threads:
        thread.join(5)
    usage = [lines[i][-1] for i, code in codes.items() if code == 2 and lines[i]]
    if usage:  # every shard saw the same bad input: report it once
        raise ConformanceError(usage[0].removeprefix("svcbench: error: "))
    if any(code == 130 for code in codes.values()):
        _merge_shards(mode, kernel, out, [d for _, _, d in children])
        raise KeyboardInterrupt
    data = _merge_shards(mode, kernel, out, [d for _, _, d in children])
    broken = [f"shard {i} exited {code}: {lines[i][-1] if lines[i] else 'no output'}"
              for i, code in codes.items()
              if code not in (0, 1) or not (out / f"shard-{i}" / "conformance.json").exists()]
    if broken and not data["checks"]:
        raise RuntimeError("; ".join(broken))
    if not data["checks"] and keyword:
        raise ConformanceError(f"-k {keyword!r} selects no check; see conformance/checks for names")
    if broken:
        data["errors"] = broken
        write_json(out / "conformance.json", data)
    return data


def _merge_shards(mode: str, kernel: str, out: Path, shard_dirs: list[Path]) -> dict:
    """One conformance.json, measurements.json and junit.xml from the shards' folders."""
    checks: list[dict[str, Any]] = []
    measurements: list[dict[str, Any]] = []
    release = None
    suites = []
    for shard_dir in shard_dirs:
        try:
            part = json.loads((shard_dir / "conformance.json").read_text())
        except (OSError, ValueError):
            continue
        release = part.get("kernel", release)
        kernel = part.get("kernel_kind", kernel)
        checks += part.get("checks", [])
        with contextlib.suppress(OSError, ValueError):
            measurements += json.loads((shard_dir / "measurements.json").read_text())
        with contextlib.suppress(OSError, ET.ParseError):
            suites.append(ET.parse(shard_dir / "junit.xml").getroot())
    checks.sort(key=lambda c: (c.get("number") is None, c.get("number") or 0, c["name"]))
    data = {"mode": mode, "kernel": release or os.uname().release, "kernel_kind": kernel,
            "checks": checks}
    write_json(out / "conformance.json", data)
    write_json(out / "measurements.json", measurements)
    write_json(out / "environment.json", environment())
    if suites:
        _merge_junit(suites).write(out / "junit.xml", encoding="utf-8", xml_declaration=True)
    return data


def _merge_junit(roots: list[ET.Element]) -> ET.ElementTree:
    """pytest's junit files (one <testsuites><testsuite> each) as one suite, counts summed."""
    merged = ET.Element("testsuite")
    totals = dict.fromkeys(("tests", "errors", "failures", "skipped"), 0)
    seconds = 0.0
    for root in roots:
        for suite in (root.iter("testsuite")):
            merged.set("name", suite.get("name", "conformance"))
            for key in totals:
                totals[key] += int(suite.get(key, "0"))
            seconds += float(suite.get("time", "0"))
            merged.extend(suite.findall("testcase"))
    for key, value in totals.items():
        merged.set(key, str(value))
    merged.set("time", f"{seconds:.3f}")
    wrapper = ET.Element("testsuites")
    wrapper.append(merged)
    return ET.ElementTree(wrapper)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `svcbench conformance`."""
    from dataplanes.modes import IPTABLES_BACKENDS, MODES, SPEC_FORM

    # Checked by the CLI before it runs (dataplanes/modes.py), and passed on as given to
    # shards and guests: `--mode ipvs:lc` reaches every process that builds the data plane.
    parser.add_argument("--mode", default="iptables", metavar="MODE[:OPTIONS]",
                        help=f"proxy mode ({', '.join(MODES)}) and its options, {SPEC_FORM}: "
                             "ipvs:lc, userspace:random, iptables:legacy")
    parser.add_argument("--backend", choices=IPTABLES_BACKENDS, default=None,
                        help="iptables backend (default nft), where the mode spec sets none")
    parser.add_argument("--kernel", choices=("host", "uml"), default="host",
                        help="this host's kernel, or a User-Mode-Linux guest kernel (IPVS)")
    parser.add_argument("-k", dest="keyword", metavar="PATTERN",
                        help="run only checks matching PATTERN (pytest -k syntax)")
    parser.add_argument("--out", dest="out_dir", metavar="DIR",
                        help="folder for junit.xml and conformance.json (default runs/conformance-*)")
    parser.add_argument("--json", action="store_true", help="print conformance.json")
    parser.add_argument("--jobs", type=_jobs, default=None, metavar="N",
                        help="split the checks over N clusters run at once, each in its own "
                             f"process (and guest kernel) (default {default_jobs()}: one per "
                             "core, at most 2)")
    parser.add_argument("--shard", type=_shard, metavar="I/N", default=None,
                        help="run only checks I, I+N, I+2N, ... (what --jobs gives each process)")


def parse_shard(value: str) -> tuple[int, int]:
    """"2/3" -> (2, 3); ValueError naming the accepted form for anything else."""
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        index = count = 0
    if not 1 <= index <= count:
        raise ValueError(f"{value!r} is not I/N with 1 <= I <= N, such as 1/2")
    return index, count


def _shard(value: str) -> str:
    try:
        parse_shard(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _jobs(value: str) -> int:
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if not 1 <= jobs <= 8:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of jobs from 1 to 8")
    return jobs


def exit_status(data: dict) -> int:
    """0 when no check failed (deviations and skips are not failures), else 1."""
    return 1 if any(c["outcome"] == FAILED for c in data["checks"]) else 0
