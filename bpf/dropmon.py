"""Packet drops with the kernel's reason, from the `skb:kfree_skb` tracepoint.

The tracepoint fires for every socket buffer the kernel frees as dropped, with an
`enum skb_drop_reason` (NETFILTER_DROP, NO_SOCKET, IP_INADDRERRORS, ...) and the code
location. A bcc program keeps drops whose network namespace is one it was told to watch
(by nsfs inode), reads the IPv4 and TCP/UDP headers from the buffer and reports each drop
through a perf buffer. It reads kernel memory at offsets taken from the running kernel's
BTF (bpf/btf.py), so the generic headers bcc compiles against need not match the kernel.

As bench/trace.py's, the program runs in a child process (bpf/tracefs.py) in a mount namespace of
its own that mounts tracefs (the host's mounts do not change): `DropMonitor` starts it,
`watch(inode)` adds a namespace, `drops()` returns what was reported so far. The child
prints one JSON line per drop and stops at end of file on its stdin, on `stop`, or after
`--max-seconds`: it never outlives its parent.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bpf.btf import BtfError, kernel_btf
from bpf.setup import bcc_import
from bpf.tracefs import TRACEFS, kill_child, start_child

FORMAT = f"{TRACEFS}/events/skb/kfree_skb/format"
READY_TIMEOUT_S = 90.0  # clang compiles the program first; slow on a loaded 2-core host
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}

PROGRAM = r"""
#include <uapi/linux/ptrace.h>

/* The tracepoint's record names this enum; the generic headers lack it. Its values come
   from the tracepoint's print format, so only its size (an int) matters here. */
enum skb_drop_reason { SVCBENCH_DROP_REASON_ANY = 0x7fffffff };

struct drop {
    u64 location;
    u32 netns;
    u32 reason;
    u32 saddr;
    u32 daddr;
    u32 ifindex;
    u16 sport;
    u16 dport;
    u16 ethertype;
    u8 l4;
    u8 tcp_flags;
};

BPF_HASH(watched, u32, u8, 16384);
BPF_PERF_OUTPUT(drops);
BPF_ARRAY(reported, u64, 1);

static __always_inline void *ptr_at(void *base, int offset) {
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), (char *)base + offset);
    return p;
}

TRACEPOINT_PROBE(skb, kfree_skb) {
    if (args->reason <= 1)  /* SKB_NOT_DROPPED_YET, SKB_CONSUMED */
        return 0;
    void *skb = args->skbaddr;
    void *dev = ptr_at(skb, SKB_DEV);
    void *net = 0;
    if (dev)
        net = ptr_at(dev, DEV_ND_NET);
    if (!net) {
        void *sk = 0;
#ifdef HAVE_RX_SK
        sk = args->rx_sk;
#endif
        if (!sk)
            sk = ptr_at(skb, SKB_SK);
        if (sk)
            net = ptr_at(sk, SK_NET);
    }
    if (!net)
        return 0;
    u32 netns = 0;
    bpf_probe_read_kernel(&netns, sizeof(netns), (char *)net + NET_INUM);
    if (!watched.lookup(&netns))
        return 0;
    struct drop d = {};
    d.location = (u64)args->location;
    d.netns = netns;
    d.reason = args->reason;
    d.ethertype = args->protocol;
    if (dev)
        bpf_probe_read_kernel(&d.ifindex, sizeof(d.ifindex), (char *)dev + DEV_IFINDEX);
    if (args->protocol == 0x0800) {
        unsigned char *head = ptr_at(skb, SKB_HEAD);
        u16 nh = 0;
        bpf_probe_read_kernel(&nh, sizeof(nh), (char *)skb + SKB_NETWORK_HEADER);
        unsigned char *ip = head + nh;
        u8 vihl = 0;
        bpf_probe_read_kernel(&vihl, 1, ip);
        bpf_probe_read_kernel(&d.l4, 1, ip + 9);
        bpf_probe_read_kernel(&d.saddr, 4, ip + 12);
        bpf_probe_read_kernel(&d.daddr, 4, ip + 16);
        unsigned char *l4 = ip + (vihl & 0x0f) * 4;
        if (d.l4 == 6 || d.l4 == 17 || d.l4 == 132) {
            bpf_probe_read_kernel(&d.sport, 2, l4);
            bpf_probe_read_kernel(&d.dport, 2, l4 + 2);
            d.sport = ntohs(d.sport);
            d.dport = ntohs(d.dport);
        }
        if (d.l4 == 6)
            bpf_probe_read_kernel(&d.tcp_flags, 1, l4 + 13);
    }
    drops.perf_submit(args, &d, sizeof(d));
    int zero = 0;
    u64 *count = reported.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}
