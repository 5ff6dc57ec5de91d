"""Churn under load: pods and endpoints change 20 times through `svcbench apply`/`delete`
while two client pods open real connections to the Service without pause.

Kubernetes' order makes churn invisible to clients: a new pod answers before any rule
points at it; a leaving pod is taken out of every node's rules, the conntrack entries
towards it are cleared, and only then does its namespace go. Observable: no connection
opened after a change was applied fails, and while a pod is deleted a client loses at most
the one connection it had on that pod (each client has one connection open at a time).

The clients reuse a small pool of source ports, as a busy client's ephemeral ports come
round again: a conntrack entry left pointing at a gone pod would catch them. They run in
processes of their own: a process that forks (every apply runs iptables-restore) hands
its open sockets to the child until it execs, and a closed client socket that lives on
there makes the next connect from its port fail with EADDRNOTAVAIL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from clusters.nsenter import in_netns, run_in_netns
from clusters.workloads.probe import OK, TIMEOUT, tcp_sample
from svcbench.cli import main
from tests.test_cli import ROOT, _netns, svcbench

pytestmark = pytest.mark.root

VIP, PORT = "198.19.0.1", 80
CLIENTS = {"client-1": "node1", "client-2": "node2"}
SOURCE_PORTS = range(41000, 41064)
CONNECT_TIMEOUT_S = 1.0
QUIET_S = 0.5  # after each change: every connection opened now must succeed
FINAL_QUIET_S = 3.0
CYCLES = 5  # each: add a pod, take its endpoint out, put it back, delete the pod


def pod(name: str, node: str, app: str, port: bool = True) -> str:
    ports = "ports: [{name: http, containerPort: 8080}]" if port else ""
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ns1, "
            f"labels: {{app: {app}}}}}\nspec:\n  nodeName: {node}\n"
            f"  containers: [{{name: c{', ' + ports if ports else ''}}}]\n")


SERVICE = (
    "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns1}\n"
    f"spec: {{clusterIP: {VIP}, selector: {{app: web}}, "
    f"ports: [{{port: {PORT}, targetPort: http}}]}}\n"
)


@dataclass
class Connection:
    client: str
    start: float
    end: float
    outcome: str
    backend: str | None


@dataclass
class Change:
    kind: str  # add, endpoint-out, endpoint-in, delete
    start: float
    end: float


def steps(tmp_path) -> list[tuple[str, str, str]]:
    """(kind, verb, manifest path) for 20 changes."""
    out = []
    for i in range(CYCLES):
        name, node = f"churn-{i}", f"node{1 + i % 2}"
        web, idle = tmp_path / f"{name}-web.yaml", tmp_path / f"{name}-idle.yaml"
        web.write_text(pod(name, node, "web"))
        idle.write_text(pod(name, node, "idle"))
        out += [("add", "apply", str(web)), ("endpoint-out", "apply", str(idle)),
                ("endpoint-in", "apply", str(web)), ("delete", "delete", str(web))]
    return out


# One client: connections one after another until the stop file appears, one line each.
CLIENT = f"""
import json, os, sys, time
from clusters.nsenter import setns
from clusters.workloads.probe import tcp_sample
netns, stop, i = sys.argv[1], sys.argv[2], 0
setns(netns)
lines = []
while not os.path.exists(stop):
    start = time.monotonic()
    s = tcp_sample({VIP!r}, {PORT}, {CONNECT_TIMEOUT_S}, b"", {SOURCE_PORTS[0]} + i % {len(SOURCE_PORTS)})
    lines.append([start, time.monotonic(), s.outcome, s.backend])
    i += 1
