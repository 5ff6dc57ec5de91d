"""How fast the userspace proxy opens new connections, and what it adds to each one.

Two measurements on one cluster (client pod on node1, backends on node2, the proxy that
serves the client on node1):

- rate: a load generator in the client pod keeps `concurrency` connections in flight for
  `duration_s`; each connects to the ClusterIP, reads the backend's greeting and resets.
  Reported: connections per second, and connections per second of the proxy's own CPU
  time (what one core sustains), next to the same load aimed at a pod IP (the ceiling of
  client and backend without the proxy). With `pin`, the proxy runs on CPU 0 and the load
  generator and echo agents on CPU 1 (a single-threaded proxy never uses more than one
  core either way).
- latency: one connection at a time to the first and the last of N Services, against
  the pod IP directly (the floor), for each N in `sizes`; the proxy's lookup is a dict, so
  the added p50 must stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.sweep import Row, percentile, summarize
from bench.synthetic import NAMESPACE, SERVICE_PORT, pool_pods, synthetic_services
from clusters.netns import NetnsCluster
from clusters.nsenter import in_netns
from clusters.workloads.probe import probe
from dataplanes.proxy import ServiceProxy
from dataplanes.userspace import UserspaceDataplane
from kube.model import Node, Pod
from kube.tracker import ChangeTracker

MODE = "userspace"
BACKEND_PORT = 8080
CLIENT = Pod(NAMESPACE, "client", {"app": "client"}, node_name="node1")
SIZES = (1, 10, 100, 1000, 10000)
PROXY_CPU = 0
LOAD_CPU = 1
REPO_ROOT = str(Path(__file__).resolve().parents[1])
_LINGER_RESET = struct.pack("ii", 1, 0)


# --------------------------------------------------------------------------- load generator


async def _load(ip: str, port: int, seconds: float, concurrency: int) -> dict:
    """Connections opened back to back by `concurrency` workers until the time is up."""
    loop = asyncio.get_running_loop()
    done = failed = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            # A reset, not a FIN: no TIME_WAIT, so ports never run out however long it runs.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            start = time.perf_counter()
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), 2.0)
                buf = b""
                while b"\n" not in buf:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 256), 2.0)
                    if not chunk:
                        raise ConnectionResetError("closed before the greeting")
                    buf += chunk
                done += 1
                latencies.append((time.perf_counter() - start) * 1e6)
            except (OSError, TimeoutError):
                failed += 1
            finally:
                sock.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {"connections": done, "failed": failed, "seconds": elapsed,
            "rate": done / elapsed if elapsed else 0.0,
            "p50_us": percentile(latencies, 0.5), "p99_us": percentile(latencies, 0.99)}


def run_load(ip: str, port: int, seconds: float, concurrency: int, cpu: int | None) -> dict:
    """The load generator as its own process, born in the calling thread's network namespace."""
    argv = [sys.executable, "-m", "bench.userspace_rate", "--load", ip, str(port),
            "--seconds", str(seconds), "--concurrency", str(concurrency)]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f"load generator failed ({res.returncode}): {res.stderr.strip()}")
    return json.loads(res.stdout)


# --------------------------------------------------------------------------- the benchmark


def _pin(pid: int, cpu: int) -> None:
    if cpu < os.cpu_count():
        os.sched_setaffinity(pid, {cpu})


