"""Kubernetes YAML -> kube.model objects, validated at the edge.

Reads v1 Pod, v1 Service, discovery.k8s.io/v1 EndpointSlice and v1 Node (its labels), alone,
in a multi-document stream, or inside a List, and rejects anything svcbench cannot honour
with a `ManifestError`: one sentence naming the file and line, the object, the field in
Kubernetes path form and the values it accepts. Checks that need the rest of the cluster live in kube/state.py.

Field validation is strict, as Kubernetes' `--validate=strict`: every mapping svcbench reads
refuses a field its Kubernetes type does not have, so a typo such as `lables` is an error
rather than a pod that silently selects nothing. Fields svcbench ignores (a container's env,
a pod's volumes) are accepted by name; their contents are not read. Files are read within
the bounds of kube/yamlload.py: size, nesting and alias expansion.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from kube.model import (
    AFFINITY_CLIENT_IP,
    AFFINITY_NONE,
    DEFAULT_AFFINITY_TIMEOUT_S,
    HEADLESS,
    PLAN,
    POLICY_CLUSTER,
    POLICY_LOCAL,
    PREFER_CLOSE,
    PREFER_SAME_ZONE,
    SERVICE_PROTOCOLS,
    SERVICE_TYPES,
    TCP,
    TYPE_CLUSTER_IP,
    TYPE_EXTERNAL_NAME,
    TYPE_LOAD_BALANCER,
    TYPE_NODE_PORT,
    AddressPlan,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    NodeLabels,
    Pod,
    Service,
    ServicePort,
)
from kube.yamlload import MAX_BYTES, ManifestLoader, YAMLLimitError, shortened


class ManifestError(ValueError):
    """A manifest svcbench cannot use: one sentence naming source, object, field and accepted values."""


API_V1 = "v1"
API_DISCOVERY = "discovery.k8s.io/v1"
POD = "Pod"
SERVICE = "Service"
ENDPOINT_SLICE = "EndpointSlice"
NODE = "Node"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_AFFINITY_TIMEOUT_S = 86400
BENCHMARK_CIDR = "198.18.0.0/15"  # RFC 2544: every address svcbench uses
MAX_SLICE_ADDRESSES = 100  # Kubernetes' limit per endpoint
MAX_ZONE_HINTS = 8  # Kubernetes' limit of hints.forZones per endpoint
# to_documents writes this for a terminating pod: any deletionTimestamp means terminating.
DELETION_TIMESTAMP = "1970-01-01T00:00:00Z"
ECHO_IMAGE = "svcbench/echo"  # what runs in a pod here; written only so documents look like pods

KINDS = {(API_V1, POD), (API_V1, SERVICE), (API_DISCOVERY, ENDPOINT_SLICE), (API_V1, NODE)}
# A List's items name their own kind; the API's typed lists leave it out.
LIST_KINDS = {
    (API_V1, "List"): None,
    (API_V1, "PodList"): (API_V1, POD),
    (API_V1, "ServiceList"): (API_V1, SERVICE),
    (API_DISCOVERY, "EndpointSliceList"): (API_DISCOVERY, ENDPOINT_SLICE),
    (API_V1, "NodeList"): (API_V1, NODE),
}
ACCEPTED_KINDS = (
    "v1 Pod, v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node or a v1 List of them"
)

# Each Kubernetes type's fields, as of v1.31, for strict validation: anything else is a typo.
OBJECT_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
OBJECT_META_FIELDS = frozenset(
    {
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
        "annotations", "ownerReferences", "finalizers", "managedFields",
    }
)  # fmt: skip
LIST_FIELDS = frozenset({"apiVersion", "kind", "metadata", "items"})
LIST_META_FIELDS = frozenset({"resourceVersion", "continue", "remainingItemCount", "selfLink"})
POD_SPEC_FIELDS = frozenset(
    {
        "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers",
        "dnsConfig", "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases",
        "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname", "imagePullSecrets",
        "initContainers", "nodeName", "nodeSelector", "os", "overhead", "preemptionPolicy",
        "priority", "priorityClassName", "readinessGates", "resourceClaims", "resources",
        "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
        "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN",
        "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds", "tolerations",
        "topologySpreadConstraints", "volumes",
    }
)  # fmt: skip
CONTAINER_FIELDS = frozenset(
    {
        "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle",
        "livenessProbe", "name", "ports", "readinessProbe", "resizePolicy", "resources",
        "restartPolicy", "securityContext", "startupProbe", "stdin", "stdinOnce",
        "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices",
        "volumeMounts", "workingDir",
    }
)  # fmt: skip
POD_STATUS_FIELDS = frozenset(
    {
        "conditions", "containerStatuses", "ephemeralContainerStatuses", "hostIP", "hostIPs",
        "initContainerStatuses", "message", "nominatedNodeName", "phase", "podIP", "podIPs",
        "qosClass", "reason", "resize", "resourceClaimStatuses", "startTime",
    }
)  # fmt: skip
POD_CONDITION_FIELDS = frozenset(
    {"type", "status", "lastProbeTime", "lastTransitionTime", "reason", "message"}
)
SERVICE_STATUS_FIELDS = frozenset({"conditions", "loadBalancer"})
LOAD_BALANCER_STATUS_FIELDS = frozenset({"ingress"})
INGRESS_FIELDS = frozenset({"ip", "hostname", "ipMode", "ports"})
OBJECT_REFERENCE_FIELDS = frozenset(
    {"apiVersion", "kind", "namespace", "name", "uid", "resourceVersion", "fieldPath"}
)
SLICE_FIELDS = frozenset({"apiVersion", "kind", "metadata", "addressType", "endpoints", "ports"})
SERVICE_SPEC_FIELDS = frozenset(
    {
        "ports", "selector", "clusterIP", "clusterIPs", "type", "externalIPs",
        "sessionAffinity", "sessionAffinityConfig", "externalTrafficPolicy",
        "internalTrafficPolicy", "ipFamilies", "ipFamilyPolicy", "publishNotReadyAddresses",
        "loadBalancerIP", "loadBalancerSourceRanges", "loadBalancerClass", "externalName",
        "healthCheckNodePort", "allocateLoadBalancerNodePorts", "trafficDistribution",
    }
)  # fmt: skip
SERVICE_PORT_FIELDS = frozenset(
    {"name", "protocol", "appProtocol", "port", "targetPort", "nodePort"}
)
CONTAINER_PORT_FIELDS = frozenset({"name", "containerPort", "protocol", "hostPort", "hostIP"})
ENDPOINT_FIELDS = frozenset(
    {"addresses", "conditions", "hostname", "targetRef", "nodeName", "zone", "hints",
     "deprecatedTopology"}
)  # fmt: skip
CONDITION_FIELDS = frozenset({"ready", "serving", "terminating"})
HINTS_FIELDS = frozenset({"forZones", "forNodes"})
FOR_ZONE_FIELDS = frozenset({"name"})
ENDPOINT_PORT_FIELDS = frozenset({"name", "protocol", "port", "appProtocol"})
LISTED_FIELDS_MAX = 100  # an unknown-field error lists the accepted fields up to this length

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")

DNS1123_LABEL = (
    "a DNS-1123 label (at most 63 lowercase letters, digits or '-', "
    "starting and ending with a letter or digit)"
)
DNS1035_LABEL = (
    "a DNS-1035 label (at most 63 lowercase letters, digits or '-', "
    "starting with a letter and ending with a letter or digit)"
)
DNS1123_SUBDOMAIN = "a DNS-1123 subdomain (DNS-1123 labels joined by '.', at most 253 characters)"
IANA_SVC_NAME = (
    "an IANA service name (at most 15 lowercase letters, digits or '-', with at least one "
    "letter, no '--' and no '-' at either end)"
)
LABEL_KEY = "a label key ([prefix/]name, name at most 63 letters, digits, '-', '_' or '.')"
LABEL_VALUE = "a label value (at most 63 letters, digits, '-', '_' or '.', possibly empty)"

Field = tuple[str | int, ...]


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1123_LABEL.fullmatch(value) is not None


def is_dns1035_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1035_LABEL.fullmatch(value) is not None


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= 253 and all(is_dns1123_label(p) for p in value.split("."))


def is_iana_svc_name(value: str) -> bool:
    return (
        len(value) <= 15
        and _IANA_SVC_NAME.fullmatch(value) is not None
        and "--" not in value
        and any(c.isalpha() for c in value)
    )


def is_label_key(value: str) -> bool:
    prefix, slash, name = value.rpartition("/")
    if slash and not (prefix and is_dns1123_subdomain(prefix)):
        return False
    return len(name) <= 63 and _LABEL_NAME.fullmatch(name) is not None


def is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and _LABEL_NAME.fullmatch(value) is not None)


def field_path(path: Field) -> str:
    """("spec", "ports", 0, "port") -> "spec.ports[0].port", the form Kubernetes errors use."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        shown = shortened(part, 60)  # an unknown key may be any length
        if "." in part or "/" in part:  # a label key: keep it one segment
            out += f'["{shown}"]'
        else:
            out += f".{shown}" if out else shown
    return out


