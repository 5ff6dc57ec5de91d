"""`svcbench agent --mode M --node-name N`: the node proxy on a real Kubernetes API.

Connects with `--kubeconfig`, or in a pod with the in-cluster config
(KUBERNETES_SERVICE_HOST and the service account), checks that the API answers, then runs
`svcbench.agent.Agent` on this node's network namespace (or `--netns NAME`, a namespace a
svcbench run made) until Ctrl-C or SIGTERM, which uninstall the mode's state.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

NODE_NAME_ENV = "NODE_NAME"
IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
KUBE_NODE_PORT_RANGE = (30000, 32767)  # the apiserver's default --service-node-port-range


class AgentUsageError(ValueError):
    """Bad input or an API that is not there: one sentence, exit status 2."""


GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _seconds(flag: str):
    """A duration as kube-proxy takes it (Go's: 1s, 500ms, 1m30s) or plain seconds."""

    def parse(value: str) -> float:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = GO_DURATION.findall(text)
            joined = "".join(n + u for n, u in parts)
            seconds = sum(float(n) * UNITS[u] for n, u in parts) if (
                parts and joined == text) else -1.0
        if not 0 < seconds <= 86400:
            raise argparse.ArgumentTypeError(
                f"{flag} {value!r} must be a duration above 0 and at most 24h, such as 1s, "
                "500ms or 1m30s")
        return seconds

    return parse


def _port_range(value: str) -> tuple[int, int]:
    """LOW-HIGH, as the apiserver's --service-node-port-range takes it."""
    low, dash, high = value.strip().partition("-")
    if dash and low.strip().isdigit() and high.strip().isdigit():
        low_port, high_port = int(low), int(high)
        if 1 <= low_port <= high_port <= 65535:
            return low_port, high_port
    raise argparse.ArgumentTypeError(
        f"--service-node-port-range {value!r} must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535, "
        "such as 30000-32767")


def add_agent_arguments(sp: argparse.ArgumentParser) -> None:
    from dataplanes.modes import IPTABLES_BACKENDS, MODES
    from kube.model import PLAN

    sp.add_argument("--mode", choices=list(MODES), required=True, help="proxy mode")
    sp.add_argument("--backend", choices=IPTABLES_BACKENDS, default=None,
                    help="iptables backend (default nft)")
    sp.add_argument("--node-name", default=None,
                    help=f"this node's name (default: ${NODE_NAME_ENV})")
    sp.add_argument("--kubeconfig", default=None,
                    help=f"kubeconfig file (default: the in-cluster config, ${IN_CLUSTER_ENV})")
    sp.add_argument("--proxy-name", default=None,
                    help="serve only Services labelled service.kubernetes.io/service-proxy-name"
                         "=NAME (default: only Services without that label, as kube-proxy)")
    sp.add_argument("--healthz-bind-address", default="0.0.0.0:10256",
                    help="HOST:PORT of /healthz and /livez (default 0.0.0.0:10256)")
    sp.add_argument("--metrics-bind-address", default="127.0.0.1:10249",
                    help="HOST:PORT of /metrics (default 127.0.0.1:10249)")
    sp.add_argument("--min-sync-period", type=_seconds("--min-sync-period"), default=1.0,
                    help="least time between two syncs; changes wait and go together "
                         "(default 1s)")
    sp.add_argument("--sync-period", type=_seconds("--sync-period"), default=30.0,
                    help="time between full syncs, which repair what others removed "
                         "(default 30s)")
    sp.add_argument("--cluster-cidr", default=PLAN.cluster_cidr,
                    help="the cluster's pod network: traffic from outside it is masqueraded "
                         f"(default {PLAN.cluster_cidr}, the suite's)")
    sp.add_argument("--service-cidr", default=PLAN.service_cidr,
                    help="the cluster's Service ClusterIP range (default "
                         f"{PLAN.service_cidr}, the suite's)")
    sp.add_argument("--service-node-port-range", type=_port_range,
                    default=KUBE_NODE_PORT_RANGE, metavar="LOW-HIGH",
                    help="the cluster's NodePort range, as the apiserver's flag of that name "
                         "(default 30000-32767, the apiserver's)")
    sp.add_argument("--netns", default=None,
                    help="program this network namespace (a node of a svcbench run) instead "
                         "of the one the agent runs in")


def _api_client(args):
    try:
        from kubernetes import client, config
    except ImportError:
        raise AgentUsageError("svcbench agent needs the kubernetes client: install "
                              "svcbench[kube]") from None
    cfg = client.Configuration()
    try:
        if args.kubeconfig:
            config.load_kube_config(config_file=args.kubeconfig, client_configuration=cfg)
        elif os.environ.get(IN_CLUSTER_ENV):
            config.load_incluster_config(client_configuration=cfg)
        else:
            raise AgentUsageError(f"svcbench agent needs --kubeconfig, or to run in a pod "
                                  f"(${IN_CLUSTER_ENV} is not set)")
    except config.ConfigException as exc:
        raise AgentUsageError(f"the Kubernetes client configuration cannot be used: "
                              f"{exc}") from None
    except OSError as exc:
        raise AgentUsageError(f"--kubeconfig {args.kubeconfig} cannot be read: "
                              f"{exc.strerror or exc}") from None
    cfg.retries = 0  # the first look at the API answers at once; reflectors retry themselves
    api = client.ApiClient(cfg)
    return api, cfg.host


def _reachable(api, host: str, node_name: str) -> None:
    """One look at the API before anything is installed: this node's Node object."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.CoreV1Api(api).list_node(field_selector=f"metadata.name={node_name}",
                                        _request_timeout=10)
    except ApiException as exc:
        raise AgentUsageError(f"the Kubernetes API at {host} refused to list Node "
                              f"{node_name}: {exc.status} {exc.reason}") from None
    except Exception as exc:  # noqa: BLE001 - urllib3's connection errors, as one sentence
        reason = getattr(exc, "reason", None) or exc
        text = str(reason).split(": ", 1)[-1] if ": " in str(reason) else str(reason)
        raise AgentUsageError(f"the Kubernetes API at {host} cannot be reached ({text}); "
                              f"check --kubeconfig") from None


def run_agent(args) -> int:
    from clusters.host import HostNode
    from dataplanes.base import Host
    from dataplanes.modes import make
    from kube.api import cluster_plan
    from svcbench.agent import Agent, AgentStopped, Served, parse_bind

    node_name = args.node_name or os.environ.get(NODE_NAME_ENV)
    if not node_name:
        raise AgentUsageError(f"svcbench agent needs --node-name or ${NODE_NAME_ENV} (in a "
                              "DaemonSet: the downward API's spec.nodeName)")
    try:
        healthz = parse_bind(args.healthz_bind_address, "--healthz-bind-address")
        metrics = parse_bind(args.metrics_bind_address, "--metrics-bind-address")
        plan = cluster_plan(args.cluster_cidr, args.service_cidr,
                            args.service_node_port_range)
    except ValueError as exc:
        raise AgentUsageError(str(exc)) from None
    if args.netns and not os.path.exists(f"/run/netns/{args.netns}"):
        raise AgentUsageError(f"--netns {args.netns}: no such network namespace under "
                              "/run/netns")
    api, host = _api_client(args)
    _reachable(api, host, node_name)
    dataplane = make(args.mode, backend=args.backend)
    missing = dataplane.missing(Host())
    if missing:
        raise RuntimeError(f"mode {args.mode} cannot run here: {'; '.join(missing)}")

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="svcbench agent: %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    agent = Agent(api, node_name, dataplane,
                  lambda node: HostNode.holding(node.name, node.ip, node.pod_cidr,
                                                args.netns or ""),
                  proxy_name=args.proxy_name, min_sync_period=args.min_sync_period,
                  sync_period=args.sync_period, plan=plan)
    try:
        served = Served(agent, healthz, metrics)
    except OSError as exc:
        raise AgentUsageError(f"cannot listen for /healthz or /metrics: "
                              f"{exc.strerror or exc}") from None
    logging.getLogger("svcbench.agent").info(
        "node %s, mode %s, API %s; /healthz on %s:%d, /metrics on %s:%d", node_name, args.mode,
        host, *healthz, *metrics)
    try:
        agent.run()  # until Ctrl-C or SIGTERM (KeyboardInterrupt); uninstalls on the way out
    except AgentStopped as exc:
        logging.getLogger("svcbench.agent").error("%s", exc)
        return 1
    finally:
        served.close()
    return 0
