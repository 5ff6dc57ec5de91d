"""Health-check NodePorts (dataplanes/healthcheck.py): kube-proxy's service health server.

The answer's shape needs nothing; the server is checked with real sockets: a node namespace
holding it and an external client's namespace on a veth, as a load balancer would ask.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest

from clusters.nsenter import in_netns, pids_in_netns
from dataplanes import healthcheck
from dataplanes.healthcheck import http_get, response
from kube.model import Node, Pod, Service, ServicePort
from kube.state import ClusterState

NODES = (Node.numbered(1), Node.numbered(2))
EXTERNAL_CLIENT = "198.18.0.200"


def _parse(raw: bytes) -> tuple[str, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, json.loads(body) if body else {}


def test_response_is_kube_proxys_payload_and_status():
    """pkg/proxy/healthcheck TestServer: 200 with local endpoints, 503 without; the JSON
    payload and the headers a load balancer reads."""
    status, headers, body = _parse(response("ns1", "web", 3))
    assert status == "HTTP/1.1 200 OK"
    assert body == {"service": {"namespace": "ns1", "name": "web"}, "localEndpoints": 3,
                    "serviceProxyHealthy": True}
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "3"
    assert int(headers["Content-Length"]) == len(response("ns1", "web", 3).split(b"\r\n\r\n")[1])
    status, _, body = _parse(response("ns1", "web", 0))
    assert status == "HTTP/1.1 503 Service Unavailable" and body["localEndpoints"] == 0
    # An unhealthy proxy fails the check even with endpoints.
    status, _, body = _parse(response("ns1", "web", 3, healthy=False))
    assert status.startswith("HTTP/1.1 503") and body["serviceProxyHealthy"] is False
    head_only = response("ns1", "web", 3, head_only=True)
    assert head_only.endswith(b"\r\n\r\n") and b"localEndpoints" not in head_only


def _lb(name: str, **kw) -> Service:
    kw.setdefault("external_traffic_policy", "Local")
    return Service("ns1", name, (ServicePort(80, target_port=8080),), type="LoadBalancer",
                   selector={"app": name}, load_balancer_ips=("198.18.32.1",), **kw)


def _state(services, ready: bool = True) -> ClusterState:
    pods = [Pod("ns1", f"web-{i}", {"app": "web"}, "node1", ready=ready) for i in range(2)]
    pods.append(Pod("ns1", "db-0", {"app": "db"}, "node2"))
    return ClusterState.build(NODES, pods, services)


def test_table_takes_ports_and_counts_from_the_view():
    state = _state([_lb("web"), _lb("db"), _lb("cluster", external_traffic_policy="Cluster"),
                    Service("ns1", "np", (ServicePort(80),), type="NodePort")])
    web, db = state.service_obj("ns1", "web"), state.service_obj("ns1", "db")
    assert healthcheck.table(state.node_view("node1")) == {
        web.health_check_node_port: ("ns1", "web", 2),
        db.health_check_node_port: ("ns1", "db", 0),
    }
    assert healthcheck.table(state.node_view("node2")) == {
        web.health_check_node_port: ("ns1", "web", 0),
        db.health_check_node_port: ("ns1", "db", 1),
    }


# --------------------------------------------------------------------------- real sockets


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Node1:
    """The NodeHandle part the health server needs: a name, a namespace, `call`."""

    name: str
    netns: str
    ip: str

    def call(self, fn, *args, **kwargs):
        return in_netns(self.netns, fn, *args, **kwargs)


@dataclass
class Lab:
    node: Node1
    external: str

    def get(self, port: int, path: str = "/healthz"):
        """(status, body) of a GET from the external client, or the error's name."""
        try:
            status, _, body = in_netns(self.external, http_get, self.node.ip, port, 1.0, path)
        except OSError as exc:
            return type(exc).__name__
        return status, json.loads(body)


@pytest.fixture()
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    base = f"svb-t{secrets.token_hex(3)}"
    node_ns, ext_ns = f"{base}-hc", f"{base}-hc-ext"
    created = []
    try:
        for ns in (node_ns, ext_ns):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", node_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", ext_ns)
        ip("-n", node_ns, "addr", "add", f"{NODES[0].ip}/24", "dev", "eth0")
        ip("-n", ext_ns, "addr", "add", f"{EXTERNAL_CLIENT}/24", "dev", "eth0")
        for ns in (node_ns, ext_ns):
            ip("-n", ns, "link", "set", "eth0", "up")
        node = Node1("node1", node_ns, NODES[0].ip)
        yield Lab(node, ext_ns)
        healthcheck.uninstall(node)
    finally:
        for ns in created:
            for pid in pids_in_netns(ns):
                os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _pid_alive(pid: int) -> bool:
    return healthcheck._proc_start(pid) is not None


