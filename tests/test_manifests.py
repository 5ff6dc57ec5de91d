"""kube/manifests.py: Kubernetes YAML in, model objects out, and one-sentence errors."""

from __future__ import annotations

import io
import json
import re
import textwrap

import pytest
import yaml

from kube.manifests import (
    ManifestError,
    Manifests,
    field_path,
    load_documents,
    load_files,
    load_manifests,
)
from kube.model import (
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Pod,
    Service,
    ServicePort,
)

FULL = textwrap.dedent(
    """\
    apiVersion: v1
    kind: Service
    metadata:
      name: web
      namespace: ns1
      labels:
        app: web
        service.kubernetes.io/service-proxy-name: other
    spec:
      type: NodePort
      clusterIP: 198.19.1.20
      selector: {app: web}
      externalIPs: [198.18.64.7]
      sessionAffinity: ClientIP
      sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
      externalTrafficPolicy: Local
      internalTrafficPolicy: Local
      ports:
      - name: http
        port: 80
        targetPort: http
        nodePort: 30080
      - name: dns
        protocol: UDP
        port: 53
        targetPort: 5353
    ---
    # an empty document follows
    ---
    apiVersion: v1
    kind: Pod
    metadata:
      name: web-1
      namespace: ns1
      labels: {app: web}
      deletionTimestamp: 2024-01-01T00:00:00Z
    spec:
      nodeName: node2
      containers:
      - name: echo
        image: svcbench/echo
        ports:
        - {name: http, containerPort: 8080}
      - name: sidecar
        ports:
        - {name: dns, containerPort: 5353, protocol: UDP}
    status:
      conditions:
      - {type: Initialized, status: "True"}
      - {type: Ready, status: "False"}
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: ext-abc12
      namespace: ns1
      labels: {kubernetes.io/service-name: ext}
    addressType: IPv4
    endpoints:
    - addresses: [198.18.129.5]
      nodeName: node1
      targetRef: {kind: Pod, namespace: ns1, name: ext-1}
    - addresses: [198.18.130.5]
      conditions: {ready: false}
    - addresses: [198.18.130.6]
      conditions: {ready: false, serving: true, terminating: true}
    ports:
    - {name: http, port: 8080}
    """
)


def error_of(text: str, source: str = "web.yaml") -> str:
    with pytest.raises(ManifestError) as info:
        load_manifests(text, source)
    message = str(info.value)
    # One sentence: one line, one final period, no second sentence starting after ". ".
    assert "\n" not in message and message.endswith(".")
    assert not re.search(r"\.\s+[A-Z]", message), message
    return message


def service_yaml(spec: dict, name: str = "web", labels: dict | None = None) -> str:
    meta = {"name": name, "namespace": "ns1"} | ({"labels": labels} if labels else {})
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec})


def pod_yaml(spec: dict | None = None, status: dict | None = None, name: str = "p") -> str:
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns1"}}
    doc["spec"] = spec or {"containers": [{"name": "c"}]}
    if status:
        doc["status"] = status
    return yaml.safe_dump(doc)


def slice_yaml(**body) -> str:
    doc = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abc",
            "namespace": "ns1",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["198.18.129.2"]}],
        "ports": [{"port": 8080}],
    } | body
    return yaml.safe_dump(doc)


PORT80 = [{"port": 80}]


def lb_yaml(spec: dict, ingress: list | None = None) -> str:
    """A LoadBalancer Service ns1/web on port 80, with status.loadBalancer.ingress when given."""
    doc = yaml.safe_load(service_yaml({"type": "LoadBalancer", "ports": PORT80} | spec))
    if ingress is not None:
        doc["status"] = {"loadBalancer": {"ingress": ingress}}
    return yaml.safe_dump(doc)


# --------------------------------------------------------------------------- reading


def test_reads_every_supported_field_onto_the_model():
    m = load_manifests(FULL, "full.yaml")
    assert m.services == (
        Service(
            namespace="ns1",
            name="web",
            ports=(
                ServicePort(80, "TCP", "http", "http", 30080),
                ServicePort(53, "UDP", "dns", 5353, None),
            ),
            type="NodePort",
            cluster_ip="198.19.1.20",
            selector={"app": "web"},
            labels={"app": "web", "service.kubernetes.io/service-proxy-name": "other"},
            external_ips=("198.18.64.7",),
            session_affinity="ClientIP",
            affinity_timeout_s=60,
            external_traffic_policy="Local",
            internal_traffic_policy="Local",
        ),
    )
    assert m.services[0].proxy_name == "other"
    assert m.pods == (
        Pod(
            namespace="ns1",
            name="web-1",
            labels={"app": "web"},
            node_name="node2",
            ports=(ContainerPort(8080, "TCP", "http"), ContainerPort(5353, "UDP", "dns")),
            ready=False,
            terminating=True,
        ),
    )
    assert m.endpoint_slices == (
        EndpointSlice(
            namespace="ns1",
            name="ext-abc12",
            service_name="ext",
            endpoints=(
                Endpoint(("198.18.129.5",), True, True, False, "node1", "ext-1"),
                Endpoint(("198.18.130.5",), ready=False, serving=False, terminating=False),
                Endpoint(("198.18.130.6",), ready=False, serving=True, terminating=True),
            ),
            ports=(EndpointPort(8080, "TCP", "http"),),
        ),
    )
    assert len(m) == 3


def test_defaults_follow_kubernetes():
    m = load_manifests(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n"
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
    )
    svc, pod = m.services[0], m.pods[0]
    assert (svc.namespace, svc.type, svc.cluster_ip, svc.selector) == (
        "default",
        "ClusterIP",
        None,
        None,
    )
    assert svc.ports == (ServicePort(80, "TCP", "", None, None),)
    assert (svc.session_affinity, svc.affinity_timeout_s) == ("None", 10800)
    assert (svc.external_traffic_policy, svc.internal_traffic_policy) == ("Cluster", "Cluster")
    assert (pod.namespace, pod.ready, pod.terminating, pod.node_name, pod.ports) == (
        "default",
        True,
        False,
        None,
        (),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("None", "None"), ("", None), (None, None), ("198.19.0.10", "198.19.0.10")],
)
def test_cluster_ip_headless_allocate_or_given(value, expected):
    spec = {"ports": PORT80} | ({"clusterIP": value} if value is not None else {})
    svc = load_manifests(service_yaml(spec)).services[0]
    assert svc.cluster_ip == expected
    assert svc.headless == (expected == "None")


