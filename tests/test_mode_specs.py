"""Mode specs (`--mode ipvs:lc`, dataplanes/modes.py): parsing, what each data plane is built
with, the CLI's one-sentence refusal, bench labels (and the report with them), and the
userspace proxy's two algorithms with real traffic on a one-node cluster."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from scipy.stats import chisquare

from dataplanes.modes import MODES, UnknownMode, make, mode_name, parse_mode, parse_modes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, label, options", [
    ("iptables", "iptables", ()),
    ("iptables:legacy", "iptables:legacy", (("backend", "legacy"),)),
    ("iptables:backend=nft", "iptables:nft", (("backend", "nft"),)),
    ("ipvs:lc", "ipvs:lc", (("scheduler", "lc"),)),
    ("ipvs:scheduler=sh,backend=legacy", "ipvs:scheduler=sh,backend=legacy",
     (("scheduler", "sh"), ("backend", "legacy"))),
    ("ipvs: backend=legacy , sh", "ipvs:scheduler=sh,backend=legacy",
     (("scheduler", "sh"), ("backend", "legacy"))),
    ("ipvs:backend=nft", "ipvs:backend=nft", (("backend", "nft"),)),
    ("userspace:random", "userspace:random", (("balancing", "random"),)),
    ("userspace:balancing=rr", "userspace:rr", (("balancing", "rr"),)),
    ("nftables", "nftables", ()),
])
def test_specs_parse_to_one_canonical_label(text, label, options):
    spec = parse_mode(text)
    assert (spec.label, spec.options, mode_name(text)) == (label, options, spec.name)
    assert parse_mode(spec.label) == spec  # the label reads back as the same spec


@pytest.mark.parametrize("text, words", [
    ("warp", ["--mode", "'warp'", "not a proxy mode", "iptables, nftables, ipvs"]),
    ("ipvs:bogus", ["--mode", "scheduler", "'bogus'", "rr, wrr, lc"]),
    ("ipvs:weight=2", ["--mode", "no option 'weight'", "scheduler, backend"]),
    ("ipvs:lc,rr", ["--mode", "scheduler", "twice"]),
    ("iptables:random", ["--mode", "backend", "nft, legacy"]),
    ("userspace:lc", ["--mode", "balancing", "rr, random"]),
    ("nftables:random", ["--mode", "takes no options"]),
    ("ebpf:", ["--mode", "takes no options"]),
])
def test_bad_specs_are_one_sentence_naming_the_field_and_accepted_values(text, words):
    with pytest.raises(UnknownMode) as caught:
        parse_mode(text)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_make_builds_the_spec_and_every_mode_says_how_it_balances():
    ipvs = make("ipvs:scheduler=sh,backend=legacy")
    assert (ipvs.scheduler, ipvs.balancing, ipvs.backend) == ("sh", "sh", "legacy")
    assert make("ipvs", backend="legacy").balancing == "rr"
    assert make("ipvs:lc", backend="nft").backend == "nft"  # --backend fills what the spec leaves
    assert make("ipvs:backend=legacy", backend="nft").backend == "legacy"  # the spec wins
    assert make("userspace:random").balancing == "random"
    assert make("userspace").balancing == "rr"
    assert make("iptables:legacy").backend == "legacy"
    for mode in ("iptables", "nftables"):
        assert make(mode).balancing == "random"
    with pytest.raises(UnknownMode, match="scheduler 'x'"):
        make("ipvs:x")


def test_mode_list_continues_a_spec_after_a_comma_and_keeps_each_once():
    labels = [s.label for s in parse_modes("ipvs:rr,ipvs:lc,ipvs:scheduler=sh,backend=legacy,"
                                           "iptables,ipvs:scheduler=lc")]
    assert labels == ["ipvs:rr", "ipvs:lc", "ipvs:scheduler=sh,backend=legacy", "iptables"]


def _bench_args(**flags) -> argparse.Namespace:
    from bench.runner import add_bench_arguments

    return add_bench_arguments(argparse.ArgumentParser()).parse_args(
        [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()])


def test_bench_modes_sweep_algorithms_as_series_of_their_own(tmp_path):
    from bench.runner import BenchSpecError, parse_spec

    spec = parse_spec(_bench_args(modes="ipvs:rr,ipvs:lc", services="1,10"))
    assert spec.modes == ["ipvs:rr", "ipvs:lc"] and spec.modes_given
    assert spec.sweep_config().modes == ["ipvs:rr", "ipvs:lc"]
    assert parse_spec(_bench_args()).modes == list(MODES)
    with pytest.raises(BenchSpecError, match=r"--modes 'ipvs:lq': ipvs scheduler 'lq' .*rr, wrr"):
        parse_spec(_bench_args(modes="ipvs:rr,ipvs:lq"))
    # The labels are the report's series names: a colon is only text there.
    from reports.render import write_report
    from tests.test_report import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", modes=("ipvs:rr", "ipvs:lc"), sizes=(1, 10, 100),
                              repeats=2)
    page = write_report(run).read_text()
    findings = re.sub(r"<[^>]+>", "", page.split("id='findings'")[1].split("</section>")[0])
    assert re.search(r"ipvs:rr at 100 Services: flat", findings), findings
    assert re.search(r"ipvs:lc at 100 Services: flat", findings), findings
    assert "data-mode='ipvs:lc'" in page and "data-mode='ipvs:rr'" in page


def test_up_with_a_bad_mode_spec_exits_2_with_one_sentence_and_creates_nothing():
    runs = Path("/run/svcbench/runs")
    before = set(os.listdir(runs)) if runs.exists() else set()
    result = subprocess.run([sys.executable, "-m", "svcbench", "up", "--mode", "ipvs:bogus"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("svcbench: error: --mode 'ipvs:bogus': ipvs scheduler 'bogus'")
    assert "rr, wrr, lc, wlc" in lines[0]
    after = set(os.listdir(runs)) if runs.exists() else set()
    assert after <= before


def test_conformance_refuses_a_bad_spec_before_anything_runs(tmp_path, capsys):
    from svcbench.cli import main

    assert main(["conformance", "--mode", "userspace:lc", "--out", str(tmp_path / "x")]) == 2
    assert "balancing 'lc' is not one of rr, random" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- real traffic


@pytest.mark.root
def test_userspace_round_robin_rotates_and_random_does_not():
    """One node, three echo pods and a client: `userspace` (rr) gives 30 connections 10 per
    pod in a repeated rotation; `userspace:random` restarts the node's proxy with
    --balancing random, reaches every pod uniformly, and follows no rotation."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    from clusters.netns import NetnsCluster
    from clusters.nsenter import in_netns
    from clusters.workloads.probe import OK, probe
    from kube.model import TCP, ContainerPort, Node, Pod, Service, ServicePort
    from kube.state import ClusterState

    nodes = [Node.numbered(1)]
    web = [Pod("ns1", f"web-{i}", {"app": "web"}, "node1", (ContainerPort(8080, TCP, "http"),))
           for i in (1, 2, 3)]
    pods = [*web, Pod("ns1", "client", {"app": "client"}, "node1")]
    svc = Service("ns1", "web", (ServicePort(80, TCP, "", 8080),), selector={"app": "web"})
    state = ClusterState.build(nodes, pods, [svc])
    view = state.node_view("node1")
    ip = state.service_obj("ns1", "web").cluster_ip
    names = [f"ns1/{p.name}" for p in web]
    with NetnsCluster.create(1) as cluster:
        cluster.set_pods(list(state.pods))
        node = cluster.node("node1")
        client = cluster.pod_netns("ns1", "client")
        rr, rand = make("userspace"), make("userspace:random")
        rr.install(node)
        try:
            rr.sync(node, view)
            order = [s.backend for s in in_netns(client, probe, ip, 80, count=30).samples]
            assert Counter(order) == dict.fromkeys(names, 10), order
            assert all(order[i] == order[i - 3] for i in range(3, 30)), order
            stats = rand.sync(node, view)
            assert stats.extra["proxy_spawned"]  # the other algorithm is another process
            result = in_netns(client, probe, ip, 80, count=90)
            assert all(s.outcome == OK for s in result.samples), result.summary()
            order = [s.backend for s in result.samples]
            counts = Counter(order)
            assert set(counts) == set(names), counts
            assert chisquare([counts[n] for n in names]).pvalue > 1e-5, counts
            # A rotation repeats every 3: 87 coincidences; at random about 29.
            assert sum(order[i] == order[i - 3] for i in range(3, 90)) < 60, order
        finally:
            rand.uninstall(node)
