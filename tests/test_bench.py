"""The bench runner: bad sweep specs exit 2 with nothing created; a tiny real sweep writes
run.json, bench.csv and raw samples in the schema; Ctrl-C keeps what was measured and
marks the run incomplete; repeats' spread flags noisy rows.

The real sweeps run `python -m bench.runner` as a child process (the CLI's `svcbench
bench` calls the same `run_bench_command`), over real namespaces and real iptables rules.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.runner import (
    BenchSpecError,
    add_bench_arguments,
    parse_spec,
    spread,
    summary_lines,
)
from bench.sweep import Row
from bench.synthetic import (
    AFFINITY_EVERY,
    NODEPORT_EVERY,
    pool_pods,
    synthetic_services,
    with_endpoints,
)
from kube.model import PLAN, TYPE_NODE_PORT, Node
from kube.state import ClusterState
from reports.results import BENCH_COLUMNS, read_bench_csv, read_json

ROOT = Path(__file__).resolve().parents[1]


def runner(*args: str, out: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.runner", *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def namespaces_of(run_ids) -> list[str]:
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return [n for n in names for r in run_ids if r and n.startswith(f"svb-{r}-")]


def run_folder(out: Path) -> Path:
    folders = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("bench-")]
    assert len(folders) == 1, folders
    return folders[0]


# --------------------------------------------------------------------------- specs


def spec(*argv: str):
    return parse_spec(add_bench_arguments(argparse.ArgumentParser()).parse_args(list(argv)))


@pytest.mark.parametrize(("argv", "flag"), [
    (["--services", "1,ten"], "--services"),
    (["--services", "0"], "--services"),
    (["--services", "70000"], "--services"),
    (["--modes", "iptables,bpfilter"], "--modes"),
    (["--repeats", "0"], "--repeats"),
    (["--count", "5"], "--count"),
    (["--endpoints", "6", "--pool-size", "6"], "--endpoints"),
    (["--kernel", "mars"], "--kernel"),
    (["--metrics", "conn_latency_us,vibes"], "--metrics"),
    (["--load-seconds", "fast"], "--load-seconds"),
    (["--backend", "ebtables"], "--backend"),
    (["--churn", "10,lots"], "--churn"),
    (["--churn", "0"], "--churn"),
    (["--churn-seconds", "0.1"], "--churn-seconds"),
])
def test_bad_spec_names_the_flag(argv, flag):
    with pytest.raises(BenchSpecError) as info:
        spec(*argv)
    message = str(info.value)
    assert message.startswith(flag) and message.count(". ") == 0


def test_spec_sorts_sizes_and_defaults_to_every_mode():
    s = spec("--services", "100,1,10,10")
    assert s.sizes == [1, 10, 100] and s.modes == ["iptables", "nftables", "ipvs", "ebpf", "userspace"]
    assert not s.modes_given and s.metrics is None
    assert spec("--modes", "iptables", "--metrics", "rules").metrics == ["rules"]


def test_presets_fill_only_the_flags_not_given():
    nightly = spec("--preset", "nightly", "--repeats", "2")
    assert nightly.sizes[-1] == 30_000 and nightly.count == 1000 and nightly.repeats == 2
    assert nightly.churn == [1000, 10000] and nightly.churn_seconds == 30
    assert spec().sizes == [1, 10, 100, 1000, 5000, 10000] and spec().churn == [1000, 10000]
    quick = spec("--preset", "quick")
    assert quick.sizes[-1] <= 1000 and quick.repeats == 1 and quick.churn == [100]
    # a hand-picked sweep churns only when asked to
    assert spec("--services", "1,10").churn == []
    assert spec("--services", "1,10", "--churn", "100", "--churn-seconds", "2").churn == [100]
    assert spec("--churn", "none").churn == []
    with pytest.raises(BenchSpecError, match=r"^--preset must be one of bench, nightly, quick"):
        spec("--preset", "weekly")


def test_bad_spec_exits_2_and_creates_nothing(tmp_path):
    out = tmp_path / "runs"
    result = runner("--services", "1,2,x", out=out, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--services must be comma-separated whole numbers" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- pure parts


def rows_for(values, metric="conn_latency_us", target="last", stat="p50") -> list[Row]:
    return [Row("iptables", "6.18", 100, metric, stat, v, "us", i, {"target": target})
            for i, v in enumerate(values)]


def test_spread_flags_repeats_more_than_5_percent_apart():
    quiet = spread(rows_for([400.0, 410.0, 405.0]))
    noisy = spread(rows_for([400.0, 460.0, 405.0], target="first"))
    assert quiet[0]["noisy"] is False and quiet[0]["spread"] == pytest.approx(10 / 405, abs=1e-3)
    assert noisy[0]["noisy"] is True
    # p99 is not the stat checked for noise, and a single repeat has no spread
    assert spread(rows_for([1.0, 100.0], stat="p99")) == [] and spread(rows_for([1.0])) == []
    lines = summary_lines(rows_for([400.0, 460.0, 405.0], target="first"), noisy)
    assert lines[0]["1st"] == 405.0 and lines[0]["noisy"] == ["1st"]


def test_the_summary_gives_each_mode_s_churn_percentiles_and_failures():
    from bench.runner import churn_lines

    stats = (("p50", 0.09), ("p90", 0.14), ("p99", 0.27), ("failed", 2), ("unprogrammed", 1))
    rows = [Row("ebpf", "6.18", n, "churn_programming_latency_s", stat, value * k, "s", 0,
                {"rate": 20.0}) for n, k in ((1000, 1), (10000, 2)) for stat, value in stats]
    assert churn_lines(rows) == [
        "ebpf churn (programming latency, 20 changes/s): 1,000: p50/p90/p99 90/140/270 ms, "
        "2 failed connections, 1 unprogrammed; 10,000: p50/p90/p99 180/280/540 ms, "
        "4 failed connections, 2 unprogrammed"]
    assert churn_lines(rows_for([400.0])) == []


def test_repeats_are_passes_up_and_down_the_sizes():
    from bench.metrics import BY_NAME, passes, sweep_order

    assert sweep_order([1, 10, 100], 3) == [(0, 1), (0, 10), (0, 100), (1, 100), (1, 10), (1, 1),
                                             (2, 1), (2, 10), (2, 100)]
    assert sweep_order([5], 2) == [(0, 5), (1, 5)]
    cfg = spec("--repeats", "2", "--load-repeats", "4").sweep_config()
    # as many passes as the most repeated metric needs; rules and kernel_bytes take one
    assert passes([BY_NAME["rules"], BY_NAME["conn_latency_us"]], cfg) == 2
    assert passes([BY_NAME["rules"], BY_NAME["throughput_rps"]], cfg) == 4
    assert passes([], cfg) == 1


def test_synthetic_services_grow_by_adding_and_mix_types():
    nodes = [Node.numbered(1), Node.numbered(2)]
    pool = list(ClusterState.build(nodes, pool_pods(["node2"], 6)).pods)
    small, _ = synthetic_services(100, pool, 3, NODEPORT_EVERY, AFFINITY_EVERY)
    big, slices = synthetic_services(30_000, pool, 3, NODEPORT_EVERY, AFFINITY_EVERY)
    # the first 99 Services of a larger sweep are those of a smaller one (the 100th was its last)
    assert small[:99] == big[:99]
    for services in (small, big):
        assert services[0].type == services[-1].type == "ClusterIP"
        assert services[0].session_affinity == services[-1].session_affinity == "None"
    lo, hi = PLAN.node_port_range
    node_ports = sum(s.type == TYPE_NODE_PORT for s in big)
    assert 0 < node_ports <= hi - lo + 1
    assert 0 < sum(s.session_affinity == "ClientIP" for s in big) < 1000
    state = ClusterState.build(nodes, pool, big[:10], slices[:10])
    moved = with_endpoints(state, "svc-00009", [pool[5]])
    view = moved.node_view("node1").service("bench/svc-00009:http")
    assert [e.ip for e in view.endpoints] == [pool[5].ip]
    assert moved.endpoint_slices[:9] == state.endpoint_slices[:9]


# --------------------------------------------------------------------------- real sweeps


@pytest.mark.root
def test_tiny_real_sweep_writes_the_run_folder(tmp_path):
    out = tmp_path / "runs"
    result = runner("--modes", "iptables", "--services", "1,10", "--repeats", "2", "--count", "20",
                    "--load-seconds", "1", out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_folder(out)
    meta = read_json(folder / "run.json")
    assert meta["complete"] is True and meta["status"] == "complete" and meta["finished"]
    assert meta["kernel"] == os.uname().release and meta["args"]["sizes"] == [1, 10]
    assert meta["modes"]["iptables"]["status"] == "done"
    assert not namespaces_of([meta["modes"]["iptables"]["cluster"]])
    assert {m["name"] for m in meta["metrics"]} >= {"conn_latency_us", "sync_full_s", "rules"}
    # run.json says how the growth verdict moved between the two passes (one mode: no ranking)
    agreed = meta["agreement"]
    assert agreed["series"] and agreed["ranking"] == []
    assert [(g["mode"], g["passes"], g["sizes"]) for g in agreed["growth"]] == [("iptables", [0, 1], [1, 10])]
    assert len(agreed["growth"][0]["per_pass"]) == 2

    header = (folder / "bench.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == BENCH_COLUMNS
    rows = read_bench_csv(folder / "bench.csv")
    skipped = meta["metrics_skipped"].get("iptables", {})
    by = {}
    for r in rows:
        by.setdefault((r["metric"], r["n_services"], r["target"], r["stat"]), []).append(r)
    for n in (1, 10):
        for target in ("first", "last", "random"):
            p50 = by[("conn_latency_us", n, target, "p50")]
            assert sorted(r["repeat"] for r in p50) == [0, 1] and all(r["value"] > 0 for r in p50)
            assert all(r["value"] == 0 for r in by[("conn_latency_us", n, target, "failed")])
        assert by[("sync_full_s", n, "", "value")][0]["unit"] == "s"
        programming = [r for r in rows if r["metric"] == "programming_latency_s" and r["n_services"] == n]
        assert sorted(r["value"] for r in programming if r["stat"] == "failed") == [0, 0]
        assert len([r for r in programming if r["stat"] == "value" and r["value"] > 0]) == 2
    # more Services, more rules: the count is what the mode wrote, not a constant
    assert by[("rules", 10, "", "count")][0]["value"] > by[("rules", 1, "", "count")][0]["value"]
    for n in (1, 10):
        # one change went through ServiceProxy.apply: node1's own sync time, both nodes synced
        for r in by[("sync_one_s", n, "", "value")]:
            assert 0 < r["value"] <= r["extra"]["apply_s"] and r["extra"]["synced"] == ["node1", "node2"]
        # the same objects again (once per size): the tracker found nothing changed, no node
        # was synced
        noop = by[("sync_noop_s", n, "", "value")] + by[("sync_noop_s", n, "", "one")]
        assert len(noop) == 2 and all(r["value"] > 0 and r["extra"]["synced"] == [] for r in noop)
        # a resync of unchanged state: a sync of each node, node1's time recorded
        for r in by[("resync_s", n, "", "value")]:
            assert r["value"] > 0 and set(r["extra"]["per_node"]) == {"node1", "node2"}
    # the catalog describes every metric the rows hold, churn's too
    described = {m["name"] for m in meta["metrics"]}
    assert {r["metric"] for r in rows} <= described
    assert {"sync_noop_s", "resync_s", "churn_programming_latency_s"} <= described
    assert next(m for m in meta["metrics"] if m["name"] == "sync_one_s")["verdict"] is True
    assert meta["args"]["churn"] == []  # --services given, no --churn: none
    # the floor is measured at every size in every pass, at the same moments as the Services
    floors = [r for r in rows if r["metric"] == "floor_conn_latency_us" and r["stat"] == "p50"]
    assert sorted((r["n_services"], r["repeat"]) for r in floors) == [(1, 0), (1, 1), (10, 0), (10, 1)]
    assert all(r["value"] > 0 and r["target"] == "floor" for r in floors)
    if "syn_to_established_us" not in skipped:
        # the kernel saw the handshake of every probe connection that got established (a
        # probe may still time out on a loaded host), and it ends before the greeting
        syn = [r for r in rows if r["metric"] == "syn_to_established_us"]
        events = [r for r in syn if r["stat"] == "events"]
        assert len(events) == 4 and all(r["value"] == r["extra"]["established"] > 15 for r in events)
        assert all(0 < r["value"] < r["extra"]["probe_p50_us"] for r in syn if r["stat"] == "p50")
    if "throughput_rps" not in skipped:
        assert all(r["value"] > 0 for r in rows if r["metric"] == "throughput_rps")

    raw = read_json(folder / "raw" / "iptables" / "n10.json")
    random_runs = [r for r in raw if r["metric"] == "conn_latency_us" and r["target"] == "random"]
    assert len(random_runs) == 2 and all(len(r["latency_us"]) == 20 for r in random_runs)
    # random Services spread over the pool: more than the three backends of one Service answer
    assert len({b for r in random_runs for b in r["backend"]}) > 3
    # the targets were measured in one run, connection by connection, and dealt back apart:
    # the pod IP's connections all reached the floor pod, the last Service's never did
    pod_backends = {b for r in raw if r["metric"] == "podip_conn_latency_us" for b in r["backend"]}
    last_backends = {b for r in raw if r["metric"] == "conn_latency_us" and r["target"] == "last"
                     for b in r["backend"]}
    assert len(pod_backends) == 1 and 1 <= len(last_backends) <= 3
    assert not pod_backends & last_backends
    # the floor's connections left from the floor client on node3 and reached node4's pod
    floor_backends = {b for r in raw if r["metric"] == "floor_conn_latency_us" for b in r["backend"]}
    assert floor_backends == {"bench/floor-backend"}
    # the second repeat is a pass back down: from 10 Services to 1 by a partial sync that
    # removes nine, after which the first Service still answers (size 1, repeat 1 above)
    grows = [(r["n_services"], r["repeat"], r["sync"][0]["full"]) for r in
             read_json(folder / "raw" / "iptables" / "sweep.json") if r.get("metric") == "grow"]
    assert grows == [(1, 0, False), (10, 0, False), (1, 1, False)]
    assert "complete in" in result.stdout and "ipt" in result.stdout


@pytest.mark.root
def test_handshake_tracer_records_only_inside_a_window():
    from bench.sweep import NODES, Bench, SweepConfig, host_kernel_label, load_mode
    from bench.trace import unavailable_reason
    from clusters.netns import NetnsCluster

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cfg = SweepConfig(["nftables"], [1], count=20)
    with NetnsCluster.create(NODES) as cluster:
        bench = Bench(cfg, "nftables", load_mode("nftables"), cluster, host_kernel_label())
        try:
            bench.start()
            tracer = bench.handshake_tracer()
            tracer.arm()
            inside = bench.connections("pod", 20, 0)
            seen = tracer.collect()
            outside = bench.connections("pod", 20, 1)  # no window open: the program stays quiet
            tracer.arm()
            late = tracer.collect()
        finally:
            bench.close()
    ports = {s.local_port for s in inside.samples if s.outcome == "ok"}
    assert len(ports) > 15 and {sport for _, sport, _ in seen} >= ports
    assert all(ip == bench.pod_ip and 0 < us < 1e6 for us, _, ip in seen)
    # the kernel program itself reported nothing outside the window, not just the reader
    assert outside.failed == 0 and late == [] and tracer.submitted == len(seen)


@pytest.mark.root
def test_ctrl_c_keeps_what_was_measured_and_marks_the_run_incomplete(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.runner", "--modes", "iptables", "--services", "1,10,100,1000",
         "--repeats", "3", "--count", "50", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Where stderr is no terminal the runner prints a line per size visited: interrupt
        # right after the first (bench.csv is rewritten only every 2 s, by which time a
        # quick sweep had reached 1,000 Services)
        first_size = None
        deadline = time.monotonic() + 240
        for line in proc.stderr:
            if " (up) 1 Services in " in line:
                first_size = line
                break
            if time.monotonic() > deadline:
                break
        assert first_size, "no size was measured within 240 s"
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=240)
        stderr = first_size + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    folder = run_folder(out)
    meta = read_json(folder / "run.json")
    assert meta["complete"] is False and meta["status"] == "incomplete" and meta["finished"]
    assert meta["modes"]["iptables"]["status"] == "interrupted"
    rows = read_bench_csv(folder / "bench.csv")
    assert any(r["n_services"] >= 1 for r in rows)
    assert not any(r["n_services"] == 1000 for r in rows)
    assert not namespaces_of([meta["modes"]["iptables"]["cluster"]])
    assert "incomplete" in stdout


# --------------------------------------------------------------------------- mode benches


def mode_benches(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.mode_benches", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_mode_benches_reject_bad_input_and_touch_nothing(tmp_path):
    folder = tmp_path / "bench-x"
    folder.mkdir()
    (folder / "run.json").write_text('{"status": "complete"}')
    bad = mode_benches("--out", str(folder), "--only", "nftables,ipvs")
    assert bad.returncode == 2 and "--only" in bad.stderr and "nftables, ebpf, userspace" in bad.stderr
    not_a_run = mode_benches("--out", str(tmp_path), "--only", "nftables")
    assert not_a_run.returncode == 2 and "not a run folder" in not_a_run.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]


@pytest.mark.root
def test_mode_benches_add_their_rows_to_the_run_folder(tmp_path):
    from reports.results import write_bench_csv

    folder = tmp_path / "bench-x"
    folder.mkdir()
    (folder / "run.json").write_text('{"status": "complete"}')
    earlier = Row("iptables", os.uname().release, 10, "sync_full_s", "value", 0.5, "s")
    write_bench_csv(folder, [earlier.as_dict()])
    result = mode_benches("--out", str(folder), "--only", "nftables", "--preset", "quick")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_bench_csv(folder / "bench.csv")
    assert [r["mode"] for r in rows if r["metric"] == "sync_full_s"] == ["iptables"]
    mine = [r for r in rows if r["mode"] == "nftables" and r["metric"] == "sync_s"]
    by_stat = {s: [r for r in mine if r["stat"] == s] for s in ("full", "one_changed", "unchanged")}
    assert [len(v) for v in by_stat.values()] == [1, 2, 1] and all(r["n_services"] == 100 for r in mine)
    full = by_stat["full"][0]
    # a full sync from empty writes every Service; one change writes a few elements, none rewrites nothing
    assert full["value"] > 0 and full["extra"]["full"] and full["extra"]["changed"] > 100
    # (a Service whose endpoint count changes moves to its new shape's class: a few dozen)
    assert all(0 < r["extra"]["changed"] < full["extra"]["changed"] / 10
               for r in by_stat["one_changed"])
    # a resync of what the node holds writes no element (it purges classes updates left idle)
    unchanged = by_stat["unchanged"][0]["extra"]
    assert unchanged["elements_added"] == unchanged["elements_deleted"] == 0, unchanged
    # each value is the mode's own sync time, within the ServiceProxy call that made it
    assert all(0 < r["value"] <= r["extra"]["call_s"] for r in mine)
    status = read_json(folder / "run.json")["mode_benches"]["nftables"]
    assert status["status"] == "done" and status["tracker_build_s"]["100"] >= 0
    assert "nftables" in result.stdout and "sync_s" in result.stdout