def test_headless_service_may_have_no_ports():
    svc = load_manifests(service_yaml({"clusterIP": "None", "selector": {"a": "b"}})).services[0]
    assert svc.headless and svc.ports == ()


def test_headless_label_keeps_the_cluster_ip_and_is_read_whatever_its_value():
    svc = load_manifests(service_yaml({"ports": PORT80},
                                      labels={"service.kubernetes.io/headless": ""})).services[0]
    assert svc.labelled_headless and not svc.headless and svc.cluster_ip is None
    assert not load_manifests(service_yaml({"ports": PORT80})).services[0].labelled_headless


def test_cluster_ips_list_as_the_api_returns_it():
    spec = {"clusterIP": "198.19.0.5", "clusterIPs": ["198.19.0.5"], "ports": PORT80}
    assert load_manifests(service_yaml(spec)).services[0].cluster_ip == "198.19.0.5"
    spec = {"clusterIPs": ["198.19.0.6"], "ipFamilies": ["IPv4"], "ports": PORT80}
    assert load_manifests(service_yaml(spec)).services[0].cluster_ip == "198.19.0.6"


def test_empty_selector_means_no_selector_and_node_port_zero_means_allocate():
    spec = {"type": "NodePort", "selector": {}, "ports": [{"port": 80, "nodePort": 0}]}
    svc = load_manifests(service_yaml(spec)).services[0]
    assert svc.selector is None
    assert svc.ports[0].node_port is None


def test_same_port_number_over_tcp_and_udp_may_share_a_node_port():
    spec = {
        "type": "NodePort",
        "ports": [
            {"name": "dns-tcp", "port": 53, "nodePort": 30053},
            {"name": "dns-udp", "port": 53, "protocol": "UDP", "nodePort": 30053},
        ],
    }
    ports = load_manifests(service_yaml(spec)).services[0].ports
    assert [(p.protocol, p.node_port) for p in ports] == [("TCP", 30053), ("UDP", 30053)]


def test_load_balancer_reads_ingress_ips_source_ranges_and_health_check_node_port():
    text = lb_yaml(
        {
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 30500,
            "loadBalancerSourceRanges": [" 198.18.0.200/32", "198.18.0.7/24"],
            "ports": [{"port": 80, "nodePort": 30080}],
        },
        ingress=[{"ip": "198.18.32.1", "ipMode": "VIP"}, {"ip": "198.18.63.254"}],
    )
    svc = load_manifests(text).services[0]
    assert (svc.type, svc.load_balancer_ips) == ("LoadBalancer", ("198.18.32.1", "198.18.63.254"))
    # Spaces trimmed and host bits dropped, as Kubernetes reads a source range.
    assert svc.load_balancer_source_ranges == ("198.18.0.200/32", "198.18.0.0/24")
    assert (svc.health_check_node_port, svc.ports[0].node_port) == (30500, 30080)
    assert svc.allocate_load_balancer_node_ports and svc.has_node_ports
    assert svc.needs_health_check_node_port


def test_load_balancer_without_status_or_node_ports():
    svc = load_manifests(lb_yaml({"allocateLoadBalancerNodePorts": False})).services[0]
    assert svc.load_balancer_ips == () and svc.health_check_node_port is None
    assert not svc.allocate_load_balancer_node_ports and not svc.has_node_ports
    assert not svc.needs_health_check_node_port  # externalTrafficPolicy is Cluster
    zero = lb_yaml({"externalTrafficPolicy": "Local", "healthCheckNodePort": 0})
    assert load_manifests(zero).services[0].health_check_node_port is None  # 0: allocate


def test_publish_not_ready_addresses_and_traffic_distribution():
    spec = {"ports": PORT80, "publishNotReadyAddresses": True, "trafficDistribution": "PreferClose"}
    svc = load_manifests(service_yaml(spec)).services[0]
    assert svc.publish_not_ready_addresses and svc.traffic_distribution == "PreferClose"
    plain = load_manifests(service_yaml({"ports": PORT80})).services[0]
    assert not plain.publish_not_ready_addresses and plain.traffic_distribution is None


def test_external_name_needs_no_ports_and_loses_its_trailing_dot():
    svc = load_manifests(
        service_yaml({"type": "ExternalName", "externalName": "db.example.com."})
    ).services[0]
    assert (svc.type, svc.external_name, svc.cluster_ip, svc.ports) == (
        "ExternalName", "db.example.com", None, ()
    )


def test_sctp_ports_on_services_slices_and_pods():
    spec = {"type": "NodePort", "ports": [{"port": 9, "protocol": "SCTP", "targetPort": "sig"}]}
    svc = load_manifests(service_yaml(spec)).services[0]
    assert svc.ports[0].protocol == "SCTP"
    sl = load_manifests(slice_yaml(ports=[{"port": 9, "protocol": "SCTP"}])).endpoint_slices[0]
    assert sl.ports[0].protocol == "SCTP"
    ports = [{"name": "sig", "containerPort": 9, "protocol": "SCTP"}, {"containerPort": 80}]
    pod = load_manifests(pod_yaml({"containers": [{"name": "c", "ports": ports}]})).pods[0]
    assert pod.ports[0] == ContainerPort(9, "SCTP", "sig")
    # The echo backend has no SCTP socket to open here: it serves the TCP port only.
    assert pod.backend_ports() == (ContainerPort(80, "TCP"),)


def test_endpoint_zone_and_zone_hints():
    endpoints = [
        {"addresses": ["198.18.129.2"], "zone": "zone1",
         "hints": {"forZones": [{"name": "zone1"}, {"name": "zone2"}]}},
        {"addresses": ["198.18.129.3"], "hints": {}},
    ]
    eps = load_manifests(slice_yaml(endpoints=endpoints)).endpoint_slices[0].endpoints
    assert (eps[0].zone, eps[0].zone_hints) == ("zone1", ("zone1", "zone2"))
    assert (eps[1].zone, eps[1].zone_hints) == (None, ())


