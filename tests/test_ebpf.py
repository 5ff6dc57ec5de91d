"""The eBPF/XDP data plane: layouts and rendering, the XDP programs on crafted packets, and
real traffic through a two-node namespace cluster.

Three layers, cheapest first:
- no root: the render (one map element per frontend), naming, header inlining;
- root, no namespaces: BPF_PROG_TEST_RUN pushes hand-built packets through the real
  programs with real maps; every output checksum is recomputed from scratch;
- root, a NetnsCluster (2 nodes, echo agents): pods, node processes and the external
  client talk through the data plane; teardown and gc must leave nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import replace

import pytest

from bpf import loader, maps, syscall, xdpdrops
from dataplanes import ebpf
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
from kube.state import ClusterState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XDP_DROP, XDP_PASS = 1, 2
EXTERNAL = "198.18.0.200"
EXTERNAL_IP = "198.18.64.10"
NODES = [Node.numbered(1), Node.numbered(2)]
PODS = [
    Pod("ns1", "client-a", {"app": "client", "hairpin": "yes"}, node_name="node1"),
    Pod("ns1", "web-1", {"app": "web"}, node_name="node1"),
    Pod("ns1", "web-2", {"app": "web", "tier": "b"}, node_name="node2"),
    Pod("ns1", "web-3", {"app": "web", "tier": "b"}, node_name="node2"),
    Pod("ns1", "client-b", {"app": "client"}, node_name="node2"),
]


def services(**web) -> list[Service]:
    return [
        Service("ns1", "web", (ServicePort(80, TCP, "http", 8080), ServicePort(80, UDP, "udp", 8080)),
                selector={"app": "web"}, **web),
        Service("ns1", "empty", (ServicePort(80, TCP, "", 8080), ServicePort(81, UDP, "u", 8080)),
                selector={"app": "none"}),
        Service("ns1", "self", (ServicePort(80, TCP, "", 8080),), selector={"hairpin": "yes"}),
        Service("ns1", "np", (ServicePort(80, TCP, "", 8080),), type=TYPE_NODE_PORT,
                selector={"app": "web"}, external_ips=(EXTERNAL_IP,)),
        Service("ns1", "local", (ServicePort(80, TCP, "", 8080),), type=TYPE_NODE_PORT,
                selector={"tier": "b"}, external_traffic_policy=POLICY_LOCAL),
        Service("ns1", "sticky", (ServicePort(80, TCP, "", 8080),), selector={"app": "web"},
                session_affinity=AFFINITY_CLIENT_IP, affinity_timeout_s=1),
    ]


def state_of(svcs=None, pods=PODS) -> ClusterState:
    return ClusterState.build(NODES, pods, services() if svcs is None else svcs)


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root for BPF and network namespaces")


# --------------------------------------------------------------------------- no root


def test_render_writes_one_element_per_frontend_and_keeps_ids():
    state = state_of()
    view = state.node_view("node1")
    st = ebpf._Node("t", 0, None)
    first = ebpf._Render(st, view)
    frontends = {k: v for k, v in first.entries.items() if k != ebpf.CANARY_KEY}
    # web TCP+UDP, empty TCP+UDP, self, np (ClusterIP, node IP, externalIP), local
    # (ClusterIP, node IP all + node IP internal), sticky
    assert len(frontends) == 2 + 2 + 1 + 3 + 3 + 1
    web = state.service_obj("ns1", "web").cluster_ip
    key = maps.LB4_KEY.pack(socket.inet_aton(web), socket.htons(80), 0, socket.IPPROTO_TCP,
                            maps.LB_SCOPE_ALL, 0)
    count, flags, svc_id, timeout, _ = maps.LB4_HEADER.unpack_from(frontends[key])
    assert (count, flags, timeout) == (3, 0, 0)
    st.svc_ids = first.svc_ids
    again = ebpf._Render(st, view)
    assert again.entries == first.entries  # same ids, same bytes: an unchanged sync writes nothing


def test_render_marks_policy_drops_and_overflows_past_the_inline_backends():
    node3 = Node.numbered(3)
    pods = [Pod("ns1", f"web-{i}", {"app": "web"}, node_name="node2") for i in range(11)]
    svcs = [
        Service("ns1", "big", (ServicePort(80, TCP, "", 8080),), selector={"app": "web"}),
        Service("ns1", "local", (ServicePort(80, TCP, "", 8080),), type=TYPE_NODE_PORT,
                selector={"app": "web"}, external_traffic_policy=POLICY_LOCAL),
    ]
    state = ClusterState.build([*NODES, node3], pods, svcs)
    rows = {}
    render = ebpf._Render(ebpf._Node("t", 0, None), state.node_view("node1"))
    for k, v in render.entries.items():
        address, port, slot, proto, scope, _ = maps.LB4_KEY.unpack(k)
        rows[(socket.inet_ntoa(address), socket.ntohs(port), slot, scope)] = maps.LB4_HEADER.unpack_from(v)
    big = state.service_obj("ns1", "big").cluster_ip
    assert rows[(big, 80, 0, 0)][0] == 11
    assert {slot for (ip, _, slot, _) in rows if ip == big} == {0, 9, 10, 11}
    assert len(render.slot_keys) == 9  # big, local ClusterIP, local NodePort (in-cluster scope)
    # node1 has no endpoint of "local": external traffic is dropped, in-cluster goes everywhere
    node_port = state.service_obj("ns1", "local").ports[0].node_port
    count, flags, *_ = rows[("198.18.0.1", node_port, 0, maps.LB_SCOPE_ALL)]
    assert count == 0 and flags & maps.SVC_F_DROP_EMPTY
    assert rows[("198.18.0.1", node_port, 0, maps.LB_SCOPE_INTERNAL)][0] == 11


def _with_ranges_and_external_ips(rng, services: list[Service]) -> list[Service]:
    """tests/changes.py's Services, their load-balancer IPs from a small pool (so Services
    share them), some given loadBalancerSourceRanges or an externalIP."""
    out = []
    for svc in services:
        if svc.type == TYPE_LOAD_BALANCER:
            svc = replace(svc, load_balancer_ips=(f"198.18.32.{rng.randint(1, 2)}",))
        if svc.type == TYPE_LOAD_BALANCER and rng.random() < 0.5:
            svc = replace(svc, load_balancer_source_ranges=tuple(
                rng.sample(["198.18.0.0/24", "198.18.0.200/32", "10.0.0.0/8"], rng.randint(1, 2))))
        if svc.type != "ExternalName" and rng.random() < 0.2:
            svc = replace(svc, external_ips=(f"198.18.64.{rng.randint(1, 4)}",))
        out.append(svc)
    return out


def _memory(st: ebpf._Node) -> dict:
    return {"maps": ebpf.normalise_maps(st.entries.items(), st.ranges),
            "routes": st.destinations(PLAN.service_cidr), "health": st.health_view().services}


@pytest.mark.parametrize("seed", range(6))
def test_applied_changes_leave_the_memory_a_whole_plan_makes(seed):
    """The node memory an update keeps (elements, shared keys, range keys, routes, health
    ports) equals a plan of the whole view from nothing, after every random change; and
    a sync's plan over the kept memory changes nothing."""
    import random

    from kube.tracker import ChangeTracker
    from tests.changes import Oracle, random_step

    rng = random.Random(seed)
    oracle = Oracle(NODES)
    tracker = ChangeTracker(NODES)
    counter = [0]
    st = ebpf._Node("t", 0, None)
    st.plan(tracker.node_view("node1"), ebpf._Delta())
    contested = 0
    for _ in range(250):
        kwargs, pods, services, slices = random_step(rng, oracle, tracker, counter)
        kwargs["services"] = _with_ranges_and_external_ips(rng, kwargs["services"])
        services.update({s.key: s for s in kwargs["services"]})
        try:
            changes = tracker.apply(**kwargs)["node1"]
        except ebpf_state_error():
            continue
        oracle.pods, oracle.services, oracle.slices = pods, services, slices
        st.apply(changes.updated.values(), changes.removed, ebpf._Delta())
        contested += bool(st.contested)
        whole = ebpf._Node("t", 0, None)
        whole.plan(tracker.node_view("node1"), ebpf._Delta())
        assert _memory(st) == _memory(whole)
        delta = ebpf._Delta()
        st.plan(tracker.node_view("node1"), delta)
        assert delta.writes(st.entries) == ([], [], []) and not delta.ranges
    idents = [ebpf._ident(v) for v in st.owned.values() if v.protocol in ("TCP", "UDP")]
    assert len(st.svc_ids) == len(set(idents))
    assert st.id_refs == {i: n for i, n in Counter(idents).items() if n > 1}
    assert contested  # two Services on one load-balancer IP and port, at least once


