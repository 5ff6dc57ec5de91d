"""`svcbench agent` against a recorded Kubernetes API: the real `kubernetes` client lists and
watches a tiny API server on 127.0.0.1 (tests/fakeapi.py) that serves objects and watch
events as an API server writes them (tests/data/k8s). First with a recording mode (what
reaches the mode, label handling, headless, bookmarks, 410 relist, healthz and metrics),
then programming a real namespace-cluster node in every host mode, with traffic, and in
IPVS mode inside the User-Mode-Linux guest that tests/test_ipvs.py's guest tests boot."""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request

import pytest

from tests.fakeapi import END, FakeApiServer, now_rfc3339, recorded, recorded_events

pytest.importorskip("kubernetes", reason="the kube extra (kubernetes client) is not installed")
pytest.importorskip("prometheus_client", reason="the kube extra (prometheus-client) is missing")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dataplanes.base import SyncStats  # noqa: E402
from svcbench.agent import Agent, Served  # noqa: E402


class Recorder:
    """A mode that keeps the last view it was given per node (full syncs only)."""

    name = "recorder"

    def __init__(self) -> None:
        self.views: dict[str, object] = {}
        self.installed: list[str] = []
        self.syncs = 0

    def missing(self, host):
        return []

    def install(self, node):
        self.installed.append(node.name)

    def uninstall(self, node):
        self.installed.remove(node.name)

    def sync(self, node, view):
        self.views[node.name] = view
        self.syncs += 1
        return SyncStats(self.name, node.name, 0.0, True, len(view.services))


class Handle:
    def __init__(self, node) -> None:
        self.name, self.ip, self.pod_cidr = node.name, node.ip, node.pod_cidr
        self.netns, self.uplink = "fake", "eth0"


def _client(fake: FakeApiServer, tmp_path):
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(fake.kubeconfig(tmp_path / "kubeconfig")),
                            client_configuration=cfg)
    return client.ApiClient(cfg)


def _wait(what, timeout: float = 5.0):
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        got = what()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def _start(agent: Agent):
    import threading

    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    assert agent.ready.wait(10), f"no first sync: {agent.error}"
    return thread


