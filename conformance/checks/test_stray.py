"""Packets that belong to no Service: stray segments, unknown ports, unallocated ClusterIPs."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest

from clusters.workloads.probe import REFUSED, TIMEOUT
from conformance.expect import NOT_SERVED, check_cases, silent
from conformance.harness import HTTP_PORT, web_service
from kube.model import PLAN, TCP, UDP, ServicePort

ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800
TCP_ACK, TCP_PSH = 0x10, 0x08
# Above the window the receiver advertised: conntrack calls it INVALID ("SEQ is over upper
# bound"); a segment below the window would only be ignored by kernels since 6.0.
OUT_OF_WINDOW = 1 << 30


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(src: str, sport: int, dst: str, dport: int, seq: int, ack: int,
                payload: bytes) -> bytes:
    """An IPv4 packet carrying one TCP segment with PSH|ACK, checksums filled in."""
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, TCP_ACK | TCP_PSH,
                         502, 0, 0)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header) + len(payload))
    csum = _checksum(pseudo + header + payload)
    segment = header[:16] + struct.pack("!H", csum) + header[18:] + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), os.getpid() & 0xFFFF, 0, 64,
                     socket.IPPROTO_TCP, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + segment


def _sniffer() -> socket.socket:
    """An AF_PACKET socket on this namespace's eth0 (a pod's), both directions (only
    ETH_P_ALL sockets see what the namespace sends)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.bind(("eth0", ETH_P_ALL))
    return sock


def _raw_sender() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)