def ebpf_state_error():
    from kube.state import StateError

    return StateError


def test_source_text_inlines_every_local_header_once():
    text = loader.source_text()
    assert '#include "' not in text  # bcc rewrites map calls in its main file only
    assert text.count("#ifndef SVB_MAPS_H") == 1
    for program in loader.PROGRAMS:
        assert f"int {program}(" in text


def test_relocate_maps_rewrites_only_map_references():
    ld_map = struct.pack("=BBhi", 0x18, 0x11, 0, 7) + bytes(8)  # ld_imm64 r1, map fd 7
    ld_imm = struct.pack("=BBhi", 0x18, 0x01, 0, 7) + bytes(8)  # ld_imm64 r1, 7 (a number)
    out = syscall.relocate_maps(ld_map + ld_imm, {7: 42})
    assert struct.unpack_from("=i", out, 4)[0] == 42
    assert out[16:] == ld_imm


def test_run_group_is_the_run_prefix_of_a_node_namespace():
    assert ebpf.run_group("svb-1a2b3c-node1") == "svb-1a2b3c"
    assert ebpf.run_group("svb-1a2b3c-node12") == "svb-1a2b3c"


def test_fix_bcc_installs_what_is_missing_and_links_generic_headers(monkeypatch, tmp_path):
    from bpf import setup

    if os.geteuid() != 0:
        pytest.skip("fix_bcc refuses to run without root")
    release = os.uname().release
    arch = setup._arch()
    src, modules, dist = tmp_path / "src", tmp_path / "modules", tmp_path / "dist"
    for tree in (f"linux-headers-6.1.0-9-{arch}", "linux-headers-6.1.0-9-common"):
        (src / tree / "include").mkdir(parents=True)
    monkeypatch.setattr(setup, "HEADERS_DIR", str(src))
    monkeypatch.setattr(setup, "MODULES_DIR", str(modules))
    monkeypatch.setattr(setup, "DIST_PACKAGES", str(dist))
    monkeypatch.setattr(setup, "headers_package", lambda r: f"linux-headers-{arch}")
    installed = []

    def fake_apt(packages, echo):  # apt "installs" bcc into the fake dist-packages
        installed.extend(packages)
        (dist / "bcc").mkdir(parents=True)
        (dist / "bcc" / "__init__.py").write_text("")

    monkeypatch.setattr(setup, "apt_install", fake_apt)
    missing = setup.bcc_missing()
    assert any("python3-bpfcc" in m for m in missing) or os.path.isdir("/usr/lib/python3/dist-packages/bcc")
    assert any("kernel headers" in m and "ln -s" in m for m in missing)
    done = setup.fix_bcc(echo=lambda _line: None)
    assert installed == ["python3-bpfcc", f"linux-headers-{arch}"]
    assert os.readlink(modules / release / "build") == str(src / f"linux-headers-6.1.0-9-{arch}")
    assert os.readlink(modules / release / "source") == str(src / "linux-headers-6.1.0-9-common")
    assert len(done) == 3 and setup.bcc_missing() == []
    assert setup.fix_bcc(echo=lambda _line: None) == []  # nothing left to do


# --------------------------------------------------------------------------- packets


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


ETH = bytes.fromhex("020000000001" "020000000002" "0800")


def _ip(src: str, dst: str, proto: int, length: int, ident: int = 1, frag: int = 0) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, ident, frag, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    return head[:10] + struct.pack("!H", _csum(head)) + head[12:]


def _with_l4_csum(src: str, dst: str, proto: int, seg: bytes, total: int | None = None) -> bytes:
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, total or len(seg))
    offset = 16 if proto == socket.IPPROTO_TCP else 6
    check = _csum(pseudo + seg) or 0xFFFF
    return seg[:offset] + struct.pack("!H", check) + seg[offset + 2:]


def tcp(src, sport, dst, dport, flags=0x02, payload=b""):
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0) + payload
    seg = _with_l4_csum(src, dst, socket.IPPROTO_TCP, seg)
    return ETH + _ip(src, dst, socket.IPPROTO_TCP, len(seg)) + seg


def udp(src, sport, dst, dport, payload=b"hello"):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    seg = _with_l4_csum(src, dst, socket.IPPROTO_UDP, seg)
    return ETH + _ip(src, dst, socket.IPPROTO_UDP, len(seg)) + seg


def udp_fragments(src, sport, dst, dport, payload: bytes, ident=77):
    """Two IP fragments of one UDP datagram (8-byte aligned split), the checksum over all."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    seg = _with_l4_csum(src, dst, socket.IPPROTO_UDP, seg)
    cut = 8 + 64
    first = ETH + _ip(src, dst, socket.IPPROTO_UDP, cut, ident, 0x2000) + seg[:cut]
    second = ETH + _ip(src, dst, socket.IPPROTO_UDP, len(seg) - cut, ident, cut // 8) + seg[cut:]
    return first, second, seg


def parse(frame: bytes) -> dict:
    """The frame's addresses, with every checksum verified from scratch."""
    ip = frame[14:34]
    assert _csum(ip) == 0, "bad IPv4 header checksum"
    proto = ip[9]
    length = struct.unpack("!H", ip[2:4])[0]
    seg = frame[34:14 + length]
    out = {"src": socket.inet_ntoa(ip[12:16]), "dst": socket.inet_ntoa(ip[16:20]), "proto": proto,
           "seg": seg, "frag": struct.unpack("!H", ip[6:8])[0]}
    if proto == socket.IPPROTO_ICMP:
        assert _csum(seg) == 0, "bad ICMP checksum"
    elif out["frag"] & 0x3FFF == 0:
        pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(seg))
        assert _csum(pseudo + seg) == 0, f"bad L4 checksum (protocol {proto})"
    if proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) and not out["frag"] & 0x1FFF:
        out["sport"], out["dport"] = struct.unpack("!HH", seg[:4])
    return out


