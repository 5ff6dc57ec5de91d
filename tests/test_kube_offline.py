"""kind and kubeconfig clusters, offline: every manifest svcbench would create validated
against Kubernetes' own schemas, kind configs against kind's v1alpha4 fields, the bad-input
paths of `--cluster kind|kubeconfig`, the bench's computations and the echo pod's server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from clusters import kind
from kube import deploy
from kube.manifests import load_files

ROOT = Path(__file__).resolve().parent.parent
RUN = "a1b2c3"
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install '.[test]')")


def _all_objects() -> list[dict]:
    manifests = load_files([ROOT / "examples" / "web.yaml"])
    objs = deploy.objects_for(RUN, "ebpf", services=manifests.services, pods=manifests.pods,
                              node_names={"node1": "kind-worker", "node2": "kind-worker2"},
                              with_agent=True, host="builder",
                              api_server=("172.18.0.2", 6443))
    objs += deploy.locust_objects(RUN, "10.96.0.10:80", workers=2, users=16, seconds=10)
    objs += deploy.bench_services(RUN, "bench", 3, {"app": "svcbench-echo"})
    objs.append(deploy.echo_deployment(RUN, "bench", "svcbench-echo", 4))
    from bench.kube_bench import bench_objects
    from conformance import kube_checks

    objs += kube_checks.objects(RUN, ["kind-control-plane", "kind-worker", "kind-worker2"],
                                host="builder")
    objs += bench_objects(RUN, 2, 2, deploy.DEFAULT_IMAGE)
    return objs


SERVICE_SHAPES = """
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: ns1}
spec:
  type: LoadBalancer
  selector: {app: web}
  externalTrafficPolicy: Local
  healthCheckNodePort: 30300
  loadBalancerSourceRanges: [198.18.0.0/24]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]
status: {loadBalancer: {ingress: [{ip: 198.18.32.1}]}}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: ns1, labels: {tier: web}}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  trafficDistribution: PreferClose
  internalTrafficPolicy: Local
  externalIPs: [198.18.64.1]
  ports: [{name: dns, port: 53, protocol: UDP}, {name: discard, port: 9, protocol: SCTP}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: ns2}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: ns2}