def _shown(value: Any) -> str:
    """A value as an error quotes it: short, and never a walk through a nested value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(shortened(value, 60))
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return shortened(str(value), 60)


def _one_of(choices: Iterable[str]) -> str:
    quoted = [f'"{c}"' for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


# --------------------------------------------------------------------------- where


@dataclass(frozen=True)
class _Place:
    """Where an object came from: file, document, List item, and its YAML node for lines."""

    source: str
    document: int  # 1-based position in the stream
    node: yaml.Node | None = None
    item: int | None = None  # position in a List's items

    def at(self, path: Field = ()) -> str:
        line = self._line(path)
        where = f"{self.source}:{line}" if line else self.source
        inside = f", items[{self.item}]" if self.item is not None else ""
        return f"{where} (document {self.document}{inside})"

    def _line(self, path: Field) -> int | None:
        """The line of the deepest part of path written in the document."""
        node = self.node
        if node is None:
            return None
        line = node.start_mark.line + 1
        full = (("items", self.item) if self.item is not None else ()) + tuple(path)
        for part in full:
            child = None
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == part:
                        child, line = value, key.start_mark.line + 1
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part < len(node.value):
                    child = node.value[part]
                    line = child.start_mark.line + 1
            if child is None:
                break
            node = child
        return line


class _Reader:
    """Reads one object's fields; every failure is one sentence naming place, object and field."""

    def __init__(self, place: _Place, kind: str, body: dict):
        self.place = place
        self.body = body
        self.ident = kind  # "Service ns1/web" once the name is known

    def fail(self, path: Field, problem: str) -> NoReturn:
        name = field_path(path)
        subject = f"{self.ident} {name}" if name else self.ident
        raise ManifestError(f"{self.place.at(path)}: {subject} {problem}.")

    def get(self, path: Field) -> Any:
        """The value at path; None when it or a parent is absent or null, as Kubernetes reads it."""
        value: Any = self.body
        for i, part in enumerate(path):
            if value is None:
                return None
            if isinstance(part, str):
                if not isinstance(value, dict):
                    self.fail(path[:i], f"must be a mapping, not {_shown(value)}")
                value = value.get(part)
            else:
                value = value[part]
        return value

    def mapping(self, path: Field, known: frozenset[str] | None = None, what: str = "") -> dict:
        value = self.get(path)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, not {_shown(value)}")
        if known is not None:
            self.known_fields(path, value, known, what)
        return value

    def known_fields(self, path: Field, value: dict, known: frozenset[str], what: str) -> None:
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                listed = ", ".join(sorted(known))
                if close:
                    hint = f" (did you mean {field_path(path + (close[0],))})"
                elif len(listed) <= LISTED_FIELDS_MAX:
                    hint = f" (it reads {listed})"
                else:
                    hint = ""
                self.fail(path + (str(key),), f"is not a field of {what}{hint}")

    def sequence(self, path: Field) -> list:
        value = self.get(path)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"must be a list, not {_shown(value)}")
        return value

    def string(self, path: Field, required: str = "") -> str | None:
        """A string or None; `required` says what the value must be when it is missing."""
        value = self.get(path)
        if value is None or value == "":
            if required:
                self.fail(path, f"is required: {required}")
            return None
        if not isinstance(value, str):
            self.fail(path, f"must be a string, not {_shown(value)}")
        return value

    def name(self, path: Field, valid, accepted: str, required: bool = False) -> str | None:
        value = self.string(path, required=accepted if required else "")
        if value is not None and not valid(value):
            self.fail(path, f"must be {accepted}, not {_shown(value)}")
        return value

    def integer(self, path: Field, lo: int, hi: int, required: bool = False) -> int | None:
        value = self.get(path)
        accepted = f"an integer from {lo} to {hi}"
        if value is None:
            if required:
                self.fail(path, f"is required: {accepted}")
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(path, f"must be {accepted}, not {_shown(value)}")
        return value

    def choice(self, path: Field, choices: Iterable[str], default: str, why: str = "") -> str:
        choices = tuple(choices)
        value = self.get(path)
        if value is None or value == "":
            return default
        if value not in choices:
            self.fail(path, f"must be {_one_of(choices)}, not {_shown(value)}{why}")
        return value

    def flag(self, path: Field) -> bool | None:
        value = self.get(path)
        if value is not None and not isinstance(value, bool):
            self.fail(path, f"must be true, false or null, not {_shown(value)}")
        return value

    def protocol(self, path: Field) -> str:
        return self.choice(path, SERVICE_PROTOCOLS, TCP)

    def string_map(self, path: Field, what: str) -> dict[str, str]:
        value = self.mapping(path)
        for key, item in value.items():
            if not isinstance(key, str) or not is_label_key(key):
                self.fail(path, f"has key {_shown(key)}, which is not {LABEL_KEY}")
            if not isinstance(item, str):
                self.fail(path + (key,), f"must be a string {what} (quote it), not {_shown(item)}")
            if not is_label_value(item):
                self.fail(path + (key,), f"must be {LABEL_VALUE}, not {_shown(item)}")
        return dict(value)

    def ipv4(self, path: Field, value: Any, inside: str, cidr: str) -> str:
        accepted = f"an IPv4 address inside the {inside} {cidr}"
        try:
            ip = ipaddress.IPv4Address(value) if isinstance(value, str) else None
        except ValueError:
            ip = None
        if ip is None or ip not in ipaddress.ip_network(cidr):
            self.fail(path, f"must be {accepted}, not {_shown(value)}")
        return value

    def metadata(self, name_valid=is_dns1123_label, name_rule: str = DNS1123_LABEL):
        """(namespace, name, labels); afterwards failures name the object."""
        meta = self.mapping(("metadata",))
        namespace = self.name(("metadata", "namespace"), is_dns1123_label, DNS1123_LABEL)
        namespace = namespace or "default"
        name = self.name(("metadata", "name"), name_valid, name_rule, required=True)
        self.ident = f"{self.ident} {namespace}/{name}"
        self.known_fields(("metadata",), meta, OBJECT_META_FIELDS, "object metadata")
        labels = self.string_map(("metadata", "labels"), "label value")
        return namespace, name, labels


