"""SCTP Service ports in the modes that cannot program them: skipped, never a crash.

Pure renders, no root: this host has no SCTP sockets, so nothing here sends a packet.
iptables and nftables render SCTP (tests/test_iptables.py, tests/test_nftables.py).
"""

from __future__ import annotations

import socket

from dataplanes import ebpf, ipvs, userspace
from kube.model import SCTP, TYPE_NODE_PORT, Service, ServicePort
from tests.scenarios import backends, view

PORTS = (ServicePort(9, SCTP, "sig", 9999), ServicePort(80, name="http", target_port=8080))


def mixed_view():
    svc = Service("ns1", "mixed", PORTS, type=TYPE_NODE_PORT, selector={"app": "web"})
    return view(backends(2), [svc])


def test_the_view_carries_the_sctp_port_the_modes_skip():
    assert {sp.protocol for sp in mixed_view().services} == {"SCTP", "TCP"}
    for mode in (ebpf, userspace, ipvs):
        assert "SCTP" in mode.SKIPPED_PROTOCOLS, mode.__name__


def test_userspace_table_leaves_sctp_out():
    table = userspace.table_message(mixed_view())
    assert [s["protocol"] for s in table["services"]] == ["TCP"]


def test_ebpf_render_leaves_sctp_out():
    render = ebpf._Render(ebpf._Node("t", 0, None), mixed_view())
    assert {proto for _, _, proto in render.svc_ids} == {socket.IPPROTO_TCP}


def test_ipvs_layout_leaves_sctp_out():
    layout = ipvs.desired_layout(mixed_view())
    assert {vs.protocol for vs in layout.services.values()} == {"TCP"}
