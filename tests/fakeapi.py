"""The one fake in the tests: a small Kubernetes API server on 127.0.0.1, so the real
`kubernetes` client (config from a kubeconfig, list, watch, create, exec) runs against it.

`FakeApiBase` is the HTTP part both behaviours share: the server and its thread, the
kubeconfig that points at it, the record of every request (method, path, query) and the
JSON answers (objects, a 404 Status). On it:

- `FakeApiServer` serves recorded objects for a node proxy (tests/test_agent.py): the three
  collections it reads (`/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
  `/api/v1/nodes`). A GET is the List (the JSON in tests/data/k8s, replaceable with
  `set_list`); a GET with `watch=true` streams one JSON event per line, those a test `push`es,
  until the watch's timeoutSeconds, an `END` or an ERROR event (after which the server ends
  the stream, as it does for 410 Gone). `fieldSelector=metadata.name=X`, `limit` and
  `continue` are honoured for lists.
- `FakeApi` keeps objects in memory for the kubeconfig provider (tests/test_kube_offline.py,
  tests/kube_fake_dataplane.py): it stores what is created, lists it by label selector (every
  workload reported ready), merge-patches and deletes it, runs pods' execs over websockets and
  answers /version. Services get a ClusterIP and NodePorts as the API server allocates them,
  nodes InternalIPs as kind's, Deployments and DaemonSets their pods. Only the calls
  clusters/kube.py makes are served.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import queue
import re
import struct
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, str]


class ApiHandler(BaseHTTPRequestHandler):
    """Parses and records each request, answers JSON; `api` is the FakeApiBase it serves."""

    api: FakeApiBase

    def log_message(self, *args) -> None:
        pass

    def _request(self) -> Request:
        url = urlsplit(self.path)
        request = Request(self.command, url.path.rstrip("/") or "/",
                          {k: v[-1] for k, v in parse_qs(url.query).items()})
        self.api.calls.append(request)
        return request

    def _send(self, code: int, body: dict) -> None:
        self._reply(code, json.dumps(body).encode(), "application/json")

    def _reply(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str = "") -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": reason, "code": code, "message": message})

    def _missing(self, what: str) -> None:
        self._status(404, "NotFound", f"{what} not found")


class FakeApiBase:
    Handler: type[ApiHandler] = ApiHandler

    def __init__(self) -> None:
        self.calls: list[Request] = []
        self._closing = threading.Event()
        handler = type("Handler", (self.Handler,), {"api": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # a short poll: shutdown() waits for it (0.5 s by default, for every test)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request so far."""
        return [(r.method, r.path) for r in self.calls]

    def kubeconfig(self, path: Path) -> str:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return str(path)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()


# --- recorded Lists and watch streams (FakeApiServer) --------------------------------------

END = object()  # pushed: the server ends the watch there (as when its timeout passes)
DATA = Path(__file__).parent / "data" / "k8s"
PATHS = {
    "/api/v1/services": "services",
    "/apis/discovery.k8s.io/v1/endpointslices": "endpointslices",
    "/api/v1/nodes": "nodes",
}


