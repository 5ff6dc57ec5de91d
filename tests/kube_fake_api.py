"""A small in-memory Kubernetes API server on loopback, for the kubeconfig provider's offline
tests: it stores what is created, lists it by label selector (every workload reported ready),
deletes it, and answers /version. Services get a ClusterIP and NodePorts as the API server
allocates them, nodes InternalIPs as kind's. Only the calls clusters/kube.py makes are served."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import struct
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

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


class FakeApi:
    def __init__(self, nodes: tuple[str, ...] = ("kind-worker", "kind-worker2"),
                 ready: bool = True,
                 exec_output: Callable[[str, list[str]], str] | None = None):
        self.ready = ready  # False: DaemonSets never get their pods ready
        self.exec_output = exec_output  # (pod, command) -> what the command prints
        self.execs: list[tuple[str, list[str]]] = []
        self.patches: list[tuple[str, str, dict]] = []
        self.next_ip = 0
        self.logs: dict[str, str] = {}  # pod name prefix -> its log, once it has run
        self.nodes = nodes
        self.objects: dict[tuple[str, str | None, str], dict] = {}  # (resource, ns, name)
        self.requests: list[tuple[str, str]] = []
        self.next_node_port = 30000
        for i, name in enumerate(nodes, start=2):  # kind's addresses: 172.18.0.2, .3, ...
            self.objects[("nodes", None, name)] = {
                "metadata": {"name": name}, "spec": {},
                "status": {"addresses": [{"type": "InternalIP", "address": f"172.18.0.{i}"},
                                         {"type": "Hostname", "address": name}]}}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # a short poll: shutdown() waits for it (0.5 s by default, for every test)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path) -> str:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
        return str(path)

    def __enter__(self) -> FakeApi:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

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

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                url = urlparse(self.path)
                url = url._replace(path=url.path.rstrip("/") or "/")
                api.requests.append((self.command, url.path))
                m = PATH_RE.match(url.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                return url, m, query

            def _missing(self, what: str) -> None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404, "message": f"{what} not found"})

            def _exec(self, url) -> None:
                """pods/NAME/exec over a websocket (v4.channel.k8s.io): the command's output
                on channel 1, a success Status on channel 3, then close."""
                pod = url.path.split("/")[-2]
                command = parse_qs(url.query)["command"]
                api.execs.append((pod, command))
                accept = base64.b64encode(hashlib.sha1(
                    (self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                     ).encode()).digest()).decode()
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
                self.end_headers()
                out = api.exec_output(pod, command)
                chunks = [out] if isinstance(out, str) else out  # a generator streams
                status = json.dumps({"metadata": {}, "status": "Success"}).encode()
                frames = itertools.chain(((2, b"\x01" + chunk.encode()) for chunk in chunks),
                                         [(2, b"\x03" + status), (8, struct.pack("!H", 1000))])
                for opcode, payload in frames:  # each frame as its chunk comes
                    n = len(payload)
                    head = bytes([0x80 | opcode]) + (
                        bytes([n]) if n < 126 else
                        bytes([126]) + struct.pack("!H", n) if n < 65536 else
                        bytes([127]) + struct.pack("!Q", n))
                    self.wfile.write(head + payload)
                    self.wfile.flush()
                self.close_connection = True

            def do_GET(self) -> None:
                url, m, query = self._route()
                if url.path.endswith("/exec") and api.exec_output is not None:
                    return self._exec(url)
                if url.path.endswith("/log"):
                    data = api.logs.get(url.path.split("/")[-2], "").encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                if url.path == "/version":
                    return self._send(200, VERSION)
                if not m:
                    return self._missing(url.path)
                res, ns, name = m["resource"], m["ns"], m["name"]
                if name:
                    obj = api.objects.get((res, ns, name))
                    return self._send(200, api._ready(res, obj)) if obj else self._missing(name)
                items = [api._ready(res, o) for (r, o_ns, _), o in sorted(api.objects.items(),
                         key=lambda kv: str(kv[0]))
                         if r == res and (ns is None or o_ns == ns)
                         and _matches(o, query.get("labelSelector"))]
                self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": {},
                                 "items": items})

            def do_POST(self) -> None:
                url, m, _query = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = (m["resource"], m["ns"], body["metadata"]["name"])
                if key in api.objects:
                    return self._send(409, {"kind": "Status", "apiVersion": "v1", "code": 409,
                                            "status": "Failure", "reason": "AlreadyExists"})
                if key[0] == "services" and "clusterIP" not in body["spec"]:
                    api.next_ip += 1  # the API server allocates
                    body["spec"]["clusterIP"] = f"10.96.0.{api.next_ip}"
                if key[0] == "services" and body["spec"].get("type") in ("NodePort",
                                                                         "LoadBalancer"):
                    for port in body["spec"]["ports"]:
                        if "nodePort" not in port:
                            api.next_node_port += 1
                            port["nodePort"] = api.next_node_port
                api.objects[key] = body
                if key[0] == "deployments":  # the controllers' part: its pods, at once
                    template = body["spec"]["template"]
                    for i in range(body["spec"].get("replicas", 1)):
                        name = f"{body['metadata']['name']}-{i}"
                        api.objects[("pods", key[1], name)] = {
                            "metadata": {**template["metadata"], "name": name,
                                         "namespace": key[1],
                                         "ownerReferences": [{"apiVersion": "apps/v1",
                                                              "kind": "ReplicaSet", "name": "rs",
                                                              "uid": "1"}]},
                            "spec": template["spec"]}
                if key[0] == "daemonsets":
                    template = body["spec"]["template"]
                    for node in api.nodes:
                        name = f"{body['metadata']['name']}-{node}"
                        api.objects[("pods", key[1], name)] = {
                            "metadata": {**template["metadata"], "name": name,
                                         "namespace": key[1],
                                         "ownerReferences": [{"apiVersion": "apps/v1",
                                                              "kind": "DaemonSet", "name": "ds",
                                                              "uid": "2"}]},
                            "spec": {**template["spec"], "nodeName": node}}
                self._send(201, body)

            def do_PATCH(self) -> None:
                """A merge patch (maps merge, a null removes the key)."""
                url, m, _query = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                obj = api.objects.get((m["resource"], m["ns"], m["name"])) if m else None
                if obj is None:
                    return self._missing(url.path)

                def merge(into: dict, patch: dict) -> None:
                    for key, value in patch.items():
                        if value is None:
                            into.pop(key, None)
                        elif isinstance(value, dict) and isinstance(into.get(key), dict):
                            merge(into[key], value)
                        else:
                            into[key] = value

                merge(obj, body)
                api.patches.append((m["resource"], m["name"], body))
                self._send(200, api._ready(m["resource"], obj))

            def do_DELETE(self) -> None:
                url, m, _query = self._route()
                gone = api.objects.pop((m["resource"], m["ns"], m["name"]), None) if m else None
                if gone is None:
                    return self._missing(url.path)
                if m["resource"] == "services":  # the API answers with the Service itself
                    return self._send(200, gone)
                if m["resource"] == "deployments":  # the garbage collector's part: its pods
                    for key in [k for k, o in api.objects.items()
                                if k[0] == "pods" and k[1] == m["ns"]
                                and k[2].startswith(f"{m['name']}-")
                                and o["metadata"].get("ownerReferences")]:
                        del api.objects[key]
                if m["resource"] == "namespaces":  # the namespace controller's part
                    for key in [k for k in api.objects if k[1] == m["name"]]:
                        del api.objects[key]
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        return Handler
