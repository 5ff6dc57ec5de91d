"""What a long unattended run needs: a tracer that lasts, a line per size in a CI log, a time
budget that stops cleanly, and a guest whose death is recorded with its reason.

Sweeps here are tiny real ones (namespaces, rules, traffic); the guest tests boot User-Mode
Linux and skip with the reason where it cannot run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.runner import BenchSpecError, SweepClock, parse_budget
from clusters import uml, uml_host
from reports.results import read_bench_csv, read_json
from tests.test_bench import ROOT, namespaces_of, run_folder, runner
from tests.test_uml import _needs_guest
from tests.test_uml import guest_dir as _guest_dir

guest_dir = _guest_dir  # the fixture: a private GUEST_DIR, never someone else's guests
TINY = ("--modes", "iptables", "--metrics", "conn_latency_us", "--count", "10", "--repeats", "1")

# --------------------------------------------------------------------------- budget and clock


def test_budget_reads_hours_minutes_and_seconds():
    assert parse_budget(None) is None
    assert [parse_budget(t) for t in ("3h", "90m", "1h30m", "600", "45s")] == [
        10800, 5400, 5400, 600, 45]
    for bad in ("3x", "0", "", "h", "-5m", "200h"):
        with pytest.raises(BenchSpecError, match="--budget must be a time"):
            parse_budget(bad)


def test_bad_budget_exits_2_and_creates_nothing(tmp_path):
    result = runner("--budget", "soon", out=tmp_path / "runs")
    assert result.returncode == 2 and "--budget must be a time" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_clock_guesses_a_size_from_its_earlier_visits_then_from_other_modes():
    clock = SweepClock([(0, 1), (0, 10), (1, 10), (1, 1)], budget_s=None)
    clock.modes = ["iptables", "ipvs"]
    clock.took = {("iptables", 1): [2.0], ("iptables", 10): [8.0]}
    clock.done = 2  # iptables pass 1 done; pass 2 (10, then 1) and all of ipvs are left
    assert clock.remaining("iptables") == (8 + 2) + (2 + 8 + 8 + 2)
    clock.took[("ipvs", 10)] = [20.0]
    clock.done = 4 + 2  # ipvs: its 10 took 20 s, its 1 has only iptables' 2 s to go by
    assert clock.remaining("ipvs") == 20 + 2
    assert not clock.over_budget()
    assert SweepClock([], budget_s=0.0).over_budget()


# --------------------------------------------------------------------------- real sweeps


VISIT = re.compile(r"bench: (\w+) pass 1/1 \(up\) ([\d,]+) Services in \d+s; \S+ so far, about \S+ left$")


@pytest.mark.root
def test_a_ci_log_gets_a_line_per_size_and_the_budget_stops_between_two(tmp_path):
    out = tmp_path / "runs"
    result = runner(*TINY, "--modes", "iptables,nftables", "--services", "1,10,100,1000,2000",
                    "--budget", "1s", out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    # stderr is a pipe: no bar; a line per size with the time so far and an estimate
    assert "━" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "bench: iptables: mode 1 of 2, 5 sizes, 5 visits"
    visits = [(m[1], int(m[2].replace(",", ""))) for m in map(VISIT.match, lines) if m]
    assert visits, result.stderr
    folder = run_folder(out)
    meta = read_json(folder / "run.json")
    assert meta["status"] == "incomplete" and meta["complete"] is False and meta["finished"]
    assert meta["incomplete_reason"] == "budget" and meta["stopped_at"]["budget_s"] == 1.0
    # the run stopped right after the size it was measuring, and says where
    stop = (meta["stopped_at"]["mode"], meta["stopped_at"]["n_services"])
    assert visits[-1] == stop and stop != ("nftables", 2000)
    assert f"budget ran out after {stop[0]} pass 1 at {stop[1]:,} Services" in result.stderr
    assert meta["modes"][stop[0]]["status"] == "stopped"
    if stop[0] == "iptables":
        assert meta["modes"]["nftables"] == {"status": "not run", "reason": "the budget ran out"}
    # what was measured is kept, nothing after the stop was measured, the clusters are gone
    rows = read_bench_csv(folder / "bench.csv")
    assert sorted({(r["mode"], r["n_services"]) for r in rows}) == sorted(visits)
    clusters = [info.get("cluster") for info in meta["modes"].values()]
    assert not namespaces_of(clusters)
    assert "incomplete: the 1s budget ran out after" in result.stdout


@pytest.mark.root
def test_a_terminal_keeps_the_progress_bar(tmp_path):
    if shutil.which("script") is None:
        pytest.skip("script(1) is missing (apt-get install bsdutils): no terminal to run in")
    out = tmp_path / "runs"
    argv = [sys.executable, "-m", "bench.runner", *TINY, "--services", "1", "--out", str(out)]
    # script(1) gives the run a terminal; its output (the terminal's) goes to the pipe
    done = subprocess.run(["script", "-qec", " ".join(argv), "/dev/null"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLUMNS="100"))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "━" in done.stdout and "bench: iptables pass" not in done.stdout
    assert read_json(run_folder(out) / "run.json")["status"] == "complete"


# --------------------------------------------------------------------------- the tracer


def _handshakes(tracer, server: socket.socket, count: int) -> int:
    tracer.arm()
    for _ in range(count):
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        client.close()
        accepted.close()
    return len(tracer.collect())


@pytest.mark.root
def test_a_tracer_that_dies_is_replaced_at_the_next_window_and_says_why():
    from bench.trace import HandshakeTrace, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with socket.create_server(("127.0.0.1", 0)) as server, HandshakeTrace("127.0.0.1") as tracer:
        assert _handshakes(tracer, server, 5) >= 5
        # what the nightly saw: the child ended on its own with status 0 (it had a 600 s clock)
        tracer._proc.stdin.write("stop\n")
        tracer._proc.stdin.flush()
        assert tracer._proc.wait(timeout=20) == 0
        assert _handshakes(tracer, server, 5) >= 5
        os.killpg(tracer._proc.pid, signal.SIGKILL)
        tracer._proc.wait(timeout=20)
        assert _handshakes(tracer, server, 5) >= 5
        assert tracer.restarts == ["the tracer exited with status 0",
                                   "the tracer killed by signal 9"]


@pytest.mark.root
def test_a_tracer_ends_with_its_parent_not_on_a_clock():
    from bench.trace import HandshakeTrace, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    tracer = HandshakeTrace("127.0.0.1")
    try:
        time.sleep(2)
        assert tracer._proc.poll() is None
        tracer._proc.stdin.close()  # what the child sees when its parent is gone
        assert tracer._proc.wait(timeout=20) == 0
    finally:
        tracer._kill()
        tracer._stderr.close()


# --------------------------------------------------------------------------- the guest


OOM_CONSOLE = """\
[  52.1] Out of memory: Killed process 748 (python3) total-vm:1544216kB, anon-rss:602832kB, \
file-rss:348kB, shmem-rss:0kB, UID:0 pgtables:1792kB oom_score_adj:0
[55.53] svcbench-guest: exit -9
"""
MAPS_CONSOLE = """\
do_syscall_stub: syscall 9 failed, return value = 0xfffffffffffffff4, expected return value = 0x8bff3000
UML ran out of memory on the host side! This can happen due to a memory limitation or \
vm.max_map_count has been reached.
[19.46] svcbench-guest: exit -9
"""


def test_a_guest_death_names_its_cause_and_the_fix(monkeypatch, tmp_path):
    oom = uml.death_cause(OOM_CONSOLE, "1024M")
    assert "ran out of its memory (mem=1024M) and killed python3 at 588 MB" in oom
    assert "SVCBENCH_UML_MEM" in oom
    maps = uml.death_cause(MAPS_CONSOLE, "4G")
    assert "vm.max_map_count" in maps and "svcbench doctor --fix" in maps
    assert uml.death_cause("[1.0] svcbench-guest: exit -9\n", "4G") is None
    limit = tmp_path / "max_map_count"
    monkeypatch.setattr(uml_host, "MAP_COUNT_FILE", str(limit))
    limit.write_text("65530\n")
    assert "vm.max_map_count is 65,530" in uml_host.map_count_problem()
    assert uml_host.map_count_problem() in uml_host.uml_missing()
    limit.write_text(f"{uml_host.MAP_COUNT}\n")
    assert uml_host.map_count_problem() is None


def _run_json(path: Path, status: str) -> None:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({
        "status": status, "complete": False, "errors": [],
        "modes": {"iptables": {"status": "done"}, "ipvs": {"status": "running"}}}))


def test_a_run_the_guest_left_running_is_marked_failed_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    since = time.time() - 1
    _run_json(tmp_path / "out" / "bench-new", "running")
    _run_json(tmp_path / "out" / "bench-done", "complete")
    marked = uml.record_death("out", since, "it died")
    assert marked == ["out/bench-new"]
    meta = read_json(tmp_path / "out" / "bench-new" / "run.json")
    assert meta["status"] == "failed" and meta["finished"]
    assert meta["errors"] == [{"error": "the guest kernel: it died", "where": "guest"}]
    assert meta["modes"]["ipvs"] == {"status": "failed", "error": "the guest kernel: it died"}
    assert meta["modes"]["iptables"] == {"status": "done"}
    assert read_json(tmp_path / "out" / "bench-done" / "run.json")["status"] == "complete"


# Leaves a run folder "running", as a bench does, then grows until the guest's OOM killer acts.
GREEDY = ("import json, os\n"
          "os.makedirs('runs/bench-greedy')\n"
          "with open('runs/bench-greedy/run.json', 'w') as fh:\n"
          "    json.dump({'status': 'running', 'modes': {'ipvs': {'status': 'running'}}, 'errors': []}, fh)\n"
          "hoard = [b'x' * (1 << 20) for _ in range(4096)]\n")


@pytest.mark.root
@pytest.mark.timeout(300)
def test_a_guest_command_killed_for_memory_exits_1_and_its_run_says_why(
        guest_dir, tmp_path, monkeypatch, capfd):
    _needs_guest()
    monkeypatch.chdir(tmp_path)  # the guest runs `python -m greedy` here, over hostfs
    (tmp_path / "greedy.py").write_text(GREEDY)
    rc = uml.run_in_guest([], timeout=240, mem="256M", module="greedy")
    err = capfd.readouterr().err
    assert rc == 1, err[-3000:]
    assert "was killed by signal SIGKILL" in err and "(mem=256M)" in err
    meta = read_json(tmp_path / "runs" / "bench-greedy" / "run.json")
    assert meta["status"] == "failed" and "ran out of its memory" in meta["errors"][0]["error"]
    assert meta["modes"]["ipvs"]["status"] == "failed"
    assert not any(guest_dir.iterdir())


THREADS = ("import threading, numpy as np\n"
           "bad = []\n"
           "def work(k):\n"
           "    a = np.arange(300000, dtype=np.float64) * (k + 1); want = float(a @ a); keep = a.copy()\n"
           "    for _ in range(200):\n"
           "        if float(a @ a) != want or not np.array_equal(a.copy(), keep): bad.append(k)\n"
           "threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]\n"
           "[t.start() for t in threads]; [t.join() for t in threads]\n"
           "print('wrong results:', len(bad))\n")


@pytest.mark.root
@pytest.mark.timeout(300)
def test_guest_threads_keep_their_vector_registers(guest_dir, tmp_path, monkeypatch, capfd):
    # numpy's vector loops in four threads of one process: on an AVX-512 host only the
    # preloaded uml_xstate.c keeps each thread's upper registers apart
    _needs_guest()
    pytest.importorskip("numpy")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vector_threads.py").write_text(THREADS)
    rc = uml.run_in_guest([], timeout=240, module="vector_threads")
    out = capfd.readouterr().out
    assert rc == 0 and "wrong results: 0" in out
