"""`svcbench monitor --type drop` and `svcbench status` on a real cluster of every mode.

A packet sent from the external client to a node's NodePort of a Service whose endpoints
are all on the other node, under externalTrafficPolicy Local, is dropped by that node; the
monitor shows the drop with its reason (the kernel's NETFILTER_DROP in the netfilter
modes, XDP:NO_LOCAL_ENDPOINT reported by the ebpf mode's XDP program) and the Service's
name, and says the view wants that drop. A SYN to a Service with no endpoints shows as
rejected. The userspace proxy's own refusals (a Service whose endpoints do not listen)
show as PROXY:ALL_BACKENDS_FAILED. `status --json` in the same cluster reports per node
what the mode holds there, checked against the kernel. IPVS runs only in the guest
kernel, which cannot run the drop monitor (see `_guest_monitor_problem`); its `summary`
is checked in tests/test_ipvs.py's guest tests. Bad flags: one sentence, exit 2."""

from __future__ import annotations

import gzip
import json
import select
import signal
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


DEAF = """
---
apiVersion: v1
kind: Service
metadata: {name: deaf, namespace: ns1}
spec:
  clusterIP: 198.19.0.9
  selector: {app: far}
  ports:
    - {name: http, port: 80, targetPort: 9999, protocol: TCP}
"""
# What drops the Local policy's packet in each mode (the kernel's reason, or the mode's).
LOCAL_DROP = {"iptables": "NETFILTER_DROP", "nftables": "NETFILTER_DROP", "ipvs": "NETFILTER_DROP",
              "userspace": "NETFILTER_DROP", "ebpf": "XDP:NO_LOCAL_ENDPOINT"}
EMPTY_REJECT = {"iptables": "NETFILTER_DROP", "nftables": "NETFILTER_DROP",
                "ipvs": "NETFILTER_DROP", "userspace": "NETFILTER_DROP",
                "ebpf": "XDP:NO_ENDPOINT"}
UML_CONFIG = "/usr/share/doc/user-mode-linux/config.gz"  # Debian's guest kernel's .config


def _svcbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "svcbench", *args], capture_output=True,
                          text=True, timeout=120)


def _guest_monitor_problem() -> str:
    """Why the drop monitor cannot run in the UML guest kernel, from its build config."""
    try:
        with gzip.open(UML_CONFIG, "rt") as fh:
            config = {line.split("=", 1)[0] for line in fh if line.startswith("CONFIG_")}
    except OSError as exc:
        return f"no guest kernel config to check ({exc})"
    needs = {
        "CONFIG_FTRACE": "no tracefs events, so no skb:kfree_skb tracepoint to attach to",
        "CONFIG_PERF_EVENTS": "perf_event_open, through which tracepoint programs attach, "
                              "answers ENOSYS",
        "CONFIG_DEBUG_INFO_BTF": "no /sys/kernel/btf/vmlinux for the sk_buff offsets",
    }
    missing = [f"{option} ({why})" for option, why in needs.items() if option not in config]
    if not missing:
        return ("the guest kernel has what the monitor needs; running it there is not wired "
                "into this test")
    return ("Debian's User-Mode-Linux guest kernel is built without " + ", ".join(missing)
            + "; kernel headers cannot add those (only a rebuilt guest kernel could)")


