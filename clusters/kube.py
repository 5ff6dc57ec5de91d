"""Any cluster a kubeconfig reaches (and the kind clusters svcbench makes) as an svcbench cluster.

Everything goes through the API with the official `kubernetes` client: the run's namespaces
and objects (kube/deploy.py) are created, waited for (with progress), probed from the probe
pods by exec (`python -m clusters.workloads.probe IP PORT --json` in the pod: the same
samples as on a namespace cluster, read back into a ProbeResult) and deleted by label.

A run is recorded on this machine before anything is created, in
STATE_DIR/<run>/state.json with a lock its owner holds (flock: a killed owner frees it):
provider (kind or kubeconfig), the kubeconfig, the kind cluster's name. A run is live while
its lock is held or `up` kept it (until `down`). `svcbench gc` deletes, on the default
kubeconfig's cluster and on every recorded run's, the namespaces and cluster-wide objects
labelled `app.kubernetes.io/managed-by=svcbench` that this machine made
(annotation `svcbench.io/host`) whose run is not live, and the kind clusters `svb-<run>`
of runs that are not live.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from clusters.workloads.probe import ProbeResult, Sample
from kube import deploy

STATE_DIR = "/run/svcbench/kube"
CONNECT_TIMEOUT_S = 3.0
READY_TIMEOUT_S = 300.0
POLL_S = 1.0
KUBE_SYSTEM = "kube-system"


class KubeUnavailable(RuntimeError):
    """The cluster cannot be reached or used: one sentence, exit status 2, nothing created."""


def host_id() -> str:
    return socket.gethostname()[:63]


def kubeconfig_path(given: str | None = None) -> str:
    """--cluster kubeconfig=PATH, else $KUBECONFIG's first file, else ~/.kube/config."""
    if given:
        return os.path.expanduser(given)
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), None)
    return first or os.path.expanduser("~/.kube/config")


def _client():
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        raise KubeUnavailable("the kubernetes Python client is not installed; "
                              "pip install 'svcbench[kube]'") from None
    import kubernetes

    return kubernetes