def recorded(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def recorded_events(name: str, **values: str) -> list[dict]:
    """The watch lines of a .jsonl file; "{NAME}" placeholders filled from `values`."""
    lines = (DATA / name).read_text()
    for key, value in values.items():
        lines = lines.replace("{" + key + "}", value)
    return [json.loads(line) for line in lines.splitlines() if line.strip()]


def now_rfc3339(offset_s: float = 0.0) -> str:
    """As the endpoint controller writes its trigger times (Go's RFC3339Nano)."""
    t = time.time() + offset_s
    stamp = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{int(t % 1 * 1e9):09d}Z"


class RecordedHandler(ApiHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"  # watches are chunked

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _method, path, query = self._request()
        kind = PATHS.get(path)
        if kind is None:
            return self._missing(path)
        if query.get("watch") == "true":
            return self._watch(kind, float(query.get("timeoutSeconds", "30")))
        body = json.loads(json.dumps(self.api.lists[kind]))
        selector = query.get("fieldSelector", "")
        if selector.startswith("metadata.name="):
            name = selector.split("=", 1)[1]
            body["items"] = [i for i in body["items"] if i["metadata"]["name"] == name]
        if "limit" in query:  # pages; the continue token is the next item's index
            start, size = int(query.get("continue", "0")), int(query["limit"])
            if start + size < len(body["items"]):
                body["metadata"]["continue"] = str(start + size)
            body["items"] = body["items"][start:start + size]
        return self._send(200, body)

    def _watch(self, kind: str, timeout_s: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        ends = time.monotonic() + timeout_s
        try:
            while time.monotonic() < ends and not self.api._closing.is_set():
                try:
                    event = self.api.watches[kind].get(timeout=0.05)
                except queue.Empty:
                    continue
                if event is END:
                    break  # the server ends the watch, as at its timeout
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                if event["type"] == "ERROR":
                    break
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away
        self.close_connection = True


class FakeApiServer(FakeApiBase):
    """Recorded Lists and pushed watch events for a node proxy's three collections."""

    Handler = RecordedHandler

    def __init__(self) -> None:
        super().__init__()
        self.lists = {kind: recorded(f"{kind}.json") for kind in PATHS.values()}
        self.watches: dict[str, queue.Queue] = {kind: queue.Queue() for kind in PATHS.values()}

    def set_list(self, kind: str, body: dict) -> None:
        self.lists[kind] = body

    def push(self, kind: str, *events: dict) -> None:
        for event in events:
            self.watches[kind].put(event)

    def seen(self, kind: str, watch: bool | None = None) -> list[dict[str, str]]:
        """Queries of the requests for `kind` (lists, watches or both)."""
        path = next(p for p, k in PATHS.items() if k == kind)
        return [r.query for r in self.calls if r.path == path
                and (watch is None or (r.query.get("watch") == "true") == watch)]


# --- in-memory objects and exec (FakeApi) --------------------------------------------------

VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "0" * 40,
           "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
           "compiler": "gc", "platform": "linux/amd64"}
# /api/v1/namespaces/NS/pods, /apis/apps/v1/daemonsets, /api/v1/nodes/NAME, ...
PATH_RE = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/v1)(?:/namespaces/(?P<ns>[^/]+))?"
                     r"/(?P<resource>[a-z]+)(?:/(?P<name>[^/]+))?$")


def _matches(obj: dict, selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _merge(into: dict, patch: dict) -> None:
    """A JSON merge patch: maps merge, a null removes the key."""
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    length = (bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n) if n < 65536
              else bytes([127]) + struct.pack("!Q", n))
    return bytes([0x80 | opcode]) + length + payload


class MemoryHandler(ApiHandler):
    api: FakeApi

    def _object(self):
        """The request, the match of its path (None: not an object path) and the body."""
        request = self._request()
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        return request, PATH_RE.match(request.path), body

    def _exec(self) -> None:
        """pods/NAME/exec over a websocket (v4.channel.k8s.io): the command's output
        on channel 1, a success Status on channel 3, then close."""
        url = urlsplit(self.path)
        pod = url.path.split("/")[-2]
        command = parse_qs(url.query)["command"]
        self.api.execs.append((pod, command))
        accept = base64.b64encode(hashlib.sha1(
            (self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
             ).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
        self.end_headers()
        out = self.api.exec_output(pod, command)
        chunks = [out] if isinstance(out, str) else out  # a generator streams
        status = json.dumps({"metadata": {}, "status": "Success"}).encode()
        frames = itertools.chain(((2, b"\x01" + chunk.encode()) for chunk in chunks),
                                 [(2, b"\x03" + status), (8, struct.pack("!H", 1000))])
        for opcode, payload in frames:  # each frame as its chunk comes
            self.wfile.write(_ws_frame(opcode, payload))
            self.wfile.flush()
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        (_method, path, query), m, _body = self._object()
        api = self.api
        if path.endswith("/exec") and api.exec_output is not None:
            return self._exec()
        if path.endswith("/log"):
            return self._reply(200, api.logs.get(path.split("/")[-2], "").encode(),
                               "text/plain")
        if path == "/version":
            return self._send(200, VERSION)
        if not m:
            return self._missing(path)
        res, ns, name = m["resource"], m["ns"], m["name"]
        if name:
            obj = api.objects.get((res, ns, name))
            return self._send(200, api._ready(res, obj)) if obj else self._missing(name)
        items = [api._ready(res, o) for (r, o_ns, _), o in sorted(api.objects.items(),
                 key=lambda kv: str(kv[0]))
                 if r == res and (ns is None or o_ns == ns)
                 and _matches(o, query.get("labelSelector"))]
        return self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": {},
                                "items": items})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        _request, m, body = self._object()
        key = (m["resource"], m["ns"], body["metadata"]["name"])
        if key in self.api.objects:
            return self._status(409, "AlreadyExists")
        self.api.create(key, body)
        return self._send(201, body)

    def do_PATCH(self) -> None:  # noqa: N802 - http.server's name
        request, m, body = self._object()
        obj = self.api.objects.get((m["resource"], m["ns"], m["name"])) if m else None
        if obj is None:
            return self._missing(request.path)
        _merge(obj, body)
        self.api.patches.append((m["resource"], m["name"], body))
        return self._send(200, self.api._ready(m["resource"], obj))

    def do_DELETE(self) -> None:  # noqa: N802 - http.server's name
        request, m, _body = self._object()
        gone = self.api.delete(m["resource"], m["ns"], m["name"]) if m else None
        if gone is None:
            return self._missing(request.path)
        if m["resource"] == "services":  # the API answers with the Service itself
            return self._send(200, gone)
        return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})


