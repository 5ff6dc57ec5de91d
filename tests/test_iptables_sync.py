"""The iptables data plane on a real node: a network namespace with pods and real traffic.

Topology (as README.md's Concepts describe it): node namespace with a dummy uplink holding the node IP and a
route for the Service CIDR, one veth per pod (169.254.1.1 on the node side, /32 route,
proxy_arp), pods with a /32 and a default route to the node. Echo backends answer with
their name and the client address they saw. Everything lives in `svb-t<random>-ipt*`
namespaces and is deleted in `finally`.
"""

from __future__ import annotations

import re
import secrets
import shlex
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from clusters.nsenter import in_netns, run_in_netns
from dataplanes.base import DataplaneError, FullSyncNeeded
from dataplanes.iptables import IptablesDataplane, endpoint_chain, render_ruleset, service_chain
from dataplanes.iptrace import trace
from kube.model import (
    AFFINITY_CLIENT_IP,
    POLICY_LOCAL,
    SCTP,
    TYPE_NODE_PORT,
    UDP,
    ContainerPort,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState
from kube.tracker import NodeChanges, view_key

pytestmark = pytest.mark.root

NODE = Node.numbered(1)
GATEWAY = "169.254.1.1"
EXTERNAL_CLIENT = "198.18.0.200"
BACKEND_PORT = 8080
TIMEOUT_S = 2.0
BACKENDS = ("nft", "legacy")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class NetnsNode:
    """The NodeHandle of one node namespace (what clusters/netns.py provides for real runs)."""

    name: str
    netns: str
    ip: str
    pod_cidr: str
    uplink: str = "eth0"
    pods: dict[str, str] = field(default_factory=dict)  # pod IP -> node-side veth

    def pod_interfaces(self) -> dict[str, str]:
        return dict(self.pods)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = 120,
    ) -> subprocess.CompletedProcess:
        if isinstance(input, bytes):
            input = input.decode()
        proc = run_in_netns(self.netns, argv, input=input, timeout=timeout)
        if check:
            proc.check_returncode()
        return proc

    def call(self, fn, *args, **kwargs):
        return in_netns(self.netns, fn, *args, **kwargs)


