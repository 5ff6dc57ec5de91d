"""The `svcbench` command at its edges: bad input is one sentence, exit 2, nothing created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNS = Path("/run/svcbench/runs")


def svcbench(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "svcbench", *args],
        input=input, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )


def assert_nothing_created(before_ns: set[str], before_runs: set[str]) -> None:
    """No run appeared, and no namespace outside a live run: other runs may come and go
    meanwhile (a developer's own clusters), so only what has no live owner counts."""
    new_runs = _runs() - before_runs
    owned = {f"svb-{run}-" for run in _runs()}
    leaked = {n for n in _netns() - before_ns if not any(n.startswith(p) for p in owned)}
    assert not leaked, leaked
    from clusters.netns import run_liveness

    for run in new_runs:
        # A concurrent run of someone else has a live owner; ours would be left by a
        # command that has exited (or gone meanwhile: no state left to read).
        try:
            state = json.loads((RUNS / run / "state.json").read_text())
        except (OSError, ValueError):
            continue
        live, why = run_liveness(state)
        assert live, f"run {run} was left behind: {why}"


def _netns() -> set[str]:
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith("svb-")}
    except FileNotFoundError:
        return set()


def _runs() -> set[str]:
    try:
        return set(os.listdir(RUNS))
    except FileNotFoundError:
        return set()


POD = """
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: ns1, labels: {app: web}}
spec:
  nodeName: node1
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
"""

BAD_INPUTS = {
    "malformed YAML": ("kind: Service\nmetadata: {name: [oops\n", ["bad.yaml:", "not valid YAML"]),
    "unknown kind": ("apiVersion: v1\nkind: Deployment\nmetadata: {name: d}\n", ["Deployment", "kind"]),
    "port out of range": (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns1}\n"
        "spec: {ports: [{port: 70000}]}\n",
        ["ns1/s", "spec.ports[0].port", "65535"],
    ),
    "duplicate object": (
        POD + "---" + POD,
        ["ns1/web-1", "may appear once"],
    ),
    "targetPort name no pod declares": (
        POD + """---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns1}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: nope}]
""",
        ["ns1/web", "targetPort", "nope"],
    ),
    "IP outside the Service CIDR": (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns1}\n"
        "spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n",
        ["ns1/s", "clusterIP", "198.19.0.0/16"],
    ),
    "NodePort clash": (
        """apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns1}
spec: {type: NodePort, ports: [{port: 80, nodePort: 30100}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: ns1}
spec: {type: NodePort, ports: [{port: 80, nodePort: 30100}]}
""",
        ["nodePort", "30100"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_manifest_is_one_sentence_exit_2_and_nothing_created(case, tmp_path):
    text, words = BAD_INPUTS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    before_ns, before_runs = _netns(), _runs()
    result = svcbench("up", "--nodes", "2", "-f", str(path))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert_nothing_created(before_ns, before_runs)


@pytest.mark.parametrize(
    "args, words",
    [
        (["up", "--nodes", "0"], ["--nodes", "1"]),
        (["up", "--mode", "bogus"], ["--mode", "iptables"]),
        (["bench", "--services", "10,abc"], ["--services", "comma-separated"]),
        (["bench", "--modes", "iptables,warp"], ["--modes", "iptables"]),
        (["probe", "--from", "external", "--to", "198.19.0.1"], ["--to", "IPv4:PORT"]),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(args, words):
    before_ns, before_runs = _netns(), _runs()
    result = svcbench(*args)
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr
    assert_nothing_created(before_ns, before_runs)


def test_render_names_chains_as_kube_proxy_does(tmp_path):
    path = tmp_path / "svc1.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: svc1, namespace: ns1}\n"
        "spec: {clusterIP: 198.19.0.5, ports: [{name: p80, port: 80, protocol: TCP}]}\n"
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
        "metadata: {name: svc1-a, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}\n"
        "addressType: IPv4\nports: [{name: p80, port: 8080, protocol: TCP}]\n"
        "endpoints: [{addresses: [198.18.129.7], nodeName: node1}]\n"
    )
    result = svcbench("render", "--mode", "iptables", "-f", str(path))
    assert result.returncode == 0, result.stderr
    assert ":KUBE-SVC-XPGD46QRK7WJZT7O" in result.stdout
    assert "-d 198.19.0.5/32" in result.stdout
    assert "--to-destination 198.18.129.7:8080" in result.stdout
    assert result.stdout.rstrip().endswith("COMMIT")


def test_help_everywhere():
    for cmd in ("doctor", "up", "apply", "delete", "render", "probe", "status", "down", "gc", "bench"):
        result = svcbench(cmd, "--help")
        assert result.returncode == 0 and "usage: svcbench " + cmd in result.stdout, cmd


def test_doctor_json_lists_every_check():
    import json

    result = svcbench("doctor", "--json")
    data = json.loads(result.stdout)
    names = {c["name"] for c in data["checks"]}
    assert {"ip", "iptables-nft", "pyroute2"} <= names
    assert result.returncode == (0 if data["ok"] else 1)
    for check in data["checks"]:
        assert check["present"] or check["fix"], check
