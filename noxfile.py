"""svcbench's sessions. `nox` alone runs the benchmark; `nox -s tests` runs the test suite.

Every session needs root (network namespaces) and installs the system packages it needs
through `svcbench doctor --fix` (Debian/Ubuntu), so it works on a fresh machine.
"""

import glob
import json
import os

import nox

nox.options.sessions = ["bench"]
nox.options.reuse_existing_virtualenvs = True

RUNS = "runs"
CONFORMANCE_MODES = ["iptables", "nftables", "userspace", "ebpf", "ipvs"]
# The nightly job must end inside a CI job's 6 hours: each sweep stops at its budget (after
# the size it is measuring, the run marked incomplete), far above what it takes (README).
NIGHTLY_ARGS = ["--preset", "nightly", "--budget", "3h"]
MICRO_DIR = os.path.join(RUNS, "micro")
MICRO_ARGS = ["bench/test_micro.py", "-q", "-p", "no:cacheprovider", "--benchmark-autosave",
              f"--benchmark-storage=file://{MICRO_DIR}"]
MICRO_COMPARE_ARGS = ["--benchmark-compare", "--benchmark-compare-fail=mean:25%"]


def _install(session, *extras):
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)
    # System packages (iptables, nftables, UML, bcc, ...) come from the distribution.
    # Exit 1 means something optional is still missing: modes that need it skip with why.
    session.run("svcbench", "doctor", "--fix", success_codes=[0, 1])
    session.run("svcbench", "gc")


def _newest(pattern):
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return found[-1] if found else None


# Where this kernel lacks IPVS, IPVS runs inside the User-Mode-Linux guest, with iptables
# beside it so the guest has its own O(N) reference (compare modes within one kernel).
# Endpoint churn (bench/churn.py) runs there too: at 1,000 Services only in the default job
# (about 20 s a mode in the guest; 10,000 would take minutes), at both sizes at night.
GUEST_MODES = "ipvs,iptables"
GUEST_ARGS = {"default": ["--services", "1,1000,10000", "--repeats", "1", "--count", "100",
                          "--churn", "1000", "--churn-seconds", "3"],
              "nightly": ["--services", "1,100,1000,10000,30000", "--repeats", "3",
                          "--budget", "1h30m", "--churn", "1000,10000",
                          "--churn-seconds", "30"]}
# Where IPVS can run: "host", "guest", or why neither (one line).
IPVS_PLACE = (
    "from dataplanes.base import Host; from dataplanes.modes import make; "
    "from clusters.uml_host import uml_missing; "
    "host = make('ipvs').missing(Host()); guest = uml_missing() if host else []; "
    "print('host' if not host else 'guest' if not guest else "
    "'neither: ' + '; '.join(host + guest))"
)


def _sweep_and_report(session, args, preset):
    # The sweep of every host mode, each followed by its endpoint churn (1,000 and 10,000
    # Services; 5 s of changes in the default preset, 30 s at night).
    session.run("svcbench", "bench", "--out", RUNS, *args, success_codes=[0, 1])
    run = _newest(os.path.join(RUNS, "bench-*"))
    if run is None:
        session.error("the bench wrote no run folder")
    # Mode goals the sweep does not reach (nftables at 30,000 and 100,000, ebpf at 100,000
    # Services, the userspace proxy's rate), added to the run folder's bench.csv.
    session.run("python", "-m", "bench.mode_benches", "--out", run, "--preset", preset,
                success_codes=[0, 1])
    ipvs = session.run("python", "-c", IPVS_PLACE, silent=True).strip()
    guest = ipvs == "guest" and not session.posargs  # a hand-picked sweep stays on the host
    if ipvs.startswith("neither"):
        session.log(f"ipvs is not measured here: {ipvs.removeprefix('neither: ')}")
    if guest:
        base = os.path.join(run, "guest")
        session.run("svcbench", "bench", "--kernel", "uml", "--modes", GUEST_MODES,
                    *GUEST_ARGS[preset], "--out", base, success_codes=[0, 1])
        guest_run = _newest(os.path.join(base, "bench-*"))
        if guest_run:
            session.run("python", "-m", "reports.merge", run, guest_run)
    # Correctness beside cost: the report's conformance matrix reads these (about 30 s a
    # mode on the host; a mode that cannot run here is recorded with the reason).
    for mode in CONFORMANCE_MODES:
        if mode == "ipvs" and ipvs != "host" and not guest:
            continue
        out = os.path.join(run, f"conformance-{mode}")
        kernel = ["--kernel", "uml"] if mode == "ipvs" and guest else []
        session.run("svcbench", "conformance", "--mode", mode, *kernel, "--out", out,
                    success_codes=[0, 1])
    session.run("svcbench", "report", run)
    return run


