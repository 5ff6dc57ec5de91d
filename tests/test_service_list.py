"""`svcbench service list --check` on a running cluster of each host mode (IPVS: the guest
test in test_ipvs.py): the rows read back from the kernel (or the userspace proxy) equal
the intended view's after `up`; one object removed by hand (a KUBE-SVC jump, an nft map
element, a BPF map entry, a proxy table entry) is reported as exactly that difference,
exit 1; a bad --mode or --node is one sentence, exit 2; --json parses. Offline: each kind of
difference, and source ranges compared as networks."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import socket
from pathlib import Path

import pytest

from dataplanes import servicelist as sl
from dataplanes.base import Host
from dataplanes.modes import make
from svcbench.cli import main

EXAMPLE = str(Path(__file__).parent.parent / "examples" / "web.yaml")
MODES = ("iptables", "nftables", "ebpf", "userspace")
WEB = "198.19.0.1:80/TCP"
GONE = "198.18.130.3:8080"  # web-3, on node2
# Every other kind of frontend and what the readers must tell apart: a load balancer
# (source ranges, affinity, Local policy, a health-check NodePort) with an externalIP; UDP;
# a serving+terminating local endpoint; internalTrafficPolicy Local; 0.0.0.0/0 ranges and
# no NodePorts; an empty UDP load balancer (reject); Local policies with the only endpoint
# on node2 (drop on node1).
MORE = """
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.3
  selector: {app: web}
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  externalIPs: [198.18.64.1]
  loadBalancerSourceRanges: [198.18.0.0/24]
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30081}]
status: {loadBalancer: {ingress: [{ip: 198.18.32.1}]}}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: ns2, labels: {app: far}}
spec:
  nodeName: node2
  containers: [{name: echo, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 8080, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: leaving, namespace: ns2, labels: {app: far}, deletionTimestamp: "2026-01-01T00:00:00Z"}
spec:
  nodeName: node1
  containers: [{name: echo, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 8080, protocol: UDP}]}]
---
apiVersion: v1
kind: Service
metadata: {name: far, namespace: ns2}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: far}
  externalIPs: [198.18.64.9]
  ports:
    - {name: http, port: 80, targetPort: http}
    - {name: dns, port: 53, targetPort: dns, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: itp, namespace: ns2}
spec:
  internalTrafficPolicy: Local
  selector: {app: far}
  ports: [{name: http, port: 81, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: open-lb, namespace: ns2}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  selector: {app: far}
  loadBalancerSourceRanges: [0.0.0.0/0]
  ports: [{name: http, port: 80, targetPort: http}]
status: {loadBalancer: {ingress: [{ip: 198.18.32.9}]}}
---
apiVersion: v1
kind: Service
metadata: {name: empty-lb, namespace: ns2}
spec:
  type: LoadBalancer
  selector: {app: nothing}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: UDP}]
