"""The cluster DNS server (kube-dns's part in this cluster), built on dnspython.

One daemon process runs inside the DNS pod's network namespace and answers A and CNAME
queries over UDP and TCP port 53 from a JSON records file ({"name": ["ip", ...]} for A
records, {"name": "target"} for an alias, as kube.dns.records makes it). The file is read
again whenever it changes (its inode, size or mtime), checked on every query, so an answer
never lags a completed write; writers replace the file atomically. The daemon exits when
its namespace is deleted.

Answers: a known name gets its addresses; an alias gets its CNAME whatever type is asked
(RFC 1034 3.6.2) and, as CoreDNS does for an ExternalName Service, the target's own
records when the target is a name of this table (followed up to MAX_CNAME_CHAIN links); a
target outside the table is left to the client's resolver. A name that only prefixes
known names (an empty non-terminal such as `ns1.svc.cluster.local`) or is known without an
address of the asked type gets NOERROR with no answer; every other name gets NXDOMAIN.
There is no upstream to forward to inside the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from clusters.nsenter import in_netns, netns_path

DNS_PORT = 53
TTL_S = 5  # short: records change as Services are applied
UDP_PAYLOAD_NO_EDNS = 512  # RFC 1035: larger answers set TC and the client retries over TCP
TCP_IDLE_S = 10.0
MAX_CNAME_CHAIN = 8  # CoreDNS gives up on an alias chain after 8 links
NETNS_CHECK_S = 1.0
SPAWN_TIMEOUT_S = 10.0
REPO_ROOT = str(Path(__file__).resolve().parents[2])


class DnsServerError(RuntimeError):
    """The DNS daemon did not start (the message carries its log)."""


class RecordTable:
    """The records file, reloaded when it changes; a broken file keeps the last good table."""

    def __init__(self, path: str, log=None) -> None:
        self.path = path
        self.log = log or (lambda _msg: None)
        self.names: dict[str, list[str] | str] = {}
        self.signature: tuple[int, int, int] | None = None
        self.lock = threading.Lock()

    def current(self) -> dict[str, list[str] | str]:
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        with self.lock:
            if signature != self.signature:
                self._load(signature)
            return self.names

    def _load(self, signature: tuple[int, int, int] | None) -> None:
        if signature is None:
            self.names, self.signature = {}, None
            self.log(f"{self.path} is missing: serving no names")
            return
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            if not isinstance(data, dict):
                raise ValueError("top level must be an object of name -> [ip, ...] or target")
            names = {str(k).lower().rstrip("."): _record(v) for k, v in data.items()}
        except (OSError, ValueError, TypeError) as exc:
            self.log(f"{self.path} unreadable, keeping {len(self.names)} names: {exc}")
            self.signature = signature  # tried once; the next write changes the signature
            return
        self.names, self.signature = names, signature
        self.log(f"loaded {len(names)} names from {self.path}")


def _record(value) -> list[str] | str:
    """An A record set (a list of addresses) or an alias (one target name)."""
    if isinstance(value, str):
        if not value.strip("."):
            raise ValueError("an alias needs a target name")
        return value.rstrip(".")
    if not isinstance(value, list):
        raise ValueError(f"a record is a list of addresses or a target name, not {value!r}")
    return [str(ip) for ip in value]


def answer(table: RecordTable, wire: bytes, udp: bool) -> bytes | None:
    """The wire response to one query, or None for a packet that is not a DNS query."""
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None  # not DNS: nothing sensible to answer
    if query.flags & dns.flags.QR:
        return None  # a response, not a query
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
    elif len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
    else:
        _resolve(table.current(), query.question[0], response)
    limit = 65535
    if udp:
        limit = max(query.payload, UDP_PAYLOAD_NO_EDNS) if query.edns >= 0 else UDP_PAYLOAD_NO_EDNS
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        response.answer.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=limit)


def _resolve(names: dict[str, list[str] | str], question: dns.rrset.RRset, response) -> None:
    name = question.name.to_text(omit_final_dot=True).lower()
    data = names.get(name)
    if data is None:
        suffix = "." + name
        if not any(known.endswith(suffix) for known in names):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return  # an empty non-terminal: the name exists, it has no records
    if question.rdclass != dns.rdataclass.IN:
        return
    owner = question.name
    followed = {name}
    while isinstance(data, str):
        target = dns.name.from_text(data)  # absolute
        response.answer.append(
            dns.rrset.from_text_list(owner, TTL_S, "IN", "CNAME", [target.to_text()])
        )
        name = data.lower()
        if question.rdtype == dns.rdatatype.CNAME or name in followed:
            return  # the alias was asked for, or the chain loops
        if len(followed) >= MAX_CNAME_CHAIN:
            return
        followed.add(name)
        data = names.get(name)
        if data is None:
            return  # a name outside the cluster: the client's resolver follows it
        owner = target
    if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and data:
        response.answer.append(dns.rrset.from_text_list(owner, TTL_S, "IN", "A", list(data)))


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply = answer(self.server.table, data, udp=True)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    """RFC 7766: messages framed by a two-byte length, several per connection."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(TCP_IDLE_S)
        try:
            while True:
                size = _recv_exact(sock, 2)
                if size is None:
                    return
                wire = _recv_exact(sock, int.from_bytes(size, "big"))
                if wire is None:
                    return
                reply = answer(self.server.table, wire, udp=False)
                if reply is None:
                    return
                sock.sendall(len(reply).to_bytes(2, "big") + reply)
        except OSError:
            return


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _UdpServer(socketserver.UDPServer):
    allow_reuse_address = True
    max_packet_size = 65535


