"""svcbench's sessions. `nox` alone runs the benchmark; `nox -s tests` runs the test suite.

Both need root (network namespaces) and install the system packages they need through
`svcbench doctor --fix` (Debian/Ubuntu), so they work on a fresh machine.
"""

import nox

nox.options.sessions = ["bench"]
nox.options.reuse_existing_virtualenvs = True

BENCH_ARGS = ["--modes", "iptables", "--services", "1,10,100,1000"]
CONFORMANCE_MODES = ["iptables", "nftables", "userspace", "ebpf", "ipvs"]


def _install(session, *extras):
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)
    # System packages (iptables, nftables, ...) come from the distribution, not from pip.
    session.run("svcbench", "doctor", "--fix", success_codes=[0, 1])


@nox.session
def tests(session):
    """The suite's own unit and integration tests (root: real namespaces and rules)."""
    _install(session, "test")
    session.run("svcbench", "gc")
    session.run("python", "-m", "pytest", *(session.posargs or ["tests"]))


@nox.session
def bench(session):
    """Sweep the number of Services in every usable mode and print the numbers."""
    _install(session)
    session.run("svcbench", "gc")
    session.run("svcbench", "bench", *(session.posargs or BENCH_ARGS))


@nox.session
def conformance(session):
    """Every mode against Kubernetes Service semantics; modes that cannot run here are skipped."""
    _install(session)
    session.run("svcbench", "gc")
    modes = session.posargs or CONFORMANCE_MODES
    failed = []
    for mode in modes:
        try:
            session.run("svcbench", "conformance", "--mode", mode)
        except nox.command.CommandFailed:
            failed.append(mode)
    if failed:
        session.error("conformance failed for: " + ", ".join(failed))


@nox.session
def lint(session):
    """ruff over every package."""
    session.install("ruff>=0.4")
    session.run("ruff", "check", ".")