def bench_userspace(
    duration_s: float = 5.0,
    concurrency: int = 32,
    repeats: int = 3,
    sizes: tuple[int, ...] | list[int] = SIZES,
    latency_count: int = 500,
    endpoints: int = 3,
    pin: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Proxied connections per second and p50 added latency over the floor, as Rows."""
    say = progress or (lambda _msg: None)
    kernel = os.uname().release
    nodes = [Node.numbered(1), Node.numbered(2)]
    tracker = ChangeTracker(nodes)
    tracker.apply(pods=[CLIENT, *pool_pods(["node2"], max(endpoints, 3))])
    pods = sorted(tracker.pods.values(), key=lambda p: p.name)
    pool = [p for p in pods if p.name != CLIENT.name]
    floor_ip = pool[0].ip
    dp = UserspaceDataplane()
    rows: list[Row] = []
    with NetnsCluster.create(len(nodes), progress=say) as cluster:
        cluster.set_pods(pods)
        with ServiceProxy(dp, cluster.nodes, tracker) as proxy:  # installed on every node
            rows += _measure(proxy, cluster, pool, floor_ip, duration_s, concurrency, repeats,
                             sizes, latency_count, endpoints, pin, say, kernel)
    return rows


def _measure(proxy: ServiceProxy, cluster: NetnsCluster, pool: list[Pod], floor_ip: str,
             duration_s: float, concurrency: int, repeats: int, sizes, latency_count: int,
             endpoints: int, pin: bool, say: Callable[[str], None], kernel: str) -> list[Row]:
    dp, tracker = proxy.dataplane, proxy.tracker
    rows: list[Row] = []

    def row(n: int, metric: str, stat: str, value: float, unit: str, repeat: int = 0,
            **extra) -> None:
        rows.append(Row(MODE, kernel, n, metric, stat, round(value, 3), unit, repeat, extra))

    client_ns = cluster.pod_netns(NAMESPACE, CLIENT.name)
    node1 = cluster.node("node1")
    if pin:
        _pin(dp.proxy_pid(node1), PROXY_CPU)
        for info in cluster.state["nodes"]:
            if info.get("agent"):
                _pin(info["agent"]["pid"], LOAD_CPU)
    services, slices = synthetic_services(1, pool, endpoints)
    proxy.replace(services=services, slices=slices)
    vip = tracker.services[services[0].key].cluster_ip
    cpu = LOAD_CPU if pin else None

    for repeat in range(repeats):
        say(f"{MODE}: rate, repeat {repeat + 1}/{repeats}: pod IP")
        direct = in_netns(client_ns, run_load, floor_ip, BACKEND_PORT, duration_s, concurrency, cpu)
        row(1, "floor_conn_rate", "mean", direct["rate"], "conn/s", repeat, target=floor_ip)
        say(f"{MODE}: rate, repeat {repeat + 1}/{repeats}: ClusterIP")
        before = dp.stats(node1)
        load = in_netns(client_ns, run_load, vip, SERVICE_PORT, duration_s, concurrency, cpu)
        after = dp.stats(node1)
        cpu_s = after["cpu_s"] - before["cpu_s"]
        proxied = after["connections"] - before["connections"]
        row(1, "proxied_conn_rate", "mean", load["rate"], "conn/s", repeat, target=vip,
            failed=load["failed"], p50_us=load["p50_us"], p99_us=load["p99_us"])
        row(1, "proxy_conn_per_cpu_s", "mean", proxied / cpu_s if cpu_s > 0 else 0.0,
            "conn/cpu-s", repeat, proxy_cpu_s=cpu_s, proxied=proxied)
        row(1, "proxy_cpu_share", "mean", cpu_s / load["seconds"], "cores", repeat)
        # System time includes the peers' receive paths, which veth runs in the sender's context.
        for part in ("user", "sys"):
            spent = after[f"cpu_{part}_s"] - before[f"cpu_{part}_s"]
            row(1, f"proxy_{part}_us_per_conn", "mean", 1e6 * spent / max(proxied, 1), "us",
                repeat)

    for n in sizes:
        say(f"{MODE}: programming {n} services")
        services, slices = synthetic_services(n, pool, endpoints)
        # Up from the previous size: one replace, every node's update (or full sync).
        for stats in proxy.replace(services=services, slices=slices):
            row(n, "sync_s", "grow", stats.seconds, "s", node=stats.node, full=stats.full,
                proxy_apply_s=stats.extra.get("proxy_apply_s"))
        first = tracker.services[services[0].key].cluster_ip
        last = tracker.services[services[-1].key].cluster_ip
        say(f"{MODE}: probing at {n} services")
        for repeat in range(repeats):
            samples = {}
            for label, ip, port in (("floor", floor_ip, BACKEND_PORT),
                                    ("first", first, SERVICE_PORT),
                                    ("last", last, SERVICE_PORT)):
                result = in_netns(client_ns, probe, ip, port, count=latency_count)
                ok = [s.latency_us for s in result.samples if s.outcome == "ok"]
                samples[label] = percentile(ok, 0.5)
                metric = "floor_conn_latency_us" if label == "floor" else f"conn_latency_us:{label}"
                row(n, metric, "p50", samples[label], "us", repeat, target=ip,
                    failed=len(result.samples) - len(ok))
            for label in ("first", "last"):
                row(n, f"added_latency_us:{label}", "p50", samples[label] - samples["floor"],
                    "us", repeat)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.userspace_rate",
                                     description="Userspace proxy: connection rate and added latency.")
    parser.add_argument("--load", nargs=2, metavar=("IP", "PORT"),
                        help="only run the load generator against IP PORT (in this namespace)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cpu", type=int, help="pin the load generator to this CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--count", type=int, default=500, help="connections per latency sample")
    parser.add_argument("--pin", action="store_true",
                        help="proxy on CPU 0, load generator and echo agents on CPU 1")
    args = parser.parse_args(argv)
    if args.load:
        if args.cpu is not None:
            _pin(0, args.cpu)
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            run = asyncio.run
        result = run(_load(args.load[0], int(args.load[1]), args.seconds, args.concurrency))
        print(json.dumps(result))
        return 0
    rows = bench_userspace(args.seconds, args.concurrency, args.repeats,
                           [int(s) for s in args.sizes.split(",") if s], args.count,
                           pin=args.pin, progress=lambda m: print(m, file=sys.stderr))
    for line in summarize(rows):
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