def test_node_manifests_give_labels_and_zone():
    text = (
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n"
        "  labels: {topology.kubernetes.io/zone: east}\nspec: {podCIDR: 10.0.0.0/24}\n"
        "---\napiVersion: v1\nkind: NodeList\nitems: [{metadata: {name: node2}}]\n"
    )
    nodes = load_manifests(text).nodes
    assert [(n.name, n.zone) for n in nodes] == [("node1", "east"), ("node2", "")]
    message = error_of(text + "---\napiVersion: v1\nkind: Node\nmetadata: {name: node1}\n")
    assert "Node node1 is defined twice in one load" in message


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({}, (True, True, False)),  # nil ready means ready; serving follows ready
        ({"ready": False}, (False, False, False)),
        ({"ready": None, "serving": None, "terminating": None}, (True, True, False)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
        ({"ready": True, "serving": False}, (True, False, False)),
    ],
)
def test_endpoint_condition_defaults(conditions, expected):
    text = slice_yaml(endpoints=[{"addresses": ["198.18.129.2"], "conditions": conditions}])
    ep = load_manifests(text).endpoint_slices[0].endpoints[0]
    assert (ep.ready, ep.serving, ep.terminating) == expected


@pytest.mark.parametrize(
    ("status", "ready"),
    [("True", True), ("False", False), ("Unknown", False), (True, True), (False, False)],
)
def test_pod_readiness_from_the_ready_condition(status, ready):
    text = pod_yaml(status={"conditions": [{"type": "Ready", "status": status}]})
    assert load_manifests(text).pods[0].ready is ready


def test_lists_and_typed_lists_unpack_their_items():
    items = [yaml.safe_load(service_yaml({"ports": PORT80}, name=f"s{i}")) for i in range(3)] + [
        yaml.safe_load(pod_yaml())
    ]
    text = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items})
    m = load_manifests(text)
    assert [s.name for s in m.services] == ["s0", "s1", "s2"]
    assert [p.name for p in m.pods] == ["p"]
    bare = [{"metadata": {"name": "a"}, "spec": {"ports": PORT80}}]  # the API omits item kinds
    text = yaml.safe_dump({"apiVersion": "v1", "kind": "ServiceList", "items": bare})
    assert load_manifests(text).services[0].name == "a"


def test_empty_stream_and_json_are_fine():
    assert load_manifests("") == Manifests()
    assert load_manifests("---\n---\n") == Manifests()
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}
    assert load_manifests(json.dumps(doc)).pods[0].name == "p"


# --------------------------------------------------------------------------- rejecting


def test_error_names_file_line_document_object_field_and_accepted_values():
    text = FULL.replace("port: 53\n", "port: 70000\n")
    line = text.splitlines().index("    port: 70000") + 1
    message = error_of(text, "full.yaml")
    assert message == (
        f"full.yaml:{line} (document 1): Service ns1/web spec.ports[1].port must be an "
        "integer from 1 to 65535, not 70000."
    )
    text = FULL.replace("containerPort: 5353", "containerPort: 0")
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "containerPort: 0" in s)
    assert error_of(text).startswith(f"web.yaml:{line} (document 3): Pod ns1/web-1 ")


def test_malformed_yaml_names_the_line():
    message = error_of("apiVersion: v1\nkind: Pod\nmetadata: {name: p\nspec: {}\n")
    assert message.startswith("web.yaml:4 is not valid YAML")
    assert error_of("a: b\n\tc: d\n").startswith("web.yaml:2 is not valid YAML")


def test_a_repeated_key_is_refused_instead_of_silently_overwritten():
    text = service_yaml({"ports": PORT80}).replace("  - port: 80\n", "  - port: 80\n    port: 81\n")
    message = error_of(text)
    assert 'the key "port" appears twice' in message and message.startswith("web.yaml:")


def test_aliases_share_nodes_but_bombs_and_cycles_are_refused():
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
        for i in range(1, 30)
    )
    assert error_of(laughs) == (
        "web.yaml:7 (document 1): the alias *a5 takes the file past 262,144 values (aliases "
        "counted each time they are used), the most svcbench reads from one file."
    )
    assert error_of("&cycle {a: [*cycle]}\n") == (
        "web.yaml:1 (document 1): the alias *cycle is inside the node it names; "
        "recursive aliases never end."
    )
    shared = (
        service_yaml({"selector": {"app": "web"}, "ports": PORT80}).replace(
            "selector:", "selector: &labels"
        )
        + "---\n"
        + pod_yaml(name="w")
    )
    assert load_manifests(shared).services[0].selector == {"app": "web"}


