"""A run's lifecycle under the ways real use ends or overlaps commands.

SIGTERM and SIGHUP (kill, timeout, CI cancellation, a closed terminal) clean up as Ctrl-C
does; commands that change one run take turns on its lock, so none is lost and `down`
leaves nothing; a bench run folder whose process was killed is marked so; without root
the CLI says so in one sentence.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusters.netns import STATE_DIR, ClusterError, NetnsCluster, owner, process_alive
from clusters.nsenter import in_netns
from clusters.workloads.probe import probe
from reports.results import read_json, write_run_json
from tests.test_cli import ROOT, _netns, svcbench

pytestmark = pytest.mark.root
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def start(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "svcbench", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def signal_once(proc: subprocess.Popen, ready, signum: int, what: str):
    """Wait until ready() gives a value, send signum, let the process exit: (value, stderr)."""
    try:
        value = wait_for(ready, timeout=120, what=what)
        proc.send_signal(signum)
        return value, proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def state_owned_by(pid: int) -> dict | None:
    """The state of the run whose owner is process `pid`, once it has one."""
    try:
        runs = os.listdir(STATE_DIR)
    except FileNotFoundError:
        return None
    for run in runs:
        try:
            state = json.loads(Path(STATE_DIR, run, "state.json").read_text())
        except (OSError, ValueError):
            continue
        if (state.get("owner") or {}).get("pid") == pid:
            return state
    return None


def agents_of(state: dict) -> list[dict]:
    return [n["agent"] for n in state["nodes"] if n.get("agent")]


def assert_run_gone(run: str, agents: list[dict]) -> None:
    assert not [n for n in _netns() if n.startswith(f"svb-{run}-")]
    assert not os.path.exists(os.path.join(STATE_DIR, run))
    assert not [a["pid"] for a in agents if process_alive(a["pid"], a["start"])]


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum, moment", [(signal.SIGTERM, "pods"), (signal.SIGHUP, "nodes")])
def test_signal_during_up_cleans_up_like_ctrl_c(signum, moment):
    """`up` killed with TERM (or HUP) left 69 namespaces and the echo agents until `gc`."""
    proc = start("up", "--nodes", "3", "--pods-per-node", "20")

    def reached() -> dict | None:
        state = state_owned_by(proc.pid)
        if state is None:
            return None
        if moment == "pods":
            return state if state["pods"] and agents_of(state) else None
        return state if len(state.get("namespaces", [])) >= 2 else None

    state, stderr = signal_once(proc, reached, signum, f"up to reach its {moment}")
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    # the agents started after `state` was read are in the final state file no more: the
    # run's namespaces going means every process in them went too
    assert_run_gone(state["run"], agents_of(state))


def test_sigterm_during_down_still_removes_everything():
    up = svcbench("up", "--nodes", "3", "--pods-per-node", "20", "--json")
    assert up.returncode == 0, up.stderr
    run = json.loads(up.stdout)["run"]
    state = json.loads(Path(STATE_DIR, run, "state.json").read_text())
    proc = start("down", "--run", run)

    def destroying() -> bool:
        try:
            return json.loads(Path(STATE_DIR, run, "state.json").read_text())["status"] == "destroying"
        except FileNotFoundError:
            return True  # done before we looked: then nothing is left either
        except ValueError:
            return False

    _, stderr = signal_once(proc, destroying, signal.SIGTERM, "down to start")
    assert proc.returncode in (0, 128 + signal.SIGTERM), stderr
    assert_run_gone(run, agents_of(state))


def test_sigterm_during_bench_marks_the_run_incomplete_and_removes_its_cluster(tmp_path):
    proc = start("bench", "--modes", "iptables", "--services", "1,10", "--repeats", "1",
                 "--count", "20", "--metrics", "conn_latency_us", "--out", str(tmp_path))

    def cluster_made() -> tuple[Path, str] | None:
        for path in tmp_path.glob("bench-*/run.json"):
            run = (read_json(path).get("modes", {}).get("iptables") or {}).get("cluster")
            if run and os.path.exists(os.path.join(STATE_DIR, run)):
                return path, run
        return None

    (path, run), stderr = signal_once(proc, cluster_made, signal.SIGTERM, "the bench's cluster")
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    meta = read_json(path)
    assert meta["status"] == "incomplete" and meta["finished"], meta["status"]
    assert not [n for n in _netns() if n.startswith(f"svb-{run}-")]


def test_a_killed_bench_run_is_marked_killed_by_gc_or_the_next_run(tmp_path):
    proc = start("bench", "--modes", "iptables", "--services", "1", "--repeats", "1",
                 "--count", "20", "--metrics", "conn_latency_us", "--out", "runs", cwd=tmp_path)
    path, _ = signal_once(proc, lambda: next(tmp_path.glob("runs/bench-*/run.json"), None),
                          signal.SIGKILL, "run.json")
    assert read_json(path)["status"] == "running"
    # A live owner's folder is left alone, and so is one written before owners were kept.
    live, legacy = tmp_path / "runs" / "bench-live", tmp_path / "runs" / "bench-legacy"
    write_run_json(live, {"status": "running", "owner": owner()})
    write_run_json(legacy, {"status": "running"})
    gc = subprocess.run([sys.executable, "-m", "svcbench", "gc"], cwd=tmp_path,
                        env={**ENV, "COLUMNS": "300"}, capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert f"bench run runs/{path.parent.name}: marked killed" in gc.stdout
    assert read_json(path)["status"] == "killed"
    assert read_json(live / "run.json")["status"] == "running"
    assert read_json(legacy / "run.json")["status"] == "running"
    # the next run marks it too (here: the folder made "running" again)
    meta = read_json(path)
    write_run_json(path.parent, {**meta, "status": "running"})
    from bench.runner import mark_killed

    assert mark_killed(tmp_path / "runs") == [
        f"bench run {path.parent}: marked killed (its owner pid {meta['owner']['pid']} is gone)"]


# --------------------------------------------------------------------------- the run lock

BASE = """apiVersion: v1
kind: Pod
metadata: {name: client, namespace: ns1, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: base-1, namespace: ns1, labels: {app: base}}
spec: {nodeName: node2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: base, namespace: ns1}
spec: {clusterIP: 198.19.0.30, selector: {app: base}, ports: [{port: 80, targetPort: 8080}]}
"""


def service_and_pods(name: str, ip: str, pods: int = 1) -> str:
    docs = [f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns1}}\n"
            f"spec: {{clusterIP: {ip}, selector: {{app: {name}}}, "
            "ports: [{port: 80, targetPort: 8080}]}\n"]
    docs += [f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-{i}, namespace: ns1, "
             f"labels: {{app: {name}}}}}\nspec: {{nodeName: node{1 + i % 2}, "
             "containers: [{name: c, ports: [{containerPort: 8080}]}]}\n"
             for i in range(pods)]
    return "---\n".join(docs)


def up(tmp_path) -> tuple[str, dict]:
    base = tmp_path / "base.yaml"
    base.write_text(BASE)
    result = svcbench("up", "--nodes", "2", "-f", str(base), "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)["run"]
    return run, json.loads(Path(STATE_DIR, run, "state.json").read_text())


@pytest.fixture
def run(tmp_path):
    run, state = up(tmp_path)
    try:
        yield run
    finally:
        if os.path.exists(os.path.join(STATE_DIR, run)):
            assert svcbench("down", "--run", run).returncode == 0
        assert_run_gone(run, agents_of(state))


def outcomes(run: str, ip: str, count: int = 5) -> dict:
    state = json.loads(Path(STATE_DIR, run, "state.json").read_text())
    client = state["pods"]["ns1/client"]["netns"]
    return in_netns(client, probe, ip, 80, count=count, timeout=0.5).summary()["outcomes"]


def test_concurrent_apply_and_delete_are_serialised_and_none_is_lost(run, tmp_path):
    """Two applies at once both said "3 services" and one Service survived."""
    files = {}
    for name, ip in (("a", "198.19.0.11"), ("b", "198.19.0.12"), ("c", "198.19.0.13")):
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(service_and_pods(name, ip, pods=2))
    base_service = tmp_path / "base-service.yaml"
    base_service.write_text(BASE.split("---\n")[2])
    procs = [start("apply", "--run", run, "-f", str(files[n])) for n in ("a", "b", "c")]
    procs.append(start("delete", "--run", run, "-f", str(base_service)))
    results = [(p.args, *p.communicate(timeout=120), p.returncode) for p in procs]
    for argv, _, stderr, rc in results:
        assert rc == 0, (argv, stderr)
    status = json.loads(svcbench("status", "--run", run, "--json").stdout)
    assert sorted(s["name"] for s in status["services"]) == ["a", "b", "c"]
    assert len(status["pods"]) == 2 + 3 * 2
    for ip in ("198.19.0.11", "198.19.0.12", "198.19.0.13"):
        assert outcomes(run, ip) == {"ok": 5}, ip
    assert "ok" not in outcomes(run, "198.19.0.30", count=1)


@pytest.mark.parametrize("head_start", [0.0, 0.4])
def test_apply_racing_down_leaves_nothing(tmp_path, head_start):
    """`down` said removed while 7 namespaces remained, and apply died of FileNotFoundError."""
    run, state = up(tmp_path)
    many = tmp_path / "many.yaml"
    many.write_text(service_and_pods("many", "198.19.0.20", pods=40))
    try:
        apply = start("apply", "--run", run, "-f", str(many))
        time.sleep(head_start)
        down = start("down", "--run", run)
        _, apply_err = apply.communicate(timeout=120)
        _, down_err = down.communicate(timeout=120)
    finally:
        if os.path.exists(os.path.join(STATE_DIR, run)):
            svcbench("down", "--run", run)
    assert down.returncode == 0, down_err
    if apply.returncode != 0:  # it came second and found the run gone: one sentence saying so
        assert apply.returncode == 1 and run in one_line(apply_err), apply_err
    assert "FileNotFoundError" not in apply_err
    assert_run_gone(run, agents_of(state))


def test_a_killed_lock_holder_frees_the_run_and_a_busy_run_names_its_holder(run, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom clusters.netns import NetnsCluster\n"
         f"with NetnsCluster.attach_locked({run!r}):\n"
         "    print('held', flush=True)\n    time.sleep(120)\n"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ClusterError, match=rf"run {run} is busy: pid {holder.pid} \(.*"):
            with NetnsCluster.attach_locked(run, wait_s=0.3):
                pass
        holder.kill()
        holder.wait()
        started = time.monotonic()
        with NetnsCluster.attach_locked(run, wait_s=5) as cluster:
            assert cluster.run_id == run
        assert time.monotonic() - started < 1.0
    finally:
        holder.kill()
        holder.wait()
    extra = tmp_path / "extra.yaml"
    extra.write_text(service_and_pods("extra", "198.19.0.14"))
    result = svcbench("apply", "--run", run, "-f", str(extra))
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- without root


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    """svcbench as uid nobody, with no capability left.

    This interpreter may live where nobody cannot reach (a pyenv under /root): then the
    system's Python 3 runs it with this environment's packages on its path.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to run a command as another user")
    drop = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    site = next(p for p in sys.path if p.endswith("site-packages"))
    env = {**ENV, "HOME": "/tmp", "PYTHONPATH": f"{ROOT}:{site}"}
    for python in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run([*drop, python, "-c", "import svcbench.cli"], cwd="/tmp", env=env,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return subprocess.run([*drop, python, "-m", "svcbench", *args], cwd="/tmp", env=env,
                                  capture_output=True, text=True, timeout=120)
    pytest.skip(f"no Python here runs svcbench as nobody: {probe.stderr.strip()[-300:]}")


def test_without_root_doctor_says_run_as_root_in_one_line():
    result = as_nobody("doctor")
    assert result.returncode == 1
    assert one_line(result.stdout + result.stderr).startswith("run as root")
    data = json.loads(as_nobody("doctor", "--json").stdout)
    missing = {c["name"]: c["fix"] for c in data["checks"] if not c["present"]}
    assert missing.get("root") == "run as root" and "netns" not in missing


@pytest.mark.parametrize("command", [["status"], ["gc"], ["down"], ["probe", "--from", "external",
                                                                   "--to", "198.19.0.1:80"]])
def test_without_root_run_commands_say_so_in_one_sentence(command):
    result = as_nobody(*command)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert f"svcbench {command[0]}" in line and "needs root" in line, line
