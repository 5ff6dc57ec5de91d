"""The Kubernetes API as a node proxy sees it: Services, EndpointSlices and its own Node.

Objects come from a real API server through the official `kubernetes` client (extra
`kube`): each kind is listed, then watched from the list's resourceVersion with bookmarks;
a watch that ends is resumed from the last resourceVersion seen (an event's or a
bookmark's), and one the server answers with 410 Gone (the version is too old) is
replaced by a fresh list, as client-go's reflector does. Every list and event becomes an
`ApiEvent` on one queue, so one thread (the agent's) owns the desired state.

Objects are read by kube/manifests.py's readers, from the dicts the API sends, so an API
object means what the same manifest means; one they refuse (an IPv6 Service, an address
outside the suite's plan) is left out with the reason, as if it did not exist.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kube.manifests import (
    API_DISCOVERY,
    API_V1,
    ENDPOINT_SLICE,
    NODE,
    SERVICE,
    ManifestError,
    load_documents,
)
from kube.model import PLAN, ZONE_LABEL, AddressPlan, EndpointSlice, Node, Service

log = logging.getLogger("svcbench.agent")

SERVICES = "services"
SLICES = "endpointslices"
NODES = "nodes"
KINDS = {SERVICES: (API_V1, SERVICE), SLICES: (API_DISCOVERY, ENDPOINT_SLICE),
         NODES: (API_V1, NODE)}
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
# The cluster autoscaler's taint on a node it is about to remove (kube-proxy's healthz then
# says the node is not eligible, so load balancers stop sending to it).
DELETION_TAINT = "ToBeDeletedByClusterAutoscaler"
GONE = 410
WATCH_TIMEOUT_S = 300  # the server ends each watch after this; it is resumed at once
RETRY_S = 1.0  # between attempts after an error other than 410
PAGE_SIZE = 500  # objects per list page (client-go's pager)


class ApiObjectError(ValueError):
    """An API object the suite cannot read (the message says which and why)."""


EVERY_ADDRESS = "0.0.0.0/0"

# --------------------------------------------------------------------------- objects


def cluster_plan(cluster_cidr: str = PLAN.cluster_cidr,
                 service_cidr: str = PLAN.service_cidr,
                 node_port_range: tuple[int, int] = PLAN.node_port_range) -> AddressPlan:
    """The address plan of a real cluster: its pod and Service CIDRs (kube-proxy's
    --cluster-cidr; the apiserver's --service-cluster-ip-range) and NodePort range (the
    apiserver's --service-node-port-range, 30000-32767 unless it says otherwise), and any
    address for endpoints, externalIPs and load-balancer ingress, which the API server has
    validated (the suite's own clusters keep them inside 198.18.0.0/15)."""
    for flag, value in (("--cluster-cidr", cluster_cidr), ("--service-cidr", service_cidr)):
        if not _ipv4_net(value):
            raise ValueError(f"{flag} {value!r} must be an IPv4 network such as 10.96.0.0/12")
    low, high = node_port_range
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"the NodePort range {low}-{high} must be LOW-HIGH with "
                         "1 <= LOW <= HIGH <= 65535")
    return replace(PLAN, cluster_cidr=str(ipaddress.ip_network(cluster_cidr, strict=False)),
                   service_cidr=str(ipaddress.ip_network(service_cidr, strict=False)),
                   node_port_range=(low, high),
                   endpoint_cidr=EVERY_ADDRESS, external_ip_cidr=EVERY_ADDRESS,
                   load_balancer_cidr=EVERY_ADDRESS)


def _one(body: dict, kind: tuple[str, str], plan: AddressPlan) -> Any:
    body = {"apiVersion": kind[0], "kind": kind[1], **body}  # a typed List's items lack them
    meta = body.get("metadata") or {}
    source = f"{kind[1]} {meta.get('namespace', '')}/{meta.get('name', '')}".replace(" /", " ")
    try:
        read = load_documents([body], source=f"the API's {source}", plan=plan)
    except ManifestError as exc:
        raise ApiObjectError(str(exc)) from None
    return (read.services or read.endpoint_slices or read.nodes)[0]


def service_from_api(body: dict, plan: AddressPlan = PLAN) -> Service:
    """A v1 Service as the API sends it."""
    return _one(body, KINDS[SERVICES], plan)


def slice_from_api(body: dict, plan: AddressPlan = PLAN) -> EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice as the API sends it."""
    return _one(body, KINDS[SLICES], plan)


@dataclass(frozen=True)
class NodeFacts:
    """What a proxy takes from its own Node object."""

    node: Node
    eligible: bool  # not being deleted (kube-proxy's healthz nodeEligible)
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def node_from_api(body: dict, plan: AddressPlan = PLAN) -> NodeFacts:
    """A v1 Node: its name and labels (read as a Node manifest), first InternalIP (else
    ExternalIP) IPv4 address, pod CIDR (the plan's cluster CIDR when it has none) and zone
    label."""
    labels = _one({k: v for k, v in body.items() if k in ("metadata",)}, KINDS[NODES],
                  plan).labels  # spec and status hold much the manifest reader does not know
    meta, spec, status = (body.get(k) or {} for k in ("metadata", "spec", "status"))
    name = meta.get("name", "")
    ip = None
    for kind in ("InternalIP", "ExternalIP"):
        for address in status.get("addresses") or []:
            if address.get("type") == kind and _ipv4(address.get("address")):
                ip = address["address"]
                break
        if ip:
            break
    if ip is None:
        raise ApiObjectError(f"Node {name}: status.addresses has no IPv4 InternalIP or "
                             "ExternalIP; the proxy needs the node's address.")
    # Without a pod CIDR of its own (an IPAM that does not use the node's), the node's pods
    # are anywhere in the cluster's.
    cidrs = [c for c in [spec.get("podCIDR"), *(spec.get("podCIDRs") or [])] if _ipv4_net(c)]
    cidrs.append(plan.cluster_cidr)
    base = ipaddress.ip_network(plan.node_cidr)
    index = int(ipaddress.ip_address(ip)) - int(base.network_address)
    if not 1 <= index <= plan.max_nodes or ipaddress.ip_address(ip) not in base:
        index = 1  # only pod placement reads it; the proxy places no pods
    taints = [t.get("key") for t in spec.get("taints") or []]
    eligible = not meta.get("deletionTimestamp") and DELETION_TAINT not in taints
    node = Node(name, index, ip, cidrs[0], labels.get(ZONE_LABEL, ""))
    return NodeFacts(node, eligible, labels)


def _ipv4(value: Any) -> bool:
    try:
        return isinstance(value, str) and ipaddress.ip_address(value).version == 4
    except ValueError:
        return False


def _ipv4_net(value: Any) -> bool:
    try:
        return isinstance(value, str) and ipaddress.ip_network(value, strict=False).version == 4
    except ValueError:
        return False


def trigger_time(body: dict) -> float | None:
    """The EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time, in epoch
    seconds: when the change it carries happened (for network programming latency)."""
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_TIME)
    if not isinstance(value, str):
        return None
    # Go writes RFC3339Nano: up to nine fraction digits, more than Python reads.
    value = re.sub(r"(\.\d{6})\d+", r"\1", value.strip())
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def object_key(body: dict) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


# --------------------------------------------------------------------------- list + watch


@dataclass
class ApiEvent:
    """One list (type "LIST": `objects` is every object, the whole state of the kind) or
    one watch event (ADDED, MODIFIED, DELETED: `objects` holds the one object)."""

    kind: str  # SERVICES, SLICES, NODES
    type: str
    objects: list[dict]
    resource_version: str | None = None
    received: float = field(default_factory=time.time)


class Reflector:
    """List then watch one kind forever (until `stop`), putting `ApiEvent`s on `out`.

    `list_fn` is a `kubernetes` client list function (CoreV1Api.list_service_for_all_namespaces
    and the like); `kwargs` go to every call (a field selector). Counts what it did in
    `lists`, `watches` and `gone` (410 answers) for tests and logs."""

    def __init__(self, kind: str, list_fn: Callable[..., Any], out: queue.Queue,
                 watch_timeout_s: int = WATCH_TIMEOUT_S, page_size: int = PAGE_SIZE,
                 **kwargs: Any) -> None:
        self.kind = kind
        self.page_size = page_size
        self.list_fn = list_fn
        self.out = out
        self.kwargs = kwargs
        self.watch_timeout_s = watch_timeout_s
        self.resource_version: str | None = None
        self.lists = self.pages = self.watches = self.gone = self.bookmarks = 0
        self.error: str | None = None  # the last failure, until a list or watch succeeds
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name=f"reflector-{kind}", daemon=True)

    def start(self) -> Reflector:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to end (it is a daemon: a watch blocked in a read ends with the
        stream, or with the process)."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def list(self) -> None:
        """One list: the kind's whole state, and the resourceVersion to watch from, in pages
        of `page_size` as client-go's pager asks (a 410 on a later page lists again)."""
        import json

        items: list[dict] = []
        token = None
        while True:
            kwargs = dict(self.kwargs, limit=self.page_size)
            if token:
                kwargs["_continue"] = token
            resp = self.list_fn(_preload_content=False, **kwargs)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            self.pages += 1
            items += body.get("items") or []
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        self.lists += 1
        self.resource_version = meta.get("resourceVersion")
        self.out.put(ApiEvent(self.kind, "LIST", items, self.resource_version))

    def watch_once(self) -> None:
        """Watch from the last resourceVersion until the server ends the watch; raises the
        client's ApiException (410 when the version is gone)."""
        from kubernetes import watch

        self._watch = w = watch.Watch()
        self.watches += 1
        for event in w.stream(self.list_fn, resource_version=self.resource_version,
                              allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout_s,
                              **self.kwargs):
            kind, obj = event["type"], event["raw_object"]
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            if rv:
                self.resource_version = rv
            if kind == "BOOKMARK":
                self.bookmarks += 1
                continue
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.out.put(ApiEvent(self.kind, kind, [obj], rv))
            if self._stop.is_set():
                w.stop()
                break

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self.list()
                    need_list = False
                self.watch_once()
                self.error = None
            except ApiException as exc:
                if exc.status == GONE:
                    self.gone += 1
                    log.info("%s: resourceVersion %s is gone (410): listing again", self.kind,
                             self.resource_version)
                    need_list = True
                    continue
                self._failed(f"{exc.status} {exc.reason}")
            except Exception as exc:  # noqa: BLE001 - the API is away: try again
                self._failed(f"{type(exc).__name__}: {exc}")

    def _failed(self, why: str) -> None:
        if self._stop.is_set():
            return
        self.error = why
        log.warning("%s: %s; retrying in %.0f s", self.kind, why, RETRY_S)
        self._stop.wait(RETRY_S)