REJECTED = [
    # (id, text, fragments the message must contain)
    (
        "not-a-mapping",
        "- a\n- b\n",
        ["(document 1)", "the document is a list", "not a Kubernetes object"],
    ),
    ("scalar-document", "hello\n", ['the document is "hello"', "apiVersion, kind and metadata"]),
    (
        "unknown-kind",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
        [
            'apiVersion "apps/v1" kind "Deployment" (default/web)',
            "v1 Pod, v1 Service, discovery.k8s.io/v1 EndpointSlice",
        ],
    ),
    (
        "wrong-api-version",
        "apiVersion: v2\nkind: Service\nmetadata: {name: web}\n",
        ['apiVersion "v2" kind "Service"', "is not a kind svcbench reads"],
    ),
    ("no-kind", "metadata: {name: web}\n", ["apiVersion null kind null", "v1 Service"]),
    (
        "missing-name",
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: ns1}\nspec: {ports: [{port: 80}]}\n",
        ["Service metadata.name is required", "DNS-1035 label"],
    ),
    (
        "pod-name-not-dns1123",
        pod_yaml(name="Web_1"),
        ["Pod metadata.name must be a DNS-1123 label", "lowercase letters", 'not "Web_1"'],
    ),
    (
        "service-name-starts-with-digit",
        service_yaml({"ports": PORT80}, name="1web"),
        ["Service metadata.name must be a DNS-1035 label", "starting with a letter", '"1web"'],
    ),
    (
        "namespace-not-dns1123",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: NS.1}\n",
        ["Pod metadata.namespace must be a DNS-1123 label", '"NS.1"'],
    ),
    (
        "name-too-long",
        pod_yaml(name="p" * 64),
        ["metadata.name must be a DNS-1123 label (at most 63"],
    ),
    (
        "port-zero",
        service_yaml({"ports": [{"port": 0}]}),
        ["Service ns1/web spec.ports[0].port must be an integer from 1 to 65535, not 0"],
    ),
    (
        "port-string",
        service_yaml({"ports": [{"port": "80"}]}),
        ['spec.ports[0].port must be an integer from 1 to 65535, not "80"'],
    ),
    (
        "port-missing",
        service_yaml({"ports": [{"name": "x"}]}),
        ["spec.ports[0].port is required: an integer from 1 to 65535"],
    ),
    (
        "target-port-too-big",
        service_yaml({"ports": [{"port": 80, "targetPort": 65536}]}),
        [
            "spec.ports[0].targetPort must be an integer from 1 to 65535 or an IANA service name",
            "65536",
        ],
    ),
    (
        "target-port-bad-name",
        service_yaml({"ports": [{"port": 80, "targetPort": "http_alt"}]}),
        ["spec.ports[0].targetPort must be", "IANA service name (at most 15", '"http_alt"'],
    ),
    (
        "target-port-digits-as-string",
        service_yaml({"ports": [{"port": 80, "targetPort": "8080"}]}),
        ["at least one letter", '"8080"'],
    ),
    (
        "target-port-name-too-long",
        service_yaml({"ports": [{"port": 80, "targetPort": "a" * 16}]}),
        ["IANA service name (at most 15"],
    ),
    (
        "container-port-out-of-range",
        pod_yaml({"containers": [{"name": "c", "ports": [{"containerPort": 65536}]}]}),
        ["Pod ns1/p spec.containers[0].ports[0].containerPort must be an integer from 1 to 65535"],
    ),
    (
        "container-port-name-not-iana",
        pod_yaml(
            {"containers": [{"name": "c", "ports": [{"containerPort": 80, "name": "web--x"}]}]}
        ),
        ["spec.containers[0].ports[0].name must be an IANA service name", "no '--'"],
    ),
    (
        "container-port-name-repeated",
        pod_yaml(
            {
                "containers": [
                    {"name": "a", "ports": [{"containerPort": 80, "name": "http"}]},
                    {"name": "b", "ports": [{"containerPort": 81, "name": "http"}]},
                ]
            }
        ),
        ['spec.containers[1].ports[0].name repeats the name "http" of spec.containers[0].ports[0]'],
    ),
    (
        "container-port-repeated",
        pod_yaml(
            {"containers": [{"name": "a", "ports": [{"containerPort": 80}, {"containerPort": 80}]}]}
        ),
        ["spec.containers[0].ports[1] repeats 80/TCP", "must be unique"],
    ),
    (
        "protocol-unknown",
        service_yaml({"ports": [{"port": 80, "protocol": "ICMP"}]}),
        ['spec.ports[0].protocol must be "TCP", "UDP" or "SCTP", not "ICMP"'],
    ),
    (
        "protocol-lowercase",
        pod_yaml(
            {"containers": [{"name": "c", "ports": [{"containerPort": 80, "protocol": "tcp"}]}]}
        ),
        ['spec.containers[0].ports[0].protocol must be "TCP", "UDP" or "SCTP", not "tcp"'],
    ),
    (
        "node-port-below-range",
        service_yaml({"type": "NodePort", "ports": [{"port": 80, "nodePort": 8080}]}),
        ["spec.ports[0].nodePort must be an integer from 30000 to 32767, not 8080"],
    ),
    (
        "node-port-above-range",
        service_yaml({"type": "NodePort", "ports": [{"port": 80, "nodePort": 32768}]}),
        ["from 30000 to 32767, not 32768"],
    ),
    (
        "node-port-on-cluster-ip",
        service_yaml({"ports": [{"port": 80, "nodePort": 30080}]}),
        ['spec.ports[0].nodePort may only be set when spec.type is "NodePort" or "LoadBalancer"'],
    ),
    (
        "node-port-repeated",
        service_yaml(
            {
                "type": "NodePort",
                "ports": [
                    {"name": "a", "port": 80, "nodePort": 30080},
                    {"name": "b", "port": 81, "nodePort": 30080},
                ],
            }
        ),
        ["spec.ports[1].nodePort repeats 30080/TCP of spec.ports[0]"],
    ),
    (
        "type-unknown",
        service_yaml({"type": "Ingress", "ports": PORT80}),
        ['spec.type must be "ClusterIP", "NodePort", "LoadBalancer" or "ExternalName", not '
         '"Ingress"'],
    ),
    (
        "cluster-ip-outside-service-cidr",
        service_yaml({"clusterIP": "10.96.0.10", "ports": PORT80}),
        [
            "spec.clusterIP must be",
            "an IPv4 address inside the Service CIDR 198.19.0.0/16",
            '"10.96.0.10"',
        ],
    ),
    (
        "cluster-ip-not-an-address",
        service_yaml({"clusterIP": "web", "ports": PORT80}),
        ['"None" (headless), empty (allocate) or an IPv4 address', 'not "web"'],
    ),
    (
        "cluster-ip-network-address",
        service_yaml({"clusterIP": "198.19.0.0", "ports": PORT80}),
        ["spec.clusterIP must be", 'not "198.19.0.0"'],
    ),
    (
        "cluster-ip-ipv6",
        service_yaml({"clusterIP": "fd00::10", "ports": PORT80}),
        ["spec.clusterIP must be", 'not "fd00::10"'],
    ),
    (
        "cluster-ips-dual-stack",
        service_yaml({"clusterIPs": ["198.19.0.5", "fd00::5"], "ports": PORT80}),
        ["spec.clusterIPs must hold one address", "dual-stack is not supported"],
    ),
    (
        "ip-families-ipv6",
        service_yaml({"ipFamilies": ["IPv6"], "ports": PORT80}),
        ['spec.ipFamilies[0] must be "IPv4", not "IPv6" (IPv6 is not supported)'],
    ),
    (
        "headless-node-port",
        service_yaml({"clusterIP": "None", "type": "NodePort", "ports": PORT80}),
        ['Service ns1/web spec.type must be "ClusterIP" when spec.clusterIP is "None" (headless)'],
    ),
    (
        "external-ip-outside-range",
        service_yaml({"externalIPs": ["198.18.0.5"], "ports": PORT80}),
        [
            "spec.externalIPs[0] must be an IPv4 address inside the external IP range 198.18.64.0/18",
            '"198.18.0.5"',
        ],
    ),
    (
        "external-ip-not-an-address",
        service_yaml({"externalIPs": ["198.18.64.1", "nope"], "ports": PORT80}),
        ["spec.externalIPs[1] must be an IPv4 address", '"nope"'],
    ),
    (
        "external-ip-repeated",
        service_yaml({"externalIPs": ["198.18.64.1", "198.18.64.1"], "ports": PORT80}),
        ["spec.externalIPs[1] repeats 198.18.64.1"],
    ),
    (
        "session-affinity-value",
        service_yaml({"sessionAffinity": "Sticky", "ports": PORT80}),
        ['spec.sessionAffinity must be "None" or "ClientIP", not "Sticky"'],
    ),
    (
        "affinity-timeout-zero",
        service_yaml(
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
                "ports": PORT80,
            }
        ),
        [
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds must be an integer from 1 to 86400, not 0"
        ],
    ),
    (
        "affinity-timeout-too-long",
        service_yaml(
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}},
                "ports": PORT80,
            }
        ),
        ["timeoutSeconds must be an integer from 1 to 86400, not 86401"],
    ),
    (
        "affinity-config-without-client-ip",
        service_yaml(
            {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}, "ports": PORT80}
        ),
        ['spec.sessionAffinityConfig may only be set when spec.sessionAffinity is "ClientIP"'],
    ),
    (
        "external-policy-value",
        service_yaml({"type": "NodePort", "externalTrafficPolicy": "Nearest", "ports": PORT80}),
        ['spec.externalTrafficPolicy must be "Cluster" or "Local", not "Nearest"'],
    ),
    (
        "internal-policy-value",
        service_yaml({"internalTrafficPolicy": "local", "ports": PORT80}),
        ['spec.internalTrafficPolicy must be "Cluster" or "Local", not "local"'],
    ),
    (
        "external-policy-local-on-cluster-ip",
        service_yaml({"externalTrafficPolicy": "Local", "ports": PORT80}),
        [
            'spec.externalTrafficPolicy may only be "Local" for a NodePort or LoadBalancer Service or one with spec.externalIPs'
        ],
    ),
    (
        "duplicate-service",
        service_yaml({"ports": PORT80}) + "---\n" + service_yaml({"ports": [{"port": 81}]}),
        [
            "web.yaml:10 (document 2): Service ns1/web is defined twice in one load, first at web.yaml:1 (document 1)"
        ],
    ),
    (
        "duplicate-pod-in-list",
        yaml.safe_dump(
            {"apiVersion": "v1", "kind": "List", "items": [yaml.safe_load(pod_yaml())] * 2}
        ),
        ["(document 1, items[1]): Pod ns1/p is defined twice", "first at web.yaml"],
    ),
    (
        "duplicate-port-and-protocol",
        service_yaml({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
        ["spec.ports[1] repeats port 80/TCP of spec.ports[0]", "each port and protocol pair"],
    ),
    (
        "multi-port-unnamed",
        service_yaml({"ports": [{"name": "a", "port": 80}, {"port": 81}]}),
        ["spec.ports[1].name is required when a Service has more than one port", "DNS-1123 label"],
    ),
    (
        "multi-port-name-repeated",
        service_yaml({"ports": [{"name": "http", "port": 80}, {"name": "http", "port": 81}]}),
        ['spec.ports[1].name repeats the name "http" of spec.ports[0]', "must be unique"],
    ),
    (
        "port-name-not-dns1123",
        service_yaml({"ports": [{"name": "HTTP", "port": 80}]}),
        ["spec.ports[0].name must be a DNS-1123 label", 'not "HTTP"'],
    ),
    (
        "no-ports",
        service_yaml({"selector": {"app": "web"}}),
        [
            "Service ns1/web spec.ports must list at least one port",
            'headless Service, clusterIP "None"',
        ],
    ),
    (
        "ports-not-a-list",
        service_yaml({"ports": {"port": 80}}),
        ["spec.ports must be a list, not a mapping"],
    ),
    (
        "unknown-spec-field",
        service_yaml({"selecter": {"app": "web"}, "ports": PORT80}),
        [
            "Service ns1/web spec.selecter is not a field of a Service spec (did you mean spec.selector)"
        ],
    ),
    (
        "unknown-port-field",
        service_yaml({"ports": [{"port": 80, "targetport": 8080}]}),
        [
            "spec.ports[0].targetport is not a field of a Service port (did you mean spec.ports[0].targetPort)"
        ],
    ),
    (
        "publish-not-ready-not-a-flag",
        service_yaml({"publishNotReadyAddresses": "yes", "ports": PORT80}),
        ['spec.publishNotReadyAddresses must be true, false or null, not "yes"'],
    ),
    (
        "label-value-not-a-string",
        service_yaml({"ports": PORT80}, labels={"version": 2}),
        ["Service ns1/web metadata.labels.version must be a string label value (quote it), not 2"],
    ),
    (
        "label-key-invalid",
        service_yaml({"ports": PORT80}, labels={"bad key": "x"}),
        ['metadata.labels has key "bad key", which is not a label key'],
    ),
    (
        "selector-value-invalid",
        service_yaml({"selector": {"app": "has space"}, "ports": PORT80}),
        ["spec.selector.app must be a label value", '"has space"'],
    ),
    (
        "slice-without-service-name",
        slice_yaml(metadata={"name": "web-abc", "namespace": "ns1"}),
        ["EndpointSlice ns1/web-abc metadata.labels must contain kubernetes.io/service-name"],
    ),
    (
        "slice-ipv6",
        slice_yaml(addressType="IPv6"),
        [
            'EndpointSlice ns1/web-abc addressType is "IPv6": it must be "IPv4" (IPv6 and FQDN are not supported)'
        ],
    ),
    (
        "slice-no-address-type",
        slice_yaml(addressType=None),
        ['addressType is required: it must be "IPv4"'],
    ),
    (
        "slice-condition-not-bool",
        slice_yaml(
            endpoints=[{"addresses": ["198.18.129.2"], "conditions": {"ready": "yes please"}}]
        ),
        ['endpoints[0].conditions.ready must be true, false or null, not "yes please"'],
    ),
    (
        "slice-address-outside",
        slice_yaml(endpoints=[{"addresses": ["10.0.0.1"]}]),
        [
            "endpoints[0].addresses[0] must be an IPv4 address inside the benchmark range 198.18.0.0/15"
        ],
    ),
    (
        "slice-no-addresses",
        slice_yaml(endpoints=[{"nodeName": "node1"}]),
        ["endpoints[0].addresses must list from 1 to 100 IPv4 addresses, not 0"],
    ),
    (
        "slice-port-out-of-range",
        slice_yaml(ports=[{"name": "http", "port": 0}]),
        ["EndpointSlice ns1/web-abc ports[0].port must be an integer from 1 to 65535, not 0"],
    ),
    (
        "slice-port-name-repeated",
        slice_yaml(ports=[{"port": 80}, {"port": 81}]),
        ['ports[1].name repeats the name "" of ports[0]'],
    ),
    (
        "pod-ready-status",
        pod_yaml(status={"conditions": [{"type": "Ready", "status": "Maybe"}]}),
        ['Pod ns1/p status.conditions[0].status must be "True", "False" or "Unknown", not "Maybe"'],
    ),
    (
        "metadata-not-a-mapping",
        "apiVersion: v1\nkind: Pod\nmetadata: [p]\n",
        ["Pod metadata must be a mapping, not a list"],
    ),
    # Strict field validation, as Kubernetes: a typo is an error, not a silent default.
    (
        "labels-typo",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ns1, lables: {app: web}}\n",
        ["Pod ns1/p metadata.lables is not a field of object metadata (did you mean metadata.labe"],
    ),
    (
        "container-ports-typo",
        pod_yaml({"containers": [{"name": "c", "prots": [{"containerPort": 9090}]}]}),
        [
            "Pod ns1/p spec.containers[0].prots is not a field of a container "
            "(did you mean spec.containers[0].ports)"
        ],
    ),
    (
        "pod-spec-typo",
        pod_yaml({"containers": [{"name": "c"}], "nodename": "node1"}),
        ["Pod ns1/p spec.nodename is not a field of a Pod spec (did you mean spec.nodeName)"],
    ),
    (
        "pod-status-typo",
        pod_yaml(status={"condition": [{"type": "Ready", "status": "False"}]}),
        ["Pod ns1/p status.condition is not a field of a Pod status (did you mean status.conditio"],
    ),
    (
        "pod-condition-typo",
        pod_yaml(status={"conditions": [{"type": "Ready", "stauts": "False"}]}),
        ["status.conditions[0].stauts is not a field of a Pod condition (did you mean"],
    ),
    (
        "pod-list-around-a-pod",
        "apiVersion: v1\nkind: PodList\nmetadata: {name: p}\nspec: {containers: []}\n",
        ["v1 PodList spec is not a field of a List (it reads apiVersion, items, kind, metadata)"],
    ),
    (
        "list-metadata-name",
        "apiVersion: v1\nkind: List\nmetadata: {name: p}\nitems: []\n",
        ["v1 List metadata.name is not a field of list metadata (it reads continue,"],
    ),
    (
        "service-status-typo",
        service_yaml({"ports": PORT80}) + "status: {loadBalancers: {}}\n",
        ["Service ns1/web status.loadBalancers is not a field of a Service status (did you mean"],
    ),
    (
        "target-ref-typo",
        slice_yaml(endpoints=[{"addresses": ["198.18.129.2"], "targetRef": {"nmae": "p"}}]),
        ["endpoints[0].targetRef.nmae is not a field of an object reference (did you mean"],
    ),
    (
        "unknown-field-long-list-not-listed",
        pod_yaml({"containers": [], "zzz": 1}),
        ["Pod ns1/p spec.zzz is not a field of a Pod spec."],
    ),
    (
        "host-network",
        pod_yaml({"containers": [], "hostNetwork": True}),
        ["Pod ns1/p spec.hostNetwork must be false or absent"],
    ),
    # Bad input that used to escape as an internal exception.
    (
        "kind-a-list",
        "apiVersion: v1\nkind: [Pod]\nmetadata: {name: p}\n",
        ['apiVersion "v1" kind a list (default/p) is not a kind svcbench reads'],
    ),
    (
        "integer-beyond-64-bits",
        service_yaml({"ports": [{"port": int("9" * 30)}]}),
        ["the integer 9999", "(30 characters) does not fit in 64 bits", "quote it"],
    ),
    (
        "sexagesimal-integer",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, generation: 1" + ":1" * 60 + "}\n",
        ["web.yaml:3 (document 1): the integer 1:1:1:", "(121 characters) does not fit"],
    ),
    (
        "timestamp-that-does-not-exist",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, deletionTimestamp: 2024-13-45}\n",
        ["web.yaml:3 (document 1): 2024-13-45 is not a valid timestamp (month must be in 1..12)"],
    ),
    (
        "anchor-defined-twice",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: &n p, namespace: &n ns1}\n",
        ["web.yaml:3 is not valid YAML: the anchor &n is defined twice (first on line 3)"],
    ),
    (
        "nested-too-deep",
        pod_yaml({"containers": []}).replace("containers: []", "x: " + "[" * 990 + "]" * 990),
        ["web.yaml:7 (document 1): values nest deeper than 100 levels here"],
    ),
    # LoadBalancer, ExternalName, topology and SCTP (issue 14)
    (
        "ingress-ip-outside-load-balancer-range",
        lb_yaml({}, ingress=[{"ip": "198.18.64.1"}]),
        [
            "Service ns1/web status.loadBalancer.ingress[0].ip must be an IPv4 address inside "
            'the load-balancer range 198.18.32.0/19, not "198.18.64.1"'
        ],
    ),
    (
        "ingress-ip-missing",
        lb_yaml({}, ingress=[{"ipMode": "VIP"}]),
        ["status.loadBalancer.ingress[0].ip is required: an IPv4 address inside 198.18.32.0/19"],
    ),
    (
        "ingress-ip-repeated",
        lb_yaml({}, ingress=[{"ip": "198.18.32.1"}, {"ip": "198.18.32.1"}]),
        ["status.loadBalancer.ingress[1].ip repeats 198.18.32.1: each ingress IP may appear once"],
    ),
    (
        "ingress-hostname",
        lb_yaml({}, ingress=[{"hostname": "lb.example.com"}]),
        ["status.loadBalancer.ingress[0].hostname is not supported: give ip"],
    ),
    (
        "ingress-ip-mode-proxy",
        lb_yaml({}, ingress=[{"ip": "198.18.32.1", "ipMode": "Proxy"}]),
        ['status.loadBalancer.ingress[0].ipMode must be "VIP", not "Proxy"'],
    ),
    (
        "ingress-on-cluster-ip",
        yaml.safe_dump(
            {
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"ports": PORT80},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.18.32.1"}]}},
            }
        ),
        ['status.loadBalancer.ingress[0] may only be set when spec.type is "LoadBalancer"'],
    ),
    (
        "source-range-not-a-cidr",
        lb_yaml({"loadBalancerSourceRanges": ["198.18.0.0/33"]}),
        [
            "spec.loadBalancerSourceRanges[0] must be an IPv4 CIDR such as 198.18.0.0/24, "
            'not "198.18.0.0/33"'
        ],
    ),
    (
        "source-range-bare-address",
        lb_yaml({"loadBalancerSourceRanges": ["198.18.0.200"]}),
        ['spec.loadBalancerSourceRanges[0] must be an IPv4 CIDR such as 198.18.0.0/24, not "198'],
    ),
    (
        "source-range-on-node-port",
        service_yaml({"type": "NodePort", "ports": PORT80,
                      "loadBalancerSourceRanges": ["198.18.0.0/24"]}),
        ['spec.loadBalancerSourceRanges[0] may only be set when spec.type is "LoadBalancer"'],
    ),
    (
        "health-check-node-port-under-cluster-policy",
        lb_yaml({"healthCheckNodePort": 30500}),
        [
            'spec.healthCheckNodePort may only be set when spec.type is "LoadBalancer" and '
            'spec.externalTrafficPolicy is "Local"'
        ],
    ),
    (
        "health-check-node-port-out-of-range",
        lb_yaml({"externalTrafficPolicy": "Local", "healthCheckNodePort": 80}),
        ["spec.healthCheckNodePort must be an integer from 30000 to 32767, not 80"],
    ),
    (
        "health-check-node-port-is-a-node-port",
        lb_yaml({"externalTrafficPolicy": "Local", "healthCheckNodePort": 30080,
                 "ports": [{"port": 80, "nodePort": 30080}]}),
        ["spec.healthCheckNodePort repeats spec.ports[0].nodePort 30080: it needs its own port"],
    ),
    (
        "allocate-node-ports-on-node-port",
        service_yaml({"type": "NodePort", "ports": PORT80, "allocateLoadBalancerNodePorts": False}),
        ['spec.allocateLoadBalancerNodePorts may only be set when spec.type is "LoadBalancer"'],
    ),
    (
        "allocate-node-ports-not-a-flag",
        lb_yaml({"allocateLoadBalancerNodePorts": "no"}),
        ['spec.allocateLoadBalancerNodePorts must be true, false or null, not "no"'],
    ),
    (
        "headless-load-balancer",
        lb_yaml({"clusterIP": "None"}),
        ['spec.type must be "ClusterIP" when spec.clusterIP is "None" (headless)'],
    ),
    (
        "traffic-distribution-unknown",
        service_yaml({"ports": PORT80, "trafficDistribution": "PreferSameNode"}),
        [
            'spec.trafficDistribution must be "PreferClose" or "PreferSameZone", not '
            '"PreferSameNode" (PreferSameNode is not supported)'
        ],
    ),
    (
        "external-name-missing",
        service_yaml({"type": "ExternalName"}),
        ["spec.externalName is required: a DNS name such as db.example.com"],
    ),
    (
        "external-name-not-dns",
        service_yaml({"type": "ExternalName", "externalName": "db_1.example.com"}),
        ["spec.externalName must be a DNS name", 'not "db_1.example.com"'],
    ),
    (
        "external-name-on-cluster-ip",
        service_yaml({"ports": PORT80, "externalName": "db.example.com"}),
        ['spec.externalName may only be set when spec.type is "ExternalName"'],
    ),
    (
        "external-name-with-cluster-ip",
        service_yaml({"type": "ExternalName", "externalName": "db.example.com",
                      "clusterIP": "198.19.0.5"}),
        ["spec.clusterIP must be empty for an ExternalName Service (it has no ClusterIP)"],
    ),
    (
        "endpoint-zone-not-a-label-value",
        slice_yaml(endpoints=[{"addresses": ["198.18.129.2"], "zone": "zone 1"}]),
        ['endpoints[0].zone must be a zone name (a non-empty label value', 'not "zone 1"'],
    ),
    (
        "zone-hint-repeated",
        slice_yaml(endpoints=[{"addresses": ["198.18.129.2"],
                               "hints": {"forZones": [{"name": "a"}, {"name": "a"}]}}]),
        ['endpoints[0].hints.forZones[1].name repeats "a": each zone may appear once'],
    ),
    (
        "zone-hint-empty-name",
        slice_yaml(endpoints=[{"addresses": ["198.18.129.2"], "hints": {"forZones": [{}]}}]),
        ["endpoints[0].hints.forZones[0].name is required: a zone name"],
    ),
    (
        "zone-hints-too-many",
        slice_yaml(endpoints=[{"addresses": ["198.18.129.2"],
                               "hints": {"forZones": [{"name": f"z{i}"} for i in range(9)]}}]),
        ["endpoints[0].hints.forZones must list at most 8 zones, not 9"],
    ),
    (
        "zone-hint-typo",
        slice_yaml(endpoints=[{"addresses": ["198.18.129.2"], "hints": {"forZone": []}}]),
        ["endpoints[0].hints.forZone is not a field of endpoint hints (did you mean"],
    ),
    (
        "node-hints",
        slice_yaml(endpoints=[{"addresses": ["198.18.129.2"],
                               "hints": {"forNodes": [{"name": "node1"}]}}]),
        ["endpoints[0].hints.forNodes must be empty or absent (node hints are not supported)"],
    ),
    (
        "node-name-not-dns",
        "apiVersion: v1\nkind: Node\nmetadata: {name: Node_1}\n",
        ['Node metadata.name must be a DNS-1123 subdomain', 'not "Node_1"'],
    ),
    (
        "node-zone-label-not-a-value",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n"
        "  labels: {topology.kubernetes.io/zone: 'a b'}\n",
        ['Node node1 metadata.labels["topology.kubernetes.io/zone"] must be a label value'],
    ),
    (
        "node-namespaced",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node1, namespace: ns1}\n",
        ["Node node1 metadata.namespace must be absent: a Node belongs to no namespace"],
    ),
]