@pytest.fixture
def bpf_node():
    """One node's programs and maps, with node1's view programmed; no interface attached."""
    needs_root()
    obj = loader.compile_object()
    config = maps.NodeConfig()
    config.netns_cookie = 1
    config.node_ip[:] = socket.inet_aton("198.18.0.1")
    config.hairpin_ip[:] = socket.inet_aton(ebpf.HAIRPIN_IP)
    config.cluster_cidr[:] = socket.inet_aton("198.18.128.0")
    config.cluster_mask[:] = socket.inet_aton("255.255.128.0")
    config.snat_port_min, config.snat_port_max = ebpf.SNAT_PORTS
    objects = loader.create_node_objects(obj, config)
    state = state_of()
    st = ebpf._Node("test", 1, objects)

    def program(new_state: ClusterState) -> None:
        st.program(new_state.node_view("node1"))

    program(state)
    try:
        yield objects, state, program
    finally:
        objects.close()


def run(objects, program: str, frame: bytes) -> tuple[int, bytes]:
    rc, out, _ns = syscall.prog_test_run(objects.programs[program], frame)
    return rc, out


def test_compiled_maps_match_the_python_mirrors():
    needs_root()
    obj = loader.compile_object()
    assert maps.check_layouts({m.name: (m.key_size, m.value_size) for m in obj.maps.values()}) == []


def test_pod_to_clusterip_is_dnated_and_the_reply_comes_from_the_vip(bpf_node):
    objects, state, _ = bpf_node
    client = state.pod("ns1", "client-a").ip
    vip = state.service_obj("ns1", "web").cluster_ip
    backends = {state.pod("ns1", f"web-{i}").ip for i in (1, 2, 3)}
    seen = set()
    for port in range(40000, 40060):
        rc, out = run(objects, "svb_xdp_lxc", tcp(client, port, vip, 80))
        pkt = parse(out)
        assert rc == XDP_PASS and pkt["src"] == client and pkt["sport"] == port
        assert pkt["dst"] in backends and pkt["dport"] == 8080
        seen.add(pkt["dst"])
        rc, out = run(objects, "svb_xdp_host", tcp(pkt["dst"], 8080, client, port, flags=0x12))
        back = parse(out)
        assert (back["src"], back["sport"], back["dst"], back["dport"]) == (vip, 80, client, port)
    assert seen == backends


def test_udp_fragments_follow_the_first_one(bpf_node):
    objects, state, _ = bpf_node
    client = state.pod("ns1", "client-a").ip
    vip = state.service_obj("ns1", "web").cluster_ip
    first, second, original = udp_fragments(client, 41000, vip, 80, bytes(range(256)) * 4)
    rc1, out1 = run(objects, "svb_xdp_lxc", first)
    rc2, out2 = run(objects, "svb_xdp_lxc", second)
    a, b = parse(out1), parse(out2)
    assert rc1 == rc2 == XDP_PASS
    assert a["dst"] == b["dst"] != vip and a["dport"] == 8080
    # reassembled, the datagram's checksum must be right for the rewritten addresses
    seg = a["seg"] + b["seg"]
    pseudo = socket.inet_aton(a["src"]) + socket.inet_aton(a["dst"]) + struct.pack("!BBH", 0, 17, len(seg))
    assert len(seg) == len(original) and _csum(pseudo + seg) == 0


def test_no_endpoints_answers_rst_and_icmp_port_unreachable(bpf_node):
    objects, state, _ = bpf_node
    client = state.pod("ns1", "client-a").ip
    vip = state.service_obj("ns1", "empty").cluster_ip
    rc, out = run(objects, "svb_xdp_lxc", tcp(client, 42000, vip, 80, payload=b"hello"))
    rst = parse(out)
    flags = rst["seg"][13]
    ack = struct.unpack("!I", rst["seg"][8:12])[0]
    assert rc == XDP_PASS and (rst["src"], rst["sport"], rst["dst"], rst["dport"]) == (vip, 80, client, 42000)
    assert flags == 0x14 and ack == 1000 + 1 + 5  # RST|ACK for SYN + 5 payload bytes
    assert out[:14] == ETH  # as received: the node's stack forwards it back to the client
    datagram = udp(client, 42001, vip, 81, b"x" * 300)
    rc, out = run(objects, "svb_xdp_lxc", datagram)
    icmp = parse(out)
    assert rc == XDP_PASS and icmp["proto"] == socket.IPPROTO_ICMP
    assert (icmp["src"], icmp["dst"]) == (vip, client) and icmp["seg"][:2] == b"\x03\x03"
    assert icmp["seg"][8:36] == datagram[14:42]  # quotes the IP header and 8 bytes of UDP


def test_icmp_errors_from_a_backend_are_about_the_service(bpf_node):
    objects, state, _ = bpf_node
    client = state.pod("ns1", "client-a").ip
    vip = state.service_obj("ns1", "web").cluster_ip
    sent = parse(run(objects, "svb_xdp_lxc", udp(client, 51000, vip, 80, b"q" * 20))[1])
    backend = sent["dst"]
    quoted = udp(client, 51000, backend, 8080, b"q" * 20)[14:14 + 28]
    body = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    body = body[:2] + struct.pack("!H", _csum(body)) + body[4:]
    frame = ETH + _ip(backend, client, socket.IPPROTO_ICMP, len(body)) + body
    rc, out = run(objects, "svb_xdp_host", frame)
    icmp = parse(out)  # outer and ICMP checksums verified
    inner = icmp["seg"][8:36]
    assert rc == XDP_PASS and (icmp["src"], icmp["dst"]) == (vip, client)
    assert _csum(inner[:20]) == 0
    assert (socket.inet_ntoa(inner[12:16]), socket.inet_ntoa(inner[16:20])) == (client, vip)
    assert struct.unpack("!HH", inner[20:24]) == (51000, 80)


def test_hairpin_is_snated_to_the_link_local_address(bpf_node):
    objects, state, _ = bpf_node
    client = state.pod("ns1", "client-a").ip
    vip = state.service_obj("ns1", "self").cluster_ip
    rc, out = run(objects, "svb_xdp_lxc", tcp(client, 43000, vip, 80))
    pkt = parse(out)
    assert (pkt["src"], pkt["dst"], pkt["dport"]) == (ebpf.HAIRPIN_IP, client, 8080)
    rc, out = run(objects, "svb_xdp_lxc", tcp(client, 8080, ebpf.HAIRPIN_IP, pkt["sport"], 0x12))
    back = parse(out)
    assert (back["src"], back["sport"], back["dst"], back["dport"]) == (vip, 80, client, 43000)


def test_an_endpoint_at_the_node_address_is_snated_to_the_link_local_address(bpf_node):
    """A hostNetwork endpoint on this node answers from the node's own stack: its clients,
    pods and outside ones alike, are SNATed to HAIRPIN_IP, which the host path routes back
    through XDP to be translated."""
    objects, _, program = bpf_node
    node_ip = "198.18.0.1"
    host = Service("ns1", "host", (ServicePort(80, TCP, "", 8082),), type=TYPE_NODE_PORT)
    ends = EndpointSlice("ns1", "host-1", "host", (Endpoint((node_ip,), node_name="node1"),),
                         (EndpointPort(8082, TCP),))
    state = ClusterState.build(NODES, PODS, [host], [ends])
    program(state)
    vip, node_port = state.service_obj("ns1", "host").cluster_ip, state.service_obj(
        "ns1", "host").ports[0].node_port
    client = state.pod("ns1", "client-a").ip
    for prog, src, dst, dport in (("svb_xdp_lxc", client, vip, 80),
                                  ("svb_xdp_host", EXTERNAL, node_ip, node_port)):
        rc, out = run(objects, prog, tcp(src, 45000, dst, dport))
        pkt = parse(out)
        assert rc == XDP_PASS and (pkt["src"], pkt["dst"], pkt["dport"]) == (
            ebpf.HAIRPIN_IP, node_ip, 8082), prog
        # The reply, routed into the host link, meets svb_xdp_lxc on its far end.
        rc, out = run(objects, "svb_xdp_lxc", tcp(node_ip, 8082, ebpf.HAIRPIN_IP, pkt["sport"],
                                                  0x12))
        back = parse(out)
        assert (back["src"], back["sport"], back["dst"], back["dport"]) == (dst, dport, src, 45000)
    assert f"{ebpf.HAIRPIN_IP}/32" in ebpf._Render(
        ebpf._Node("t", 0, None), state.node_view("node1")).host_destinations(PLAN.service_cidr)