def connect(path: str, timeout: float = CONNECT_TIMEOUT_S):
    """An ApiClient for the kubeconfig at `path` whose API server answered /version."""
    k8s = _client()
    if not os.path.isfile(path):
        raise KubeUnavailable(f"kubeconfig {path} does not exist; pass --cluster kubeconfig=PATH "
                              "or set KUBECONFIG")
    try:
        cfg = k8s.client.Configuration()
        k8s.config.load_kube_config(config_file=path, client_configuration=cfg,
                                    persist_config=False)
        cfg.retries = 0  # a server that is not there is reported at once, not after 3 tries
        api = k8s.client.ApiClient(cfg)
    except Exception as exc:  # noqa: BLE001 - any unreadable kubeconfig is bad input
        raise KubeUnavailable(f"kubeconfig {path} cannot be used: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                              ) from None
    host = api.configuration.host
    try:
        k8s.client.VersionApi(api).get_code(_request_timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - refused, timed out, TLS, 401: it points nowhere usable
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise KubeUnavailable(f"the API server of kubeconfig {path} ({host}) does not answer "
                              f"({_short(reason)}), so nothing was created") from None
    return api


def _short(reason: Any) -> str:
    text = str(reason)
    if "Connection refused" in text:
        return "connection refused"
    if "timed out" in text.lower():
        return "timed out"
    return text.splitlines()[0][:120] if text else "no answer"


# --------------------------------------------------------------------------- run records


def new_run_id() -> str:
    return secrets.token_hex(3)


@dataclass
class RunRecord:
    """This machine's record of one run on a real cluster, and the lock its owner holds."""

    run: str
    state_dir: str = STATE_DIR
    state: dict[str, Any] = field(default_factory=dict)
    _fd: int | None = None

    @property
    def dir(self) -> str:
        return os.path.join(self.state_dir, self.run)

    @classmethod
    def create(cls, provider: str, mode: str, kubeconfig: str | None, state_dir: str | None = None,
               run: str | None = None) -> RunRecord:
        state_dir = state_dir or STATE_DIR
        os.makedirs(state_dir, exist_ok=True)
        while True:
            run_id = run or new_run_id()
            try:
                os.mkdir(os.path.join(state_dir, run_id))
                break
            except FileExistsError:
                if run:
                    raise
        rec = cls(run_id, state_dir)
        rec._fd = os.open(os.path.join(rec.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          0o644)
        fcntl.flock(rec._fd, fcntl.LOCK_EX)
        rec.state = {"run": run_id, "provider": provider, "mode": mode, "kubeconfig": kubeconfig,
                     "kept": False, "created": round(time.time(), 3), "host": host_id()}
        rec.save()
        return rec

    def save(self) -> None:
        tmp = os.path.join(self.dir, f".state.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(self.state, fh, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(self.dir, "state.json"))

    def keep(self) -> None:
        self.state["kept"] = True
        self.save()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.release()
        shutil.rmtree(self.dir, ignore_errors=True)


def list_records(state_dir: str | None = None) -> dict[str, dict[str, Any] | None]:
    state_dir = state_dir or STATE_DIR
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return {}
    out: dict[str, dict[str, Any] | None] = {}
    for name in names:
        try:
            with open(os.path.join(state_dir, name, "state.json")) as fh:
                out[name] = json.load(fh)
        except (OSError, ValueError):
            out[name] = None
    return out


def record_live(run: str, state: dict[str, Any] | None, state_dir: str | None = None) -> bool:
    """Live: `up` kept it, or its owner still holds its lock."""
    state_dir = state_dir or STATE_DIR
    if state and state.get("kept"):
        return True
    try:
        fd = os.open(os.path.join(state_dir, run, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def live_runs(state_dir: str | None = None) -> set[str]:
    state_dir = state_dir or STATE_DIR
    return {run for run, st in list_records(state_dir).items() if record_live(run, st, state_dir)}


# --------------------------------------------------------------------------- the cluster


def result_from_json(data: dict[str, Any]) -> ProbeResult:
    """`python -m clusters.workloads.probe --json` output back into a ProbeResult."""
    fields = Sample.__dataclass_fields__
    samples = [Sample(**{k: v for k, v in s.items() if k in fields}) for s in data["samples"]]
    return ProbeResult(data["target"], data["protocol"], samples)


def probe_command(ip: str, port: int, *, count: int = 1, timeout: float = 1.0,
                  udp: bool = False, interval: float = 0.0) -> list[str]:
    cmd = ["python", "-m", "clusters.workloads.probe", ip, str(port), "--json",
           "--count", str(count), "--timeout", str(timeout)]
    if udp:
        cmd.append("--udp")
    if interval:
        cmd += ["--interval", str(interval)]
    return cmd


class KubeCluster:
    """One run's objects on the cluster an ApiClient reaches."""

    def __init__(self, api, run: str, say: Callable[[str], None] = lambda _m: None):
        k8s = _client()
        self.k8s = k8s
        self.api = api
        self.run = run
        self.say = say
        self.core = k8s.client.CoreV1Api(api)
        self.apps = k8s.client.AppsV1Api(api)
        self.rbac = k8s.client.RbacAuthorizationV1Api(api)
        self.system_ns = deploy.namespace_name(run, deploy.SYSTEM)

    # ---- objects

    def node_names(self) -> list[str]:
        """The schedulable nodes, sorted: `node<k>` of the suite's manifests is the k-th."""
        nodes = self.core.list_node().items
        return sorted(n.metadata.name for n in nodes if not n.spec.unschedulable)

    def runs_kube_proxy(self) -> bool:
        try:
            self.apps.read_namespaced_daemon_set("kube-proxy", KUBE_SYSTEM)
            return True
        except self.k8s.client.ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def api_server(self) -> tuple[str, int]:
        """The API server's own address and port: the `kubernetes` Service's endpoint,
        which a pod can reach without any Service proxy."""
        discovery = self.k8s.client.DiscoveryV1Api(self.api)
        for es in discovery.list_namespaced_endpoint_slice(
                "default", label_selector="kubernetes.io/service-name=kubernetes").items:
            for ep in es.endpoints or []:
                if ep.addresses and es.ports:
                    return ep.addresses[0], es.ports[0].port
        raise RuntimeError("the kubernetes Service has no endpoint: where is the API server?")

    def cidrs(self) -> tuple[str, str]:
        """(pod CIDR, Service CIDR) of the cluster, for the agent's --cluster-cidr and
        --service-cidr: the smallest network holding every Node's spec.podCIDR, and the
        ServiceCIDR objects' first IPv4 range (networking.k8s.io/v1, Kubernetes 1.33), else
        the /16 around the `kubernetes` Service's ClusterIP."""
        return cidrs_from(self.core, self.k8s.client.NetworkingV1Api(self.api), self.k8s)

    def create(self, objects: list[dict[str, Any]]) -> None:
        for obj in objects:
            self.say(f"creating {obj['kind']} {obj['metadata'].get('namespace', '')}"
                     f"/{obj['metadata']['name']}".replace(" /", " "))
            self.k8s.utils.create_from_dict(self.api, obj,
                                            namespace=obj["metadata"].get("namespace"))

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every DaemonSet, Deployment and Pod of the run is ready (progress via say)."""
        selector = deploy.run_selector(self.run)
        deadline = time.monotonic() + timeout
        while True:
            waiting = []
            for ds in self.apps.list_daemon_set_for_all_namespaces(label_selector=selector).items:
                want, ready = ds.status.desired_number_scheduled or 0, ds.status.number_ready or 0
                if not want or ready < want:
                    waiting.append(f"DaemonSet {ds.metadata.name} {ready}/{want}")
            for d in self.apps.list_deployment_for_all_namespaces(label_selector=selector).items:
                want, ready = d.spec.replicas or 0, d.status.ready_replicas or 0
                if ready < want:
                    waiting.append(f"Deployment {d.metadata.name} {ready}/{want}")
            for p in self.core.list_pod_for_all_namespaces(label_selector=selector).items:
                conds = {c.type: c.status for c in (p.status.conditions or [])}
                if conds.get("Ready") != "True" and not p.metadata.owner_references:
                    waiting.append(f"Pod {p.metadata.name} {p.status.phase}")
            if not waiting:
                return
            self.say(f"waiting for {len(waiting)}: {', '.join(waiting[:3])}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f} s: {', '.join(waiting[:5])}")
            time.sleep(POLL_S)

    def probe_pods(self, host_network: bool = False) -> dict[str, str]:
        """node name -> the name of the run's probe pod there."""
        name = deploy.PROBE_HOST if host_network else deploy.PROBE
        pods = self.core.list_namespaced_pod(
            self.system_ns, label_selector=f"{deploy.RUN_LABEL}={self.run},"
                                           f"{deploy.COMPONENT}={name}").items
        return {p.spec.node_name: p.metadata.name for p in pods
                if p.status.phase == "Running" and p.spec.node_name}

    def _exec_api(self):
        """A CoreV1Api of its own for one exec: kubernetes.stream swaps its client's request
        method while it runs, so calls sharing that client from other threads (probes run
        at once, a list meanwhile) would go out as websockets and fail."""
        return self.k8s.client.CoreV1Api(self.k8s.client.ApiClient(self.api.configuration))

    def exec(self, pod: str, command: list[str], namespace: str | None = None,
             timeout: float = 120.0) -> str:
        """Run `command` in the pod and return its standard output."""
        from kubernetes.stream import stream

        own = self._exec_api()
        try:
            return stream(own.connect_get_namespaced_pod_exec, pod,
                          namespace or self.system_ns, command=command, stderr=False,
                          stdin=False, stdout=True, tty=False, _request_timeout=timeout)
        finally:
            own.api_client.close()

    def exec_stream(self, pod: str, command: list[str]):
        """A live exec (kubernetes WSClient): read_stdout as the command prints."""
        from kubernetes.stream import stream

        return stream(self._exec_api().connect_get_namespaced_pod_exec, pod, self.system_ns,
                      command=command, stderr=True, stdin=False, stdout=True, tty=False,
                      _preload_content=False)

    def probe(self, node: str, ip: str, port: int, **kwargs: Any) -> ProbeResult:
        """Probe ip:port from the probe pod on `node`: the same samples as a namespace pod's."""
        pod = self.probe_pods().get(node)
        if pod is None:
            raise RuntimeError(f"no running probe pod of run {self.run} on node {node}")
        out = self.exec(pod, probe_command(ip, port, **kwargs))
        return result_from_json(json.loads(out))

    def probes(self, ip: str, port: int, host_network: bool = False,
               **kwargs: Any) -> dict[str, ProbeResult]:
        """The same probe from every node's probe pod at once (with host_network, from the
        probe pods on the nodes' own network)."""
        pods = self.probe_pods(host_network=host_network)
        nodes = sorted(pods)
        results = self.probe_from([(pods[n], None, ip, port, kwargs) for n in nodes])
        return dict(zip(nodes, results, strict=True))

    def probe_from(self, requests: list[tuple[str, str | None, str, int, dict[str, Any]]]
                   ) -> list[ProbeResult]:
        """Several probes at once, each (pod, namespace or None for the run's system
        namespace, ip, port, probe_command's keywords), run by exec in that pod; the results
        in the requests' order. Any pod of the suite's image can probe (an echo pod too)."""
        results: list[ProbeResult | None] = [None] * len(requests)
        errors: list[BaseException] = []

        def one(i: int, pod: str, ns: str | None, ip: str, port: int, kw: dict[str, Any]
                ) -> None:
            try:
                out = self.exec(pod, probe_command(ip, port, **kw), namespace=ns)
                results[i] = result_from_json(json.loads(out))
            except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i, *req), daemon=True)
                   for i, req in enumerate(requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return [r for r in results if r is not None]

    def node_addresses(self) -> dict[str, str]:
        """node name -> its first IPv4 InternalIP (else ExternalIP), for NodePort probes."""
        out: dict[str, str] = {}
        for node in self.core.list_node().items:
            addrs = (node.status.addresses if node.status else None) or []
            for kind in ("InternalIP", "ExternalIP"):
                ip = next((a.address for a in addrs if a.type == kind and ":" not in a.address),
                          None)
                if ip:
                    out[node.metadata.name] = ip
                    break
        return out

    # ---- removal

    def delete_all(self) -> list[str]:
        """Delete every namespace and cluster-wide object of the run, and wait for the
        namespaces to go (bounded)."""
        return delete_run(self.api, self.run)


def smallest_cover(networks: list[str]) -> str | None:
    """The smallest IPv4 network that holds every one of `networks` (None for none)."""
    import ipaddress

    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    nets = [n for n in nets if n.version == 4]
    if not nets:
        return None
    cover = nets[0]
    while not all(n.subnet_of(cover) for n in nets):
        cover = cover.supernet()
    return str(cover)


def cidrs_from(core, networking, k8s) -> tuple[str, str]:
    pod_cidrs = [c for n in core.list_node().items
                 for c in (n.spec.pod_cidrs or ([n.spec.pod_cidr] if n.spec.pod_cidr else []))]
    pods = smallest_cover(pod_cidrs) or "10.244.0.0/16"
    service = None
    try:
        ranges = [c for sc in networking.list_service_cidr().items for c in (sc.spec.cidrs or [])]
        service = next((c for c in ranges if ":" not in c), None)
    except k8s.client.ApiException:
        pass  # before Kubernetes 1.33 there are no ServiceCIDR objects
    if service is None:
        ip = core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
        service = smallest_cover([f"{ip}/16"])
    return pods, service


def delete_run(api, run: str, wait_s: float = 120.0) -> list[str]:
    k8s = _client()
    core = k8s.client.CoreV1Api(api)
    rbac = k8s.client.RbacAuthorizationV1Api(api)
    selector = deploy.run_selector(run)
    removed = []
    for b in rbac.list_cluster_role_binding(label_selector=selector).items:
        _ignore_404(k8s, rbac.delete_cluster_role_binding, b.metadata.name)
        removed.append(f"run {run}: deleted ClusterRoleBinding {b.metadata.name}")
    for r in rbac.list_cluster_role(label_selector=selector).items:
        _ignore_404(k8s, rbac.delete_cluster_role, r.metadata.name)
        removed.append(f"run {run}: deleted ClusterRole {r.metadata.name}")
    names = [ns.metadata.name for ns in core.list_namespace(label_selector=selector).items]
    for name in names:
        _ignore_404(k8s, core.delete_namespace, name)
        removed.append(f"run {run}: deleted namespace {name}")
    deadline = time.monotonic() + wait_s
    while names and time.monotonic() < deadline:
        names = [ns.metadata.name for ns in core.list_namespace(label_selector=selector).items]
        if names:
            time.sleep(POLL_S)
    return removed


def _ignore_404(k8s, fn, *args) -> None:
    try:
        fn(*args)
    except k8s.client.ApiException as exc:
        if exc.status != 404:
            raise


# --------------------------------------------------------------------------- lifecycle


@contextlib.contextmanager
def session(provider: str, mode: str, *, kubeconfig: str | None = None, workers: int = 2,
            image: str = deploy.DEFAULT_IMAGE, keep: bool = False,
            say: Callable[[str], None] = lambda _m: None,
            state_dir: str | None = None) -> Iterator[KubeCluster]:
    """A run on a kind cluster made for it or on the kubeconfig's cluster.

    Everything it creates is deleted when the block ends (success, failure, Ctrl-C, SIGTERM:
    clusters/signals.py turns those into exceptions) unless `keep` and the block succeeded.
    Bad input (kind or Docker missing, a kubeconfig that points nowhere) raises
    KubeUnavailable before anything is created.
    """
    from clusters import kind

    state_dir = state_dir or STATE_DIR
    if provider == "kind":
        kind.preflight()
    else:
        api = connect(kubeconfig_path(kubeconfig))
    rec = RunRecord.create(provider, mode, None if provider == "kind" else
                           kubeconfig_path(kubeconfig), state_dir)
    ok = False
    cluster = None
    try:
        if provider == "kind":
            rec.state["kind_cluster"] = kind.cluster_name(rec.run)
            rec.save()
            path = kind.create(rec.run, mode, workers, rec.dir, image, say)
            rec.state["kubeconfig"] = path
            rec.save()
            try:
                api = connect(path, timeout=30.0)
            except KubeUnavailable as exc:  # kind made it: a failure, not bad input
                raise RuntimeError(f"kind cluster {kind.cluster_name(rec.run)}: {exc}") from None
        cluster = KubeCluster(api, rec.run, say)
        yield cluster
        ok = True
    finally:
        if ok and keep:
            rec.keep()
            rec.release()
        else:
            say(f"removing run {rec.run}")
            try:
                if provider == "kind":
                    kind.delete(rec.run)
                elif cluster is not None:
                    cluster.delete_all()
            finally:
                rec.remove()


def down(run: str, state_dir: str | None = None) -> list[str]:
    """Remove a kept run: its kind cluster, or its objects on the kubeconfig's cluster."""
    state_dir = state_dir or STATE_DIR
    from clusters import kind

    state = list_records(state_dir).get(run)
    if state is None:
        raise KubeUnavailable(f"no run {run} on a kind or kubeconfig cluster here")
    removed = []
    if state.get("provider") == "kind":
        if kind.delete(run):
            removed.append(f"run {run}: deleted kind cluster {kind.cluster_name(run)}")
    else:
        removed += delete_run(connect(state["kubeconfig"]), run)
    shutil.rmtree(os.path.join(state_dir, run), ignore_errors=True)
    return removed


def gc(state_dir: str | None = None, default_kubeconfig: str | None = None) -> list[str]:
    """What dead runs left: kind clusters svb-<run>, labelled namespaces and cluster-wide
    objects this machine made, and the records. Unreachable clusters are skipped quietly."""
    state_dir = state_dir or STATE_DIR
    from clusters import kind

    records = list_records(state_dir)
    live = {run for run, st in records.items() if record_live(run, st, state_dir)}
    removed = kind.gc(live)
    configs = {st["kubeconfig"] for run, st in records.items()
               if st and st.get("provider") == "kubeconfig" and st.get("kubeconfig")}
    path = default_kubeconfig or kubeconfig_path()
    if os.path.isfile(path):
        configs.add(path)
    for cfg in sorted(configs):
        try:
            api = connect(cfg, timeout=2.0)
        except KubeUnavailable:
            continue
        core = _client().client.CoreV1Api(api)
        for ns in core.list_namespace(label_selector=deploy.run_selector()).items:
            run = (ns.metadata.labels or {}).get(deploy.RUN_LABEL)
            made_here = (ns.metadata.annotations or {}).get(deploy.HOST_ANNOTATION) == host_id()
            if run and made_here and run not in live:
                removed += delete_run(api, run, wait_s=0)
    for run, st in records.items():
        if run not in live:
            shutil.rmtree(os.path.join(state_dir, run), ignore_errors=True)
            removed.append(f"run {run}: removed its record ({(st or {}).get('provider')})")
    return removed
