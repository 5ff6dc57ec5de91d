"""kind and kubeconfig clusters, live: they need a Docker daemon with kind and the suite's
image, or a cluster svcbench may use; each skips with the reason where there is none."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kube import deploy

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("SVCBENCH_IMAGE", deploy.DEFAULT_IMAGE)


def _kind_reason() -> str | None:
    import shutil

    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True,
                                        timeout=30).returncode != 0:
        return "no Docker daemon: kind clusters cannot start here"
    if shutil.which("kind") is None:
        return "kind is not installed: kind clusters cannot start here"
    proc = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True)
    if proc.returncode != 0:
        return f"the image {IMAGE} is not built here (docker build -t {IMAGE} .)"
    return None


def _kubeconfig_reason() -> str | None:
    if not os.environ.get("SVCBENCH_KUBECONFIG"):
        return ("SVCBENCH_KUBECONFIG is not set: no cluster svcbench may create namespaces in "
                "(set it to a kubeconfig whose nodes can pull the suite's image)")
    from clusters import kube

    try:
        kube.connect(os.environ["SVCBENCH_KUBECONFIG"])
    except kube.KubeUnavailable as exc:
        return str(exc)
    return None


def _main(*argv: str) -> int:
    from svcbench.cli import main

    return main(list(argv))


def test_kind_conformance_with_kube_proxy_and_cleanup(tmp_path):
    reason = _kind_reason()
    if reason:
        pytest.skip(reason)
    from clusters import kind

    before = set(kind.clusters())
    assert _main("conformance", "--cluster", "kind", "--mode", "kube-proxy/iptables",
                 "--nodes", "1", "--image", IMAGE, "--out", str(tmp_path)) == 0
    assert (tmp_path / "conformance.json").exists()
    assert set(kind.clusters()) == before  # the run's cluster is gone


def test_kubeconfig_up_probe_from_every_node_and_down():
    reason = _kubeconfig_reason()
    if reason:
        pytest.skip(reason)
    from clusters import kube

    path = os.environ["SVCBENCH_KUBECONFIG"]
    before = set(kube.list_records())
    mode = os.environ.get("SVCBENCH_KUBE_MODE", "kube-proxy/iptables")
    assert _main("up", "--cluster", f"kubeconfig={path}", "--mode", mode, "--image", IMAGE,
                 "-f", str(ROOT / "examples" / "web.yaml")) == 0
    (run,) = set(kube.list_records()) - before
    api = kube.connect(path)
    try:
        cluster = kube.KubeCluster(api, run)
        ns = deploy.namespace_name(run, "ns1")
        web = cluster.core.read_namespaced_service("web", ns)
        results = cluster.probes(web.spec.cluster_ip, 80, count=10)
        assert results, "no probe pod runs"
        for node, result in results.items():
            assert result.summary()["outcomes"] == {"ok": 10}, node
            assert {b.split("/")[0] for b in result.summary()["backends"]} == {ns}
    finally:
        assert _main("down", "--run", run) == 0
    left = cluster.core.list_namespace(label_selector=deploy.run_selector(run)).items
    assert all(n.status.phase == "Terminating" for n in left)