def test_nodeport_snat_only_for_remote_endpoints_and_policy_local_drops(bpf_node):
    objects, state, _ = bpf_node
    node_port = state.service_obj("ns1", "np").ports[0].node_port
    local = state.pod("ns1", "web-1").ip
    sources = set()
    for port in range(44000, 44040):
        rc, out = run(objects, "svb_xdp_host", tcp(EXTERNAL, port, "198.18.0.1", node_port))
        pkt = parse(out)
        assert rc == XDP_PASS and pkt["dport"] == 8080
        if pkt["dst"] == local:
            assert (pkt["src"], pkt["sport"]) == (EXTERNAL, port)  # source kept
        else:
            assert pkt["src"] == "198.18.0.1" and ebpf.SNAT_PORTS[0] <= pkt["sport"] <= ebpf.SNAT_PORTS[1]
            rc, out = run(objects, "svb_xdp_host",
                          tcp(pkt["dst"], 8080, "198.18.0.1", pkt["sport"], 0x12))
            back = parse(out)
            assert (back["src"], back["sport"], back["dst"], back["dport"]) == (
                "198.18.0.1", node_port, EXTERNAL, port)
        sources.add(pkt["src"])
    assert sources == {EXTERNAL, "198.18.0.1"}
    # externalTrafficPolicy Local, node1 without a local endpoint: dropped, not rejected;
    # a pod of another node reaching it is short-circuited to every endpoint
    local_np = state.service_obj("ns1", "local").ports[0].node_port
    rc, _ = run(objects, "svb_xdp_host", tcp(EXTERNAL, 45000, "198.18.0.1", local_np))
    assert rc == XDP_DROP
    pod_b = state.pod("ns1", "client-b").ip
    rc, out = run(objects, "svb_xdp_host", tcp(pod_b, 45001, "198.18.0.1", local_np))
    assert rc == XDP_PASS and parse(out)["dst"] in {state.pod("ns1", p).ip for p in ("web-2", "web-3")}


def test_drops_and_rejects_are_reported_with_their_reason_and_nothing_else(bpf_node):
    """What the XDP path drops (and what it answers with a reject) is reported once in the
    node's xdp_drops ring buffer, read as `svcbench monitor` reads it; forwarded packets
    are not reported."""
    objects, state, _ = bpf_node
    ring = xdpdrops.RingReader(os.dup(objects.map("xdp_drops").fd))
    try:
        local_np = state.service_obj("ns1", "local").ports[0].node_port
        client = state.pod("ns1", "client-a").ip
        vip = state.service_obj("ns1", "empty").cluster_ip
        web = state.service_obj("ns1", "web").cluster_ip
        assert run(objects, "svb_xdp_host", tcp(EXTERNAL, 45000, "198.18.0.1", local_np))[0] \
            == XDP_DROP
        assert run(objects, "svb_xdp_lxc", tcp(client, 42000, vip, 80))[0] == XDP_PASS
        assert run(objects, "svb_xdp_lxc", tcp(client, 42001, web, 80))[0] == XDP_PASS
        rows = [xdpdrops.decode(raw) for raw in ring.read()]
    finally:
        ring.close()
    assert [(r["reason"], r["location"], r["protocol"], r["src"], r["sport"], r["dst"],
             r["dport"], r["tcp_flags"]) for r in rows] == [
        ("XDP:NO_LOCAL_ENDPOINT", "svb_xdp_host", "TCP", EXTERNAL, 45000, "198.18.0.1",
         local_np, "SYN"),
        ("XDP:NO_ENDPOINT", "svb_xdp_lxc, answered with a reject", "TCP", client, 42000, vip,
         80, "SYN")]
    assert abs(rows[0]["time"] - time.time()) < 60 and rows[0]["svc_id"] > 0


def both_local(selector: dict[str, str]) -> list[Service]:
    return [Service("ns1", "both", (ServicePort(80, TCP, "", 8080),), type=TYPE_NODE_PORT,
                    selector=selector, external_ips=(EXTERNAL_IP,),
                    internal_traffic_policy=POLICY_LOCAL, external_traffic_policy=POLICY_LOCAL)]


def _rows(objects) -> dict[tuple[str, str], dict]:
    """(frontend address, scope) -> the sync's lb4_services row, read back from the kernel."""
    return {(r["frontend"].split(":")[0], r["scope"]): r for r in ebpf.service_rows(objects)}


def _dests(objects, program: str, frames) -> set[str]:
    """Where the frames went: backend IPs, or "drop" / "rst" / "icmp"."""
    out = set()
    for frame in frames:
        rc, data = run(objects, program, frame)
        pkt = parse(data) if rc == XDP_PASS else None
        if pkt is None:
            out.add("drop" if rc == XDP_DROP else f"rc {rc}")
        elif pkt["proto"] == socket.IPPROTO_TCP and pkt["seg"][13] & 0x04:
            out.add("rst")
        else:
            out.add(pkt["dst"])
    return out


def test_both_policies_local_maps_and_packets(bpf_node):
    objects, _, program = bpf_node
    state = state_of(both_local({"app": "web"}))
    program(state)
    ip = {p: state.pod("ns1", p).ip for p in ("web-1", "web-2", "web-3", "client-a", "client-b")}
    vip = state.service_obj("ns1", "both").cluster_ip
    node_port = state.service_obj("ns1", "both").ports[0].node_port
    external = [(EXTERNAL_IP, 80), ("198.18.0.1", node_port)]

    def backends(row) -> set[str]:
        return {b["address"].split(":")[0] for b in row["backends"]}

    def from_pod(dst, port, n=30):
        return _dests(objects, "svb_xdp_lxc", (tcp(ip["client-a"], 52000 + i, dst, port)
                                               for i in range(n)))

    def from_outside(dst, port, n=3):
        return _dests(objects, "svb_xdp_host", (tcp(EXTERNAL, 53000 + i, dst, port)
                                                for i in range(n)))

    # Local and remote endpoints: node1's own for the ClusterIP and outsiders, every one for
    # pods and the node reaching the NodePort or externalIP (kube-proxy's short circuit).
    rows = _rows(objects)
    assert backends(rows[(vip, "")]) == {ip["web-1"]}
    for address, port in external:
        assert backends(rows[(address, "")]) == {ip["web-1"]}
        assert backends(rows[(address, "internal")]) == {ip["web-1"], ip["web-2"], ip["web-3"]}
        assert from_outside(address, port) == {ip["web-1"]}
        assert from_pod(address, port) == {ip["web-1"], ip["web-2"], ip["web-3"]}
    assert from_pod(vip, 80) == {ip["web-1"]}

    # Only remote endpoints: dropped (never rejected), the short circuit still serves pods.
    program(state_of(both_local({"tier": "b"})))
    rows = _rows(objects)
    assert rows[(vip, "")]["empty"] == "drop" and from_pod(vip, 80, 3) == {"drop"}
    for address, port in external:
        assert rows[(address, "")]["empty"] == "drop" and from_outside(address, port) == {"drop"}
        assert backends(rows[(address, "internal")]) == {ip["web-2"], ip["web-3"]}
        assert from_pod(address, port) == {ip["web-2"], ip["web-3"]}

    # No endpoint anywhere: every frontend answers with a RST.
    program(state_of(both_local({"app": "none"})))
    rows = _rows(objects)
    assert {r["empty"] for r in rows.values()} == {"reject"}
    assert not any(scope for _, scope in rows)
    assert from_pod(vip, 80, 3) == {"rst"}
    for address, port in external:
        assert from_outside(address, port) == from_pod(address, port, 3) == {"rst"}