# --------------------------------------------------------------------------- kinds


def _read_pod(r: _Reader) -> Pod:
    namespace, name, labels = r.metadata()
    r.known_fields((), r.body, OBJECT_FIELDS, "a Pod")
    r.mapping(("spec",), POD_SPEC_FIELDS, "a Pod spec")
    node_name = r.name(("spec", "nodeName"), is_dns1123_subdomain, DNS1123_SUBDOMAIN)
    if r.flag(("spec", "hostNetwork")):
        r.fail(
            ("spec", "hostNetwork"),
            "must be false or absent (every pod gets its own network here; for the host "
            "network, probe --from node/NAME)",
        )
    ports: list[ContainerPort] = []
    seen_names: dict[str, Field] = {}
    seen_ports: dict[tuple[int, str], Field] = {}
    for c, _ in enumerate(r.sequence(("spec", "containers"))):
        r.mapping(("spec", "containers", c), CONTAINER_FIELDS, "a container")
        for p, _ in enumerate(r.sequence(("spec", "containers", c, "ports"))):
            at = ("spec", "containers", c, "ports", p)
            r.mapping(at, CONTAINER_PORT_FIELDS, "a container port")
            number = r.integer(at + ("containerPort",), 1, 65535, required=True)
            protocol = r.protocol(at + ("protocol",))
            port_name = r.name(at + ("name",), is_iana_svc_name, IANA_SVC_NAME)
            if port_name is not None:
                if port_name in seen_names:
                    r.fail(
                        at + ("name",),
                        f"repeats the name {_shown(port_name)} of "
                        f"{field_path(seen_names[port_name])}: port names in a pod must be unique",
                    )
                seen_names[port_name] = at
            if (number, protocol) in seen_ports:
                r.fail(
                    at,
                    f"repeats {number}/{protocol} of {field_path(seen_ports[number, protocol])}: "
                    "each containerPort and protocol pair in a pod must be unique",
                )
            seen_ports[number, protocol] = at
            ports.append(ContainerPort(number, protocol, port_name))
    ready = True  # no Ready condition: a running pod
    r.mapping(("status",), POD_STATUS_FIELDS, "a Pod status")
    for i, _ in enumerate(r.sequence(("status", "conditions"))):
        at = ("status", "conditions", i)
        r.mapping(at, POD_CONDITION_FIELDS, "a Pod condition")
        if r.get(at + ("type",)) != "Ready":
            continue
        status = r.get(at + ("status",))
        if isinstance(status, bool):  # YAML 1.1 reads an unquoted True as a boolean
            status = "True" if status else "False"
        if status not in ("True", "False", "Unknown"):
            r.fail(at + ("status",), f'must be "True", "False" or "Unknown", not {_shown(status)}')
        ready = status == "True"
    terminating = r.get(("metadata", "deletionTimestamp")) not in (None, "")
    return Pod(
        namespace=namespace,
        name=name,
        labels=labels,
        node_name=node_name,
        ports=tuple(ports),
        ready=ready,
        terminating=terminating,
    )


