"""The userspace data plane: the proxy's table and rules, then a real two-node cluster.

Cluster (NetnsCluster, echo agents on): node1 holds web-1 and client-a, node2 web-2,
web-3 and client-b. Each node runs its own proxy; Services are applied per test with
`Lab.apply`, which builds the ClusterState and syncs both nodes. Everything lives in the
run's `svb-<run>-*` namespaces and is removed in `finally` (NetnsCluster's context).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest

from bench.synthetic import synthetic_services
from clusters.netns import NetnsCluster, netns_delete
from clusters.nsenter import in_netns
from clusters.workloads.echo import BackendSpec
from clusters.workloads.probe import OK, REFUSED, ProbeResult, probe
from dataplanes.base import DataplaneError
from dataplanes.userspace import (
    CHAINS,
    JUMPS,
    PORTALS_CONTAINER,
    PORTALS_FILTER,
    SET_DROP,
    SET_EXTERNAL_LOCAL,
    SET_FIREWALL,
    SET_FIREWALL_SOURCES,
    SET_REDIRECT,
    SET_REJECT,
    SETS,
    UserspaceDataplane,
    render_chains,
    render_ipsets,
    render_rules,
    rules_intact,
    table_message,
)
from dataplanes.userspace_proxy import (
    DROP,
    EXTERNAL_LOCAL,
    REDIRECT,
    REJECT,
    ServiceEntry,
    Table,
    _nla,
    _nla_parse,
    changed_udp_portals,
    portal_classes,
    portal_key_bytes,
    portal_source_ranges,
)
from kube.model import (
    AFFINITY_CLIENT_IP,
    PLAN,
    POLICY_LOCAL,
    TCP,
    TYPE_LOAD_BALANCER,
    TYPE_NODE_PORT,
    UDP,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Pod,
    Service,
    ServicePort,
)
from kube.state import ClusterState, NodeView, StateError
from kube.tracker import NodeChanges, view_key

NODES = [Node.numbered(1), Node.numbered(2)]
WEB = ("ns1/web-1", "ns1/web-2", "ns1/web-3")
NODE2_WEB = {"ns1/web-2", "ns1/web-3"}
CONNECT_TIMEOUT_S = 0.2
UDP_IDLE_S = 1.5
EXTERNAL_IP = "198.18.64.20"
LB_IP = "198.18.32.20"


def _pods() -> list[Pod]:
    return [
        Pod("ns1", "web-1", {"app": "web", "node": "node1"}, "node1"),
        Pod("ns1", "web-2", {"app": "web", "node": "node2"}, "node2"),
        Pod("ns1", "web-3", {"app": "web", "node": "node2"}, "node2"),
        Pod("ns1", "client-a", {"app": "client"}, "node1"),
        Pod("ns1", "client-b", {"app": "client"}, "node2"),
    ]


def web(name: str, *ports: ServicePort, **fields) -> Service:
    fields.setdefault("selector", {"app": "web"})
    return Service("ns1", name, ports or (ServicePort(80, TCP, "", 8080),), **fields)


# --------------------------------------------------------------------------- without root


def _view(*services: Service, slices=()):
    state = ClusterState.build(NODES, _pods(), services, slices)
    return state, state.node_view("node1")


def test_portal_classes_refuse_without_endpoints_and_drop_without_usable_ones():
    _, view = _view(
        web("served", type=TYPE_NODE_PORT, external_ips=(EXTERNAL_IP,)),
        web("empty", selector={"app": "nothing"}, type=TYPE_NODE_PORT),
        web("itp", selector={"node": "node2"}, internal_traffic_policy=POLICY_LOCAL),
        web("etp", selector={"node": "node2"}, type=TYPE_NODE_PORT,
            external_traffic_policy=POLICY_LOCAL),
    )
    message = table_message(view)
    classes = portal_classes(message["services"], view.node_ips)
    sp = {s.service: s for s in view.services}
    node_ip = view.node_ip
    assert classes[(TCP, sp["served"].cluster_ip, 80)] == REDIRECT
    assert classes[(TCP, EXTERNAL_IP, 80)] == REDIRECT
    assert classes[(TCP, node_ip, sp["served"].node_port)] == REDIRECT
    # No endpoint anywhere: refused at once, as kube-proxy's REJECT.
    assert classes[(TCP, sp["empty"].cluster_ip, 80)] == REJECT
    assert classes[(TCP, node_ip, sp["empty"].node_port)] == REJECT
    # Endpoints exist, none local to node1 under internalTrafficPolicy Local: dropped.
    assert classes[(TCP, sp["itp"].cluster_ip, 80)] == DROP
    # externalTrafficPolicy Local, none local: pods and the node are redirected, outsiders dropped.
    assert classes[(TCP, sp["etp"].cluster_ip, 80)] == REDIRECT
    assert classes[(TCP, node_ip, sp["etp"].node_port)] == EXTERNAL_LOCAL


def _both_local_table(**selector):
    svc = web("both", type=TYPE_NODE_PORT, external_ips=(EXTERNAL_IP,), selector=selector,
              internal_traffic_policy=POLICY_LOCAL, external_traffic_policy=POLICY_LOCAL)
    state, view = _view(svc)
    table = Table(table_message(view))
    entry = table.entries[("ns1/both", TCP)]
    sp = view.services[-1]
    portals = {"cluster": (TCP, sp.cluster_ip, 80), "node": (TCP, view.node_ip, sp.node_port),
               "external": (TCP, EXTERNAL_IP, 80)}
    classes = {name: table.classes[key] for name, key in portals.items()}
    ips = {(state.pod("ns1", p).ip, 8080): p for p in ("web-1", "web-2", "web-3")}
    names = {kind: {ips[e] for e in entry.endpoints(*kind)}
             for kind in ((False, False), (True, False), (True, True))}
    return classes, names


def test_both_policies_local_with_local_and_remote_endpoints():
    classes, names = _both_local_table(app="web")
    assert set(classes.values()) == {REDIRECT}
    assert names[(False, False)] == {"web-1"}  # ClusterIP: node1's own endpoint
    assert names[(True, False)] == {"web-1"}  # outsiders of the NodePort and externalIP
    assert names[(True, True)] == {"web-1", "web-2", "web-3"}  # pods and the node: every one


def test_both_policies_local_with_only_remote_endpoints_drops_and_short_circuits():
    classes, names = _both_local_table(node="node2")
    assert classes == {"cluster": DROP, "node": EXTERNAL_LOCAL, "external": EXTERNAL_LOCAL}
    assert names[(False, False)] == names[(True, False)] == set()
    assert names[(True, True)] == {"web-2", "web-3"}


def test_both_policies_local_without_endpoints_rejects():
    classes, names = _both_local_table(app="nothing")
    assert set(classes.values()) == {REJECT}
    assert not any(names.values())


def test_load_balancer_ips_are_portals_and_their_source_ranges_fill_the_firewall_sets():
    lb = web("lb", type=TYPE_LOAD_BALANCER, load_balancer_ips=(LB_IP,),
             load_balancer_source_ranges=("198.18.0.200/32", "198.18.128.0/17", "0.0.0.0/0"))
    plain = web("plain", type=TYPE_LOAD_BALANCER, load_balancer_ips=("198.18.32.11",))
    _, view = _view(lb, plain)
    message = table_message(view)
    classes = portal_classes(message["services"], view.node_ips)
    assert classes[(TCP, LB_IP, 80)] == classes[(TCP, "198.18.32.11", 80)] == REDIRECT
    table = Table(message)
    entry, external = table.tcp[portal_key_bytes(LB_IP, 80)]
    assert entry.name == "ns1/lb" and external
    ranges = portal_source_ranges(message["services"])
    assert ranges == {(TCP, LB_IP, 80): ("198.18.0.200/32", "198.18.128.0/17", "0.0.0.0/0")}
    members: dict[str, set[str]] = {}
    for line in render_ipsets(classes, ranges).splitlines():
        words = line.split()
        if words[0] == "create" and not words[1].endswith("-NEW"):
            assert words[2] == ("hash:ip,port,net" if words[1] == SET_FIREWALL_SOURCES
                                else "hash:ip,port")
        if words[0] == "add":
            members.setdefault(words[1].removesuffix("-NEW"), set()).add(words[2])
    assert members[SET_FIREWALL] == {f"{LB_IP},tcp:80"}
    # ipset's spelling: a /32 bare, and 0.0.0.0/0 (which hash:ip,port,net refuses) in halves.
    assert members[SET_FIREWALL_SOURCES] == {f"{LB_IP},tcp:80,198.18.0.200",
                                             f"{LB_IP},tcp:80,198.18.128.0/17",
                                             f"{LB_IP},tcp:80,0.0.0.0/1",
                                             f"{LB_IP},tcp:80,128.0.0.0/1"}
    # Not redirected from outside the ranges (pods and the node too), then dropped.
    chains = render_chains(15001, PLAN.cluster_cidr)
    for key in (("nat", "KUBE-PORTALS-CONTAINER"), ("nat", "KUBE-PORTALS-HOST")):
        first_redirect = next(i for i, r in enumerate(chains[key]) if "-j REDIRECT" in r)
        fw = next(i for i, r in enumerate(chains[key]) if SET_FIREWALL_SOURCES in r)
        assert fw < first_redirect and chains[key][fw].endswith("-j RETURN")
    assert chains[("filter", "KUBE-PORTALS-FILTER")][-1].endswith("-j DROP")
    assert f"--match-set {SET_FIREWALL} dst,dst" in chains[("filter", "KUBE-PORTALS-FILTER")][-1]


def test_ipsets_hold_every_portal_in_the_sets_of_its_class():
    classes = {(TCP, "198.19.0.1", 80): REDIRECT, (UDP, "198.19.0.1", 53): REJECT,
               (TCP, "198.18.0.1", 30001): EXTERNAL_LOCAL, (TCP, "198.19.0.2", 80): DROP}
    payload = render_ipsets(classes)
    members: dict[str, set[str]] = {name: set() for name in SETS}
    for line in payload.splitlines():
        words = line.split()
        if words[0] == "add":
            members[words[1].removesuffix("-NEW")].add(words[2])
    assert members[SET_REDIRECT] == {"198.19.0.1,tcp:80", "198.18.0.1,tcp:30001"}
    assert members[SET_EXTERNAL_LOCAL] == {"198.18.0.1,tcp:30001"}
    assert members[SET_DROP] == {"198.19.0.2,tcp:80", "198.18.0.1,tcp:30001"}
    assert members[SET_REJECT] == {"198.19.0.1,udp:53"}
    # Filled aside, then swapped in: a packet never meets a half-written set.
    for name in SETS:
        assert f"swap {name}-NEW {name}" in payload.splitlines()


def test_rules_are_a_fixed_handful_whatever_the_number_of_services():
    pool = [p for p in ClusterState.build(NODES, _pods()).pods if p.name.startswith("web")]
    counts = []
    for n in (1, 1000):
        services, slices = synthetic_services(n, pool, 3)
        view = ClusterState.build(NODES, _pods(), services, slices).node_view("node1")
        chains = render_chains(15001, view.cluster_cidr)
        counts.append(sum(len(rules) for rules in chains.values()))
    assert counts[0] == counts[1] == 10


def test_rules_add_only_the_jumps_that_are_missing_and_see_tampering():
    chains = render_chains(15001, PLAN.cluster_cidr)
    fresh = render_rules(chains, "")
    assert fresh.count("\n-I ") == len(JUMPS)
    # What iptables-save would print once that payload is in.
    saved = []
    for table in ("filter", "nat"):
        saved.append(f"*{table}")
        saved += [f":{c} - [0:0]" for t, c in CHAINS if t == table]
        saved += [line.replace("-I ", "-A ", 1).replace(" 1 -m", " -m", 1)
                  for line in fresh.splitlines() if line.startswith("-I ") and
                  any(line.startswith(f"-I {b} ") for t, b, _, _ in JUMPS if t == table)]
        saved += [rule for (t, _), rules in chains.items() if t == table for rule in rules]
        saved.append("COMMIT")
    text = "\n".join(saved) + "\n"
    assert rules_intact(chains, text)
    assert render_rules(chains, text).count("\n-I ") == 0
    without_jump = "\n".join(line for line in saved if not line.startswith("-A PREROUTING"))
    assert not rules_intact(chains, without_jump)
    assert render_rules(chains, without_jump).count("\n-I ") == 1
    flushed = "\n".join(line for line in saved if not line.startswith(f"-A {PORTALS_FILTER}"))
    assert not rules_intact(chains, flushed)
    changed = text.replace("--to-ports 15001", "--to-ports 15002", 1)
    assert not rules_intact(chains, changed)
    assert any(line.startswith(f"-A {PORTALS_CONTAINER} ! -s {PLAN.cluster_cidr}")
               for line in chains[("nat", PORTALS_CONTAINER)])


def _entry(affinity_s=None, endpoints=(("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)),
           previous=None, outside=1) -> ServiceEntry:
    """An entry whose outside clients of external portals get the first `outside` endpoints."""
    every = [list(e) for e in endpoints]
    spec = {"name": "ns1/svc", "protocol": TCP, "internal": every,
            "external": every[:outside], "cluster": every, "affinity_s": affinity_s}
    return ServiceEntry(spec, previous)


def test_round_robin_puts_each_endpoint_first_in_turn_and_the_rest_behind():
    entry = _entry()
    orders = [entry.order(entry.internal, "198.18.129.2", 0.0) for _ in range(4)]
    assert [o[0][0] for o in orders] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]
    assert all(sorted(o) == sorted(entry.internal) for o in orders)  # every backend is a retry


def test_client_ip_affinity_holds_until_its_timeout_then_rotates():
    entry = _entry(affinity_s=10)
    first = entry.order(entry.internal, "198.18.129.2", 0.0)[0]
    entry.chosen("198.18.129.2", first, 0.0)
    assert {entry.order(entry.internal, "198.18.129.2", t)[0] for t in (1.0, 5.0, 9.9)} == {first}
    assert entry.order(entry.internal, "198.18.129.9", 1.0)[0] != first  # another client rotates
    assert entry.order(entry.internal, "198.18.129.2", 10.5)[0] != first
    entry.forget_expired(30.0)
    assert not entry.affinity


def test_a_new_table_keeps_rotation_affinity_and_counters_of_the_same_service():
    old = _entry(affinity_s=100)
    old.order(old.internal, "a", 0.0)
    old.chosen("a", ("10.0.0.2", 80), 0.0)
    old.chosen("b", ("10.0.0.3", 80), 0.0)
    old.counters.retries = 7
    new = _entry(affinity_s=100, endpoints=(("10.0.0.1", 80), ("10.0.0.2", 80)), previous=old)
    assert new.next == old.next and new.counters is old.counters
    assert set(new.affinity) == {"a"}  # b's backend left the Service
    assert not _entry(previous=old).affinity  # affinity switched off


def test_pods_and_the_node_reach_external_portals_through_the_cluster_wide_set():
    entry = _entry()
    assert entry.short_circuit  # the client's address decides
    assert entry.endpoints(external=True, in_cluster=False) == entry.external == [("10.0.0.1", 80)]
    assert entry.endpoints(external=True, in_cluster=True) == entry.cluster
    assert len(entry.cluster) == 3
    assert entry.endpoints(external=False, in_cluster=False) == entry.internal
    assert not _entry(outside=3).short_circuit  # everyone gets the same set


def test_table_finds_a_portal_by_the_bytes_so_original_dst_returns():
    state, view = _view(web("a", type=TYPE_NODE_PORT, external_ips=(EXTERNAL_IP,)),
                        web("b", ServicePort(53, UDP, "", 8080)))
    table = Table(table_message(view))
    a, b = state.service_obj("ns1", "a"), state.service_obj("ns1", "b")
    sockaddr = struct.pack("!HH4s8x", socket.AF_INET, 80, socket.inet_aton(a.cluster_ip))
    entry, external = table.tcp[sockaddr[2:8]]
    assert (entry.name, external) == ("ns1/a", False)
    assert table.tcp[portal_key_bytes(EXTERNAL_IP, 80)][1] is True
    assert table.tcp[portal_key_bytes(view.node_ip, a.ports[0].node_port)][1] is True
    assert portal_key_bytes(b.cluster_ip, 53) in table.udp
    assert portal_key_bytes(b.cluster_ip, 53) not in table.tcp
    assert table.in_cluster("198.18.129.7") and table.in_cluster(view.node_ip)
    assert not table.in_cluster(PLAN.external_client_ip)


def test_changed_udp_portals_names_every_udp_portal_whose_verdict_moved():
    old = {(UDP, "198.19.0.1", 53): REJECT, (UDP, "198.19.0.2", 53): REDIRECT,
           (UDP, "198.19.0.3", 53): REDIRECT, (TCP, "198.19.0.4", 80): REJECT}
    new = {(UDP, "198.19.0.1", 53): REDIRECT, (UDP, "198.19.0.3", 53): REDIRECT,
           (UDP, "198.19.0.5", 53): REDIRECT, (TCP, "198.19.0.4", 80): REDIRECT}
    assert changed_udp_portals(old, new) == [["198.19.0.1", 53], ["198.19.0.2", 53],
                                             ["198.19.0.5", 53]]


def _table_view(table: Table) -> tuple:
    """What a table serves: each portal's entry, kind and class; each entry's endpoints."""
    portals = {("TCP", raw): (e.name, e.protocol, ext) for raw, (e, ext) in table.tcp.items()}
    portals |= {("UDP", raw): (e.name, e.protocol, ext) for raw, (e, ext) in table.udp.items()}
    entries = {k: (e.internal, e.external, e.cluster, e.affinity_s)
               for k, e in table.entries.items()}
    return portals, entries, dict(table.classes), set(table.sticky)


@pytest.mark.parametrize("seed", range(4))
def test_a_patched_table_serves_as_the_whole_table_of_the_same_entries(seed):
    """Random changes as deltas (Table.patch) against the whole table built each time,
    with Services sharing load-balancer IPs and ports (the later in the table's order
    holds the portal); the UDP portals a delta reports changed are those whose class
    moved."""
    import random

    from kube.tracker import ChangeTracker
    from tests.changes import Oracle, random_step

    rng = random.Random(seed)
    oracle, tracker, counter = Oracle(NODES), ChangeTracker(NODES), [0]
    table = Table(table_message(tracker.node_view("node1")))
    contested = 0
    for _ in range(250):
        kwargs, pods, services, slices = random_step(rng, oracle, tracker, counter)
        kwargs["services"] = [replace(svc, load_balancer_ips=(f"198.18.32.{rng.randint(1, 3)}",))
                              if svc.type == TYPE_LOAD_BALANCER else svc
                              for svc in kwargs["services"]]
        services.update({svc.key: svc for svc in kwargs["services"]})
        try:
            changes = tracker.apply(**kwargs)["node1"]
        except StateError:
            continue
        oracle.pods, oracle.services, oracle.slices = pods, services, slices
        old_classes = dict(table.classes)
        specs = table_message(NodeView("node1", "", "", "", "", (), tuple(
            changes.updated.values())))["services"]
        removed = [[v.name, v.protocol] for v in changes.removed.values()
                   if v.protocol in (TCP, UDP)]
        _keys, udp_changed = table.patch(specs, removed)
        whole = Table(table_message(tracker.node_view("node1")))
        assert _table_view(table) == _table_view(whole)
        assert udp_changed == changed_udp_portals(old_classes, whole.classes)
        contested += bool(table.claims.contested)
    assert contested


def test_netlink_attributes_nest_and_pad_to_four_bytes():
    inner = _nla(2, b"\x01\x02\x03") + _nla(3, b"\x00\x35")
    outer = _nla(1 | 0x8000, inner)
    assert len(inner) % 4 == 0 and len(outer) == 4 + len(inner)
    parsed = _nla_parse(_nla_parse(outer)[1])
    assert parsed == {2: b"\x01\x02\x03", 3: b"\x00\x35"}


def test_render_shows_sets_rules_and_table_and_the_deviation_is_declared():
    _, view = _view(web("a"))
    text = UserspaceDataplane().render(view)
    assert f"swap {SET_REDIRECT}-NEW {SET_REDIRECT}" in text
    assert "-j REDIRECT --to-ports 15001" in text and '"name": "ns1/a"' in text
    dp = UserspaceDataplane()
    assert "source IP" in dp.deviations["clusterip_preserves_client_pod_ip"]
    assert set(dp.deviations) == {"clusterip_preserves_client_pod_ip",
                                  "external_traffic_policy_local",
                                  "load_balancer_external_traffic_policy_local",
                                  "connections_survive_proxy_restart",
                                  "source_ip_per_policy"}


# --------------------------------------------------------------------------- a real cluster


@dataclass
class Lab:
    cluster: NetnsCluster
    dp: UserspaceDataplane
    state: ClusterState
    services: tuple = field(default=())

    def apply(self, services, slices=()) -> list:
        self.state = ClusterState.build(NODES, self.state.pods, services, slices,
                                        previous=self.state)
        return [self.dp.sync(n, self.state.node_view(n.name)) for n in self.cluster.nodes]

    def update(self, services, slices=()) -> list:
        """As `apply`, but each node gets only its changed views, through `update`."""
        old = self.state
        self.state = ClusterState.build(NODES, old.pods, services, slices, previous=old)
        out = []
        for n in self.cluster.nodes:
            was = {view_key(v): v for v in old.node_view(n.name).services}
            now = {view_key(v): v for v in self.state.node_view(n.name).services}
            out.append(self.dp.update(n, NodeChanges(
                n.name, updated={k: v for k, v in now.items() if was.get(k) != v},
                removed={k: v for k, v in was.items() if k not in now})))
        return out

    def netns(self, source: str) -> str:
        if source == "external":
            return self.cluster.external_netns
        if source.startswith("node/"):
            return self.cluster.node(source[5:]).netns
        return self.cluster.pod_netns(*source.split("/"))

    def probe(self, source: str, ip: str, port: int, **kwargs) -> ProbeResult:
        return in_netns(self.netns(source), probe, ip, port, **kwargs)

    def ip(self, service: str) -> str:
        return self.state.service_obj("ns1", service).cluster_ip

    def node_port(self, service: str, protocol: str = TCP) -> int:
        return next(p.node_port for p in self.state.service_obj("ns1", service).ports
                    if p.protocol == protocol)

    def stats(self, node: str = "node1", services: bool = False) -> dict:
        return self.dp.stats(self.cluster.node(node), services)

    def serve_only(self, node: str, without: set[tuple[str, int, str]]) -> None:
        """Tell a node's echo agent to drop some (pod, port, protocol) listeners."""
        specs = []
        for rec in self.cluster.pods.values():
            if rec.node == node:
                ports = [(p, proto) for p, proto in rec.ports if (rec.key, p, proto) not in without]
                specs.append(BackendSpec(rec.key, rec.netns, rec.ip, ports))
        self.cluster.agent(node).set_backends(specs)

    def serve_all(self) -> None:
        self.cluster.set_pods(list(self.state.pods))  # tells every agent its full set again


