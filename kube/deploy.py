"""The objects svcbench creates on a real cluster (kind or any kubeconfig), as plain dicts.

Pure functions: nothing here talks to an API server. clusters/kube.py creates what these
return; tests validate every one against Kubernetes' own OpenAPI schemas
(kubernetes-validate, version VALIDATE_VERSION). Every object is labelled
`app.kubernetes.io/managed-by=svcbench` and `svcbench.io/run=<run>`, and every namespaced one
lives in a namespace of the run (`svb-<run>-<name>`), so `svcbench gc` and the cleanup of a
run find all of it by label.

What a run holds:
- `svb-<run>-system`: the suite's agent DaemonSet (for svcbench's own modes on a cluster
  without kube-proxy), its ServiceAccount (bound to a ClusterRole that lists and watches
  Services, EndpointSlices and Nodes), the probe DaemonSets (one pod per node on the pod
  network, one on the node's network for kube-proxy's metrics port) and locust.
- `svb-<run>-<ns>` per namespace of the suite's manifests: their Services (addresses left to
  the cluster) and one echo pod per manifest pod; or, for the benchmark, an echo Deployment
  and N Services selecting it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from kube.model import DEFAULT_BACKEND_PORT, PROTOCOLS, TCP, UDP, Pod, Service

DEFAULT_IMAGE = "svcbench:dev"
VALIDATE_VERSION = "1.33.0"  # the Kubernetes version the offline tests validate against
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "svcbench"
RUN_LABEL = "svcbench.io/run"
HOST_ANNOTATION = "svcbench.io/host"  # the machine whose run made it (gc leaves others' alone)
COMPONENT = "app.kubernetes.io/component"
SYSTEM = "system"
AGENT = "svcbench-agent"
PROBE = "svcbench-probe"
PROBE_HOST = "svcbench-probe-host"
ECHO = "svcbench-echo"
AGENT_HEALTH_PORT = 10256  # kube-proxy's healthz port: the agent answers there too
LOCUST_MASTER_PORT = 5557
KUBE_PROXY_METRICS = "127.0.0.1:10249"
IDLE_COMMAND = ["python", "-c", "import time\nwhile True: time.sleep(3600)"]


def namespace_name(run: str, name: str) -> str:
    """The run's namespace for a manifest namespace (or SYSTEM): a DNS label of at most 63."""
    full = f"svb-{run}-{name}"
    if len(full) > 63:
        raise ValueError(f"namespace {name!r}: svb-{run}-{name} is longer than 63 characters")
    return full


def labels(run: str, **extra: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, RUN_LABEL: run, **extra}


def run_selector(run: str | None = None) -> str:
    """The label selector of every object of one run (or of every svcbench run)."""
    return f"{MANAGED_BY}={MANAGER}" + (f",{RUN_LABEL}={run}" if run else "")


def _meta(run: str, name: str, namespace: str | None = None, host: str | None = None,
          **extra: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels(run, **extra)}
    if namespace is not None:
        meta["namespace"] = namespace
    if host:
        meta["annotations"] = {HOST_ANNOTATION: host}
    return meta


def namespace(run: str, name: str, host: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": _meta(run, namespace_name(run, name), host=host)}


def _downward(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"name": env, "valueFrom": {"fieldRef": {"fieldPath": path}}} for env, path in pairs]


def _container(name: str, image: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            "command": command, **extra}


# --------------------------------------------------------------------------- the agent