def _served(mode: Recorder) -> set[str]:
    view = mode.views["node1"]
    return {f"{v.namespace}/{v.service}" for v in view.services}


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_agent_follows_the_api(tmp_path):
    """List, watch, bookmark, 410 relist; label and headless handling; healthz; metrics."""
    with FakeApiServer() as fake:
        mode = Recorder()
        agent = Agent(_client(fake, tmp_path), "node1", mode, Handle, min_sync_period=0.05,
                      sync_period=60, page_size=2)
        served = Served(agent, ("127.0.0.1", 0), ("127.0.0.1", 0))
        healthz, metrics = (f"http://127.0.0.1:{p}" for p in served.ports)
        try:
            code, _ = _get(healthz + "/healthz")
            assert code == 503  # no sync yet
            thread = _start(agent)
            # Unlabelled, with a ClusterIP: served; another proxy's and the headless: not.
            assert _served(mode) == {"default/kubernetes", "ns1/web"}
            view = mode.views["node1"]
            assert (view.node_ip, view.pod_cidr) == ("198.18.0.1", "198.18.129.0/24")
            web = next(v for v in view.services if v.service == "web")
            assert [(e.ip, e.port, e.local) for e in web.endpoints] == [("198.18.129.2", 8080, True)]
            assert web.node_zone == "zone1"  # from the Node object's label

            # Watch: a Service and its slice arrive, the slice with its trigger time.
            svc_events = recorded_events("watch-services.jsonl")
            # a change halfway between the agent's start and now (kube-proxy counts only
            # changes after its start)
            age = (time.time() - agent.started) / 2
            slice_events = recorded_events("watch-endpointslices.jsonl",
                                           TRIGGER_TIME=now_rfc3339(-age))
            fake.push("services", svc_events[0])
            fake.push("endpointslices", slice_events[0])

            def late_served():
                """ns1/late with its endpoint"""
                late = [v for v in mode.views["node1"].services if v.service == "late"]
                return late and late[0].endpoints
            _wait(late_served)
            # A bookmark moves the resourceVersion the next watch starts from.
            fake.push("services", svc_events[1], END)
            _wait(lambda: len(fake.seen("services", watch=True)) == 2)
            assert agent.reflectors["services"].bookmarks == 1
            # 410 Gone: the agent lists again; the new list no longer has ns1/late.
            fake.set_list("services", {**recorded("services.json"),
                                       "metadata": {"resourceVersion": "1010"}})
            fake.push("services", *recorded_events("watch-gone.jsonl"))
            _wait(lambda: "ns1/late" not in _served(mode))
            assert agent.reflectors["services"].gone == 1
            # two lists of five Services, in pages of two: 3 requests each
            lists = fake.seen("services", watch=False)
            assert [(q.get("limit"), q.get("continue")) for q in lists] == [
                ("2", None), ("2", "2"), ("2", "4")] * 2
            assert agent.reflectors["services"].pages == 6
            watch_versions = [q.get("resourceVersion") for q in fake.seen("services", watch=True)]
            assert watch_versions[:3] == ["1000", "1005", "1010"], watch_versions
            assert all(q.get("allowWatchBookmarks") == "true"
                       for q in fake.seen("services", watch=True))
            assert fake.seen("nodes", watch=False)[0]["fieldSelector"] == "metadata.name=node1"

            code, body = _get(healthz + "/healthz")
            health = json.loads(body)
            assert code == 200 and health["nodeEligible"] is True, health
            assert set(health) == {"lastUpdated", "currentTime", "nodeEligible"}
            assert agent.healthz(now=agent.last_sync + 2 * 60 + 1)[0] == 503  # stale
            assert _get(healthz + "/metrics")[0] == 404

            code, body = _get(metrics + "/metrics")
            assert code == 200
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            samples = {s.name: s.value for f in families.values() for s in f.samples
                       if not s.labels}
            assert families["kubeproxy_sync_proxy_rules_duration_seconds"].type == "histogram"
            assert samples["kubeproxy_sync_proxy_rules_duration_seconds_count"] >= 3
            # programmed at least `age` after the slice's trigger time
            assert samples["kubeproxy_network_programming_duration_seconds_count"] == 1
            assert age <= samples["kubeproxy_network_programming_duration_seconds_sum"] < 10
            assert abs(samples["kubeproxy_sync_proxy_rules_last_timestamp_seconds"]
                       - agent.last_sync) < 1e-3
            assert samples["kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"] > 0
            assert samples["svcbench_agent_services"] == 2
            assert samples["svcbench_agent_endpoints"] == 2

            # The node's zone label changes: the view is rebuilt with it.
            node = recorded("nodes.json")["items"][0]
            node["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone9"
            fake.push("nodes", {"type": "MODIFIED", "object": {"kind": "Node",
                                                                "apiVersion": "v1", **node}})

            def rezoned():
                """the view in zone9"""
                return {v.node_zone for v in mode.views["node1"].services} == {"zone9"}
            _wait(rezoned)
            assert _served(mode) == {"default/kubernetes", "ns1/web"}

            # The node gets the autoscaler's deletion taint: not eligible, 503.
            node["spec"]["taints"] = [{"key": "ToBeDeletedByClusterAutoscaler",
                                       "value": "1", "effect": "NoSchedule"}]
            fake.push("nodes", {"type": "MODIFIED", "object": {"kind": "Node",
                                                                "apiVersion": "v1", **node}})
            _wait(lambda: agent.facts and not agent.facts.eligible)
            code, body = _get(healthz + "/healthz")
            assert code == 503 and json.loads(body)["nodeEligible"] is False
        finally:
            agent.stop()
            served.close()
        thread.join(10)
        assert not thread.is_alive()
        assert mode.installed == []  # uninstalled on the way out


def test_agent_with_a_proxy_name(tmp_path):
    """--proxy-name: only the Services labelled for it (kube-proxy's informer filter)."""
    with FakeApiServer() as fake:
        mode = Recorder()
        agent = Agent(_client(fake, tmp_path), "node1", mode, Handle, proxy_name="svcbench",
                      min_sync_period=0.05)
        thread = _start(agent)
        try:
            assert _served(mode) == {"ns1/mine"}
        finally:
            agent.stop()
            thread.join(10)


def test_agent_retries_a_failed_sync(tmp_path):
    """A sync the mode fails is logged, counted and retried as a full sync, as kube-proxy
    retries; the agent does not stop."""

    class FailsOnce(Recorder):
        def sync(self, node, view):
            if not self.syncs:
                self.syncs += 1
                raise RuntimeError("iptables-restore: line 7 failed")
            return super().sync(node, view)

    with FakeApiServer() as fake:
        mode = FailsOnce()
        agent = Agent(_client(fake, tmp_path), "node1", mode, Handle, min_sync_period=0.05)
        thread = _start(agent)
        try:
            assert _served(mode) == {"default/kubernetes", "ns1/web"}
            assert agent.error is None and agent.metrics.sync_failures._value.get() == 1
        finally:
            agent.stop()
            thread.join(10)


def main(argv: list[str]) -> int:
    """`svcbench.cli.main` for the agent alone: building every command's parser imports
    the benchmark and report packages (seconds here)."""
    import argparse

    from clusters.signals import interrupt_on_signals
    from svcbench import cli
    from svcbench.cmd_agent import add_agent_arguments

    parser = argparse.ArgumentParser(prog="svcbench agent")
    add_agent_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.command, args.func = "agent", cli.cmd_agent
    with interrupt_on_signals() as caught:
        status = cli._run(args, argv)
    return caught.exit_status or status


def test_agent_cli_without_an_api(tmp_path, capsys, monkeypatch):
    """A kubeconfig that points nowhere: one sentence, exit 2, nothing programmed."""

    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    status = main(["agent", "--mode", "iptables", "--node-name", "node1",
                   "--kubeconfig", str(config)])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:9 cannot be reached" in lines[0], err
    # Without a kubeconfig outside a pod: the same, naming what is missing.
    assert main(["agent", "--mode", "iptables", "--node-name", "node1"]) == 2
    assert "--kubeconfig" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real node

HOST_MODES = ("iptables", "nftables", "ebpf", "userspace")
NS = "ns1"


@contextlib.contextmanager
def _one_node_cluster():
    from clusters.netns import NetnsCluster
    from kube.model import Node, Pod
    from kube.state import ClusterState

    pods = [Pod(NS, "web-1", {"app": "web"}, "node1"), Pod(NS, "client", {}, "node1")]
    with NetnsCluster.create(1) as made:
        placed = ClusterState.build([Node.numbered(1)], pods).pods
        # the recorded EndpointSlices name web-1 at the first pod address of node1
        assert {p.name: p.ip for p in placed}["web-1"] == "198.18.129.2"
        made.set_pods(placed)
        yield made


@pytest.fixture(scope="module")
def node_cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with _one_node_cluster() as made:
        yield made


def _probe(made, ip: str, count: int, timeout: float = 0.5) -> list[str]:
    from clusters.nsenter import in_netns
    from clusters.workloads.probe import OK, probe

    result = in_netns(made.pod_netns(NS, "client"), probe, ip, 80, count=count, timeout=timeout)
    return [s.backend if s.outcome == OK else s.outcome for s in result.samples]


@pytest.mark.root
@pytest.mark.parametrize("mode_name", HOST_MODES)
def test_agent_programs_a_node(node_cluster, mode_name, tmp_path):
    """Events in, kernel state and traffic out: the agent programs node1 of a namespace
    cluster in each host mode from the recorded API; a watched Service comes and goes."""
    _programs(node_cluster, mode_name, tmp_path)


LATE = (NS, "late-p2w7c")  # the watched Service's EndpointSlice


def _synced_until(agent: Agent, synced: int, holds, timeout: float = 10.0) -> int:
    """Wait for a sync after the `synced`th that leaves `holds()` true; the syncs so far.
    Reads the kernel once a sync, not in a loop beside the agent (slow in the guest)."""
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if agent.syncs > synced:
            synced = agent.syncs
            if holds():
                return synced
        time.sleep(0.02)
    raise AssertionError(f"no sync within {timeout} s left the kernel as expected")


def _programs(made, mode_name: str, tmp_path, api_netns: str | None = None) -> None:
    """`api_netns`: the fake API server listens, and the agent's threads run, in this
    namespace's loopback instead of the test's own."""
    from clusters.nsenter import in_netns
    from dataplanes.base import Host
    from dataplanes.modes import make

    mode = make(mode_name)
    missing = mode.missing(Host())
    if missing:
        pytest.skip(f"{mode_name} cannot run here: {'; '.join(missing)}")
    node = made.node("node1")

    def state() -> str:
        return json.dumps(mode.kernel_state(node))

    def inside(fn, *args):
        return in_netns(api_netns, fn, *args) if api_netns else fn(*args)

    with inside(FakeApiServer) as fake:
        agent = Agent(_client(fake, tmp_path), "node1", mode,
                      lambda facts: node if (facts.ip, facts.pod_cidr) == (node.ip, node.pod_cidr)
                      else pytest.fail(f"the Node object's facts {facts} are not node1's"),
                      min_sync_period=0.05, sync_period=60)
        thread = inside(_start, agent)  # its threads (and theirs) start in that namespace
        try:
            held = state()
            assert "198.19.0.50" in held  # ns1/web
            for skipped in ("198.19.0.51", "198.19.0.52"):  # another proxy's, for --proxy-name
                assert skipped not in held
            assert _probe(made, "198.19.0.50", 3) == ["ns1/web-1"] * 3

            svc_events = recorded_events("watch-services.jsonl")
            slice_events = recorded_events("watch-endpointslices.jsonl",
                                           TRIGGER_TIME=now_rfc3339())
            synced = agent.syncs
            fake.push("services", svc_events[0])
            fake.push("endpointslices", slice_events[0])
            # the slice is applied once the node was synced with it (the VIP may come first)
            synced = _synced_until(agent, synced, lambda: LATE in agent.applied_slices
                                   and "198.19.0.60" in state())
            assert _probe(made, "198.19.0.60", 2) == ["ns1/web-1"] * 2
            fake.push("services", svc_events[2])
            fake.push("endpointslices", slice_events[1])
            _synced_until(agent, synced, lambda: LATE not in agent.applied_slices
                          and "198.19.0.60" not in state())
        finally:
            agent.stop()
            thread.join(15)
        assert not thread.is_alive()
    # uninstalled: the ClusterIP leads nowhere
    assert "ns1/web-1" not in _probe(made, "198.19.0.50", 1, timeout=0.3)



@pytest.mark.root
def test_agent_command_stops_on_sigterm(node_cluster, tmp_path):
    """The command on a namespace node (--netns): serves /healthz and traffic; SIGTERM
    uninstalls the mode's state and exits 128 + 15."""
    import signal
    import threading

    made = node_cluster
    node = made.node("node1")
    seen: dict[str, object] = {}
    port = _free_port()
    with FakeApiServer() as fake:
        config = fake.kubeconfig(tmp_path / "kubeconfig")

        def client_side() -> None:
            try:
                def healthy():
                    """/healthz 200"""
                    return _listening(port) and _get(
                        f"http://127.0.0.1:{port}/healthz")[0] == 200
                _wait(healthy, timeout=20)
                seen["probe"] = _probe(made, "198.19.0.50", 2)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)

        helper = threading.Thread(target=client_side, daemon=True)
        helper.start()
        status = main(["agent", "--mode", "iptables", "--node-name", "node1",
                       "--kubeconfig", str(config), "--netns", node.netns,
                       "--healthz-bind-address", f"127.0.0.1:{port}",
                       "--metrics-bind-address", "127.0.0.1:0", "--min-sync-period", "50ms"])
        helper.join(10)
    assert seen.get("probe") == ["ns1/web-1"] * 2, seen
    assert status == 128 + signal.SIGTERM
    assert "KUBE-" not in node.run(["iptables-save"]).stdout  # uninstalled
    # the command's node handle finds what the cluster knows: uplink and pod veths
    from clusters.host import HostNode

    handle = HostNode.holding("node1", node.ip, node.pod_cidr, node.netns)
    assert handle.uplink == node.uplink
    assert handle.pod_interfaces() == node.pod_interfaces()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_objects_of_another_address_plan():
    """A kind-like cluster (Services in 10.96.0.0/12, the apiserver's endpoint on the node's
    172.18.0.2): read under the agent's plan for that cluster; the suite's own plan, which
    keeps every address in 198.18.0.0/15, refuses them with the reason."""
    from kube.api import ApiObjectError, cluster_plan, service_from_api, slice_from_api
    from kube.model import PLAN

    svc = recorded("services.json")["items"][0]  # default/kubernetes
    svc["spec"]["clusterIP"] = "10.96.0.1"
    svc["spec"]["clusterIPs"] = ["10.96.0.1"]
    sl = recorded("endpointslices.json")["items"][0]
    sl["endpoints"][0]["addresses"] = ["172.18.0.2"]
    plan = cluster_plan("10.244.0.0/16", "10.96.0.0/12")
    assert service_from_api(svc, plan).cluster_ip == "10.96.0.1"
    assert slice_from_api(sl, plan).endpoints[0].addresses == ("172.18.0.2",)
    with pytest.raises(ApiObjectError, match=r"spec.clusterIP.*198\.19\.0\.0/16"):
        service_from_api(svc, PLAN)
    with pytest.raises(ApiObjectError, match=r"addresses\[0\].*198\.18\.0\.0/15"):
        slice_from_api(sl, PLAN)
    with pytest.raises(ValueError, match="--service-cidr"):
        cluster_plan("10.244.0.0/16", "fd00::/108")
    # the NodePort range: the apiserver's default unless --service-node-port-range says else
    import argparse

    from svcbench.cmd_agent import add_agent_arguments

    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    for flags, wanted in (([], (30000, 32767)), (["--service-node-port-range", "31000-31999"],
                                                 (31000, 31999))):
        args = parser.parse_args(["--mode", "ebpf", *flags])
        assert cluster_plan("10.244.0.0/16", "10.96.0.0/12",
                            args.service_node_port_range).node_port_range == wanted
    for bad in ("31999-31000", "30000", "0-10", "a-b"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--mode", "ebpf", "--service-node-port-range", bad])


def test_agent_durations_read_as_kube_proxy_writes_them():
    import argparse

    from svcbench.cmd_agent import _seconds

    parse = _seconds("--sync-period")
    assert [parse(v) for v in ("30s", "500ms", "1m0s", "2")] == [30.0, 0.5, 60.0, 2.0]
    for bad in ("0", "1x", "-1s", "25h"):
        with pytest.raises(argparse.ArgumentTypeError, match="--sync-period"):
            parse(bad)


# --------------------------------------------------------------------------- ipvs, in the guest

@pytest.mark.root
@pytest.mark.timeout(900)
def test_agent_ipvs_in_guest(tmp_path, request):
    """IPVS runs only in the User-Mode-Linux guest kernel: `test_guest_agent_ipvs` runs there
    in the boot tests/test_ipvs.py's guest tests share (tests/guest.py SHARED_BOOT)."""
    from tests.guest import guest_junit

    report = guest_junit(__file__, tmp_path, request)
    assert 'name="test_guest_agent_ipvs"' in report and "<skipped" not in report, report


@pytest.mark.root
def test_guest_agent_ipvs(tmp_path):
    """The agent in IPVS mode on a guest kernel's namespace node, as the host modes above."""
    from tests.guest import IN_GUEST

    if not IN_GUEST:
        pytest.skip("runs inside the UML guest (test_agent_ipvs_in_guest boots it)")
    # The guest kernel's own root namespace has no loopback up: the fake API and the
    # agent's client talk over the external client namespace's.
    with _one_node_cluster() as made:
        _programs(made, "ipvs", tmp_path, api_netns=made.external_netns)
