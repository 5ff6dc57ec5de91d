"""A tiny Kubernetes API server on 127.0.0.1 that serves recorded objects, so the real
`kubernetes` client (config from a kubeconfig, list, watch) runs against it.

It answers the three collections a node proxy reads (`/api/v1/services`,
`/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`) as an API server does: a GET
is the List (the JSON in tests/data/k8s, replaceable with `set_list`); a GET with
`watch=true` streams one JSON event per line, those a test `push`es, until the watch's
timeoutSeconds, an `END` or an ERROR event (after which the server ends the stream, as it does for
410 Gone). `fieldSelector=metadata.name=X`, `limit` and `continue` are honoured for lists. Every request is
recorded (path and query) for assertions.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

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


class FakeApiServer:
    def __init__(self) -> None:
        self.lists = {kind: recorded(f"{kind}.json") for kind in PATHS.values()}
        self.watches: dict[str, queue.Queue] = {kind: queue.Queue() for kind in PATHS.values()}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return path

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def set_list(self, kind: str, body: dict) -> None:
        self.lists[kind] = body

    def push(self, kind: str, *events: dict) -> None:
        for event in events:
            self.watches[kind].put(event)

    def seen(self, kind: str, watch: bool | None = None) -> list[dict[str, str]]:
        """Queries of the requests for `kind` (lists, watches or both)."""
        path = next(p for p, k in PATHS.items() if k == kind)
        return [q for p, q in self.requests if p == path
                and (watch is None or (q.get("watch") == "true") == watch)]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                fake.requests.append((url.path, query))
                kind = PATHS.get(url.path)
                if kind is None:
                    return self._json(404, {"kind": "Status", "apiVersion": "v1",
                                            "status": "Failure", "reason": "NotFound",
                                            "code": 404})
                if query.get("watch") == "true":
                    return self._watch(kind, float(query.get("timeoutSeconds", "30")))
                body = json.loads(json.dumps(fake.lists[kind]))
                selector = query.get("fieldSelector", "")
                if selector.startswith("metadata.name="):
                    name = selector.split("=", 1)[1]
                    body["items"] = [i for i in body["items"] if i["metadata"]["name"] == name]
                if "limit" in query:  # pages; the continue token is the next item's index
                    start, size = int(query.get("continue", "0")), int(query["limit"])
                    if start + size < len(body["items"]):
                        body["metadata"]["continue"] = str(start + size)
                    body["items"] = body["items"][start:start + size]
                self._json(200, body)

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _watch(self, kind: str, timeout_s: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                ends = time.monotonic() + timeout_s
                try:
                    while time.monotonic() < ends and not fake._closing.is_set():
                        try:
                            event = fake.watches[kind].get(timeout=0.05)
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

            def log_message(self, *args) -> None:
                pass

        Handler.protocol_version = "HTTP/1.1"
        return Handler