class Echo:
    """TCP and UDP echo on BACKEND_PORT inside a pod namespace: replies 'name client-ip'."""

    def __init__(self, netns: str, name: str):
        self.name = name
        self.tcp = in_netns(netns, self._bind, socket.SOCK_STREAM)
        self.udp = in_netns(netns, self._bind, socket.SOCK_DGRAM)
        self.tcp.listen(16)
        for fn in (self._serve_tcp, self._serve_udp):
            threading.Thread(target=fn, daemon=True).start()

    @staticmethod
    def _bind(kind: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", BACKEND_PORT))
        return s

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"{self.name} {peer[0]}".encode())

    def _serve_udp(self) -> None:
        while True:
            try:
                _, peer = self.udp.recvfrom(512)
                if peer is None:  # shut down
                    return
                self.udp.sendto(f"{self.name} {peer[0]}".encode(), peer)
            except OSError:
                return

    def close(self) -> None:
        for s in (self.tcp, self.udp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def tcp_ask(netns: str, dst: str, port: int) -> tuple[str, str, str]:
    """(backend, the client address it saw, our own source address) or ('refused'|..., '', '')."""

    def ask():
        with socket.socket() as s:
            s.settimeout(TIMEOUT_S)
            try:
                s.connect((dst, port))
                me = s.getsockname()[0]
                name, seen = s.recv(256).decode().split()
                return name, seen, me
            except ConnectionRefusedError:
                return "refused", "", ""
            except TimeoutError:
                return "timeout", "", ""
            except OSError as exc:
                return exc.strerror or "error", "", ""

    return in_netns(netns, ask)


def udp_client(netns: str) -> socket.socket:
    s = in_netns(netns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT_S)
    return s


def udp_ask(s: socket.socket, dst: str, port: int) -> str:
    s.sendto(b"?", (dst, port))
    try:
        return s.recv(256).decode().split()[0]
    except TimeoutError:
        return "timeout"


@dataclass
class Cluster:
    node: NetnsNode
    pod_ns: dict[str, str]  # pod name -> namespace
    external_ns: str  # a client outside the cluster, on the node's uplink
    pods: list[Pod]
    echoes: list[Echo]

    def state(self, services, relabel: dict[str, str] | None = None) -> ClusterState:
        """The cluster with `services`; relabel moves pods to app=<value> (out of a selector)."""
        relabel = relabel or {}
        pods = [replace(p, labels={"app": relabel.get(p.name, p.labels["app"])}) for p in self.pods]
        return ClusterState.build([NODE], pods, services)

    def view(self, services, relabel=None):
        return self.state(services, relabel).node_view(NODE.name)

    def ip_of(self, pod: str) -> str:
        return next(p.ip for p in self.pods if p.name == pod)


POD_NAMES = (("b1", "web"), ("b2", "web"), ("c1", "client"))


@pytest.fixture(params=BACKENDS)
def cluster(request):
    backend = request.param
    if not shutil.which(f"iptables-{backend}-restore", path="/usr/sbin:/sbin:/usr/bin"):
        pytest.skip(f"iptables-{backend}-restore not installed")
    run = f"t{secrets.token_hex(3)}"
    node_ns = f"svb-{run}-ipt"
    ports = (ContainerPort(BACKEND_PORT), ContainerPort(BACKEND_PORT, UDP))
    pods = [
        Pod("ns1", n, labels={"app": app}, node_name=NODE.name, ports=ports) for n, app in POD_NAMES
    ]
    pods = list(ClusterState.build([NODE], pods).pods)  # the allocator gives the IPs
    pod_ns = {p.name: f"{node_ns}-{p.name}" for p in pods}
    created: list[str] = []
    echoes: list[Echo] = []
    try:
        for ns in (node_ns, *pod_ns.values()):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        node = NetnsNode(NODE.name, node_ns, NODE.ip, NODE.pod_cidr)
        # The underlay is one veth to an external client's namespace (no dummy driver here).
        ext_ns = f"{node_ns}-ext"
        ip("netns", "add", ext_ns)
        created.append(ext_ns)
        ip("-n", ext_ns, "link", "set", "lo", "up")
        ip(
            "-n",
            node_ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ext_ns,
        )
        ip("-n", node_ns, "addr", "add", f"{NODE.ip}/24", "dev", "eth0")
        ip("-n", ext_ns, "addr", "add", f"{EXTERNAL_CLIENT}/24", "dev", "eth0")
        for ns in (node_ns, ext_ns):
            ip("-n", ns, "link", "set", "eth0", "up")
        # Service traffic needs a route to leave the socket; DNAT then reroutes it to a pod.
        ip("-n", node_ns, "route", "add", "198.19.0.0/16", "dev", "eth0")
        node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for i, pod in enumerate(pods):
            veth, ns = f"vp{i}", pod_ns[pod.name]
            ip(
                "-n",
                node_ns,
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            ip("-n", node_ns, "addr", "add", f"{GATEWAY}/32", "dev", veth)
            ip("-n", node_ns, "link", "set", veth, "up")
            ip("-n", node_ns, "route", "add", f"{pod.ip}/32", "dev", veth)
            node.run(["sysctl", "-qw", f"net.ipv4.conf.{veth}.proxy_arp=1"])
            ip("-n", ns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
            ip("-n", ns, "route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink")
            node.pods[pod.ip] = veth
            if pod.labels["app"] == "web":
                echoes.append(Echo(ns, pod.name))
        yield Cluster(node, pod_ns, ext_ns, pods, echoes), IptablesDataplane(backend)
    finally:
        for e in echoes:
            e.close()
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def web(name: str = "svc1", app: str = "web", protocol: str = "TCP", **kw) -> Service:
    port = ServicePort(80, protocol, "p80", BACKEND_PORT, kw.pop("node_port", None))
    return Service("ns1", name, ports=(port,), selector={"app": app}, **kw)


def save(node: NetnsNode, dp: IptablesDataplane, counters: bool = False) -> str:
    return node.run([*dp.save_cmd, *(["-c"] if counters else [])]).stdout


def chains_in(text: str, table: str) -> set[str]:
    section = text.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
    return set(re.findall(r"^:(\S+)", section, re.M))


def rules_of(text: str, chain: str) -> list[str]:
    """The rules of one nat chain as saved, counters included when saved with -c."""
    return [x for x in text.splitlines() if re.search(rf"-A {re.escape(chain)} ", x)]


def by_chain(text: str) -> dict[tuple[str, str], list[str]]:
    """(table, chain) -> its rules in order; chain order and comment lines left out."""
    out: dict[tuple[str, str], list[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            out.setdefault((table, line[1:].split()[0]), [])
        elif line.startswith("-A "):
            out.setdefault((table, line.split()[1]), []).append(line)
    return out


# --------------------------------------------------------------------------- tests


def test_full_sync_programs_every_chain_and_serves_traffic(cluster):
    c, dp = cluster
    node = c.node
    dp.install(node)
    dp.install(node)  # idempotent: no second jump rule
    v = c.view([web()])
    stats = dp.sync(node, v)
    assert stats.full and stats.services == 1 and stats.rules > 0 and stats.payload_bytes > 0
    text = save(node, dp)
    rendered = render_ruleset(v)
    for table, chains in rendered.tables():
        assert set(chains) <= chains_in(text, table), table
    for table in ("mangle", "nat", "filter"):
        assert "KUBE-PROXY-CANARY" in chains_in(text, table)
    assert len(re.findall(r"^-A PREROUTING .*-j KUBE-SERVICES$", text, re.M)) == 1
    assert re.search(r"^-A OUTPUT .*-j KUBE-SERVICES$", text, re.M)
    assert re.search(r"^-A POSTROUTING .*-j KUBE-POSTROUTING$", text, re.M)
    assert re.search(r"^-A FORWARD .*--ctstate NEW.*-j KUBE-SERVICES$", text, re.M)

    vip = v.services[0].cluster_ip
    client = c.ip_of("c1")
    # What the kernel holds traces like what we rendered (iptables-save reformats every rule).
    for src, hook in ((client, "PREROUTING"), (NODE.ip, "OUTPUT")):
        kernel = trace(save(node, dp, counters=True), src, vip, "tcp", 80, hook, [NODE.ip])
        ours = trace(dp.render(v), src, vip, "tcp", 80, hook, [NODE.ip])
        assert kernel.endpoints() == pytest.approx(ours.endpoints(), abs=1e-9)
        assert kernel.masquerade == ours.masquerade == (hook == "OUTPUT")
    seen = [tcp_ask(c.pod_ns["c1"], vip, 80) for _ in range(6)]
    assert {s[0] for s in seen} <= {"b1", "b2"} and all(s[1] == client for s in seen), seen
    name, peer, me = tcp_ask(node.netns, vip, 80)  # a process on the node
    assert name in ("b1", "b2") and peer != me, "node traffic to a ClusterIP must be masqueraded"
    # A full sync again (forced) keeps one jump rule per hook.
    assert dp.sync(node, v, full=True).full
    assert len(re.findall(r"^-A PREROUTING .*-j KUBE-SERVICES$", save(node, dp), re.M)) == 1


def test_hairpin_and_no_endpoints(cluster):
    c, dp = cluster
    node = c.node
    only_b1 = Service("ns1", "solo", ports=(ServicePort(80, "TCP", "p80", BACKEND_PORT),))
    v = c.view([web("hair", app="hairpin"), web("empty", app="nobody"), only_b1], {"b1": "hairpin"})
    dp.install(node)
    dp.sync(node, v)
    hair, empty = v.service("ns1/hair:p80").cluster_ip, v.service("ns1/empty:p80").cluster_ip
    name, peer, _ = tcp_ask(c.pod_ns["b1"], hair, 80)
    assert name == "b1" and peer != c.ip_of("b1"), "a pod reaching itself must be masqueraded"
    assert tcp_ask(c.pod_ns["c1"], empty, 80)[0] == "refused"
    assert tcp_ask(node.netns, empty, 80)[0] == "refused"


def test_node_port_from_an_external_client(cluster):
    c, dp = cluster
    node = c.node
    cluster_np = web("np", type=TYPE_NODE_PORT, node_port=30000)
    local_np = web(
        "npl", type=TYPE_NODE_PORT, node_port=30001, external_traffic_policy=POLICY_LOCAL
    )
    v = c.view([cluster_np, local_np])
    dp.install(node)
    dp.sync(node, v)
    name, peer, _ = tcp_ask(c.external_ns, NODE.ip, 30000)
    assert name in ("b1", "b2") and peer != EXTERNAL_CLIENT, "Cluster policy must masquerade"
    name, peer, _ = tcp_ask(c.external_ns, NODE.ip, 30001)
    assert name in ("b1", "b2") and peer == EXTERNAL_CLIENT, "Local policy keeps the client IP"
    assert tcp_ask(c.external_ns, NODE.ip, 30002)[0] == "refused"  # no such NodePort


def changes(old, new) -> NodeChanges:
    """What the change tracker would hand the mode between two views of the node."""
    was = {view_key(v): v for v in old.services}
    now = {view_key(v): v for v in new.services}
    return NodeChanges(new.node, updated={k: v for k, v in now.items() if was.get(k) != v},
                       removed={k: v for k, v in was.items() if k not in now})


def test_update_rewrites_only_the_changed_service(cluster):
    c, dp = cluster
    node = c.node
    services = [web("svc1"), web("svc2", app="web2")]
    v1 = c.view(services)  # b1 and b2 serve svc1; svc2 has no endpoint yet
    dp.install(node)
    assert dp.sync(node, v1).full
    svc1, svc2 = v1.service("ns1/svc1:p80"), v1.service("ns1/svc2:p80")
    assert not svc2.internal_endpoints
    # Traffic through svc1 until b1 answered puts packet counts on b1's KUBE-SEP rules.
    answers = [tcp_ask(c.pod_ns["c1"], svc1.cluster_ip, 80)[0]]
    while "b1" not in answers and len(answers) < 20:
        answers.append(tcp_ask(c.pod_ns["c1"], svc1.cluster_ip, 80)[0])
    assert "b1" in answers and set(answers) <= {"b1", "b2"}, answers
    before = save(node, dp, counters=True)
    kept = endpoint_chain(svc1, next(e for e in svc1.internal_endpoints if e.ip == c.ip_of("b1")))
    assert not rules_of(before, kept)[-1].startswith("[0:0]")

    v2 = c.view(services, {"b2": "web2"})  # b2 leaves svc1 and joins svc2
    svc1b, svc2b = v2.service("ns1/svc1:p80"), v2.service("ns1/svc2:p80")
    stats = dp.update(node, changes(v1, v2))
    # One restore (on nft the canary checks go in one of their own before it).
    assert not stats.full and stats.extra["restores"] == (2 if dp.backend == "nft" else 1)
    b2 = next(e for e in svc2b.internal_endpoints if e.ip == c.ip_of("b2"))
    gone = next(e for e in svc1.internal_endpoints if e.ip == c.ip_of("b2"))
    expected = {service_chain(svc1b), service_chain(svc2b), endpoint_chain(svc2b, b2)}
    expected.add(endpoint_chain(svc1, gone))  # deleted
    assert set(stats.extra["changed_chains"]) == expected
    # svc2's first endpoint moves its ClusterIP row from filter's REJECT to nat's jump: both
    # KUBE-SERVICES chains are rebuilt from the kept rows; KUBE-NODEPORTS is left alone.
    assert stats.extra["shared_chains"] == ["filter/KUBE-SERVICES", "nat/KUBE-SERVICES"]
    assert stats.changed == len(expected) + 2
    after = save(node, dp, counters=True)
    assert rules_of(after, kept) == rules_of(before, kept), "an unchanged chain was rewritten"
    assert endpoint_chain(svc1, gone) not in chains_in(after, "nat")
    assert tcp_ask(c.pod_ns["c1"], svc2b.cluster_ip, 80)[0] == "b2"
    assert {tcp_ask(c.pod_ns["c1"], svc1b.cluster_ip, 80)[0] for _ in range(4)} == {"b1"}
    # An endpoint change alone (svc2 gains c1) rewrites its Service's chains, no shared one.
    v3 = c.view(services, {"b2": "web2", "c1": "web2"})
    third = dp.update(node, changes(v2, v3))
    assert not third.full and third.extra["shared_chains"] == [], third.extra
    assert third.extra["chains_written"] == 2 and third.extra["chains_deleted"] == 0
    # A view equal to what the memory holds writes nothing; the restore only checks canaries.
    same = dp.update(node, NodeChanges(node.name, updated={view_key(v): v for v in v3.services}))
    assert same.changed == 0 and same.rules == 0 and same.extra["restores"] == 1
    # What the updates left is what a full sync of the same view leaves, and a full sync of
    # it reads the kernel back and writes nothing.
    state = dp.kernel_state(node)
    again = dp.sync(node, v3)
    assert again.full and again.changed == 0 and again.extra["restores"] == 0, again.extra
    dp.uninstall(node)
    dp.install(node)
    assert dp.sync(node, v3).extra["chains_written"] > 0
    assert dp.kernel_state(node) == state


@pytest.mark.parametrize("how", [("-F",), ("-F", "-X")])
def test_flushed_nat_table_is_restored_by_the_next_sync(cluster, how):
    c, dp = cluster
    node = c.node
    v = c.view([web()])
    dp.install(node)
    dp.sync(node, v)
    vip = v.services[0].cluster_ip
    for flag in how:
        node.run([*dp.iptables_cmd, "-t", "nat", flag])
    assert "KUBE-SVC" not in "\n".join(rules_of(save(node, dp), "KUBE-SERVICES"))
    # An update's restore checks the canaries first: it fails whole and asks for a full sync.
    v2 = c.view([web(), web("svc2")])
    with pytest.raises(FullSyncNeeded):
        dp.update(node, changes(v, v2))
    with pytest.raises(FullSyncNeeded):  # and keeps asking until one ran
        dp.update(node, changes(v, v2))
    stats = dp.sync(node, v2)
    assert stats.full and stats.extra["chains_written"] > 0
    text = save(node, dp)
    assert service_chain(v.services[0]) in chains_in(text, "nat")
    assert re.search(r"^-A PREROUTING .*-j KUBE-SERVICES$", text, re.M)
    assert tcp_ask(c.pod_ns["c1"], vip, 80)[0] in ("b1", "b2")
    assert not dp.update(node, changes(v2, v)).full  # updates again


def test_sync_repairs_a_service_chain_deleted_by_hand(cluster):
    c, dp = cluster
    node = c.node
    services = [web("svc1"), web("svc2", app="web2")]
    v = c.view(services, {"b2": "web2"})  # svc1: b1, svc2: b2
    dp.install(node)
    dp.sync(node, v)
    svc1 = v.service("ns1/svc1:p80")
    chain = service_chain(svc1)
    # Someone removes svc1's chain: its jump in KUBE-SERVICES first, or -X refuses.
    jump = next(r for r in rules_of(save(node, dp), "KUBE-SERVICES") if r.endswith(chain))
    nat = [*dp.iptables_cmd, "-t", "nat"]
    node.run([*nat, "-D", *shlex.split(jump)[1:]])
    node.run([*nat, "-F", chain])
    node.run([*nat, "-X", chain])
    assert tcp_ask(c.pod_ns["c1"], svc1.cluster_ip, 80)[0] != "b1"
    # An update that rewrites nothing referring to it does not notice (kube-proxy's partial
    # sync would, as it rewrites KUBE-SERVICES every time) ...
    v2 = c.view(services, {"b2": "web2", "c1": "web2"})
    assert dp.update(node, changes(v, v2)).extra["shared_chains"] == []
    # ... one that rewrites KUBE-SERVICES fails as a whole and asks for a full sync ...
    v3 = c.view([*services, web("svc3")], {"b2": "web2", "c1": "web2"})
    with pytest.raises(FullSyncNeeded):
        dp.update(node, changes(v2, v3))
    # ... which puts back exactly what is missing.
    stats = dp.sync(node, v3)
    assert stats.full
    assert set(stats.extra["written"]) >= {f"nat/{chain}", "nat/KUBE-SERVICES"}, stats.extra
    assert tcp_ask(c.pod_ns["c1"], svc1.cluster_ip, 80)[0] == "b1"
    # A rule changed inside a chain is found too, and only that chain is written.
    sep = endpoint_chain(svc1, svc1.internal_endpoints[0])
    node.run([*nat, "-R", sep, "2", "-p", "tcp", "-j", "DNAT", "--to-destination",
              f"{c.ip_of('c1')}:{BACKEND_PORT}"])
    fixed = dp.sync(node, v3)
    assert fixed.extra["written"] == [f"nat/{sep}"], fixed.extra
    assert dp.sync(node, v3).extra["restores"] == 0


def test_a_second_full_sync_reads_back_every_shape_and_writes_nothing(cluster):
    """Every rule shape the mode writes is recognised in iptables-save's form (probabilities
    kept in 2^-31 steps, the recent match's options reordered, MARK as --set-xmark, ...)."""
    from tests.scenarios import BOTH_LOCAL, LOAD_BALANCER, backends
    from tests.scenarios import view as scenario_view
    from tests.scenarios import web as scenario_web

    c, dp = cluster
    node = c.node
    ranges = ("198.18.0.0/24", "10.1.2.3/8", "0.0.0.0/0")  # the node's own, host bits, all
    v = scenario_view(backends(7), [
        scenario_web("plain"),
        scenario_web("both", **BOTH_LOCAL),
        scenario_web("lb", **LOAD_BALANCER, load_balancer_source_ranges=ranges),
        scenario_web("sticky", session_affinity=AFFINITY_CLIENT_IP),
        scenario_web("empty", app="nobody", type=TYPE_NODE_PORT, node_port=30009),
        Service("ns1", "dns", (ServicePort(53, UDP, "dns", 8080),), selector={"app": "web"}),
        Service("ns1", "sc", (ServicePort(53, SCTP, "", 8080),), selector={"app": "web"}),
    ])
    dp.install(node)
    first = dp.sync(node, v)
    assert first.extra["chains_written"] > 20
    again = dp.sync(node, v)
    assert again.changed == 0 and again.extra["restores"] == 0, again.extra["written"]


def test_uninstall_leaves_no_kube_chain(cluster):
    c, dp = cluster
    node = c.node
    v = c.view([web()])
    dp.install(node)
    dp.sync(node, v)
    assert "KUBE-" in save(node, dp)
    dp.uninstall(node)
    assert "KUBE-" not in save(node, dp)
    assert tcp_ask(c.pod_ns["c1"], v.services[0].cluster_ip, 80)[0] not in ("b1", "b2")
    dp.uninstall(node)  # nothing left to remove is fine
    assert dp.sync(node, v).full  # and a later sync starts over


def test_udp_flows_move_when_their_endpoint_leaves(cluster):
    c, dp = cluster
    node = c.node
    services = [web("dns", protocol="UDP")]
    v = c.view(services)
    dp.install(node)
    dp.sync(node, v)
    vip = v.services[0].cluster_ip
    s = udp_client(c.pod_ns["c1"])
    try:
        first = udp_ask(s, vip, 80)
        assert first in ("b1", "b2")
        assert {udp_ask(s, vip, 80) for _ in range(4)} == {first}  # conntrack pins the flow
        # The pod keeps running (and answering) but leaves the Service's endpoints.
        stats = dp.sync(node, c.view(services, {first: "elsewhere"}))
        assert stats.extra["conntrack_deletes"] >= 1
        other = ({"b1", "b2"} - {first}).pop()
        assert udp_ask(s, vip, 80) == other, "the stale UDP flow still reaches the old endpoint"
    finally:
        s.close()


def test_restore_failure_names_the_line(cluster):
    c, dp = cluster
    node = c.node
    v = c.view([web()])
    bad = replace(v, services=(replace(v.services[0], cluster_ip="198.19.0.999"),))
    dp.install(node)
    with pytest.raises(DataplaneError, match=r"198\.19\.0\.999"):
        dp.sync(node, bad)
    assert dp.sync(node, v).full  # a failed first sync leaves nothing half-remembered


def test_split_restores_write_the_same_rules(cluster):
    c, dp = cluster
    node = c.node
    services = [
        web("svc1"),
        web("np", type=TYPE_NODE_PORT, node_port=30000, external_traffic_policy=POLICY_LOCAL),
        web("empty", app="nobody"),
    ]
    v = c.view(services)
    dp.install(node)
    whole = dp.sync(node, v)
    assert whole.extra["restores"] == 1
    one_go, one_go_state = save(node, dp), dp.kernel_state(node)
    dp.uninstall(node)
    split = IptablesDataplane(dp.backend, restore_budget=3)  # leaves first, in small restores
    split.install(node)
    stats = split.sync(node, v)
    # Each restore costs at most 3 (a chain: 1 + the chains it jumps to), or is one chain.
    assert stats.extra["restores"] >= stats.extra["chains_written"] // 3 > 1
    assert by_chain(save(node, split)) == by_chain(one_go)
    assert split.kernel_state(node) == one_go_state
    assert tcp_ask(c.pod_ns["c1"], v.service("ns1/svc1:p80").cluster_ip, 80)[0] in ("b1", "b2")
    assert tcp_ask(c.external_ns, NODE.ip, 30000)[1] == EXTERNAL_CLIENT
    split.uninstall(node)  # also in leaf-last steps of 2 chains
    assert "KUBE-" not in save(node, split)
