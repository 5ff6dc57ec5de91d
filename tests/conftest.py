"""Root tests skip with the reason when not root; the whole session must leave the root
network namespace exactly as it found it."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root for network namespaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def root_namespace_untouched():
    if os.geteuid() != 0:
        yield
        return
    from clusters.safety import diff, snapshot_root

    before = snapshot_root()
    yield
    changed = diff(before, snapshot_root())
    assert not changed, "the test session changed the root network namespace:\n" + "\n".join(changed)