def _preset(run):
    try:
        with open(os.path.join(run, "run.json")) as f:
            return (json.load(f).get("args") or {}).get("preset")
    except (OSError, ValueError, AttributeError):
        return None


def _previous(run):
    """The run folder this one is compared with: $SVCBENCH_PREVIOUS_RUN (CI puts the last
    night that passed there), else the newest other run of the same preset under runs/."""
    given = os.environ.get("SVCBENCH_PREVIOUS_RUN")
    if given is not None:
        return given if given and os.path.isdir(given) else None
    others = sorted((p for p in glob.glob(os.path.join(RUNS, "bench-*"))
                     if os.path.isdir(p) and not os.path.samefile(p, run)),
                    key=os.path.getmtime)
    preset = _preset(run)
    return next((p for p in reversed(others) if _preset(p) == preset), None)


@nox.session
def tests(session):
    """The suite's own unit and integration tests (root: real namespaces, rules, traffic)."""
    _install(session, "test")
    session.run("python", "-m", "pytest", *(session.posargs or ["tests"]))


@nox.session
def bench(session):
    """Every usable mode (IPVS in the guest kernel), 1 to 10,000 Services, the conformance of
    every mode, then the HTML report. Within 15 minutes on 2 cores."""
    _install(session, "bench")
    _sweep_and_report(session, session.posargs, "default")


@nox.session
def nightly(session):
    """Up to 30,000 Services with more repeats, conformance of every mode, the report, micro
    benchmarks compared with the previous night's, then the tracked metrics compared with the
    previous nightly run (`svcbench report --compare`): a regression fails the session."""
    _install(session, "test", "bench")
    run = _sweep_and_report(session, session.posargs or NIGHTLY_ARGS, "nightly")
    # The first night has nothing to compare with (pytest-benchmark calls that a usage error).
    earlier = glob.glob(os.path.join(MICRO_DIR, "*", "*.json"))
    if not earlier:
        session.log("micro benchmarks: no earlier night under runs/micro, saving this one only")
    session.run("python", "-m", "pytest", *MICRO_ARGS, *(MICRO_COMPARE_ARGS if earlier else []),
                success_codes=[0, 1])
    # Last, the gate: the tracked metrics against the previous night (the report gets the
    # section too); a regression beyond its threshold fails the session (exit 1).
    previous = _previous(run)
    if previous is None:
        session.log("no earlier nightly run to compare with: this one is the first")
        return
    session.run("svcbench", "report", run, "--compare", previous)


@nox.session
def conformance(session):
    """Every mode against Kubernetes Service semantics; modes that cannot run here are skipped."""
    _install(session)
    failed = []
    for mode in session.posargs or CONFORMANCE_MODES:
        try:
            session.run("svcbench", "conformance", "--mode", mode)
        except nox.command.CommandFailed:
            failed.append(mode)
    if failed:
        session.error("conformance failed for: " + ", ".join(failed))


@nox.session
def report(session):
    """Render the newest run folder (or the one given) as HTML."""
    _install(session)
    run = session.posargs[0] if session.posargs else _newest(os.path.join(RUNS, "bench-*"))
    if run is None:
        session.error("no run folder under runs/: run `nox -s bench` first")
    session.run("svcbench", "report", run)


@nox.session
def lint(session):
    """ruff over every package."""
    session.install("ruff>=0.4")
    session.run("ruff", "check", ".")
