"""The network-namespace cluster: real namespaces, veths, routes, echo agents and TCP/UDP.

Every test cleans up after itself (fixtures destroy in `finally`), and the module checks
that the root network namespace is exactly as it was before.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from clusters.netns import (
    NETNS_PREFIX,
    ClusterError,
    CommandFailed,
    NetnsCluster,
    gc,
    list_netns,
    netns_add,
    process_alive,
)
from clusters.nsenter import in_netns, netns_inode, pids_in_netns
from clusters.safety import guard_root
from dataplanes.base import NodeHandle
from kube.model import PLAN, ContainerPort, Node, Pod
from kube.state import ClusterState

pytestmark = pytest.mark.root
REPO = str(Path(__file__).resolve().parents[1])
CONNECT_TIMEOUT_S = 3.0


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.fixture(scope="module")
def state_dir():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    # Short: agent control sockets live here and a Unix socket path is at most 107 bytes.
    path = tempfile.mkdtemp(prefix="svbt", dir="/tmp")
    try:
        yield path
    finally:
        gc(all_runs=True, state_dir=path, run_ids=os.listdir(path))
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def root_untouched(state_dir):
    links = _root_links()
    with guard_root():
        yield
    assert _root_links() == links


NODES = [Node.numbered(1), Node.numbered(2)]
PODS = [
    Pod("default", "a"),
    Pod("default", "b"),
    Pod("web", "c", ports=(ContainerPort(9000, "TCP"), ContainerPort(9001, "UDP"))),
    Pod("web", "d"),
]


@pytest.fixture(scope="module")
def cluster(state_dir):
    steps: list[str] = []
    c = NetnsCluster.create(2, state_dir=state_dir, progress=steps.append)
    try:
        state = ClusterState.build(NODES, PODS)
        c.set_pods(list(state.pods))
        c.test_state = state
        c.test_steps = steps
        yield c
    finally:
        c.destroy()


def ip_json(netns: str, *args: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def sysctl(netns: str, key: str) -> str:
    # Read through `ip netns exec`, a path independent of how the cluster wrote it.
    path = "/proc/sys/" + key.replace(".", "/")
    out = subprocess.run(["ip", "netns", "exec", netns, "cat", path], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def addrs(netns: str, dev: str) -> set[str]:
    return {
        f"{a['local']}/{a['prefixlen']}"
        for link in ip_json(netns, "-4", "addr", "show", "dev", dev)
        for a in link["addr_info"]
    }


def routes(netns: str) -> dict[str, dict]:
    return {r["dst"]: r for r in ip_json(netns, "-4", "route", "show")}


def listen(ip: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(8)
    sock.settimeout(CONNECT_TIMEOUT_S)
    return sock


def tcp_exchange(client_netns: str, server_netns: str, server_ip: str, port: int) -> tuple[str, str]:
    """Connect from one namespace to a listener in another; (address the server saw, echo)."""
    server = in_netns(server_netns, listen, "0.0.0.0", port)
    try:

        def connect() -> socket.socket:
            return socket.create_connection((server_ip, port), timeout=CONNECT_TIMEOUT_S)

        client = in_netns(client_netns, connect)
        with client:
            conn, peer = server.accept()
            with conn:
                client.sendall(b"ping")
                conn.sendall(conn.recv(16)[::-1])
                return peer[0], client.recv(16).decode()
    finally:
        server.close()


def echo_greeting(client_netns: str, ip: str, port: int = 8080) -> str:
    def fetch() -> str:
        with socket.create_connection((ip, port), timeout=CONNECT_TIMEOUT_S) as s:
            s.settimeout(CONNECT_TIMEOUT_S)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                buf += chunk
            return buf.decode().strip()

    return in_netns(client_netns, fetch)


def udp_echo(client_netns: str, ip: str, port: int) -> str:
    def ask() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(CONNECT_TIMEOUT_S)
            s.sendto(b"hello", (ip, port))
            return s.recv(512).decode()

    return in_netns(client_netns, ask)


def pod(cluster, key: str) -> Pod:
    ns, name = key.split("/")
    return cluster.test_state.pod(ns, name)


# --------------------------------------------------------------------------- layout


def test_state_file_records_a_ready_run(cluster, state_dir):
    with open(os.path.join(state_dir, cluster.run_id, "state.json")) as fh:
        state = json.load(fh)
    assert state["status"] == "ready"
    assert state["owner"]["pid"] == os.getpid()
    assert sorted(state["pods"]) == ["default/a", "default/b", "web/c", "web/d"]
    for node in state["nodes"]:
        assert process_alive(node["agent"]["pid"], node["agent"]["start"])
        assert node["agent"]["pid"] in pids_in_netns(node["netns"])
    expected = {f"{NETNS_PREFIX}{cluster.run_id}-{s}" for s in
                ("underlay", "external", "node1", "node2", "default.a", "default.b", "web.c", "web.d")}
    assert set(cluster.namespaces) == expected
    assert cluster.pod_netns("web", "c") == f"{NETNS_PREFIX}{cluster.run_id}-web.c"
    assert any("ready" in s for s in cluster.test_steps)
    assert set(state["namespaces"]) == expected - {f"{NETNS_PREFIX}{cluster.run_id}-{p}" for p in
                                                    ("default.a", "default.b", "web.c", "web.d")}


def test_nodes_have_uplink_and_routes_to_other_nodes(cluster):
    for node in cluster.nodes:
        assert node.uplink == "eth0" and node.ip == PLAN.node_ip(node.index)
        assert addrs(node.netns, "eth0") == {f"{node.ip}/24"}
        r = routes(node.netns)
        assert "default" not in r
        other = next(n for n in cluster.nodes if n is not node)
        assert r[other.pod_cidr]["gateway"] == other.ip and r[other.pod_cidr]["dev"] == "eth0"
        for cidr in (PLAN.service_cidr, PLAN.external_ip_cidr, PLAN.load_balancer_cidr):
            assert r[cidr]["dev"] == "eth0" and "gateway" not in r[cidr]
        lo = ip_json(node.netns, "link", "show", "lo")[0]
        assert "UP" in lo["flags"]
        # IPv4 only: no IPv6 autoconf noise on the uplink.
        assert ip_json(node.netns, "-6", "addr", "show", "dev", "eth0") in ([], [{}])


def test_pods_are_routed_through_a_veth_per_pod(cluster):
    for p in cluster.test_state.pods:
        node = cluster.node(p.node_name)
        netns = cluster.pod_netns(p.namespace, p.name)
        assert addrs(netns, "eth0") == {f"{p.ip}/32"}
        default = routes(netns)["default"]
        assert default["gateway"] == PLAN.pod_gateway and "onlink" in default["flags"]
        veth = node.pod_interfaces()[p.ip]
        assert veth.startswith("pv") and len(veth) <= 15
        assert addrs(node.netns, veth) == {f"{PLAN.pod_gateway}/32"}
        assert routes(node.netns)[p.ip]["dev"] == veth
        assert sysctl(node.netns, f"net.ipv4.conf.{veth}.proxy_arp") == "1"
        assert sysctl(node.netns, f"net.ipv4.conf.{veth}.rp_filter") == "0"
    assert set(cluster.node("node1").pod_interfaces()) == {
        p.ip for p in cluster.test_state.pods if p.node_name == "node1"
    }


def test_underlay_bridge_and_external_client(cluster):
    ports = {link["ifname"]: link.get("master") for link in ip_json(cluster.underlay_netns, "link")}
    assert ports["br0"] is None
    assert {name for name, master in ports.items() if master == "br0"} == {"node1", "node2", "external"}
    assert addrs(cluster.external_netns, "eth0") == {f"{PLAN.external_client_ip}/24"}
    r = routes(cluster.external_netns)
    for cidr in (PLAN.external_ip_cidr, PLAN.load_balancer_cidr):
        assert r[cidr]["gateway"] == cluster.node("node1").ip
    assert "default" not in r


def test_sysctls_land_in_each_namespace(cluster):
    root_forward = open("/proc/sys/net/ipv4/ip_forward").read().strip()
    for node in cluster.nodes:
        assert sysctl(node.netns, "net.ipv4.ip_forward") == "1"
        for conf in ("all", "default", "eth0"):
            assert sysctl(node.netns, f"net.ipv4.conf.{conf}.rp_filter") == "0"
    if os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
        assert sysctl(cluster.underlay_netns, "net.bridge.bridge-nf-call-iptables") == "0"
    # The root namespace keeps its own values (guard_root checks the rest).
    assert open("/proc/sys/net/ipv4/ip_forward").read().strip() == root_forward


def test_only_pods_have_a_default_route_and_nothing_leaves_the_sandbox(cluster):
    sandbox = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("169.254.0.0/16")]
    pod_netns = {r.netns for r in cluster.pods.values()}
    for netns in cluster.namespaces:
        for r in ip_json(netns, "-4", "route", "show", "table", "all"):
            if r.get("type") in ("local", "broadcast") or r["dst"].startswith("127."):
                continue
            if r["dst"] == "default":
                assert netns in pod_netns and r["gateway"] == PLAN.pod_gateway, (netns, r)
                continue
            net = ipaddress.ip_network(r["dst"], strict=False)
            assert any(net.subnet_of(s) for s in sandbox), (netns, r)


# --------------------------------------------------------------------------- traffic


def test_pod_to_pod_across_nodes_without_nat(cluster):
    a, c = pod(cluster, "default/a"), pod(cluster, "web/c")
    b = next(p for p in cluster.test_state.pods if p.node_name != a.node_name)
    seen, echoed = tcp_exchange(
        cluster.pod_netns(a.namespace, a.name), cluster.pod_netns(b.namespace, b.name), b.ip, 7001
    )
    assert seen == a.ip and echoed == "gnip"
    assert {a.node_name, b.node_name} == {"node1", "node2"} and c.ip


def test_pod_to_node_and_node_to_pod(cluster):
    a = pod(cluster, "default/a")
    own = cluster.node(a.node_name)
    other = next(n for n in cluster.nodes if n is not own)
    pod_ns = cluster.pod_netns(a.namespace, a.name)
    for node in (own, other):
        seen, _ = tcp_exchange(pod_ns, node.netns, node.ip, 7002)
        assert seen == a.ip
    seen, _ = tcp_exchange(other.netns, pod_ns, a.ip, 7003)
    assert seen == other.ip


def test_external_client_reaches_node_ips_only(cluster):
    for node in cluster.nodes:
        seen, _ = tcp_exchange(cluster.external_netns, node.netns, node.ip, 7004)
        assert seen == PLAN.external_client_ip

    def connect(ip: str) -> None:
        socket.create_connection((ip, 8080), timeout=CONNECT_TIMEOUT_S).close()

    with pytest.raises(OSError):  # no route: pod IPs are not reachable from outside
        in_netns(cluster.external_netns, connect, pod(cluster, "default/a").ip)


def test_echo_agents_serve_every_pod(cluster):
    client = pod(cluster, "default/a")
    client_ns = cluster.pod_netns(client.namespace, client.name)
    for p in cluster.test_state.pods:
        for cp in p.backend_ports():
            if cp.protocol == "TCP":
                greeting = echo_greeting(client_ns, p.ip, cp.port)
            else:
                greeting = udp_echo(client_ns, p.ip, cp.port).splitlines()[0]
            name, peer = greeting.split()
            assert name == f"{p.namespace}/{p.name}" and peer.split(":")[0] == client.ip


def test_host_ports_answer_on_node_addresses_until_removed(cluster):
    client = pod(cluster, "default/a")
    client_ns = cluster.pod_netns(client.namespace, client.name)
    try:
        cluster.set_host_ports([(8082, "TCP"), (8082, "UDP")])
        cluster.set_pods(list(cluster.test_state.pods))  # converging pods keeps them
        for node in cluster.nodes:
            name, peer = echo_greeting(client_ns, node.ip, 8082).split()
            assert name == f"node/{node.name}" and peer.split(":")[0] == client.ip
            assert udp_echo(client_ns, node.ip, 8082).startswith(f"node/{node.name} ")
    finally:
        cluster.set_host_ports([])
    with pytest.raises(ConnectionRefusedError):
        echo_greeting(client_ns, cluster.nodes[0].ip, 8082)


def test_node_run_and_call(cluster):
    node = cluster.node("node2")
    assert isinstance(node, NodeHandle)
    assert node.ip in node.run(["ip", "-o", "addr", "show", "eth0"]).stdout
    assert node.run(["cat"], input="hello").stdout == "hello"
    assert node.run(["cat"], input=b"bytes").stdout == "bytes"
    assert node.run(["false"], check=False).returncode == 1
    with pytest.raises(CommandFailed) as err:
        node.run(["ip", "link", "show", "nosuchdev"])
    assert node.netns in str(err.value) and "nosuchdev" in str(err.value)
    assert isinstance(err.value, subprocess.CalledProcessError)
    inode = node.call(lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inode == netns_inode(node.netns) != os.stat("/proc/self/ns/net").st_ino


# --------------------------------------------------------------------------- changes


def test_set_pods_adds_and_removes(cluster):
    original = cluster.test_state
    keep = [p for p in PODS if p.key != ("default", "a")]
    changed = ClusterState.build(NODES, keep + [Pod("default", "e")], previous=original)
    a, e = original.pod("default", "a"), changed.pod("default", "e")
    # The scheduler puts e where a was and hands it a's IP: the reuse must work at once.
    assert (e.node_name, e.ip) == (a.node_name, a.ip)
    a_ns, node = cluster.pod_netns("default", "a"), cluster.node(a.node_name)
    a_veth = node.pod_interfaces()[a.ip]
    try:
        cluster.set_pods(list(changed.pods))
        assert a_ns not in list_netns()
        with pytest.raises(KeyError):
            cluster.pod_netns("default", "a")
        e_veth = node.pod_interfaces()[e.ip]
        assert e_veth != a_veth
        assert a_veth not in {link["ifname"] for link in ip_json(node.netns, "link")}
        assert routes(node.netns)[e.ip]["dev"] == e_veth
        client = changed.pod("web", "d")
        name, peer = echo_greeting(cluster.pod_netns("web", "d"), e.ip).split()
        assert name == "default/e" and peer.startswith(client.ip + ":")
    finally:
        cluster.set_pods(list(original.pods))
    assert "default/e" not in cluster.pods
    b = original.pod("default", "b")
    assert echo_greeting(cluster.pod_netns("default", "b"), a.ip).startswith("default/a ")
    assert echo_greeting(cluster.pod_netns("default", "a"), b.ip).startswith("default/b ")


def test_attach_sees_the_same_run(cluster, state_dir):
    cluster.meta["mode"] = "iptables"
    cluster.save()
    again = NetnsCluster.attach(cluster.run_id, state_dir=state_dir)
    assert [n.name for n in again.nodes] == ["node1", "node2"]
    assert again.meta == {"mode": "iptables"}
    assert again.node("node1").pod_interfaces() == cluster.node("node1").pod_interfaces()
    assert again.pod_netns("web", "c") == cluster.pod_netns("web", "c")
    assert again.agent("node1").ping()
    only = NetnsCluster.attach(state_dir=state_dir)
    assert only.run_id == cluster.run_id
    with pytest.raises(ClusterError, match=cluster.run_id):
        NetnsCluster.attach("abcdef", state_dir=state_dir)
    with again:
        pass  # an attached run belongs to its creator: leaving the block keeps it
    assert again.agent("node1").ping()


def test_destroy_removes_everything_and_is_idempotent(state_dir):
    with NetnsCluster.create(1, state_dir=state_dir) as c:
        c.set_pods([Pod("default", "x", node_name="node1", ip=PLAN.pod_ip(1, 0))])
        agent = c.state["nodes"][0]["agent"]
        run_dir = c.run_dir
        assert len(c.namespaces) == 4
    assert not [n for n in list_netns() if n.startswith(f"{NETNS_PREFIX}{c.run_id}-")]
    assert not os.path.exists(run_dir)
    assert not process_alive(agent["pid"], agent["start"])
    assert c.destroy() == []


def test_keep_leaves_the_run_until_destroy(state_dir):
    with NetnsCluster.create(1, state_dir=state_dir, agents=False) as c:
        c.keep()
    try:
        assert len(c.namespaces) == 3
        assert NetnsCluster.attach(c.run_id, state_dir=state_dir).run_id == c.run_id
    finally:
        c.destroy()
    assert c.namespaces == []


def test_failed_create_leaves_nothing(state_dir):
    made: list[str] = []

    def fail_at_node2(msg: str) -> None:
        made.append(msg)
        if "node2" in msg:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        NetnsCluster.create(2, run_id="fa11ed", state_dir=state_dir, progress=fail_at_node2)
    assert any("node1" in m for m in made)
    assert list_netns(f"{NETNS_PREFIX}fa11ed-") == []
    assert not os.path.exists(os.path.join(state_dir, "fa11ed"))
    with pytest.raises(ValueError, match="6 lowercase hex"):
        NetnsCluster.create(1, run_id="NOPE", state_dir=state_dir)


# --------------------------------------------------------------------------- gc


def _creator(run_id: str, state_dir: str, pause_at: str | None) -> subprocess.Popen:
    """A separate process that creates a run, optionally pausing at a progress step."""
    code = f"""
