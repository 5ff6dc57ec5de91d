"""One pod's echo backend, for a container on a real cluster (kube/deploy.py's echo pods).

On a namespace cluster one agent per node serves every pod (clusters/workloads/echo.py); in
a Kubernetes pod the container is already in the pod's network namespace, so this binds
its ports on 0.0.0.0 there and speaks the same wire protocol: TCP greets with
"<namespace>/<pod> <client_ip>:<client_port>\\n" then echoes, UDP answers each datagram with
that line and the datagram. The pod's name comes from the downward API (POD_NAMESPACE,
POD_NAME); ports from --port PORT/PROTO (default TCP and UDP 8080, as echo.py).

    python -m clusters.workloads.echo_pod --port 8080/TCP --port 8080/UDP
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from clusters.workloads.echo import (
    EchoDatagram,
    EchoStream,
    PodCounters,
    bind_in_current_netns,
)
from kube.model import DEFAULT_BACKEND_PORT, PROTOCOLS, TCP, UDP

try:
    import uvloop
except ImportError:  # plain asyncio still works, only slower
    uvloop = None


def parse_port(text: str) -> tuple[int, str]:
    """"8080/TCP" -> (8080, "TCP"); a bare port is TCP."""
    port, _, proto = text.partition("/")
    proto = (proto or TCP).upper()
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not 0 < number < 65536 or proto not in PROTOCOLS:
        raise argparse.ArgumentTypeError(
            f"--port must be PORT/PROTO with a port from 1 to 65535 and a protocol of "
            f"{', '.join(PROTOCOLS)}, not {text!r}")
    return number, proto


def pod_name(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return f"{env.get('POD_NAMESPACE', 'default')}/{env.get('POD_NAME', os.uname().nodename)}"


async def serve(pod: str, ports: list[tuple[int, str]]) -> int:
    loop = asyncio.get_running_loop()
    keys = [(pod, "", "0.0.0.0", port, proto) for port, proto in ports]
    _ino, made = bind_in_current_netns(keys)
    errors = [f"{key[4]} {key[3]}: {sock}" for key, sock in zip(keys, made, strict=True)
              if isinstance(sock, OSError)]
    if errors:
        print(f"echo_pod {pod}: cannot listen: {'; '.join(errors)}", file=sys.stderr, flush=True)
        return 1
    counters, name, closers = PodCounters(), pod.encode(), []
    for key, sock in zip(keys, made, strict=True):
        if key[4] == TCP:
            closers.append(await loop.create_server(lambda: EchoStream(name, counters), sock=sock))
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: EchoDatagram(name, counters), sock=sock)
            closers.append(transport)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"echo_pod {pod}: serving {', '.join(f'{p}/{q}' for p, q in ports)}", flush=True)
    await stop.wait()
    for closer in closers:
        closer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusters.workloads.echo_pod",
                                     description="The echo backend of the pod it runs in.")
    parser.add_argument("--port", action="append", type=parse_port, dest="ports",
                        help="PORT/PROTO to serve (repeatable; default 8080/TCP and 8080/UDP)")
    args = parser.parse_args(argv)
    ports = args.ports or [(DEFAULT_BACKEND_PORT, TCP), (DEFAULT_BACKEND_PORT, UDP)]
    runner = uvloop.run if uvloop is not None else asyncio.run
    return runner(serve(pod_name(), ports))


if __name__ == "__main__":
    sys.exit(main())