def test_a_removed_backend_loses_its_flows_and_the_others_keep_theirs(bpf_node):
    objects, state, program = bpf_node
    client = state.pod("ns1", "client-a").ip
    vip = state.service_obj("ns1", "web").cluster_ip
    web3 = state.pod("ns1", "web-3").ip
    flows = {port: parse(run(objects, "svb_xdp_lxc", udp(client, port, vip, 80))[1])["dst"]
             for port in range(46000, 46060)}
    assert web3 in flows.values()
    program(state_of(pods=[p for p in PODS if p.name != "web-3"]))
    for port, before in flows.items():
        after = parse(run(objects, "svb_xdp_lxc", udp(client, port, vip, 80))[1])["dst"]
        assert after != web3
        if before != web3:
            assert after == before  # a flow keeps its backend while the Service lists it


def test_a_tcp_connection_keeps_its_endpoint_after_the_endpoint_leaves(bpf_node):
    """As netfilter's conntrack does for kube-proxy: an open TCP connection's segments keep
    going to its endpoint after the endpoint leaves the Service (sending them to another
    endpoint would be answered with a reset); new connections avoid it."""
    objects, state, program = bpf_node
    client = state.pod("ns1", "client-a").ip
    vip = state.service_obj("ns1", "web").cluster_ip
    web3 = state.pod("ns1", "web-3").ip
    program(state_of())  # every endpoint listed (an earlier test may have removed one)
    flows = {port: parse(run(objects, "svb_xdp_lxc", tcp(client, port, vip, 80))[1])["dst"]
             for port in range(47000, 47060)}
    assert web3 in flows.values()
    program(state_of(pods=[p for p in PODS if p.name != "web-3"]))
    try:
        for port, before in flows.items():
            segment = tcp(client, port, vip, 80, flags=0x10)  # the handshake's ACK
            assert parse(run(objects, "svb_xdp_lxc", segment)[1])["dst"] == before
        fresh = {parse(run(objects, "svb_xdp_lxc", tcp(client, port, vip, 80))[1])["dst"]
                 for port in range(47100, 47160)}
        assert web3 not in fresh
    finally:
        program(state_of())


def test_closed_flows_never_rewrite_a_direct_connection_on_the_same_ports(bpf_node):
    objects, state, _ = bpf_node
    client = state.pod("ns1", "client-a").ip
    vip = state.service_obj("ns1", "web").cluster_ip
    for port, close in ((50000, 0x14), (50001, None)):  # RST|ACK close; no close at all
        backend = parse(run(objects, "svb_xdp_lxc", tcp(client, port, vip, 80))[1])["dst"]
        if close:
            run(objects, "svb_xdp_lxc", tcp(client, port, vip, 80, flags=close))
        # the client now connects straight to the backend from the same port
        rc, out = run(objects, "svb_xdp_lxc", tcp(client, port, backend, 8080))
        assert rc == XDP_PASS and parse(out)["dst"] == backend
        rc, out = run(objects, "svb_xdp_host", tcp(backend, 8080, client, port, flags=0x12))
        reply = parse(out)
        assert (reply["src"], reply["sport"]) == (backend, 8080), f"rewritten after close={close}"


def test_affinity_sticks_to_one_backend_until_the_timeout(bpf_node):
    objects, state, _ = bpf_node
    client = state.pod("ns1", "client-a").ip
    vip = state.service_obj("ns1", "sticky").cluster_ip

    def picks(src: str, ports: range) -> set[str]:
        return {parse(run(objects, "svb_xdp_lxc", tcp(src, p, vip, 80))[1])["dst"] for p in ports}

    assert len(picks(client, range(47000, 47030))) == 1
    assert len(picks(state.pod("ns1", "client-b").ip, range(47000, 47010))) == 1
    key = bytes(maps.AffinityKey(client=tuple(socket.inet_aton(client)), svc_id=maps.LB4_HEADER.unpack_from(
        objects.map("lb4_services").lookup(maps.LB4_KEY.pack(
            socket.inet_aton(vip), socket.htons(80), 0, socket.IPPROTO_TCP, 0, 0)))[2]))
    affinity = objects.map("affinity")
    seen = maps.AffinityVal.from_buffer_copy(affinity.lookup(key)).seen_ns
    time.sleep(1.2)  # timeoutSeconds 1
    assert len(picks(client, range(48000, 48010))) == 1
    assert maps.AffinityVal.from_buffer_copy(affinity.lookup(key)).seen_ns > seen + 1e9
    # each expiry picks afresh: over repeated expiries more than one backend shows up
    fresh = set()
    for p in range(49000, 49030):
        stale = maps.AffinityVal.from_buffer_copy(affinity.lookup(key))
        stale.seen_ns = 0
        affinity.update(key, bytes(stale))
        fresh |= picks(client, range(p, p + 1))
    assert len(fresh) > 1


def test_per_packet_cost_does_not_grow_with_the_number_of_services():
    """The lookup is a hash: 1 Service and 20,000 cost the same per packet (within noise)."""
    needs_root()
    obj = loader.compile_object()
    costs = {}
    for n in (1, 20000):
        objects = loader.create_node_objects(obj, maps.NodeConfig())
        try:
            pods = [Pod("b", f"p{i}", node_name="node2") for i in range(3)]
            base = ClusterState.build(NODES, pods)
            from bench.synthetic import synthetic_services

            svcs, slices = synthetic_services(n, list(base.pods), 3, nodeport_every=0,
                                              affinity_every=0)
            state = ClusterState.build(NODES, base.pods, svcs, slices)
            render = ebpf._Render(ebpf._Node("t", 0, objects), state.node_view("node1"))
            objects.map("lb4_services").update_batch(list(render.entries.items()))
            last = state.services[-1].cluster_ip
            frame = tcp("198.18.129.9", 40000, last, 80, flags=0x10)
            costs[n] = min(syscall.prog_test_run(objects.programs["svb_xdp_lxc"], frame, 20000)[2]
                           for _ in range(5))
        finally:
            objects.close()
    assert costs[20000] < 3 * costs[1] + 100, costs


