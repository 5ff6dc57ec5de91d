"""kind clusters as svcbench clusters: `kind create cluster --name svb-<run> --config FILE`.

The config is kind's v1alpha4 Cluster (field names and accepted values as kind's own
pkg/apis/config/v1alpha4/types.go and pkg/internal/apis/config/validate.go have them; the
tree is kept in kind_v1alpha4_fields.json with the kind commit it was read from, and
`validate_config` checks a config against it). kube-proxy's own modes are kind's
`networking.kubeProxyMode` (`--mode kube-proxy/iptables`, `kube-proxy/ipvs`,
`kube-proxy/nftables`); svcbench's modes get `kubeProxyMode: none` and the suite's agent
DaemonSet. One control-plane node and N workers; the suite's image is loaded into the nodes
with `kind load docker-image`. The cluster is deleted when the command that made it ends
(success, failure, Ctrl-C) unless `up` keeps it, and by `svcbench gc` once its run is not live.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

KIND_API_VERSION = "kind.x-k8s.io/v1alpha4"
FIELDS_FILE = Path(__file__).with_name("kind_v1alpha4_fields.json")
KUBE_PROXY_PREFIX = "kube-proxy/"
KUBE_PROXY_MODES = {f"{KUBE_PROXY_PREFIX}{m}": m for m in ("iptables", "ipvs", "nftables")}
CLUSTER_PREFIX = "svb-"
# kind's own defaults (pkg/internal/apis/config/default.go), written out so the agent's
# --cluster-cidr and --service-cidr name the same ranges
POD_SUBNET = "10.244.0.0/16"
SERVICE_SUBNET = "10.96.0.0/16"
CREATE_WAIT = "180s"
MAX_WORKERS = 20


class KindUnavailable(RuntimeError):
    """Docker or kind is missing or not usable: one sentence, exit 2, nothing created."""


def cluster_name(run: str) -> str:
    return f"{CLUSTER_PREFIX}{run}"


def run_of_cluster(name: str) -> str | None:
    return name[len(CLUSTER_PREFIX):] if name.startswith(CLUSTER_PREFIX) else None


def proxy_mode(mode: str) -> str:
    """kind's kubeProxyMode for a svcbench --mode: kube-proxy's own, or none (the agent)."""
    return KUBE_PROXY_MODES.get(mode, "none")


def uses_agent(mode: str) -> bool:
    return mode not in KUBE_PROXY_MODES


def config(mode: str, workers: int = 2, run: str | None = None) -> dict[str, Any]:
    """kind's Cluster config for `mode` with one control plane and `workers` workers."""
    if not 0 <= workers <= MAX_WORKERS:
        raise ValueError(f"--nodes must be a whole number from 0 to {MAX_WORKERS}, not {workers}")
    cfg: dict[str, Any] = {"kind": "Cluster", "apiVersion": KIND_API_VERSION}
    if run is not None:
        cfg["name"] = cluster_name(run)
    cfg["nodes"] = [{"role": "control-plane"}] + [{"role": "worker"} for _ in range(workers)]
    cfg["networking"] = {"ipFamily": "ipv4", "podSubnet": POD_SUBNET,
                         "serviceSubnet": SERVICE_SUBNET, "kubeProxyMode": proxy_mode(mode)}
    return cfg


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def accepted_fields() -> dict[str, Any]:
    return json.loads(FIELDS_FILE.read_text())


