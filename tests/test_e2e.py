"""The foundation end to end, through the CLI: up, probe, apply, status, down, gc.

Two nodes, three web pods over both, a client pod, a NodePort Service `web` (80 -> named
targetPort `http`) and a Service `empty` with no endpoints (examples/web.yaml).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clusters.safety import diff as root_diff
from clusters.safety import snapshot_root
from tests.test_cli import ROOT, _netns, svcbench

pytestmark = pytest.mark.root
WEB = ROOT / "examples" / "web.yaml"
WEB_IP, EMPTY_IP, NODE_PORT = "198.19.0.1", "198.19.0.2", 30080
BACKENDS = {"ns1/web-1", "ns1/web-2", "ns1/web-3"}


def probe(run: str, source: str, to: str, count: int, *extra: str) -> dict:
    result = svcbench("probe", "--run", run, "--from", source, "--to", to,
                      "--count", str(count), "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    before = snapshot_root()
    result = svcbench("up", "--nodes", "2", "-f", str(WEB), "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)["run"]
    try:
        yield run
    finally:
        down = svcbench("down", "--run", run)
        assert down.returncode == 0, down.stderr
        assert not [n for n in _netns() if n.startswith(f"svb-{run}")]
        assert root_diff(before, snapshot_root()) == []


def test_clusterip_reaches_every_backend_from_a_pod(cluster):
    data = probe(cluster, "pod/ns1/client", f"{WEB_IP}:80", 300)
    summary = data["summary"]
    assert summary["outcomes"] == {"ok": 300}
    assert set(summary["backends"]) == BACKENDS
    # Pod -> ClusterIP keeps the client's address: the backend sees the client pod's IP.
    status = json.loads(svcbench("status", "--run", cluster, "--json").stdout)
    client_ip = next(p["ip"] for p in status["pods"] if p["name"] == "client")
    assert {s["seen_client"].split(":")[0] for s in data["samples"]} == {client_ip}


def test_service_without_endpoints_is_refused_fast(cluster):
    data = probe(cluster, "pod/ns1/client", f"{EMPTY_IP}:80", 20)
    assert data["summary"]["outcomes"] == {"refused": 20}
    assert max(s["latency_us"] for s in data["samples"]) < 1_000_000


def test_node_host_network_reaches_the_clusterip(cluster):
    for node in ("node1", "node2"):
        data = probe(cluster, f"node/{node}", f"{WEB_IP}:80", 60)
        assert data["summary"]["outcomes"] == {"ok": 60}
        assert len(data["summary"]["backends"]) >= 2


def test_external_client_reaches_nodeport_on_every_node(cluster):
    status = json.loads(svcbench("status", "--run", cluster, "--json").stdout)
    # Per node: its echo agent is up, and the last sync programmed every Service port.
    for node in status["nodes"]:
        assert node["echo_agent"] == "running", node
        assert node["last_sync"]["services"] == node["service_ports"] == 2, node
        assert node["endpoints"] == 3 and node["local_endpoints"] in (1, 2), node
    for node in status["nodes"]:
        data = probe(cluster, "external", f"{node['ip']}:{NODE_PORT}", 60)
        assert data["summary"]["outcomes"] == {"ok": 60}, node
        assert set(data["summary"]["backends"]) <= BACKENDS
        assert len(data["summary"]["backends"]) >= 2


def test_apply_changes_the_running_cluster(cluster, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web2, namespace: ns1}\n"
        "spec: {clusterIP: 198.19.0.3, selector: {app: web}, ports: [{port: 81, targetPort: http}]}\n"
    )
    result = svcbench("apply", "--run", cluster, "-f", str(extra))
    assert result.returncode == 0, result.stderr
    assert "sync" in result.stdout
    data = probe(cluster, "pod/ns1/client", "198.19.0.3:81", 30)
    assert data["summary"]["outcomes"] == {"ok": 30}
    result = svcbench("delete", "--run", cluster, "-f", str(extra))
    assert result.returncode == 0, result.stderr
    data = probe(cluster, "pod/ns1/client", "198.19.0.3:81", 3, "--timeout", "0.3")
    assert "ok" not in data["summary"]["outcomes"]
    # the first Service is untouched by either change
    assert probe(cluster, "pod/ns1/client", f"{WEB_IP}:80", 10)["summary"]["outcomes"] == {"ok": 10}


def test_kill_9_during_up_then_gc_leaves_nothing():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    before_root, before_ns = snapshot_root(), _netns()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "svcbench", "up", "--nodes", "3", "--pods-per-node", "20"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_netns() - before_ns) < 6:
        time.sleep(0.05)
    assert _netns() - before_ns, "up created no namespace before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = svcbench("gc")
    assert result.returncode == 0, result.stderr
    assert _netns() == before_ns
    assert root_diff(before_root, snapshot_root()) == []