@pytest.mark.parametrize(
    ("text", "fragments"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED]
)
def test_rejected_with_one_sentence_naming_object_field_and_accepted_values(text, fragments):
    message = error_of(text)
    assert message.startswith("web.yaml")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_field_path_uses_kubernetes_form():
    assert field_path(("spec", "ports", 0, "port")) == "spec.ports[0].port"
    assert field_path(("metadata", "labels", "kubernetes.io/service-name")) == (
        'metadata.labels["kubernetes.io/service-name"]'
    )
    assert field_path(("spec", "x" * 1000)) == "spec." + "x" * 57 + "..."


def test_strict_validation_accepts_what_kubectl_get_prints():
    pod = """\
        apiVersion: v1
        kind: Pod
        metadata:
          name: web-1
          namespace: ns1
          uid: 0b7e4c1c-6c1e-4a57-9d0e-3b1c9e0f7f2a
          resourceVersion: "4711"
          creationTimestamp: "2024-05-01T10:00:00Z"
          labels: {app: web}
          annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
          ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d, uid: x}]
          managedFields: [{manager: kubectl, operation: Apply, fieldsV1: {f:spec: {}}}]
        spec:
          nodeName: node1
          restartPolicy: Always
          dnsPolicy: ClusterFirst
          tolerations: [{key: k, operator: Exists}]
          volumes: [{name: v, emptyDir: {}}]
          containers:
          - name: echo
            image: svcbench/echo
            env: [{name: A, value: b}]
            resources: {limits: {cpu: 100m}}
            readinessProbe: {tcpSocket: {port: 8080}}
            ports: [{containerPort: 8080, name: http, protocol: TCP}]
        status:
          phase: Running
          podIP: 10.0.0.5
          hostIP: 192.0.2.1
          startTime: "2024-05-01T10:00:01Z"
          conditions:
          - {type: Ready, status: "True", lastProbeTime: null,
             lastTransitionTime: "2024-05-01T10:00:03Z"}
          containerStatuses: [{name: echo, ready: true}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: ns1, generation: 1}
        spec:
          ports: [{port: 80, targetPort: http}]
          selector: {app: web}
        status: {loadBalancer: {}}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSliceList
        metadata: {resourceVersion: "9"}
        items:
        - metadata:
            name: web-abc
            namespace: ns1
            labels: {kubernetes.io/service-name: web}
          addressType: IPv4
          endpoints:
          - addresses: [198.18.129.2]
            targetRef: {kind: Pod, namespace: ns1, name: web-1, uid: x, resourceVersion: "1"}
          ports: [{port: 8080, name: ""}]
        """
    m = load_manifests(textwrap.dedent(pod))
    assert (len(m.pods), len(m.services), len(m.endpoint_slices)) == (1, 1, 1)