def agent_rbac(run: str) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole (read Services, EndpointSlices, Nodes) and its binding."""
    ns = namespace_name(run, SYSTEM)
    role = f"svb-{run}-agent"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(run, AGENT, ns)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": _meta(run, role),
         "rules": [
             {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
              "verbs": ["list", "watch"]},
             {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta(run, role),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": AGENT, "namespace": ns}]},
    ]


def agent_daemonset(run: str, mode: str, image: str = DEFAULT_IMAGE,
                    api_server: tuple[str, int] | None = None,
                    cidrs: tuple[str, str] | None = None) -> dict[str, Any]:
    """svcbench's proxy in `mode` on every node, in place of kube-proxy.

    `cidrs` (the cluster's pod and Service ranges) become the agent's --cluster-cidr and
    --service-cidr: its defaults are the namespace cluster's plan, which would leave out
    every Service of a real cluster.

    Without kube-proxy nothing serves the `kubernetes` Service's ClusterIP until the agent
    does, so `api_server` (the API server's own address and port, as the `kubernetes`
    Service's EndpointSlice has them) replaces KUBERNETES_SERVICE_HOST and _PORT for the
    agent's in-cluster client, as Cilium's k8sServiceHost does.
    """
    ns = namespace_name(run, SYSTEM)
    pod_labels = labels(run, **{COMPONENT: AGENT})
    env = _downward(("NODE_NAME", "spec.nodeName"))
    if api_server is not None:
        env += [{"name": "KUBERNETES_SERVICE_HOST", "value": api_server[0]},
                {"name": "KUBERNETES_SERVICE_PORT", "value": str(api_server[1])}]
    command = ["svcbench", "agent", "--mode", mode, "--node-name", "$(NODE_NAME)"]
    if cidrs is not None:
        command += ["--cluster-cidr", cidrs[0], "--service-cidr", cidrs[1]]
    container = _container(
        "agent", image, command,
        env=env,
        securityContext={"privileged": True},
        readinessProbe={"httpGet": {"path": "/healthz", "port": AGENT_HEALTH_PORT},
                        "periodSeconds": 2, "failureThreshold": 3},
        volumeMounts=[
            {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True},
            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"},
        ],
    )
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": _meta(run, AGENT, ns, **{COMPONENT: AGENT}),
        "spec": {
            "selector": {"matchLabels": {RUN_LABEL: run, COMPONENT: AGENT}},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "serviceAccountName": AGENT,
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [container],
                    "volumes": [
                        {"name": "lib-modules", "hostPath": {"path": "/lib/modules"}},
                        {"name": "bpffs",
                         "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}},
                    ],
                },
            },
        },
    }


def agent_objects(run: str, mode: str, image: str = DEFAULT_IMAGE,
                  api_server: tuple[str, int] | None = None,
                  cidrs: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    return [*agent_rbac(run), agent_daemonset(run, mode, image, api_server, cidrs)]


# --------------------------------------------------------------------------- probes


def probe_daemonset(run: str, image: str = DEFAULT_IMAGE, host_network: bool = False
                    ) -> dict[str, Any]:
    """An idle pod on every node (tolerating every taint) that probes run in via exec:
    `python -m clusters.workloads.probe IP PORT --json`. With host_network, on the node's own
    network, where kube-proxy's metrics port 127.0.0.1:10249 is reachable."""
    ns = namespace_name(run, SYSTEM)
    name = PROBE_HOST if host_network else PROBE
    spec: dict[str, Any] = {
        "tolerations": [{"operator": "Exists"}],
        "terminationGracePeriodSeconds": 1,
        "containers": [_container("probe", image, IDLE_COMMAND,
                                  env=_downward(("NODE_NAME", "spec.nodeName")))],
    }
    if host_network:
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": _meta(run, name, ns, **{COMPONENT: name}),
        "spec": {"selector": {"matchLabels": {RUN_LABEL: run, COMPONENT: name}},
                 "template": {"metadata": {"labels": labels(run, **{COMPONENT: name})},
                              "spec": spec}},
    }


# --------------------------------------------------------------------------- echo backends


def _echo_ports(ports: Iterable[tuple[int, str, str | None]]) -> tuple[list[str], list[dict]]:
    args, declared = [], []
    for port, proto, name in ports:
        if proto not in PROTOCOLS:
            continue  # no SCTP sockets in the echo server
        args += ["--port", f"{port}/{proto}"]
        declared.append({"containerPort": port, "protocol": proto} | ({"name": name} if name else {}))
    return args, declared


def _echo_container(image: str, ports: Iterable[tuple[int, str, str | None]]) -> dict[str, Any]:
    args, declared = _echo_ports(ports)
    return _container(
        "echo", image, ["python", "-m", "clusters.workloads.echo_pod", *args],
        env=_downward(("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")),
        ports=declared,
        readinessProbe={"tcpSocket": {"port": declared[0]["containerPort"]},
                        "periodSeconds": 1} if declared and declared[0]["protocol"] == TCP else None,
    )


def _drop_none(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not None}


DEFAULT_ECHO_PORTS = ((DEFAULT_BACKEND_PORT, TCP, "http"), (DEFAULT_BACKEND_PORT, UDP, "udp"))


def echo_deployment(run: str, ns: str, name: str, replicas: int, image: str = DEFAULT_IMAGE,
                    pod_labels: dict[str, str] | None = None,
                    ports: Iterable[tuple[int, str, str | None]] = DEFAULT_ECHO_PORTS,
                    ) -> dict[str, Any]:
    """`replicas` echo pods (the benchmark's backends), spread over the nodes."""
    selected = dict(pod_labels or {"app": name})
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(run, name, namespace_name(run, ns), **{COMPONENT: ECHO}),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selected},
            "template": {
                "metadata": {"labels": {**labels(run, **{COMPONENT: ECHO}), **selected}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": selected}}],
                    "containers": [_drop_none(_echo_container(image, ports))],
                },
            },
        },
    }


def echo_pod(run: str, pod: Pod, node_names: dict[str, str], image: str = DEFAULT_IMAGE
             ) -> dict[str, Any]:
    """A manifest pod as a real pod: its labels and ports, serving echo. Its nodeName
    (`node<k>`) is mapped to the cluster's k-th node when there is one."""
    ports = [(p.port, p.protocol, p.name) for p in pod.backend_ports()]
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": 1,
                            "containers": [_drop_none(_echo_container(image, ports))]}
    if pod.node_name and pod.node_name in node_names:
        spec["nodeName"] = node_names[pod.node_name]
    meta = _meta(run, pod.name, namespace_name(run, pod.namespace), **{COMPONENT: ECHO})
    meta["labels"] = {**meta["labels"], **pod.labels}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


