"""syn_to_established_us: the kernel's own handshake time, from the `sock:inet_sock_set_state`
tracepoint, as a check of the probe's latencies that does not depend on the probe.

A bcc program remembers when a socket from the client pod's address went to SYN_SENT
and reports SYN_SENT -> ESTABLISHED with the time in between and the destination, but
only inside a window (`arm()` to `collect()`): the tracer stays loaded for the whole
sweep, and a perf event per handshake wakes the tracer process: on two cores that added
53 µs to the p50 of a new connection (123 to 176 µs to a pod IP, 8 runs of 300 each way),
which every measurement after the first window, and the floor at the end of a sweep, paid
while the program was always on. It reads only
the tracepoint's own fields (no kernel struct layouts), so the headers bcc compiles
against need not match the running kernel.

bcc finds tracepoints through tracefs, which this host does not mount. The tracer is
therefore a child process (bpf/tracefs.py) in a mount namespace of its own that
mounts tracefs there: nothing changes in the host's mounts, and libbcc never loads into
the sweep's process. Other runs on the host may use the same RFC 2544 addresses, so the
caller keeps only the handshakes of its own sockets (by source port).

The child lives until it is told to stop or its parent goes (end of file on its stdin),
never on a clock: a nightly sweep keeps it for hours. Should it die anyway, the next
window starts a new one, and `restarts` says how often that happened and why.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from bpf.tracefs import kill_child, start_child

READY_TIMEOUT_S = 90.0  # clang compiles the program first; slow on a loaded 2-core host
PROGRAM = r"""
#include <uapi/linux/ptrace.h>

struct handshake {
    u64 delta_ns;
    u32 daddr;
    u16 sport;
};

BPF_HASH(syn_sent, u64, u64, 131072);
BPF_PERF_OUTPUT(handshakes);
BPF_ARRAY(armed, u32, 1);  /* 1 while a window is open: outside one the program does nothing */
BPF_ARRAY(submitted, u64, 1);  /* handshakes reported since the tracer started */

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->family != 2 || args->protocol != 6)  /* AF_INET, IPPROTO_TCP */
        return 0;
    int slot = 0;
    u32 *on = armed.lookup(&slot);
    if (!on || !*on)
        return 0;
    u32 saddr = 0, daddr = 0;
    __builtin_memcpy(&saddr, args->saddr, 4);
    __builtin_memcpy(&daddr, args->daddr, 4);
    if (saddr != CLIENT_IP)
        return 0;
    u64 sk = (u64)args->skaddr;
    if (args->newstate == 2) {  /* TCP_SYN_SENT */
        u64 now = bpf_ktime_get_ns();
        syn_sent.update(&sk, &now);
        return 0;
    }
    u64 *t0 = syn_sent.lookup(&sk);
    if (!t0)
        return 0;
    if (args->oldstate == 2 && args->newstate == 1) {  /* SYN_SENT -> ESTABLISHED */
        struct handshake h = {};
        h.delta_ns = bpf_ktime_get_ns() - *t0;
        h.daddr = daddr;
        h.sport = args->sport;
        handshakes.perf_submit(args, &h, sizeof(h));
        u64 *count = submitted.lookup(&slot);
        if (count)
            __sync_fetch_and_add(count, 1);
    }
    syn_sent.delete(&sk);
    return 0;
}
"""


class TraceUnavailable(RuntimeError):
    """The tracer cannot run here; the message is the reason recorded in run.json."""


def load_bcc() -> Any:
    """The bcc module, through the eBPF mode's loader when it exists (bpf/setup.py)."""
    try:
        from bpf.setup import bcc_import  # finds Debian's python3-bpfcc from any interpreter
    except ImportError:
        bcc_import = None
    try:
        if bcc_import is not None:
            return bcc_import()
        import bcc

        return bcc
    except Exception as exc:  # noqa: BLE001 - any failure is a reason to skip the metric
        raise TraceUnavailable(f"bcc is not importable ({exc}); apt-get install python3-bpfcc") from None


_checked: list[str | None] = []


def unavailable_reason() -> str | None:
    """None when the tracer loads here, else why not (one sentence); tried once per process."""
    if not _checked:
        try:
            load_bcc()
            HandshakeTrace("198.18.0.1").close()
            _checked.append(None)
        except TraceUnavailable as exc:
            _checked.append(str(exc))
    return _checked[0]


def _le_u32(ip: str) -> int:
    """An IPv4 address as the u32 a memcpy of its network-order bytes gives on this host."""
    return int.from_bytes(socket.inet_aton(ip), sys.byteorder)


