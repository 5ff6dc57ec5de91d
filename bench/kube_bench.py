"""`svcbench bench --cluster kind|kubeconfig`: what the sweep measures, over the API.

Metric names are the namespace cluster's where the meaning is the same (bench/metrics.py):
- `programming_latency_s`: network programming latency as Kubernetes' SLI defines it
  (sig-scalability's "in-cluster network programming latency": from a Service or its
  endpoints changing in the API to the change serving traffic): one Service's selector is
  switched between two echo pods; every node's probe pod, already probing its ClusterIP in
  a loop, reports the wall-clock time of its first connection answered by the new pod. One
  sample per change and node; p50/p90/p99 over all of them.
- `conn_latency_us`: new connection (connect to greeting) from every node's probe pod to the
  first, the last and random ones of N Services.
- `throughput_rps`: new connections per second to the last Service, distributed locust
  (a master and two workers, kube/deploy.py's locust_objects), from its final stats.
- `proxy_cpu_cores`, `proxy_memory_bytes`: the proxy pods (kube-proxy, or svcbench's agent)
  from the metrics API (metrics.k8s.io), summed over nodes; without metrics-server, the
  agent's cgroup (cpu.stat, memory.current) read by exec.
- `sync_proxy_rules_s`: kube-proxy's `kubeproxy_sync_proxy_rules_duration_seconds`
  histogram, scraped from 127.0.0.1:10249 inside the hostNetwork probe pod of each node;
  quantiles as Prometheus' histogram_quantile computes them.

The computations (percentiles, histogram quantiles, quantities) are plain functions tested
offline; the live parts need a cluster and are exercised only where one can run.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from clusters.workloads.probe import OK, _percentile
from kube import deploy

SYNC_METRIC = "kubeproxy_sync_proxy_rules_duration_seconds"
PROBE_NS = "bench"
ECHO = "svcbench-echo"
LAT_SERVICE = "svcbench-latency"


@dataclass
class Row:
    mode: str
    metric: str
    services: int
    stat: str  # p50, p90, p99, value
    value: float | None
    unit: str
    samples: int
    repeat: int = 0  # which of --repeats measured it (0-based), as bench.csv's column

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50/p90/p99 of recorded timings (linear between closest ranks, as the probe's)."""
    ordered = sorted(v for v in values if v is not None and not math.isnan(v))
    return {f"p{q}": _percentile(ordered, q) for q in (50, 90, 99)}


def rows(mode: str, metric: str, services: int, unit: str, values: list[float],
         repeat: int = 0) -> list[Row]:
    return [Row(mode, metric, services, stat, value, unit, len(values), repeat)
            for stat, value in percentiles(values).items()]


# --------------------------------------------------------------------------- parsing


def parse_histogram(text: str, name: str = SYNC_METRIC) -> list[tuple[float, float]]:
    """The cumulative (upper bound, count) buckets of histogram `name` in Prometheus text,
    summed over every label set, sorted by bound (+Inf last)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return sorted(buckets.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket that holds the
    q-th observation; the highest finite bound when it falls in +Inf; None when empty."""
    if not buckets or buckets[-1][0] != math.inf or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == math.inf:
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def histogram_delta(after: list[tuple[float, float]], before: list[tuple[float, float]]
                    ) -> list[tuple[float, float]]:
    """The observations made between two scrapes of the same histogram."""
    was = dict(before)
    return [(bound, count - was.get(bound, 0.0)) for bound, count in after]


def pod_usage(item: dict[str, Any]) -> tuple[float, float]:
    """A metrics.k8s.io PodMetrics item -> (CPU cores, memory bytes) over its containers."""
    from kubernetes.utils import parse_quantity

    cpu = sum(float(parse_quantity(c["usage"]["cpu"])) for c in item.get("containers", []))
    mem = sum(float(parse_quantity(c["usage"]["memory"])) for c in item.get("containers", []))
    return cpu, mem


def cgroup_usage(cpu_stat: str, memory_current: str) -> tuple[float, int]:
    """cgroup v2 cpu.stat and memory.current -> (CPU seconds used so far, bytes now)."""
    fields = dict(line.split() for line in cpu_stat.splitlines() if len(line.split()) == 2)
    return int(fields["usage_usec"]) / 1e6, int(memory_current.strip())


# Read twice, one second apart, inside a proxy container with python (svcbench's agent).
CGROUP_READ = """
import json, time
def read():
    return (open("/sys/fs/cgroup/cpu.stat").read(), open("/sys/fs/cgroup/memory.current").read())
a, t0 = read(), time.monotonic()
time.sleep(1.0)
b, t1 = read(), time.monotonic()
print(json.dumps({"before": a, "after": b, "seconds": t1 - t0}))
"""


