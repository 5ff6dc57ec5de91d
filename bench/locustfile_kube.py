"""The locustfile of distributed locust on a real cluster (kube/deploy.py's locust_objects).

Each request opens one new TCP connection to $SVCBENCH_TARGET ("ip:port", a Service),
reads the echo backend's greeting line and resets the connection, as the namespace
cluster's throughput_rps does (bench/locust_load.py). Only loaded by `locust -f` in the
master and worker pods: importing locust monkey-patches sockets.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from locust import User, constant, task

_LINGER_RESET = struct.pack("ii", 1, 0)


def target() -> tuple[str, int]:
    ip, _, port = os.environ.get("SVCBENCH_TARGET", "127.0.0.1:8080").rpartition(":")
    return ip, int(port)


class ConnectionUser(User):
    wait_time = constant(0)

    @task
    def new_connection(self) -> None:
        ip, port = target()
        start = time.perf_counter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        error: Exception | None = None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.settimeout(2.0)
            sock.connect((ip, port))
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionResetError("closed before the greeting")
                buf += chunk
        except OSError as exc:
            error = exc
        finally:
            sock.close()
        self.environment.events.request.fire(
            request_type="tcp", name=f"{ip}:{port}",
            response_time=(time.perf_counter() - start) * 1000.0, response_length=0,
            exception=error, context={})
