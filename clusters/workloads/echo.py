"""Echo backends for every pod on a node, served by one agent process per node.

The agent runs in the node's network namespace and opens each pod's listening sockets
inside that pod's namespace (a thread enters it, binds, and hands the socket to the event
loop), so one process serves every pod on the node. It is steered over a Unix socket with
JSON lines: {"op": "set", "backends": [...]}, "ping", "stats", "stop".

Wire protocol. TCP: on accept the backend sends "<ns/pod> <client_ip>:<client_port>\\n",
then echoes every byte until EOF and closes. UDP: each datagram is answered with that line
followed by the datagram's bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusters.nsenter import in_netns, netns_inode, netns_path
from kube.model import PROTOCOLS, TCP

try:
    import uvloop
except ImportError:  # plain asyncio still works, only slower
    uvloop = None

LISTEN_BACKLOG = 4096
NETNS_CHECK_S = 1.0
CONTROL_LINE_LIMIT = 16 << 20
# A loaded User-Mode-Linux guest makes system calls slowly: give agents longer there.
SPAWN_TIMEOUT_S = 60.0 if os.environ.get("SVCBENCH_KERNEL") == "uml" else 10.0
REPO_ROOT = str(Path(__file__).resolve().parents[2])


class AgentError(RuntimeError):
    """The echo agent did not start, or refused a request (the message says why)."""


@dataclass
class BackendSpec:
    pod: str  # "ns/name"
    netns: str  # the pod's network namespace
    ip: str  # the pod IP the listeners bind to
    ports: list[tuple[int, str]] = field(default_factory=list)  # (port, "TCP"|"UDP")

    def to_json(self) -> dict[str, Any]:
        return {"pod": self.pod, "netns": self.netns, "ip": self.ip,
                "ports": [[int(port), proto] for port, proto in self.ports]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BackendSpec:
        pod = obj.get("pod")
        if not isinstance(pod, str) or "/" not in pod:
            raise ValueError(f"backend {obj!r}: field pod must be 'namespace/name'")
        for name in ("netns", "ip"):
            if not isinstance(obj.get(name), str) or not obj[name]:
                raise ValueError(f"backend {pod}: field {name} must be a non-empty string")
        ports = []
        for entry in obj.get("ports", []):
            port, proto = entry
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"backend {pod}: port {port!r} must be 1-65535")
            if proto not in PROTOCOLS:
                raise ValueError(f"backend {pod}: protocol {proto!r} must be one of {PROTOCOLS}")
            ports.append((port, proto))
        return cls(pod, obj["netns"], obj["ip"], ports)


# (pod, netns, ip, port, protocol): a listener is reopened when any of these changes.
ListenerKey = tuple[str, str, str, int, str]


@dataclass(slots=True)
class PodCounters:
    connections: int = 0  # TCP connections accepted
    active: int = 0  # TCP connections open now
    datagrams: int = 0  # UDP datagrams answered

    def to_json(self) -> dict[str, int]:
        return {"connections": self.connections, "active": self.active,
                "datagrams": self.datagrams}


class EchoStream(asyncio.Protocol):
    """One accepted TCP connection: greet with identity and peer, then echo until EOF."""

    __slots__ = ("pod", "counters", "transport")

    def __init__(self, pod: bytes, counters: PodCounters) -> None:
        self.pod = pod
        self.counters = counters
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.counters.connections += 1
        self.counters.active += 1
        peer = transport.get_extra_info("peername")
        if not peer:  # reset before we looked: nobody to greet
            transport.abort()
            return
        transport.write(b"%s %s:%d\n" % (self.pod, peer[0].encode(), peer[1]))

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the echoed bytes are flushed

    def pause_writing(self) -> None:
        # a client that sends without reading must not grow our buffers without bound
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.counters.active -= 1


class EchoDatagram(asyncio.DatagramProtocol):
    """UDP: answer each datagram with identity and peer, then the datagram's bytes."""

    def __init__(self, pod: bytes, counters: PodCounters) -> None:
        self.pod = pod
        self.counters = counters
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.counters.datagrams += 1
        self.transport.sendto(b"%s %s:%d\n%s" % (self.pod, addr[0].encode(), addr[1], data), addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for one client says nothing about the next


@dataclass
class Listener:
    key: ListenerKey
    netns_ino: int  # the namespace the socket really lives in
    server: asyncio.AbstractServer | None = None
    transport: asyncio.BaseTransport | None = None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.transport is not None:
            self.transport.close()


def bind_in_current_netns(keys: list[ListenerKey]) -> tuple[int, list[socket.socket | OSError]]:
    """Create and bind each key's socket in the calling thread's network namespace."""
    ino = os.stat("/proc/thread-self/ns/net").st_ino
    made: list[socket.socket | OSError] = []
    for _pod, _netns, ip, port, proto in keys:
        kind = socket.SOCK_STREAM if proto == TCP else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            if proto == TCP:
                sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            made.append(sock)
        except OSError as exc:
            sock.close()
            made.append(exc)
    return ino, made


class EchoAgent:
    """Holds the listeners of every pod on the node and converges them to `set` requests."""

    def __init__(self, control_path: str, netns: str | None) -> None:
        self.control_path = control_path
        self.netns = netns
        self.listeners: dict[ListenerKey, Listener] = {}
        self.counters: dict[str, PodCounters] = {}
        self.converging = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.exit_reason = ""

    def log(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} echo[{os.getpid()}] {message}", file=sys.stderr, flush=True)

    def stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.exit_reason = reason
            self.stopping.set()

    async def converge(self, specs: list[BackendSpec]) -> dict[str, Any]:
        async with self.converging:
            return await self._converge(specs)

    async def _converge(self, specs: list[BackendSpec]) -> dict[str, Any]:
        wanted: set[ListenerKey] = {
            (s.pod, s.netns, s.ip, port, proto) for s in specs for port, proto in s.ports
        }
        closed = 0
        current_ino = {ns: _inode_or_none(ns) for ns in {key[1] for key in self.listeners}}
        for key, listener in list(self.listeners.items()):
            # a namespace deleted and made again under the same name needs new sockets
            if key not in wanted or current_ino[key[1]] != listener.netns_ino:
                listener.close()
                del self.listeners[key]
                closed += 1
        by_netns: dict[str, list[ListenerKey]] = {}
        for key in sorted(wanted - self.listeners.keys()):
            by_netns.setdefault(key[1], []).append(key)
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(None, _bind_in_netns, ns, keys) for ns, keys in by_netns.items())
        )
        opened = 0
        errors: list[str] = []
        for (ns, keys), (ino, made) in zip(by_netns.items(), results, strict=True):
            for key, sock in zip(keys, made, strict=True):
                pod, _, ip, port, proto = key
                if isinstance(sock, OSError):
                    errors.append(f"pod {pod}: {proto} {ip}:{port} in netns {ns}: {sock.strerror or sock}")
                    continue
                try:
                    self.listeners[key] = await self._serve(key, ino, sock)
                    opened += 1
                except OSError as exc:
                    sock.close()
                    errors.append(f"pod {pod}: {proto} {ip}:{port}: {exc}")
        pods = {s.pod for s in specs}
        self.counters = {pod: c for pod, c in self.counters.items() if pod in pods}
        if opened or closed or errors:
            self.log(f"set: {len(self.listeners)} listening, +{opened} -{closed}, {len(errors)} errors")
        for line in errors:
            self.log(line)
        return {"ok": not errors, "listening": len(self.listeners), "opened": opened,
                "closed": closed, "errors": errors}

    async def _serve(self, key: ListenerKey, ino: int, sock: socket.socket) -> Listener:
        loop = asyncio.get_running_loop()
        pod = key[0]
        counters = self.counters.setdefault(pod, PodCounters())
        name = pod.encode()
        if key[4] == TCP:
            server = await loop.create_server(
                lambda: EchoStream(name, counters), sock=sock, backlog=LISTEN_BACKLOG
            )
            return Listener(key, ino, server=server)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: EchoDatagram(name, counters), sock=sock
        )
        return Listener(key, ino, transport=transport)

    def close_orphans(self) -> None:
        """Release sockets whose pod namespace is gone, so the kernel can free it."""
        inodes = {ns: _inode_or_none(ns) for ns in {key[1] for key in self.listeners}}
        for key, listener in list(self.listeners.items()):
            if inodes[key[1]] != listener.netns_ino:
                listener.close()
                del self.listeners[key]
                self.log(f"closed {key[4]} {key[2]}:{key[3]} of {key[0]}: netns {key[1]} is gone")

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "netns": self.netns}
        if op == "set":
            try:
                specs = [BackendSpec.from_json(b) for b in request.get("backends", [])]
            except (ValueError, TypeError, AttributeError) as exc:
                return {"ok": False, "error": str(exc), "errors": [str(exc)]}
            return await self.converge(specs)
        if op == "stats":
            return {"ok": True, "listening": len(self.listeners),
                    "pods": {pod: c.to_json() for pod, c in sorted(self.counters.items())}}
        if op == "stop":
            self.stop("stop requested")
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}; accepted: ping, set, stats, stop"}

    async def control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    reply = await self.handle(request if isinstance(request, dict) else {})
                except json.JSONDecodeError as exc:
                    reply = {"ok": False, "error": f"request is not JSON: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that went away or sent garbage only loses its own connection
        finally:
            writer.close()

    async def watch_netns(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(NETNS_CHECK_S)
            if self.netns and not os.path.exists(netns_path(self.netns)):
                self.stop(f"netns {self.netns} was deleted")
            self.close_orphans()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if _control_answers(self.control_path):
            self.log(f"another agent already answers on {self.control_path}")
            return 1
        if os.path.exists(self.control_path):
            os.unlink(self.control_path)  # left by an agent that was killed
        control = await asyncio.start_unix_server(
            self.control_client, path=self.control_path, limit=CONTROL_LINE_LIMIT
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, signal.Signals(signum).name)
        watcher = asyncio.create_task(self.watch_netns())
        self.log(f"listening for control on {self.control_path} (netns {self.netns}, "
                 f"loop {type(loop).__module__})")
        try:
            await self.stopping.wait()
        finally:
            watcher.cancel()
            for listener in self.listeners.values():
                listener.close()
            self.listeners.clear()
            control.close()
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
        self.log(f"exiting: {self.exit_reason}")
        return 0


def _inode_or_none(netns: str) -> int | None:
    try:
        return netns_inode(netns)
    except OSError:
        return None


def _bind_in_netns(netns: str, keys: list[ListenerKey]) -> tuple[int, list[socket.socket | OSError]]:
    try:
        return in_netns(netns, bind_in_current_netns, keys)
    except FileNotFoundError:
        return 0, [OSError(errno.ENOENT, "network namespace does not exist")] * len(keys)
    except OSError as exc:  # the namespace exists but cannot be entered
        return 0, [exc] * len(keys)


def _control_answers(path: str) -> bool:
    try:
        return AgentClient(path, timeout=1.0).ping()
    except OSError:
        return False


class AgentClient:
    """Talks to one echo agent over its control socket (one connection per request)."""

    def __init__(self, control_path: str, timeout: float = 30.0) -> None:
        self.control_path = control_path
        self.timeout = timeout

    def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout if timeout is None else timeout)
            sock.connect(self.control_path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise AgentError(f"echo agent at {self.control_path} closed the control "
                                     f"connection without answering {message.get('op')!r}")
                buf += chunk
        return json.loads(buf)

    def ping(self) -> bool:
        try:
            return self.request({"op": "ping"}, timeout=min(self.timeout, 2.0)).get("ok") is True
        except (OSError, ValueError, AgentError):
            return False

    def set_backends(self, backends: list[BackendSpec]) -> dict[str, Any]:
        """Converge the agent's listeners to exactly these backends; raise if any failed."""
        reply = self.request({"op": "set", "backends": [b.to_json() for b in backends]})
        if not reply.get("ok"):
            problems = reply.get("errors") or [reply.get("error", "no reason given")]
            raise AgentError(f"echo agent at {self.control_path} could not open "
                             f"{len(problems)} listener(s): " + "; ".join(problems))
        return reply

    def stats(self) -> dict[str, Any]:
        return self.request({"op": "stats"})

    def stop(self) -> None:
        """Ask the agent to exit and wait until it has closed its listeners; idempotent."""
        try:
            self.request({"op": "stop"}, timeout=5.0)
        except (FileNotFoundError, ConnectionRefusedError):
            return  # already gone
        deadline = time.monotonic() + 5.0
        while os.path.exists(self.control_path) and time.monotonic() < deadline:
            time.sleep(0.01)


def _log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines)).rstrip() or "(log is empty)"
    except OSError as exc:
        return f"(log unreadable: {exc})"