# --------------------------------------------------------------------------- apply / delete


def test_merged_replaces_same_kind_namespace_name_and_keeps_order():
    base = load_manifests(
        service_yaml({"ports": PORT80}, name="a")
        + "---\n"
        + service_yaml({"ports": PORT80}, name="b")
        + "---\n"
        + pod_yaml(name="a")
    )
    change = load_manifests(
        service_yaml({"ports": [{"port": 81}]}, name="a")
        + "---\n"
        + service_yaml({"ports": PORT80}, name="c")
    )
    merged = base.merged(change)
    assert [(s.name, s.ports[0].port) for s in merged.services] == [("a", 81), ("b", 80), ("c", 80)]
    assert merged.pods == base.pods  # a Pod named "a" is another object than Service "a"
    assert base.merged(Manifests()) == base


def test_without_removes_the_named_objects_only():
    base = load_manifests(FULL)
    gone = load_manifests(service_yaml({"ports": [{"port": 9}]}))  # same name, other content
    left = base.without(gone)
    assert left.services == () and left.pods == base.pods
    assert left.endpoint_slices == base.endpoint_slices
    assert base.without(base) == Manifests()


def test_to_documents_reads_back_equal_through_json_and_yaml():
    m = load_manifests(FULL).merged(
        load_manifests(
            service_yaml({"clusterIP": "None", "selector": {"app": "web"}}, name="headless")
            + "---\n"
            + service_yaml({"ports": [{"port": 80, "targetPort": 8080}]}, name="plain")
            + "---\n"
            + pod_yaml(name="plain-pod")
            + "---\n"
            + lb_yaml(
                {"externalTrafficPolicy": "Local", "healthCheckNodePort": 30500,
                 "loadBalancerSourceRanges": ["198.18.0.0/24"],
                 "allocateLoadBalancerNodePorts": False, "trafficDistribution": "PreferClose",
                 "publishNotReadyAddresses": True,
                 "ports": [{"port": 80, "protocol": "SCTP"}]},
                ingress=[{"ip": "198.18.32.1"}],
            ).replace("name: web", "name: lb")
            + "---\n"
            + service_yaml({"type": "ExternalName", "externalName": "db.example.com"}, name="db")
            + "---\n"
            + slice_yaml(endpoints=[{"addresses": ["198.18.129.2"], "zone": "zone1",
                                     "hints": {"forZones": [{"name": "zone1"}]}}])
            + "---\n"
            + "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n"
            + "  labels: {topology.kubernetes.io/zone: east}\n"
        )
    )
    docs = m.to_documents()
    assert load_documents(docs) == m
    listed = {"apiVersion": "v1", "kind": "List", "items": docs}
    assert load_manifests(json.dumps(listed), "state.json") == m
    assert load_manifests(yaml.safe_dump_all(docs)) == m
    assert all(set(d) >= {"apiVersion", "kind", "metadata"} for d in docs)


