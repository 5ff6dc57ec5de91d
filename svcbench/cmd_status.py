"""`svcbench status`: the running cluster per node, as `cilium status` shows an agent.

Per node: the Service ports and endpoints of its view, its echo agent, its last sync
(full or partial, how long, when), and what the mode has on it, from the mode's own
`summary(node)` (dataplanes/base.py): options, programs / rules / sets / processes
present with their counts, and the health of the mode's processes (the userspace proxy,
the health-check server). Then the pods and Services.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.table import Table

from dataplanes.modes import MODES


def _agent(agent: dict | None) -> tuple[str, dict[str, Any] | None]:
    """The echo agent's state ("running" only when its process lives and its control
    socket answers), and what it serves: listening sockets, pods, connections."""
    from clusters.netns import process_alive
    from clusters.workloads.echo import AgentClient, AgentError

    if not agent:
        return "none", None
    if not process_alive(agent.get("pid"), agent.get("start")):
        return "gone", None
    try:
        stats = AgentClient(agent["control"], timeout=2.0).stats()
    except (OSError, ValueError, AgentError):
        return "not answering", None
    pods = stats.get("pods", {})
    return "running", {"pid": agent.get("pid"), "listening": stats.get("listening", 0),
                       "pods": len(pods),
                       "connections": sum(c.get("connections", 0) for c in pods.values())}


def _summary(dp, node) -> dict[str, Any]:
    summary = getattr(dp, "summary", None)
    if summary is None:
        return {"error": f"mode {dp.name} has no summary"}
    try:
        return summary(node)
    except Exception as exc:  # noqa: BLE001 - one node's failure is that node's status
        return {"error": f"{type(exc).__name__}: {exc}"}


def _health(h: dict | None) -> str:
    if not h:
        return ""
    return (f"health server {'running' if h['running'] else 'DOWN'}"
            + (f" ({h['ports']} ports)" if h["running"] else ""))


def describe(mode: str, s: dict[str, Any]) -> str:
    """One node's summary as one short text, per mode ("ipvs" or a spec, "ipvs:lc")."""
    mode = mode.split(":", 1)[0]
    if "error" in s:
        return f"error: {s['error']}"
    parts: list[str] = []
    if mode == "iptables":
        parts.append(f"{s['chains']} KUBE-* chains, {s['rules']} rules "
                     f"({s['service_chains']} Service chains, {s['jumps']} jumps)")
    elif mode == "nftables":
        if s["table"] is None:
            parts.append("table MISSING")
        else:
            parts.append(f"table {s['table']}: {s['chains']} chains, {s['rules']} rules, "
                         f"{s['sets']} sets and {s['maps']} maps with {s['elements']} elements")
    elif mode == "ipvs":
        parts.append(f"{s['virtual_servers']} virtual servers, {s['real_servers']} real "
                     f"servers, {s['ipsets']} ipsets ({s['ipset_members']} members), "
                     f"{s['rules']} rules in {s['chains']} chains")
    elif mode == "ebpf":
        if not s["loaded"]:
            parts.append("programs NOT LOADED")
        else:
            maps = s.get("maps", {})
            parts.append(f"XDP on {s['xdp_programs']} links, {s.get('socket_hooks', 0)} socket "
                         "hooks; " + ", ".join(f"{k} {v['entries']}/{v['max']}"
                                               for k, v in maps.items()))
    elif mode == "userspace":
        p = s["proxy"]
        parts.append(f"proxy pid {p['pid']} running, {p['services']} Service ports, "
                     f"{p['tables']} tables, {p['connections']} connections "
                     f"({p['failed']} failed)" if p["running"] else
                     f"proxy DOWN ({p.get('error', '')})")
        parts.append(f"{s['rules']} rules, {s['ipsets']} ipsets ({s['ipset_members']} members)")
    else:
        parts.append(json.dumps({k: v for k, v in s.items() if k != "health_server"}))
    health = _health(s.get("health_server"))
    if health:
        parts.append(health)
    return "; ".join(parts)


def collect(cluster, tracker, dp) -> dict[str, Any]:
    """Everything `status --json` prints."""
    state = tracker.state()
    syncs = cluster.meta.get("syncs", {})
    agents = {n["name"]: n.get("agent") for n in cluster.state.get("nodes", [])}
    mode = cluster.meta.get("mode")
    # The options the run's command gave beside its mode spec (--backend), as the mode takes them
    options = {k: cluster.meta.get(k) for k in MODES[dp.name][2] if k in cluster.meta}
    node_rows = []
    for n in cluster.nodes:
        view = tracker.node_view(n.name)
        agent_state, echo = _agent(agents.get(n.name))
        node_rows.append({
            "name": n.name, "ip": n.ip, "pod_cidr": n.pod_cidr, "netns": n.netns,
            "service_ports": len(view.services),
            "endpoints": sum(len(sp.endpoints) for sp in view.services),
            "local_endpoints": sum(1 for sp in view.services for e in sp.endpoints if e.local),
            "echo_agent": agent_state,
            "echo": echo,
            "last_sync": syncs.get(n.name),
            "dataplane": _summary(dp, n),
        })
    return {
        "run": cluster.run_id,
        "mode": mode,
        "backend": cluster.meta.get("backend"),
        "options": options,
        "nodes": node_rows,
        "pods": [{"namespace": p.namespace, "name": p.name, "node": p.node_name, "ip": p.ip,
                  "ready": p.ready} for p in state.pods],
        "services": [
            {"namespace": s.namespace, "name": s.name, "type": s.type,
             "cluster_ip": s.cluster_ip,
             "ports": [{"name": p.name, "protocol": p.protocol, "port": p.port,
                        "node_port": p.node_port} for p in s.ports]}
            for s in state.services
        ],
    }


def run(args, cluster, tracker, dp, out) -> int:
    data = collect(cluster, tracker, dp)
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    opts = ", ".join(f"{k} {v}" for k, v in data["options"].items() if v)
    out.print(f"run {data['run']}  mode {data['mode']}" + (f" ({opts})" if opts else ""))
    t = Table("node", "ip", "pod CIDR", "service ports", "endpoints (local)", "echo agent",
              "last sync")
    for n in data["nodes"]:
        last = n["last_sync"]
        when = (f"{'full' if last['full'] else 'partial'}, {last['seconds'] * 1000:.1f} ms, "
                f"{time.strftime('%H:%M:%S', time.localtime(last['time']))}") if last else "-"
        t.add_row(n["name"], n["ip"], n["pod_cidr"], str(n["service_ports"]),
                  f"{n['endpoints']} ({n['local_endpoints']})",
                  n["echo_agent"] + (f" ({n['echo']['listening']} sockets)" if n["echo"] else ""),
                  when)
    out.print(t)
    t = Table("node", f"{data['mode']} data plane")
    for n in data["nodes"]:
        t.add_row(n["name"], describe(data["mode"], n["dataplane"]))
    out.print(t)
    t = Table("pod", "node", "ip", "ready")
    for p in data["pods"]:
        t.add_row(f"{p['namespace']}/{p['name']}", p["node"], p["ip"], str(p["ready"]))
    out.print(t)
    t = Table("service", "type", "cluster IP", "ports")
    for s in data["services"]:
        ports = ", ".join(
            f"{p['port']}/{p['protocol']}" + (f":{p['node_port']}" if p["node_port"] else "")
            for p in s["ports"]
        )
        t.add_row(f"{s['namespace']}/{s['name']}", s["type"], s["cluster_ip"] or "", ports)
    out.print(t)
    return 0
