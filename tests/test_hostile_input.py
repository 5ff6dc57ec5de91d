"""Hostile and careless input (issue 13): bounded in time and memory, exit 2, one clean line.

Whatever a manifest or a flag holds, svcbench answers within MAX_SECONDS and MAX_MB with
either a result or one sentence of at most 300 printable characters and exit status 2;
nothing escapes as an internal exception. Loads that could blow up run in a child process
capped at 1 GiB of address space, so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kube.manifests import ManifestError, load_manifests
from kube.model import PLAN, Node
from kube.yamlload import MAX_BYTES, MAX_NODES
from svcbench.cli import main

ROOT = Path(__file__).resolve().parent.parent
MAX_SECONDS = 5
MAX_MB = 300
MAX_LINE = 300
CHILD_ADDRESS_SPACE = 1 << 30

# The child loads the files as every command does, then reports time and peak memory.
CHILD = """
import json, resource, sys, time
if sys.argv[1] == "python":
    sys.modules["yaml._yaml"] = None  # PyYAML as built without libyaml
    import yaml
    assert not yaml.__with_libyaml__
from kube.manifests import ManifestError, load_files
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
def peak_mb():
    # VmHWM is this image's own peak; ru_maxrss keeps the forking parent's across exec
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")) / 1024
start, start_cpu = time.perf_counter(), cpu()
try:
    outcome, message = "loaded", str(len(load_files(sys.argv[2:])))
except ManifestError as exc:
    outcome, message = "refused", str(exc)
print(json.dumps({"outcome": outcome, "message": message,
                  "seconds": time.perf_counter() - start, "cpu_seconds": cpu() - start_cpu,
                  "peak_mb": peak_mb()}))
"""


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


def load_in_child(*paths: str | Path, events: str = "libyaml", stdin=None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, events, *map(str, paths)],
        capture_output=True, text=True, timeout=60, stdin=stdin, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=_cap_address_space,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def assert_bounded(report: dict) -> None:
    # CPU time: on this shared machine the wall clock also counts everyone else's work.
    assert report["cpu_seconds"] < MAX_SECONDS, report
    assert report["seconds"] < 3 * MAX_SECONDS, report
    assert report["peak_mb"] < MAX_MB, report


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exc:  # argparse
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_clean_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert len(line) <= MAX_LINE, (len(line), line)
    assert line.isprintable(), line
    return line


# --------------------------------------------------------------------------- documents


def alias_bomb(levels: int = 9, where: str = "ipFamilies") -> str:
    """The issue's bomb, about 500 bytes: each anchor lists the previous one nine times."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)
    ]
    nested = "[" + ", ".join(anchors) + "]"
    if where == "ipFamilies":
        return (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
            f"spec:\n  ports: [{{port: 80}}]\n  ipFamilies: {nested}\n"
        )
    return f"apiVersion: v1\nkind: Foo\nmetadata: {{name: s, namespace: {nested}}}\n"


def merge_bomb(levels: int = 9) -> str:
    """The same through merge keys, which PyYAML flattens by copying node lists."""
    maps = ["&m0 {k0: x, k1: x, k2: x, k3: x, k4: x, k5: x, k6: x, k7: x, k8: x}"] + [
        f"&m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}" for i in range(1, levels)
    ]
    return (
        "apiVersion: v1\nkind: Pod\n"
        f"metadata: {{name: p, annotations: {{a: [{', '.join(maps)}]}}}}\n"
    )


def services():
    for i in range(10_000):
        yield (
            f"apiVersion: v1\nkind: Service\nmetadata:\n  name: svc{i}\n  namespace: ns1\n"
            f"spec:\n  selector: {{app: web{i}}}\n  ports:\n  - name: http\n    port: 80\n"
            "    targetPort: 8080\n  - name: dns\n    port: 53\n    protocol: UDP\n---\n"
        )


