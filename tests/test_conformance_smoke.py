"""The fast conformance checks (1, 10, 14, 15) for the iptables mode, so CI guards the data plane."""

from __future__ import annotations

import json
import os

import pytest

from conformance.runner import run_conformance

pytestmark = pytest.mark.root

SMOKE = (
    "clusterip_tcp_uniform",  # 1
    "clusterip_preserves_client_pod_ip",  # 10
    "no_endpoints_refused_fast",  # 14
    "removed_endpoint_gets_no_new_connections",  # 15
)


def test_fast_checks_pass_for_iptables(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lines: list[str] = []
    data = run_conformance("iptables", keyword=" or ".join(SMOKE), out_dir=str(tmp_path),
                           progress=lines.append)
    outcomes = {c["name"]: (c["outcome"], c["reason"]) for c in data["checks"]}
    assert outcomes == {name: ("passed", "") for name in SMOKE}, "\n".join(lines)
    assert data["mode"] == "iptables" and data["kernel"] == os.uname().release
    assert data["kernel_kind"] == "host"
    # The run folder holds what the report reads: the same JSON, JUnit XML and the environment.
    assert json.loads((tmp_path / "conformance.json").read_text()) == data
    junit = (tmp_path / "junit.xml").read_text()
    assert junit.count("<testcase ") == len(SMOKE) and "<failure" not in junit
    assert json.loads((tmp_path / "environment.json").read_text())["kernel"] == os.uname().release


# --------------------------------------------------------------------------- no root needed


def test_the_guest_kernel_is_refused_outside_the_guest(tmp_path, monkeypatch):
    from conformance.runner import ConformanceError

    monkeypatch.delenv("SVCBENCH_KERNEL", raising=False)
    with pytest.raises(ConformanceError, match="--kernel uml: this process runs on the host kernel"):
        run_conformance("iptables", kernel="uml", out_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_a_keyword_selecting_nothing_is_an_error(tmp_path):
    from conformance.runner import ConformanceError

    with pytest.raises(ConformanceError, match="selects no check"):
        run_conformance("iptables", keyword="no_such_check", out_dir=str(tmp_path),
                        progress=lambda _line: None)


def test_uniformity_p_is_the_chi_square_tail():
    import math

    from conformance.harness import uniformity_p

    assert uniformity_p([200, 200, 200]) == 1.0
    # Closed forms of the tail: df 2 -> exp(-x/2), df 4 -> exp(-x/2)(1 + x/2), df 1 -> erfc(sqrt(x/2)).
    assert math.isclose(uniformity_p([240, 180, 180]), math.exp(-12 / 2), rel_tol=1e-9)  # x = 12
    assert math.isclose(uniformity_p([117, 90, 97, 96, 100]), math.exp(-2.07) * 3.07,
                        rel_tol=1e-9)  # x = 4.14
    assert math.isclose(uniformity_p([60, 40]), math.erfc(math.sqrt(2)), rel_tol=1e-9)  # x = 4
    # Check 1's threshold: x = 13.87 (p 0.00097) fails it, x = 12 passes.
    assert uniformity_p([243, 179, 178]) < 0.001 < uniformity_p([240, 180, 180])


def test_results_are_written_atomically_into_fresh_run_folders(tmp_path):
    from reports.results import environment, new_run_dir, read_json, write_csv, write_json

    first, second = new_run_dir(tmp_path, "conformance"), new_run_dir(tmp_path, "conformance")
    assert first != second and first.name.startswith("conformance-") and first.is_dir()
    with pytest.raises(ValueError, match="run kind"):
        new_run_dir(tmp_path, "Bad Kind")
    write_json(first / "a.json", {"b": [1, 2]})
    assert read_json(first / "a.json") == {"b": [1, 2]}
    write_csv(first / "rows.csv", [{"mode": "iptables", "value": 1.5},
                                   {"mode": "ipvs", "extra": {"k": 1}}])
    assert (first / "rows.csv").read_text().splitlines() == [
        "mode,value,extra", "iptables,1.5,", 'ipvs,,"{""k"": 1}"',
    ]
    assert sorted(p.name for p in first.iterdir()) == ["a.json", "rows.csv"]  # no temp files
    env = environment(["svcbench", "conformance"])
    assert env["argv"] == ["svcbench", "conformance"] and env["kernel"] == os.uname().release
    assert env["python"] and env["cpu_model"] and "iptables" in env["tools"]


# --------------------------------------------------------------------------- --jobs


def test_jobs_split_the_checks_over_clusters_and_merge_them(tmp_path):
    """`--jobs 2`: two processes, each its own cluster and half the checks, one run folder."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    from tests.test_cli import svcbench

    picked = SMOKE[:3]
    done = svcbench("conformance", "--mode", "iptables", "--jobs", "2", "-k", " or ".join(picked),
                    "--out", str(tmp_path), "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    # Merged in check order, every picked check once, each from one shard.
    assert [c["name"] for c in data["checks"]] == list(picked)
    assert [c["number"] for c in data["checks"]] == [1, 10, 14]
    assert {c["outcome"] for c in data["checks"]} == {"passed"}
    shards = [json.loads((tmp_path / f"shard-{i}" / "conformance.json").read_text())
              for i in (1, 2)]
    assert sorted(c["name"] for s in shards for c in s["checks"]) == sorted(picked)
    assert all(s["checks"] for s in shards), "one shard ran every check"
    junit = (tmp_path / "junit.xml").read_text()
    assert junit.count("<testcase ") == len(picked) and 'tests="3"' in junit
    # Progress from both shards reached the parent's stderr, marked with the shard.
    assert "[1/2] " in done.stderr and "[2/2] " in done.stderr


def test_a_bad_shard_is_refused_in_one_line(tmp_path):
    from tests.test_cli import svcbench

    done = svcbench("conformance", "--mode", "iptables", "--shard", "3/2", "--out",
                    str(tmp_path / "never"))
    assert done.returncode == 2
    assert "--shard: '3/2' is not I/N with 1 <= I <= N" in done.stderr
    assert not (tmp_path / "never").exists()
