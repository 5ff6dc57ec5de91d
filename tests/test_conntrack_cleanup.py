"""Which UDP conntrack entries a sync clears, from the change of one Service port's view."""

from __future__ import annotations

from dataclasses import replace

from dataplanes.conntrack import stale_udp_flow_deletes
from kube.state import EndpointView, ServicePortView

A = EndpointView("198.18.129.2", 8080, "node1", True)
B = EndpointView("198.18.130.2", 8080, "node2", False)


def port(*endpoints: EndpointView, **fields) -> ServicePortView:
    return ServicePortView("ns1", "dns", "", "UDP", "198.19.0.5", 53, endpoints=endpoints,
                           **fields)


def deleted(commands: list[list[str]]) -> set[str]:
    """Each command as its filters, without the common `conntrack -D -p udp`."""
    for argv in commands:
        assert argv[:4] == ["conntrack", "-D", "-p", "udp"], argv
    return {" ".join(argv[4:]) for argv in commands}


def test_an_unchanged_port_clears_nothing():
    assert stale_udp_flow_deletes(port(A, B), port(A, B)) == []
    assert stale_udp_flow_deletes(port(), port()) == []


def test_a_removed_endpoint_takes_its_flows_on_every_frontend():
    before = port(A, B, node_port=30053, external_ips=("198.18.64.9",))
    assert deleted(stale_udp_flow_deletes(before, replace(before, endpoints=(A,)))) == {
        "--orig-dst 198.19.0.5 --orig-port-dst 53 --dst-nat 198.18.130.2",
        "--orig-dst 198.18.64.9 --orig-port-dst 53 --dst-nat 198.18.130.2",
        "--orig-port-dst 30053 --dst-nat 198.18.130.2",
    }


def test_an_endpoint_that_stops_being_ready_is_one_that_left():
    before = port(A, B)
    after = port(A, replace(B, ready=False, serving=False))
    assert deleted(stale_udp_flow_deletes(before, after)) == {
        "--orig-dst 198.19.0.5 --orig-port-dst 53 --dst-nat 198.18.130.2"}


def test_the_first_usable_endpoint_clears_every_untranslated_flow():
    unready = port(replace(A, ready=False, serving=False), node_port=30053)
    assert deleted(stale_udp_flow_deletes(unready, port(A, node_port=30053))) == {
        "--orig-dst 198.19.0.5 --orig-port-dst 53", "--orig-port-dst 30053"}


def test_new_frontends_clear_what_was_sent_to_them_before():
    before = port(A, node_port=30053)
    moved = replace(before, node_port=30054, load_balancer_ips=("198.18.32.7",))
    assert deleted(stale_udp_flow_deletes(before, moved)) == {
        "--orig-port-dst 30054", "--orig-dst 198.18.32.7 --orig-port-dst 53"}
    assert deleted(stale_udp_flow_deletes(None, port(A))) == {
        "--orig-dst 198.19.0.5 --orig-port-dst 53"}
    assert stale_udp_flow_deletes(None, port()) == []  # nothing translates yet


def test_a_port_that_goes_takes_its_translated_flows():
    assert deleted(stale_udp_flow_deletes(port(A), None)) == {
        "--orig-dst 198.19.0.5 --orig-port-dst 53 --dst-nat 198.18.129.2"}