def fill(head: str, unit: str, tail: str) -> str:
    """head + unit * n + tail, as close to MAX_BYTES as it fits."""
    return head + unit * ((MAX_BYTES - len(head) - len(tail)) // len(unit)) + tail


def up_to_1_mib(documents) -> str:
    """Whole documents from the iterable, as many as fit in MAX_BYTES."""
    kept, size = [], 0
    for document in documents:
        size += len(document)
        if size > MAX_BYTES:
            return "".join(kept)
        kept.append(document)
    raise AssertionError("too few documents to fill 1 MiB")


def shared_selectors():
    """One List whose Services all point at the first one's selector, as YAML allows."""
    yield "apiVersion: v1\nkind: List\nitems:\n"
    yield "- {apiVersion: v1, kind: Service, metadata: {name: s0, namespace: ns1},\n"
    yield "   spec: {selector: &sel {app: web}, ports: [{port: 80}]}}\n"
    for i in range(1, 20_000):
        yield (
            f"- {{apiVersion: v1, kind: Service, metadata: {{name: s{i}, namespace: ns1}},\n"
            "   spec: {selector: *sel, ports: [{port: 80}]}}\n"
        )


def deep_pods():
    """Pods, each with an ignored field nested 95 deep: depth and node count near the limits."""
    for i in range(10_000):
        yield (
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, managedFields: "
            + "[" * 95 + "]" * 95 + "}\n---\n"
        )


# Each about 1 MiB: the realistic, the densest YAML can be, and nesting near the limit.
ONE_MIB = {
    "services": (lambda: up_to_1_mib(services()), "loaded"),
    "shared-selector-aliases": (lambda: up_to_1_mib(shared_selectors()), "loaded"),
    "long-annotation": (
        lambda: "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    a: "
        + "x" * (MAX_BYTES - 200) + "\n",
        "loaded",
    ),
    "flow-mapping-of-null-keys": (lambda: fill("x: {", "a,", "b}\n"), "refused"),
    "flow-sequence": (lambda: fill("x: [", "a,", "b]\n"), "refused"),
    "block-sequence-of-nulls": (lambda: fill("x:\n", "-\n", ""), "refused"),
    "empty-mappings": (lambda: fill("x: [", "{},", "{}]\n"), "refused"),
    "deep-pods": (lambda: up_to_1_mib(deep_pods()), "refused"),
    "sexagesimal-integer": (lambda: fill("x: 1", ":1", "\n"), "refused"),
}


@pytest.mark.parametrize("case", list(ONE_MIB))
def test_any_manifest_up_to_1_mib_is_answered_within_5_s_and_300_mb(case, tmp_path):
    make, outcome = ONE_MIB[case]
    text = make()
    assert 0.99 * MAX_BYTES < len(text.encode()) <= MAX_BYTES
    path = tmp_path / "big.yaml"
    path.write_text(text)
    report = load_in_child(path)
    assert report["outcome"] == outcome, report["message"]
    assert_bounded(report)
    if outcome == "refused":
        assert len(report["message"]) <= MAX_LINE, report["message"]


@pytest.mark.parametrize("events", ["libyaml", "python"])
@pytest.mark.parametrize(
    "text",
    [alias_bomb(9), alias_bomb(9, where="namespace"), merge_bomb(9)],
    ids=["ipFamilies", "namespace-of-an-unknown-kind", "merge-keys"],
)
def test_an_alias_bomb_is_refused_in_milliseconds(text, events, tmp_path):
    assert len(text) < 1000
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    report = load_in_child(path, events=events)
    assert report["outcome"] == "refused"
    assert f"past {MAX_NODES:,} values (aliases counted each time they are used)" in (
        report["message"]
    )
    assert report["cpu_seconds"] < 0.5 and report["peak_mb"] < 100, report


def test_the_bomb_through_the_command_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9))
    result = subprocess.run(
        [sys.executable, "-m", "svcbench", "render", "-f", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=_cap_address_space,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    line = assert_one_clean_line(result.stderr)
    assert line.startswith(f"svcbench: error: {path}:6 (document 1): the alias *a4 takes")


@pytest.mark.parametrize("events", ["libyaml", "python"])
def test_nesting_beyond_100_is_refused_by_both_event_sources(events, tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("x: " + "[" * 990 + "]" * 990 + "\n")
    report = load_in_child(path, events=events)
    assert report["outcome"] == "refused"
    assert "values nest deeper than 100 levels here" in report["message"]


def test_an_alias_counts_the_depth_of_its_tree_where_it_is_used():
    def nested(levels: int, inner: str = "x") -> str:
        return "[" * levels + inner + "]" * levels

    anchor = f"a: &a {nested(60)}\n"  # levels 2 to 62 of the document
    with pytest.raises(ManifestError, match="not a kind svcbench reads"):
        load_manifests(anchor + f"b: {nested(38, '*a')}\n")  # 39 + 61 = 100 levels: fine
    with pytest.raises(ManifestError, match=r"^<stdin>:2 \(document 1\): values nest deeper"):
        load_manifests(anchor + f"b: {nested(39, '*a')}\n")


def test_a_file_over_1_mib_is_refused_by_size_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("[" * (MAX_BYTES + 1))  # as YAML it would fail on nesting instead
    report = load_in_child(path)
    assert report["message"] == (
        f"{path} is 1,048,577 bytes; svcbench reads manifests of at most 1,048,576 bytes (1 MiB)."
    )
    assert report["cpu_seconds"] < 0.1, report
    with pytest.raises(ManifestError, match="more than 1,048,576 characters"):
        load_manifests("#" * (MAX_BYTES + 1))


def test_endless_stdin_is_read_only_up_to_the_limit():
    with open("/dev/zero", "rb") as zero:
        report = load_in_child("-", stdin=zero)
    assert report["message"].startswith("<stdin> is more than 1,048,576 bytes;")
    assert_bounded(report)


def test_devices_and_fifos_are_refused_without_waiting(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        report = load_in_child(path)
        assert report["message"] == (
            f"{path} is not a regular file; give a file, a directory of them or - for stdin."
        )
        assert report["seconds"] < MAX_SECONDS, report  # it would wait for a writer forever
    # Even with a writer holding the pipe open, nothing is read from it.
    writer = threading.Thread(target=lambda: open(fifo, "w").close(), daemon=True)
    writer.start()
    assert load_in_child(fifo)["outcome"] == "refused"
    writer.join(timeout=5)


# --------------------------------------------------------------------------- the command

BAD_MANIFESTS = {
    # name: (manifest, fragments of the one line)
    "recursive-alias": (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
        "spec:\n  ports: [{port: 80}]\n  ipFamilies: &a [*a]\n",
        ["t.yaml:6 (document 1): the alias *a is inside the node it names"],
    ),
    "recursive-alias-in-metadata": (
        "apiVersion: v1\nkind: Foo\nmetadata: &m {name: s, namespace: [*m]}\n",
        ["the alias *m is inside the node it names"],
    ),
    "990-deep": (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
        "spec: {ports: [{port: 80}], ipFamilies: " + "[" * 990 + "]" * 990 + "}\n",
        ["values nest deeper than 100 levels"],
    ),
    "5000-digit-port": (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
        f"spec: {{ports: [{{port: {'9' * 5000}}}]}}\n",
        ["the integer 99999", "(5000 characters) does not fit in 64 bits"],
    ),
    "kind-a-list": (
        "apiVersion: v1\nkind: [Pod]\nmetadata: {name: p}\n",
        ['kind a list (default/p) is not a kind svcbench reads'],
    ),
    "labels-typo": (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, lables: {app: web}}\n",
        ["metadata.lables is not a field of object metadata (did you mean metadata.labels)"],
    ),
    "ports-typo": (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
        "spec: {containers: [{name: c, prots: [{containerPort: 9090}]}]}\n",
        ["spec.containers[0].prots is not a field of a container (did you mean"],
    ),
    "pod-list-around-a-pod": (
        "apiVersion: v1\nkind: PodList\nmetadata: {name: p}\nspec: {containers: []}\n",
        ["v1 PodList spec is not a field of a List"],
    ),
    "terminal-escapes-and-a-forged-line": (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
        'spec:\n  ports: [{port: 80}]\n  "\\e[2J\\e]0;owned\\a\\nsvcbench: all good": 1\n',
        ["spec.\\x1b[2J\\x1b]0;owned\\x07\\nsvcbench: all good is not a field"],
    ),
    "a-key-of-900-kb": (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
        f"spec:\n  ports: [{{port: 80}}]\n  ? {'k' * 900_000}\n  : 1\n",  # explicit: any length
        ["Service default/s spec.kkkkk", "k... is not a field of a Service spec"],
    ),
    "a-name-of-900-kb": (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {'n' * 900_000}}}\n",
        ['Service metadata.name must be a DNS-1035 label', 'not "nnnnn', 'n..."'],
    ),
    "node128-would-take-service-addresses": (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: node128}\n",
        ["spec.nodeName 'node128' is not a node", "the address plan fits at most 127"],
    ),
    "node200-would-be-the-external-client": (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: node200}\n",
        ["spec.nodeName 'node200' is not a node"],
    ),
    "node256-is-past-the-plan": (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: node256}\n",
        ["spec.nodeName 'node256' is not a node"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifests_are_one_clean_line_and_exit_2(case, capsys, tmp_path):
    text, fragments = BAD_MANIFESTS[case]
    path = tmp_path / "t.yaml"
    path.write_text(text)
    status, _, stderr = run_cli(capsys, "render", "-f", str(path))
    assert status == 2, stderr
    line = assert_one_clean_line(stderr)
    assert line.startswith("svcbench: error: ")
    for fragment in fragments:
        assert fragment in line, (fragment, line)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["probe", "--from", "external", "--to", "198.19.0.1:80", "--timeout", value],
         ["--timeout must be a number of seconds above 0 and at most 60", repr(value)])
        for value in ("0", "-1", "nan", "inf", "1e999", "61", "soon")
    ] + [
        (["up", "--nodes", "128"], ["--nodes must be a whole number from 1 to 127"]),
        (["render", "--nodes", "200", "-f", "x.yaml"], ["--nodes", "from 1 to 127"]),
        (["up", "--mode", "\x1b[2J\udcff"], ["--mode '\\x1b[2J\\udcff' is not a proxy mode"]),
        (["up", "--mode", "x" * 5000], ["x...' is not a proxy mode; accepted: iptables"]),
        ([], ["the following arguments are required: COMMAND"]),
    ],
)  # fmt: skip
def test_bad_flags_are_one_clean_line_and_exit_2(argv, fragments, capsys):
    status, _, stderr = run_cli(capsys, *argv)
    assert status == 2, stderr
    line = assert_one_clean_line(stderr)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_usage_errors_are_sanitised_too(capsys, tmp_path):
    path = tmp_path / "svc.yaml"
    path.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n")
    status, _, stderr = run_cli(capsys, "render", "-f", str(path), "--node", "node1\n\x1b[31mx")
    assert status == 2
    assert "--node 'node1\\n\\x1b[31mx' is not a node" in assert_one_clean_line(stderr)