status: {loadBalancer: {ingress: [{ip: 198.18.32.10}]}}
---
apiVersion: v1
kind: Pod
metadata: {name: solo, namespace: ns3, labels: {app: solo}}
spec:
  nodeName: node2
  containers: [{name: echo, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: solo, namespace: ns3}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  selector: {app: solo}
  externalIPs: [198.18.64.20]
  ports: [{name: http, port: 80, targetPort: http}]
status: {loadBalancer: {ingress: [{ip: 198.18.32.20}]}}
"""


@pytest.fixture(scope="module", params=MODES)
def run(request, tmp_path_factory):
    mode = request.param
    more = tmp_path_factory.mktemp("svclist") / "more.yaml"
    more.write_text(MORE)
    missing = make(mode).missing(Host())
    if missing:
        pytest.skip(f"mode {mode} cannot run here: {'; '.join(missing)}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["up", "--mode", mode, "-f", EXAMPLE, "-f", str(more), "--json"]) == 0
    run_id = json.loads(buf.getvalue())["run"]
    yield mode, run_id
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["down", "--run", run_id]) == 0


def _check(run_id: str, capsys) -> tuple[int, dict]:
    rc = main(["service", "list", "--run", run_id, "--check", "--json"])
    return rc, json.loads(capsys.readouterr().out)


def _break(mode: str, run_id: str) -> None:
    """Remove the object that sends node1's ClusterIP 198.19.0.1:80 to web-3."""
    from clusters.netns import NetnsCluster

    node = NetnsCluster.attach(run_id).node("node1")
    if mode == "iptables":
        saved = node.run(["iptables-save", "-t", "nat"]).stdout
        line = next(rule for rule in saved.splitlines()
                    if rule.startswith("-A KUBE-SVC-") and f"-> {GONE}" in rule)
        node.run(["iptables", "-t", "nat", "-D", *shlex.split(line)[1:]])
    elif mode == "nftables":
        listing = json.loads(node.run(["nft", "-j", "list", "map", "ip", "kube-proxy",
                                       "cluster-ip-tcp-3-endpoints"]).stdout)
        elems = next(x["map"]["elem"] for x in listing["nftables"] if "map" in x)
        slot = next(key["concat"][2] for key, value in elems
                    if f"{value['concat'][0]}:{value['concat'][1]}" == GONE)
        node.run(["nft", "delete", "element", "ip", "kube-proxy", "cluster-ip-tcp-3-endpoints",
                  f"{{ 198.19.0.1 . 80 . {slot} }}"])
    elif mode == "ebpf":
        from bpf import loader, maps
        from dataplanes.ebpf import netns_cookie

        objects = loader.find_node_objects(node.call(netns_cookie), loader.compile_object())
        try:
            key = maps.LB4_KEY.pack(socket.inet_aton("198.19.0.1"), socket.htons(80), 0, 6,
                                    0, 0)
            assert objects.map("lb4_services").delete(key)
        finally:
            objects.close()
    elif mode == "userspace":
        from dataplanes.userspace import UserspaceDataplane, _service
        from svcbench.cli import _stored_tracker

        dp = UserspaceDataplane()
        view = _stored_tracker(NetnsCluster.attach(run_id)).node_view("node1")
        spec = _service(view.service("ns1/web:http"))
        spec["internal"] = [e for e in spec["internal"] if f"{e[0]}:{e[1]}" != GONE]
        at = dp._request(node, {"op": "ping"})
        dp._request(node, {"op": "delta", "expect": [at["pid"], at["tables"]],
                           "services": [spec], "removed": []})


@pytest.mark.root
def test_check_is_clean_after_up_and_names_what_was_removed(run, capsys):
    mode, run_id = run
    rc, data = _check(run_id, capsys)
    assert (rc, data["differences"], data["mode"]) == (0, [], mode)
    node1 = {r["frontend"]: r for r in data["nodes"]["node1"]}
    web = node1[WEB]
    assert web["kind"] == "ClusterIP" and web["service"] == "ns1/web:http"
    assert [b["address"] for b in web["backends"]] == [
        "198.18.129.2:8080", "198.18.130.2:8080", GONE]
    assert node1["198.19.0.2:80/TCP"]["no_endpoints"] == "reject"
    assert node1["198.18.0.1:30080/TCP"]["kind"] == "NodePort"
    assert web["service_from"] == ("kernel" if mode in ("iptables", "userspace") else "view")
    lb = node1["198.18.32.1:80/TCP"]  # read back by a second process (ebpf: the LPM trie)
    assert (lb["kind"], lb["source_ranges"], lb["affinity_timeout_s"]) == (
        "LoadBalancer", ["198.18.0.0/24"], 60)
    assert [b["address"] for b in lb["backends"]] == ["198.18.129.2:8080"]  # local only
    assert node1["*:30000/TCP"]["local_endpoints"] == 1
    solo = [r for r in data["nodes"]["node1"] if r["service"] == "ns3/solo:http"]
    assert len(solo) == 4 and all(r["no_endpoints"] == "drop" for r in solo)

    _break(mode, run_id)
    rc, data = _check(run_id, capsys)
    found = [(d["node"], d["frontend"], d["what"], d["want"], d["have"])
             for d in data["differences"]]
    expected = {
        "ebpf": [("node1", WEB, "missing frontend", "ns1/web:http", None)],
        # The NodePort's KUBE-EXT chain jumps to the same KUBE-SVC chain.
        "iptables": [("node1", WEB, "backend missing", GONE, None),
                     ("node1", "198.18.0.1:30080/TCP", "backend missing", GONE, None)],
    }.get(mode, [("node1", WEB, "backend missing", GONE, None)])
    assert (rc, found) == (1, expected)
    assert main(["service", "list", "--run", run_id, "--check", "--node", "node1"]) == 1
    text = capsys.readouterr().out
    assert f"node1: ClusterIP {WEB} (ns1/web:http)" in text and "differences" in text
    if mode == "iptables":  # the flags are checked before any mode's reader: once is enough
        _bad_flags_are_one_sentence(mode, run_id, capsys)


def _bad_flags_are_one_sentence(mode: str, run_id: str, capsys) -> None:
    other = "nftables"
    for argv, says in ((["--mode", other], f"runs mode {mode}"),
                       (["--mode", "bogus"], "is not a proxy mode"),
                       (["--node", "node9"], "--node 'node9' is not a node")):
        assert main(["service", "list", "--run", run_id, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- offline


def test_differences_name_each_kind_of_mismatch():
    def row(**kw) -> sl.Row:
        base = dict(frontend="198.19.0.9:80/TCP", kind="ClusterIP", service="ns/a:http",
                    service_from="kernel", backends=[sl.Backend("198.18.129.2:8080")])
        return sl.Row(**{**base, **kw})

    want = [row(), row(frontend="198.19.0.10:80/TCP"),
            row(frontend="198.18.32.1:80/TCP", kind="LoadBalancer", source_ranges=["10.0.0.0/8"],
                affinity_timeout_s=60, no_endpoints=None)]
    have = [row(backends=[sl.Backend("198.18.129.3:8080")], no_endpoints="drop"),
            row(frontend="198.18.32.1:80/TCP", kind="LoadBalancer", service="ns/b:http"),
            row(frontend="198.19.0.11:80/TCP")]
    found = [(d["frontend"], d["what"], d["want"], d["have"])
             for d in sl.differences("node1", want, have)]
    assert found == [
        ("198.19.0.9:80/TCP", "backend missing", "198.18.129.2:8080", None),
        ("198.19.0.9:80/TCP", "backend extra", None, "198.18.129.3:8080"),
        ("198.19.0.9:80/TCP", "no endpoints", None, "drop"),
        ("198.19.0.10:80/TCP", "missing frontend", "ns/a:http", None),
        ("198.19.0.11:80/TCP", "extra frontend", None, "ns/a:http"),
        ("198.18.32.1:80/TCP", "service", "ns/a:http", "ns/b:http"),
        ("198.18.32.1:80/TCP", "affinity", 60, None),
        ("198.18.32.1:80/TCP", "source ranges", ["10.0.0.0/8"], []),
    ]


def test_source_ranges_compare_as_networks_without_the_lb_ip_itself():
    assert sl.ranges(["198.18.0.0/25", "198.18.0.128/25", "198.18.32.1/32"], "198.18.32.1") == [
        "198.18.0.0/24"]
    # IPVS's ipsets hold 0.0.0.0/0 as its two halves; iptables-save omits it.
    assert sl.ranges(["0.0.0.0/1", "128.0.0.0/1"]) == sl.ranges(["0.0.0.0/0"]) == ["0.0.0.0/0"]
