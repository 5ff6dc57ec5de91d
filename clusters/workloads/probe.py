"""The client probe: real connections to one address, one sample per connection.

It runs in the calling thread's network namespace (enter one with clusters.nsenter.in_netns)
and opens every connection from this process, timing with perf_counter_ns.

TCP latency runs from the start of connect() to the echo backend's greeting line: a new
connection's time to first response. A payload is then sent and read back, outside the
latency, and must come back intact (any size: it is sent while being read back). UDP latency runs from send to the reply.

Each TCP connection is closed with SO_LINGER 0 once everything expected was read: the
close sends a RST instead of a FIN, so the client keeps no TIME_WAIT socket and its
ephemeral port is free again at once (thousands of sequential connections from one
namespace never exhaust ip_local_port_range, and conntrack drops the flow after its short
CLOSE timeout). The backend has nothing left to send by then, so no data is lost.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from kube.model import PROTOCOLS, TCP, UDP

OK = "ok"
REFUSED = "refused"
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
RESET = "reset"
ERROR = "error"
OUTCOMES = (OK, REFUSED, TIMEOUT, UNREACHABLE, RESET, ERROR)

_LINGER_RESET = struct.pack("ii", 1, 0)
_UNREACHABLE_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH}
_RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE}
_RECV_BYTES = 65536
_SEND_BYTES = 256 * 1024


@dataclass
class Sample:
    latency_us: float  # to the first response when ok, else until the outcome was known
    outcome: str  # one of OUTCOMES
    backend: str | None  # the pod that answered, "ns/name"
    seen_client: str | None  # the client address the backend saw, "ip:port"
    local_port: int | None = None  # the client socket's own port once connected (TCP)


@dataclass
class ProbeResult:
    target: str  # "ip:port"
    protocol: str
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = sorted(s.latency_us for s in self.samples if s.outcome == OK)
        return {
            "count": len(self.samples),
            "outcomes": dict(Counter(s.outcome for s in self.samples)),
            "backends": dict(Counter(s.backend for s in self.samples if s.backend is not None)),
            "p50_us": _percentile(ok, 50),
            "p90_us": _percentile(ok, 90),
            "p99_us": _percentile(ok, 99),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "protocol": self.protocol,
            "samples": [asdict(s) for s in self.samples],
            "summary": self.summary(),
        }


def _percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _parse_greeting(line: bytes) -> tuple[str, str] | None:
    """b"ns/pod 198.18.0.2:40000" -> ("ns/pod", "198.18.0.2:40000"); None if malformed."""
    parts = line.decode("utf-8", "replace").split(" ")
    if len(parts) != 2 or "/" not in parts[0] or ":" not in parts[1]:
        return None
    return parts[0], parts[1]


def _failure(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return REFUSED
    if exc.errno in _UNREACHABLE_ERRNOS:
        return UNREACHABLE
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or exc.errno in _RESET_ERRNOS:
        return RESET
    return ERROR


def _remaining(deadline_ns: int) -> float:
    left = (deadline_ns - time.perf_counter_ns()) / 1e9
    if left <= 0:
        raise TimeoutError("probe deadline passed")
    return left


def _bind_source(sock: socket.socket, source_port: int | None) -> None:
    if source_port is not None:
        # the previous sample's socket may still hold the port for an instant
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", source_port))


def tcp_sample(ip: str, port: int, timeout: float, payload: bytes,
               source_port: int | None) -> Sample:
    """One new TCP connection: connect, read the greeting, echo the payload, reset."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    start = time.perf_counter_ns()
    backend = seen = local_port = None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _bind_source(sock, source_port)
        sock.settimeout(timeout)
        start = time.perf_counter_ns()
        deadline = start + int(timeout * 1e9)
        sock.connect((ip, port))
        local_port = sock.getsockname()[1]
        buf = b""
        while b"\n" not in buf:
            sock.settimeout(_remaining(deadline))
            chunk = sock.recv(_RECV_BYTES)
            if not chunk:  # closed before greeting: the backend never really answered
                return Sample(_us(start), RESET, None, None, local_port)
            buf += chunk
        latency = _us(start)
        line, echoed = buf.split(b"\n", 1)
        parsed = _parse_greeting(line)
        if parsed is None:
            return Sample(latency, ERROR, None, None, local_port)
        backend, seen = parsed
        if payload:
            echoed = _echo(sock, payload, echoed, deadline)
            if echoed is None:
                return Sample(_us(start), RESET, backend, seen, local_port)
            if echoed != payload:
                return Sample(latency, ERROR, backend, seen, local_port)
        return Sample(latency, OK, backend, seen, local_port)
    except OSError as exc:
        return Sample(_us(start), _failure(exc), backend, seen, local_port)
    finally:
        sock.close()


