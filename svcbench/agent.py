"""`svcbench agent`: one node's proxy, fed by the Kubernetes API, as kube-proxy is.

Three reflectors (kube/api.py) list and watch the Services, the EndpointSlices and the
node's own Node; one thread (`Agent.run`) owns the desired state: a `ChangeTracker` for
this one node and a `ServiceProxy` running the chosen mode on it, exactly as the namespace
cluster programs its nodes. Changes are batched as kube-proxy batches them: a sync runs
when something changed and at least `min_sync_period` has passed since the last one, and a
full sync (repairing state someone else removed) every `sync_period`.

The node's facts (address, pod CIDR, zone) come from its Node object; the first sync waits
until all three kinds have been listed. A zone label change rebuilds the view; a changed
address or pod CIDR ends the agent (kube-proxy exits too, and its DaemonSet restarts it).

Served beside it, as kube-proxy serves them: `/healthz` (and `/livez`) with kube-proxy's
JSON (lastUpdated, currentTime, nodeEligible), 503 when the last sync is older than twice
the sync period or the node is being deleted; `/metrics` in Prometheus' text format with
kube-proxy's metric names where the meaning is the same.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dataplanes.base import Dataplane, NodeHandle
from dataplanes.proxy import ServiceProxy
from kube.api import (
    NODES,
    SERVICES,
    SLICES,
    ApiEvent,
    ApiObjectError,
    NodeFacts,
    Reflector,
    cluster_plan,
    node_from_api,
    object_key,
    service_from_api,
    slice_from_api,
    trigger_time,
)
from kube.model import AddressPlan, EndpointSlice, Service
from kube.state import StateError
from kube.tracker import ChangeTracker

log = logging.getLogger("svcbench.agent")

# kube-proxy's buckets (pkg/proxy/metrics): sync time 1 ms doubling to 16 s; network
# programming latency 0.25 s, 0.5 s, then each second to 59 s, each 5 s to 115 s, each
# 30 s to 5 min.
SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
PROGRAMMING_BUCKETS = (
    (0.25, 0.5) + tuple(float(s) for s in range(1, 60)) + tuple(float(s) for s in range(60, 120, 5))
    + tuple(float(s) for s in range(120, 301, 30))
)


class AgentStopped(RuntimeError):
    """The agent cannot go on (the node's address or pod CIDR changed, the mode failed)."""


class Metrics:
    """The agent's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
            buckets=SYNC_BUCKETS, registry=r)
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs", buckets=SYNC_BUCKETS,
            registry=r)
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs", buckets=SYNC_BUCKETS,
            registry=r)
        self.programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds", buckets=PROGRAMMING_BUCKETS,
            registry=r)
        self.last_sync = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced", registry=r)
        self.last_queued = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued", registry=r)
        self.endpoint_changes = Counter("kubeproxy_sync_proxy_rules_endpoint_changes",
                                        "Cumulative proxy rules Endpoint changes", registry=r)
        self.service_changes = Counter("kubeproxy_sync_proxy_rules_service_changes",
                                       "Cumulative proxy rules Service changes", registry=r)
        self.endpoint_pending = Gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                                      "Pending proxy rules Endpoint changes", registry=r)
        self.service_pending = Gauge("kubeproxy_sync_proxy_rules_service_changes_pending",
                                     "Pending proxy rules Service changes", registry=r)
        self.services = Gauge("svcbench_agent_services",
                              "Services this node proxies (with a ClusterIP, not headless, "
                              "for this proxy)", registry=r)
        self.service_ports = Gauge("svcbench_agent_service_ports",
                                   "Service ports in this node's view", registry=r)
        self.endpoints = Gauge("svcbench_agent_endpoints",
                               "Endpoints (address and port) in this node's view", registry=r)
        self.sync_failures = Counter("svcbench_agent_sync_failures",
                                     "Syncs the mode failed (each is retried as a full sync)",
                                     registry=r)
        self.refused = Counter("svcbench_agent_objects_refused",
                               "API objects left out: unreadable or refused by the state",
                               registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _iso(t: float | None) -> str:
    if not t:
        return ""
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


class Agent:
    """One node's proxy over the Kubernetes API (see the module's docstring).

    `api_client`: a configured `kubernetes.client.ApiClient`. `handle_for(node)` gives the
    NodeHandle the mode programs, once the Node object is known (`kube.model.Node`).
    """

    def __init__(self, api_client: Any, node_name: str, dataplane: Dataplane,
                 handle_for: Callable[[Any], NodeHandle], *, proxy_name: str | None = None,
                 min_sync_period: float = 1.0, sync_period: float = 30.0,
                 plan: AddressPlan | None = None, watch_timeout_s: int = 300,
                 page_size: int = 500) -> None:
        from kubernetes import client

        self.node_name = node_name
        self.dataplane = dataplane
        self.handle_for = handle_for
        self.proxy_name = proxy_name
        self.min_sync_period = min_sync_period
        self.sync_period = sync_period
        self.plan = plan or cluster_plan()
        self.metrics = Metrics()
        self.events: queue.Queue[ApiEvent] = queue.Queue()
        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        self.reflectors = {
            NODES: Reflector(NODES, core.list_node, self.events, watch_timeout_s, page_size,
                             field_selector=f"metadata.name={node_name}"),
            SERVICES: Reflector(SERVICES, core.list_service_for_all_namespaces, self.events,
                                watch_timeout_s, page_size),
            SLICES: Reflector(SLICES, discovery.list_endpoint_slice_for_all_namespaces,
                              self.events, watch_timeout_s, page_size),
        }
        self.started = time.time()
        self.listed: set[str] = set()
        self.facts: NodeFacts | None = None
        # What the API holds (read), what the tracker holds (applied), what changed since.
        self.services: dict[tuple[str, str], Service] = {}
        self.slices: dict[tuple[str, str], EndpointSlice] = {}
        self.dirty_services: set[tuple[str, str]] = set()
        self.dirty_slices: set[tuple[str, str]] = set()
        self.applied_slices: dict[tuple[str, str], EndpointSlice] = {}  # in the tracker
        self.triggers: dict[tuple[str, str], float] = {}  # slice -> change time, since start
        self.tracker: ChangeTracker | None = None
        self.proxy: ServiceProxy | None = None
        self.last_sync: float | None = None  # wall clock
        self._last_sync_mono = 0.0
        self._last_full_mono = 0.0
        self.syncs = 0
        self.stop_event = threading.Event()
        self.error: str | None = None
        self.ready = threading.Event()  # set after the first sync
        self._failed = False  # the last sync failed (or the view was rebuilt): next is full

    # ------------------------------------------------------------------ health

    def healthy(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.last_sync is not None and now - self.last_sync <= 2 * self.sync_period

    def healthz(self, now: float | None = None) -> tuple[int, dict]:
        """kube-proxy's /healthz: 200 while syncs keep up and the node is not being deleted."""
        now = time.time() if now is None else now
        eligible = self.facts.eligible if self.facts else True
        body = {"lastUpdated": _iso(self.last_sync), "currentTime": _iso(now),
                "nodeEligible": eligible}
        return (200 if self.healthy(now) and eligible else 503), body

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """List, watch and sync until `stop()`; uninstalls the mode on the way out."""
        for r in self.reflectors.values():
            r.start()
        try:
            while not self.stop_event.is_set():
                self._step()
        finally:
            for r in self.reflectors.values():
                r.stop()
            if self.proxy is not None:
                self.proxy.uninstall()

    def stop(self) -> None:
        self.stop_event.set()
        self.events.put(ApiEvent("", "STOP", []))  # wakes the loop at once

    def _step(self) -> None:
        timeout = self._wait_s()
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            event = None
        while event is not None:
            self._take(event)
            if self.stop_event.is_set():
                return
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                event = None
        self._maybe_sync()

    def _wait_s(self) -> float:
        now = time.monotonic()
        if self.proxy is None:
            return 0.1
        if self.dirty_services or self.dirty_slices:
            return max(0.0, self._last_sync_mono + self.min_sync_period - now)
        return max(0.0, min(self._last_full_mono + self.sync_period - now, 0.5))

    def _take(self, event: ApiEvent) -> None:
        if event.type == "STOP":
            return
        if event.kind == NODES:
            self._take_node(event)
            return
        read, dirty, parse = ((self.services, self.dirty_services, service_from_api)
                              if event.kind == SERVICES else
                              (self.slices, self.dirty_slices, slice_from_api))
        if event.type == "LIST":
            self.listed.add(event.kind)
            fresh = {}
            for body in event.objects:
                obj = self._read(parse, body)
                if obj is not None:
                    fresh[obj.key] = obj
                    self._note_trigger(event.kind, obj.key, body)
            dirty |= set(read) | set(fresh)
            read.clear()
            read.update(fresh)
        else:
            body = event.objects[0]
            key = object_key(body)
            if not key[0]:
                key = ("default", key[1])
            obj = None if event.type == "DELETED" else self._read(parse, body)
            if obj is None:
                read.pop(key, None)
                # a deleted slice's trigger time is its last update's, not the deletion's
                self.triggers.pop(key, None)
            else:
                read[obj.key] = obj
                self._note_trigger(event.kind, obj.key, body)
            dirty.add(key)
        self.metrics.last_queued.set(time.time())
        self.metrics.service_pending.set(len(self.dirty_services))
        self.metrics.endpoint_pending.set(len(self.dirty_slices))

    def _read(self, parse, body: dict):
        try:
            return parse(body, self.plan)
        except ApiObjectError as exc:
            self.metrics.refused.inc()
            log.warning("left out: %s", exc)
            return None

    def _note_trigger(self, kind: str, key, body: dict) -> None:
        if kind != SLICES:
            return
        t = trigger_time(body)
        # As kube-proxy: a change from before the proxy started is no programming latency.
        if t is not None and t > self.started:
            self.triggers[key] = t

    def _take_node(self, event: ApiEvent) -> None:
        if event.type == "DELETED":
            return  # keep proxying what we have; the node's pods go with it
        if not event.objects:
            if event.type == "LIST":
                log.warning("node %s: no such Node yet", self.node_name)
            return
        try:
            facts = node_from_api(event.objects[0], self.plan)
        except ApiObjectError as exc:
            log.warning("%s", exc)
            return
        self.listed.add(NODES)
        old, self.facts = self.facts, facts
        if self.proxy is None or old is None or old.node == facts.node:
            return
        if (old.node.ip, old.node.pod_cidr) != (facts.node.ip, facts.node.pod_cidr):
            raise AgentStopped(f"node {self.node_name}: its address or pod CIDR changed "
                               f"({old.node.ip} {old.node.pod_cidr} -> {facts.node.ip} "
                               f"{facts.node.pod_cidr}); restart the agent")
        log.info("node %s: zone %r -> %r: rebuilding its view", self.node_name, old.node.zone,
                 facts.node.zone)
        self.tracker = self.proxy.tracker = self._new_tracker()
        self.applied_slices = {}
        self.dirty_services |= set(self.services)
        self.dirty_slices |= set(self.slices)
        self._failed = True  # the next sync: every object into the new tracker, then full

    def _new_tracker(self) -> ChangeTracker:
        return ChangeTracker([self.facts.node], plan=self.plan, proxy_name=self.proxy_name)

    # ------------------------------------------------------------------ syncing

    def _maybe_sync(self) -> None:
        if self.proxy is None:
            if self.facts is None or not self.listed >= {NODES, SERVICES, SLICES}:
                return  # as kube-proxy, the first sync waits until every kind is listed
            self.tracker = self._new_tracker()
            self.proxy = ServiceProxy(self.dataplane, [self.handle_for(self.facts.node)],
                                      self.tracker)
            self.proxy.install()  # a mode that cannot install ends the agent
        now = time.monotonic()
        if now - self._last_sync_mono < self.min_sync_period:
            return
        try:
            if self.dirty_services or self.dirty_slices:
                self._sync(full=self._failed)
            elif self._failed or now - self._last_full_mono >= self.sync_period:
                self._full_sync()
        except Exception as exc:  # noqa: BLE001 - kube-proxy logs a failed sync and retries
            self._failed = True  # the tracker may hold changes the node does not
            self._last_sync_mono = time.monotonic()  # the next try waits min_sync_period
            self.error = f"{type(exc).__name__}: {exc}"
            self.metrics.sync_failures.inc()
            log.error("sync failed, retrying with a full sync: %s", self.error)

    def _sync(self, full: bool = False) -> None:
        """Hand the changed objects to the proxy (one `apply`, which syncs the node), or,
        after a failed sync, to the tracker alone and then sync the node in full."""
        dirty_services, self.dirty_services = self.dirty_services, set()
        dirty_slices, self.dirty_slices = self.dirty_slices, set()
        tracker = self.tracker
        ups = [self.services[k] for k in dirty_services
               if k in self.services and tracker.services.get(k) != self.services[k]]
        downs = [k for k in dirty_services if k not in self.services and k in tracker.services]
        held = self.applied_slices
        slice_ups = [self.slices[k] for k in dirty_slices
                     if k in self.slices and held.get(k) != self.slices[k]]
        slice_downs = [k for k in dirty_slices if k not in self.slices and k in held]
        apply = tracker.apply if full else self.proxy.apply
        started = time.monotonic()
        stats: list = []
        try:
            stats = apply(services=ups, delete_services=downs, slices=slice_ups,
                          delete_slices=slice_downs)
            held.update((sl.key, sl) for sl in slice_ups)
        except StateError:
            stats = self._apply_one_by_one(apply, ups, downs, slice_ups, slice_downs)
        for key in slice_downs:
            held.pop(key, None)
        self.metrics.service_changes.inc(len(dirty_services))
        self.metrics.endpoint_changes.inc(len(dirty_slices))
        if full:
            self._full_sync(started, dirty_slices)
        else:
            self._synced(started, full=any(s.full for s in stats), changed_slices=dirty_slices)

    def _apply_one_by_one(self, apply, ups, downs, slice_ups, slice_downs) -> list:
        """The batch was refused: each object alone, the refused ones left out."""
        stats: list = []

        def one(**change) -> bool:
            try:
                out = apply(**change)
            except StateError as exc:
                self.metrics.refused.inc()
                log.warning("left out: %s", exc)
                return False
            if isinstance(out, list):
                stats.extend(out)
            return True

        one(delete_services=downs, delete_slices=slice_downs)
        for svc in ups:
            one(services=[svc])
        for sl in slice_ups:
            if one(slices=[sl]):
                self.applied_slices[sl.key] = sl
        return stats

    def _full_sync(self, started: float | None = None, changed_slices: set = frozenset()
                   ) -> None:
        started = time.monotonic() if started is None else started
        self.proxy.resync()
        self._failed = False
        self.error = None
        self._synced(started, full=True, changed_slices=set(changed_slices))

    def _synced(self, started: float, full: bool, changed_slices: set) -> None:
        now_mono = time.monotonic()
        took = now_mono - started
        self._last_sync_mono = now_mono
        if full:
            self._last_full_mono = now_mono
        self.last_sync = time.time()
        self.syncs += 1
        m = self.metrics
        m.sync_duration.observe(took)
        (m.full_sync_duration if full else m.partial_sync_duration).observe(took)
        m.last_sync.set(self.last_sync)
        for key in changed_slices:
            t = self.triggers.pop(key, None)
            if t is not None:
                m.programming.observe(max(0.0, self.last_sync - t))
        view = self.tracker.node_view(self.facts.node.name)
        m.service_ports.set(len(view.services))
        m.services.set(len({(v.namespace, v.service) for v in view.services}))
        m.endpoints.set(len({(e.ip, e.port, v.protocol) for v in view.services
                             for e in v.endpoints}))
        m.service_pending.set(len(self.dirty_services))
        m.endpoint_pending.set(len(self.dirty_slices))
        self.ready.set()
        log.info("synced %s in %.1f ms: %d service ports", "full" if full else "partial",
                 took * 1000, len(view.services))