class HandshakeTrace:
    """A tracer child for one client address, kept for a whole sweep.

    `arm()` opens a window, `collect()` closes it and returns the handshakes (µs, source
    port, destination) completed inside it; `close()` stops the child. Usable as a context
    manager.
    """

    def __init__(self, client_ip: str):
        self.client_ip = client_ip
        self.submitted = 0
        self.restarts: list[str] = []  # why each earlier child ended, one sentence each
        self._start()

    def _start(self) -> None:
        # stderr to a file: a pipe nobody reads during a sweep would stall the child when full.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = start_child("bench.trace", ["--client", self.client_ip], self._stderr)
        ready = self._read_line(READY_TIMEOUT_S)
        if ready != "ready":
            self._kill()
            err = self._stderr_text()
            reason = err.splitlines()[-1].strip() if err else f"no 'ready' from the tracer (got {ready!r})"
            if "mount" in err and "tracefs" not in reason:
                reason = f"this kernel ({os.uname().release}) cannot mount tracefs: {reason}"
            self._stderr.close()
            raise TraceUnavailable(f"the sock:inet_sock_set_state tracer did not start: {reason}")

    def __enter__(self) -> HandshakeTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self._proc.stdout.readline().strip()

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().strip()

    def _kill(self) -> None:
        kill_child(self._proc)

    def _exit_reason(self) -> str:
        code = self._proc.returncode
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        err = self._stderr_text()
        return f"the tracer {how}" + (f" ({err.splitlines()[-1].strip()})" if err else "")

    def _ask(self, command: str) -> str:
        if self._proc.poll() is not None:
            raise TraceUnavailable(self._exit_reason())
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        line = self._read_line(30.0)
        if not line:
            self._kill()
            raise TraceUnavailable(f"the tracer did not answer {command!r} within 30 s")
        return line

    def arm(self) -> None:
        """Open a window: handshakes that start from now on are recorded. A child that died
        since the last window is replaced first (and the reason kept in `restarts`)."""
        if self._proc.poll() is not None:
            self.restarts.append(self._exit_reason())
            self._stderr.close()
            self._start()
        if self._ask("arm") != "armed":
            raise TraceUnavailable("the tracer did not arm")

    def collect(self) -> list[tuple[float, int, str]]:
        """Close the window: (handshake µs, source port, destination IP) of each handshake
        that began and completed inside it. `submitted` then holds how many handshakes the
        kernel program has reported since the tracer started, windows or not."""
        reply = json.loads(self._ask("collect"))
        self.submitted = reply["submitted"]
        return [(us, sport, socket.inet_ntoa(daddr.to_bytes(4, sys.byteorder)))
                for us, sport, daddr in reply["handshakes"]]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.communicate("stop\n", timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        self._stderr.close()


# --------------------------------------------------------------------------- the tracer child


def _tracer(client_ip: str, max_s: float | None) -> int:
    bcc = load_bcc()
    bpf = bcc.BPF(text=PROGRAM, cflags=[f"-DCLIENT_IP={_le_u32(client_ip)}u"])
    events: list[tuple[float, int, int]] = []

    def on_event(_cpu: int, data: Any, _size: int) -> None:
        e = bpf["handshakes"].event(data)
        events.append((round(e.delta_ns / 1000.0, 2), int(e.sport), int(e.daddr)))

    bpf["handshakes"].open_perf_buffer(on_event, page_cnt=256)
    armed = bpf["armed"]
    zero = ctypes.c_int(0)
    print("ready", flush=True)
    deadline = None if max_s is None else time.monotonic() + max_s
    while deadline is None or time.monotonic() < deadline:
        bpf.perf_buffer_poll(timeout=50)
        if not select.select([sys.stdin], [], [], 0)[0]:
            continue
        line = sys.stdin.readline()
        if not line:
            break  # end of file: the parent is gone
        command = line.strip()
        if command == "arm":
            bpf["syn_sent"].clear()  # SYNs from an earlier window that never completed
            events.clear()
            armed[zero] = ctypes.c_uint32(1)
            print("armed", flush=True)
            continue
        armed[zero] = ctypes.c_uint32(0)
        bpf.perf_buffer_consume()  # what was submitted before the window closed
        print(json.dumps({"handshakes": events, "submitted": bpf["submitted"][zero].value}),
              flush=True)
        events.clear()
        if command != "collect":
            break
    bpf.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace",
                                     description="SYN_SENT -> ESTABLISHED times of one client address; "
                                                 "'arm' on stdin opens a window, 'collect' closes it "
                                                 "and prints them, 'stop' ends.")
    parser.add_argument("--client", required=True, help="the client's IPv4 address")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop after this long (default: when told to, or at end of file)")
    args = parser.parse_args(argv)
    return _tracer(args.client, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