def cores_from_cgroup_reads(data: dict[str, Any]) -> tuple[float, int]:
    """CGROUP_READ's output -> (CPU cores over its second, bytes at its end)."""
    used0, _ = cgroup_usage(*data["before"])
    used1, mem = cgroup_usage(*data["after"])
    return (used1 - used0) / data["seconds"], mem


def first_served(lines: Iterable[str]) -> float | None:
    """The wall time a latency watcher printed ({"first": t}), None if it gave up."""
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            data = json.loads(line)
            return data.get("first")
    return None


def locust_rps(text: str) -> tuple[float, int, int]:
    """(requests per second, requests, failures) from `locust --json`'s final stats (the
    last JSON list in the master's output): every entry's requests over the span from its
    start_time to its last request."""
    decoder, data = json.JSONDecoder(), None
    for i, ch in enumerate(text):  # the last JSON list that starts a line (log lines follow)
        if ch == "[" and (i == 0 or text[i - 1] == "\n"):
            try:
                found, _end = decoder.raw_decode(text, i)
            except ValueError:
                continue
            if isinstance(found, list):
                data = found
    if data is None:
        raise ValueError("no locust --json stats in the master's output")
    requests = sum(e["num_requests"] for e in data)
    failures = sum(e["num_failures"] for e in data)
    first = min((e["start_time"] for e in data), default=0.0)
    last = max((e["last_request_timestamp"] or 0.0 for e in data), default=0.0)
    ok = requests - failures
    return (ok / (last - first) if last > first else 0.0), requests, failures


# The watcher run in each probe pod for one change: it says "ready" once probing, then
# probes ip:port until the wanted pod answers and prints that connection's start time.
WATCHER = """
import json, sys, time
from clusters.workloads.probe import tcp_sample
ip, port, wanted, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
print("ready", flush=True)
end = time.time() + limit
while time.time() < end:
    t = time.time()
    s = tcp_sample(ip, port, 0.5, b"", None)
    if s.outcome == "ok" and s.backend == wanted:
        print(json.dumps({"first": t}), flush=True)
        break
else:
    print(json.dumps({"first": None}), flush=True)
"""


# --------------------------------------------------------------------------- live measurements


def measure_programming(cluster, mode: str, changes: int, timeout_s: float = 60.0,
                        say: Callable[[str], None] = lambda _m: None) -> list[float]:
    """Seconds from each selector switch of LAT_SERVICE to the first connection the new pod
    served, one value per change and node."""
    ns = deploy.namespace_name(cluster.run, PROBE_NS)
    pods = sorted(p.metadata.name for p in cluster.core.list_namespaced_pod(
        ns, label_selector=f"app={ECHO}").items if p.status.phase == "Running")[:2]
    if len(pods) < 2:
        raise RuntimeError(f"programming latency needs two echo pods, {len(pods)} run")
    svc = cluster.core.read_namespaced_service(LAT_SERVICE, ns)
    ip, port = svc.spec.cluster_ip, svc.spec.ports[0].port
    values: list[float] = []
    for k in range(changes):
        wanted = pods[k % 2]
        watchers = {}
        for node, pod in cluster.probe_pods().items():
            ws = cluster.exec_stream(pod, ["python", "-c", WATCHER, ip, str(port),
                                           f"{ns}/{wanted}", str(timeout_s)])
            watchers[node] = ws
        early: dict[str, str] = {}
        for node, ws in watchers.items():  # every node probes before the change is made
            got = ""
            end = time.monotonic() + 60
            while "ready" not in got and ws.is_open() and time.monotonic() < end:
                ws.update(timeout=1)
                got += ws.read_stdout() if ws.peek_stdout() else ""
            early[node] = got.partition("ready")[2]
        t0 = time.time()
        cluster.core.patch_namespaced_service(
            LAT_SERVICE, ns, {"spec": {"selector": {"svcbench.io/pod": wanted}}})
        for node, ws in watchers.items():
            out = early[node]
            end = time.monotonic() + timeout_s + 10
            while ws.is_open() and time.monotonic() < end and '{"first"' not in out:
                ws.update(timeout=1)
                if ws.peek_stdout():
                    out += ws.read_stdout()
            ws.close()
            first = first_served(out.splitlines())
            if first is not None:
                values.append(max(0.0, first - t0))
            else:
                say(f"change {k + 1}: node {node} never reached {wanted}")
        say(f"programming latency: change {k + 1}/{changes}")
    return values