# --------------------------------------------------------------------------- Services


def service(run: str, svc: Service) -> dict[str, Any]:
    """A manifest Service for the API: in the run's namespace, with every address left to the
    cluster (ClusterIP, NodePorts, health-check port: this host's plan means nothing there)."""
    from kube.manifests import Manifests

    doc = Manifests((), (svc,), ()).to_documents()[0]
    spec = dict(doc["spec"])
    for field in ("clusterIP", "clusterIPs", "healthCheckNodePort", "externalIPs"):
        if field == "clusterIP" and spec.get(field) == "None":
            continue  # headless stays headless
        spec.pop(field, None)
    spec["ports"] = [{k: v for k, v in p.items() if k != "nodePort"} for p in spec["ports"]]
    meta = _meta(run, svc.name, namespace_name(run, svc.namespace))
    meta["labels"] = {**svc.labels, **meta["labels"]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def bench_services(run: str, ns: str, count: int, selector: dict[str, str],
                   port: int = 80, target_port: int = DEFAULT_BACKEND_PORT,
                   first: int = 0) -> list[dict[str, Any]]:
    """`count` ClusterIP Services `svc-<i>` selecting the same echo pods."""
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": _meta(run, f"svc-{i}", namespace_name(run, ns)),
         "spec": {"type": "ClusterIP", "selector": dict(selector),
                  "ports": [{"name": "http", "port": port, "targetPort": target_port,
                             "protocol": TCP}]}}
        for i in range(first, first + count)
    ]


# --------------------------------------------------------------------------- locust


LOCUSTFILE = ('"$(python -c \'import bench.locustfile_kube as m; print(m.__file__)\')"')


def locust_objects(run: str, target: str, workers: int, users: int, seconds: int,
                   image: str = DEFAULT_IMAGE) -> list[dict[str, Any]]:
    """Distributed locust for throughput: a master (headless, waits for `workers`, runs
    `seconds`, prints its stats) and `workers` workers, each opening one new connection to
    `target` ("ip:port") per request."""
    ns = namespace_name(run, SYSTEM)
    master, worker = "svcbench-locust-master", "svcbench-locust-worker"
    env = [{"name": "SVCBENCH_TARGET", "value": target}]

    def deployment(name: str, replicas: int, shell: str, ports=None) -> dict[str, Any]:
        sel = {RUN_LABEL: run, COMPONENT: name}
        container = _container("locust", image, ["sh", "-c", shell], env=env)
        if ports:
            container["ports"] = ports
        return {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(run, name, ns, **{COMPONENT: name}),
            "spec": {"replicas": replicas, "selector": {"matchLabels": sel},
                     "template": {"metadata": {"labels": labels(run, **{COMPONENT: name})},
                                  "spec": {"containers": [container]}}},
        }

    return [
        deployment(master, 1,
                   f"exec locust -f {LOCUSTFILE} --master --headless --users {users} "
                   f"--spawn-rate {max(1, users)} --run-time {seconds}s "
                   f"--expect-workers {workers} --only-summary --json",
                   ports=[{"name": "locust", "containerPort": LOCUST_MASTER_PORT}]),
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(run, master, ns),
         "spec": {"selector": {RUN_LABEL: run, COMPONENT: master},
                  "ports": [{"name": "locust", "port": LOCUST_MASTER_PORT,
                             "targetPort": LOCUST_MASTER_PORT, "protocol": TCP}]}},
        deployment(worker, workers,
                   f"exec locust -f {LOCUSTFILE} --worker --master-host {master}.{ns}"),
    ]


# --------------------------------------------------------------------------- all of it


def objects_for(run: str, mode: str, *, services: Iterable[Service] = (), pods: Iterable[Pod] = (),
                node_names: dict[str, str] | None = None, image: str = DEFAULT_IMAGE,
                with_agent: bool = False, host: str | None = None,
                api_server: tuple[str, int] | None = None,
                cidrs: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """Every object of a run that deploys the suite's manifests, in creation order:
    namespaces, the agent (for svcbench's own modes), probes, Services, echo pods."""
    services, pods = list(services), list(pods)
    names = sorted({s.namespace for s in services} | {p.namespace for p in pods})
    out = [namespace(run, SYSTEM, host)] + [namespace(run, n, host) for n in names]
    if with_agent:
        out += agent_objects(run, mode, image, api_server, cidrs)
    out += [probe_daemonset(run, image), probe_daemonset(run, image, host_network=True)]
    out += [service(run, s) for s in services]
    out += [echo_pod(run, p, node_names or {}, image) for p in pods]
    return out


def dump(objects: Iterable[dict[str, Any]]) -> str:
    """The objects as one multi-document YAML stream (kubectl apply -f -)."""
    return yaml.safe_dump_all(list(objects), sort_keys=False, default_flow_style=False)