def _read_service(r: _Reader, plan: AddressPlan) -> Service:
    namespace, name, labels = r.metadata(is_dns1035_label, DNS1035_LABEL)
    r.known_fields((), r.body, OBJECT_FIELDS, "a Service")
    r.mapping(("spec",), SERVICE_SPEC_FIELDS, "a Service spec")
    r.mapping(("status",), SERVICE_STATUS_FIELDS, "a Service status")
    svc_type = r.choice(("spec", "type"), SERVICE_TYPES, TYPE_CLUSTER_IP)
    cluster_ip = _read_cluster_ip(r, plan)
    headless = cluster_ip == HEADLESS
    external_name = _read_external_name(r, svc_type)
    if external_name is not None and cluster_ip is not None:
        at = ("spec", "clusterIP") if r.get(("spec", "clusterIP")) else ("spec", "clusterIPs")
        r.fail(at, 'must be empty for an ExternalName Service (it has no ClusterIP)')
    if headless and svc_type in (TYPE_NODE_PORT, TYPE_LOAD_BALANCER):
        r.fail(("spec", "type"), 'must be "ClusterIP" when spec.clusterIP is "None" (headless)')
    for i, family in enumerate(r.sequence(("spec", "ipFamilies"))):
        if family != "IPv4":
            problem = f'must be "IPv4", not {_shown(family)} (IPv6 is not supported)'
            r.fail(("spec", "ipFamilies", i), problem)
    if r.get(("spec", "ipFamilyPolicy")) == "RequireDualStack":
        r.fail(("spec", "ipFamilyPolicy"), 'must be "SingleStack" or "PreferDualStack" (IPv4 only)')
    publish_not_ready = bool(r.flag(("spec", "publishNotReadyAddresses")))
    traffic_distribution = r.get(("spec", "trafficDistribution"))
    if traffic_distribution is not None:
        traffic_distribution = r.choice(
            ("spec", "trafficDistribution"),
            (PREFER_CLOSE, PREFER_SAME_ZONE),
            PREFER_CLOSE,
            " (PreferSameNode is not supported)",
        )

    ports = _read_service_ports(r, svc_type, plan)
    if not ports and not headless and external_name is None:
        r.fail(
            ("spec", "ports"),
            "must list at least one port (only a headless Service, clusterIP \"None\", or an "
            "ExternalName Service may have none)",
        )
    selector = r.string_map(("spec", "selector"), "selector value") or None  # {}: no selector

    external_ips: list[str] = []
    for i, value in enumerate(r.sequence(("spec", "externalIPs"))):
        at = ("spec", "externalIPs", i)
        ip = r.ipv4(at, value, "external IP range", plan.external_ip_cidr)
        if ip in external_ips:
            r.fail(at, f"repeats {ip}: each external IP may appear once")
        external_ips.append(ip)

    affinity = r.choice(
        ("spec", "sessionAffinity"), (AFFINITY_NONE, AFFINITY_CLIENT_IP), AFFINITY_NONE
    )
    timeout = DEFAULT_AFFINITY_TIMEOUT_S
    config = ("spec", "sessionAffinityConfig")
    if r.get(config) is not None:
        if affinity != AFFINITY_CLIENT_IP:
            r.fail(config, 'may only be set when spec.sessionAffinity is "ClientIP"')
        r.mapping(config, frozenset({"clientIP"}), "a sessionAffinityConfig")
        r.mapping(config + ("clientIP",), frozenset({"timeoutSeconds"}), "a ClientIPConfig")
        timeout = r.integer(config + ("clientIP", "timeoutSeconds"), 1, MAX_AFFINITY_TIMEOUT_S)
        timeout = timeout or DEFAULT_AFFINITY_TIMEOUT_S

    policies = (POLICY_CLUSTER, POLICY_LOCAL)
    external_policy = r.choice(("spec", "externalTrafficPolicy"), policies, POLICY_CLUSTER)
    reachable = svc_type in (TYPE_NODE_PORT, TYPE_LOAD_BALANCER) or external_ips
    if external_policy == POLICY_LOCAL and not reachable:
        r.fail(
            ("spec", "externalTrafficPolicy"),
            'may only be "Local" for a NodePort or LoadBalancer Service or one with '
            "spec.externalIPs",
        )
    internal_policy = r.choice(("spec", "internalTrafficPolicy"), policies, POLICY_CLUSTER)
    balancer = _read_load_balancer(r, svc_type, external_policy, ports, plan)
    return Service(
        namespace=namespace,
        name=name,
        ports=ports,
        type=svc_type,
        cluster_ip=cluster_ip,
        selector=selector,
        labels=labels,
        external_ips=tuple(external_ips),
        session_affinity=affinity,
        affinity_timeout_s=timeout,
        external_traffic_policy=external_policy,
        internal_traffic_policy=internal_policy,
        publish_not_ready_addresses=publish_not_ready,
        traffic_distribution=traffic_distribution,
        external_name=external_name,
        **balancer,
    )


def _read_external_name(r: _Reader, svc_type: str) -> str | None:
    """spec.externalName: required for, and only for, type ExternalName."""
    at: Field = ("spec", "externalName")
    accepted = "a DNS name such as db.example.com (a DNS-1123 subdomain, one trailing dot allowed)"
    if svc_type != TYPE_EXTERNAL_NAME:
        if r.get(at) not in (None, ""):
            r.fail(at, 'may only be set when spec.type is "ExternalName"')
        return None
    value = r.string(at, required=accepted)
    if not is_dns1123_subdomain(value.removesuffix(".")):
        r.fail(at, f"must be {accepted}, not {_shown(value)}")
    return value.removesuffix(".")


