"""The conformance cluster: two nodes, fixed pods, one data plane, Services applied per check.

Layout (every pod is placed by name, so each check knows where traffic comes from):

    node1: ns1/web-1, ns1/client-a, ns1/client-c, kube-system/coredns
    node2: ns1/web-2, ns1/web-3, ns1/client-b

Backends declare `http` 8080/TCP, `udp` 8080/UDP and `alt` 8081/TCP (web-3 numbers `alt`
9090: a named port may differ per pod). Every node also answers on its own address, TCP and
UDP 8082, as `node/<name>`: the backend a hostNetwork pod would be (`host_endpoint`). The
cluster DNS pod answers on 53 behind the kube-dns Service at the plan's DNS address;
`apply` always includes that Service and rewrites the DNS records file from the new state.

A check calls `apply(services, slices=..., not_ready=..., terminating=...)`, which replaces
every Service of the previous check through the cluster's `ServiceProxy` (the fixed pods,
those named failing their readiness probe, or being deleted, until the next apply): its
change tracker finds the views that changed and the nodes holding them are synced; then
it probes with real traffic from pods (`"ns1/client-a"`), nodes
(`"node/node2"`) or the external client (`"external"`).
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from clusters.netns import NetnsCluster
from clusters.nsenter import in_netns
from clusters.workloads import dns as dns_server
from clusters.workloads.probe import OK, TIMEOUT, ProbeResult, Sample, tcp_sample, udp_sample
from conformance.sabotage import sabotage_for
from dataplanes.base import Dataplane, SyncStats
from dataplanes.proxy import ServiceProxy
from kube.dns import records
from kube.model import (
    PLAN,
    TCP,
    UDP,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState
from kube.tracker import ChangeTracker
from reports.results import write_json

NAMESPACE = "ns1"
NODES = 2
HTTP_PORT = 8080
ALT_PORT = 8081
HOST_PORT = 8082  # every node's own echo listener, TCP and UDP: a hostNetwork backend
WEB_3_ALT_PORT = 9090
BACKENDS = ("ns1/web-1", "ns1/web-2", "ns1/web-3")
CLIENTS = ("ns1/client-a", "ns1/client-b", "ns1/client-c")
EXTERNAL = "external"
DNS_POD = "kube-system/coredns"
DNS_SELECTOR = {"k8s-app": "kube-dns"}
DNS_SERVICE = Service(
    "kube-system",
    "kube-dns",
    (ServicePort(53, UDP, "dns", 53), ServicePort(53, TCP, "dns-tcp", 53)),
    cluster_ip=PLAN.dns_ip,
    selector=DNS_SELECTOR,
)
# (pod, node): where each fixed pod runs.
PLACEMENT = {
    "ns1/web-1": "node1",
    "ns1/web-2": "node2",
    "ns1/web-3": "node2",
    "ns1/client-a": "node1",
    "ns1/client-b": "node2",
    "ns1/client-c": "node1",
    DNS_POD: "node1",
}


def backend_ports(alt: int = ALT_PORT) -> tuple[ContainerPort, ...]:
    return (
        ContainerPort(HTTP_PORT, TCP, "http"),
        ContainerPort(HTTP_PORT, UDP, "udp"),
        ContainerPort(alt, TCP, "alt"),
    )


def session_pods() -> list[Pod]:
    """The pods every check shares (placed by name, addresses assigned by ClusterState)."""
    pods = []
    for key, node in PLACEMENT.items():
        ns, name = key.split("/")
        if key in BACKENDS:
            alt = WEB_3_ALT_PORT if name == "web-3" else ALT_PORT
            pods.append(Pod(ns, name, {"app": "web", "node": node}, node, backend_ports(alt)))
        elif key == DNS_POD:
            # No declared ports: its echo listeners stay on 8080, port 53 is the DNS daemon's.
            pods.append(Pod(ns, name, dict(DNS_SELECTOR), node))
        else:
            pods.append(Pod(ns, name, {"app": "client"}, node))
    return pods


def web_service(name: str, *ports: ServicePort, **fields: Any) -> Service:
    """A Service in ns1; by default port 80/TCP -> 8080 selecting every web pod."""
    fields.setdefault("selector", {"app": "web"})
    return Service(NAMESPACE, name, ports or (ServicePort(80, TCP, "", HTTP_PORT),), **fields)


@dataclass(frozen=True)
class Probe:
    """One probe request: `count` connections from `source` to ip:port."""

    source: str  # "ns/pod", "node/<name>" or "external"
    ip: str
    port: int
    protocol: str = TCP
    count: int = 1
    # Longer than Linux's first SYN retransmission (1 s): a handshake whose first SYN is lost
    # still counts (about one in 2,000 from a pod was, in every mode, under two concurrent
    # clusters); expected silence sets its own short timeout.
    timeout: float = 2.0
    payload: bytes = b""
    source_port: int | None = None
    interval_s: float = 0.0
    # The outcome every sample should have; after GIVE_UP_AFTER others the probe stops
    # (the check fails either way, and a broken mode must not cost a timeout per sample).
    expect: str | None = OK


GIVE_UP_AFTER = 3


def run_probe(req: Probe) -> ProbeResult:
    """The request's samples from the calling thread's namespace, one after another."""
    one = tcp_sample if req.protocol == TCP else udp_sample
    result = ProbeResult(f"{req.ip}:{req.port}", req.protocol)
    misses = 0
    for i in range(req.count):
        if i and req.interval_s > 0:
            time.sleep(req.interval_s)
        sample = one(req.ip, req.port, req.timeout, req.payload, req.source_port)
        result.samples.append(sample)
        if req.expect is not None and sample.outcome != req.expect:
            misses += 1
            if misses >= GIVE_UP_AFTER:
                break
    return result


# --------------------------------------------------------------------------- statistics


def uniformity_p(counts: Sequence[int]) -> float:
    """Pearson's chi-square test against equal shares: the p-value (df = len(counts) - 1)."""
    n = sum(counts)
    k = len(counts)
    if k < 2 or n == 0:
        return 1.0
    expected = n / k
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    return _upper_gamma_q((k - 1) / 2.0, chi2 / 2.0)