"""

TCP_FLAGS = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"))


class DropMonitorUnavailable(RuntimeError):
    """The monitor cannot run here; the message says why (one sentence)."""


@dataclass(frozen=True)
class Drop:
    """One dropped packet, as the kernel reported it."""

    time: float  # seconds since the epoch, when the child read it
    netns: int  # nsfs inode of the namespace that dropped it
    reason: str  # the skb_drop_reason name, e.g. NETFILTER_DROP
    location: str  # the kernel function that dropped it
    ifindex: int
    protocol: str  # TCP, UDP, ICMP, or the ethertype for non-IPv4
    src: str
    dst: str
    sport: int
    dport: int
    tcp_flags: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def offsets() -> dict[str, int]:
    """The struct member offsets the program reads, from this kernel's BTF."""
    btf = kernel_btf()
    return {
        "SKB_DEV": btf.offset("sk_buff", "dev"),
        "SKB_SK": btf.offset("sk_buff", "sk"),
        "SKB_HEAD": btf.offset("sk_buff", "head"),
        "SKB_NETWORK_HEADER": btf.offset("sk_buff", "network_header"),
        "DEV_ND_NET": btf.offset("net_device", "nd_net"),
        "DEV_IFINDEX": btf.offset("net_device", "ifindex"),
        "SK_NET": btf.offset("sock", "__sk_common.skc_net"),
        "NET_INUM": btf.offset("net", "ns.inum"),
    }


def reason_names(format_text: str) -> dict[int, str]:
    """{value: name} of the drop reasons, from the tracepoint's print format."""
    return {int(v): name for v, name in re.findall(r'\{\s*(\d+),\s*"([A-Z0-9_]+)"\s*\}',
                                                   format_text)}


def netns_inode(path: str) -> int:
    """The nsfs inode of a network namespace (/run/netns/NAME or /proc/PID/ns/net)."""
    return os.stat(path).st_ino


def kernel_problem() -> str | None:
    """Why this kernel cannot run the monitor at all, in one sentence (None if it may): a
    kernel built without CONFIG_FTRACE has no tracefs and so no tracepoint to attach to
    (Debian's User-Mode-Linux guest kernel, which also lacks CONFIG_PERF_EVENTS and BTF)."""
    try:
        with open("/proc/filesystems") as fh:
            has_tracefs = any(line.split()[-1:] == ["tracefs"] for line in fh)
    except OSError:
        has_tracefs = True  # cannot tell: let the child find out
    if not has_tracefs:
        return (f"kernel {os.uname().release} has no tracefs (built without CONFIG_FTRACE), "
                "so there is no skb:kfree_skb tracepoint to attach to")
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return (f"kernel {os.uname().release} has no BTF (/sys/kernel/btf/vmlinux; "
                "CONFIG_DEBUG_INFO_BTF) to take the sk_buff offsets from")
    return None


def _flags(value: int) -> str:
    return "|".join(name for bit, name in TCP_FLAGS if value & bit)


# --------------------------------------------------------------------------- the parent