# --------------------------------------------------------------------------- HTTP


def _handler(agent: Agent, paths: tuple[str, ...]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path not in paths:
                self._send(404, b"404 page not found\n", "text/plain")
            elif path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST

                self._send(200, agent.metrics.text(), CONTENT_TYPE_LATEST)
            else:
                code, body = agent.healthz()
                if path == "/livez":  # kube-proxy's livez leaves node eligibility out
                    code = 200 if agent.healthy() else 503
                self._send(code, json.dumps(body).encode(), "application/json")

        def _send(self, code: int, data: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def parse_bind(value: str, flag: str) -> tuple[str, int]:
    """HOST:PORT (kube-proxy's --healthz-bind-address form); ValueError in one sentence."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {value!r} must be HOST:PORT, such as 0.0.0.0:10256")
    return host.strip("[]") or "0.0.0.0", int(port)


class Served:
    """The agent's HTTP servers (healthz, metrics), each on a thread of its own."""

    def __init__(self, agent: Agent, healthz: tuple[str, int] | None,
                 metrics: tuple[str, int] | None) -> None:
        self.servers: list[ThreadingHTTPServer] = []
        try:
            if healthz is not None:
                self._serve(healthz, _handler(agent, ("/healthz", "/livez")))
            if metrics is not None:
                self._serve(metrics, _handler(agent, ("/metrics",)))
        except BaseException:
            self.close()
            raise

    def _serve(self, where: tuple[str, int], handler) -> None:
        server = ThreadingHTTPServer(where, handler)
        server.daemon_threads = True
        self.servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.1,), name=f"http-{where[1]}",
                         daemon=True).start()

    @property
    def ports(self) -> list[int]:
        return [s.server_address[1] for s in self.servers]

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()
        self.servers = []
