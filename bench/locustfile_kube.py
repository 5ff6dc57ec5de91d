"""The locustfile of distributed locust on a real cluster (kube/deploy.py's locust_objects).

Each request opens one new TCP connection to $SVCBENCH_TARGET ("ip:port", a Service),
reads the echo backend's greeting line and resets the connection, as the namespace
cluster's throughput_rps does (bench/locust_load.py). Only loaded by `locust -f` in the
master and worker pods: importing locust monkey-patches sockets.
"""

from __future__ import annotations

import os
import time

from locust import User, constant, task

from bench.locust_load import greet_once


def target() -> tuple[str, int]:
    ip, _, port = os.environ.get("SVCBENCH_TARGET", "127.0.0.1:8080").rpartition(":")
    return ip, int(port)


class ConnectionUser(User):
    wait_time = constant(0)

    @task
    def new_connection(self) -> None:
        ip, port = target()
        start = time.perf_counter()
        error = greet_once(ip, port)
        self.environment.events.request.fire(
            request_type="tcp", name=f"{ip}:{port}",
            response_time=(time.perf_counter() - start) * 1000.0, response_length=0,
            exception=error, context={})