def validate_config(cfg: Any, accepted: dict[str, Any] | None = None) -> list[str]:
    """Every field kind's v1alpha4 types lack or whose value kind refuses, as sentences."""
    accepted = accepted or accepted_fields()
    errors: list[str] = []
    if not isinstance(cfg, dict):
        return ["the config must be a mapping"]
    if cfg.get("kind") != "Cluster" or cfg.get("apiVersion") != accepted["apiVersion"]:
        errors.append(f"kind/apiVersion must be Cluster/{accepted['apiVersion']}")

    def walk(value: Any, shape: Any, path: str) -> None:
        if isinstance(shape, list):
            if not isinstance(value, list):
                errors.append(f"{path} must be a list")
                return
            for i, item in enumerate(value):
                walk(item, shape[0], f"{path}[{i}]")
        elif isinstance(shape, dict):
            if not isinstance(value, dict):
                errors.append(f"{path} must be a mapping")
                return
            for key, item in value.items():
                if key not in shape:
                    errors.append(f"{path + '.' if path else ''}{key} is not a field of kind's "
                                  f"v1alpha4 config")
                else:
                    walk(item, shape[key], f"{path + '.' if path else ''}{key}")
        elif shape == "map":
            if not isinstance(value, dict):
                errors.append(f"{path} must be a mapping")
        elif shape == "bool":
            if not isinstance(value, bool):
                errors.append(f"{path} must be true or false")
        elif shape == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                errors.append(f"{path} must be a whole number")
        elif not isinstance(value, str):
            errors.append(f"{path} must be a string")

    walk(cfg, accepted["fields"], "")
    for dotted, allowed in accepted["values"].items():
        for path, value in _values_at(cfg, dotted.split(".")):
            if value not in allowed:
                errors.append(f"{path} is {value!r}; kind accepts {', '.join(allowed)}")
    return errors


def _values_at(obj: Any, parts: list[str], path: str = "") -> list[tuple[str, Any]]:
    if not parts:
        return [(path, obj)]
    head, rest = parts[0], parts[1:]
    key, is_list = (head[:-2], True) if head.endswith("[]") else (head, False)
    if not isinstance(obj, dict) or key not in obj:
        return []
    here = f"{path + '.' if path else ''}{key}"
    if is_list:
        items = obj[key] if isinstance(obj[key], list) else []
        return [v for i, item in enumerate(items) for v in _values_at(item, rest, f"{here}[{i}]")]
    return _values_at(obj[key], rest, here)


# --------------------------------------------------------------------------- the tools


def preflight(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """KindUnavailable (one sentence) unless kind and a working Docker daemon are here."""
    missing = [tool for tool in ("docker", "kind") if shutil.which(tool) is None]
    if missing:
        raise KindUnavailable(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed, so "
            "kind clusters cannot start here; install Docker and kind (https://kind.sigs.k8s.io) "
            "or use --cluster netns or --cluster kubeconfig")
    try:
        proc = run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                   text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KindUnavailable(f"docker info failed ({exc}), so kind clusters cannot start "
                              "here") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        raise KindUnavailable("no Docker daemon answers (docker info failed), so kind clusters "
                              "cannot start here; start dockerd or use --cluster netns")


def _kind(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["kind", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"kind {' '.join(args[:3])} failed: {' / '.join(tail)}")
    return proc


def create(run: str, mode: str, workers: int, state_dir: str, image: str | None,
           say: Callable[[str], None] = lambda _m: None) -> str:
    """Create the run's kind cluster, load `image`; returns its kubeconfig's path. On any
    failure the cluster is deleted before the error propagates."""
    cfg_path = os.path.join(state_dir, "kind.yaml")
    kubeconfig = os.path.join(state_dir, "kubeconfig")
    with open(cfg_path, "w") as fh:
        fh.write(dump(config(mode, workers, run)))
    name = cluster_name(run)
    say(f"kind: creating {name} ({workers} workers, kubeProxyMode {proxy_mode(mode)})")
    try:
        _kind("create", "cluster", "--name", name, "--config", cfg_path,
              "--kubeconfig", kubeconfig, "--wait", CREATE_WAIT)
        if image:
            say(f"kind: loading {image} into {name}")
            _kind("load", "docker-image", image, "--name", name)
    except BaseException:
        delete(run)
        raise
    return kubeconfig


def delete(run: str) -> bool:
    """`kind delete cluster --name svb-<run>`; False when kind is not here or it failed."""
    if shutil.which("kind") is None:
        return False
    proc = subprocess.run(["kind", "delete", "cluster", "--name", cluster_name(run)],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode == 0


def clusters() -> list[str]:
    """The names of kind's clusters on this machine (none when kind is missing)."""
    if shutil.which("kind") is None:
        return []
    proc = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def gc(live_runs: set[str]) -> list[str]:
    """Delete every kind cluster svb-<run> whose run is not live."""
    removed = []
    for name in clusters():
        run = run_of_cluster(name)
        if run and run not in live_runs and delete(run):
            removed.append(f"kind cluster {name}: deleted (its run is not live)")
    return removed