# --------------------------------------------------------------------------- the address plan


def test_the_address_plan_decides_how_many_nodes_fit():
    services = ipaddress.ip_network(PLAN.service_cidr)
    cluster = ipaddress.ip_network(PLAN.cluster_cidr)
    nodes = [Node.numbered(k) for k in range(1, PLAN.max_nodes + 1)]
    assert PLAN.max_nodes == 127
    for node in nodes:
        assert node.ip != PLAN.external_client_ip
        assert ipaddress.ip_address(node.ip) in ipaddress.ip_network(PLAN.node_cidr)
        pods = ipaddress.ip_network(node.pod_cidr)
        assert pods.subnet_of(cluster) and not pods.overlaps(services)
    assert len({n.pod_cidr for n in nodes}) == len(nodes)
    with pytest.raises(ValueError, match="node128 does not fit the address plan"):
        Node.numbered(128)


def test_render_grows_to_the_last_node_that_fits_and_up_refuses_the_same_way(capsys, tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Pod
        metadata: {name: edge, labels: {app: edge}}
        spec: {nodeName: node127}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: edge}
        spec: {clusterIP: 198.19.0.9, selector: {app: edge}, ports: [{port: 80}]}
        """))
    status, out, stderr = run_cli(capsys, "render", "-f", str(path))
    assert status == 0, stderr
    assert "--to-destination 198.18.255.2:80" in out  # node127's first pod address
    path.write_text(path.read_text().replace("node127", "node128"))
    for command in ("render", "up"):  # up fails before creating anything, as render does
        status, _, stderr = run_cli(capsys, command, "--nodes", "2", "-f", str(path))
        assert status == 2
        assert "spec.nodeName 'node128' is not a node of this cluster" in stderr
