"""The `svcbench` command: the only module that knows every folder.

Exit status: 0 success, 1 a failure while working (a check failed, the kernel refused),
2 bad input (flags, manifests, sweep specs) with nothing created, or a command that needs
root run without it; 128 + the signal's number when SIGINT (130), SIGTERM or SIGHUP stopped
it, after the same cleanup as Ctrl-C. Commands that change one run (`apply`, `delete`,
`down`) take turns on the run's lock.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from clusters.signals import interrupt_on_signals
from dataplanes.modes import gc_leftovers
from dataplanes.proxy import ServiceProxy
from kube.manifests import ManifestError, Manifests, load_files
from kube.model import PLAN, Node, Pod
from kube.state import ClusterState, StateError, allocations, previous_from_allocations
from kube.tracker import ChangeTracker
from svcbench.guest import RUN_COMMANDS, forward

out = Console(highlight=False)
if not out.is_terminal and "COLUMNS" not in os.environ:
    # Piped or logged output is not cut to rich's 80 columns: a table row stays one line.
    out.width = 200
err = Console(stderr=True, highlight=False, soft_wrap=True)


class UsageError(ValueError):
    """Bad input the user can fix: one sentence, exit status 2."""


MAX_ERROR_CHARS = 300


def _one_line(message: str) -> str:
    """Every error as printed: control characters escaped (input may carry terminal escapes or
    forged lines) and at most MAX_ERROR_CHARS long, its middle cut if need be."""
    if len(message) > 4 * MAX_ERROR_CHARS:  # escaping a huge message would be slow for nothing
        message = message[: 2 * MAX_ERROR_CHARS] + message[-2 * MAX_ERROR_CHARS :]
    text = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message
    )
    if len(text) > MAX_ERROR_CHARS:
        head = (MAX_ERROR_CHARS - 5) * 2 // 3
        text = f"{text[:head]} ... {text[head + 5 - MAX_ERROR_CHARS:]}"
    return text


class _ArgumentParser(argparse.ArgumentParser):
    """A bad flag is reported as one sanitised line, like every other rejection."""

    def error(self, message: str):
        err.print(_one_line(f"{self.prog}: error: {message}"), markup=False, emoji=False)
        sys.exit(2)


# --------------------------------------------------------------------------- helpers


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _positive(flag: str, lo: int = 1, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            upper = f" to {hi}" if hi is not None else " or more"
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number from {lo}{upper}, not {text!r}")
        return value

    return parse


def _seconds(flag: str, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 < value <= hi:  # nan and inf fail here too
            raise argparse.ArgumentTypeError(
                f"{flag} must be a number of seconds above 0 and at most {hi:g}, not {text!r}"
            )
        return value

    return parse


def _target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        port_n = int(port)
        if not sep or not 1 <= port_n <= 65535:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--to must be IPv4:PORT with a port from 1 to 65535, such as 198.19.0.1:80, not {text!r}"
        ) from None
    return host, port_n


def _load(paths: Sequence[str] | None) -> Manifests:
    return load_files(paths) if paths else Manifests((), (), ())


def _generated_pods(nodes: list[Node], per_node: int) -> list[Pod]:
    """`up --pods-per-node M`: M echo pods on each node, selected by app=echo."""
    return [
        Pod("default", f"echo-{n.name}-{i}", {"app": "echo"}, node_name=n.name)
        for n in nodes
        for i in range(1, per_node + 1)
    ]


def _nodes(count: int) -> list[Node]:
    return [Node.numbered(k) for k in range(1, count + 1)]


def _build(nodes, manifests: Manifests, previous: ClusterState | None = None) -> ClusterState:
    return ClusterState.build(
        nodes, manifests.pods, manifests.services, manifests.endpoint_slices, previous=previous,
        node_labels=manifests.nodes,
    )


def _dataplane(mode: str, backend: str | None, check: bool = True):
    from dataplanes.base import Host
    from dataplanes.modes import make

    dp = make(mode, backend=backend)
    missing = dp.missing(Host()) if check else []
    if missing:
        raise RuntimeError(f"mode {mode} cannot run here: " + "; ".join(missing))
    return dp


def _stored_dataplane(cluster, check: bool = True):
    """The data plane a run was made with (its stored mode spec and backend); `check`: fail
    where it cannot run here, as commands that program the nodes must."""
    return _dataplane(cluster.meta.get("mode", "iptables"), cluster.meta.get("backend"), check)


def _track(nodes, manifests: Manifests, previous: ClusterState | None = None) -> ChangeTracker:
    """The desired state of `manifests`, derived once: placements and allocations that
    `previous` (an earlier command's) made are kept. StateError names a refused field."""
    tracker = ChangeTracker(nodes, node_labels=manifests.nodes, previous=previous)
    tracker.apply(pods=manifests.pods, services=manifests.services,
                  slices=manifests.endpoint_slices)
    return tracker


def _attach(run: str | None):
    from clusters.netns import NetnsCluster

    return NetnsCluster.attach(run)


def _stored(cluster) -> tuple[list[Node], Manifests, ClusterState]:
    from kube.manifests import load_documents

    nodes = _nodes(len(cluster.nodes))
    manifests = load_documents(cluster.meta.get("manifests", []), source="the run's state")
    previous = previous_from_allocations(nodes, cluster.meta.get("allocations", {}))
    return nodes, manifests, previous


def _stored_tracker(cluster) -> ChangeTracker:
    """The running cluster's desired state, as its last up/apply/delete left it."""
    return _track(*_stored(cluster))


def _store(cluster, manifests: Manifests, tracker: ChangeTracker, stats) -> None:
    cluster.meta["manifests"] = manifests.to_documents()
    cluster.meta["allocations"] = allocations(tracker.pods.values(), tracker.services.values())
    syncs = cluster.meta.setdefault("syncs", {})
    for s in stats:  # what `status` shows as each node's last sync
        syncs[s.node] = {"time": round(time.time(), 3), "seconds": round(s.seconds, 6),
                         "full": s.full, "services": s.services, "rules": s.rules,
                         "changed": s.changed}
    cluster.save()


def _print_sync(stats) -> None:
    for s in stats:
        kind = "full" if s.full else "partial"
        out.print(
            f"  {s.node}: {kind} sync of {s.services} service ports in {s.seconds * 1000:.1f} ms "
            f"({s.rules} rules, {s.changed} changed)"
        )


# --------------------------------------------------------------------------- commands


def cmd_doctor(args) -> int:
    from svcbench import doctor

    if os.geteuid() != 0 and not args.json:
        out.print(doctor.NOT_ROOT, soft_wrap=True)  # nothing it checks is usable without root
        return 1
    findings = doctor.fix(echo=err.print) if args.fix else doctor.examine()
    if args.json:
        _emit_json({"ok": all(f.present for f in findings), "checks": doctor.as_json(findings)})
    else:
        table = Table("check", "needed for", "status", "install")
        for f in findings:
            table.add_row(f.name, f.why, "[green]ok[/]" if f.present else "[red]missing[/]",
                          "" if f.present else f.fix)
        out.print(table)
    return 0 if all(f.present for f in findings) else 1


def _kube(name: str, *extra):
    """Run cmd_kube.NAME(args, ...); its bad input (Docker, kind or a kubeconfig missing)
    is one sentence with exit status 2, as every other."""
    from svcbench import cmd_kube

    def call(args) -> int:
        try:
            return getattr(cmd_kube, name)(args, *extra)
        except cmd_kube.USAGE_ERRORS as exc:
            raise UsageError(str(exc)) from None

    return call


def _netns_mode(args) -> None:
    from svcbench.cmd_kube import KubeUsageError, refuse_kube_proxy_on_netns

    try:
        refuse_kube_proxy_on_netns(args.mode)
    except KubeUsageError as exc:
        raise UsageError(str(exc)) from None


def cmd_up(args) -> int:
    from clusters.netns import NetnsCluster
    from clusters.safety import guard_root

    if args.cluster[0] != "netns":
        return _kube("up", out, err)(args)
    _netns_mode(args)
    manifests = _load(args.file)
    nodes = _nodes(args.nodes)
    generated = _generated_pods(nodes, args.pods_per_node)
    manifests = Manifests(tuple(generated), (), ()).merged(manifests)
    tracker = _track(nodes, manifests)  # bad input stops here, before anything exists
    dp = _dataplane(args.mode, args.backend)
    pods, services = list(tracker.pods.values()), list(tracker.services.values())
    started = time.perf_counter()
    with guard_root(), err.status("creating the cluster") as status:
        def progress(msg: str) -> None:
            status.update(msg)

        with NetnsCluster.create(args.nodes, progress=progress) as cluster:
            status.update(f"starting {len(pods)} pods")
            cluster.set_pods(pods)
            status.update(f"programming {args.mode} on {len(cluster.nodes)} nodes")
            proxy = ServiceProxy(dp, cluster.nodes, tracker)
            proxy.install()
            stats = proxy.resync()
            cluster.meta.update(mode=args.mode, backend=args.backend)
            _store(cluster, manifests, tracker, stats)
            cluster.keep()
    elapsed = time.perf_counter() - started
    if args.json:
        _emit_json({"run": cluster.run_id, "mode": args.mode, "nodes": len(nodes),
                    "pods": len(pods), "services": len(services),
                    "seconds": round(elapsed, 3)})
    else:
        out.print(f"cluster [bold]{cluster.run_id}[/] up in {elapsed:.2f} s: {len(nodes)} nodes, "
                  f"{len(pods)} pods, {len(services)} services, mode {args.mode}")
        _print_sync(stats)
    return 0


def _change(args, combine) -> int:
    from clusters.netns import NetnsCluster
    from clusters.safety import guard_root

    new = load_files(args.file)  # bad input stops here, before waiting for the run
    with NetnsCluster.attach_locked(args.run) as cluster, guard_root():
        nodes, stored, previous = _stored(cluster)
        manifests = combine(stored, new)
        tracker = _track(nodes, manifests, previous)
        dp = _stored_dataplane(cluster)
        proxy = ServiceProxy(dp, cluster.nodes, tracker)
        proxy.adopt()  # this process has no memory of the nodes: each gets one full sync
        stats = cluster.set_pods(list(tracker.pods.values()), proxy.resync)
        _store(cluster, manifests, tracker, stats)
    if args.json:
        _emit_json({"run": cluster.run_id, "sync": [s.__dict__ for s in stats]})
    else:
        out.print(f"cluster {cluster.run_id}: {len(tracker.services)} services, "
                  f"{len(tracker.pods)} pods")
        _print_sync(stats)
    return 0


def cmd_apply(args) -> int:
    return _change(args, lambda stored, new: stored.merged(new))


def cmd_delete(args) -> int:
    return _change(args, lambda stored, new: stored.without(new))


def cmd_render(args) -> int:
    manifests = _load(args.file)
    wanted = [p.node_name for p in manifests.pods if p.node_name]
    named = [int(n[4:]) for n in wanted if n.startswith("node") and n[4:].isdigit()]
    # Grow to the nodes pods name, within the address plan; the state refuses the rest, as in up.
    count = max([args.nodes] + [k for k in named if k <= PLAN.max_nodes])
    state = _build(_nodes(count), manifests)
    node = args.node or "node1"
    try:
        view = state.node_view(node)
    except KeyError:
        raise UsageError(f"--node {node!r} is not a node of this cluster; nodes: node1 to node{count}") from None
    from dataplanes.modes import make

    dp = make(args.mode, backend=args.backend)
    if not hasattr(dp, "render"):
        raise UsageError(f"--mode {args.mode} programs the kernel directly and has no text form to render")
    sys.stdout.write(dp.render(view))
    return 0


def _source_netns(cluster, source: str) -> str:
    kind, _, name = source.partition("/")
    if kind == "external" and not name:
        return cluster.external_netns
    if kind == "node" and name:
        return cluster.node(name).netns
    if kind == "pod" and name:
        ns, _, pod = name.rpartition("/")
        return cluster.pod_netns(ns or "default", pod)
    raise UsageError(f"--from must be pod/NAME, pod/NAMESPACE/NAME, node/NAME or external, not {source!r}")


def cmd_probe(args) -> int:
    from clusters.nsenter import in_netns
    from clusters.workloads.probe import probe

    cluster = _attach(args.run)
    try:
        netns = _source_netns(cluster, args.source)
    except KeyError as exc:
        raise UsageError(f"--from {args.source}: no such {exc.args[0]} in run {cluster.run_id}") from None
    ip, port = args.to
    result = in_netns(
        netns, probe, ip, port, protocol="UDP" if args.udp else "TCP", count=args.count,
        timeout=args.timeout, payload=b"x" * args.payload_bytes,
    )
    if args.json:
        _emit_json(result.to_json())
        return 0
    s = result.summary()
    table = Table("outcome", "count")
    for outcome, n in sorted(s["outcomes"].items()):
        table.add_row(outcome, str(n))
    out.print(table)
    if s["backends"]:
        bt = Table("backend", "count")
        for backend, n in sorted(s["backends"].items()):
            bt.add_row(backend, str(n))
        out.print(bt)
    if s["p50_us"] is not None:
        out.print(f"latency p50 {s['p50_us']:.0f} µs  p90 {s['p90_us']:.0f} µs  p99 {s['p99_us']:.0f} µs")
    return 0


def cmd_status(args) -> int:
    from svcbench.cmd_status import run

    cluster = _attach(args.run)
    return run(args, cluster, _stored_tracker(cluster), _stored_dataplane(cluster, False), out)


def _node_names(cluster, wanted: str | None) -> list[str]:
    """The run's node names; UsageError when --node names none of them."""
    names = [n.name for n in cluster.nodes]
    if wanted is not None and wanted not in names:
        raise UsageError(f"--node {wanted!r} is not a node of run {cluster.run_id}; nodes: "
                         f"{', '.join(names)}")
    return names


def cmd_endpoint_list(args) -> int:
    cluster = _attach(args.run)
    _node_names(cluster, args.node)
    state = _stored_tracker(cluster).state()
    # A pod's own conditions; an address that is no pod: its EndpointSlice's.
    rows: dict[tuple[str, str], dict] = {}
    for pod in state.pods:
        rows[(pod.namespace, pod.ip)] = {
            "pod": f"{pod.namespace}/{pod.name}", "node": pod.node_name, "ip": pod.ip,
            "ready": pod.ready, "serving": pod.ready, "terminating": pod.terminating,
            "services": []}
    for sl in state.endpoint_slices:
        service = f"{sl.namespace}/{sl.service_name}"
        for ep in sl.endpoints:
            for address in ep.addresses:
                row = rows.setdefault((sl.namespace, address), {
                    "pod": None, "node": ep.node_name, "ip": address, "ready": ep.ready,
                    "serving": ep.serving, "terminating": ep.terminating, "services": []})
                if service not in row["services"]:
                    row["services"].append(service)
    listed = sorted((r for r in rows.values() if args.node in (None, r["node"])),
                    key=lambda r: (r["node"] or "", r["pod"] or "~", r["ip"]))
    if args.json:
        _emit_json({"run": cluster.run_id, "endpoints": listed})
        return 0
    table = Table("node", "pod", "IP", "ready", "serving", "terminating", "services")
    for r in listed:
        table.add_row(r["node"] or "-", r["pod"] or "(not a pod)", r["ip"], _yes(r["ready"]),
                      _yes(r["serving"]), _yes(r["terminating"]),
                      ", ".join(r["services"]) or "-")
    out.print(table)
    return 0


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def cmd_monitor(args) -> int:
    from svcbench.cmd_monitor import run

    cluster = _attach(args.run)
    names = _node_names(cluster, args.node)
    return run(args, cluster, _stored_tracker(cluster), _stored_dataplane(cluster, False), names,
               out, err)


def cmd_down(args) -> int:
    from clusters.netns import NetnsCluster
    from clusters.safety import guard_root
    from svcbench.cmd_kube import owns

    if owns(args.run):
        return _kube("down", out)(args)
    with NetnsCluster.attach_locked(args.run) as cluster, guard_root():
        try:
            dp = _stored_dataplane(cluster)
            proxy = ServiceProxy(dp, cluster.nodes, ChangeTracker(_nodes(len(cluster.nodes))))
            proxy.adopt()
            proxy.uninstall()
        finally:
            # What a failed uninstall left outside the namespaces (BPF hooks, cgroups).
            gc_leftovers(cluster.namespaces, modes=[cluster.meta.get("mode", "iptables")])
            cluster.destroy()
    out.print(f"cluster {cluster.run_id} removed")
    return 0


def _progress(title: str):
    """A live status line on a terminal; otherwise (CI logs, a shard's pipe) a line per step."""
    if err.is_terminal:
        return err.status(title)

    class Lines(contextlib.AbstractContextManager):
        def update(self, message: str) -> None:
            sys.stderr.write(f"{message}\n")
            sys.stderr.flush()

        def __exit__(self, *exc: object) -> None:
            return None

    return Lines()


def cmd_conformance(args) -> int:
    from conformance.runner import (
        ConformanceError,
        default_jobs,
        exit_status,
        run_conformance,
        run_sharded,
    )
    from reports.results import new_run_dir

    if args.cluster[0] != "netns":
        return _kube("conformance", out, err)(args)
    _netns_mode(args)
    kind = "".join(c if c.isalnum() else "-" for c in args.mode.lower())
    out_dir = args.out_dir or str(new_run_dir(kind=f"conformance-{kind}"))
    jobs = args.jobs or default_jobs()
    try:
        with _progress(f"conformance: {args.mode}") as status:
            if jobs > 1 and not args.shard:
                data = run_sharded(args.mode, jobs=jobs, backend=args.backend,
                                   kernel=args.kernel, keyword=args.keyword, out_dir=out_dir,
                                   progress=status.update)
            else:
                data = run_conformance(args.mode, backend=args.backend, kernel=args.kernel,
                                       keyword=args.keyword, out_dir=out_dir,
                                       progress=status.update, shard=args.shard)
    except ConformanceError as exc:
        if not args.out_dir:  # bad input leaves nothing behind
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
        raise UsageError(str(exc)) from None
    if args.json:
        _emit_json(data)
        return exit_status(data)
    colours = {"passed": "green", "failed": "red", "deviation": "yellow", "skipped": "dim"}
    kernel = f"{data['kernel_kind']} kernel {data['kernel']}"
    t = Table("check", "outcome", "s", "reason", title=f"conformance: {data['mode']} ({kernel})")
    for c in data["checks"]:
        colour = colours.get(c["outcome"], "white")
        t.add_row(c["name"], f"[{colour}]{c['outcome']}[/]", f"{c['duration_s']:.1f}", c.get("reason") or "")
    out.print(t)
    counts = {}
    for c in data["checks"]:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    out.print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    out.print(f"results in {out_dir}")
    return exit_status(data)


def cmd_service_list(args) -> int:
    from svcbench.cmd_service import ModeMismatch, run

    cluster = _attach(args.run)
    _node_names(cluster, args.node)  # an unknown --node: one sentence, exit 2
    try:
        return run(args, cluster, _stored_tracker(cluster), _stored_dataplane(cluster, False),
                   out, _emit_json)
    except ModeMismatch as exc:
        raise UsageError(str(exc)) from None


def cmd_report(args) -> int:
    from bench.metrics import catalog
    from reports.catalog import Catalog
    from reports.render import run_report_command

    # a run.json from before the catalog declared the tracked metrics: this version's
    return run_report_command(args, Catalog(catalog()))


def cmd_gc(args) -> int:
    from clusters.netns import gc, list_netns
    from clusters.uml import gc_guests

    removed = gc_guests(all_guests=args.all)
    removed += gc_leftovers(list_netns() if args.all else None)
    removed += gc(all_runs=args.all)
    removed += gc_leftovers(None)  # what the runs just removed left outside their namespaces
    from bench.runner import FLAG_DEFAULTS, mark_killed

    removed += mark_killed(FLAG_DEFAULTS["out"])
    from svcbench.cmd_kube import gc_lines

    removed += gc_lines()  # kind clusters and kubeconfig namespaces of runs not live
    for line in removed:
        out.print(line)
    if not removed:
        out.print("nothing to remove")
    return 0


def cmd_bench(args) -> int:
    from bench.runner import BenchSpecError, run_bench_command

    if args.cluster[0] != "netns":
        return _kube("bench", out, err)(args)
    try:
        return run_bench_command(args, out, err)
    except BenchSpecError as exc:
        raise UsageError(str(exc)) from None


def cmd_agent(args) -> int:
    from svcbench.cmd_agent import AgentUsageError, run_agent

    try:
        return run_agent(args)
    except AgentUsageError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from dataplanes.modes import IPTABLES_BACKENDS, MODES, SPEC_FORM

    p = _ArgumentParser(
        prog="svcbench",
        description="Benchmark and conformance suite for Kubernetes Service data planes.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    def run_flag(sp):
        sp.add_argument("--run", help="run id (default: the only live run)")

    def mode_flags(sp, default="iptables"):
        sp.add_argument("--mode", default=default, metavar="MODE[:OPTIONS]",
                        help=f"proxy mode ({', '.join(MODES)}) and its options, "
                             f"{SPEC_FORM}: ipvs:lc, userspace:random, iptables:legacy, "
                             "ipvs:scheduler=sh,backend=legacy")
        sp.add_argument("--backend", choices=IPTABLES_BACKENDS, default=None,
                        help="iptables backend (default nft), where the mode spec sets none")

    sp = command("doctor", cmd_doctor, "list prerequisites present and missing")
    sp.add_argument("--fix", action="store_true", help="install what is missing (Debian/Ubuntu, root)")
    sp.add_argument("--json", action="store_true")

    def kernel_flag(sp):
        sp.add_argument("--kernel", choices=("host", "uml"), default="host",
                        help="run on this host's kernel or inside a User-Mode-Linux guest kernel")

    sp = command("up", cmd_up, "create a cluster of network namespaces and program its Services")
    kernel_flag(sp)
    sp.add_argument("--nodes", type=_positive("--nodes", 1, PLAN.max_nodes), default=2)
    sp.add_argument("--pods-per-node", type=_positive("--pods-per-node", 0, 250), default=0)
    mode_flags(sp)
    sp.add_argument("-f", "--file", action="append", help="manifest file (repeatable, - for stdin)")
    sp.add_argument("--json", action="store_true")
    from svcbench.cmd_kube import add_cluster_flags, add_kind_parser

    add_cluster_flags(sp)

    for name, func, verb in (("apply", cmd_apply, "create or update"),
                             ("delete", cmd_delete, "remove")):
        sp = command(name, func, f"{verb} the objects of a manifest in the running cluster and reprogram every node")
        sp.add_argument("-f", "--file", action="append", required=True, help="manifest file")
        run_flag(sp)
        sp.add_argument("--json", action="store_true")

    sp = command("render", cmd_render, "print the rules a mode would program (no root needed)")
    mode_flags(sp)
    sp.add_argument("-f", "--file", action="append", required=True, help="manifest file")
    sp.add_argument("--node", help="node to render for (default node1)")
    sp.add_argument("--nodes", type=_positive("--nodes", 1, PLAN.max_nodes), default=2)

    sp = command("probe", cmd_probe, "open real connections from a pod, a node or the external client")
    sp.add_argument("--from", dest="source", required=True,
                    help="pod/NAME, pod/NAMESPACE/NAME, node/NAME or external")
    sp.add_argument("--to", type=_target, required=True, help="IP:PORT")
    sp.add_argument("--udp", action="store_true")
    sp.add_argument("--count", type=_positive("--count", 1, 1_000_000), default=10)
    sp.add_argument("--timeout", type=_seconds("--timeout", 60), default=1.0,
                    help="seconds per connection")
    sp.add_argument("--payload-bytes", type=_positive("--payload-bytes", 0, 60000), default=0)
    run_flag(sp)
    sp.add_argument("--json", action="store_true")

    sp = command("status", cmd_status, "nodes, pods and Services of the running cluster, and "
                 "per node what the mode has there (rules, programs, processes; cilium status)")
    run_flag(sp)
    sp.add_argument("--json", action="store_true")

    sp = command("endpoint", cmd_endpoint_list, "list the endpoints of the running cluster: pods "
                 "per node with IP, readiness, serving and terminating, and the Services that "
                 "select them (cilium endpoint list)")
    sp.add_argument("action", choices=("list",))
    sp.add_argument("--node", help="only this node's endpoints (default: every node)")
    run_flag(sp)
    sp.add_argument("--json", action="store_true")

    sp = command("monitor", cmd_monitor, "show packets the kernel drops in the running cluster, "
                 "with the drop reason and the Service they were for (cilium monitor -t drop)")
    sp.add_argument("--type", choices=("drop",), default="drop",
                    help="what to show (drop: every packet the kernel drops, skb:kfree_skb, "
                         "and what the mode drops itself: XDP programs, the userspace proxy)")
    sp.add_argument("--node", help="only this node's namespace and its pods (default: all)")
    sp.add_argument("--duration", type=_seconds("--duration", 86400), default=None,
                    help="stop after this many seconds (default: until Ctrl-C)")
    run_flag(sp)
    sp.add_argument("--json", action="store_true", help="one JSON object per drop, per line")

    sp = command("down", cmd_down, "remove the running cluster")
    run_flag(sp)

    sp = command("conformance", cmd_conformance, "check a mode against Kubernetes Service semantics")
    from conformance.runner import add_arguments as conformance_arguments

    conformance_arguments(sp)
    add_cluster_flags(sp, with_nodes=True)

    sp = command("service", cmd_service_list, "list the Service frontends a node's kernel (or "
                 "userspace proxy) holds, in one shape for every mode (cilium service list)")
    sp.add_argument("action", choices=("list",))
    sp.add_argument("--mode", default=None, help="the run's mode (the default; no other)")
    sp.add_argument("--node", help="node name (default: every node)")
    sp.add_argument("--check", action="store_true", help="compare with the intended view; "
                    "list every difference and exit 1 when there is one")
    run_flag(sp)
    sp.add_argument("--json", action="store_true")

    sp = command("report", cmd_report, "render a run folder as one self-contained HTML file")
    from reports.args import add_report_arguments

    add_report_arguments(sp)

    sp = command("gc", cmd_gc, "remove what killed runs left behind")
    sp.add_argument("--all", action="store_true", help="remove every run, live ones too")

    sp = command("bench", cmd_bench, "sweep the number of Services and measure each mode")
    from bench.runner import add_bench_arguments

    add_bench_arguments(sp)
    add_cluster_flags(sp, with_nodes=True)

    sp = command("agent", cmd_agent, "proxy this node's Services from a Kubernetes API server "
                 "(kube-proxy's role, with the chosen mode)")
    from svcbench.cmd_agent import add_agent_arguments

    add_agent_arguments(sp)

    add_kind_parser(command, _kube("kind_config", out))
    return p




def _guest_bound(args) -> bool:
    """True when the command must run inside the User-Mode-Linux guest kernel."""
    if getattr(args, "kernel", "host") == "uml":
        # Checks split over several guests are started, and merged, from the host.
        return not (args.command == "conformance" and not args.shard
                    and (args.jobs or _default_jobs()) > 1)
    if args.command in RUN_COMMANDS:
        from clusters.uml import owns_run

        return owns_run(args.run)
    return False


def _default_jobs() -> int:
    from conformance.runner import default_jobs

    return default_jobs()


NO_ROOT_COMMANDS = ("doctor", "render", "report", "kind")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    with interrupt_on_signals() as caught:
        status = _run(args, argv)
    return caught.exit_status or status


MODE_SPEC_COMMANDS = ("up", "render", "conformance")


def _mode_spec(args) -> None:
    """--mode checked (dataplanes/modes.py's spec) and made canonical before anything runs,
    here or in a guest; UsageError naming the field and the accepted values."""
    from svcbench.cmd_kube import KUBE_PROXY_MODES

    if args.command not in MODE_SPEC_COMMANDS or args.mode in KUBE_PROXY_MODES:
        return  # kube-proxy's own modes: checked by the cluster they need (svcbench.cmd_kube)
    from dataplanes.modes import UnknownMode, parse_mode

    try:
        args.mode = parse_mode(args.mode).label
    except UnknownMode as exc:
        raise UsageError(str(exc)) from None


def _run(args, argv: list[str]) -> int:
    try:
        _mode_spec(args)
        if _guest_bound(args):
            return forward(argv)
        return args.func(args) or 0
    except (ManifestError, StateError, UsageError) as exc:
        err.print(_one_line(f"svcbench: error: {exc}"), markup=False, emoji=False)
        return 2
    except KeyboardInterrupt:
        err.print("svcbench: interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a failure while working: one line, not a traceback
        if os.environ.get("SVCBENCH_DEBUG"):
            raise
        if os.geteuid() != 0 and args.command not in NO_ROOT_COMMANDS:
            # Without root every namespace, rule and run is out of reach: name the cause.
            err.print(f"svcbench: error: svcbench {args.command} works in network namespaces and "
                      "needs root; run it as root", markup=False, emoji=False)
            return 2
        err.print(_one_line(f"svcbench: {type(exc).__name__}: {exc}"), markup=False, emoji=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