def outcomes(result: ProbeResult) -> Counter:
    return Counter(s.outcome for s in result.samples)


def backends(result: ProbeResult) -> Counter:
    return Counter(s.backend for s in result.samples if s.outcome == OK)


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    dp = UserspaceDataplane(connect_timeout_s=CONNECT_TIMEOUT_S, udp_idle_timeout_s=UDP_IDLE_S)
    with NetnsCluster.create(len(NODES)) as cluster:
        state = ClusterState.build(NODES, _pods())
        cluster.set_pods(list(state.pods))
        installed = []
        try:
            for node in cluster.nodes:
                dp.install(node)
                installed.append(node)
            yield Lab(cluster, dp, state)
        finally:
            for node in installed:
                dp.uninstall(node)


@pytest.mark.root
def test_round_robin_spreads_tcp_and_udp_evenly_from_both_nodes(lab):
    lab.apply([web("rr", ServicePort(80, TCP, "tcp", 8080), ServicePort(80, UDP, "udp", 8080))])
    for source, proto in (("ns1/client-a", TCP), ("ns1/client-b", TCP), ("ns1/client-a", UDP)):
        result = lab.probe(source, lab.ip("rr"), 80, protocol=proto, count=30, payload=b"x" * 100)
        assert outcomes(result) == {OK: 30}, (source, proto, outcomes(result))
        assert backends(result) == {b: 10 for b in WEB}, (source, proto, backends(result))