class DropMonitor:
    """A drop-monitor child watching the given namespaces (see the module's docstring)."""

    def __init__(self, netns_inodes: list[int] = (), max_seconds: float = 3600.0) -> None:
        problem = kernel_problem()
        if problem:
            raise DropMonitorUnavailable(f"the skb:kfree_skb drop monitor cannot run: {problem}")
        self._drops: list[Drop] = []
        self._lock = threading.Lock()
        self._watching: set[int] = set()
        self._acked = threading.Condition(self._lock)
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = start_child("bpf.dropmon", ["--max-seconds", f"{max_seconds:g}"],
                                 self._stderr)
        ready, _, _ = select.select([self._proc.stdout], [], [], READY_TIMEOUT_S)
        line = self._proc.stdout.readline().strip() if ready else ""
        if line != "ready":
            self._kill()
            self._stderr.seek(0)
            err = self._stderr.read().strip().splitlines()
            self._stderr.close()
            reason = err[-1].strip() if err else f"no 'ready' from it (got {line!r})"
            raise DropMonitorUnavailable(f"the skb:kfree_skb drop monitor did not start: "
                                         f"{reason}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        for inode in netns_inodes:
            self.watch(inode, wait=False)
        self._wait_watching(netns_inodes)

    def __enter__(self) -> DropMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if "reason" in data:
                    self._drops.append(Drop(**data))
                elif "watching" in data:
                    self._watching.add(data["watching"])
                    self._acked.notify_all()

    def _send(self, line: str) -> None:
        if self._proc.poll() is not None:
            raise DropMonitorUnavailable(f"the drop monitor exited ({self._proc.returncode})")
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def watch(self, inode: int, wait: bool = True) -> None:
        """Report drops in the namespace with this nsfs inode from now on (from when this
        returns, unless `wait` is False)."""
        self._send(f"watch {inode}")
        if wait:
            self._wait_watching([inode])

    def _wait_watching(self, inodes: list[int], timeout: float = 30.0) -> None:
        with self._lock:
            if not self._acked.wait_for(lambda: set(inodes) <= self._watching, timeout):
                raise DropMonitorUnavailable(f"the drop monitor did not take "
                                             f"{len(set(inodes) - self._watching)} namespaces "
                                             f"within {timeout:g} s")

    def drops(self, settle_s: float = 0.2) -> list[Drop]:
        """Every drop reported so far (after waiting `settle_s` for the perf buffer)."""
        time.sleep(settle_s)
        with self._lock:
            return list(self._drops)

    def take(self) -> list[Drop]:
        """The drops reported since the last `take` (or since the start), removed."""
        with self._lock:
            taken, self._drops = self._drops, []
        return taken

    def clear(self) -> None:
        with self._lock:
            self._drops.clear()

    def _kill(self) -> None:
        kill_child(self._proc)

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._proc.stdin.write("stop\n")
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        if hasattr(self, "_reader"):
            self._reader.join(timeout=5)
        self._stderr.close()


# --------------------------------------------------------------------------- the child


def _child(max_s: float) -> int:
    try:
        cflags = [f"-D{k}={v}" for k, v in offsets().items()]
    except BtfError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    try:
        fmt = Path(FORMAT).read_text()
    except OSError as exc:
        sys.stderr.write(f"this kernel has no skb:kfree_skb tracepoint ({exc.strerror})\n")
        return 1
    if "rx_sk" in fmt:
        cflags.append("-DHAVE_RX_SK=1")
    names = reason_names(fmt)
    bcc = bcc_import()
    bpf = bcc.BPF(text=PROGRAM, cflags=cflags)
    watched = bpf["watched"]

    def on_drop(_cpu: int, data: Any, _size: int) -> None:
        d = bpf["drops"].event(data)
        ipv4 = d.ethertype == 0x0800
        sym = bpf.ksym(d.location, show_offset=False)
        row = Drop(
            time=round(time.time(), 6), netns=int(d.netns),
            reason=names.get(int(d.reason), str(d.reason)),
            location=sym.decode("ascii", "replace") if isinstance(sym, bytes) else str(sym),
            ifindex=int(d.ifindex),
            protocol=PROTOCOLS.get(int(d.l4), str(d.l4)) if ipv4 else f"0x{d.ethertype:04x}",
            src=socket.inet_ntoa(int(d.saddr).to_bytes(4, sys.byteorder)) if ipv4 else "",
            dst=socket.inet_ntoa(int(d.daddr).to_bytes(4, sys.byteorder)) if ipv4 else "",
            sport=int(d.sport), dport=int(d.dport), tcp_flags=_flags(int(d.tcp_flags)),
        )
        print(json.dumps(row.as_dict()), flush=True)

    bpf["drops"].open_perf_buffer(on_drop, page_cnt=64)
    print("ready", flush=True)
    deadline = time.monotonic() + max_s
    pending = b""  # stdin read raw: a buffered reader would hide lines from select()
    stdin = sys.stdin.fileno()
    try:
        while time.monotonic() < deadline:
            bpf.perf_buffer_poll(timeout=50)
            if not select.select([stdin], [], [], 0)[0]:
                continue
            chunk = os.read(stdin, 65536)
            if not chunk:
                break  # end of file: the parent is gone
            pending += chunk
            *lines, pending = pending.split(b"\n")
            commands = [line.decode().strip() for line in lines]
            if "stop" in commands:
                break
            for command in commands:
                verb, _, arg = command.partition(" ")
                if verb == "watch" and arg.isdigit():
                    watched[ctypes.c_uint32(int(arg))] = ctypes.c_uint8(1)
                    print(json.dumps({"watching": int(arg)}), flush=True)
        bpf.perf_buffer_consume()
    finally:
        bpf.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bpf.dropmon",
        description="Print one JSON line per packet dropped in the watched network namespaces "
                    "('watch INODE' on stdin adds one; 'stop' or end of file ends). Needs "
                    f"tracefs mounted at {TRACEFS}.")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="stop after this long (default: 3600)")
    args = parser.parse_args(argv)
    return _child(args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
