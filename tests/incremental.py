"""Incremental syncs against full ones, for any mode: a `ServiceProxy` of the mode programs a
real namespace cluster through a random sequence of changes (tests/changes.py), and at
checkpoints every node's kernel state, as the mode reads it back (`kernel_state(node)`),
must equal the state a restart leaves (uninstall, install, one full sync of the same view).

A mode's test calls `run_against_full_syncs` and asserts on what it returns: how many node
syncs went through `update` (so a mode that silently falls back to full syncs fails its
own test) and how many checkpoints compared equal.
"""

from __future__ import annotations

import difflib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clusters.netns import NetnsCluster
from dataplanes.base import Dataplane, FullSyncNeeded, NodeHandle
from dataplanes.proxy import ServiceProxy
from kube.model import Node
from kube.state import StateError
from kube.tracker import ChangeTracker
from tests.changes import Oracle, random_step


@dataclass
class Outcome:
    applied: int = 0  # changes the tracker took
    refused: int = 0  # changes it refused (nothing synced)
    updates: int = 0  # node syncs done by the mode's `update`
    fallbacks: int = 0  # `update` calls that asked for a full sync (FullSyncNeeded)
    syncs: int = 0  # node syncs done by `sync` (the first after install, restarts, fallbacks)
    checkpoints: int = 0  # kernel states compared equal


class _Counting:
    """The mode, with its `sync` and `update` calls counted into an Outcome."""

    def __init__(self, mode: Dataplane, out: Outcome) -> None:
        self._mode, self._out = mode, out
        if callable(getattr(mode, "update", None)):
            self.update = self._update

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mode, name)

    def sync(self, node: NodeHandle, view: Any) -> Any:
        self._out.syncs += 1
        return self._mode.sync(node, view)

    def _update(self, node: NodeHandle, changes: Any) -> Any:
        try:
            stats = self._mode.update(node, changes)
        except FullSyncNeeded:
            self._out.fallbacks += 1
            raise
        self._out.updates += 1
        return stats


def _diff(got: Any, want: Any) -> str:
    a = json.dumps(got, indent=1, sort_keys=True, default=str).splitlines()
    b = json.dumps(want, indent=1, sort_keys=True, default=str).splitlines()
    lines = list(difflib.unified_diff(b, a, "after a full sync", "after updates", lineterm=""))
    return "\n".join(lines[:80])


def run_against_full_syncs(make_mode: Callable[[], Dataplane],
                           kernel_state: Callable[[NodeHandle], Any], *, seed: int,
                           steps: int = 40, check_every: int = 8, nodes: int = 2) -> Outcome:
    """Drive the mode through `steps` random changes; compare at every `check_every`-th
    step and at the end (see the module's docstring). Raises AssertionError with a diff."""
    rng = random.Random(seed)
    cluster_nodes = [Node.numbered(k) for k in range(1, nodes + 1)]
    oracle = Oracle(cluster_nodes)
    tracker = ChangeTracker(cluster_nodes)
    counter = [0]
    out = Outcome()
    with NetnsCluster.create(nodes, agents=False) as cluster, \
            ServiceProxy(_Counting(make_mode(), out), cluster.nodes, tracker) as proxy:
        proxy.resync()
        for step in range(1, steps + 1):
            kwargs, pods, services, slices = random_step(rng, oracle, tracker, counter)
            try:
                built = oracle.build(pods, services, slices)
            except StateError:
                out.refused += 1
                continue
            proxy.apply(**kwargs)
            out.applied += 1
            oracle.pods, oracle.services, oracle.slices, oracle.built = (
                pods, services, slices, built)
            if step % check_every and step != steps:
                continue
            got = {n.name: kernel_state(n) for n in cluster.nodes}
            proxy.restart()
            want = {n.name: kernel_state(n) for n in cluster.nodes}
            assert got == want, (f"seed {seed}, step {step}: kernel state after updates differs "
                                 f"from a full sync's:\n{_diff(got, want)}")
            out.checkpoints += 1
    return out
