"""`--cluster kind|kubeconfig[=PATH]` for `up`, `conformance` and `bench`, `svcbench kind config`,
and the kube side of `down` and `gc`.

Bad input is refused before anything exists, in one sentence with exit status 2: an unknown
--cluster, a kube-proxy mode on a namespace cluster, Docker or kind missing, a kubeconfig
that is missing or whose API server does not answer, svcbench's own mode on a cluster that
runs kube-proxy. Everything a command creates is removed when it ends (success, failure,
Ctrl-C, SIGTERM), except what `up` keeps until `down`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from clusters.kind import KUBE_PROXY_MODES, KindUnavailable
from clusters.kube import KubeUnavailable
from kube import deploy

CLUSTERS = ("netns", "kind", "kubeconfig")


class KubeUsageError(ValueError):
    """Bad input for a real cluster: one sentence, exit status 2."""


USAGE_ERRORS = (KubeUsageError, KubeUnavailable, KindUnavailable)  # cli: exit 2


def parse_cluster(text: str) -> tuple[str, str | None]:
    """"netns", "kind", "kubeconfig" or "kubeconfig=PATH" -> (provider, path)."""
    name, sep, path = text.partition("=")
    if name not in CLUSTERS or (sep and (name != "kubeconfig" or not path)):
        raise argparse.ArgumentTypeError(
            f"--cluster must be netns, kind, kubeconfig or kubeconfig=PATH, not {text!r}")
    return name, (path or None)


def add_cluster_flags(sp: argparse.ArgumentParser, with_nodes: bool = False) -> None:
    sp.add_argument("--cluster", type=parse_cluster, default=("netns", None),
                    metavar="netns|kind|kubeconfig[=PATH]",
                    help="where to run: network namespaces on this host (default), a kind cluster "
                         "made for the run, or the cluster a kubeconfig reaches (default "
                         "$KUBECONFIG or ~/.kube/config)")
    sp.add_argument("--image", default=deploy.DEFAULT_IMAGE,
                    help=f"the suite's image on a real cluster (default {deploy.DEFAULT_IMAGE})")
    if with_nodes:
        sp.add_argument("--nodes", type=int, default=2, help="kind worker nodes (default 2)")


def check_mode(mode: str, flag: str = "--mode") -> None:
    """kube-proxy's own modes, or a mode spec of svcbench's (dataplanes/modes.py, such as
    ipvs:lc); KubeUsageError naming the accepted values otherwise."""
    if mode in KUBE_PROXY_MODES:
        return
    from dataplanes.modes import parse_mode

    try:
        parse_mode(mode, flag)
    except ValueError as exc:
        raise KubeUsageError(f"{exc}; or kube-proxy's own: {', '.join(KUBE_PROXY_MODES)}"
                             ) from None


def wants_kube(args) -> bool:
    return getattr(args, "cluster", ("netns", None))[0] != "netns"


def refuse_kube_proxy_on_netns(mode: str) -> None:
    if mode in KUBE_PROXY_MODES:
        raise KubeUsageError(f"--mode {mode} is kube-proxy itself and runs only on a real "
                             "cluster; add --cluster kind or --cluster kubeconfig")


def _say(err):
    def say(message: str) -> None:
        err.print(message, markup=False, highlight=False, emoji=False)
    return say


def _session(args, mode: str, keep: bool, say):
    from clusters import kind, kube

    provider, path = args.cluster
    check_mode(mode)
    if provider == "kind":
        try:
            kind.config(mode, getattr(args, "nodes", 2))  # bad flags before anything exists
        except ValueError as exc:
            raise KubeUsageError(str(exc)) from None
    return kube.session(provider, mode, kubeconfig=path, workers=getattr(args, "nodes", 2),
                        image=args.image, keep=keep, say=say)


def _check_proxy(cluster, provider: str, mode: str) -> bool:
    """True when svcbench's agent must be deployed; refuses a mode the cluster cannot take."""
    if provider == "kind":
        return mode not in KUBE_PROXY_MODES
    runs = cluster.runs_kube_proxy()
    if mode not in KUBE_PROXY_MODES and runs:
        raise KubeUnavailable(f"the cluster runs kube-proxy (kube-system/kube-proxy), so "
                              f"svcbench's --mode {mode} cannot take its place; use --mode "
                              "kube-proxy/<its mode> or a cluster without kube-proxy")
    return mode not in KUBE_PROXY_MODES