@pytest.mark.root
def test_server_opens_updates_and_closes_ports_as_syncs_say(lab):
    node = lab.node
    pid = healthcheck.install(node)
    assert pids_in_netns(node.netns) == [pid], "the server runs in the node's namespace"
    assert healthcheck.install(node) == pid, "a second install keeps the running server"
    state = _state([_lb("web"), _lb("db")])
    web = state.service_obj("ns1", "web").health_check_node_port
    db = state.service_obj("ns1", "db").health_check_node_port
    assert lab.get(web) == "ConnectionRefusedError", "nothing listens before a sync"

    reply = healthcheck.sync(node, state.node_view("node1"))
    assert reply["ok"] and reply["ports"] == sorted((web, db))
    payload = {"namespace": "ns1", "name": "web"}
    assert lab.get(web) == (200, {"service": payload, "localEndpoints": 2,
                                  "serviceProxyHealthy": True})
    assert lab.get(web, "/any/path?x=1")[0] == 200, "any request is answered"
    assert lab.get(db) == (503, {"service": {"namespace": "ns1", "name": "db"},
                                 "localEndpoints": 0, "serviceProxyHealthy": True})

    # Pods not ready: the same listener now fails the check.
    unready = _state([_lb("web"), _lb("db")], ready=False)
    healthcheck.sync(node, unready.node_view("node1"))
    assert lab.get(web) == (503, {"service": payload, "localEndpoints": 0,
                                  "serviceProxyHealthy": True})
    # A Service gone (or no longer Local): its port closes, the other stays.
    services = [_lb("web"), _lb("db", external_traffic_policy="Cluster")]
    cluster = ClusterState.build(NODES, state.pods, services, previous=state)
    assert cluster.service_obj("ns1", "db").health_check_node_port is None
    healthcheck.sync(node, cluster.node_view("node1"))
    assert lab.get(db) == "ConnectionRefusedError"
    assert lab.get(web)[0] == 200
    status = healthcheck.status(node)
    assert status["ports"] == {str(web): ["ns1", "web", 2]} and status["pid"] == pid

    healthcheck.uninstall(node)
    deadline = time.monotonic() + 5
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _pid_alive(pid) and pids_in_netns(node.netns) == []
    assert lab.get(web) == "ConnectionRefusedError"
    assert healthcheck.status(node) is None


@pytest.mark.root
def test_a_busy_port_is_retried_and_a_killed_server_restarted(lab):
    node = lab.node
    healthcheck.install(node)
    # No health-check port yet: a sync asks nothing of the fresh server.
    assert healthcheck.sync(node, _state([]).node_view("node1")).get("unchanged")
    state = _state([_lb("web")])
    view = state.node_view("node1")
    port = state.services[0].health_check_node_port

    def squat():
        s = socket.socket()
        s.bind(("0.0.0.0", port))
        s.listen(1)
        return s

    squatter = node.call(squat)
    try:
        reply = healthcheck.sync(node, view)
        assert not reply["ok"] and reply["ports"] == [], reply
        assert f"port {port}" in reply["errors"][0], reply  # reported, as kube-proxy does
    finally:
        squatter.close()
    reply = healthcheck.sync(node, view)  # the same table: tried again, not skipped
    assert reply["ok"] and reply["ports"] == [port], reply
    assert lab.get(port)[0] == 200
    assert healthcheck.sync(node, view).get("unchanged"), "an unchanged table needs no round trip"

    # Someone kills the server: the next sync, even with the same table, starts a new one.
    old = reply["pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _pid_alive(old) and time.monotonic() < deadline:
        time.sleep(0.02)
    reply = healthcheck.sync(node, view)
    assert reply["ok"] and reply["pid"] != old and not reply.get("unchanged"), reply
    assert lab.get(port)[0] == 200


@pytest.mark.root
def test_server_leaves_with_its_namespace(lab):
    node = lab.node
    pid = healthcheck.install(node)
    subprocess.run(["ip", "netns", "del", node.netns], check=True, timeout=30)
    deadline = time.monotonic() + 5
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(pid), "the health server outlived its network namespace"


@pytest.mark.root
def test_gc_kills_the_health_server_of_a_run():
    """`svcbench gc` finds a run's processes by its namespaces: the health server goes too."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    from clusters.netns import NetnsCluster, gc

    state_dir = tempfile.mkdtemp(prefix="svbh", dir="/tmp")  # short: Unix socket paths
    try:
        with NetnsCluster.create(1, state_dir=state_dir, agents=False) as cluster:
            node = cluster.nodes[0]
            pid = healthcheck.install(node)
            assert pid in pids_in_netns(node.netns)
            removed = gc(all_runs=True, state_dir=state_dir, run_ids=[cluster.run_id])
            assert any(f"killed pid {pid} in {node.netns}" in line for line in removed), removed
            assert not _pid_alive(pid)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