json.dump(lines, sys.stdout)
"""


def start_client(netns: str, stop: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLIENT, netns, stop], cwd=ROOT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE)


def test_churn_under_load_fails_no_connection_opened_after_a_change(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("---\n".join(
        [SERVICE, pod("web-1", "node1", "web"), pod("web-2", "node2", "web")]
        + [pod(c, n, "client", port=False) for c, n in CLIENTS.items()]))
    up = svcbench("up", "--nodes", "2", "-f", str(base), "--json")
    assert up.returncode == 0, up.stderr
    run = json.loads(up.stdout)["run"]
    log: list[Connection] = []
    changes: list[Change] = []
    stop = tmp_path / "stop"
    clients = {}
    try:
        state = json.loads(open(f"/run/svcbench/runs/{run}/state.json").read())
        for client in CLIENTS:
            clients[client] = start_client(state["pods"][f"ns1/{client}"]["netns"], str(stop))
        time.sleep(QUIET_S + 1.0)  # the clients' interpreters start
        for kind, verb, path in steps(tmp_path):
            start = time.monotonic()
            assert main([verb, "--run", run, "-f", path]) == 0, capsys.readouterr().err
            changes.append(Change(kind, start, time.monotonic()))
            time.sleep(QUIET_S)
        time.sleep(FINAL_QUIET_S - QUIET_S)
    finally:
        stop.touch()
        for client, proc in clients.items():
            out, _ = proc.communicate(timeout=30)
            log += [Connection(client, *line) for line in json.loads(out or "[]")]
        down = svcbench("down", "--run", run)
    assert down.returncode == 0, down.stderr
    assert not [n for n in _netns() if n.startswith(f"svb-{run}-")]

    def during(c: Connection) -> list[Change]:
        return [ch for ch in changes if c.start < ch.end and c.end > ch.start]

    after = [c for c in log if not during(c)]
    failed_after = [c for c in after if c.outcome != OK]
    quiet_changes = [c for c in log if during(c) and all(ch.kind != "delete" for ch in during(c))]
    failed_quiet = [c for c in quiet_changes if c.outcome != OK]
    failed_deleting = [c for c in log if c.outcome != OK and c not in failed_after + failed_quiet]
    per_client_and_delete: dict[tuple[str, float], int] = {}
    for c in failed_deleting:
        for ch in during(c):
            if ch.kind == "delete":
                key = (c.client, ch.start)
                per_client_and_delete[key] = per_client_and_delete.get(key, 0) + 1
    seconds = sorted(round(ch.end - ch.start, 2) for ch in changes)
    with capsys.disabled():
        print(f"\nchurn: {len(changes)} changes (apply/delete median {seconds[len(seconds) // 2]} s, "
              f"max {seconds[-1]} s), "
              f"{len(log)} connections: {len(after)} opened after a change, {len(failed_after)} "
              f"failed; {len(quiet_changes)} during adds and endpoint changes, "
              f"{len(failed_quiet)} failed; {len(log) - len(after) - len(quiet_changes)} during "
              f"pod deletions, {len(failed_deleting)} failed")
    assert len(log) > 1000, "the clients hardly ran"
    assert {c.backend for c in after if c.outcome == OK} >= {"ns1/web-1", "ns1/web-2"}
    assert failed_after == [], failed_after[:5]
    assert failed_quiet == [], failed_quiet[:5]
    assert all(n <= 1 for n in per_client_and_delete.values()), per_client_and_delete
    # churn pods served while they were endpoints
    assert {f"ns1/churn-{i}" for i in range(CYCLES)} <= {c.backend for c in log}
    assert os.path.exists(f"/run/svcbench/runs/{run}") is False


def test_a_half_open_flow_to_a_deleted_pod_does_not_catch_its_client_port_again(tmp_path):
    """A SYN the gone pod never answered leaves a SYN_SENT entry, renewed by each new SYN on
    the same ports for 120 s: the delete clears it, so the port reaches a live pod at once."""
    base = tmp_path / "base.yaml"
    base.write_text("---\n".join([SERVICE, pod("web-1", "node2", "web"),
                                  pod("client-1", "node1", "client", port=False)]))
    web2 = tmp_path / "web-2.yaml"
    web2.write_text(pod("web-2", "node2", "web"))
    web1 = tmp_path / "web-1.yaml"
    web1.write_text(pod("web-1", "node2", "web"))
    up = svcbench("up", "--nodes", "2", "-f", str(base), "--json")
    assert up.returncode == 0, up.stderr
    run = json.loads(up.stdout)["run"]
    try:
        state = json.loads(open(f"/run/svcbench/runs/{run}/state.json").read())
        client, web1_netns = (state["pods"][f"ns1/{p}"]["netns"] for p in ("client-1", "web-1"))
        # web-1 stops answering new connections: the client's SYN is left half-open
        dropped = run_in_netns(web1_netns, ["iptables", "-A", "INPUT", "-p", "tcp", "--syn",
                                            "-j", "DROP"])
        assert dropped.returncode == 0, dropped.stderr
        port = SOURCE_PORTS[0]
        assert in_netns(client, tcp_sample, VIP, PORT, 0.3, b"", port).outcome == TIMEOUT
        assert main(["apply", "--run", run, "-f", str(web2)]) == 0
        assert main(["delete", "--run", run, "-f", str(web1)]) == 0
        again = in_netns(client, tcp_sample, VIP, PORT, 1.0, b"", port)
        assert (again.outcome, again.backend) == (OK, "ns1/web-2")
    finally:
        down = svcbench("down", "--run", run)
    assert down.returncode == 0, down.stderr