def label_echo_pods(cluster) -> None:
    """Give each echo pod its own label, for the latency Service to select one at a time."""
    ns = deploy.namespace_name(cluster.run, PROBE_NS)
    for p in cluster.core.list_namespaced_pod(ns, label_selector=f"app={ECHO}").items:
        cluster.core.patch_namespaced_pod(p.metadata.name, ns,
                                          {"metadata": {"labels": {"svcbench.io/pod":
                                                                   p.metadata.name}}})


def measure_connections(cluster, services: int, count: int, seed: int = 0) -> list[float]:
    """µs per new connection from every probe pod to the first, last and random Services."""
    ns = deploy.namespace_name(cluster.run, PROBE_NS)
    ips = {s.metadata.name: s.spec.cluster_ip for s in cluster.core.list_namespaced_service(
        ns, label_selector=deploy.run_selector(cluster.run)).items
        if s.metadata.name.startswith("svc-")}
    order = sorted(ips, key=lambda n: int(n.split("-")[1]))
    rng = random.Random(seed)
    chosen = {order[0], order[-1], order[rng.randrange(len(order))]}
    values: list[float] = []
    for name in sorted(chosen):
        for result in cluster.probes(ips[name], 80, count=count, timeout=1.0).values():
            values += [s.latency_us for s in result.samples if s.outcome == OK]
    return values


def proxy_selector(mode: str) -> tuple[str, str]:
    """(namespace, label selector) of the proxy pods a mode runs."""
    from clusters.kind import KUBE_PROXY_MODES

    if mode in KUBE_PROXY_MODES:
        return "kube-system", "k8s-app=kube-proxy"
    return "", f"{deploy.COMPONENT}={deploy.AGENT}"


def measure_proxy_usage(cluster, mode: str) -> tuple[float, float] | None:
    """(cores, bytes) of every proxy pod from the metrics API; without metrics-server, from
    the agent containers' cgroups by exec (None for kube-proxy then)."""
    from clusters.kind import KUBE_PROXY_MODES

    custom = cluster.k8s.client.CustomObjectsApi(cluster.api)
    ns, selector = proxy_selector(mode)
    ns = ns or cluster.system_ns
    try:
        items = custom.list_namespaced_custom_object("metrics.k8s.io", "v1beta1", ns, "pods",
                                                     label_selector=selector)["items"]
    except cluster.k8s.client.ApiException:
        if mode in KUBE_PROXY_MODES:  # its image has no python to read the cgroup with
            return None
        pods = cluster.core.list_namespaced_pod(ns, label_selector=selector).items
        reads = [cores_from_cgroup_reads(json.loads(cluster.exec(
            p.metadata.name, ["python", "-c", CGROUP_READ], namespace=ns))) for p in pods]
        return sum(r[0] for r in reads), float(sum(r[1] for r in reads))
    cpu = mem = 0.0
    for item in items:
        c, m = pod_usage(item)
        cpu, mem = cpu + c, mem + m
    return cpu, mem


SCRAPE = ("import urllib.request; print(urllib.request.urlopen("
          f"'http://{deploy.KUBE_PROXY_METRICS}/metrics', timeout=5).read().decode())")


def scrape_sync_histogram(cluster) -> list[tuple[float, float]]:
    """kube-proxy's sync histogram summed over nodes (from each hostNetwork probe pod)."""
    total: dict[float, float] = {}
    for pod in cluster.probe_pods(host_network=True).values():
        for bound, count in parse_histogram(cluster.exec(pod, ["python", "-c", SCRAPE])):
            total[bound] = total.get(bound, 0.0) + count
    return sorted(total.items())


def measure_throughput(cluster, target: str, workers: int, seconds: int, image: str,
                       timeout_s: float = 300.0) -> tuple[float, int, int]:
    """Distributed locust against `target` ("ip:port"): the master's final stats once it
    has run `seconds` (it exits then; its Deployment would start it again, so it is read and
    the locust objects deleted at once). A master pod of an earlier measurement still
    going away (its Deployment was deleted, its pod not yet) is not read."""
    objs = deploy.locust_objects(cluster.run, target, workers, users=8 * workers,
                                 seconds=seconds, image=image)
    master = objs[0]["metadata"]["name"]
    selector = f"{deploy.RUN_LABEL}={cluster.run},{deploy.COMPONENT}={master}"
    earlier = {p.metadata.name for p in cluster.core.list_namespaced_pod(
        cluster.system_ns, label_selector=selector).items}
    cluster.create(objs)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for pod in cluster.core.list_namespaced_pod(cluster.system_ns,
                                                        label_selector=selector).items:
                if pod.metadata.name in earlier:
                    continue
                for cs in pod.status.container_statuses or []:
                    done = cs.state.terminated or cs.last_state.terminated
                    if done is not None:
                        log = cluster.core.read_namespaced_pod_log(
                            pod.metadata.name, cluster.system_ns,
                            previous=cs.state.terminated is None)
                        return locust_rps(log)
            time.sleep(2)
        raise TimeoutError(f"locust did not finish within {timeout_s:.0f} s")
    finally:
        for obj in objs:
            name, kind = obj["metadata"]["name"], obj["kind"]
            if kind == "Deployment":
                cluster.apps.delete_namespaced_deployment(name, cluster.system_ns)
            else:
                cluster.core.delete_namespaced_service(name, cluster.system_ns)