def _speak_first(ip: str, port: int, payload: bytes) -> tuple[bytes, bytes]:
    """Send everything right after connect, half-close, then read until the backend's EOF."""
    with socket.create_connection((ip, port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        buf = bytearray()
        while chunk := sock.recv(1 << 16):
            buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    return line, rest


@pytest.mark.root
def test_client_that_speaks_first_and_half_closes_gets_every_byte_back(lab):
    lab.apply([web("first")])
    for size in (10, 4 << 20):  # a DNS-sized query, and more than every socket buffer holds
        payload = os.urandom(size)
        line, echoed = in_netns(lab.netns("ns1/client-a"), _speak_first, lab.ip("first"), 80,
                                payload)
        assert line.split(b" ")[0].decode() in WEB
        assert echoed == payload, f"{size} bytes sent, {len(echoed)} came back"


@pytest.mark.root
def test_node_processes_and_the_external_client_reach_every_portal(lab):
    svc = web("edge", ServicePort(80, TCP, "tcp", 8080), ServicePort(80, UDP, "udp", 8080),
              type=TYPE_NODE_PORT, external_ips=(EXTERNAL_IP,))
    lab.apply([svc])
    checks = [("node/node1", lab.ip("edge"), 80, TCP), ("node/node2", lab.ip("edge"), 80, UDP),
              ("external", EXTERNAL_IP, 80, TCP), ("external", EXTERNAL_IP, 80, UDP)]
    for node in ("node1", "node2"):
        node_ip = lab.state.node(node).ip
        checks += [("external", node_ip, lab.node_port("edge", TCP), TCP),
                   ("external", node_ip, lab.node_port("edge", UDP), UDP),
                   ("ns1/client-a", node_ip, lab.node_port("edge", TCP), TCP)]
    for source, ip, port, proto in checks:
        result = lab.probe(source, ip, port, protocol=proto, count=9, payload=b"ping")
        assert outcomes(result) == {OK: 9}, (source, ip, port, proto, outcomes(result))
        assert set(backends(result)) == set(WEB), (source, ip, port, proto, backends(result))


@pytest.mark.root
def test_service_without_endpoints_is_refused_at_once(lab):
    svc = web("nothing", ServicePort(80, TCP, "tcp", 8080), ServicePort(80, UDP, "udp", 8080),
              type=TYPE_NODE_PORT, selector={"app": "none"})
    lab.apply([svc])
    node2 = lab.state.node("node2").ip
    for source, ip, port, proto in (("ns1/client-a", lab.ip("nothing"), 80, TCP),
                                    ("ns1/client-a", lab.ip("nothing"), 80, UDP),
                                    ("node/node1", lab.ip("nothing"), 80, TCP),
                                    ("external", node2, lab.node_port("nothing", TCP), TCP),
                                    ("external", node2, lab.node_port("nothing", UDP), UDP)):
        result = lab.probe(source, ip, port, protocol=proto, count=5, timeout=2.0)
        assert outcomes(result) == {REFUSED: 5}, (source, proto, outcomes(result))
        assert max(s.latency_us for s in result.samples) < 500_000


@pytest.mark.root
def test_a_refusing_backend_costs_a_retry_not_a_connection(lab):
    lab.apply([web("retry", ServicePort(80, TCP, "tcp", 8080), ServicePort(80, UDP, "udp", 8080))])
    before = lab.stats("node1")
    lab.serve_only("node1", {("ns1/web-1", 8080, TCP), ("ns1/web-1", 8080, UDP)})
    try:
        tcp = lab.probe("ns1/client-a", lab.ip("retry"), 80, count=30)
        udp = lab.probe("ns1/client-a", lab.ip("retry"), 80, protocol=UDP, count=30)
    finally:
        lab.serve_all()
    after = lab.stats("node1")
    for result in (tcp, udp):
        assert outcomes(result) == {OK: 30}, outcomes(result)
        assert set(backends(result)) == NODE2_WEB, backends(result)
    # Round robin starts at web-1 on every third connection or session: each costs one retry.
    assert after["retries"] - before["retries"] == 20
    assert after["failed"] == before["failed"]


def _drop_syns(lab: Lab, pod: str, add: bool) -> None:
    """The pod stops answering new connections (SYNs vanish), as a wedged process would."""
    rule = ["INPUT", "-p", "tcp", "--dport", "8080", "--syn", "-j", "DROP"]
    in_netns(lab.netns(pod), subprocess.run, ["iptables-nft", "-A" if add else "-D", *rule],
             check=True, capture_output=True)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.root
def test_a_silent_backend_costs_one_connect_timeout(lab):
    lab.apply([web("silent")])
    before = lab.stats("node1")
    _drop_syns(lab, "ns1/web-2", add=True)
    try:
        result = lab.probe("ns1/client-a", lab.ip("silent"), 80, count=30, timeout=3.0)
    finally:
        _drop_syns(lab, "ns1/web-2", add=False)
    after = lab.stats("node1")
    assert outcomes(result) == {OK: 30}, outcomes(result)
    assert set(backends(result)) == {"ns1/web-1", "ns1/web-3"}
    # Ten started at web-2; a live backend slower than the timeout on a loaded host adds one.
    assert 10 <= after["retries"] - before["retries"] <= 12
    slow = sorted(s.latency_us for s in result.samples)[-10:]
    assert min(slow) >= CONNECT_TIMEOUT_S * 1e6 * 0.9, slow  # the ten that waited for web-2


@pytest.mark.root
def test_no_backend_answering_resets_the_client_and_counts_a_failure(lab):
    lab.apply([web("dead", selector={"node": "node1"})])
    before = lab.stats("node1")
    lab.serve_only("node1", {("ns1/web-1", 8080, TCP)})
    try:
        result = lab.probe("ns1/client-a", lab.ip("dead"), 80, count=3)
    finally:
        lab.serve_all()
    assert outcomes(result)[OK] == 0 and max(s.latency_us for s in result.samples) < 500_000
    assert lab.stats("node1")["failed"] - before["failed"] == 3


@pytest.mark.root
def test_client_ip_affinity_sticks_per_client_until_its_timeout(lab):
    lab.apply([web("sticky", session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=1)])
    first = lab.probe("ns1/client-a", lab.ip("sticky"), 80, count=10)
    assert outcomes(first) == {OK: 10} and len(backends(first)) == 1, backends(first)
    other = lab.probe("node/node1", lab.ip("sticky"), 80, count=5)
    assert len(backends(other)) == 1 and backends(other).keys() != backends(first).keys()
    time.sleep(1.5)
    again = lab.probe("ns1/client-a", lab.ip("sticky"), 80, count=5)
    assert len(backends(again)) == 1 and backends(again).keys() != backends(first).keys()


@pytest.mark.root
def test_established_connections_survive_table_updates_and_endpoint_removal(lab):
    lab.apply([web("steady")])
    pids = [lab.dp.proxy_pid(n) for n in lab.cluster.nodes]
    state = {}

    def churn(i: int) -> None:
        kept = [b for b in WEB if b != state.get("backend")] if i >= 5 else list(WEB)
        slices = [EndpointSlice("ns1", "steady-1", "steady", tuple(
            Endpoint((lab.state.pod(*b.split("/")).ip,), node_name=lab.state.pod(*b.split("/")).node_name,
                     pod_name=b.split("/")[1]) for b in kept), (EndpointPort(8080, TCP),))]
        extra = [web(f"churn-{j}") for j in range(i % 4)]
        lab.apply([web("steady", selector=None), *extra], slices)

    def talk(ip: str) -> tuple[str, int]:
        with socket.create_connection((ip, 80), timeout=5) as sock:
            buf = b""
            while b"\n" not in buf:
                buf += sock.recv(256)
            state["backend"] = buf.split(b" ")[0].decode()
            for i in range(20):
                message = b"%06d" % i
                sock.sendall(message)
                got = b""
                while len(got) < len(message):
                    got += sock.recv(len(message) - len(got))
                assert got == message
                churn(i)
        return state["backend"], 20

    backend, rounds = in_netns(lab.netns("ns1/client-a"), talk, lab.ip("steady"))
    assert rounds == 20 and backend in WEB
    assert [lab.dp.proxy_pid(n) for n in lab.cluster.nodes] == pids, "the proxy was restarted"
    # The connection's backend left the Service at round 5: new connections avoid it.
    after = lab.probe("ns1/client-a", lab.ip("steady"), 80, count=12)
    assert outcomes(after) == {OK: 12} and backend not in backends(after)


@pytest.mark.root
def test_udp_session_leaves_a_removed_backend_and_expires_when_idle(lab):
    svc = web("udp", ServicePort(53, UDP, "", 8080), selector=None)
    everyone = [Endpoint((lab.state.pod("ns1", n).ip,), node_name=lab.state.pod("ns1", n).node_name,
                         pod_name=n) for n in ("web-1", "web-2", "web-3")]

    def slice_of(eps):
        return [EndpointSlice("ns1", "udp-1", "udp", tuple(eps), (EndpointPort(8080, UDP),))]

    lab.apply([svc], slice_of(everyone))
    ip = lab.ip("udp")
    first = lab.probe("ns1/client-a", ip, 53, protocol=UDP, count=5, source_port=40555)
    assert outcomes(first) == {OK: 5} and len(backends(first)) == 1, backends(first)
    gone = next(iter(backends(first)))
    sync = lab.apply([svc], slice_of([e for e in everyone if f"ns1/{e.pod_name}" != gone]))
    assert sync[0].extra["udp_sessions_closed"] >= 1
    moved = lab.probe("ns1/client-a", ip, 53, protocol=UDP, count=5, source_port=40555)
    assert outcomes(moved) == {OK: 5} and len(backends(moved)) == 1 and gone not in backends(moved)
    assert lab.stats("node1")["udp_sessions"] >= 1
    deadline = time.monotonic() + UDP_IDLE_S + 3
    while lab.stats("node1")["udp_sessions"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lab.stats("node1")["udp_sessions"] == 0, "idle UDP sessions were never closed"


@pytest.mark.root
def test_udp_flows_of_a_portal_that_changed_verdict_are_cleared(lab):
    svc = web("flip", ServicePort(53, UDP, "", 8080))
    for _ in range(2):  # the second apply changes nothing: the next one changes only flip
        lab.apply([replace(svc, selector={"app": "none"})])
    ip = lab.ip("flip")
    refused = lab.probe("ns1/client-a", ip, 53, protocol=UDP, count=2, source_port=40556)
    assert outcomes(refused) == {REFUSED: 2}
    sync = lab.apply([svc])
    assert sync[0].extra["conntrack_deletes"] == 1 and sync[0].changed == 1
    served = lab.probe("ns1/client-a", ip, 53, protocol=UDP, count=3, source_port=40556)
    assert outcomes(served) == {OK: 3}, outcomes(served)


@pytest.mark.root
def test_updates_add_serve_move_and_remove_a_service(lab):
    """Through `update` alone: a new Service is served, its UDP session leaves a backend
    the next update removes (the proxy visits only that entry's sessions), a UDP portal
    whose verdict moves loses its flows, and a removed Service is refused."""
    lab.apply([web("base")])  # a full sync first: update builds on it
    svc = web("inc", ServicePort(53, UDP, "", 8080), selector=None)
    everyone = [Endpoint((lab.state.pod("ns1", n).ip,), node_name=lab.state.pod("ns1", n).node_name,
                         pod_name=n) for n in ("web-1", "web-2", "web-3")]

    def slice_of(eps):
        return [EndpointSlice("ns1", "inc-1", "inc", tuple(eps), (EndpointPort(8080, UDP),))]

    added = lab.update([web("base"), svc], slice_of(everyone))
    assert not added[0].full and added[0].changed == 1  # one member: the ClusterIP portal
    ip = lab.ip("inc")
    first = lab.probe("ns1/client-a", ip, 53, protocol=UDP, count=5, source_port=40557)
    assert outcomes(first) == {OK: 5} and len(backends(first)) == 1, backends(first)
    gone = next(iter(backends(first)))
    moved = lab.update([web("base"), svc],
                       slice_of([e for e in everyone if f"ns1/{e.pod_name}" != gone]))
    assert moved[0].extra["udp_sessions_closed"] >= 1 and moved[0].changed == 0
    after = lab.probe("ns1/client-a", ip, 53, protocol=UDP, count=5, source_port=40557)
    assert outcomes(after) == {OK: 5} and gone not in backends(after)
    emptied = lab.update([web("base"), svc], slice_of([]))
    assert emptied[0].extra["conntrack_deletes"] == 1 and emptied[0].changed == 2
    refused = lab.probe("ns1/client-a", ip, 53, protocol=UDP, count=2, source_port=40557)
    assert outcomes(refused) == {REFUSED: 2}, outcomes(refused)
    removed = lab.update([web("base")])
    assert not removed[0].full and removed[0].changed == 1
    assert lab.probe("ns1/client-a", lab.ip("base"), 80, count=3).summary()["outcomes"] == {
        OK: 3}
    stats = lab.dp.stats(lab.cluster.node("node1"))
    assert stats["services"] == 1


@pytest.mark.root
def test_external_traffic_policy_local_drops_outsiders_but_serves_pods(lab):
    lab.apply([web("local", type=TYPE_NODE_PORT, external_traffic_policy=POLICY_LOCAL,
                   selector={"node": "node2"})])
    port = lab.node_port("local")
    node1, node2 = lab.state.node("node1").ip, lab.state.node("node2").ip
    through_node2 = lab.probe("external", node2, port, count=10)
    assert outcomes(through_node2) == {OK: 10} and set(backends(through_node2)) == NODE2_WEB
    through_node1 = lab.probe("external", node1, port, count=2, timeout=0.5)
    assert outcomes(through_node1) == {"timeout": 2}, outcomes(through_node1)
    pod = lab.probe("ns1/client-a", node1, port, count=10)
    assert outcomes(pod) == {OK: 10} and set(backends(pod)) == NODE2_WEB


@pytest.mark.root
def test_the_backend_sees_the_node_not_the_client(lab):
    lab.apply([web("who")])
    result = lab.probe("ns1/client-a", lab.ip("who"), 80, count=6)
    seen = {s.seen_client.rsplit(":", 1)[0] for s in result.samples}
    client = lab.state.pod("ns1", "client-a").ip
    assert client not in seen and seen <= {PLAN.pod_gateway, lab.state.node("node1").ip}, seen


def _node_text(lab: Lab, node: str) -> tuple[str, str]:
    n = lab.cluster.node(node)
    return (n.run(["iptables-nft-save"]).stdout, n.run(["ipset", "list", "-n"]).stdout)


@pytest.mark.root
def test_sync_repairs_rules_sets_and_the_proxy_others_removed(lab):
    lab.apply([web("repair")])
    node = lab.cluster.node("node1")
    quiet = lab.dp.sync(node, lab.state.node_view("node1"))
    assert quiet.extra["rules_rewritten"] is False and quiet.extra["proxy_spawned"] is False
    node.run(["iptables-nft", "-t", "nat", "-F"])
    node.run(["iptables-nft", "-t", "nat", "-X"])
    node.run(["iptables-nft", "-t", "filter", "-D", "INPUT", "-m", "conntrack", "--ctstate", "NEW",
              "-m", "comment", "--comment", "kubernetes service portals (userspace)",
              "-j", PORTALS_FILTER])
    node.run(["ipset", "flush", SET_REDIRECT])
    pid = lab.dp.proxy_pid(node)
    os.kill(pid, signal.SIGKILL)
    broken = lab.probe("ns1/client-a", lab.ip("repair"), 80, count=2, timeout=0.5)
    assert outcomes(broken)[OK] == 0
    repaired = lab.dp.sync(node, lab.state.node_view("node1"))
    assert repaired.extra["proxy_spawned"] and repaired.extra["rules_rewritten"]
    assert lab.dp.proxy_pid(node) not in (None, pid)
    result = lab.probe("ns1/client-a", lab.ip("repair"), 80, count=9)
    assert outcomes(result) == {OK: 9}
    saved, _ = _node_text(lab, "node1")
    assert saved.count(f"-j {PORTALS_FILTER}") == 3  # INPUT, FORWARD, OUTPUT, never twice


@pytest.mark.root
def test_uninstall_stops_the_proxy_and_removes_everything_install_brings_it_back(lab):
    lab.apply([web("again")])
    node = lab.cluster.node("node1")
    pid = lab.dp.proxy_pid(node)
    log = lab.dp._log_path(node)
    assert os.path.exists(log)
    lab.dp.uninstall(node)
    try:
        assert lab.dp.proxy_pid(node) is None and _gone(pid)
        saved, sets = _node_text(lab, "node1")
        assert "KUBE-PORTALS" not in saved and not sets.strip(), (saved, sets)
        assert not os.path.exists(log)
        gone = lab.probe("ns1/client-a", lab.ip("again"), 80, count=2, timeout=0.5)
        assert outcomes(gone)[OK] == 0
    finally:
        lab.dp.install(node)
        lab.dp.sync(node, lab.state.node_view("node1"))
    back = lab.probe("ns1/client-a", lab.ip("again"), 80, count=6)
    assert outcomes(back) == {OK: 6}


@pytest.mark.root
def test_thousands_of_services_are_served_from_one_dict(lab):
    pool = [p for p in lab.state.pods if p.name.startswith("web")]
    services, slices = synthetic_services(3000, pool, 3)
    stats = lab.apply(services, slices)
    assert stats[0].rules == 15  # 10 chain rules and 5 jumps, as for one Service
    node_ports = sum(svc.type == TYPE_NODE_PORT for svc in services)
    assert stats[0].extra["portals_redirect"] == 3000 + node_ports
    for svc in (services[0], services[-1]):
        ip = lab.state.service_obj(svc.namespace, svc.name).cluster_ip
        result = lab.probe("ns1/client-a", ip, 80, count=6)
        assert outcomes(result) == {OK: 6}, (svc.name, outcomes(result))
    assert lab.stats("node1")["services"] == 3000
    lab.apply([])


@pytest.mark.root
def test_install_names_the_node_when_its_proxy_cannot_start():
    dp = UserspaceDataplane(proxy_port=70000)  # not a port: the proxy exits at once
    with NetnsCluster.create(1, agents=False) as cluster:
        node = cluster.nodes[0]
        try:
            with pytest.raises(DataplaneError, match=r"node1.*exited"):
                dp.install(node)
        finally:
            dp.uninstall(node)
        assert not os.path.exists(dp._log_path(node))


@pytest.mark.root
def test_the_proxy_exits_when_its_node_namespace_is_deleted():
    dp = UserspaceDataplane()
    with NetnsCluster.create(1, agents=False) as cluster:
        node = cluster.nodes[0]
        dp.install(node)
        pid = dp.proxy_pid(node)
        netns_delete(node.netns)
        deadline = time.monotonic() + 5
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), "the proxy outlived its node"
        os.unlink(dp._log_path(node))  # uninstall cannot enter a deleted namespace


@pytest.mark.root
def test_a_proxy_started_with_other_settings_is_replaced_at_the_next_sync(lab):
    lab.apply([web("settings")])
    node = lab.cluster.node("node2")
    pid = lab.dp.proxy_pid(node)
    other = UserspaceDataplane(connect_timeout_s=0.7, udp_idle_timeout_s=UDP_IDLE_S)
    try:
        stats = other.sync(node, lab.state.node_view("node2"))
        assert stats.extra["proxy_spawned"] and _gone(pid)
        assert lab.dp.proxy_pid(node) != pid
    finally:
        stats = lab.dp.sync(node, lab.state.node_view("node2"))
    assert stats.extra["proxy_spawned"]
    result = lab.probe("ns1/client-b", lab.ip("settings"), 80, count=6)
    assert outcomes(result) == {OK: 6}