def _read_load_balancer(
    r: _Reader, svc_type: str, external_policy: str, ports: tuple[ServicePort, ...],
    plan: AddressPlan,
) -> dict[str, Any]:
    """The LoadBalancer fields as Service keyword arguments; each refused on any other type."""
    lb = svc_type == TYPE_LOAD_BALANCER
    only_lb = 'may only be set when spec.type is "LoadBalancer"'
    ingress_at: Field = ("status", "loadBalancer", "ingress")
    r.mapping(("status", "loadBalancer"), LOAD_BALANCER_STATUS_FIELDS, "a LoadBalancerStatus")
    ips: list[str] = []
    for i, _ in enumerate(r.sequence(ingress_at)):
        at = ingress_at + (i,)
        if not lb:
            r.fail(at, only_lb)
        r.mapping(at, INGRESS_FIELDS, "a LoadBalancerIngress")
        if r.get(at + ("hostname",)) not in (None, ""):
            r.fail(at + ("hostname",), "is not supported: give ip, an address this cluster routes")
        r.choice(at + ("ipMode",), ("VIP",), "VIP", " (no load balancer stands in front to proxy)")
        value = r.get(at + ("ip",))
        if value in (None, ""):
            r.fail(at + ("ip",), f"is required: an IPv4 address inside {plan.load_balancer_cidr}")
        ip = r.ipv4(at + ("ip",), value, "load-balancer range", plan.load_balancer_cidr)
        if ip in ips:
            r.fail(at + ("ip",), f"repeats {ip}: each ingress IP may appear once")
        ips.append(ip)
    ranges: list[str] = []
    for i, value in enumerate(r.sequence(("spec", "loadBalancerSourceRanges"))):
        at = ("spec", "loadBalancerSourceRanges", i)
        if not lb:
            r.fail(at, only_lb)
        net = None
        try:  # Kubernetes trims spaces and reads host bits as the network's
            if isinstance(value, str):
                net = ipaddress.IPv4Network(value.strip(), strict=False)
        except ValueError:
            pass
        if net is None or "/" not in value:
            r.fail(at, f"must be an IPv4 CIDR such as 198.18.0.0/24, not {_shown(value)}")
        ranges.append(str(net))
    allocate_at: Field = ("spec", "allocateLoadBalancerNodePorts")
    allocate = r.flag(allocate_at)
    if allocate is not None and not lb:
        r.fail(allocate_at, only_lb)
    check_at: Field = ("spec", "healthCheckNodePort")
    check = r.get(check_at)
    if check in (None, 0):  # 0 asks for an allocation, as for nodePort
        check = None
    elif not lb or external_policy != POLICY_LOCAL:
        r.fail(
            check_at,
            'may only be set when spec.type is "LoadBalancer" and spec.externalTrafficPolicy '
            'is "Local"',
        )
    else:
        check = r.integer(check_at, *plan.node_port_range)
        for i, p in enumerate(ports):
            if p.node_port == check:
                r.fail(check_at, f"repeats spec.ports[{i}].nodePort {check}: it needs its own port")
    return {
        "load_balancer_ips": tuple(ips),
        "load_balancer_source_ranges": tuple(ranges),
        "health_check_node_port": check,
        "allocate_load_balancer_node_ports": allocate is not False,
    }


def _read_cluster_ip(r: _Reader, plan: AddressPlan) -> str | None:
    at: Field = ("spec", "clusterIP")
    value = r.get(at)
    listed = r.sequence(("spec", "clusterIPs"))
    if listed:
        if len(listed) > 1:
            r.fail(("spec", "clusterIPs"), "must hold one address (dual-stack is not supported)")
        if value in (None, ""):
            value, at = listed[0], ("spec", "clusterIPs", 0)
        elif listed[0] != value:
            r.fail(("spec", "clusterIPs", 0), f"must equal spec.clusterIP {_shown(value)}")
    if value in (None, ""):
        return None  # allocated by the cluster state
    if value == HEADLESS:
        return HEADLESS
    net = ipaddress.ip_network(plan.service_cidr)
    accepted = (
        f'"None" (headless), empty (allocate) or an IPv4 address inside the Service CIDR '
        f"{net} other than its first and last"
    )
    try:
        ip = ipaddress.IPv4Address(value) if isinstance(value, str) else None
    except ValueError:
        ip = None
    if ip is None or ip not in net or ip in (net.network_address, net.broadcast_address):
        r.fail(at, f"must be {accepted}, not {_shown(value)}")
    return value


def _read_service_ports(r: _Reader, svc_type: str, plan: AddressPlan) -> tuple[ServicePort, ...]:
    lo, hi = plan.node_port_range
    entries = r.sequence(("spec", "ports"))
    ports: list[ServicePort] = []
    seen: dict[tuple[int, str], int] = {}
    seen_node_ports: dict[tuple[int, str], int] = {}
    seen_names: dict[str, int] = {}
    for i, _ in enumerate(entries):
        at = ("spec", "ports", i)
        r.mapping(at, SERVICE_PORT_FIELDS, "a Service port")
        number = r.integer(at + ("port",), 1, 65535, required=True)
        protocol = r.protocol(at + ("protocol",))
        port_name = r.name(at + ("name",), is_dns1123_label, DNS1123_LABEL) or ""
        if len(entries) > 1:
            if not port_name:
                r.fail(
                    at + ("name",),
                    f"is required when a Service has more than one port: {DNS1123_LABEL}",
                )
            if port_name in seen_names:
                r.fail(
                    at + ("name",),
                    f"repeats the name {_shown(port_name)} of spec.ports[{seen_names[port_name]}]: "
                    "port names in a Service must be unique",
                )
            seen_names[port_name] = i
        if (number, protocol) in seen:
            r.fail(
                at,
                f"repeats port {number}/{protocol} of spec.ports[{seen[number, protocol]}]: "
                "each port and protocol pair in a Service must be unique",
            )
        seen[number, protocol] = i
        target = _read_target_port(r, at + ("targetPort",))
        node_port = r.get(at + ("nodePort",))
        if node_port in (None, 0):  # 0 asks for an allocation, as in Kubernetes
            node_port = None
        elif svc_type not in (TYPE_NODE_PORT, TYPE_LOAD_BALANCER):
            r.fail(
                at + ("nodePort",), 'may only be set when spec.type is "NodePort" or "LoadBalancer"'
            )
        else:
            node_port = r.integer(at + ("nodePort",), lo, hi)
            if (node_port, protocol) in seen_node_ports:
                r.fail(
                    at + ("nodePort",),
                    f"repeats {node_port}/{protocol} of "
                    f"spec.ports[{seen_node_ports[node_port, protocol]}]: "
                    "each nodePort and protocol pair must be unique",
                )
            seen_node_ports[node_port, protocol] = i
        ports.append(ServicePort(number, protocol, port_name, target, node_port))
    return tuple(ports)


def _read_target_port(r: _Reader, at: Field) -> int | str | None:
    value = r.get(at)
    if value is None or value == "":
        return None  # the same as port
    valid = (
        (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535)
        or (isinstance(value, str) and is_iana_svc_name(value))
    )  # fmt: skip
    if not valid:
        accepted = f"an integer from 1 to 65535 or {IANA_SVC_NAME}"
        r.fail(at, f"must be {accepted}, not {_shown(value)}")
    return value


