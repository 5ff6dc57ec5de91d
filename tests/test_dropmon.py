"""The drop monitor's parts: the BTF reader against the running kernel, the drop-reason names
from the tracepoint's format, and the monitor on real drops in a namespace of its own
(netfilter DROP, no socket for UDP and TCP), with drops elsewhere not reported."""

from __future__ import annotations

import os
import struct
import subprocess
import uuid

import pytest

from bpf import btf
from bpf.dropmon import DropMonitor, DropMonitorUnavailable, netns_inode, reason_names
from bpf.setup import bcc_missing


def _blob(types: bytes, strings: bytes) -> bytes:
    header = struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, len(types), len(types),
                         len(strings))
    return header + types + strings


def test_btf_reader_resolves_members_through_anonymous_unions():
    # int (id 1), struct inner {int b; int c;} anonymous (id 2), struct outer (id 3):
    # {int a at 0; <anonymous inner> at 32 bits}.
    strings = b"\0int\0outer\0a\0b\0c\0"
    off = {name: strings.index(name.encode() + b"\0") for name in ("int", "outer", "a", "b", "c")}
    types = struct.pack("<IIII", off["int"], btf.INT << 24, 4, 32)
    types += struct.pack("<III", 0, (btf.STRUCT << 24) | 2, 8)
    types += struct.pack("<III", off["b"], 1, 0) + struct.pack("<III", off["c"], 1, 32)
    types += struct.pack("<III", off["outer"], (btf.STRUCT << 24) | 2, 12)
    types += struct.pack("<III", off["a"], 1, 0) + struct.pack("<III", 0, 2, 32)
    reader = btf.Btf(btf.parse(_blob(types, strings)))
    assert reader.offset("outer", "a") == 0
    assert reader.offset("outer", "b") == 4
    assert reader.offset("outer", "c") == 8
    with pytest.raises(btf.BtfError, match="struct outer has no member d"):
        reader.offset("outer", "d")
    with pytest.raises(btf.BtfError, match="no struct missing"):
        reader.offset("missing", "a")
    with pytest.raises(btf.BtfError, match="not BTF"):
        btf.parse(b"\0" * 32)


def test_btf_of_the_running_kernel():
    if not os.path.exists(btf.VMLINUX):
        pytest.skip(f"this kernel exposes no BTF at {btf.VMLINUX}")
    k = btf.kernel_btf()
    # Layout facts that hold on every kernel with these structs: the first members.
    assert k.offset("sk_buff", "next") == 0
    assert k.offset("sock", "__sk_common") == 0
    assert k.offset("sk_buff", "network_header") != k.offset("sk_buff", "transport_header")
    assert 0 < k.offset("net", "ns.inum") < 4096


def test_reason_names_come_from_the_print_format():
    fmt = ('print fmt: "reason: %s", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, '
           '{ 3, "NO_SOCKET" }, { 12, "NETFILTER_DROP" })')
    assert reason_names(fmt) == {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP"}


def _in(ns: str, code: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", code], capture_output=True,
                   timeout=20)


@pytest.mark.root
def test_monitor_reports_drops_in_watched_namespaces_only():
    missing = bcc_missing()
    if missing:
        pytest.skip("bcc cannot compile here: " + "; ".join(missing))
    watched, other = f"svb-dm-{uuid.uuid4().hex[:6]}", f"svb-dm-{uuid.uuid4().hex[:6]}"
    for ns in (watched, other):
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", watched, "iptables", "-A", "OUTPUT", "-d",
                        "127.0.0.5", "-j", "DROP"], check=True)
        inode = netns_inode(f"/run/netns/{watched}")
        try:
            monitor = DropMonitor([inode], max_seconds=60)
        except DropMonitorUnavailable as exc:
            pytest.skip(str(exc))
        udp = "import socket; socket.socket(2, 2).sendto(b'x', ('{}', {}))"
        tcp = ("import socket\ns = socket.socket(); s.settimeout(0.3)\n"
               "try: s.connect(('127.0.0.1', 9997))\nexcept OSError: pass")
        with monitor:
            _in(watched, udp.format("127.0.0.5", 9999))
            _in(watched, udp.format("127.0.0.1", 9998))
            _in(watched, tcp)
            _in(other, udp.format("127.0.0.1", 9996))
            drops = monitor.drops(0.5)
    finally:
        for ns in (watched, other):
            subprocess.run(["ip", "netns", "del", ns], check=False)
    seen = {(d.reason, d.protocol, d.dst, d.dport) for d in drops}
    assert ("NETFILTER_DROP", "UDP", "127.0.0.5", 9999) in seen, drops
    assert ("NO_SOCKET", "UDP", "127.0.0.1", 9998) in seen, drops
    syn = [d for d in drops if d.protocol == "TCP" and d.dport == 9997]
    assert syn and syn[0].reason == "NO_SOCKET" and "SYN" in syn[0].tcp_flags, drops
    assert not [d for d in drops if d.dport == 9996], "a drop outside the watched namespace"
    assert {d.netns for d in drops} == {inode}