def spawn_agent(netns: str, control_path: str, log_path: str,
                timeout: float = SPAWN_TIMEOUT_S) -> int:
    """Start a detached echo agent in `netns`; return its pid once it answers ping."""
    if len(control_path.encode()) > 107:
        raise ValueError(f"control path {control_path!r} is longer than a Unix socket allows (107 bytes)")
    for path in (control_path, log_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # nsenter joins only the network namespace: unlike `ip netns exec` it makes no mount
    # namespace per agent, so pod namespaces created later are visible without propagation
    argv = [_which("nsenter"), f"--net={netns_path(netns)}", sys.executable, "-m",
            "clusters.workloads.echo", "--control", control_path, "--netns", netns]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        # nsenter execs the command itself (it forks only for a pid namespace): same pid
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, close_fds=True)
    # reap the agent whenever it exits so it never lingers as a zombie of the caller
    threading.Thread(target=proc.wait, name=f"reap:echo:{netns}", daemon=True).start()
    client = AgentClient(control_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AgentError(f"echo agent in netns {netns} exited with status {proc.returncode} "
                             f"before answering; {log_path} ends with:\n{_log_tail(log_path)}")
        try:
            reply = client.request({"op": "ping"}, timeout=0.5)
            if reply.get("ok") and reply.get("pid") == proc.pid:
                return proc.pid
        except (OSError, ValueError, AgentError):
            pass
        time.sleep(0.02)
    proc.kill()
    raise AgentError(f"echo agent in netns {netns} did not answer ping on {control_path} within "
                     f"{timeout:.0f} s; {log_path} ends with:\n{_log_tail(log_path)}")


def _which(cmd: str) -> str:
    found = shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise AgentError(f"{cmd} not found; install util-linux")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusters.workloads.echo",
                                     description="Echo backends for every pod on one node.")
    parser.add_argument("--control", required=True, help="Unix socket path for JSON-line control")
    parser.add_argument("--netns", help="exit when /run/netns/NETNS disappears")
    args = parser.parse_args(argv)

    async def serve() -> int:
        return await EchoAgent(args.control, args.netns).run()

    if uvloop is not None:
        return uvloop.run(serve())
    return asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())