def _json_main(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def _wait_watching(monitor: subprocess.Popen, timeout: float = 90.0) -> None:
    """Until the monitor says it watches (bcc compiled and attached its program)."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([monitor.stderr], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = monitor.stderr.readline()
        if not line:
            break
        seen += line
        if line.startswith("watching "):
            return
    monitor.kill()
    pytest.fail(f"the monitor never said it was watching: {seen!r}")


def _check_status(mode: str, data: dict) -> None:
    """`status --json`: the run's mode, every node's agent and last sync, and what the mode
    holds there, compared with the kernel where a count can be read independently."""
    assert data["mode"] == mode and len(data["nodes"]) == 2
    for node in data["nodes"]:
        s = node["dataplane"]
        assert node["echo_agent"] == "running" and node["last_sync"]["seconds"] > 0, node
        assert node["echo"]["listening"] > 0 and node["echo"]["pods"] >= 2, node
        assert "error" not in s, s
        assert s["health_server"]["running"] and s["health_server"]["pid"], s
        netns = node["netns"]
        if mode == "iptables":
            saved = subprocess.run(["ip", "netns", "exec", netns, "iptables-save"],
                                   capture_output=True, text=True, check=True).stdout
            assert s["chains"] == saved.count("\n:KUBE-"), s
            assert s["rules"] == saved.count("\n-A KUBE-"), s
            assert s["service_chains"] >= 4 and s["jumps"] >= 2, s
            assert s["options"] == {"backend": data["backend"] or "nft"}  # nft by default
        elif mode == "nftables":
            listed = json.loads(subprocess.run(
                ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "ip",
                 "kube-proxy"], capture_output=True, text=True, check=True).stdout)
            rules = sum(1 for item in listed["nftables"] if "rule" in item)
            assert s["table"] == "ip kube-proxy" and s["rules"] == rules > 0, s
            assert s["elements"] > 0 and s["chains"] > 0, s
        elif mode == "ebpf":
            from dataplanes.ebpf import HOST_LINK

            assert s["loaded"] and s["xdp"]["eth0"] == "svb_xdp_host", s
            assert s["xdp"][HOST_LINK + "-xdp"] == "svb_xdp_lxc" and s["socket_hooks"] == 4, s
            assert 0 < s["maps"]["lb4_services"]["entries"] < s["maps"]["lb4_services"]["max"]
            assert s["maps"]["node_config"] == {"entries": 1, "max": 1}, s
        elif mode == "userspace":
            p = s["proxy"]
            assert p["running"] and p["services"] == node["service_ports"], s
            assert p["tables"] >= 1 and s["rules"] > 0 and s["ipsets"] > 0, s
            assert Path(f"/proc/{p['pid']}").exists()


@pytest.mark.parametrize("mode", ["iptables", "nftables", "ebpf", "userspace", "ipvs"])
def test_monitor_shows_a_local_policy_drop_with_reason_and_service(mode, tmp_path, capsys):
    from dataplanes.base import Host
    from dataplanes.modes import make

    missing = make(mode).missing(Host())
    if mode == "ipvs" and missing:
        # Where the host kernel has ip_vs (CI runners), IPVS is monitored on the host.
        pytest.skip("ipvs runs here only in the guest kernel, where the drop monitor cannot: "
                    + _guest_monitor_problem())
    missing += bcc_missing()
    if missing:
        pytest.skip(f"{mode} or bcc cannot run here: " + "; ".join(missing))
    far = tmp_path / "far.yaml"
    far.write_text(FAR + DEAF)
    run = _json_main(capsys, "up", "--mode", mode, "-f", EXAMPLE, "-f", str(far),
                     "--json")["run"]
    try:
        _check_status(mode, _json_main(capsys, "status", "--run", run, "--json"))
        monitor = subprocess.Popen(
            [sys.executable, "-m", "svcbench", "monitor", "--run", run, "--duration", "60",
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_watching(monitor)
            probes = [("external", "198.18.0.1:30082"), ("pod/ns1/client", "198.19.0.2:80")]
            if mode == "userspace":
                probes.append(("pod/ns1/client", "198.19.0.9:80"))
            for source, target in probes:
                _json_main(capsys, "probe", "--run", run, "--from", source, "--to", target,
                           "--count", "2", "--timeout", "0.3", "--json")
            monitor.send_signal(signal.SIGINT)
            out, err = monitor.communicate(timeout=60)
        finally:
            if monitor.poll() is None:
                monitor.kill()
        assert monitor.returncode in (0, 130), err
    finally:
        assert main(["down", "--run", run]) == 0
    drops = [json.loads(line) for line in out.splitlines()]
    local = [d for d in drops if d.get("service") == "ns1/far:http"]
    assert len(local) >= 2, drops
    assert {d["reason"] for d in local} == {LOCAL_DROP[mode]}, local
    assert local[0]["where"] == "node/node1", local
    assert local[0]["via"] == "NodePort" and local[0]["verdict"] == "drop"
    assert local[0]["dst"] == "198.18.0.1" and "SYN" in local[0]["tcp_flags"]
    empty = [d for d in drops if d.get("service") == "ns1/empty:http"]
    assert empty and empty[0]["verdict"] == "reject" and empty[0]["via"] == "ClusterIP", drops
    assert empty[0]["reason"] == EMPTY_REJECT[mode], empty
    if mode == "userspace":
        refused = [d for d in drops if d["reason"] == "PROXY:ALL_BACKENDS_FAILED"]
        assert len(refused) == 2, drops
        assert refused[0]["service"] == "ns1/deaf:http" and refused[0]["where"] == "node/node1"
        assert refused[0]["src"] == "198.18.129.3" and refused[0]["dst"] == "198.19.0.9"


@pytest.mark.parametrize("args, words", [
    (["monitor", "--type", "trace"], "--type"),
    (["monitor", "--duration", "0"], "--duration"),
])
def test_monitor_bad_flags(args, words):
    done = _svcbench(*args)
    assert done.returncode == 2 and words in done.stderr, done.stderr
