"""The root-namespace snapshot: stable when nothing changes, loud when anything does.

Changes are made only in a scratch namespace (guard_root takes a namespace for exactly
this); the root namespace itself is only ever read.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest

from clusters.netns import NETNS_PREFIX, netns_add, netns_delete
from clusters.safety import RootNamespaceChanged, diff, guard_root, snapshot, snapshot_root


def test_diff_names_section_and_line():
    before = {"links": ["eth0 ether up 192.0.2.2/24", "lo loopback up 127.0.0.1/8"], "nft": []}
    after = {
        "links": ["eth0 ether up 192.0.2.2/24", "lo loopback up 127.0.0.1/8", "veth0 veth up"],
        "nft": ["table ip svb {"],
        "iptables-legacy": [],
    }
    assert diff(before, before) == []
    assert diff(before, after) == [
        "iptables-legacy: appeared",
        "links: +veth0 veth up",
        "nft: +table ip svb {",
    ]
    assert diff(after, before)[1:] == ["links: -veth0 veth up", "nft: -table ip svb {"]


def test_guard_passes_when_nothing_changed_and_chains_the_body_error(monkeypatch):
    snaps = iter([{"links": ["a"]}, {"links": ["a"]}, {"links": ["a"]}, {"links": ["a", "b"]}])
    monkeypatch.setattr("clusters.safety.snapshot", lambda netns=None: next(snaps))
    with guard_root():
        pass
    with pytest.raises(RootNamespaceChanged) as err:
        with guard_root():
            raise KeyError("body failed")
    assert err.value.changes == ["links: +b"]
    assert isinstance(err.value.__cause__, KeyError)


@pytest.mark.root
def test_root_snapshot_is_stable():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    first, second = snapshot_root(), snapshot_root()
    assert diff(first, second) == []
    for section in ("links", "routes", "rules", "sysctls"):
        assert section in first
    assert any(line.startswith("lo ") for line in first["links"])
    if shutil.which("nft"):
        assert "nft" in first


@pytest.fixture
def scratch():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    name = f"{NETNS_PREFIX}{secrets.token_hex(3)}-safety"
    netns_add(name)
    try:
        yield name
    finally:
        netns_delete(name)


def _in(netns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *argv], check=True, capture_output=True, text=True)


@pytest.mark.root
def test_guard_reports_every_kind_of_change(scratch):
    with pytest.raises(RootNamespaceChanged) as err:
        with guard_root(netns=scratch):
            _in(scratch, "ip", "link", "add", "svbbr", "type", "bridge")
            _in(scratch, "ip", "addr", "add", "198.18.7.1/24", "dev", "svbbr")
            _in(scratch, "ip", "link", "set", "svbbr", "up")
            _in(scratch, "ip", "route", "add", "198.19.7.0/24", "via", "198.18.7.2", "table", "7")
            _in(scratch, "ip", "rule", "add", "to", "198.19.7.0/24", "table", "7")
            _in(scratch, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            if shutil.which("iptables-legacy"):
                _in(scratch, "iptables-legacy", "-A", "INPUT", "-s", "198.18.7.9", "-j", "DROP")
            if shutil.which("iptables-nft"):
                _in(scratch, "iptables-nft", "-t", "nat", "-N", "SVB-TEST")
            if shutil.which("nft"):
                _in(scratch, "nft", "add", "table", "inet", "svbtest")
    changes = err.value.changes
    text = "\n".join(changes)
    assert any(c.startswith("links: +svbbr bridge up 198.18.7.1/24") for c in changes)
    assert any(c.startswith("routes: +") and "198.19.7.0/24" in c for c in changes)
    assert any(c.startswith("rules: +") and '"dst": "198.19.7.0"' in c for c in changes)
    assert "sysctls: +net.ipv4.ip_forward = 1" in changes
    if shutil.which("iptables-legacy"):
        assert "iptables-legacy: +-A INPUT -s 198.18.7.9/32 -j DROP" in changes
    if shutil.which("iptables-nft"):
        assert "iptables-nft: +:SVB-TEST - [0:0]" in changes
    if shutil.which("nft"):
        assert "nft: +table inet svbtest {" in changes
    assert "the root network namespace changed" in str(err.value) and text


@pytest.mark.root
def test_counters_do_not_count_as_changes(scratch):
    if not shutil.which("nft"):
        pytest.skip("nft is not installed")
    _in(scratch, "ip", "link", "set", "lo", "up")
    _in(scratch, "nft", "add table ip svbc; add chain ip svbc out { type filter hook output priority 0; }; "
                        "add rule ip svbc out counter")
    with guard_root(netns=scratch):
        # Traffic over lo moves the nft counter; the snapshot strips it.
        _in(scratch, "python3", "-c",
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "[s.sendto(b'x', ('127.0.0.1', 9)) for _ in range(5)]")
    out = subprocess.run(["ip", "netns", "exec", scratch, "nft", "list", "ruleset"],
                         capture_output=True, text=True, check=True).stdout
    assert "packets 0 " not in out  # the counter really moved


@pytest.mark.root
def test_snapshot_of_a_namespace_is_not_the_root_one(scratch):
    assert snapshot(scratch)["links"] != snapshot_root()["links"]