# --------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def lab():
    needs_root()
    from clusters.netns import NetnsCluster

    state = state_of()
    dp = ebpf.EbpfDataplane()
    cluster = NetnsCluster.create(2)
    try:
        cluster.set_pods(list(state.pods))
        for node in cluster.nodes:
            dp.install(node)
            dp.sync(node, state.node_view(node.name))
        yield cluster, dp, state
    finally:
        try:
            for node in cluster.nodes:
                dp.uninstall(node)
            leftovers = _leftovers(cluster)
        finally:
            cluster.destroy()
        assert leftovers == [], leftovers


def _leftovers(cluster) -> list[str]:
    """XDP programs on the run's links, and the run's cgroup: none may remain."""
    out = []
    for node in cluster.nodes:
        links = json.loads(node.run(["ip", "-j", "link", "show"]).stdout)
        out += [f"{node.name}: XDP on {link['ifname']}" for link in links if "xdp" in link]
        out += [f"{node.name}: {link['ifname']}" for link in links if link["ifname"].startswith("svb-")]
        rules = node.run(["ip", "rule", "show"]).stdout
        out += [f"{node.name}: rule {line}" for line in rules.splitlines()
                if str(ebpf.HOST_TABLE) in line or str(ebpf.NODEPORT_TABLE) in line]
        if not rules.startswith("0:\tfrom all lookup local"):
            out.append(f"{node.name}: the local table's rule was not put back: {rules!r}")
    from bpf import cgroup

    path = cgroup.group_path(ebpf.run_group(cluster.nodes[0].netns))
    if os.path.exists(path):
        out.append(f"cgroup {path}")
    return out


def _probe(cluster, source: str, ip: str, port: int, **kw):
    from clusters.nsenter import in_netns
    from clusters.workloads.probe import probe

    netns = {"external": cluster.external_netns}.get(source) or cluster.pod_netns(*source.split("/"))
    return in_netns(netns, probe, ip, port, **kw)


def test_clusterip_reaches_every_backend_and_keeps_the_client_ip(lab):
    cluster, _, state = lab
    vip = state.service_obj("ns1", "web").cluster_ip
    for client in ("ns1/client-a", "ns1/client-b"):
        result = _probe(cluster, client, vip, 80, count=60)
        summary = result.summary()
        assert summary["outcomes"] == {"ok": 60}, summary
        assert set(summary["backends"]) == {"ns1/web-1", "ns1/web-2", "ns1/web-3"}
        ip = state.pod(*client.split("/")).ip
        assert {s.seen_client.split(":")[0] for s in result.samples} == {ip}


def test_udp_and_large_payloads_pass(lab):
    cluster, _, state = lab
    vip = state.service_obj("ns1", "web").cluster_ip
    for protocol in (UDP, TCP):
        result = _probe(cluster, "ns1/client-a", vip, 80, protocol=protocol, count=10,
                        payload=b"p" * 2000, timeout=2.0)
        assert result.summary()["outcomes"] == {"ok": 10}, result.summary()


def test_service_without_endpoints_is_refused_within_a_second(lab):
    cluster, _, state = lab
    vip = state.service_obj("ns1", "empty").cluster_ip
    for protocol, port in ((TCP, 80), (UDP, 81)):
        result = _probe(cluster, "ns1/client-b", vip, port, protocol=protocol, count=5, timeout=1.0)
        assert result.summary()["outcomes"] == {"refused": 5}
        assert max(s.latency_us for s in result.samples) < 1e6


def test_hairpin_client_gets_its_own_answer(lab):
    cluster, _, state = lab
    result = _probe(cluster, "ns1/client-a", state.service_obj("ns1", "self").cluster_ip, 80, count=5)
    assert result.summary()["backends"] == {"ns1/client-a": 5}
    assert {s.seen_client.split(":")[0] for s in result.samples} == {ebpf.HAIRPIN_IP}


def test_nodeport_and_external_ip_from_outside(lab):
    cluster, _, state = lab
    np = state.service_obj("ns1", "np")
    for node in cluster.nodes:
        result = _probe(cluster, "external", node.ip, np.ports[0].node_port, count=30)
        assert result.summary()["outcomes"] == {"ok": 30}
    result = _probe(cluster, "external", EXTERNAL_IP, 80, count=10)
    assert result.summary()["outcomes"] == {"ok": 10}
    # externalTrafficPolicy Local: node2 serves from its own endpoints and keeps the
    # client's address; node1 has none and serves nothing
    local_np = state.service_obj("ns1", "local").ports[0].node_port
    result = _probe(cluster, "external", cluster.nodes[1].ip, local_np, count=10)
    assert set(result.summary()["backends"]) <= {"ns1/web-2", "ns1/web-3"}
    assert {s.seen_client.split(":")[0] for s in result.samples} == {EXTERNAL}
    result = _probe(cluster, "external", cluster.nodes[0].ip, local_np, count=2, timeout=0.5)
    assert result.summary()["outcomes"] == {"timeout": 2}