def _read_endpoint_slice(r: _Reader, plan: AddressPlan) -> EndpointSlice:
    namespace, name, labels = r.metadata()
    r.known_fields((), r.body, SLICE_FIELDS, "an EndpointSlice")
    service_name = labels.get(SERVICE_NAME_LABEL)
    if service_name is None:
        r.fail(
            ("metadata", "labels"),
            f"must contain {SERVICE_NAME_LABEL}, the name of the Service this slice belongs to",
        )
    if not is_dns1035_label(service_name):
        r.fail(
            ("metadata", "labels", SERVICE_NAME_LABEL),
            f"must name a Service: {DNS1035_LABEL}, not {_shown(service_name)}",
        )
    address_type = r.get(("addressType",))
    if address_type != "IPv4":
        problem = "is required" if address_type is None else f"is {_shown(address_type)}"
        r.fail(("addressType",), f'{problem}: it must be "IPv4" (IPv6 and FQDN are not supported)')

    endpoints: list[Endpoint] = []
    for i, _ in enumerate(r.sequence(("endpoints",))):
        at = ("endpoints", i)
        r.mapping(at, ENDPOINT_FIELDS, "an endpoint")
        addresses = r.sequence(at + ("addresses",))
        if not 1 <= len(addresses) <= MAX_SLICE_ADDRESSES:
            r.fail(
                at + ("addresses",),
                f"must list from 1 to {MAX_SLICE_ADDRESSES} IPv4 addresses, not {len(addresses)}",
            )
        for a, value in enumerate(addresses):
            r.ipv4(at + ("addresses", a), value, "benchmark range", plan.endpoint_cidr)
        r.mapping(at + ("conditions",), CONDITION_FIELDS, "endpoint conditions")
        ready = r.flag(at + ("conditions", "ready"))
        serving = r.flag(at + ("conditions", "serving"))
        terminating = r.flag(at + ("conditions", "terminating"))
        ready = True if ready is None else ready  # Kubernetes: nil means ready
        pod_name = None
        r.mapping(at + ("targetRef",), OBJECT_REFERENCE_FIELDS, "an object reference")
        if r.get(at + ("targetRef", "kind")) in (None, POD):
            pod_name = r.name(at + ("targetRef", "name"), is_dns1123_subdomain, DNS1123_SUBDOMAIN)
        endpoints.append(
            Endpoint(
                addresses=tuple(addresses),
                ready=ready,
                serving=ready if serving is None else serving,
                terminating=bool(terminating),
                node_name=r.name(at + ("nodeName",), is_dns1123_subdomain, DNS1123_SUBDOMAIN),
                pod_name=pod_name,
                zone=r.name(at + ("zone",), _is_zone, ZONE_NAME),
                zone_hints=_read_zone_hints(r, at + ("hints",)),
            )
        )

    ports: list[EndpointPort] = []
    seen_names: dict[str, int] = {}
    for i, _ in enumerate(r.sequence(("ports",))):
        at = ("ports", i)
        r.mapping(at, ENDPOINT_PORT_FIELDS, "an EndpointSlice port")
        port_name = r.name(at + ("name",), is_dns1123_label, DNS1123_LABEL) or ""
        if port_name in seen_names:
            r.fail(
                at + ("name",),
                f"repeats the name {_shown(port_name)} of ports[{seen_names[port_name]}]: "
                "port names in an EndpointSlice must be unique",
            )
        seen_names[port_name] = i
        number = r.integer(at + ("port",), 1, 65535, required=True)
        ports.append(EndpointPort(number, r.protocol(at + ("protocol",)), port_name))
    return EndpointSlice(namespace, name, service_name, tuple(endpoints), tuple(ports))


def _is_zone(value: str) -> bool:
    return value != "" and is_label_value(value)


ZONE_NAME = "a zone name (a non-empty label value: at most 63 letters, digits, '-', '_' or '.')"


def _read_zone_hints(r: _Reader, at: Field) -> tuple[str, ...]:
    r.mapping(at, HINTS_FIELDS, "endpoint hints")
    if r.sequence(at + ("forNodes",)):
        r.fail(at + ("forNodes",), "must be empty or absent (node hints are not supported)")
    entries = r.sequence(at + ("forZones",))
    if len(entries) > MAX_ZONE_HINTS:
        r.fail(at + ("forZones",), f"must list at most {MAX_ZONE_HINTS} zones, not {len(entries)}")
    zones: list[str] = []
    for i, _ in enumerate(entries):
        r.mapping(at + ("forZones", i), FOR_ZONE_FIELDS, "a zone hint")
        zone = r.name(at + ("forZones", i, "name"), _is_zone, ZONE_NAME, required=True)
        if zone in zones:
            problem = f"repeats {_shown(zone)}: each zone may appear once"
            r.fail(at + ("forZones", i, "name"), problem)
        zones.append(zone)
    return tuple(zones)


def _read_node(r: _Reader) -> NodeLabels:
    """A Node is read for its labels (the zone); the cluster makes the nodes themselves."""
    r.known_fields((), r.body, OBJECT_FIELDS, "a Node")
    meta = r.mapping(("metadata",))
    name = r.name(("metadata", "name"), is_dns1123_subdomain, DNS1123_SUBDOMAIN, required=True)
    r.ident = f"{r.ident} {name}"
    r.known_fields(("metadata",), meta, OBJECT_META_FIELDS, "object metadata")
    if r.get(("metadata", "namespace")) not in (None, ""):
        r.fail(("metadata", "namespace"), "must be absent: a Node belongs to no namespace")
    return NodeLabels(name, r.string_map(("metadata", "labels"), "label value"))


# --------------------------------------------------------------------------- manifests


def _merge(old: tuple, new: tuple) -> tuple:
    by_key = {o.key: o for o in old}
    by_key.update((o.key, o) for o in new)  # a replaced object keeps its place
    return tuple(by_key.values())


def _drop(old: tuple, gone: tuple) -> tuple:
    keys = {o.key for o in gone}
    return tuple(o for o in old if o.key not in keys)