spec: {type: ExternalName, externalName: web.ns1.svc.cluster.local}
"""


def test_services_of_every_shape_keep_their_meaning_and_validate(tmp_path):
    path = tmp_path / "shapes.yaml"
    path.write_text(SERVICE_SHAPES)
    services = {s.name: deploy.service(RUN, s) for s in load_files([path]).services}
    for svc in services.values():
        _validate(svc)
    lb = services["lb"]["spec"]
    assert lb["type"] == "LoadBalancer" and lb["externalTrafficPolicy"] == "Local"
    assert lb["loadBalancerSourceRanges"] == ["198.18.0.0/24"]
    assert "healthCheckNodePort" not in lb and "nodePort" not in lb["ports"][0]
    sticky = services["sticky"]
    assert sticky["metadata"]["labels"]["tier"] == "web" and "externalIPs" not in sticky["spec"]
    assert sticky["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 60}}
    assert sticky["spec"]["trafficDistribution"] == "PreferClose"
    assert services["headless"]["spec"]["clusterIP"] == "None"
    assert services["alias"]["spec"]["externalName"] == "web.ns1.svc.cluster.local"


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, deploy.VALIDATE_VERSION, strict=True)


def test_every_manifest_validates_against_kubernetes_schemas_and_is_labelled_by_run():
    objs = _all_objects()
    kinds = {o["kind"] for o in objs}
    assert kinds >= {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                     "DaemonSet", "Deployment", "Service", "Pod"}, kinds
    for obj in objs:
        _validate(obj)  # raises ValidationError naming the field
        meta = obj["metadata"]
        assert meta["labels"][deploy.MANAGED_BY] == "svcbench", meta
        assert meta["labels"][deploy.RUN_LABEL] == RUN, meta
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert meta["namespace"].startswith(f"svb-{RUN}-"), meta
    # the validator is strict: a typo and a wrong type are refused
    bad = json.loads(json.dumps(objs[-1]))
    bad["spec"]["ports"][0]["prot"] = "TCP"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)
    # the YAML dump reads back to the same objects
    assert list(yaml.safe_load_all(deploy.dump(objs))) == objs


def test_agent_daemonset_runs_privileged_on_every_node_with_node_name_and_rbac():
    ds = deploy.agent_daemonset(RUN, "nftables", "reg/svcbench:1", ("172.18.0.2", 6443))
    pod = ds["spec"]["template"]["spec"]
    c = pod["containers"][0]
    # no kube-proxy serves the kubernetes Service yet: the agent reaches the API server itself
    assert c["env"][1:] == [{"name": "KUBERNETES_SERVICE_HOST", "value": "172.18.0.2"},
                            {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}]
    ranged = deploy.agent_daemonset(RUN, "nftables", cidrs=("10.244.0.0/16", "10.96.0.0/16"))
    assert ranged["spec"]["template"]["spec"]["containers"][0]["command"][-4:] == [
        "--cluster-cidr", "10.244.0.0/16", "--service-cidr", "10.96.0.0/16"]
    c = deploy.agent_daemonset(RUN, "nftables", "reg/svcbench:1")["spec"]["template"]["spec"][
        "containers"][0]
    assert c["command"] == ["svcbench", "agent", "--mode", "nftables", "--node-name",
                            "$(NODE_NAME)"]
    assert c["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef":
                                                             {"fieldPath": "spec.nodeName"}}}]
    assert c["securityContext"] == {"privileged": True} and pod["hostNetwork"] is True
    assert "hostPID" not in pod and pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 10256}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/lib/modules", "/sys/fs/bpf"}
    sa, role, binding = deploy.agent_rbac(RUN)
    rules = {(r["apiGroups"][0], r["resources"][0]): set(r["verbs"]) for r in role["rules"]}
    assert rules == {("", "services"): {"list", "watch"},
                     ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
                     ("", "nodes"): {"get", "list", "watch"}}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    # Services from the suite's manifests leave every address to the cluster
    svc = deploy.service(RUN, load_files([ROOT / "examples" / "web.yaml"]).services[0])
    assert "clusterIP" not in svc["spec"] and all("nodePort" not in p for p in svc["spec"]["ports"])
    assert svc["metadata"]["namespace"] == f"svb-{RUN}-ns1"
    master, _svc, worker = deploy.locust_objects(RUN, "10.96.0.10:80", 3, 24, 5)
    assert "--master " in master["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert f"--worker --master-host {master['metadata']['name']}." in \
        worker["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert worker["spec"]["replicas"] == 3


# --------------------------------------------------------------------------- kind


def test_kind_configs_use_kinds_v1alpha4_fields_and_values():
    accepted = kind.accepted_fields()
    assert len(accepted["commit"]) == 40 and "types.go" in accepted["source"]
    for mode, proxy in [("ebpf", "none"), ("iptables", "none"),
                        ("kube-proxy/iptables", "iptables"), ("kube-proxy/ipvs", "ipvs"),
                        ("kube-proxy/nftables", "nftables")]:
        cfg = kind.config(mode, 3, RUN)
        assert kind.validate_config(cfg) == [], mode
        assert cfg["networking"]["kubeProxyMode"] == proxy
        # the ranges the agent is told (kind's own defaults, written out)
        assert (cfg["networking"]["podSubnet"], cfg["networking"]["serviceSubnet"]) == (
            kind.POD_SUBNET, kind.SERVICE_SUBNET)
        assert [n["role"] for n in cfg["nodes"]] == ["control-plane"] + ["worker"] * 3
        assert yaml.safe_load(kind.dump(cfg)) == cfg
    # kind's own test data (pkg/internal/apis/config/encoding/testdata/v1alpha4)
    many_fields = yaml.safe_load(textwrap.dedent("""\
        kind: Cluster
        apiVersion: kind.x-k8s.io/v1alpha4
        name: not-default
        featureGates: {AllBeta: false}
        networking: {ipFamily: ipv6}
        nodes:
        - role: control-plane
        - role: worker
          extraMounts:
          - {containerPath: /foo, hostPath: /bar, readOnly: true, selinuxRelabel: false,
             propagation: Bidirectional}
          extraPortMappings:
          - {containerPort: 8080, hostPort: 8080, protocol: UDP}
        """))
    assert kind.validate_config(many_fields) == []
    bogus = json.loads(json.dumps(many_fields))
    bogus["nodes"][1]["extraPortMappings"][0]["nOtAReaLFielD"] = "bar"
    bogus["networking"]["kubeProxyMode"] = "bpf"
    assert kind.validate_config(bogus) == [
        "nodes[1].extraPortMappings[0].nOtAReaLFielD is not a field of kind's v1alpha4 config",
        "networking.kubeProxyMode is 'bpf'; kind accepts iptables, ipvs, nftables, none",
    ]


def _main(*argv: str) -> int:
    from svcbench.cli import main

    return main(list(argv))


def _kube_records() -> set[str]:
    from clusters.kube import STATE_DIR

    return set(os.listdir(STATE_DIR)) if os.path.isdir(STATE_DIR) else set()


def _before() -> tuple[set[str], set[str], set[str]]:
    from tests.test_cli import _netns, _runs

    return _kube_records(), _netns(), _runs()


def _assert_nothing_created(before: tuple[set[str], set[str], set[str]]) -> None:
    """No kube run record, and no namespace or netns run without a live owner (other
    helpers' runs come and go meanwhile)."""
    from tests.test_cli import assert_nothing_created

    assert _kube_records() == before[0]
    assert_nothing_created(before[1], before[2])


def test_kind_config_command_prints_a_valid_config(capsys):
    assert _main("kind", "config", "--mode", "kube-proxy/ipvs", "--nodes", "1") == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert kind.validate_config(cfg) == [] and cfg["networking"]["kubeProxyMode"] == "ipvs"
    assert _main("kind", "config", "--mode", "ipvs2") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'ipvs2'" in lines[0] and "kube-proxy/iptables" in lines[0]


def _fake_bin(tmp_path: Path, name: str, script: str) -> None:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def test_up_on_kind_without_docker_or_kind_is_one_sentence_exit_2_nothing_created(
        tmp_path, monkeypatch, capsys):
    before = _before()
    monkeypatch.setenv("PATH", str(tmp_path))  # neither docker nor kind is found
    assert _main("up", "--cluster", "kind", "--mode", "ebpf") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["svcbench: error: docker and kind are not installed, so kind clusters "
                     "cannot start here; install Docker and kind (https://kind.sigs.k8s.io) or "
                     "use --cluster netns or --cluster kubeconfig"], lines
    # both present, but no daemon answers: docker info fails
    _fake_bin(tmp_path, "docker", "echo 'Cannot connect to the Docker daemon' >&2; exit 1")
    _fake_bin(tmp_path, "kind", f"touch {tmp_path}/kind-was-run; exit 1")
    assert _main("up", "--cluster", "kind", "--mode", "kube-proxy/iptables") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no Docker daemon answers" in lines[0], lines
    assert not (tmp_path / "kind-was-run").exists()
    _assert_nothing_created(before)


def test_kubeconfig_pointing_nowhere_is_one_sentence_exit_2_nothing_created(
        tmp_path, monkeypatch, capsys):
    before = _before()
    monkeypatch.chdir(tmp_path)  # where conformance and bench would make their run folders
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Config
        clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:1"}}]
        users: [{name: u, user: {token: t}}]
        contexts: [{name: c, context: {cluster: nowhere, user: u}}]
        current-context: c
        """))
    assert _main("up", "--cluster", f"kubeconfig={cfg}", "-f",
                 str(ROOT / "examples" / "web.yaml")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"svcbench: error: the API server of kubeconfig {cfg} "
                     "(https://127.0.0.1:1) does not answer (connection refused), so nothing "
                     "was created"], lines
    assert _main("conformance", "--cluster", f"kubeconfig={tmp_path}/missing") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], lines
    assert _main("bench", "--cluster", f"kubeconfig={cfg}", "--modes", "kube-proxy/ipvs") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "does not answer (connection refused)" in lines[0], lines
    assert not (tmp_path / "runs").exists()
    assert _main("up", "--mode", "kube-proxy/nftables") == 2  # kube-proxy needs a real cluster
    assert "runs only on a real cluster" in capsys.readouterr().err
    _assert_nothing_created(before)


# --------------------------------------------------------------------------- measurements


METRICS_TEXT = textwrap.dedent("""\
    # HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds
    # TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram
    kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.001"} 0
    kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.002"} 10
    kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.004"} 30
    kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.008"} 38
    kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="+Inf"} 40
    kubeproxy_sync_proxy_rules_duration_seconds_sum 0.12
    kubeproxy_sync_proxy_rules_duration_seconds_count 40
    # HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds [ALPHA] last sync
    # TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge
    kubeproxy_sync_proxy_rules_last_timestamp_seconds 1.7e+09
    """)


def test_bench_computations_from_recorded_timings_and_metrics_text():
    from bench import kube_bench as kb

    p = kb.percentiles([0.5, 0.1, 0.3, 0.2, 0.4])
    assert p == {"p50": 0.3, "p90": pytest.approx(0.46), "p99": pytest.approx(0.496)}
    assert kb.percentiles([]) == {"p50": None, "p90": None, "p99": None}
    buckets = kb.parse_histogram(METRICS_TEXT)
    assert buckets == [(0.001, 0), (0.002, 10), (0.004, 30), (0.008, 38), (float("inf"), 40)]
    # rank 20 of 40 lies halfway through the (0.002, 0.004] bucket (10 -> 30)
    assert kb.histogram_quantile(0.5, buckets) == pytest.approx(0.003)
    assert kb.histogram_quantile(0.9, buckets) == pytest.approx(0.004 + 0.004 * 6 / 8)
    assert kb.histogram_quantile(0.99, buckets) == 0.008  # in +Inf: the highest finite bound
    assert kb.histogram_quantile(0.5, [(float("inf"), 0)]) is None
    before = [(0.001, 0), (0.002, 10), (0.004, 10), (0.008, 10), (float("inf"), 10)]
    assert kb.histogram_delta(buckets, before)[-1] == (float("inf"), 30)
    assert kb.histogram_quantile(0.5, kb.histogram_delta(buckets, before)) == pytest.approx(
        0.002 + 0.002 * 15 / 20)
    assert kb.pod_usage({"containers": [{"usage": {"cpu": "250m", "memory": "20Mi"}},
                                        {"usage": {"cpu": "1500000n", "memory": "1Ki"}}]}
                        ) == (pytest.approx(0.2515), 20 * 2**20 + 1024)
    stat0 = "usage_usec 1000000\nuser_usec 600000\nsystem_usec 400000\nnr_periods 0\n"
    stat1 = "usage_usec 1250000\nuser_usec 700000\nsystem_usec 550000\nnr_periods 0\n"
    assert kb.cgroup_usage(stat0, "4096\n") == (1.0, 4096)
    assert kb.cores_from_cgroup_reads({"before": [stat0, "4096\n"], "after": [stat1, "8192\n"],
                                       "seconds": 0.5}) == (pytest.approx(0.5), 8192)
    assert kb.first_served(["ready", '{"first": 12.5}']) == 12.5
    assert kb.first_served(["ready", '{"first": null}']) is None
    log = ("[2026-12-03 06:40:00] master/INFO/locust.main: --run-time limit reached\n"
           + json.dumps([{"name": "10.96.0.5:80", "method": "tcp", "start_time": 100.0,
                          "last_request_timestamp": 110.0, "num_requests": 5000,
                          "num_failures": 20}, {"name": "x", "method": "tcp",
                                                "start_time": 101.0,
                                                "last_request_timestamp": 109.0,
                                                "num_requests": 30, "num_failures": 10}],
                         indent=4) + "\n[2026-12-03 06:40:11] master/INFO/locust.main: "
                                     "Shutting down (exit code 1)\n")
    assert kb.locust_rps(log) == (pytest.approx((5030 - 30) / 10.0), 5030, 30)
    rows = kb.rows("kube-proxy/iptables", "programming_latency_s", 10, "s", [1.0, 2.0, 3.0])
    assert [(r.stat, r.value, r.samples) for r in rows] == [
        ("p50", 2.0, 3), ("p90", pytest.approx(2.8), 3), ("p99", pytest.approx(2.98), 3)]


ECHO_AND_PROBE = """
ip link set lo up
python -m clusters.workloads.echo_pod --port 18080/TCP --port 18080/UDP >/dev/null 2>&1 &
echo_pid=$!
for i in $(seq 50); do python - <<'EOF' && break
import socket; socket.create_connection(("127.0.0.1", 18080), 0.2).close()
EOF
sleep 0.1; done
python -m clusters.workloads.probe 127.0.0.1 18080 --json --count 3
python -m clusters.workloads.probe 127.0.0.1 18080 --json --count 2 --udp
kill $echo_pid
wait $echo_pid
"""


@pytest.mark.root
def test_echo_pod_serves_the_probe_and_its_json_reads_back(tmp_path):
    """The container's echo server and the exec'd probe, in a private network namespace."""
    from clusters.kube import probe_command, result_from_json

    assert probe_command("10.0.0.1", 80, count=3, udp=True)[:5] == [
        "python", "-m", "clusters.workloads.probe", "10.0.0.1", "80"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), POD_NAMESPACE="svb-x-bench", POD_NAME="echo-1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["unshare", "--net", "sh", "-c", ECHO_AND_PROBE], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    docs, text = [], proc.stdout
    decoder = json.JSONDecoder()
    while text.strip():
        text = text[text.index("{"):]
        doc, end = decoder.raw_decode(text)
        docs.append(doc)
        text = text[end:]
    tcp, udp = (result_from_json(d) for d in docs)
    assert tcp.protocol == "TCP" and [s.outcome for s in tcp.samples] == ["ok"] * 3
    assert {s.backend for s in tcp.samples} == {"svb-x-bench/echo-1"}
    assert all(s.seen_client.startswith("127.0.0.1:") for s in tcp.samples)
    assert udp.protocol == "UDP" and [s.outcome for s in udp.samples] == ["ok"] * 2
    assert tcp.summary() == docs[0]["summary"]


def test_the_live_paths_call_what_the_kubernetes_client_has():
    """clusters/kube.py, bench/kube_bench.py, svcbench/cmd_kube.py and
    conformance/kube_checks.py run only against a cluster: every API method and model field
    they use must exist in the client."""
    import re

    from kubernetes import client

    apis = {"core": client.CoreV1Api, "apps": client.AppsV1Api,
            "rbac": client.RbacAuthorizationV1Api, "custom": client.CustomObjectsApi,
            "discovery": client.DiscoveryV1Api, "networking": client.NetworkingV1Api}
    called = set()
    for path in ("clusters/kube.py", "bench/kube_bench.py", "svcbench/cmd_kube.py",
                 "conformance/kube_checks.py"):
        called |= set(re.findall(r"\b(core|apps|rbac|custom|discovery|networking)\.([a-z_]+)\b",
                                 (ROOT / path).read_text()))
    called.discard(("networking", "go"))  # networking.go, the e2e file a docstring names
    assert len(called) >= 19 and ("discovery", "list_namespaced_endpoint_slice") in called
    missing = [f"{api}.{name}" for api, name in called if not hasattr(apis[api], name)]
    assert not missing, missing
    fields = {client.V1DaemonSetStatus: ("desired_number_scheduled", "number_ready"),
              client.V1DeploymentStatus: ("ready_replicas",),
              client.V1PodStatus: ("container_statuses", "conditions", "phase"),
              client.V1ContainerStatus: ("state", "last_state"),
              client.V1ContainerState: ("terminated",),
              client.V1ServiceSpec: ("cluster_ip", "ports"),
              client.V1ServicePort: ("name", "node_port"),
              client.V1NodeStatus: ("addresses",), client.V1NodeAddress: ("type", "address"),
              client.V1PodSpec: ("node_name",),
              client.V1NodeSpec: ("unschedulable", "pod_cidr", "pod_cidrs"),
              client.V1ServiceCIDRSpec: ("cidrs",),
              client.V1ObjectMeta: ("owner_references", "labels", "annotations"),
              client.V1EndpointSlice: ("endpoints", "ports"), client.V1Endpoint: ("addresses",),
              client.DiscoveryV1EndpointPort: ("port",)}
    for model, names in fields.items():
        for name in names:
            assert name in model.openapi_types, f"{model.__name__}.{name}"


def test_gc_removes_kind_clusters_and_records_of_runs_not_live(tmp_path, monkeypatch):
    """A run held by its command or kept by `up` stays; a released one goes, with its kind
    cluster (the kind CLI here is a stand-in that records what it was asked)."""
    from clusters import kube

    calls = tmp_path / "kind-calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_bin(bindir, "kind", f'echo "$@" >> {calls}\n'
                              'if [ "$1" = get ]; then printf "svb-dead01\\nsvb-held01\\n'
                              'svb-kept01\\nsomeone-else\\n"; fi')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    state = str(tmp_path / "state")
    dead = kube.RunRecord.create("kind", "ebpf", None, state, run="dead01")
    dead.release()  # its command is gone, and up never kept it
    held = kube.RunRecord.create("kind", "ebpf", None, state, run="held01")
    kept = kube.RunRecord.create("kind", "kube-proxy/ipvs", None, state, run="kept01")
    kept.keep()
    kept.release()
    try:
        removed = kube.gc(state, default_kubeconfig=str(tmp_path / "no-kubeconfig"))
    finally:
        held.release()
    assert removed == ["kind cluster svb-dead01: deleted (its run is not live)",
                       "run dead01: removed its record (kind)"]
    assert calls.read_text().splitlines() == ["get clusters", "delete cluster --name svb-dead01"]
    assert sorted(kube.list_records(state)) == ["held01", "kept01"]


@pytest.mark.parametrize("failure", ["load fails", "ctrl-c"])
def test_a_kind_run_that_fails_or_is_interrupted_deletes_its_cluster(failure, tmp_path,
                                                                    monkeypatch, capsys):
    """Stand-ins for docker and kind: `kind load` fails, or Ctrl-C arrives while `kind create`
    runs (it sends SIGINT to svcbench); either way the cluster is deleted and no record stays."""
    from clusters import kube

    calls = tmp_path / "kind-calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_bin(bindir, "docker", "echo 28.2.2")
    on_create = "kill -INT $PPID; sleep 5" if failure == "ctrl-c" else "exit 0"
    _fake_bin(bindir, "kind", f'echo "$@" >> {calls}\n'
                              f'case "$1" in create) {on_create};; load) echo "image not present '
                              'locally" >&2; exit 1;; esac')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(kube, "STATE_DIR", str(tmp_path / "state"))
    status = _main("up", "--cluster", "kind", "--mode", "kube-proxy/iptables", "--nodes", "1")
    err = capsys.readouterr().err
    lines = calls.read_text().splitlines()
    run = lines[0].split("--name svb-")[1].split()[0]
    assert lines[0].startswith(f"create cluster --name svb-{run} --config ")
    if failure == "ctrl-c":
        assert status == 130, err
        assert lines[1:] == [f"delete cluster --name svb-{run}"] * 2
    else:
        assert status == 1 and "kind load docker-image svcbench:dev failed: image not present locally" in err
        assert lines[1:] == [f"load docker-image svcbench:dev --name svb-{run}"] + [
            f"delete cluster --name svb-{run}"] * 2
    assert kube.list_records(str(tmp_path / "state")) == {}


def test_up_and_down_on_a_kubeconfig_cluster_through_the_api(tmp_path, monkeypatch, capsys):
    """`up --cluster kubeconfig=PATH` against an in-memory API server on loopback: the run's
    namespaces, probe DaemonSets, Services and echo pods are created through the API (pods
    placed on the cluster's k-th node), waited for, kept; `down` deletes them by label."""
    from clusters import kube
    from tests.fakeapi import FakeApi

    monkeypatch.setattr(kube, "STATE_DIR", str(tmp_path / "state"))
    with FakeApi() as api:
        cfg = api.kubeconfig(tmp_path / "kubeconfig")
        assert _main("up", "--cluster", f"kubeconfig={cfg}", "--mode", "kube-proxy/iptables",
                     "-f", str(ROOT / "examples" / "web.yaml")) == 0, capsys.readouterr().err
        (run,) = kube.list_records(str(tmp_path / "state"))
        made = {(r, ns, name) for r, ns, name in api.objects
                if r != "nodes" and not api.objects[(r, ns, name)]["metadata"].get(
                    "ownerReferences")}
        system, ns1 = f"svb-{run}-system", f"svb-{run}-ns1"
        assert made == {
            ("namespaces", None, system), ("namespaces", None, ns1),
            ("daemonsets", system, "svcbench-probe"), ("daemonsets", system, "svcbench-probe-host"),
            ("services", ns1, "web"), ("services", ns1, "empty"),
            *{("pods", ns1, p) for p in ("web-1", "web-2", "web-3", "client")}}
        assert api.objects[("pods", ns1, "web-2")]["spec"]["nodeName"] == "kind-worker2"
        for key in made:
            obj = api.objects[key]
            _validate(obj)  # what reached the API is what the schemas accept
            assert obj["metadata"]["labels"][deploy.RUN_LABEL] == run
        assert f"cluster {run} up" in capsys.readouterr().out
        assert _main("down", "--run", run) == 0
        assert {k for k in api.objects if k[0] != "nodes"} == set()
        assert kube.list_records(str(tmp_path / "state")) == {}


def test_ctrl_c_while_waiting_on_a_kubeconfig_cluster_deletes_the_run(tmp_path, monkeypatch,
                                                                      capsys):
    """SIGINT while `up` waits for pods that never get ready: exit 130, and every object the
    run made on the cluster is deleted again, its record too."""
    import signal
    import threading

    from clusters import kube
    from tests.fakeapi import FakeApi

    monkeypatch.setattr(kube, "STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(kube, "POLL_S", 0.05)
    with FakeApi(ready=False) as api:
        cfg = api.kubeconfig(tmp_path / "kubeconfig")
        stop = threading.Event()

        def interrupt_once_waiting() -> None:  # Ctrl-C once up has polled twice
            while not stop.wait(0.02):
                if api.requests.count(("GET", "/apis/apps/v1/daemonsets")) >= 2:
                    os.kill(os.getpid(), signal.SIGINT)
                    return

        watcher = threading.Thread(target=interrupt_once_waiting, daemon=True)
        watcher.start()
        try:
            status = _main("up", "--cluster", f"kubeconfig={cfg}", "--mode",
                           "kube-proxy/nftables", "-f", str(ROOT / "examples" / "web.yaml"))
        finally:
            stop.set()
            watcher.join()
        err = capsys.readouterr().err
        assert status == 130, err
        assert "waiting for" in err and "DaemonSet svcbench-probe 0/2" in err
        assert ("POST", "/api/v1/namespaces") in api.requests  # it had made things
        assert {k for k in api.objects if k[0] != "nodes"} == set()
        assert kube.list_records(str(tmp_path / "state")) == {}


def test_gc_deletes_namespaces_this_machine_made_for_runs_not_live(tmp_path, monkeypatch):
    from clusters import kube
    from tests.fakeapi import FakeApi

    state = str(tmp_path / "state")
    monkeypatch.setenv("PATH", str(tmp_path))  # no kind here
    held = kube.RunRecord.create("kubeconfig", "kube-proxy/ipvs", None, state, run="held02")
    with FakeApi() as api:
        def ns(run: str, host: str) -> None:
            obj = deploy.namespace(run, deploy.SYSTEM, host)
            api.objects[("namespaces", None, obj["metadata"]["name"])] = obj

        ns("dead02", kube.host_id())  # its command was killed: no record, no lock
        ns("held02", kube.host_id())  # its command still runs
        ns("other2", "another-machine")  # someone else's run on a shared cluster
        role = deploy.agent_rbac("dead02")[1]
        api.objects[("clusterroles", None, role["metadata"]["name"])] = role
        try:
            removed = kube.gc(state, default_kubeconfig=api.kubeconfig(tmp_path / "kc"))
        finally:
            held.release()
    assert removed == ["run dead02: deleted ClusterRole svb-dead02-agent",
                       "run dead02: deleted namespace svb-dead02-system"]
    assert sorted(k[2] for k in api.objects if k[0] != "nodes") == [
        "svb-held02-system", "svb-other2-system"]


def test_probes_and_the_metrics_scrape_run_in_every_nodes_probe_pod_by_exec(tmp_path):
    """KubeCluster.probes and the kube-proxy metrics scrape through the client's real exec
    (a websocket to pods/NAME/exec): one probe pod per node, its output read back."""
    from bench import kube_bench
    from clusters import kube
    from clusters.workloads.probe import ProbeResult, Sample
    from tests.fakeapi import FakeApi

    def output(pod: str, command: list[str]) -> str:
        if command[:3] == ["python", "-m", "clusters.workloads.probe"]:
            result = ProbeResult(f"{command[3]}:{command[4]}", "TCP", [
                Sample(150.0 + i, "ok", f"svb-{RUN}-bench/echo-{i % 2}", f"10.244.1.5:{4000 + i}",
                       4000 + i) for i in range(int(command[command.index("--count") + 1]))])
            return json.dumps(result.to_json())
        return METRICS_TEXT

    with FakeApi(exec_output=output) as fake:
        system = deploy.namespace_name(RUN, deploy.SYSTEM)
        for component, suffix in ((deploy.PROBE, ""), (deploy.PROBE_HOST, "-host")):
            for node in ("kind-worker", "kind-worker2"):
                fake.objects[("pods", system, f"probe{suffix}-{node}")] = {
                    "metadata": {"name": f"probe{suffix}-{node}", "namespace": system,
                                 "labels": deploy.labels(RUN, **{deploy.COMPONENT: component})},
                    "spec": {"nodeName": node, "containers": []}}
        cluster = kube.KubeCluster(kube.connect(fake.kubeconfig(tmp_path / "kc")), RUN)
        results = cluster.probes("10.96.0.20", 80, count=4, timeout=0.5)
        buckets = kube_bench.scrape_sync_histogram(cluster)
    assert sorted(results) == ["kind-worker", "kind-worker2"]
    for result in results.values():
        assert result.target == "10.96.0.20:80" and result.summary()["outcomes"] == {"ok": 4}
        assert result.summary()["backends"] == {f"svb-{RUN}-bench/echo-0": 2,
                                                f"svb-{RUN}-bench/echo-1": 2}
    probes = sorted(pod for pod, cmd in fake.execs if "clusters.workloads.probe" in cmd)
    assert probes == ["probe-kind-worker", "probe-kind-worker2"]
    scrapes = sorted(pod for pod, cmd in fake.execs if "-c" in cmd)
    assert scrapes == ["probe-host-kind-worker", "probe-host-kind-worker2"]
    # two nodes' histograms summed
    assert buckets == [(0.001, 0), (0.002, 20), (0.004, 60), (0.008, 76), (float("inf"), 80)]


def test_programming_latency_is_timed_from_the_api_change_to_the_first_served_connection(
        tmp_path):
    """measure_programming against the fake: each node's watcher says "ready", the Service's
    selector is patched to the other echo pod, and that node's first connection the new pod
    served comes 0.2 s (node 1) and 0.4 s (node 2) after the patch reached the API."""
    import time

    from bench import kube_bench
    from clusters import kube
    from tests.fakeapi import FakeApi

    delays = {"probe-kind-worker": 0.2, "probe-kind-worker2": 0.4}
    fake = FakeApi()

    def output(pod: str, command: list[str]):
        wanted = command[5]  # python -c WATCHER ip port ns/pod limit
        yield "ready\n"
        end = time.monotonic() + 10
        while time.monotonic() < end:
            sel = [p[2]["spec"]["selector"]["svcbench.io/pod"] for p in fake.patches
                   if p[0] == "services"]
            if sel and f"{bench_ns}/{sel[-1]}" == wanted:
                break
            time.sleep(0.005)
        patched = time.time()
        time.sleep(delays[pod])
        yield json.dumps({"first": patched + delays[pod]}) + "\n"

    bench_ns = deploy.namespace_name(RUN, kube_bench.PROBE_NS)
    system = deploy.namespace_name(RUN, deploy.SYSTEM)
    fake.exec_output = output
    with fake:
        for obj in kube_bench.bench_objects(RUN, 1, 2, deploy.DEFAULT_IMAGE):
            if obj["kind"] == "Service":
                obj["spec"]["clusterIP"] = "10.96.0.30"
                fake.objects[("services", bench_ns, obj["metadata"]["name"])] = obj
        for i in range(2):
            fake.objects[("pods", bench_ns, f"echo-{i}")] = {
                "metadata": {"name": f"echo-{i}", "namespace": bench_ns,
                             "labels": {"app": kube_bench.ECHO}}, "spec": {"containers": []}}
        for node in ("kind-worker", "kind-worker2"):
            fake.objects[("pods", system, f"probe-{node}")] = {
                "metadata": {"name": f"probe-{node}", "namespace": system,
                             "labels": deploy.labels(RUN, **{deploy.COMPONENT: deploy.PROBE})},
                "spec": {"nodeName": node, "containers": []}}
        cluster = kube.KubeCluster(kube.connect(fake.kubeconfig(tmp_path / "kc")), RUN)
        kube_bench.label_echo_pods(cluster)
        values = kube_bench.measure_programming(cluster, "kube-proxy/iptables", changes=2,
                                                timeout_s=10)
    assert [p[2]["spec"]["selector"] for p in fake.patches if p[0] == "services"] == [
        {"svcbench.io/pod": "echo-0"}, {"svcbench.io/pod": "echo-1"}]
    assert len(values) == 4  # two changes, two nodes
    # the patch reached the API a moment after t0 was read: a little more than the delay
    for value, delay in zip(sorted(values), (0.2, 0.2, 0.4, 0.4), strict=True):
        assert delay <= value < delay + 0.3, values


API_CHECKS = ["clusterip-every-node", "no-endpoints-rejected", "endpoint-switch-programmed",
              "nodeport-every-node", "session-affinity-clientip", "multiport-named-target-port",
              "udp-clusterip", "internal-traffic-policy-local", "external-traffic-policy-local",
              "hairpin", "service-proxy-name-other"]


@pytest.mark.parametrize("broken, failing", [
    ((), ()),
    (("silent",), ("clusterip-every-node",)),
    (("affinity", "itp", "hairpin"),
     ("session-affinity-clientip", "internal-traffic-policy-local", "hairpin")),
    (("etp", "proxy-name", "named-port"),
     ("multiport-named-target-port", "udp-clusterip", "external-traffic-policy-local",
      "service-proxy-name-other")),
], ids=["kube-proxy", "silent-echo", "affinity-itp-hairpin", "etp-proxyname-namedport"])
def test_conformance_on_a_kubeconfig_cluster_end_to_end(broken, failing, tmp_path, monkeypatch,
                                                        capsys):
    """`svcbench conformance --cluster kubeconfig=PATH` against the fake API server, whose
    pods answer the probes as a proxy would serve the Services the run made
    (tests/kube_fake_dataplane.py): every API check passes, conformance.json is written in
    the namespace set's shape, and the run is gone afterwards. With the proxy getting one
    thing wrong (an echo pod silent, session affinity, internalTrafficPolicy or
    externalTrafficPolicy ignored, no hairpin, a Service for another proxy served, named
    target ports unresolved), exactly the checks that need it fail and the command exits 1."""
    from clusters import kube
    from conformance import kube_checks
    from tests.fakeapi import FakeApi
    from tests.kube_fake_dataplane import FakeDataplane

    fake = FakeApi()
    fake.exec_output = FakeDataplane(fake, frozenset(broken))
    monkeypatch.setattr(kube, "STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(kube_checks, "SETTLE_S", 0.0)  # a failure is not retried here
    with fake:
        cfg = fake.kubeconfig(tmp_path / "kc")
        status = _main("conformance", "--cluster", f"kubeconfig={cfg}", "--mode",
                       "kube-proxy/iptables", "--out", str(tmp_path), "--json")
        captured = capsys.readouterr()
        assert status == (1 if failing else 0), captured.err
        left = {k for k in fake.objects if k[0] != "nodes"}
    data = json.loads((tmp_path / "conformance.json").read_text())
    assert json.loads(captured.out) == data
    assert [(c["name"], c["outcome"]) for c in data["checks"]] == [
        (name, "failed" if name in failing else "passed") for name in API_CHECKS]
    for c in data["checks"]:
        assert set(c) == {"name", "upstream", "outcome", "reason", "duration_s"}
        assert c["upstream"].startswith("should ") and c["duration_s"] >= 0
    reasons = {c["name"]: c["reason"] for c in data["checks"]}
    if "silent" in broken:
        assert "timeout" in reasons["clusterip-every-node"]
    if "affinity" in broken:
        assert "20 connections reached" in reasons["session-affinity-clientip"]
    if "itp" in broken:
        assert "reached" in reasons["internal-traffic-policy-local"]
    if "etp" in broken:
        assert "the backend saw ['172.18.0." in reasons["external-traffic-policy-local"]
    if "named-port" in broken:
        assert "refused" in reasons["multiport-named-target-port"]
    assert left == set() and kube.list_records(str(tmp_path / "state")) == {}


def test_conformance_on_a_one_node_cluster_skips_what_needs_two(tmp_path, monkeypatch, capsys):
    """On one node, session affinity (one echo pod: affinity is chance) and
    externalTrafficPolicy Local (no node without the endpoint) are skipped with their
    reason, the rest pass, and the command exits 0."""
    from clusters import kube
    from conformance import kube_checks
    from tests.fakeapi import FakeApi
    from tests.kube_fake_dataplane import FakeDataplane

    fake = FakeApi(nodes=("kind-control-plane",))
    fake.exec_output = FakeDataplane(fake)
    monkeypatch.setattr(kube, "STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(kube_checks, "SETTLE_S", 0.0)
    with fake:
        status = _main("conformance", "--cluster", f"kubeconfig={fake.kubeconfig(tmp_path / 'kc')}",
                       "--mode", "kube-proxy/iptables", "--out", str(tmp_path), "--json")
    assert status == 0, capsys.readouterr().err
    checks = json.loads((tmp_path / "conformance.json").read_text())["checks"]
    skipped = {c["name"]: c["reason"] for c in checks if c["outcome"] == "skipped"}
    assert sorted(skipped) == ["external-traffic-policy-local", "session-affinity-clientip"]
    assert "needs two nodes" in skipped["external-traffic-policy-local"]
    assert all(c["outcome"] == "passed" for c in checks if c["name"] not in skipped)


def _bench_fake(probe_delay_s: float = 0.0):
    """A FakeApi whose pods answer the bench's execs: kube-proxy's metrics (growing by
    METRICS_TEXT per scrape), programming-latency watchers (the new pod 10 ms after the
    switch), probes (all ok, after probe_delay_s); locust's master log is there."""
    import re
    import time

    from clusters.workloads.probe import ProbeResult, Sample
    from tests.fakeapi import FakeApi

    fake = FakeApi()
    scrapes: dict[str, int] = {}

    def output(pod: str, command: list[str]):
        if command[1] == "-c" and "urllib" in command[2]:  # kube-proxy's metrics
            scrapes[pod] = scrapes.get(pod, 0) + 1
            k = scrapes[pod]  # the histogram grows by METRICS_TEXT's counts per scrape
            yield re.sub(r'(_bucket\{le="[^"]+"\}) (\d+)',
                         lambda m: f"{m[1]} {int(m[2]) * k}", METRICS_TEXT)
            return
        if command[1] == "-c":  # a programming-latency watcher
            yield "ready\n"
            wanted = command[5].split("/")[1]
            end = time.monotonic() + 5
            while time.monotonic() < end and not any(
                    p[2]["spec"]["selector"].get("svcbench.io/pod") == wanted
                    for p in fake.patches[-1:] if p[0] == "services"):
                time.sleep(0.002)
            yield json.dumps({"first": time.time() + 0.01}) + "\n"
            return
        time.sleep(probe_delay_s)
        count = int(command[command.index("--count") + 1])
        samples = [Sample(100.0 + i, "ok", f"svb-x-bench/echo-{i % 2}", "10.244.1.9:5000", 5000)
                   for i in range(count)]
        yield json.dumps(ProbeResult(f"{command[3]}:{command[4]}", "TCP", samples).to_json())

    fake.exec_output = output
    fake.logs["svcbench-locust-master-0"] = "[x] master: done\n" + json.dumps(
        [{"name": "t", "method": "tcp", "start_time": 10.0, "last_request_timestamp": 20.0,
          "num_requests": 12000, "num_failures": 0}]) + "\n"
    return fake


def test_bench_on_a_kubeconfig_cluster_end_to_end(tmp_path, monkeypatch, capsys):
    """`svcbench bench --cluster kubeconfig=PATH --services 1,2` against the fake API server:
    Services grow from 1 to 2, every metric gets its rows (new connections, programming
    latency over 20 changes and both nodes, locust's throughput from the master's log,
    kube-proxy's sync quantiles from the scrapes' difference), and the run is deleted."""
    from bench import kube_bench
    from clusters import kube

    fake = _bench_fake()
    monkeypatch.setattr(kube, "STATE_DIR", str(tmp_path / "state"))
    with fake:
        cfg = fake.kubeconfig(tmp_path / "kc")
        status = _main("bench", "--cluster", f"kubeconfig={cfg}", "--modes",
                       "kube-proxy/iptables", "--services", "1,2", "--count", "3",
                       "--out", str(tmp_path / "runs"), "--json")
        captured = capsys.readouterr()
        left = {k for k in fake.objects if k[0] != "nodes"}
        services = sorted(p for p in fake.requests if p[0] == "POST" and
                          p[1].endswith("/services"))
    assert status == 0, captured.err
    rows = json.loads(captured.out)
    got = {(r["metric"], r["services"], r["stat"]): r for r in rows}
    for size in (1, 2):
        assert got[("conn_latency_us", size, "p50")]["samples"] == 2 * 3 * (1 if size == 1
                                                                            else 2)
        latency = got[("programming_latency_s", size, "p50")]
        assert latency["samples"] == 40 and 0 <= latency["value"] < 1.0
        assert got[("throughput_rps", size, "value")]["value"] == 1200.0
        # each step scraped twice per node: the difference is one METRICS_TEXT per node
        assert got[("sync_proxy_rules_s", size, "p50")]["value"] == pytest.approx(0.003)
        assert got[("sync_proxy_rules_s", size, "p50")]["samples"] == 80
    assert ("proxy_cpu_cores", 1, "value") not in got  # no metrics API, kube-proxy: none
    # svc-0 and the latency Service, then svc-1 when the sweep grows, then locust's twice
    assert len(services) == 2 + 1 + 2
    assert left == set() and kube.list_records(str(tmp_path / "state")) == {}
    (folder,) = (tmp_path / "runs").iterdir()
    assert json.loads((folder / "kube-bench.json").read_text())["rows"] == rows
    # bench.csv in the namespace sweep's columns, for svcbench report
    from reports.results import read_bench_csv

    csv_rows = read_bench_csv(folder / "bench.csv")
    assert len(csv_rows) == len([r for r in rows if r["value"] is not None])
    assert {(r["mode"], r["kernel"]) for r in csv_rows} == {("kube-proxy/iptables", "kubeconfig")}
    tput = [r for r in csv_rows if r["metric"] == "throughput_rps"]
    assert [(r["n_services"], r["value"]) for r in tput] == [(1, 1200.0), (2, 1200.0)]
    assert json.loads((folder / "run.json").read_text())["cluster"] == "kubeconfig"
    assert kube_bench.SYNC_METRIC in METRICS_TEXT


def test_bench_on_a_cluster_honours_repeats_and_budget(tmp_path, monkeypatch, capsys):
    """`bench --cluster kubeconfig=PATH --services 1,2 --repeats 2 --budget 1s`, each probe
    taking 0.6 s: size 1 is measured twice (one set of rows per repeat, repeat 0 and 1 in
    bench.csv), which spends the budget, so size 2 is left out and run.json says incomplete
    (reason budget, stopped after 1 Service) with exit status 0, as the namespace sweep."""
    from clusters import kube
    from reports.results import read_bench_csv

    fake = _bench_fake(probe_delay_s=0.6)
    monkeypatch.setattr(kube, "STATE_DIR", str(tmp_path / "state"))
    with fake:
        cfg = fake.kubeconfig(tmp_path / "kc")
        assert _main("bench", "--cluster", f"kubeconfig={cfg}", "--repeats", "0") == 2
        status = _main("bench", "--cluster", f"kubeconfig={cfg}", "--modes",
                       "kube-proxy/iptables", "--services", "1,2", "--count", "3",
                       "--repeats", "2", "--budget", "1s", "--out", str(tmp_path / "runs"),
                       "--json")
        captured = capsys.readouterr()
        left = {k for k in fake.objects if k[0] != "nodes"}
    assert status == 0, captured.err
    assert "--repeats must be a whole number from 1 to 100" in captured.err
    rows = json.loads(captured.out)
    assert {r["services"] for r in rows} == {1}
    tput = [(r["repeat"], r["value"]) for r in rows if r["metric"] == "throughput_rps"]
    assert tput == [(0, 1200.0), (1, 1200.0)]
    (folder,) = (tmp_path / "runs").iterdir()
    csv_rows = read_bench_csv(folder / "bench.csv")
    assert sorted({(r["n_services"], r["repeat"]) for r in csv_rows}) == [(1, 0), (1, 1)]
    meta = json.loads((folder / "run.json").read_text())
    assert meta["complete"] is False and meta["status"] == "incomplete"
    assert meta["incomplete_reason"] == "budget"
    assert meta["stopped_at"]["n_services"] == 1 and meta["stopped_at"]["budget_s"] == 1.0
    assert meta["args"] == {"repeats": 2, "budget_s": 1.0}
    assert left == set() and kube.list_records(str(tmp_path / "state")) == {}


def test_throughput_reads_the_new_master_not_one_still_going_away(tmp_path):
    """A locust master pod of the measurement before (terminated, its Deployment deleted,
    the pod not yet gone) is not read: the stats are the new master's."""
    from bench import kube_bench
    from clusters import kube
    from tests.fakeapi import FakeApi

    def stats(requests: int) -> str:
        return "[x] done\n" + json.dumps([{"name": "t", "method": "tcp", "start_time": 10.0,
                                           "last_request_timestamp": 20.0,
                                           "num_requests": requests, "num_failures": 0}]) + "\n"

    system = deploy.namespace_name(RUN, deploy.SYSTEM)
    with FakeApi() as fake:
        master = "svcbench-locust-master"
        fake.objects[("pods", system, "old-master")] = {
            "metadata": {"name": "old-master", "namespace": system,
                         "labels": deploy.labels(RUN, **{deploy.COMPONENT: master}),
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "old", "uid": "0"}]},
            "spec": {"containers": []}}
        fake.logs["old-master"] = stats(100)
        fake.logs[f"{master}-0"] = stats(5000)
        cluster = kube.KubeCluster(kube.connect(fake.kubeconfig(tmp_path / "kc")), RUN)
        rps, requests, _ = kube_bench.measure_throughput(cluster, "10.96.0.9:80", workers=2,
                                                         seconds=1, image="svcbench:dev")
    assert (rps, requests) == (500.0, 5000)


def test_the_agents_ranges_come_from_the_clusters_nodes_and_service_cidrs(tmp_path):
    """--cluster-cidr: the smallest network holding every Node's podCIDR; --service-cidr: the
    first IPv4 ServiceCIDR, else the /16 around the kubernetes Service's ClusterIP."""
    from clusters import kube
    from tests.fakeapi import FakeApi

    assert kube.smallest_cover(["10.244.1.0/24", "10.244.2.0/24"]) == "10.244.0.0/22"
    assert kube.smallest_cover(["10.244.1.0/24"]) == "10.244.1.0/24"
    assert kube.smallest_cover(["fd00::/64"]) is None
    with FakeApi() as fake:
        for i, node in enumerate(("kind-worker", "kind-worker2"), start=1):
            fake.objects[("nodes", None, node)]["spec"] = {
                "podCIDR": f"10.244.{i}.0/24", "podCIDRs": [f"10.244.{i}.0/24", f"fd00:{i}::/64"]}
        fake.objects[("services", "default", "kubernetes")] = {
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 443}]}}
        cluster = kube.KubeCluster(kube.connect(fake.kubeconfig(tmp_path / "kc")), RUN)
        assert cluster.cidrs() == ("10.244.0.0/22", "10.96.0.0/16")
        fake.objects[("servicecidrs", None, "kubernetes")] = {
            "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["fd00:96::/108",
                                                                   "10.96.0.0/12"]}}
        assert cluster.cidrs() == ("10.244.0.0/22", "10.96.0.0/12")