def _upper_gamma_q(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x): a series below a+1, a continued fraction above."""
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Lentz's method for the continued fraction of Q.
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(log_front) * h


# --------------------------------------------------------------------------- traffic helpers


class ProbeLoop:
    """Back-to-back samples from one source on a background thread, each with its time.

    Times are perf_counter seconds, so a check can measure from an event it timestamps
    itself (a Service change) to the first sample that shows its effect.
    """

    def __init__(self, netns: str, ip: str, port: int, *, protocol: str = TCP,
                 timeout: float = 0.3, source_port: int | None = None,
                 interval_s: float = 0.0, until: Callable[[Sample], bool] | None = None,
                 limit_s: float = 30.0) -> None:
        self.netns, self.ip, self.port = netns, ip, port
        self.protocol, self.timeout, self.source_port = protocol, timeout, source_port
        self.interval_s, self.until, self.limit_s = interval_s, until, limit_s
        self.samples: list[tuple[float, Sample]] = []
        self.stopping = threading.Event()
        self.hit = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"probe-loop:{netns}", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            in_netns(self.netns, self._loop)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _loop(self) -> None:
        one = tcp_sample if self.protocol == TCP else udp_sample
        deadline = time.perf_counter() + self.limit_s
        while not self.stopping.is_set() and time.perf_counter() < deadline:
            sample = one(self.ip, self.port, self.timeout, b"", self.source_port)
            self.samples.append((time.perf_counter(), sample))
            if self.until is not None and self.until(sample):
                self.hit.set()
                return
            if self.interval_s:
                self.stopping.wait(self.interval_s)

    def __enter__(self) -> ProbeLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, seconds: float) -> bool:
        """Wait until `until` matched (True) or `seconds` passed (False)."""
        return self.hit.wait(seconds)

    def stop(self) -> list[tuple[float, Sample]]:
        self.stopping.set()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.samples


class Conversation:
    """One established TCP connection exchanging numbered messages until stopped.

    Every message must come back intact and in order; a reset, a timeout or a wrong
    echo ends the conversation and is recorded as its `error`.
    """

    MESSAGE = b"%08d\n"

    def __init__(self, netns: str, ip: str, port: int, timeout: float = 2.0) -> None:
        self.netns, self.ip, self.port, self.timeout = netns, ip, port, timeout
        self.sent = 0
        self.echoed = 0
        self.backend: str | None = None
        self.error: str | None = None
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.sock: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, name=f"conversation:{netns}",
                                       daemon=True)

    def start(self) -> Conversation:
        self.thread.start()
        if not self.connected.wait(self.timeout + 1) and self.error is None:
            self.error = "did not connect"
        return self

    def _run(self) -> None:
        try:
            in_netns(self.netns, self._talk)
        except Exception as exc:  # any end of the conversation other than stop() is its failure
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.connected.set()

    def _talk(self) -> None:
        sock = socket.create_connection((self.ip, self.port), timeout=self.timeout)
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        greeting = _read_line(sock)
        self.backend = greeting.split(b" ", 1)[0].decode()
        self.connected.set()
        while not self.stopping.is_set():
            message = self.MESSAGE % self.sent
            sock.sendall(message)
            self.sent += 1
            echoed = _read_exact(sock, len(message))
            if echoed != message:
                self.error = f"message {self.sent - 1} came back as {echoed!r}"
                return
            self.echoed += 1
            self.stopping.wait(0.005)  # a steady trickle, not a flood

    def stop(self) -> None:
        """Stop talking, then close with a FIN: the backend must close its side cleanly."""
        self.stopping.set()
        self.thread.join(self.timeout + 5)
        sock = self.sock
        if sock is None:
            return
        try:
            if self.error is None:
                sock.shutdown(socket.SHUT_WR)
                rest = sock.recv(1024)  # the echo server closes after EOF: expect b""
                if rest:
                    self.error = f"unexpected bytes after EOF: {rest!r}"
        except OSError as exc:
            self.error = self.error or f"closing: {type(exc).__name__}: {exc}"
        finally:
            sock.close()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("the peer closed the connection")
        buf += chunk
    return buf


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionResetError("closed before the greeting")
        buf += chunk
    return buf[:-1]


def outcomes(result: ProbeResult) -> Counter:
    return Counter(s.outcome for s in result.samples)


def backends(result: ProbeResult) -> Counter:
    return Counter(s.backend for s in result.samples if s.outcome == OK)


def describe(result: ProbeResult) -> str:
    """One line for assertion messages: target, outcomes and backends; for TCP timeouts,
    whether the handshake or the backend's greeting did not come."""
    line = (f"{result.protocol} {result.target}: outcomes {dict(outcomes(result))}, "
            f"backends {dict(backends(result))}")
    timeouts = [s for s in result.samples if s.outcome == TIMEOUT]
    if result.protocol == TCP and timeouts:
        connected = sum(s.local_port is not None for s in timeouts)
        line += (f" (timeouts: {len(timeouts) - connected} in the handshake, {connected} "
                 "waiting for the greeting)")
    return line