def _cidrs(cluster, provider: str) -> tuple[str, str]:
    """The agent's --cluster-cidr and --service-cidr: kind's, as its config sets them, or
    what the kubeconfig's cluster says."""
    if provider == "kind":
        from clusters.kind import POD_SUBNET, SERVICE_SUBNET

        return POD_SUBNET, SERVICE_SUBNET
    return cluster.cidrs()


# --------------------------------------------------------------------------- up


def up(args, out, err) -> int:
    from kube.manifests import Manifests, load_files
    from kube.model import Pod

    manifests = load_files(args.file) if args.file else Manifests((), (), ())
    per_node = getattr(args, "pods_per_node", 0)
    nodes = args.nodes
    generated = tuple(Pod("default", f"echo-node{k}-{i}", {"app": "echo"}, node_name=f"node{k}")
                      for k in range(1, nodes + 1) for i in range(1, per_node + 1))
    manifests = Manifests(generated, (), ()).merged(manifests)
    if manifests.endpoint_slices or manifests.nodes:
        err.print("note: hand-written EndpointSlices and Node labels stay out of a real "
                  "cluster: its controllers own those", markup=False, highlight=False)
    say = _say(err)
    started = time.perf_counter()
    with _session(args, args.mode, keep=True, say=say) as cluster:
        agent = _check_proxy(cluster, args.cluster[0], args.mode)
        names = cluster.node_names()
        node_names = {f"node{k}": n for k, n in enumerate(names, start=1)}
        from clusters.kube import host_id

        objects = deploy.objects_for(cluster.run, args.mode, services=manifests.services,
                                     pods=manifests.pods, node_names=node_names,
                                     image=args.image, with_agent=agent, host=host_id(),
                                     api_server=cluster.api_server() if agent else None,
                                     cidrs=_cidrs(cluster, args.cluster[0]) if agent else None)
        cluster.create(objects)
        cluster.wait_ready()
    elapsed = time.perf_counter() - started
    data = {"run": cluster.run, "cluster": args.cluster[0], "mode": args.mode,
            "nodes": len(names), "pods": len(manifests.pods),
            "services": len(manifests.services), "seconds": round(elapsed, 3)}
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        out.print(f"cluster {cluster.run} up in {elapsed:.1f} s on {args.cluster[0]}: "
                  f"{len(names)} nodes, {len(manifests.pods)} pods, "
                  f"{len(manifests.services)} services, mode {args.mode}; "
                  f"`svcbench down --run {cluster.run}` removes it")
    return 0


def owns(run: str | None) -> bool:
    from clusters.kube import list_records

    return run is not None and run in list_records()


def down(args, out) -> int:
    from clusters import kube

    for line in kube.down(args.run):
        out.print(line)
    out.print(f"cluster {args.run} removed")
    return 0


def gc_lines() -> list[str]:
    from clusters import kube

    try:
        return kube.gc()
    except KubeUnavailable:
        return []


# --------------------------------------------------------------------------- kind config


def kind_config(args, out) -> int:
    from clusters import kind

    check_mode(args.mode)
    try:
        cfg = kind.config(args.mode, args.nodes, args.run)
    except ValueError as exc:
        raise KubeUsageError(str(exc)) from None
    sys.stdout.write(kind.dump(cfg))
    return 0


def add_kind_parser(command, func) -> None:
    """`svcbench kind config --mode M [--nodes N]`: the kind config a run would use."""
    sp = command("kind", func, "print the kind cluster config svcbench uses for a mode")
    sp.add_argument("action", choices=("config",))
    sp.add_argument("--mode", required=True,
                    help="svcbench's mode (the agent, kubeProxyMode none) or kube-proxy/iptables, "
                         "kube-proxy/ipvs, kube-proxy/nftables")
    sp.add_argument("--nodes", type=int, default=2, help="worker nodes (default 2)")
    sp.add_argument("--run", default=None, help="run id to name the cluster svb-<run>")


# --------------------------------------------------------------------------- conformance


