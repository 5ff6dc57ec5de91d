"""`svcbench service list [--mode M] [--node N] [--json] [--check]`: each node's Service
frontends as its kernel (or the userspace proxy) holds them, one row shape for every mode
(`dataplanes/servicelist.py`); `--check` compares them with the node's intended view and
exits 1 when they differ."""

from __future__ import annotations

from rich.table import Table

from dataplanes import servicelist as sl


def _backend_text(b: sl.Backend) -> str:
    notes = [n for n in ("local" if b.local else None, b.state if b.state not in (None, "ready")
                         else None, f"weight {b.weight}" if b.weight is not None else None) if n]
    return b.address + (f" ({', '.join(notes)})" if notes else "")


def _table(title: str, rows: list[sl.Row]) -> Table:
    t = Table("kind", "frontend", "service", "backends", "affinity", "source ranges",
              "no endpoints", "objects", title=title)
    for r in rows:
        service = r.service or "?"
        if r.service_from == sl.FROM_VIEW:
            service += " (by address)"
        backends = "\n".join(_backend_text(b) for b in r.backends)
        if r.local_endpoints is not None:
            backends = f"{r.local_endpoints} local endpoints"
        t.add_row(r.kind, r.frontend, service, backends or "-",
                  f"{r.affinity_timeout_s}s" if r.affinity_timeout_s else "-",
                  "\n".join(r.source_ranges) or "-", r.no_endpoints or "-",
                  "\n".join(r.objects))
    return t


def _difference_text(d: dict) -> str:
    def show(v):
        if v in (None, []):
            return "none"
        return ", ".join(v) if isinstance(v, list) else str(v)

    detail = {"missing frontend": "", "extra frontend": "",
              "backend missing": f" {d['want']}", "backend extra": f" {d['have']}"}.get(
        d["what"], f": want {show(d['want'])}, have {show(d['have'])}")
    return (f"{d['node']}: {d['kind']} {d['frontend']} ({d['service'] or '?'}): "
            f"{d['what']}{detail}")


class ModeMismatch(ValueError):
    """--mode names no mode, or not the run's: the command reports it as bad input."""


def run(args, cluster, tracker, dp, out, emit_json) -> int:
    """`dp`: the run's data plane (a mode with options, as "ipvs:lc", reads as its mode)."""
    from dataplanes.modes import MODES, mode_name

    base = dp.name
    mode = args.mode or base
    if mode_name(mode) not in MODES:
        raise ModeMismatch(f"--mode {mode!r} is not a proxy mode; accepted: "
                           f"{', '.join(MODES)}")
    if mode_name(mode) != base:
        raise ModeMismatch(f"--mode {mode}: run {cluster.run_id} runs mode {base}, and a "
                           f"node's kernel holds only that mode's state; leave --mode out "
                           f"or give {base}")
    skipped = sl.skipped_protocols(base)
    held: dict[str, list[sl.Row]] = {}
    diffs: list[dict] = []
    for node in cluster.nodes:
        if args.node not in (None, node.name):
            continue
        view = tracker.node_view(node.name)
        held[node.name] = sl.kernel_rows(base, dp, node, view)
        if args.check:
            diffs += sl.differences(node.name, sl.intended_rows(view, skipped), held[node.name])
    if args.json:
        data = {"run": cluster.run_id, "mode": base,
                "nodes": {n: [r.to_json() for r in rows] for n, rows in held.items()}}
        if args.check:
            data["differences"] = diffs
        emit_json(data)
    else:
        for name, rows in held.items():
            out.print(_table(f"{name}: {base}", rows))
        if args.check:
            for d in diffs:
                out.print(_difference_text(d), markup=False, highlight=False,
                              soft_wrap=True)
            checked = ", ".join(held)
            out.print(f"{len(diffs)} differences between the kernel and the intended view "
                          f"on {checked}" if diffs else
                          f"no difference between the kernel and the intended view on {checked}")
    return 1 if args.check and diffs else 0
