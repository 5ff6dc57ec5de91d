"""A Service proxy modelled on the fake API server's objects, answering the probes that
`svcbench conformance --cluster` runs in pods by exec (tests/fakeapi.py's FakeApi exec_output).

Each probe command is answered as kube-proxy would make the cluster answer it: the target is
looked up among the Services the fake holds (ClusterIP and port, or a node's InternalIP and
NodePort), its endpoints are the pods of its namespace its selector matches whose ports
resolve its targetPort (by number or name), narrowed by internalTrafficPolicy Local (the
source's node) or externalTrafficPolicy Local (the node addressed, for sources outside the
pod network on another node); sessionAffinity ClientIP keeps a client on its first backend,
others take turns; a Service labelled for another proxy has no rules; no endpoints refuse,
none after a Local policy drop. The echo reply names the backend and the client address it
saw (the source's own, but the node's after a NodePort's SNAT).

`broken` names what this proxy gets wrong, for tests that show a check failing:
  silent      the first echo pod of the bench namespace never answers
  affinity    sessionAffinity is ignored
  itp         internalTrafficPolicy is ignored
  etp         externalTrafficPolicy is ignored (and NodePort traffic is SNATed)
  hairpin     a pod reaching itself through a Service gets no answer
  proxy-name  Services labelled service.kubernetes.io/service-proxy-name are served
  named-port  a named targetPort is not resolved (only numbers work)
"""

from __future__ import annotations

import itertools
import json
import time

from clusters.workloads.probe import ProbeResult, Sample
from kube import deploy
from kube.model import PROXY_NAME_LABEL