def conformance(args, out, err) -> int:
    """The API checks (conformance/kube_checks.py) on a kind or kubeconfig cluster, into
    conformance.json in the namespace set's shape."""
    from bench import kube_bench
    from conformance import kube_checks
    from reports.results import new_run_dir

    say = _say(err)
    with _session(args, args.mode, keep=False, say=say) as cluster:
        agent = _check_proxy(cluster, args.cluster[0], args.mode)
        # the run folder only once the cluster is usable: bad input leaves nothing behind
        out_dir = args.out_dir or str(new_run_dir(kind=f"conformance-kube-{args.cluster[0]}"))
        from clusters.kube import host_id

        objects = [deploy.namespace(cluster.run, deploy.SYSTEM, host_id())]
        if agent:
            objects += deploy.agent_objects(cluster.run, args.mode, args.image,
                                            cluster.api_server(),
                                            _cidrs(cluster, args.cluster[0]))
        objects += [deploy.probe_daemonset(cluster.run, args.image)]
        objects += [deploy.probe_daemonset(cluster.run, args.image, host_network=True)]
        objects += kube_bench.bench_objects(cluster.run, 1, 2, args.image)
        objects += kube_checks.objects(cluster.run, cluster.node_names(), args.image,
                                       host_id())
        cluster.create(objects)
        cluster.wait_ready()
        kube_bench.label_echo_pods(cluster)
        bench = kube_checks.BenchObjects(
            kube_bench.PROBE_NS, "svc-0", kube_bench.LAT_SERVICE,
            lambda changes: kube_bench.measure_programming(cluster, "", changes, say=say))
        checks = kube_checks.run(cluster, bench, say)
    data = {"mode": args.mode, "cluster": args.cluster[0], "kernel_kind": args.cluster[0],
            "checks": checks}
    os.makedirs(out_dir, exist_ok=True)  # --out DIR need not exist yet
    with open(os.path.join(out_dir, "conformance.json"), "w") as fh:
        json.dump(data, fh, indent=2)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        for c in checks:
            out.print(f"{c['name']}: {c['outcome']} ({c['duration_s']:.1f} s)"
                      + (f" {c['reason']}" if c["reason"] else ""))
        out.print(f"results in {out_dir}")
    return 0 if all(c["outcome"] in ("passed", "skipped") for c in checks) else 1


# --------------------------------------------------------------------------- bench


def _list(text: str | None, default: list[str]) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()] if text else default


def _save(folder, args, modes: list[str], rows: list[dict[str, Any]],
          stopped: dict[str, Any] | None = None, repeats: int = 1,
          budget_s: float | None = None) -> None:
    """kube-bench.json (every row as measured), and bench.csv and run.json in the namespace
    sweep's columns (kernel: the cluster kind; one row per repeat) for `svcbench report` and
    `report --compare`. A sweep the budget stopped is incomplete, with where it stopped."""
    from reports.results import environment, write_bench_csv, write_run_json

    (folder / "kube-bench.json").write_text(json.dumps({"cluster": args.cluster[0],
                                                        "rows": rows}, indent=1))
    write_bench_csv(folder, [
        {"mode": r["mode"], "kernel": args.cluster[0], "n_services": r["services"],
         "metric": r["metric"], "stat": r["stat"], "value": r["value"], "unit": r["unit"],
         "repeat": r.get("repeat", 0), "extra": {"samples": r["samples"]}}
        for r in rows if r["value"] is not None])
    meta = {**environment(), "kind": "bench", "cluster": args.cluster[0],
            "kernel": args.cluster[0], "kernel_kind": args.cluster[0], "modes": modes,
            "args": {"repeats": repeats, "budget_s": budget_s},
            "complete": stopped is None, "status": "complete" if stopped is None
            else "incomplete"}
    if stopped is not None:
        meta.update(incomplete_reason="budget", stopped_at=stopped)
    write_run_json(folder, meta)


def _repeats_and_budget(args) -> tuple[int, float | None]:
    """--repeats (1 to 100, default 1) and --budget (bench/runner.py's forms) for a cluster."""
    from bench.runner import BenchSpecError, parse_budget

    text = getattr(args, "repeats", None)
    try:
        repeats = int(text) if text is not None else 1
    except ValueError:
        repeats = 0
    if not 1 <= repeats <= 100:
        raise KubeUsageError(f"--repeats must be a whole number from 1 to 100, not {text!r}")
    try:
        return repeats, parse_budget(getattr(args, "budget", None))
    except BenchSpecError as exc:
        raise KubeUsageError(str(exc)) from None


