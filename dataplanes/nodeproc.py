"""What the per-node processes of the modes share (the userspace proxy, the health-check
server): their JSON-lines control channel, and the logs they leave on the host."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

NETNS_RUN_DIR = "/run/netns"


async def serve_json_lines(handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
                           reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One control client: a JSON object per line in, `handle`'s reply per line out."""
    try:
        while line := await reader.readline():
            try:
                request = json.loads(line)
                reply = await handle(request if isinstance(request, dict) else {})
            except json.JSONDecodeError as exc:
                reply = {"ok": False, "error": f"request is not JSON: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass  # a client that went away only loses its own connection
    finally:
        writer.close()


def request_json_line(name: str, payload: bytes, timeout: float, who: str) -> dict[str, Any]:
    """One JSON-line request to the process listening on abstract socket `name` of the
    calling thread's network namespace (run it through NodeHandle.call); `who` names it in
    the error when it closes the connection unanswered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect("\0" + name)
        sock.sendall(payload + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionResetError(f"{who} closed the control connection")
            buf += chunk
    return json.loads(buf)


def sweep_logs(log_dir: str) -> None:
    """Remove `log_dir`'s NETNS.log files whose network namespace is gone (a run destroyed
    without uninstall)."""
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(".log") and not os.path.exists(os.path.join(NETNS_RUN_DIR, name[:-4])):
            try:
                os.unlink(os.path.join(log_dir, name))
            except FileNotFoundError:
                pass


def log_tail(path: str, lines: int = 15) -> str:
    """The last lines of a process's log, for an error message."""
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:]).rstrip() or "(log is empty)"
    except OSError as exc:
        return f"(log unreadable: {exc})"