class _TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128


class DnsServer:
    """UDP and TCP listeners sharing one record table, each served on its own thread."""

    def __init__(self, records_path: str, listen_ip: str = "0.0.0.0", port: int = DNS_PORT,
                 log=None) -> None:
        self.table = RecordTable(records_path, log)
        self.udp = _UdpServer((listen_ip, port), _UdpHandler)
        self.tcp = _TcpServer((listen_ip, port), _TcpHandler)
        for server in (self.udp, self.tcp):
            server.table = self.table
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.table.current()
        for name, server in (("udp", self.udp), ("tcp", self.tcp)):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      name=f"dns-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} dns[{os.getpid()}] {message}", file=sys.stderr, flush=True)


def _log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines)).rstrip() or "(log is empty)"
    except OSError as exc:
        return f"(log unreadable: {exc})"


def query(server_ip: str, name: str, rdtype: str = "A", *, tcp: bool = False,
          port: int = DNS_PORT, timeout: float = 1.0) -> dns.message.Message:
    """Ask server_ip one question from the calling thread's namespace; the whole response."""
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, server_ip, port=port, timeout=timeout)
    return dns.query.udp(q, server_ip, port=port, timeout=timeout)


def spawn(netns: str, records_path: str, log_path: str, *, port: int = DNS_PORT,
          timeout: float = SPAWN_TIMEOUT_S) -> int:
    """Start the DNS daemon detached in `netns`; return its pid once it answers a query."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    nsenter = _which("nsenter")
    # nsenter joins only the network namespace and execs: the daemon keeps this pid.
    argv = [nsenter, f"--net={netns_path(netns)}", sys.executable, "-m", "clusters.workloads.dns",
            "--records", os.path.abspath(records_path), "--netns", netns, "--port", str(port)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                close_fds=True)
    # Reaped whenever it exits, so it never lingers as a zombie of the caller.
    threading.Thread(target=proc.wait, name=f"reap:dns:{netns}", daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DnsServerError(f"DNS daemon in netns {netns} exited with status "
                                 f"{proc.returncode}; {log_path} ends with:\n{_log_tail(log_path)}")
        try:
            in_netns(netns, query, "127.0.0.1", "ready.invalid", port=port, timeout=0.2)
            return proc.pid
        except (OSError, dns.exception.DNSException):
            time.sleep(0.02)
    proc.kill()
    raise DnsServerError(f"DNS daemon in netns {netns} did not answer on port {port} within "
                         f"{timeout:.0f} s; {log_path} ends with:\n{_log_tail(log_path)}")


def _which(cmd: str) -> str:
    import shutil

    found = shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise DnsServerError(f"{cmd} not found; install util-linux")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clusters.workloads.dns",
        description="Cluster DNS: A and CNAME records from a JSON file.")
    parser.add_argument("--records", required=True,
                        help="JSON file: name -> [ip, ...] or name -> alias target")
    parser.add_argument("--netns", help="exit when /run/netns/NETNS disappears")
    parser.add_argument("--listen", default="0.0.0.0", help="address to bind")
    parser.add_argument("--port", type=int, default=DNS_PORT)
    args = parser.parse_args(argv)

    stop = threading.Event()
    reason = ["stopped"]

    def on_signal(signum, _frame) -> None:
        reason[0] = signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = DnsServer(args.records, args.listen, args.port, log=_log)
    except OSError as exc:
        _log(f"cannot listen on {args.listen}:{args.port}: {exc}")
        return 1
    server.start()
    _log(f"serving {args.listen}:{args.port} udp+tcp from {args.records} (netns {args.netns})")
    while not stop.wait(NETNS_CHECK_S):
        if args.netns and not os.path.exists(netns_path(args.netns)):
            reason[0] = f"netns {args.netns} was deleted"
            break
    server.stop()
    _log(f"exiting: {reason[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