def bench(args, out, err) -> int:
    """The sweep on a kind or kubeconfig cluster: at each size every measurement --repeats
    times (one row each); past --budget the sweep stops after the size being measured,
    later sizes and modes are left out and run.json says incomplete (exit status 0, as the
    namespace sweep's)."""
    from bench import kube_bench
    from reports.results import new_run_dir

    modes = _list(getattr(args, "modes", None), ["kube-proxy/iptables"])
    for m in modes:
        check_mode(m, "--modes")
    try:
        sizes = sorted({int(s) for s in _list(getattr(args, "services", None), ["1", "100"])})
        count = int(getattr(args, "count", None) or 50)
    except ValueError:
        raise KubeUsageError("--services must be whole numbers separated by commas and --count "
                             "a whole number") from None
    if not sizes or sizes[0] < 1 or count < 1:
        raise KubeUsageError("--services and --count must be 1 or more")
    repeats, budget_s = _repeats_and_budget(args)
    say = _say(err)
    if args.cluster[0] == "kind":  # bad input before the run folder exists
        from clusters.kind import preflight

        preflight()
    else:
        from clusters.kube import connect, kubeconfig_path

        connect(kubeconfig_path(args.cluster[1]))
    folder = new_run_dir(getattr(args, "out", None) or "runs", f"bench-kube-{args.cluster[0]}")
    rows: list[dict[str, Any]] = []
    status = 0
    started = time.monotonic()

    def over_budget() -> bool:
        return budget_s is not None and time.monotonic() - started >= budget_s

    stopped: dict[str, Any] | None = None
    for mode in modes:
        if stopped is not None:
            break
        if over_budget():
            stopped = {"before_mode": mode, "elapsed_s": round(time.monotonic() - started, 1),
                       "budget_s": budget_s}
            break
        try:
            with _session(args, mode, keep=False, say=say) as cluster:
                agent = _check_proxy(cluster, args.cluster[0], mode)
                from clusters.kube import host_id

                objects = [deploy.namespace(cluster.run, deploy.SYSTEM, host_id())]
                if agent:
                    objects += deploy.agent_objects(cluster.run, mode, args.image,
                                                    cluster.api_server(),
                                                    _cidrs(cluster, args.cluster[0]))
                objects += [deploy.probe_daemonset(cluster.run, args.image),
                            deploy.probe_daemonset(cluster.run, args.image, host_network=True)]
                cluster.create(objects)
                try:
                    rows += [r.to_json() for r in kube_bench.run_mode(
                        cluster, mode, sizes=sizes, count=count, changes=20, image=args.image,
                        say=say, repeats=repeats, over_budget=over_budget)]
                except kube_bench.BudgetSpent as spent:
                    rows += [r.to_json() for r in spent.rows]
                    stopped = {"mode": mode, "pass": repeats, "n_services": spent.size,
                               "elapsed_s": round(time.monotonic() - started, 1),
                               "budget_s": budget_s}
                    say(f"bench: {spent}; stopping here (run.json says incomplete)")
        except (KubeUnavailable, KindUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - one mode failing keeps the others' rows
            say(f"{mode}: {type(exc).__name__}: {exc}")
            status = 1
        _save(folder, args, modes, rows, stopped, repeats, budget_s)
    if stopped is not None:
        _save(folder, args, modes, rows, stopped, repeats, budget_s)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    else:
        for r in rows:
            value = "-" if r["value"] is None else f"{r['value']:.6g}"
            out.print(f"{r['mode']:<22} {r['metric']:<24} N={r['services']:<6} "
                      f"{r['stat']:<5} {value} {r['unit']}"
                      + (f" (repeat {r['repeat'] + 1})" if repeats > 1 else ""))
        if stopped is not None:
            where = (f"after {stopped['mode']} at {stopped['n_services']:,} Services"
                     if "mode" in stopped else f"before {stopped['before_mode']}")
            out.print(f"incomplete: the budget ran out {where}; later sizes and modes were not "
                      "measured (run.json 'stopped_at')")
        out.print(f"results in {folder}")
    return status
