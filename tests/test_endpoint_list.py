"""`svcbench endpoint list` on a real cluster: every pod per node with its IP and conditions,
the Services whose EndpointSlices name it (an unready pod counts as ready for a Service
that publishes not-ready addresses), and endpoints of hand-written slices that are no pod;
`--node` filters; a bad node name is one sentence and exit 2."""

from __future__ import annotations

import json

import pytest

from svcbench.cli import main

pytestmark = pytest.mark.root
MANIFEST = """
apiVersion: v1
kind: Pod
metadata: {name: up, namespace: ns1, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: starting, namespace: ns1, labels: {app: web}}
spec: {nodeName: node2, containers: [{name: echo}]}
status: {conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: leaving, namespace: ns1, labels: {app: web}, deletionTimestamp: "2026-01-01T00:00:00Z"}
spec: {nodeName: node2, containers: [{name: echo}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns1}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: all, namespace: ns1}
spec: {selector: {app: web}, publishNotReadyAddresses: true, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: outside, namespace: ns1}
spec: {ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: outside-1, namespace: ns1, labels: {kubernetes.io/service-name: outside}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.2], nodeName: node2}]
ports: [{port: 8080, protocol: TCP}]
"""


def test_endpoint_list_shows_pods_conditions_and_services(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST)
    assert main(["up", "-f", str(path), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    try:
        assert main(["endpoint", "list", "--run", run, "--json"]) == 0
        rows = {r["pod"] or r["ip"]: r for r in json.loads(capsys.readouterr().out)["endpoints"]}
        assert main(["endpoint", "list", "--run", run, "--node", "node1", "--json"]) == 0
        node1 = json.loads(capsys.readouterr().out)["endpoints"]
        assert main(["endpoint", "list", "--run", run, "--node", "node7"]) == 2
        assert "--node 'node7' is not a node" in capsys.readouterr().err
        assert main(["endpoint", "list", "--run", run]) == 0
        table = capsys.readouterr().out
    finally:
        assert main(["down", "--run", run]) == 0
    up, starting, leaving = rows["ns1/up"], rows["ns1/starting"], rows["ns1/leaving"]
    assert up["node"] == "node1" and up["ready"] and sorted(up["services"]) == ["ns1/all", "ns1/web"]
    # Unready, and still named by both Services' slices (web's says not ready).
    assert sorted(starting["services"]) == ["ns1/all", "ns1/web"] and not starting["ready"]
    assert leaving["terminating"]
    outside = rows["198.18.0.2"]
    assert outside["pod"] is None and outside["services"] == ["ns1/outside"]
    assert [r["pod"] for r in node1] == ["ns1/up"]
    assert "198.18.0.2" in table and "node2" in table