def test_load_documents_errors_name_the_document():
    with pytest.raises(ManifestError, match=r"^state.json \(document 2\): Pod metadata.name"):
        load_documents(
            [
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}},
                {"apiVersion": "v1", "kind": "Pod", "metadata": {}},
            ],
            "state.json",
        )


# --------------------------------------------------------------------------- files


def test_load_files_reads_files_directories_and_stdin_as_one_load(tmp_path, monkeypatch):
    (tmp_path / "svc.yaml").write_text(service_yaml({"ports": PORT80}, name="a"))
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "1.yml").write_text(service_yaml({"ports": PORT80}, name="b"))
    (folder / "2.json").write_text(json.dumps(yaml.safe_load(pod_yaml())))
    (folder / "notes.txt").write_text("not a manifest: [")
    monkeypatch.setattr("sys.stdin", io.StringIO(service_yaml({"ports": PORT80}, name="c")))
    m = load_files([tmp_path / "svc.yaml", str(folder), "-"])
    assert [s.name for s in m.services] == ["a", "b", "c"]
    assert [p.name for p in m.pods] == ["p"]


def test_load_files_refuses_an_object_given_twice_across_files(tmp_path):
    for name in ("one.yaml", "two.yaml"):
        (tmp_path / name).write_text(service_yaml({"ports": PORT80}))
    with pytest.raises(ManifestError) as info:
        load_files([tmp_path / "one.yaml", tmp_path / "two.yaml"])
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'two.yaml'}:1 (document 1): Service ns1/web")
    assert f"first at {tmp_path / 'one.yaml'}:1" in message


def test_load_files_reports_unreadable_files(tmp_path):
    with pytest.raises(ManifestError, match="missing.yaml cannot be read: No such file"):
        load_files([tmp_path / "missing.yaml"])
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ManifestError, match="bin.yaml is not a UTF-8 text file"):
        load_files([tmp_path / "bin.yaml"])