def test_host_network_processes_reach_services(lab):
    cluster, dp, state = lab
    node = cluster.nodes[0]
    vip = state.service_obj("ns1", "web").cluster_ip
    empty_vip = state.service_obj("ns1", "empty").cluster_ip
    from clusters.workloads.probe import probe

    reporter = dp.drop_reporter(node)  # what `svcbench monitor` reads of the node
    # any process of the node namespace: routed into the XDP host path
    for protocol, outcome in ((TCP, "ok"), (UDP, "ok")):
        result = node.call(probe, vip, 80, protocol=protocol, count=20)
        assert result.summary()["outcomes"] == {outcome: 20}, result.summary()
    empty = node.call(probe, empty_vip, 80, count=3)
    assert empty.summary()["outcomes"] == {"refused": 3}
    # a process in the run's cgroup: balanced at connect(), getpeername() answers the VIP;
    # a Service without endpoints refuses connect() itself
    code = textwrap.dedent("""
        import json, socket, sys
        sys.stdin.readline()
        vip, port, empty = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        s = socket.create_connection((vip, port), 2)
        try:
            socket.create_connection((empty, port), 2)
            refused = None
        except ConnectionRefusedError as exc:
            refused = exc.errno
        print(json.dumps([s.getpeername()[0], s.recv(200).decode().split()[0], refused]))
    """)
    proc = subprocess.Popen(["ip", "netns", "exec", node.netns, sys.executable, "-c", code, vip,
                             "80", empty_vip],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        path = ebpf.join_host_cgroup(node, proc.pid)
        out, err = proc.communicate("go\n", timeout=10)
    finally:
        proc.kill()
    peer, backend, refused = json.loads(out)
    assert peer == vip and backend.startswith("ns1/web-") and refused == errno.ECONNREFUSED, err
    # both refusals reported with their reason: the XDP host path's RSTs, the hook's refusal
    try:
        rows = reporter.take()
    finally:
        reporter.close()
    assert [(r["reason"], r["location"].split(",")[0], r["dst"], r["dport"]) for r in rows] == (
        [("XDP:NO_ENDPOINT", "svb_xdp_lxc", empty_vip, 80)] * 3
        + [("XDP:NO_ENDPOINT", "svb_sock4_conn", empty_vip, 80)]), rows
    assert rows[0]["src"] == node.ip and rows[-1]["src"] == "", rows
    assert str(os.getpid()) not in open(os.path.join(path, "cgroup.procs")).read().split()


def test_host_network_processes_reach_their_own_node_ports(lab):
    cluster, _, state = lab
    node = cluster.nodes[0]
    from clusters.workloads.probe import probe

    port = state.service_obj("ns1", "np").ports[0].node_port
    result = node.call(probe, node.ip, port, count=20)
    assert result.summary()["outcomes"] == {"ok": 20}, result.summary()
    assert len(result.summary()["backends"]) > 1, result.summary()
    # a port of the range that is no NodePort: the node's own listener still answers
    listener = node.call(socket.create_server, (node.ip, 32000))
    try:
        client = node.call(socket.create_connection, (node.ip, 32000), 2)
        accepted, peer = listener.accept()
        assert peer[0] == node.ip
        accepted.close()
        client.close()
    finally:
        listener.close()
    rules = node.run(["ip", "rule", "show"]).stdout
    assert f"lookup {ebpf.NODEPORT_TABLE}" in rules and "lookup local" in rules, rules


def test_udp_client_ports_reused_across_frontends_are_answered(lab):
    """One client port to Services translated on two nodes, or to two frontends of one
    backend on the same node: every datagram gets its answer from the address it was sent to."""
    cluster, dp, state = lab
    udp_np = Service("ns1", "udp-np", (ServicePort(80, UDP, "", 8080),), type=TYPE_NODE_PORT,
                     selector={"app": "web"})
    wider = state_of([*services(), udp_np])
    for node in cluster.nodes:
        dp.sync(node, wider.node_view(node.name))
    from clusters.nsenter import in_netns
    from clusters.workloads.probe import udp_sample

    port = wider.service_obj("ns1", "udp-np").ports[0].node_port
    vip = wider.service_obj("ns1", "web").cluster_ip
    node1, node2 = (n.ip for n in cluster.nodes)
    # node2 translates, then node1 (the client's) to the same backend: node2's old reply
    # entry must not rewrite the answer; node1 to its NodePort, then the ClusterIP, then the
    # NodePort again: both flows of one port live at once on node1.
    rounds = [[(node2, port), (vip, 80)], [(vip, 80), (node1, port), (vip, 80), (node1, port)]]

    def run() -> list[str]:
        missed = []
        for first, targets in ((40000, rounds[0]), (40100, rounds[1])):
            for source_port in range(first, first + 60):
                for ip, dport in targets:
                    sample = udp_sample(ip, dport, 0.5, b"", source_port)
                    if sample.outcome != "ok":
                        missed.append(f"{source_port} -> {ip}:{dport}: {sample.outcome}")
        return missed

    try:
        missed = in_netns(cluster.pod_netns("ns1", "client-a"), run)
    finally:
        for node in cluster.nodes:
            dp.sync(node, state.node_view(node.name))
    assert missed == [], missed[:10]


def test_sync_is_incremental_and_repairs_detached_programs(lab):
    cluster, dp, state = lab
    node = cluster.nodes[1]
    view = state.node_view(node.name)
    assert dp.sync(node, view).changed == 0
    web = view.service("ns1/web:http", TCP)
    fewer = replace(view, services=tuple(
        replace(sp, endpoints=sp.endpoints[:2]) if sp is web else sp
        for sp in view.services))
    assert dp.sync(node, fewer).changed == 1
    # an administrator's cleanup: XDP off everywhere
    for link in json.loads(node.run(["ip", "-j", "link", "show"]).stdout):
        if "xdp" in link:
            node.run(["ip", "link", "set", "dev", link["ifname"], "xdp", "off"])
    stats = dp.sync(node, view)
    assert any("attached XDP" in line for line in stats.extra["repaired"])
    result = _probe(cluster, "ns1/client-b", state.service_obj("ns1", "web").cluster_ip, 80, count=20)
    assert result.summary()["outcomes"] == {"ok": 20}


def test_another_process_finds_the_node_and_lists_its_services(lab):
    cluster, _, state = lab
    node = cluster.nodes[0]
    fresh = ebpf.EbpfDataplane()  # what a second `svcbench` process starts with
    stats = fresh.sync(node, state.node_view(node.name))
    assert stats.full and stats.changed == 0 and "repaired" not in stats.extra
    rows = fresh.service_list(node)
    for st in fresh._nodes.values():
        st.objects.close()  # leave the objects to the module's data plane
    fresh._nodes.clear()
    web = state.service_obj("ns1", "web").cluster_ip
    row = next(r for r in rows if r["frontend"] == f"{web}:80/TCP")
    assert sorted(b["address"] for b in row["backends"]) == sorted(
        f"{state.pod('ns1', f'web-{i}').ip}:8080" for i in (1, 2, 3))
    assert any(r["empty"] == "reject" for r in rows) and any(r["scope"] == "internal" for r in rows)


def test_the_ranges_follow_the_view_a_real_cluster_gives(lab):
    """A kind-like cluster's ranges (pods 10.244.0.0/16, Services 10.96.0.0/12, NodePorts
    31000-31999, as `svcbench agent --cluster-cidr --service-cidr --service-node-port-range`
    plan them): node_config's cluster CIDR, the host path's Service CIDR route and its
    NodePort rules follow the synced view, the XDP programs judge clients by the new CIDR,
    an update routes externalIPs by the new Service CIDR and leaves what a sync would, and
    the suite's view puts everything back. Before its first sync, a proxy routes no range.
    No packet leaves 198.18.0.0/15: the programs
    are run on crafted packets (BPF_PROG_TEST_RUN)."""
    from kube.api import cluster_plan
    from kube.tracker import NodeChanges

    cluster, dp, state = lab
    node = cluster.nodes[0]
    before = dp.kernel_state(node)
    assert before["config"]["cluster_cidr"] == "198.18.128.0/255.255.128.0"
    assert any(r.startswith(f"{PLAN.service_cidr} via")
               for r in before["routes"][str(ebpf.HOST_TABLE)])
    plan = cluster_plan("10.244.0.0/16", "10.96.0.0/12", (31000, 31999))
    kind = ClusterState.build([Node.numbered(k, plan) for k in (1, 2)], PODS, services(),
                              plan=plan)
    view = kind.node_view("node1")
    assert (view.cluster_cidr, view.service_cidr, view.node_port_range) == (
        "10.244.0.0/16", "10.96.0.0/12", (31000, 31999))
    local_np = kind.service_obj("ns1", "local").ports[0].node_port
    other_node_pod = kind.pod("ns1", "client-b").ip  # 10.244.2.x
    try:
        # a proxy starting on the node: before its first sync no range is known, so none
        # is routed or counted as the cluster's
        dp.uninstall(node)
        dp.install(node)
        fresh = dp.kernel_state(node)
        assert fresh["config"]["cluster_cidr"] == "0.0.0.0/255.255.255.255"
        assert fresh["routes"] == {str(ebpf.HOST_TABLE): [], str(ebpf.NODEPORT_TABLE): []}
        assert not [r for r in fresh["rules"] if f"table {ebpf.NODEPORT_TABLE}" in r]
        programs = dp._nodes[node.netns].objects
        dp.sync(node, view)
        got = dp.kernel_state(node)
        assert got["config"]["cluster_cidr"] == "10.244.0.0/255.255.0.0"
        routes = got["routes"][str(ebpf.HOST_TABLE)]
        assert sorted(r.split()[0] for r in routes) == sorted(
            ["10.96.0.0/12", f"{EXTERNAL_IP}/32", f"{ebpf.HAIRPIN_IP}/32"]), routes
        node_port_rules = [r for r in got["rules"] if f"table {ebpf.NODEPORT_TABLE}" in r]
        assert len(node_port_rules) == 2 and all(
            f"dst {node.ip} " in r and "dport 31000:31999 " in r for r in node_port_rules), \
            got["rules"]
        # externalTrafficPolicy Local without a local endpoint: a pod of the view's cluster
        # CIDR is served by every endpoint, a source of the suite's CIDR is a client from
        # outside now, and is dropped
        rc, out = run(programs, "svb_xdp_host", tcp(other_node_pod, 45100, node.ip, local_np))
        assert rc == XDP_PASS and parse(out)["dst"] in {
            kind.pod("ns1", p).ip for p in ("web-2", "web-3")}
        rc, _ = run(programs, "svb_xdp_host",
                    tcp(state.pod("ns1", "client-b").ip, 45101, node.ip, local_np))
        assert rc == XDP_DROP
        # an update routes externalIPs by the view's Service CIDR, as a sync would
        web = view.service("ns1/web:http", TCP)
        wider = replace(web, external_ips=("10.100.0.7", "198.18.64.77"))
        key = (web.namespace, web.service, web.port_name, web.protocol, web.port)
        dp.update(node, NodeChanges("node1", updated={key: wider}))
        updated = dp.kernel_state(node)
        routed = [r.split()[0] for r in updated["routes"][str(ebpf.HOST_TABLE)]]
        assert "198.18.64.77/32" in routed and "10.100.0.7/32" not in routed, routed
        same = replace(view, services=tuple(wider if sp is web else sp for sp in view.services))
        assert dp.sync(node, same).changed == 0
        assert dp.kernel_state(node) == updated
    finally:
        dp.sync(node, state.node_view(node.name))
    assert dp.kernel_state(node) == before
    rc, out = run(programs, "svb_xdp_host",
                  tcp(state.pod("ns1", "client-b").ip, 45102, node.ip,
                      state.service_obj("ns1", "local").ports[0].node_port))
    assert rc == XDP_PASS


def test_gc_removes_what_a_killed_process_left():
    needs_root()
    from clusters.netns import NetnsCluster

    with NetnsCluster.create(1, agents=False) as cluster:
        node = cluster.nodes[0]
        code = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {REPO!r})
            from clusters.netns import NetnsCluster
            from dataplanes.ebpf import EbpfDataplane
            from kube.model import Node
            from kube.state import ClusterState
            node = NetnsCluster.attach({cluster.run_id!r}).nodes[0]
            dp = EbpfDataplane()
            dp.install(node)
            dp.sync(node, ClusterState.build([Node.numbered(1)]).node_view("node1"))
            print("ready", flush=True)
            time.sleep(60)
        """)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert _leftovers(cluster), "the killed process left nothing to collect"
        group = ebpf.run_group(node.netns)
        assert not [line for line in ebpf.gc_bpf() if group in line]  # a live run is left alone
        removed = ebpf.gc_bpf([node.netns])
        assert any("XDP" in line for line in removed) and any("cgroup" in line for line in removed)
        # the host path is node state, which the namespace takes with it
        leftovers = [x for x in _leftovers(cluster) if "svb-lb" not in x and "rule" not in x]
        assert leftovers == []


def test_gc_detaches_hooks_of_runs_whose_namespaces_are_gone():
    needs_root()
    from bpf import cgroup

    group = "svb-0dead0"  # a run id no namespace carries
    path = cgroup.group_path(group)
    objects = loader.create_node_objects(loader.compile_object(), maps.NodeConfig())
    try:
        cgroup.ensure(path)
        cgroup.attach(path, objects.programs["svb_sock4_conn"], syscall.CGROUP_INET4_CONNECT)
    finally:
        objects.close()  # the attachment keeps the program alive, as after a crash
    try:
        from dataplanes.modes import gc_leftovers

        # `svcbench gc` reaches it through the mode registry, as every mode's optional `gc`.
        removed = gc_leftovers()
        assert any(group in line and "svb_sock4_conn" in line for line in removed), removed
        assert not os.path.exists(path)
    finally:
        if os.path.isdir(path):  # the test failed: do not leave it behind
            ebpf.gc_bpf([f"{group}-node1"])


def test_load_balancer_ips_and_source_ranges(bpf_node):
    """Ingress IPs are frontends like externalIPs; with loadBalancerSourceRanges a new flow
    from outside them is dropped (pods and the node too), the NodePort stays open."""
    objects, _, program = bpf_node
    lb_ip, inside = "198.18.32.10", "198.18.0.0/24"
    svc = Service("ns1", "lb", (ServicePort(80, TCP, "", 8080),), type=TYPE_LOAD_BALANCER,
                  selector={"app": "web"}, load_balancer_ips=(lb_ip,))
    state = state_of([svc])
    program(state)
    node_port = state.service_obj("ns1", "lb").ports[0].node_port
    every = {state.pod("ns1", p).ip for p in ("web-1", "web-2", "web-3")}
    client_a = state.pod("ns1", "client-a").ip

    ports = iter(range(54000, 60000))  # every probe a new flow: ranges judge new flows only

    def from_outside(src, dst=lb_ip, port=80, n=30):
        return _dests(objects, "svb_xdp_host", (tcp(src, next(ports), dst, port)
                                                for _ in range(n)))

    def from_pod(n=30):
        return _dests(objects, "svb_xdp_lxc", (tcp(client_a, next(ports), lb_ip, 80)
                                               for _ in range(n)))

    rows = _rows(objects)
    assert rows[(lb_ip, "")]["type"] == "External" and rows[(lb_ip, "")]["source_ranges"] == []
    assert from_outside(EXTERNAL) == every and from_pod() == every

    program(state_of([replace(svc, load_balancer_source_ranges=(inside, "198.18.9.9/32"))]))
    row = _rows(objects)[(lb_ip, "")]
    assert row["source_ranges"] == [inside, "198.18.9.9/32"]
    with contextlib.closing(xdpdrops.RingReader(os.dup(objects.map("xdp_drops").fd))) as ring:
        assert from_outside(EXTERNAL) == every  # 198.18.0.200 is inside
        assert from_outside("198.18.1.7", n=3) == {"drop"}
        assert from_pod(3) == {"drop"}  # the pod network is not in the ranges
        denied = [xdpdrops.decode(raw) for raw in ring.read()]
    # each drop reported once, with its reason (svcbench monitor shows these)
    assert [(d["reason"], d["location"], d["src"], d["dst"]) for d in denied] == (
        [("XDP:SOURCE_RANGE_DENIED", "svb_xdp_host", "198.18.1.7", lb_ip)] * 3
        + [("XDP:SOURCE_RANGE_DENIED", "svb_xdp_lxc", client_a, lb_ip)] * 3)
    assert from_outside("198.18.1.7", "198.18.0.1", node_port) == every
    # A flow that began while its source was allowed keeps going (new flows only).
    established = tcp("198.18.9.9", 60000, lb_ip, 80)
    assert _dests(objects, "svb_xdp_host", [established]) <= every
    program(state_of([replace(svc, load_balancer_source_ranges=(inside,))]))
    assert _dests(objects, "svb_xdp_host", [tcp("198.18.9.9", 60000, lb_ip, 80, 0x10)]) <= every
    assert from_outside("198.18.9.9", n=3) == {"drop"}

    # Ranges removed: the trie empties, every source is served again.
    program(state_of([svc]))
    assert objects.map("lb4_source_ranges").keys() == []
    assert from_outside("198.18.1.7") == every and from_pod() == every