@dataclass(frozen=True)
class Manifests:
    """The objects of one or more manifests, in the order they were read."""

    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    endpoint_slices: tuple[EndpointSlice, ...] = ()
    nodes: tuple[NodeLabels, ...] = ()

    def __len__(self) -> int:
        return len(self.pods) + len(self.services) + len(self.endpoint_slices) + len(self.nodes)

    def merged(self, other: Manifests) -> Manifests:
        """`svcbench apply`: other's objects replace ours with the same kind, namespace, name."""
        return Manifests(
            _merge(self.pods, other.pods),
            _merge(self.services, other.services),
            _merge(self.endpoint_slices, other.endpoint_slices),
            _merge(self.nodes, other.nodes),
        )

    def without(self, other: Manifests) -> Manifests:
        """`svcbench delete`: drop our objects that other names (same kind, namespace, name)."""
        return Manifests(
            _drop(self.pods, other.pods),
            _drop(self.services, other.services),
            _drop(self.endpoint_slices, other.endpoint_slices),
            _drop(self.nodes, other.nodes),
        )

    def to_documents(self) -> list[dict]:
        """Kubernetes-shaped dicts that `load_documents` reads back to an equal Manifests.

        A pod's IP is not written: the cluster state assigns it.
        """
        return (
            [_pod_document(p) for p in self.pods]
            + [_service_document(s) for s in self.services]
            + [_slice_document(s) for s in self.endpoint_slices]
            + [_node_document(n) for n in self.nodes]
        )


def _metadata(namespace: str, name: str, labels: dict[str, str]) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    return meta


def _pod_document(pod: Pod) -> dict:
    meta = _metadata(pod.namespace, pod.name, pod.labels)
    if pod.terminating:
        meta["deletionTimestamp"] = DELETION_TIMESTAMP
    container: dict[str, Any] = {"name": "echo", "image": ECHO_IMAGE}
    if pod.ports:
        container["ports"] = [
            {"containerPort": p.port, "protocol": p.protocol} | ({"name": p.name} if p.name else {})
            for p in pod.ports
        ]
    spec: dict[str, Any] = {"containers": [container]}
    if pod.node_name is not None:
        spec["nodeName"] = pod.node_name
    ready = {"type": "Ready", "status": "True" if pod.ready else "False"}
    return {
        "apiVersion": API_V1,
        "kind": POD,
        "metadata": meta,
        "spec": spec,
        "status": {"conditions": [ready]},
    }


def _service_document(svc: Service) -> dict:
    spec: dict[str, Any] = {"type": svc.type}
    if svc.cluster_ip is not None:
        spec["clusterIP"] = svc.cluster_ip
    ports = []
    for p in svc.ports:
        port: dict[str, Any] = {"port": p.port, "protocol": p.protocol}
        if p.name:
            port["name"] = p.name
        if p.target_port is not None:
            port["targetPort"] = p.target_port
        if p.node_port is not None:
            port["nodePort"] = p.node_port
        ports.append(port)
    spec["ports"] = ports
    if svc.selector is not None:
        spec["selector"] = dict(svc.selector)
    if svc.external_ips:
        spec["externalIPs"] = list(svc.external_ips)
    spec["sessionAffinity"] = svc.session_affinity
    if svc.session_affinity == AFFINITY_CLIENT_IP:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": svc.affinity_timeout_s}}
    if (
        svc.type == TYPE_NODE_PORT
        or svc.external_ips
        or svc.external_traffic_policy != POLICY_CLUSTER
    ):
        spec["externalTrafficPolicy"] = svc.external_traffic_policy
    spec["internalTrafficPolicy"] = svc.internal_traffic_policy
    if svc.publish_not_ready_addresses:
        spec["publishNotReadyAddresses"] = True
    if svc.traffic_distribution is not None:
        spec["trafficDistribution"] = svc.traffic_distribution
    if svc.external_name is not None:
        spec["externalName"] = svc.external_name
    if svc.load_balancer_source_ranges:
        spec["loadBalancerSourceRanges"] = list(svc.load_balancer_source_ranges)
    if svc.health_check_node_port is not None:
        spec["healthCheckNodePort"] = svc.health_check_node_port
    if not svc.allocate_load_balancer_node_ports:
        spec["allocateLoadBalancerNodePorts"] = False
    doc = {
        "apiVersion": API_V1,
        "kind": SERVICE,
        "metadata": _metadata(svc.namespace, svc.name, svc.labels),
        "spec": spec,
    }
    if svc.load_balancer_ips:
        doc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in svc.load_balancer_ips]}}
    return doc


def _slice_document(sl: EndpointSlice) -> dict:
    endpoints = []
    for ep in sl.endpoints:
        doc: dict[str, Any] = {
            "addresses": list(ep.addresses),
            "conditions": {
                "ready": ep.ready,
                "serving": ep.serving,
                "terminating": ep.terminating,
            },
        }
        if ep.node_name is not None:
            doc["nodeName"] = ep.node_name
        if ep.pod_name is not None:
            doc["targetRef"] = {"kind": POD, "namespace": sl.namespace, "name": ep.pod_name}
        if ep.zone is not None:
            doc["zone"] = ep.zone
        if ep.zone_hints:
            doc["hints"] = {"forZones": [{"name": z} for z in ep.zone_hints]}
        endpoints.append(doc)
    ports = [
        {"port": p.port, "protocol": p.protocol} | ({"name": p.name} if p.name else {})
        for p in sl.ports
    ]
    return {
        "apiVersion": API_DISCOVERY,
        "kind": ENDPOINT_SLICE,
        "metadata": _metadata(sl.namespace, sl.name, {SERVICE_NAME_LABEL: sl.service_name}),
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }


def _node_document(node: NodeLabels) -> dict:
    meta: dict[str, Any] = {"name": node.name}
    if node.labels:
        meta["labels"] = dict(node.labels)
    return {"apiVersion": API_V1, "kind": NODE, "metadata": meta}


# --------------------------------------------------------------------------- loading


