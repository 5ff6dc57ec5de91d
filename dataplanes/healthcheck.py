"""Health-check NodePorts: kube-proxy's service health server, one process per node.

A LoadBalancer Service with externalTrafficPolicy Local gets a `healthCheckNodePort`. On
every node kube-proxy listens on it (all node addresses) and answers any HTTP request with

    {"service": {"namespace": NS, "name": NAME}, "localEndpoints": N, "serviceProxyHealthy": true}

status 200 while N > 0 and 503 when N == 0, so a cloud load balancer only sends to nodes
that hold a ready endpoint (pkg/proxy/healthcheck/service_health.go). N is computed by
kube/state.py (`ServicePortView.health_check_local_endpoints`): this node's ready endpoints,
counted once per address; serving+terminating ones do not count.

Every mode calls the same three functions: `install(node)` starts the server in the node's
network namespace, `sync(node, view)` hands it the node's table {port: (namespace, name, N)}
(it opens and closes listeners to match; a port kept for the same Service keeps its
listener and only its count changes), `uninstall(node)` stops it. The server is a small
asyncio process (`python -m dataplanes.healthcheck`), controlled over JSON lines on the
abstract Unix socket CONTROL_NAME, which exists per network namespace and needs no file.
It exits when its namespace is deleted, and `svcbench gc` kills it with every other
process of a dead run's namespaces.

These ports are not NodePorts: no mode's NodePort rules match them, so connections reach
this process through the node's own stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataplanes.nodeproc import (
    NETNS_RUN_DIR,
    log_tail,
    request_json_line,
    serve_json_lines,
    sweep_logs,
)

CONTROL_NAME = "svcbench-healthcheck"
LISTEN_ADDRESS = "0.0.0.0"  # kube-proxy's default: every node address
REQUEST_LIMIT = 16 << 10  # bytes of request head read before giving up on a client
REQUEST_TIMEOUT_S = 5.0
NETNS_CHECK_S = 1.0
LOG_DIR = "/run/svcbench/healthcheck"
REPO_ROOT = str(Path(__file__).resolve().parents[1])
CONTROL_TIMEOUT_S = 10.0
SPAWN_TIMEOUT_S = 30.0  # a Python process starts slowly in the UML guest
STOP_TIMEOUT_S = 5.0

# (namespace, name, localEndpoints) per health-check port.
Table = dict[int, tuple[str, str, int]]


# --------------------------------------------------------------------------- HTTP


def response(namespace: str, name: str, local_endpoints: int, head_only: bool = False,
             healthy: bool = True) -> bytes:
    """kube-proxy's answer: 200 with local endpoints (and a healthy proxy), else 503."""
    ok = local_endpoints > 0 and healthy
    body = json.dumps({
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": healthy,
    }, indent="\t").encode()
    head = [
        "HTTP/1.1 200 OK" if ok else "HTTP/1.1 503 Service Unavailable",
        "Content-Type: application/json",
        "X-Content-Type-Options: nosniff",
        f"X-Load-Balancing-Endpoint-Weight: {local_endpoints}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (b"" if head_only else body)


def http_get(ip: str, port: int, timeout: float = 1.0, path: str = "/healthz"
             ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET from the calling thread's namespace: (status, headers, body).

    Raises OSError (refused, timeout, reset) when no answer comes.
    """
    with socket.create_connection((ip, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: svcbench\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionResetError(f"{ip}:{port} closed before a whole response head")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


# --------------------------------------------------------------------------- the server


@dataclass
class _Listener:
    namespace: str
    name: str
    count: int
    server: asyncio.AbstractServer | None = None
    closed: bool = False


class HealthServer:
    """The listeners of one node, keyed by port; `apply` makes them match a table."""

    def __init__(self, netns: str | None, listen: str = LISTEN_ADDRESS) -> None:
        self.netns = netns
        self.listen = listen
        self.ports: dict[int, _Listener] = {}
        self.tables = 0
        self.requests = 0

    def log(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} healthcheck[{os.getpid()}] {message}",
              file=sys.stderr, flush=True)

    async def apply(self, services: list) -> dict[str, Any]:
        wanted: Table = {}
        try:
            for port, namespace, name, count in services:
                if not (isinstance(port, int) and 0 < port < 65536):
                    raise ValueError(f"port {port!r} is not a TCP port")
                wanted[port] = (str(namespace), str(name), int(count))
        except (TypeError, ValueError) as exc:
            return {"ok": False, "error": f"table refused: {exc}"}
        self.tables += 1
        # Close what is gone or now belongs to another Service (kube-proxy's SyncServices).
        for port, entry in list(self.ports.items()):
            if wanted.get(port, ("", "", 0))[:2] != (entry.namespace, entry.name):
                self._close(port)
        errors = []
        for port, (namespace, name, count) in sorted(wanted.items()):
            entry = self.ports.get(port)
            if entry is not None:
                entry.count = count
                continue
            entry = _Listener(namespace, name, count)
            try:
                entry.server = await self._open(port, entry)
            except OSError as exc:
                # As kube-proxy: reported, and tried again on the next table.
                errors.append(f"{namespace}/{name} port {port}: {exc.strerror or exc}")
                self.log(f"cannot listen on {self.listen}:{port} for {namespace}/{name}: {exc}")
                continue
            self.ports[port] = entry
            self.log(f"listening on {self.listen}:{port} for {namespace}/{name}")
        return {"ok": not errors, "ports": sorted(self.ports), "errors": errors,
                "pid": os.getpid()}

    async def _open(self, port: int, entry: _Listener) -> asyncio.AbstractServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.listen, port))
        except OSError:
            sock.close()
            raise

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(entry, reader, writer)

        return await asyncio.start_server(serve, sock=sock, limit=REQUEST_LIMIT)

    def _close(self, port: int) -> None:
        entry = self.ports.pop(port)
        entry.closed = True
        if entry.server is not None:
            entry.server.close()
        self.log(f"closed port {port} of {entry.namespace}/{entry.name}")

    async def _serve(self, entry: _Listener, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            if not entry.closed:  # a listener closed meanwhile answers nothing, as kube-proxy
                self.requests += 1
                head_only = head.split(b" ", 1)[0].upper() == b"HEAD"
                writer.write(response(entry.namespace, entry.name, entry.count, head_only))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ValueError):
            pass  # a client that sent no whole request head gets nothing
        finally:
            writer.close()

    def status(self) -> dict[str, Any]:
        return {
            "ok": True, "pid": os.getpid(), "netns": self.netns, "tables": self.tables,
            "requests": self.requests,
            "ports": {str(p): [e.namespace, e.name, e.count]
                      for p, e in sorted(self.ports.items())},
        }

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return self.status()
        if op == "table":
            return await self.apply(request.get("services", []))
        if op == "stop":
            self.stop("stop requested")
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown op {op!r}; accepted: ping, table, stop"}

    async def control_client(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await serve_json_lines(self.handle, reader, writer)

    def stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.exit_reason = reason
            self.stopping.set()

    async def watch_netns(self) -> None:
        own = os.stat("/proc/self/ns/net").st_ino
        while not self.stopping.is_set():
            await asyncio.sleep(NETNS_CHECK_S)
            try:
                same = os.stat(os.path.join(NETNS_RUN_DIR, self.netns)).st_ino == own
            except OSError:
                same = False
            if not same:
                self.stop(f"netns {self.netns} is gone")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.exit_reason = ""
        try:
            control_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            control_sock.bind("\0" + CONTROL_NAME)
        except OSError as exc:
            self.log(f"cannot bind the control socket @{CONTROL_NAME}: {exc} "
                     "(another health server runs in this network namespace?)")
            return 1
        control = await asyncio.start_unix_server(self.control_client, sock=control_sock,
                                                  limit=64 << 20)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, signal.Signals(signum).name)
        watcher = asyncio.create_task(self.watch_netns()) if self.netns else None
        self.log(f"control @{CONTROL_NAME} (netns {self.netns})")
        try:
            await self.stopping.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            for port in list(self.ports):
                self._close(port)
            control.close()
        self.log(f"exiting: {self.exit_reason}")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataplanes.healthcheck",
                                     description="Health-check NodePorts of one node.")
    parser.add_argument("--netns", help="exit when NETNS (a name in /run/netns, or a path) is "
                        "gone or replaced")
    parser.add_argument("--listen", default=LISTEN_ADDRESS, help="address the ports bind")
    args = parser.parse_args(argv)
    return asyncio.run(HealthServer(args.netns, args.listen).run())


# --------------------------------------------------------------------------- the data plane side


def table(view) -> Table:
    """{port: (namespace, name, localEndpoints)} of a NodeView (kube.state.NodeView)."""
    out: Table = {}
    for sp in view.services:
        if sp.health_check_node_port is not None:
            out[sp.health_check_node_port] = (sp.namespace, sp.service,
                                              sp.health_check_local_endpoints)
    return out


class HealthCheckError(RuntimeError):
    """The node's health server did not start or refused a table (the message says why)."""


@dataclass(frozen=True)
class _Sent:
    pid: int
    start: int | None
    table: Table


# What this process last handed each node's server (or started it with), by network
# namespace: a sync whose table did not change and whose server is the same live process
# needs no round trip, so a mode's sync costs nothing more while no Service has a
# health-check port. (One process programs a node at a time: the CLI holds the run's lock.)
_sent: dict[str, _Sent] = {}
_sent_lock = threading.Lock()


def install(node) -> int:
    """Start the node's health server (none is listening yet); returns its pid."""
    return _ensure(node)


def sync(node, view) -> dict[str, Any]:
    """Hand the node's server the view's health-check ports; returns what it answered.

    A port it cannot listen on (in use) is reported in "errors" and tried again on the next
    sync, as kube-proxy does; only a server that cannot be reached or started raises.
    """
    wanted = table(view)
    with _sent_lock:
        last = _sent.get(node.netns)
    if last is not None and last.table == wanted and _proc_start(last.pid) == last.start:
        return {"ok": True, "pid": last.pid, "ports": sorted(wanted), "unchanged": True}
    request = {"op": "table",
               "services": [[p, ns, name, n] for p, (ns, name, n) in sorted(wanted.items())]}
    try:
        reply = _request(node, request)
    except OSError:
        _ensure(node)  # never installed, killed, or its node was recreated
        reply = _request(node, request)
    if "pid" not in reply:
        raise HealthCheckError(f"health server on {node.name} refused the table: "
                               f"{reply.get('error', reply)}")
    with _sent_lock:
        if reply.get("ok"):
            _sent[node.netns] = _Sent(reply["pid"], _proc_start(reply["pid"]), wanted)
        else:
            _sent.pop(node.netns, None)  # a port failed: try it again next sync
    return reply


def uninstall(node) -> None:
    """Stop the node's health server (its listeners close with it) and remove its log."""
    with _sent_lock:
        _sent.pop(node.netns, None)
    pid = server_pid(node)
    if pid is not None:
        try:
            _request(node, {"op": "stop"}, timeout=STOP_TIMEOUT_S)
        except OSError:
            pass  # killed below
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _proc_start(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        if _proc_start(pid) is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.unlink(_log_path(node))
    except FileNotFoundError:
        pass


def status(node) -> dict[str, Any] | None:
    """The server's own account (pid, ports with their Services and counts), None if none."""
    try:
        return _request(node, {"op": "ping"}, timeout=2.0)
    except OSError:
        return None


def summary(node) -> dict[str, Any]:
    """For `svcbench status`: whether the node's health server answers, its pid and how
    many health-check NodePorts it serves."""
    reply = status(node)
    if not reply:
        return {"running": False, "pid": None, "ports": 0}
    return {"running": True, "pid": reply.get("pid"), "ports": len(reply.get("ports") or {})}


def server_pid(node) -> int | None:
    reply = status(node)
    return reply.get("pid") if reply else None


def _request(node, request: dict[str, Any], timeout: float = CONTROL_TIMEOUT_S
             ) -> dict[str, Any]:
    return node.call(_control, json.dumps(request).encode(), timeout)


def _control(payload: bytes, timeout: float) -> dict[str, Any]:
    """One JSON-line request on the abstract socket of the calling thread's namespace."""
    return request_json_line(CONTROL_NAME, payload, timeout, "the health server")


def _ensure(node) -> int:
    """The pid of the node's server, started when none answers."""
    pid = server_pid(node)
    if pid is not None:
        return pid
    log_path = _log_path(node)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sweep_logs(LOG_DIR)
    argv = [sys.executable, "-m", "dataplanes.healthcheck", "--netns", node.netns]
    proc = node.call(_spawn, argv, log_path)
    # Reaped whenever it exits, so it never lingers as a zombie of this process.
    threading.Thread(target=proc.wait, name=f"reap:healthcheck:{node.name}", daemon=True).start()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HealthCheckError(
                f"health server on {node.name} exited with status {proc.returncode} before "
                f"answering; {log_path} ends with:\n{log_tail(log_path)}")
        if server_pid(node) == proc.pid:
            with _sent_lock:  # a new server listens on nothing: an empty table is no news
                _sent[node.netns] = _Sent(proc.pid, _proc_start(proc.pid), {})
            return proc.pid
        time.sleep(0.02)
    proc.kill()
    raise HealthCheckError(f"health server on {node.name} did not answer within "
                           f"{SPAWN_TIMEOUT_S:.0f} s; {log_path} ends with:\n{log_tail(log_path)}")


def _spawn(argv: list[str], log_path: str) -> subprocess.Popen:
    """Forked from a thread in the node's namespace, the server is born there."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                close_fds=True)


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def _log_path(node) -> str:
    # A node that names its run's folder keeps the log there, removed with the run.
    run_dir = getattr(node, "run_dir", None)
    if run_dir:
        return os.path.join(run_dir, f"healthcheck-{node.name}.log")
    return os.path.join(LOG_DIR, f"{node.netns.rsplit('/', 1)[-1]}.log")


if __name__ == "__main__":
    sys.exit(main())