class FakeDataplane:
    def __init__(self, fake, broken: frozenset[str] = frozenset()):
        self.fake, self.broken = fake, broken
        self.sticky: dict[tuple[str, str], str] = {}
        self.turns: dict[str, itertools.count] = {}

    # ---- the cluster as the fake holds it

    def _pods(self) -> dict[str, tuple[str, dict]]:
        return {k[2]: (k[1], o) for k, o in self.fake.objects.items() if k[0] == "pods"}

    def _node_ips(self) -> dict[str, str]:
        return {o["status"]["addresses"][0]["address"]: k[2]
                for k, o in self.fake.objects.items() if k[0] == "nodes"}

    def _source(self, pod: str) -> tuple[str, str, str]:
        """(kind: pod, host or echo; node; IP) of the pod a probe runs in."""
        ns, obj = self._pods()[pod]
        node = obj["spec"].get("nodeName", "")
        component = obj["metadata"]["labels"].get(deploy.COMPONENT)
        if component == deploy.PROBE_HOST:
            ip = next(ip for ip, n in self._node_ips().items() if n == node)
            return "host", node, ip
        index = self.fake.nodes.index(node) + 1 if node in self.fake.nodes else 9
        return ("pod" if component == deploy.PROBE else "echo"), node, \
            f"10.244.{index}.{sorted(self._pods()).index(pod) + 10}"

    def _lookup(self, ip: str, port: int, proto: str):
        """(Service, its port, the node addressed for a NodePort or None)."""
        node_ips = self._node_ips()
        for key, svc in self.fake.objects.items():
            if key[0] != "services":
                continue
            for p in svc["spec"]["ports"]:
                if p.get("protocol", "TCP") != proto:
                    continue
                if svc["spec"].get("clusterIP") == ip and p["port"] == port:
                    return key[1], svc, p, None
                if ip in node_ips and p.get("nodePort") == port:
                    return key[1], svc, p, node_ips[ip]
        return None, None, None, None

    def _endpoints(self, ns: str, svc: dict, port: dict) -> list[tuple[str, str]]:
        """(pod, node) of every pod the Service selects whose ports resolve its targetPort."""
        selector = svc["spec"].get("selector") or {}
        target = port.get("targetPort", port["port"])
        out = []
        for name, (pod_ns, obj) in sorted(self._pods().items()):
            labels = obj["metadata"].get("labels") or {}
            if pod_ns != ns or any(labels.get(k) != v for k, v in selector.items()):
                continue
            declared = [c for ct in obj["spec"].get("containers", []) for c in ct.get("ports", [])
                        if c.get("protocol", "TCP") == port.get("protocol", "TCP")]
            if isinstance(target, str):
                found = "named-port" not in self.broken and any(
                    c.get("name") == target for c in declared)
            else:
                found = not declared or any(c["containerPort"] == target for c in declared)
            if found:
                out.append((name, obj["spec"].get("nodeName", "")))
        return out

    # ---- one probe

    def samples(self, pod: str, ip: str, port: int, proto: str, count: int,
                timeout: float) -> list[Sample]:
        kind, node, src = self._source(pod)
        ns, svc, sport, addressed = self._lookup(ip, port, proto)
        silent = [Sample(timeout * 1e6, "timeout", None, None) for _ in range(count)]
        if svc is None:
            return silent
        labels = svc["metadata"].get("labels") or {}
        if PROXY_NAME_LABEL in labels and "proxy-name" not in self.broken:
            return silent
        endpoints = self._endpoints(ns, svc, sport)
        if not endpoints:
            return [Sample(80.0, "refused", None, None) for _ in range(count)]
        spec, seen = svc["spec"], src
        if addressed is None:
            if spec.get("internalTrafficPolicy") == "Local" and "itp" not in self.broken:
                endpoints = [e for e in endpoints if e[1] == node]
        elif spec.get("externalTrafficPolicy") == "Local" and "etp" not in self.broken \
                and kind == "host" and node != addressed:
            endpoints = [e for e in endpoints if e[1] == addressed]
        else:  # NodePort, eTP Cluster: SNAT to the node addressed
            seen = next(i for i, n in self._node_ips().items() if n == addressed)
        if not endpoints:
            return silent
        svc_key = f"{ns}/{svc['metadata']['name']}"
        turn = self.turns.setdefault(svc_key, itertools.count())
        bench = sorted(name for name, (pod_ns, _o) in self._pods().items()
                       if pod_ns.endswith("-bench"))
        out = []
        for _ in range(count):
            if spec.get("sessionAffinity") == "ClientIP" and "affinity" not in self.broken:
                chosen = self.sticky.setdefault((svc_key, src),
                                                endpoints[next(turn) % len(endpoints)][0])
            else:
                chosen = endpoints[next(turn) % len(endpoints)][0]
            if ("silent" in self.broken and bench and chosen == bench[0]) or (
                    "hairpin" in self.broken and chosen == pod):
                out.append(Sample(timeout * 1e6, "timeout", None, None))
            else:
                out.append(Sample(150.0, "ok", f"{ns}/{chosen}", f"{seen}:40000", 40000))
        return out

    def __call__(self, pod: str, command: list[str]):
        """exec_output for FakeApi: the probe's JSON, or a programming-latency watcher that
        sees the new pod 10 ms after the selector switch reaches the API."""
        if command[1] == "-c":
            yield "ready\n"
            wanted = command[5].split("/")[1]
            end = time.monotonic() + 5
            while time.monotonic() < end and not any(
                    p[2]["spec"]["selector"].get("svcbench.io/pod") == wanted
                    for p in self.fake.patches[-1:] if p[0] == "services"):
                time.sleep(0.005)
            yield json.dumps({"first": time.time() + 0.01}) + "\n"
            return
        ip, port = command[3], int(command[4])
        count = int(command[command.index("--count") + 1])
        timeout = float(command[command.index("--timeout") + 1])
        proto = "UDP" if "--udp" in command else "TCP"
        result = ProbeResult(f"{ip}:{port}", proto,
                             self.samples(pod, ip, port, proto, count, timeout))
        yield json.dumps(result.to_json())