def _echo(sock: socket.socket, payload: bytes, echoed: bytes, deadline: int) -> bytes | None:
    """Send the payload while reading it back; None if the peer closed before the end.

    Sending all before reading would deadlock once the payload outgrows both sides'
    socket buffers, so a poll loop does both as the socket allows.
    """
    sock.setblocking(False)
    got = bytearray(echoed)
    view = memoryview(payload)
    sent = 0
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLOUT)
    while len(got) < len(payload):
        if not poller.poll(_remaining(deadline) * 1000):
            raise TimeoutError("payload echo timed out")
        if sent < len(payload):
            try:
                sent += sock.send(view[sent : sent + _SEND_BYTES])
            except BlockingIOError:
                pass
            if sent == len(payload):
                poller.modify(sock, select.POLLIN)
        try:
            chunk = sock.recv(_RECV_BYTES)
        except BlockingIOError:
            continue
        if not chunk:
            return None
        got += chunk
    return bytes(got)


def udp_sample(ip: str, port: int, timeout: float, payload: bytes,
               source_port: int | None) -> Sample:
    """One datagram on a connected socket, so ICMP port unreachable reads as refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.perf_counter_ns()
    try:
        _bind_source(sock, source_port)
        sock.connect((ip, port))
        sock.settimeout(timeout)
        start = time.perf_counter_ns()
        sock.send(payload)
        reply = sock.recv(_RECV_BYTES)
        latency = _us(start)
        line, sep, echoed = reply.partition(b"\n")
        parsed = _parse_greeting(line) if sep else None
        if parsed is None:
            return Sample(latency, ERROR, None, None)
        outcome = OK if echoed == payload else ERROR
        return Sample(latency, outcome, parsed[0], parsed[1])
    except OSError as exc:
        return Sample(_us(start), _failure(exc), None, None)
    finally:
        sock.close()


def _us(start_ns: int) -> float:
    return (time.perf_counter_ns() - start_ns) / 1000.0


def probe(ip: str, port: int, *, protocol: str = TCP, count: int = 1, timeout: float = 1.0,
          payload: bytes = b"", source_port: int | None = None,
          interval_s: float = 0.0) -> ProbeResult:
    """`count` sequential samples against ip:port from the calling thread's namespace."""
    protocol = protocol.upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"probe protocol {protocol!r} must be one of {', '.join(PROTOCOLS)}")
    if count < 0 or timeout <= 0:
        raise ValueError(f"probe count ({count}) must be >= 0 and timeout ({timeout}) > 0")
    one = tcp_sample if protocol == TCP else udp_sample
    result = ProbeResult(f"{ip}:{port}", protocol)
    for i in range(count):
        if i and interval_s > 0:
            time.sleep(interval_s)
        result.samples.append(one(ip, port, timeout, payload, source_port))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusters.workloads.probe",
                                     description="Probe an echo backend or a Service address.")
    parser.add_argument("ip")
    parser.add_argument("port", type=int)
    parser.add_argument("--udp", action="store_true", help="send datagrams instead of TCP")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds per sample")
    parser.add_argument("--payload-size", type=int, default=0, help="bytes to echo per sample")
    parser.add_argument("--source-port", type=int)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between samples")
    parser.add_argument("--json", action="store_true", help="print every sample as JSON")
    args = parser.parse_args(argv)
    result = probe(args.ip, args.port, protocol=UDP if args.udp else TCP, count=args.count,
                   timeout=args.timeout, payload=b"x" * args.payload_size,
                   source_port=args.source_port, interval_s=args.interval)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        summary = result.summary()
        for sample in result.samples[:20]:
            print(f"{sample.outcome:<11} {sample.latency_us:10.1f} us  "
                  f"{sample.backend or '-'}  saw {sample.seen_client or '-'}")
        if len(result.samples) > 20:
            print(f"... {len(result.samples) - 20} more")
        print(json.dumps(summary))
    return 0 if result.samples and all(s.outcome == OK for s in result.samples) else 1


if __name__ == "__main__":
    sys.exit(main())