class FakeApi(FakeApiBase):
    """Objects in memory, with the API server's allocations and the controllers' pods."""

    Handler = MemoryHandler

    def __init__(self, nodes: tuple[str, ...] = ("kind-worker", "kind-worker2"),
                 ready: bool = True,
                 exec_output: Callable[[str, list[str]], str] | None = None):
        super().__init__()
        self.ready = ready  # False: DaemonSets never get their pods ready
        self.exec_output = exec_output  # (pod, command) -> what the command prints
        self.execs: list[tuple[str, list[str]]] = []
        self.patches: list[tuple[str, str, dict]] = []
        self.next_ip = 0
        self.logs: dict[str, str] = {}  # pod name prefix -> its log, once it has run
        self.nodes = nodes
        self.objects: dict[tuple[str, str | None, str], dict] = {}  # (resource, ns, name)
        self.next_node_port = 30000
        for i, name in enumerate(nodes, start=2):  # kind's addresses: 172.18.0.2, .3, ...
            self.objects[("nodes", None, name)] = {
                "metadata": {"name": name}, "spec": {},
                "status": {"addresses": [{"type": "InternalIP", "address": f"172.18.0.{i}"},
                                         {"type": "Hostname", "address": name}]}}

    def _ready(self, resource: str, obj: dict) -> dict:
        obj = json.loads(json.dumps(obj))
        if resource == "daemonsets":
            obj["status"] = {"desiredNumberScheduled": 2, "numberReady": 2 if self.ready else 0,
                             "currentNumberScheduled": 2, "numberMisscheduled": 0}
        elif resource == "deployments":
            obj["status"] = {"readyReplicas": obj["spec"].get("replicas", 1)}
        elif resource == "pods":
            obj["status"] = {"phase": "Running", "conditions": [{"type": "Ready",
                                                                 "status": "True"}]}
            if obj["metadata"]["name"] in self.logs:  # a container that ran to its end
                obj["status"]["containerStatuses"] = [{
                    "name": "main", "image": "svcbench:dev", "imageID": "x", "ready": False,
                    "restartCount": 0, "lastState": {},
                    "state": {"terminated": {"exitCode": 0}}}]
        elif resource == "namespaces":
            obj["status"] = {"phase": "Active"}
        return obj

    def create(self, key: tuple[str, str | None, str], body: dict) -> None:
        """Stores `body`, with what the API server allocates and the controllers' pods."""
        resource, ns, _name = key
        spec = body.get("spec", {})
        if resource == "services" and "clusterIP" not in spec:
            self.next_ip += 1  # the API server allocates
            spec["clusterIP"] = f"10.96.0.{self.next_ip}"
        if resource == "services" and spec.get("type") in ("NodePort", "LoadBalancer"):
            for port in spec["ports"]:
                if "nodePort" not in port:
                    self.next_node_port += 1
                    port["nodePort"] = self.next_node_port
        self.objects[key] = body
        if resource == "deployments":  # the controllers' part: its pods, at once
            owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "1"}
            for i in range(spec.get("replicas", 1)):
                self._pod(ns, f"{body['metadata']['name']}-{i}", spec["template"], owner, {})
        if resource == "daemonsets":
            owner = {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "2"}
            for node in self.nodes:
                self._pod(ns, f"{body['metadata']['name']}-{node}", spec["template"], owner,
                          {"nodeName": node})

    def _pod(self, ns: str | None, name: str, template: dict, owner: dict, spec: dict) -> None:
        self.objects[("pods", ns, name)] = {
            "metadata": {**template["metadata"], "name": name, "namespace": ns,
                         "ownerReferences": [owner]},
            "spec": {**template["spec"], **spec}}

    def delete(self, resource: str, ns: str | None, name: str) -> dict | None:
        """Removes the object (None: there was none), with what the collectors remove."""
        gone = self.objects.pop((resource, ns, name), None)
        if gone is not None and resource == "deployments":  # the garbage collector's part
            for key in [k for k, o in self.objects.items()
                        if k[0] == "pods" and k[1] == ns and k[2].startswith(f"{name}-")
                        and o["metadata"].get("ownerReferences")]:
                del self.objects[key]
        if gone is not None and resource == "namespaces":  # the namespace controller's part
            for key in [k for k in self.objects if k[1] == name]:
                del self.objects[key]
        return gone
