"""`svcbench monitor --type drop` on a real cluster: a packet sent from the external client to
a node's NodePort of a Service whose endpoints are all on the other node, under
externalTrafficPolicy Local, is dropped by that node; the monitor shows the drop with the
kernel's reason and the Service's name, and says the view wants that drop. A SYN to a
Service with no endpoints shows as rejected. Bad flags: one sentence, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpf.setup import bcc_missing
from svcbench.cli import main

pytestmark = pytest.mark.root
EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "web.yaml")
FAR = """
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: ns1, labels: {app: far}}
spec:
  nodeName: node2
  containers:
    - name: echo
      ports: [{name: http, containerPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: far, namespace: ns1}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: far}
  ports:
    - {name: http, port: 80, targetPort: http, nodePort: 30082, protocol: TCP}
"""


def _svcbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "svcbench", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_monitor_shows_a_local_policy_drop_with_reason_and_service(mode, tmp_path, capsys):
    missing = bcc_missing()
    if missing:
        pytest.skip("bcc cannot compile here: " + "; ".join(missing))
    far = tmp_path / "far.yaml"
    far.write_text(FAR)
    assert main(["up", "--mode", mode, "-f", EXAMPLE, "-f", str(far), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    try:
        monitor = subprocess.Popen(
            [sys.executable, "-m", "svcbench", "monitor", "--run", run, "--duration", "8",
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)  # bcc compiles the program first
        for target in ("198.18.0.1:30082", "198.19.0.2:80"):
            done = _svcbench("probe", "--run", run, "--from", "external" if "30082" in target
                             else "pod/ns1/client", "--to", target, "--count", "2",
                             "--timeout", "0.3", "--json")
            assert done.returncode == 0, done.stderr
        out, err = monitor.communicate(timeout=60)
        assert monitor.returncode == 0, err
    finally:
        assert main(["down", "--run", run]) == 0
    drops = [json.loads(line) for line in out.splitlines()]
    local = [d for d in drops if d.get("service") == "ns1/far:http"]
    assert len(local) >= 2, drops
    assert local[0]["reason"] == "NETFILTER_DROP" and local[0]["where"] == "node/node1"
    assert local[0]["via"] == "NodePort" and local[0]["verdict"] == "drop"
    assert local[0]["dst"] == "198.18.0.1" and "SYN" in local[0]["tcp_flags"]
    empty = [d for d in drops if d.get("service") == "ns1/empty:http"]
    assert empty and empty[0]["verdict"] == "reject" and empty[0]["via"] == "ClusterIP"


@pytest.mark.parametrize("args, words", [
    (["monitor", "--type", "trace"], "--type"),
    (["monitor", "--duration", "0"], "--duration"),
])
def test_monitor_bad_flags(args, words):
    done = _svcbench(*args)
    assert done.returncode == 2 and words in done.stderr, done.stderr