# --------------------------------------------------------------------------- the cluster


@dataclass
class ConformanceCluster:
    cluster: NetnsCluster
    dataplane: Dataplane
    state: ClusterState
    dns_records_path: str
    proxy: ServiceProxy  # the mode on every node, fed by a ChangeTracker
    syncs: int = 0  # node syncs so far
    sync_seconds: list[float] = field(default_factory=list)  # each node sync's wall time

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    @contextmanager
    def create(cls, dataplane: Dataplane,
               progress: Callable[[str], None] | None = None) -> Iterator[ConformanceCluster]:
        """Build the cluster, start DNS, install the data plane; uninstall and destroy on exit."""
        say = progress or (lambda _msg: None)
        nodes = [Node.numbered(k) for k in range(1, NODES + 1)]
        with NetnsCluster.create(NODES, progress=say) as cluster:
            state = ClusterState.build(nodes, session_pods())
            say(f"run {cluster.run_id}: {len(state.pods)} pods")
            cluster.set_pods(state.pods)
            cluster.set_host_ports([(HOST_PORT, TCP), (HOST_PORT, UDP)])
            records_path = os.path.join(cluster.run_dir, "dns-records.json")
            write_json(records_path, records(state))
            say(f"run {cluster.run_id}: cluster DNS in {DNS_POD}")
            dns_server.spawn(cluster.pod_netns(*DNS_POD.split("/")), records_path,
                             os.path.join(cluster.run_dir, "dns.log"))
            tracker = ChangeTracker(state.nodes, plan=state.plan)
            tracker.apply(pods=state.pods)
            proxy = ServiceProxy(dataplane, cluster.nodes, tracker)
            harness = cls(cluster, dataplane, state, records_path, proxy)
            for node in cluster.nodes:
                say(f"run {cluster.run_id}: install {dataplane.name} on {node.name}")
            with proxy:
                yield harness

    @property
    def nodes(self):
        return self.cluster.nodes

    # ------------------------------------------------------------------ desired state

    def apply(self, services: Sequence[Service], slices: Sequence[EndpointSlice] = (), *,
              not_ready: Collection[str] = (), terminating: Collection[str] = ()
              ) -> list[SyncStats]:
        """Make `services` (plus kube-dns) the cluster's only Services and sync every node.

        The pods named in `not_ready` ("ns/name") are not ready and those in `terminating`
        are being deleted, until the next apply: the endpoint controller sees that when it
        makes the slices of selectors (their echo backends keep answering whoever reaches
        them).
        """
        keys = {f"{p.namespace}/{p.name}" for p in self.state.pods}
        unknown = (set(not_ready) | set(terminating)) - keys
        if unknown:
            raise KeyError(f"not_ready/terminating name pods the cluster does not have: "
                           f"{sorted(unknown)}")
        pods = tuple(replace(p, ready=f"{p.namespace}/{p.name}" not in not_ready,
                             terminating=f"{p.namespace}/{p.name}" in terminating)
                     for p in self.state.pods)
        stats = self.proxy.replace(services=(*services, DNS_SERVICE), slices=slices, pods=pods)
        self.state = self.proxy.tracker.state()
        write_json(self.dns_records_path, records(self.state))
        return self._count(stats)

    def sync(self) -> list[SyncStats]:
        """A full sync of every node to the current state, node1 first."""
        return self._count(self.proxy.resync())

    def _count(self, stats: list[SyncStats]) -> list[SyncStats]:
        self.sync_seconds += [s.seconds for s in stats]
        self.syncs += len(stats)
        return stats

    def restart(self) -> list[SyncStats]:
        """A proxy restart on every node: uninstall, install, sync.

        A real node's conntrack and NAT stay on while its proxy is away: kubelet, the CNI and
        the firewall hold them with netfilter rules of their own. These nodes have no
        netfilter user but the proxy, and the kernel stops tracking a namespace's packets,
        and translating its NATed flows, when the last user goes (a NodePort packet of an
        established flow would reach the node's own stack and be reset), so the restart
        holds them.
        """
        with conntrack_held(self.cluster.nodes):
            return self._count(self.proxy.restart())

    def sabotage(self) -> list[str] | None:
        """Remove the mode's rules from outside on every node; None when no sabotage is known."""
        remove = sabotage_for(self.dataplane)
        if remove is None:
            return None
        return [remove(self.dataplane, node) for node in self.cluster.nodes]

    # ------------------------------------------------------------------ lookups

    def service(self, name: str, namespace: str = NAMESPACE) -> Service:
        return self.state.service_obj(namespace, name)

    def cluster_ip(self, name: str, namespace: str = NAMESPACE) -> str:
        return self.service(name, namespace).cluster_ip

    def node_port(self, name: str, port: int = 80, protocol: str = TCP) -> int:
        for sp in self.service(name).ports:
            if sp.port == port and sp.protocol == protocol:
                return sp.node_port
        raise KeyError(f"{name} has no {protocol} port {port}")

    def pod_ip(self, key: str) -> str:
        return self.state.pod(*key.split("/")).ip

    def node_ip(self, name: str) -> str:
        return self.state.node(name).ip

    def node_of(self, key: str) -> str:
        return self.state.pod(*key.split("/")).node_name

    def netns(self, source: str) -> str:
        if source == EXTERNAL:
            return self.cluster.external_netns
        if source.startswith("node/"):
            return self.cluster.node(source[5:]).netns
        return self.cluster.pod_netns(*source.split("/"))

    # ------------------------------------------------------------------ endpoints

    def endpoint(self, key: str, *, ready: bool = True, serving: bool | None = None,
                 terminating: bool = False) -> Endpoint:
        pod = self.state.pod(*key.split("/"))
        return Endpoint((pod.ip,), ready=ready, serving=ready if serving is None else serving,
                        terminating=terminating, node_name=pod.node_name, pod_name=pod.name)

    def host_endpoint(self, node: str, *, ready: bool = True) -> Endpoint:
        """An endpoint at a node's own address, as a hostNetwork pod on it has (HOST_PORT)."""
        return Endpoint((self.node_ip(node),), ready=ready, serving=ready, node_name=node)

    def endpoint_slice(self, service: str, endpoints: Sequence[Endpoint | str],
                       ports: Sequence[EndpointPort] = (EndpointPort(HTTP_PORT, TCP),)
                       ) -> EndpointSlice:
        """An EndpointSlice for a selector-less Service; pods may be given by key."""
        eps = tuple(self.endpoint(e) if isinstance(e, str) else e for e in endpoints)
        return EndpointSlice(NAMESPACE, f"{service}-1", service, eps, tuple(ports))

    # ------------------------------------------------------------------ traffic

    def call(self, source: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return in_netns(self.netns(source), fn, *args, **kwargs)

    def probe(self, source: str, ip: str, port: int, **kwargs: Any) -> ProbeResult:
        return self.probes(Probe(source, ip, port, **kwargs))[0]

    def probes(self, *requests: Probe) -> list[ProbeResult]:
        """Run every request at once, each from its own namespace; results in request order."""

        def run(req: Probe) -> ProbeResult:
            return in_netns(self.netns(req.source), run_probe, req)

        if len(requests) == 1:
            return [run(requests[0])]
        with ThreadPoolExecutor(max_workers=min(len(requests), PROBE_THREADS)) as pool:
            return list(pool.map(run, requests))

    def probe_loop(self, source: str, ip: str, port: int, **kwargs: Any) -> ProbeLoop:
        return ProbeLoop(self.netns(source), ip, port, **kwargs)

    def conversation(self, source: str, ip: str, port: int) -> Conversation:
        return Conversation(self.netns(source), ip, port)

    def resolve(self, source: str, name: str, *, rdtype: str = "A", tcp: bool = False):
        """A dnspython response to `name` (type `rdtype`) from `source`, asked of the cluster
        DNS Service."""
        return self.call(source, dns_server.query, PLAN.dns_ip, name, rdtype, tcp=tcp,
                         timeout=2.0)


# Probes running at once. In the single-core guest kernel two dozen probe threads starve
# its network stack: one of check 34's 1,080 connections now and then got no answer (2 of
# 3 runs with two guests side by side on two cores; 0 of 4 with one guest); with eight at
# once, 0 of 2 runs, and the whole IPVS set still takes 65 s.
PROBE_THREADS = 8 if os.environ.get("SVCBENCH_KERNEL") == "uml" else 64

CONNTRACK_HOLD = "svb-conntrack-hold"
# The kernel tracks a namespace's packets while some rule asks for conntrack state, and
# applies established flows' NAT while some NAT chain exists: an empty NAT chain and a rule
# in a chain no hook reaches keep both. nft first; the guest kernel's nf_tables has no ip
# family, its iptables is the legacy one (whose nat table, once made, stays).
_HOLD_NFT = (f"add table ip {CONNTRACK_HOLD}\n"
             f"add chain ip {CONNTRACK_HOLD} hold\n"
             f"add rule ip {CONNTRACK_HOLD} hold ct state new\n"
             f"add chain ip {CONNTRACK_HOLD} nat {{ type nat hook postrouting priority 1000 ; }}\n")
_HOLD_LEGACY = "SVB-CONNTRACK-HOLD"


@contextmanager
def conntrack_held(nodes: Sequence[Any]) -> Iterator[None]:
    """Keep each node's conntrack and NAT on inside the block, whatever its proxy does."""
    held: list[tuple[Any, str]] = []
    try:
        for node in nodes:
            if node.run(["nft", "-f", "-"], input=_HOLD_NFT, check=False).returncode == 0:
                held.append((node, "nft"))
                continue
            node.run(["iptables-legacy", "-w", "-t", "nat", "-N", _HOLD_LEGACY])
            held.append((node, "legacy"))
            node.run(["iptables-legacy", "-w", "-t", "nat", "-A", _HOLD_LEGACY, "-m", "conntrack",
                      "--ctstate", "NEW", "-j", "RETURN"])
        yield
    finally:
        for node, how in held:
            if how == "nft":
                node.run(["nft", "delete", "table", "ip", CONNTRACK_HOLD], check=False)
            else:
                node.run(["iptables-legacy", "-w", "-t", "nat", "-F", _HOLD_LEGACY], check=False)
                node.run(["iptables-legacy", "-w", "-t", "nat", "-X", _HOLD_LEGACY], check=False)


def with_affinity(svc: Service, timeout_s: int | None) -> Service:
    """The Service with ClientIP affinity (timeout_s) or without (None)."""
    if timeout_s is None:
        return replace(svc, session_affinity="None")
    return replace(svc, session_affinity="ClientIP", affinity_timeout_s=timeout_s)