def bench_objects(run: str, services: int, replicas: int, image: str) -> list[dict[str, Any]]:
    ns = deploy.namespace_name(run, PROBE_NS)
    objs = [deploy.namespace(run, PROBE_NS, _host()),
            deploy.echo_deployment(run, PROBE_NS, ECHO, replicas, image)]
    objs += deploy.bench_services(run, PROBE_NS, services, {"app": ECHO})
    objs.append({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": LAT_SERVICE, "namespace": ns,
                              "labels": deploy.labels(run)},
                 "spec": {"selector": {"svcbench.io/pod": "none"},
                          "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
    return objs


def _host() -> str:
    from clusters.kube import host_id

    return host_id()


class BudgetSpent(Exception):
    """--budget ran out after a size: the rows measured so far, and where it stopped."""

    def __init__(self, mode: str, size: int, rows: list[Row]):
        super().__init__(f"the budget ran out after {mode} at {size:,} Services")
        self.mode, self.size, self.rows = mode, size, rows


def run_mode(cluster, mode: str, *, sizes: list[int], count: int, changes: int,
             image: str, say: Callable[[str], None], repeats: int = 1,
             over_budget: Callable[[], bool] = lambda: False) -> list[Row]:
    """Every metric of one mode over the sizes, on a cluster the caller made: at each size
    (Services only grow, so sizes are visited once, in order) every measurement `repeats`
    times, one set of rows per repeat. Once `over_budget()` says so after a size, the sweep
    stops there: BudgetSpent carries the rows measured."""
    out: list[Row] = []
    made = 0
    for size in sizes:
        if made == 0:
            cluster.create(bench_objects(cluster.run, size, 2, image))
            cluster.wait_ready()
            label_echo_pods(cluster)
        else:
            cluster.create(deploy.bench_services(cluster.run, PROBE_NS, size - made,
                                                 {"app": ECHO}, first=made))
        made = size
        for repeat in range(repeats):
            out += measure_size(cluster, mode, size, count=count, changes=changes, image=image,
                                say=say, repeat=repeat, repeats=repeats)
        if over_budget() and size != sizes[-1]:
            raise BudgetSpent(mode, size, out)
    return out


def measure_size(cluster, mode: str, size: int, *, count: int, changes: int, image: str,
                 say: Callable[[str], None], repeat: int = 0, repeats: int = 1) -> list[Row]:
    """One repeat of every metric at `size` Services."""
    out: list[Row] = []
    step = f"{mode}: {size} Services" + (f" (repeat {repeat + 1}/{repeats})" if repeats > 1
                                         else "")
    before = scrape_sync_histogram(cluster) if mode.startswith("kube-proxy/") else []
    say(f"{step}: new connections")
    out += rows(mode, "conn_latency_us", size, "us",
                measure_connections(cluster, size, count, seed=repeat), repeat)
    say(f"{step}: network programming latency")
    out += rows(mode, "programming_latency_s", size, "s",
                measure_programming(cluster, mode, changes, say=say), repeat)
    last = cluster.core.read_namespaced_service(f"svc-{size - 1}", deploy.namespace_name(
        cluster.run, PROBE_NS)).spec.cluster_ip
    say(f"{step}: throughput (distributed locust)")
    rps, requests, _failed = measure_throughput(cluster, f"{last}:80", workers=2,
                                                seconds=10, image=image)
    out.append(Row(mode, "throughput_rps", size, "value", rps, "rps", requests, repeat))
    usage = measure_proxy_usage(cluster, mode)
    if usage is not None:
        out.append(Row(mode, "proxy_cpu_cores", size, "value", usage[0], "cores", 1, repeat))
        out.append(Row(mode, "proxy_memory_bytes", size, "value", usage[1], "bytes", 1, repeat))
    if before:
        delta = histogram_delta(scrape_sync_histogram(cluster), before)
        n = int(delta[-1][1]) if delta else 0
        for q in (0.5, 0.9, 0.99):
            out.append(Row(mode, "sync_proxy_rules_s", size, f"p{round(q * 100)}",
                           histogram_quantile(q, delta), "s", n, repeat))
    return out
