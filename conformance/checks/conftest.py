"""The session every check shares: one data plane, one two-node cluster, ordered checks.

Run through `conformance.runner.run_conformance` (which registers a ConformancePlugin
carrying the mode, its options and a progress callback) or directly:
`python3 -m pytest conformance/checks --mode iptables [--backend legacy]` (or a mode spec,
`--mode ipvs:lc`).
"""

from __future__ import annotations

import os

import pytest

from conformance.runner import PLUGIN_NAME, ConformancePlugin, check_name, parse_shard


def pytest_addoption(parser):
    group = parser.getgroup("svcbench conformance")
    group.addoption("--mode", default=os.environ.get("SVCBENCH_MODE", "iptables"),
                    help="proxy mode to check, with its options as a mode spec "
                         "(dataplanes/modes.py: ipvs:lc, userspace:random; default iptables)")
    group.addoption("--backend", default=os.environ.get("SVCBENCH_BACKEND"),
                    help="mode option: iptables backend nft|legacy")
    group.addoption("--shard", default=None, metavar="I/N",
                    help="run only checks I, I+N, I+2N, ... of the ordered list (1 <= I <= N)")


def shard_of(value: str | None) -> tuple[int, int] | None:
    """"2/3" -> (2, 3); None for no sharding. A bad value is a usage error naming the flag."""
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise pytest.UsageError(f"--shard {exc}") from None


def pytest_configure(config):
    config.addinivalue_line("markers", "check(number): the check's number in issue 3's list")
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        plugin = ConformancePlugin(config.getoption("--mode"), config.getoption("--backend"))
        config.pluginmanager.register(plugin, PLUGIN_NAME)


def _plugin(config) -> ConformancePlugin:
    return config.pluginmanager.get_plugin(PLUGIN_NAME)


def _number(item) -> int:
    marker = item.get_closest_marker("check")
    return marker.args[0] if marker else 1000


def pytest_collection_modifyitems(config, items):
    """Checks run in their issue order; a mode's declared deviations become expected failures."""
    items.sort(key=_number)
    shard = shard_of(config.getoption("--shard"))
    if shard is not None:
        # Round-robin over the ordered checks: each shard gets cheap and dear ones alike.
        index, count = shard
        kept = [item for k, item in enumerate(items) if k % count == index - 1]
        dropped = [item for k, item in enumerate(items) if k % count != index - 1]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    plugin = _plugin(config)
    try:
        deviations = getattr(plugin.dataplane(), "deviations", None) or {}
    except Exception:  # an unknown mode is reported by the session fixture, per check
        deviations = {}
    for item in items:
        reason = deviations.get(check_name(item.name))
        if reason:
            # Only an assertion counts as the deviation; any other error is still a failure.
            # Strict: a deviation that no longer holds fails instead of passing unnoticed.
            item.add_marker(pytest.mark.xfail(reason=reason, raises=AssertionError, strict=True))


@pytest.fixture(scope="session")
def dataplane(pytestconfig):
    from dataplanes.base import Host

    plugin = _plugin(pytestconfig)
    dp = plugin.dataplane()
    missing = dp.missing(Host())
    if missing:
        pytest.skip(f"mode {dp.name} cannot run here: " + "; ".join(missing))
    return dp


@pytest.fixture(scope="session")
def cluster(pytestconfig, dataplane):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    from conformance.harness import ConformanceCluster

    plugin = _plugin(pytestconfig)
    with ConformanceCluster.create(dataplane, progress=plugin.say) as harness:
        plugin.run_id = harness.cluster.run_id
        yield harness
