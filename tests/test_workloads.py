"""The echo agent and the client probe against real namespaces, sockets and traffic.

Layout: an agent namespace holding only the agent process, a pod namespace it serves, and
a client namespace joined to the pod by a veth (198.18.250.0/24). The veth is created from
inside the pod namespace with its peer placed straight into the client namespace.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusters.nsenter import in_netns
from clusters.workloads.echo import AgentClient, AgentError, BackendSpec, spawn_agent
from clusters.workloads.probe import ProbeResult, Sample, probe

POD_IP = "198.18.250.1"
CLIENT_IP = "198.18.250.2"
WEB = "default/web-0"
DROPPED_PORT = 9090  # an iptables DROP rule in the pod namespace swallows it
CLOSED_PORT = 9091  # nothing listens


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_exited(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _exited(pid):
            return True
        time.sleep(0.05)
    return _exited(pid)


@dataclass
class Lab:
    run: str
    agent_ns: str
    pod_ns: str
    client_ns: str
    control: str
    log: str
    pid: int
    tmp: Path

    @property
    def agent(self) -> AgentClient:
        return AgentClient(self.control)

    def probe(self, ip: str, port: int, **kwargs) -> ProbeResult:
        return in_netns(self.client_ns, probe, ip, port, **kwargs)

    def web(self, *extra: tuple[int, str]) -> list[BackendSpec]:
        return [BackendSpec(WEB, self.pod_ns, POD_IP, [(8080, "TCP"), (8080, "UDP"), *extra])]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _require_root()
    run = f"svb-t{secrets.token_hex(3)}"
    names = [f"{run}-agent", f"{run}-pod", f"{run}-cli"]
    tmp = tmp_path_factory.mktemp("workloads")
    pid = None
    try:
        for ns in names:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        agent_ns, pod_ns, client_ns = names
        _ip("-n", pod_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", client_ns)
        for ns, addr in ((pod_ns, POD_IP), (client_ns, CLIENT_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        for proto in ("tcp", "udp"):
            subprocess.run(["ip", "netns", "exec", pod_ns, "iptables", "-w", "-A", "INPUT", "-p",
                            proto, "--dport", str(DROPPED_PORT), "-j", "DROP"], check=True)
        control, log = str(tmp / "agent.sock"), str(tmp / "agent.log")
        pid = spawn_agent(agent_ns, control, log)
        lab = Lab(run, agent_ns, pod_ns, client_ns, control, log, pid, tmp)
        lab.agent.set_backends(lab.web())
        yield lab
    finally:
        try:
            if pid is not None:
                AgentClient(str(tmp / "agent.sock")).stop()
        finally:
            for ns in names:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert pid is None or _wait_exited(pid, 5), "the echo agent outlived its namespaces"


# ---- the echo backend's wire protocol, seen from a client in another namespace ----


@pytest.mark.root
def test_tcp_greeting_names_pod_and_the_client_address_it_saw(lab):
    sample = lab.probe(POD_IP, 8080, source_port=41234).samples[0]
    assert (sample.outcome, sample.backend, sample.seen_client) == ("ok", WEB, f"{CLIENT_IP}:41234")
    assert sample.latency_us > 0


@pytest.mark.root
@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
@pytest.mark.parametrize("size", [2000, 9000])
def test_payload_round_trips_intact(lab, protocol, size):
    payload = os.urandom(size)  # random bytes include newlines, which must not confuse parsing
    result = lab.probe(POD_IP, 8080, protocol=protocol, payload=payload, count=3)
    assert [s.outcome for s in result.samples] == ["ok"] * 3
    assert {s.backend for s in result.samples} == {WEB}
    assert {s.seen_client.split(":")[0] for s in result.samples} == {CLIENT_IP}


@pytest.mark.root
def test_tcp_payload_larger_than_socket_buffers_round_trips(lab):
    payload = os.urandom(16 << 20)
    assert lab.probe(POD_IP, 8080, payload=payload, timeout=10.0).samples[0].outcome == "ok"


@pytest.mark.root
def test_udp_fixed_source_port_is_what_the_backend_sees(lab):
    result = lab.probe(POD_IP, 8080, protocol="UDP", source_port=42000, count=3)
    assert {(s.outcome, s.seen_client) for s in result.samples} == {("ok", f"{CLIENT_IP}:42000")}


@pytest.mark.root
@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_closed_port_is_refused_quickly(lab, protocol):
    sample = lab.probe(POD_IP, CLOSED_PORT, protocol=protocol, timeout=3.0).samples[0]
    assert sample.outcome == "refused"
    assert sample.latency_us < 1_000_000, "a refusal must not wait for the timeout"


@pytest.mark.root
@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_dropped_port_times_out_after_the_timeout(lab, protocol):
    started = time.monotonic()
    sample = lab.probe(POD_IP, DROPPED_PORT, protocol=protocol, timeout=0.4).samples[0]
    elapsed = time.monotonic() - started
    assert sample.outcome == "timeout"
    assert 0.35 <= elapsed < 2.0
    assert 350_000 <= sample.latency_us < 2_000_000


@pytest.mark.root
def test_no_route_is_unreachable(lab):
    _ip("-n", lab.client_ns, "route", "add", "unreachable", "198.18.251.0/24")
    assert lab.probe("198.18.251.1", 80).samples[0].outcome == "unreachable"  # EHOSTUNREACH
    assert lab.probe("198.18.252.1", 80).samples[0].outcome == "unreachable"  # ENETUNREACH


@pytest.mark.root
def test_close_before_greeting_is_reset(lab):
    # a listener that accepts and hangs up without a word: not an echo backend
    def listen() -> socket.socket:
        sock = socket.socket()
        sock.bind((POD_IP, 9092))
        sock.listen(4)
        return sock

    server = in_netns(lab.pod_ns, listen)
    server.settimeout(3)

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        assert lab.probe(POD_IP, 9092, timeout=2.0).samples[0].outcome == "reset"
    finally:
        thread.join()
        server.close()


# ---- the agent's control protocol ----


@pytest.mark.root
def test_set_backends_adds_and_removes_listeners_and_keeps_the_rest(lab):
    agent = lab.agent
    assert lab.probe(POD_IP, 8081).samples[0].outcome == "refused"
    held = in_netns(lab.client_ns, socket.create_connection, (POD_IP, 8080), 2)
    try:
        assert held.recv(100).startswith(WEB.encode())
        reply = agent.set_backends(lab.web((8081, "TCP")))
        assert (reply["listening"], reply["opened"], reply["closed"]) == (3, 1, 0)
        assert lab.probe(POD_IP, 8081).samples[0].backend == WEB

        reply = agent.set_backends(lab.web())
        assert (reply["listening"], reply["opened"], reply["closed"]) == (2, 0, 1)
        assert lab.probe(POD_IP, 8081).samples[0].outcome == "refused"
        assert lab.probe(POD_IP, 8080).samples[0].outcome == "ok"
        held.sendall(b"still here")  # the untouched 8080 listener's connection lives on
        assert held.recv(100) == b"still here"
    finally:
        held.close()
        agent.set_backends(lab.web())


@pytest.mark.root
def test_set_backends_names_the_pod_it_could_not_serve(lab):
    gone = BackendSpec("default/ghost", f"{lab.run}-missing", "198.18.250.9", [(8080, "TCP")])
    with pytest.raises(AgentError, match="default/ghost"):
        lab.agent.set_backends([*lab.web(), gone])
    assert lab.probe(POD_IP, 8080).samples[0].outcome == "ok"
    assert lab.agent.request({"op": "bogus"})["ok"] is False


@pytest.mark.root
def test_stats_count_connections_and_datagrams_per_pod(lab):
    before = lab.agent.stats()["pods"][WEB]
    lab.probe(POD_IP, 8080, count=5)
    lab.probe(POD_IP, 8080, protocol="UDP", count=3)
    after = lab.agent.stats()["pods"][WEB]
    assert after["connections"] - before["connections"] == 5
    assert after["datagrams"] - before["datagrams"] == 3
    assert after["active"] == 0


@pytest.mark.root
def test_thousands_of_sequential_probes_do_not_exhaust_ephemeral_ports(lab):
    # 1,000 ephemeral ports: TIME_WAIT sockets would run out after the first thousand
    def narrow() -> None:
        with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as fh:
            fh.write("40000 40999")

    in_netns(lab.client_ns, narrow)
    result = lab.probe(POD_IP, 8080, count=3000, timeout=2.0)
    summary = result.summary()
    assert summary["outcomes"] == {"ok": 3000}
    assert {int(s.seen_client.split(":")[1]) // 1000 for s in result.samples} == {40}
    assert summary["p50_us"] <= summary["p90_us"] <= summary["p99_us"]


# ---- the agent's lifetime ----


@pytest.mark.root
def test_agent_exits_on_netns_deletion_sigterm_and_stop(tmp_path):
    _require_root()
    run = f"svb-t{secrets.token_hex(3)}"
    names = [f"{run}-{how}" for how in ("gone", "term", "stop")]
    try:
        pids = {}
        for ns in names:
            _ip("netns", "add", ns)
            pids[ns] = spawn_agent(ns, str(tmp_path / f"{ns}.sock"), str(tmp_path / f"{ns}.log"))
        gone, term, stop = names
        _ip("netns", "del", gone)
        os.kill(pids[term], signal.SIGTERM)
        AgentClient(str(tmp_path / f"{stop}.sock")).stop()
        for ns in names:
            assert _wait_exited(pids[ns], 4.0), f"agent in {ns} still runs"
            assert not (tmp_path / f"{ns}.sock").exists()
        assert "was deleted" in (tmp_path / f"{gone}.log").read_text()
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.root
def test_spawn_agent_reports_why_it_failed(tmp_path):
    _require_root()
    with pytest.raises(AgentError, match="exited with status"):
        spawn_agent(f"svb-t{secrets.token_hex(3)}-absent", str(tmp_path / "a.sock"),
                    str(tmp_path / "a.log"))


# ---- without root: the summary and the backend spec ----


def test_summary_counts_outcomes_backends_and_percentiles_over_ok_samples():
    samples = [Sample(float(v), "ok", "default/a" if v % 2 else "default/b", "198.18.0.2:1")
               for v in range(1, 101)]
    samples += [Sample(5_000_000.0, "timeout", None, None), Sample(10.0, "refused", None, None)]
    summary = ProbeResult("198.19.0.1:80", "TCP", samples).summary()
    assert summary["count"] == 102
    assert summary["outcomes"] == {"ok": 100, "timeout": 1, "refused": 1}
    assert summary["backends"] == {"default/a": 50, "default/b": 50}
    assert summary["p50_us"] == pytest.approx(50.5)
    assert summary["p90_us"] == pytest.approx(90.1)
    assert summary["p99_us"] == pytest.approx(99.01)
    empty = ProbeResult("198.19.0.1:80", "UDP", [Sample(3.0, "refused", None, None)])
    assert empty.summary()["p50_us"] is None
    assert empty.to_json()["samples"][0]["outcome"] == "refused"


def test_backend_spec_rejects_bad_ports_and_protocols():
    spec = BackendSpec(WEB, "svb-x-pod", POD_IP, [(8080, "TCP"), (53, "UDP")])
    assert BackendSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="SCTP"):
        BackendSpec.from_json({**spec.to_json(), "ports": [[80, "SCTP"]]})
    with pytest.raises(ValueError, match="1-65535"):
        BackendSpec.from_json({**spec.to_json(), "ports": [[0, "TCP"]]})
    with pytest.raises(ValueError, match="probe protocol"):
        probe(POD_IP, 80, protocol="SCTP")