import sys
from clusters.netns import NetnsCluster
def progress(msg):
    print(msg, flush=True)
    if {pause_at!r} and {pause_at!r} in msg:
        sys.stdin.readline()
NetnsCluster.create(2, run_id={run_id!r}, state_dir={state_dir!r}, progress=progress).keep()
print("created", flush=True)
"""
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def _read_until(proc: subprocess.Popen, needle: str) -> None:
    for line in proc.stdout:
        if needle in line:
            return
    raise AssertionError(f"creator exited before {needle!r}: {proc.stderr.read()}")


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_gc_removes_a_run_whose_creator_was_killed(state_dir):
    run_id = "dead01"
    proc = _creator(run_id, state_dir, pause_at="external client")
    try:
        _read_until(proc, "external client")
        node1 = f"{NETNS_PREFIX}{run_id}-node1"
        _wait_for(lambda: len(pids_in_netns(node1)) == 1)  # node1's echo agent is up
        agent = pids_in_netns(node1)[0]
        assert gc(state_dir=state_dir, run_ids=[run_id]) == []  # creating, owner alive
        proc.kill()
        proc.wait(timeout=10)
        removed = gc(state_dir=state_dir, run_ids=[run_id])
    finally:
        proc.kill()
        proc.wait(timeout=10)
        gc(all_runs=True, state_dir=state_dir, run_ids=[run_id])
    assert any("owner pid" in line for line in removed)
    assert any("killed" in line and str(agent) in line for line in removed)
    assert any(f"deleted netns {node1}" in line for line in removed)
    assert list_netns(f"{NETNS_PREFIX}{run_id}-") == []
    assert not os.path.exists(os.path.join(state_dir, run_id))
    assert not process_alive(agent)


def test_gc_keeps_a_ready_run_until_an_agent_dies(state_dir):
    run_id = "dead02"
    proc = _creator(run_id, state_dir, pause_at=None)
    try:
        _read_until(proc, "created")
        assert proc.wait(timeout=10) == 0
        assert gc(state_dir=state_dir, run_ids=[run_id]) == []  # ready: agents alive
        run = NetnsCluster.attach(run_id, state_dir=state_dir)
        agents = [n["agent"]["pid"] for n in run.state["nodes"]]
        os.kill(agents[0], signal.SIGKILL)
        _wait_for(lambda: not process_alive(agents[0]))
        removed = gc(state_dir=state_dir, run_ids=[run_id])
    finally:
        gc(all_runs=True, state_dir=state_dir, run_ids=[run_id])
    assert any("echo agent of node1" in line and "gone" in line for line in removed)
    assert list_netns(f"{NETNS_PREFIX}{run_id}-") == []
    assert not process_alive(agents[1])
    assert not os.path.exists(os.path.join(state_dir, run_id))


def test_gc_removes_orphan_namespaces_and_their_processes(state_dir):
    orphan = f"{NETNS_PREFIX}0ff0ff-node1"
    netns_add(orphan)
    sleeper = subprocess.Popen(["ip", "netns", "exec", orphan, "sleep", "30"])
    try:
        _wait_for(lambda: sleeper.pid in pids_in_netns(orphan))
        removed = gc(state_dir=state_dir, run_ids=["0ff0ff"])
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
        gc(state_dir=state_dir, run_ids=["0ff0ff"])
    assert orphan not in list_netns()
    assert any(orphan in line and "deleted" in line for line in removed)
    assert any(str(sleeper.pid) in line for line in removed)