class _Load:
    """Objects gathered from one load (several files count as one), duplicates refused."""

    def __init__(self, plan: AddressPlan):
        self.plan = plan
        self.objects: dict[tuple[str, str, str], tuple[Any, str]] = {}

    def document(self, place: _Place, body: Any, default_kind: tuple[str, str] | None = None):
        if body is None:
            return  # an empty document
        if not isinstance(body, dict):
            raise ManifestError(
                f"{place.at()}: the document is {_shown(body)}, not a Kubernetes object "
                f"(a mapping with apiVersion, kind and metadata for {ACCEPTED_KINDS})."
            )
        api, kind = body.get("apiVersion"), body.get("kind")
        if default_kind is not None and api is None and kind is None:
            api, kind = default_kind
        named = isinstance(api, str) and isinstance(kind, str)  # a list is not hashable
        if named and (api, kind) in LIST_KINDS:
            r = _Reader(place, f"{api} {kind}", body)
            r.known_fields((), body, LIST_FIELDS, "a List")
            r.mapping(("metadata",), LIST_META_FIELDS, "list metadata")
            item_kind = LIST_KINDS[api, kind]
            for i, item in enumerate(r.sequence(("items",))):
                self.document(_Place(place.source, place.document, place.node, i), item, item_kind)
            return
        if not named or (api, kind) not in KINDS:
            what = f"apiVersion {_shown(api)} kind {_shown(kind)}"
            meta = body.get("metadata")
            if isinstance(meta, dict) and isinstance(meta.get("name"), str):
                namespace = meta.get("namespace")
                namespace = namespace if isinstance(namespace, str) and namespace else "default"
                what += f" ({shortened(namespace, 60)}/{shortened(meta['name'], 60)})"
            raise ManifestError(
                f"{place.at(('kind',))}: {what} is not a kind svcbench reads; "
                f"it reads {ACCEPTED_KINDS}."
            )
        r = _Reader(place, kind, body)
        if kind == POD:
            obj = _read_pod(r)
        elif kind == SERVICE:
            obj = _read_service(r, self.plan)
        elif kind == NODE:
            obj = _read_node(r)
        else:
            obj = _read_endpoint_slice(r, self.plan)
        key = (kind, *obj.key)
        if key in self.objects:
            raise ManifestError(
                f"{place.at()}: {r.ident} is defined twice in one load, first at "
                f"{self.objects[key][1]}; each kind, namespace and name may appear once."
            )
        self.objects[key] = (obj, place.at())

    def text(self, text: str, source: str) -> None:
        if len(text) > MAX_BYTES:  # a character is at least a byte
            raise ManifestError(_too_big(source, f"more than {MAX_BYTES:,} characters"))
        loader = ManifestLoader(text)
        document = 0
        try:
            while loader.check_node():
                document += 1
                node = loader.get_node()
                _refuse_repeated_keys(node, source, document)
                self.document(_Place(source, document, node), loader.construct_document(node))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"{source}:{mark.line + 1}" if mark is not None else source
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            if isinstance(e, YAMLLimitError):
                raise ManifestError(f"{where} (document {document}): {problem}.") from None
            raise ManifestError(f"{where} is not valid YAML: {problem}.") from None
        finally:
            loader.dispose()

    def manifests(self) -> Manifests:
        objs = [o for o, _ in self.objects.values()]
        return Manifests(
            tuple(o for o in objs if isinstance(o, Pod)),
            tuple(o for o in objs if isinstance(o, Service)),
            tuple(o for o in objs if isinstance(o, EndpointSlice)),
            tuple(o for o in objs if isinstance(o, NodeLabels)),
        )


def _refuse_repeated_keys(node: yaml.Node, source: str, index: int) -> None:
    """PyYAML keeps the last of two equal keys silently; Kubernetes refuses them, so do we."""
    stack = [node]
    seen_nodes: set[int] = set()  # aliases share nodes
    while stack:
        n = stack.pop()
        if id(n) in seen_nodes:
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in seen:
                        raise ManifestError(
                            f"{source}:{key.start_mark.line + 1} (document {index}): the key "
                            f"{_shown(key.value)} appears twice in one mapping; each key may "
                            "appear once."
                        )
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def load_manifests(text: str, source: str = "<stdin>", plan: AddressPlan = PLAN) -> Manifests:
    """Read a (multi-document) YAML or JSON stream; raises ManifestError."""
    load = _Load(plan)
    load.text(text, source)
    return load.manifests()


def load_documents(
    documents: Iterable[Any], source: str = "<documents>", plan: AddressPlan = PLAN
) -> Manifests:
    """Read already-parsed documents, such as `Manifests.to_documents()` kept in a JSON file."""
    load = _Load(plan)
    for index, body in enumerate(documents, start=1):
        load.document(_Place(source, index), body)
    return load.manifests()


def _manifest_files(path: Path) -> list[Path]:
    if path.is_dir():  # as kubectl -f DIR: the YAML and JSON files directly inside
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    return [path]


def _too_big(source: str, size: str) -> str:
    return f"{source} is {size}; svcbench reads manifests of at most {MAX_BYTES:,} bytes (1 MiB)."


def _read_stdin() -> str:
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    data = stream.read(MAX_BYTES + 1)  # bounded: stdin may be endless, such as /dev/zero
    if len(data) > MAX_BYTES:
        raise ManifestError(_too_big("<stdin>", f"more than {MAX_BYTES:,} bytes"))
    return _decoded(data, "<stdin>")


def _read_file(path: Path) -> str:
    """A regular file's text, refused by size before it is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not wait for a writer
    except OSError as e:
        raise ManifestError(f"{path} cannot be read: {e.strerror or e}.") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ManifestError(
                f"{path} is not a regular file; give a file, a directory of them or - for stdin."
            )
        if info.st_size > MAX_BYTES:
            raise ManifestError(_too_big(str(path), f"{info.st_size:,} bytes"))
        try:
            data = f.read(MAX_BYTES + 1)  # it may have grown since fstat
        except OSError as e:
            raise ManifestError(f"{path} cannot be read: {e.strerror or e}.") from None
    if len(data) > MAX_BYTES:
        raise ManifestError(_too_big(str(path), f"more than {MAX_BYTES:,} bytes"))
    return _decoded(data, str(path))


def _decoded(data: bytes | str, source: str) -> str:
    if isinstance(data, str):  # a text stdin without a byte buffer
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{source} is not a UTF-8 text file.") from None


def load_files(paths: Iterable[str | Path], plan: AddressPlan = PLAN) -> Manifests:
    """Read files ("-" is stdin, a directory its *.yaml, *.yml, *.json) as one load."""
    load = _Load(plan)
    for given in paths:
        if str(given) == "-":
            load.text(_read_stdin(), "<stdin>")
            continue
        for path in _manifest_files(Path(given)):
            load.text(_read_file(path), str(path))
    return load.manifests()