def last_segment_from(sniffer: socket.socket, src: str, sport: int, dst: str, dport: int,
                      payload: bytes, timeout: float = 2.0) -> tuple[int, int, int]:
    """(seq, ack, payload length) of the data segment src:sport -> dst:dport carrying
    `payload`, the last one sent. The sniffer may have opened before an earlier segment
    (the greeting) left: that one's ack is the client's sequence number before the payload,
    and a RST carrying it would only draw a challenge ACK, not reset the connection."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sniffer], [], [], left)[0]:
            break
        packet, addr = sniffer.recvfrom(65536)
        if addr[1] != ETH_P_IP:
            continue
        ihl = (packet[0] & 0xF) * 4
        if packet[9] != socket.IPPROTO_TCP or len(packet) < ihl + 20:
            continue
        if (socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])) != (src, dst):
            continue
        tcp = packet[ihl:]
        ports, (seq, ack) = struct.unpack("!HH", tcp[:4]), struct.unpack("!II", tcp[4:12])
        length = struct.unpack("!H", packet[2:4])[0] - ihl - (tcp[12] >> 4) * 4
        if ports == (sport, dport) and length > 0 and tcp[(tcp[12] >> 4) * 4:][:length] == payload:
            return seq, ack, length
    raise AssertionError(f"no data segment {src}:{sport} -> {dst}:{dport} carrying {payload!r} "
                         f"seen within {timeout} s")


def _exchange(sock: socket.socket, message: bytes) -> bytes:
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        chunk = sock.recv(len(message) - len(got))
        if not chunk:
            raise ConnectionResetError("the backend closed the connection")
        got += chunk
    return got


@pytest.mark.check(48)
def test_invalid_conntrack_state_does_not_reset_connections(cluster):
    """A backend's segment outside the TCP window must not reach the client untranslated.

    Stands for the e2e test "Conntrack proxy implementation should not be vulnerable to the
    invalid conntrack state bug [Privileged]" (test/e2e/network/conntrack.go, formerly
    "should drop INVALID conntrack entries"; kubernetes#74839): conntrack calls such a
    segment INVALID and does not reverse its DNAT, so the client, which knows no
    connection from the backend's own address, answers with a RST that the backend takes
    for its connection's end. kube-proxy's iptables and IPVS modes drop INVALID packets in
    KUBE-FORWARD; its nftables mode relies on nf_conntrack_tcp_be_liberal instead. As
    upstream, the client (client-a, node1) and the backend (web-2, node2) are on different
    nodes; the stray segment is sent from the backend's namespace with a raw socket.
    """
    cluster.apply([web_service("stray", selector=None)],
                  [cluster.endpoint_slice("stray", ["ns1/web-2"])])
    vip = cluster.cluster_ip("stray")
    server = cluster.pod_ip("ns1/web-2")
    sock = cluster.call("ns1/client-a", socket.create_connection, (vip, 80), 2.0)
    sniffer = cluster.call("ns1/web-2", _sniffer)
    try:
        greeting = b""
        while not greeting.endswith(b"\n"):
            greeting += sock.recv(1)
        backend, seen = greeting.decode().split()
        assert backend == "ns1/web-2", greeting
        peer_ip, peer_port = seen.rsplit(":", 1)
        assert _exchange(sock, b"ping\n") == b"ping\n"
        seq, ack, length = last_segment_from(sniffer, server, HTTP_PORT, peer_ip, int(peer_port),
                                             b"ping\n")
        # The backend's next sequence number, far ahead; its acknowledgement is exact, so a
        # RST the client answers with carries the very sequence number the backend expects.
        stray = tcp_segment(server, HTTP_PORT, peer_ip, int(peer_port),
                            (seq + length + OUT_OF_WINDOW) & 0xFFFFFFFF, ack, b"boom!!!")
        raw = cluster.call("ns1/web-2", _raw_sender)
        try:
            assert raw.sendto(stray, (peer_ip, 0)) == len(stray)
        finally:
            raw.close()
        time.sleep(0.3)
        try:
            echoed = _exchange(sock, b"still there\n")
        except OSError as exc:
            raise AssertionError(
                f"the connection to {backend} died after a stray out-of-window segment from "
                f"{server}:{HTTP_PORT}: {type(exc).__name__}: {exc} (the segment reached the "
                "client without its DNAT reversed and the client's RST reset the backend)"
            ) from None
        assert echoed == b"still there\n", echoed
    finally:
        sniffer.close()
        sock.close()


UNALLOCATED = "198.19.200.200"  # in the Service CIDR, never handed out by these checks
# What kube-proxy's mode of the same name does with a new connection to a ClusterIP on a
# port its Service does not have, and to an address of the Service CIDR no Service has.
# Its nftables mode: cluster-ips-check rejects the first, drops the second. Its IPVS mode:
# KUBE-IPVS-FILTER rejects new connections to a VIP's other ports (the VIP is a local
# address on kube-ipvs0). Its iptables mode has no rule for either: the packet is routed
# like any other (here along the node's Service CIDR route, to nowhere).
KUBE_PROXY = {"nftables": (REFUSED, TIMEOUT), "ipvs": (REFUSED, NOT_SERVED)}


@pytest.mark.check(49)
def test_unknown_ports_and_unallocated_cluster_ips(cluster):
    """A ClusterIP's other ports, and unallocated Service addresses, are never served; the
    modes modelled on kube-proxy's nftables and IPVS modes refuse (and drop) as those do.

    Stands for kube-proxy's nftables proxier tests of its cluster-ips-check chain
    (pkg/proxy/nftables/proxier_test.go, "Reject traffic to invalid ports of ClusterIPs",
    "Drop traffic to unallocated ClusterIPs", kubernetes#122692) and its IPVS mode's
    KUBE-IPVS-FILTER; upstream's e2e asserts neither.
    """
    svc = web_service("known", ServicePort(80, TCP, "tcp", HTTP_PORT),
                      ServicePort(80, UDP, "udp", HTTP_PORT))
    cluster.apply([svc])
    vip = cluster.cluster_ip("known")
    assert PLAN.in_service_cidr(UNALLOCATED) and UNALLOCATED != vip
    unknown_port, unallocated = KUBE_PROXY.get(cluster.dataplane.name, (NOT_SERVED, NOT_SERVED))
    cases = {}
    for source in ("ns1/client-a", "node/node1"):
        for proto in (TCP, UDP):
            # A datagram the node's own output path rejects or drops fails its send (EPERM).
            own = (source, proto) == ("node/node1", UDP)
            cases[f"{proto} port 81 of the ClusterIP from {source}"] = (
                silent(source, vip, 81, proto), NOT_SERVED if own else unknown_port)
            cases[f"{proto} to unallocated {UNALLOCATED} from {source}"] = (
                silent(source, UNALLOCATED, 80, proto), NOT_SERVED if own else unallocated)
    check_cases(cluster, cases)
