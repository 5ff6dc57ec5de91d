"""The IPVS data plane: kube-proxy's ipvs mode, programmed over generic netlink.

Per node: a `kube-ipvs0` dummy interface (left down, as kube-proxy does) holds every
ClusterIP, externalIP and load-balancer IP, so the kernel takes them as local; one IPVS
virtual server per VIP:port:protocol (ClusterIP, each node IP for a NodePort, each
externalIP, each load-balancer IP) with one real server per endpoint, forwarded by
masquerading (NAT), the configured scheduler, and persistence for ClientIP affinity. What
IPVS cannot do is done by a few iptables rules over kube-proxy's ipsets. A virtual server
without real servers answers every new connection with ICMP port unreachable, which is the
REJECT a Service without endpoints needs.

The mode in modules, each one concern:
- `dataplanes/ipvs_layout.py`: views -> virtual servers, real servers, ipset members and
  VIPs (pure), and `LayoutMirror`, a node's layout kept by Service port;
- `dataplanes/ipvs_rules.py`: the iptables chains, as text (pure);
- `dataplanes/ipvs_codec.py`: the netlink messages (IPVS, ipset, addresses) as bytes (pure);
- `dataplanes/ipvs_kernel.py`: the sockets and tools, run inside the node's namespace;
- this module: the `Dataplane`, which keeps one mirror per node.

A full `sync` brings the node's mirror to the view (laying out again only the ports that
differ from it), reads back what the kernel holds and applies only the difference: virtual
and real servers and the VIPs over netlink (requests in batches on one socket); ipset
members and our chains with `ipset save` / `iptables-save`, skipped while a cheap
fingerprint shows nobody changed them since our last write; the rules are written only when
they differ. A sync repairs whatever others removed. `update` applies a change from the mirror alone, without reading anything back: the
changed ports' virtual and real servers, VIPs and ipset members (each in one netlink batch
in one thread in the node's namespace); the rules depend on the cluster CIDR alone, so an
update never writes them. A kernel refusal during an update marks the node dirty and asks
for a full sync (FullSyncNeeded), as does every later update until one has run. State
someone else removed is repaired by the next update that touches it (the kernel refuses the
write, so a full sync follows) or by the next full sync.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field, replace
from typing import Any

from dataplanes import healthcheck
from dataplanes.base import DataplaneError, FullSyncNeeded, Host, NodeHandle, SyncStats
from dataplanes.conntrack import fresh_frontends, untranslated_udp_flow_deletes
from dataplanes.ipvs_codec import IPSET_CMD_ADD, IPSET_CMD_DEL, changes_to_messages
from dataplanes.ipvs_kernel import (
    apply_delta,
    delete_half_open_tcp,
    ipset_apply,
    ipset_destroy,
    ipset_fingerprint,
    iptables_fingerprint,
    read_ipvs,
    read_sysctls,
    remove_ipvs,
    run,
    sync_addresses,
    sync_ipvs,
    write_sysctls,
)
from dataplanes.ipvs_layout import (
    DEFAULT_SCHEDULER,
    IPSET_BY_NAME,
    IPSETS,
    KUBE_IPVS_IF,
    SCHEDULERS,
    LayoutMirror,
    NodeFacts,
    desired_layout,
    ipset_restore,
    parse_ipset_save,
)
from dataplanes.ipvs_layout import SKIPPED_PROTOCOLS as SKIPPED_PROTOCOLS  # the mode's own
from dataplanes.ipvs_rules import CHAINS, TABLES, SavedRules, iptables_payload, iptables_rules
from kube.state import NodeView, ServicePortView
from kube.tracker import NodeChanges, ViewKey, view_key

_PERSISTENCE = (
    "IPVS keeps a ClientIP persistence template alive while any connection it chose "
    "lives, and a closed TCP connection stays in IPVS's TIME_WAIT for 120 s, a timeout "
    "its netlink API cannot set; so a choice outlives a short timeoutSeconds by up to "
    "two minutes (kube-proxy's IPVS mode behaves the same)"
)


@dataclass
class _Node:
    """What the mode remembers of a node between syncs: the kernel's state as we left it."""

    mirror: LayoutMirror  # what our writes left in IPVS, the ipsets and on kube-ipvs0
    view: NodeView  # the last full sync's view without its services (addresses, CIDRs)
    health: dict[ViewKey, ServicePortView] = field(default_factory=dict)  # health-check ports
    # A write failed or a sync is under way: the kernel may not hold the mirror, so an
    # update asks for a full sync and a sync reads the sets instead of trusting them.
    dirty: bool = False


class IpvsDataplane:
    name = "ipvs"
    deviations = {
        "connections_survive_proxy_restart": (
            "uninstall flushes the virtual servers and removes kube-ipvs0, and IPVS's "
            "connection entries go with them, so an established connection's next packets "
            "find none (a reply leaves untranslated and the client resets the connection); "
            "kube-proxy's restart keeps both"
        ),
        "session_affinity_client_ip": _PERSISTENCE,
        "session_affinity_nodeport_timeout": _PERSISTENCE,
    }

    def __init__(self, scheduler: str = DEFAULT_SCHEDULER, backend: str | None = None):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"IPVS scheduler {scheduler!r} is not one Linux offers; "
                             f"accepted: {', '.join(SCHEDULERS)}")
        if backend not in (None, "nft", "legacy"):
            raise ValueError(f"iptables backend {backend!r}: use 'nft' or 'legacy'")
        self.scheduler = scheduler
        self._backend = backend
        self._synced: set[str] = set()  # network namespaces synced at least once
        self._nodes: dict[str, _Node] = {}  # netns -> its mirror, after a full sync
        # netns -> (cluster CIDR, our chains as iptables-save printed them after our last
        # write), and the tables' fingerprint then: while it holds, nobody added or removed a
        # rule, and a sync skips the `iptables-save` process (slow in a guest kernel).
        self._written: dict[str, tuple[str, dict[tuple[str, str], list[str]]]] = {}
        self._iptables_seen: dict[str, tuple] = {}

    @property
    def balancing(self) -> str:
        """The scheduler every virtual server gets (kube-proxy's `--ipvs-scheduler`). Every
        real server has weight 1 (Kubernetes endpoints carry no weight), so wrr balances as
        rr, wlc as lc, and sed as nq would with equal weights."""
        return self.scheduler

    # ------------------------------------------------------------------ iptables backend

    @property
    def backend(self) -> str:
        """iptables-nft unless this kernel has only the legacy tables (as the UML guest's)."""
        if self._backend is None:
            host = Host()
            no_nft = (host.has_proc("/proc/config.gz")
                      and host.kernel_config("CONFIG_NF_TABLES_IPV4") is None)
            legacy = no_nft and host.kernel_config("CONFIG_IP_NF_IPTABLES")
            self._backend = "legacy" if legacy else "nft"
        return self._backend

    def _iptables(self, tool: str) -> list[str]:
        wait = ["-w"] if self.backend == "legacy" and tool != "-save" else []
        return [f"iptables-{self.backend}{tool}", *wait]

    # ------------------------------------------------------------------ protocol

    def missing(self, host: Host) -> list[str]:
        out = []
        if not host.has_proc("/proc/net/ip_vs"):
            if host.kernel_config("CONFIG_IP_VS") == "m":
                out.append("the ip_vs module is not loaded (modprobe ip_vs), or run with "
                           "--kernel uml")
            else:
                out.append("the kernel has no IPVS (CONFIG_IP_VS); run with --kernel uml")
        elif host.has_proc("/proc/config.gz"):
            # The kernel loads ip_vs_<scheduler> when the first virtual server names it (the
            # guest's modprobe points at its module tree, and loads them all at boot).
            option = f"CONFIG_IP_VS_{self.scheduler.upper()}"
            if host.kernel_config(option) is None:
                out.append(f"kernel {host.kernel} lacks {option}: no IPVS {self.scheduler} "
                           "scheduler here")
        for cmd in ("ipset", self._iptables("-restore")[0], self._iptables("-save")[0]):
            if not host.which(cmd):
                package = "ipset" if cmd == "ipset" else "iptables"
                out.append(f"{cmd} not found (apt-get install {package})")
        if not host.which("conntrack"):
            out.append("conntrack not found (apt-get install conntrack): stale UDP flows are "
                       "not cleared")
        if host.has_proc("/proc/config.gz"):
            for option in ("CONFIG_IP_SET", "CONFIG_NETFILTER_XT_SET",
                           "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE",
                           "CONFIG_NETFILTER_XT_TARGET_MASQUERADE", "CONFIG_DUMMY"):
                if host.kernel_config(option) is None:
                    out.append(f"kernel {host.kernel} lacks {option} (IPVS mode needs it)")
        return out

    def render(self, view: NodeView) -> str:
        """What a sync programs, as text: virtual servers (ipvsadm -S style), ipsets, iptables."""
        layout = desired_layout(view, self.scheduler)
        lines = [f"# IPVS virtual servers of {view.node} ({len(layout.services)}), VIPs on "
                 f"{KUBE_IPVS_IF}: "
                 + " ".join(sorted(layout.addresses, key=ipaddress.ip_address))]
        for key in sorted(layout.services,
                          key=lambda k: (k[0], ipaddress.ip_address(k[1]), k[2])):
            vs = layout.services[key]
            flag = "-t" if vs.protocol == "TCP" else "-u"
            persist = f" -p {vs.persistence_s}" if vs.persistence_s else ""
            lines.append(f"-A {flag} {vs.ip}:{vs.port} -s {vs.scheduler}{persist}")
            for rs in sorted(layout.dests[key].values(),
                             key=lambda r: (ipaddress.ip_address(r.ip), r.port)):
                lines.append(f"-a {flag} {vs.ip}:{vs.port} -r {rs.ip}:{rs.port} -m "
                             f"-w {rs.weight}")
        lines.append("# ipset restore")
        restore, _ = ipset_restore(None, layout.ipsets)
        lines.append(restore.rstrip("\n"))
        lines.append("# iptables-restore --noflush")
        lines.append(iptables_payload(iptables_rules(view.cluster_cidr)).rstrip("\n"))
        return "\n".join(lines) + "\n"

    def install(self, node: NodeHandle) -> None:
        """Sysctls, kube-ipvs0, the ipsets, our iptables chains and the jumps into them."""
        self._nodes.pop(node.netns, None)
        healthcheck.install(node)
        node.call(write_sysctls)
        node.call(sync_addresses, set())
        self._sync_ipsets(node, None, None)
        saved = self._save(node)
        lines = []
        for table in TABLES:
            # Existing chains are left as they are: a restarted proxy keeps serving until its
            # sync.
            lines.append(f"*{table}")
            lines += [f":{c} - [0:0]" for c in CHAINS[table] if (table, c) not in saved.chains]
            lines += [f"-I {chain} 1 {spec}" for t, chain, spec in reversed(saved.missing_jumps())
                      if t == table]
            lines.append("COMMIT")
        self._restore(node, "\n".join(lines) + "\n")

    def sync(self, node: NodeHandle, view: NodeView) -> SyncStats:
        started = time.perf_counter()
        full = node.netns not in self._synced
        known = self._nodes.get(node.netns)
        synced_before = known is not None
        facts = NodeFacts.of(view)
        if known is None or known.mirror.node != facts:
            known = _Node(LayoutMirror(facts, self.scheduler), replace(view, services=()),
                          dirty=True)  # holds nothing yet: the kernel's sets are read
            self._nodes[node.netns] = known
        mirror = known.mirror
        # The sets as our last writes left them, trusted below while their counts match.
        trusted = None if known.dirty else (mirror.set_counts(), mirror.ipsets())
        # The mirror follows the view by the ports that differ (the tracker hands the same
        # objects again for the ones that did not), so a sync costs one look per port.
        updated: dict[ViewKey, ServicePortView] = {}
        before: dict[ViewKey, ServicePortView] = {}
        seen = set()
        for sp in view.services:
            key = view_key(sp)
            seen.add(key)
            held = mirror.ports.get(key)
            if held is None:
                updated[key] = sp
            elif held[0] is not sp and held[0] != sp:
                updated[key], before[key] = sp, held[0]
        removed = [key for key in mirror.ports if key not in seen]
        known.dirty = True  # until this sync succeeds: an update meanwhile asks for a full sync
        mirror.change(updated, removed)
        layout = mirror.layout()
        ipvs = node.call(sync_ipvs, layout)
        if ipvs["failures"]:
            failures = ipvs["failures"]
            more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
            raise DataplaneError(f"IPVS refused {len(failures)} changes on {node.name}: "
                                 f"{'; '.join(failures[:5])}{more}")
        set_changes = self._sync_ipsets(node, layout.ipsets, trusted)
        rules_written = self._sync_iptables(node, view.cluster_cidr)
        commands = self._udp_dest_deletes(ipvs["removed_dests"])
        if synced_before:
            for key, sp in updated.items():
                if sp.protocol == "UDP":
                    commands += untranslated_udp_flow_deletes(before.get(key), sp)
        flushed = self._run_deletes(node, commands)
        if synced_before:
            flushed += self._half_open_deletes(node, updated, before)
        healthcheck.sync(node, view)
        self._synced.add(node.netns)
        known.view = replace(view, services=())
        known.health = {view_key(sp): sp for sp in view.services
                        if sp.health_check_node_port is not None}
        known.dirty = False
        changed = (ipvs["messages"] + set_changes + ipvs["addresses_added"]
                   + ipvs["addresses_removed"])
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - started,
            full=full,
            services=len(view.services),
            rules=self._object_count(mirror),
            changed=changed + (1 if rules_written else 0),
            extra={
                "scheduler": self.scheduler,
                "backend": self.backend,
                "virtual_servers": len(layout.services),
                "real_servers": mirror.real_servers,
                "netlink_messages": ipvs["messages"],
                "ipvs_read_s": round(ipvs["read_s"], 4),
                "ipset_changes": set_changes,
                "addresses_added": ipvs["addresses_added"],
                "addresses_removed": ipvs["addresses_removed"],
                "iptables_written": rules_written,
                "conntrack_deletes": flushed,
            },
        )

    def update(self, node: NodeHandle, changes: NodeChanges) -> SyncStats:
        """Apply one node's changed Service ports from the mirror: their virtual and real
        servers, VIPs and ipset members, nothing else read or written (see the module's
        docstring)."""
        started = time.perf_counter()
        known = self._nodes.get(node.netns)
        if known is None:
            raise FullSyncNeeded(f"no full sync of {node.name} since install")
        if known.dirty:
            raise FullSyncNeeded(f"an earlier write on {node.name} failed")
        mirror = known.mirror
        before: dict[ViewKey, ServicePortView] = {}
        for key in (*changes.updated, *changes.removed):
            held = mirror.ports.get(key)
            if held is not None:
                before[key] = held[0]
        delta = mirror.change(changes.updated, changes.removed)
        requests = changes_to_messages(delta.ipvs)
        members = ([(IPSET_CMD_DEL, name, entry) for name, entry in delta.delete_members]
                   + [(IPSET_CMD_ADD, name, entry) for name, entry in delta.add_members])
        written_at = time.perf_counter()
        if delta:
            try:
                failures = node.call(apply_delta, requests, delta.add_addresses,
                                     delta.delete_addresses, members)
            except (DataplaneError, OSError) as exc:
                failures = [str(exc)]
            if failures:
                known.dirty = True
                raise FullSyncNeeded(f"{len(failures)} writes refused on {node.name}: "
                                     + "; ".join(failures[:5]))
        write_s = time.perf_counter() - written_at
        # kube-proxy's conntrack cleanup, for the UDP ports that changed.
        commands = self._udp_dest_deletes(
            [(vs.ip, vs.port, vs.protocol, rs.ip, rs.port) for vs, rs in delta.ipvs.delete_dests])
        for key, after in changes.updated.items():
            if after.protocol == "UDP":
                commands += untranslated_udp_flow_deletes(before.get(key), after)
        flushed = self._run_deletes(node, commands)
        flushed += self._half_open_deletes(node, changes.updated, before)
        self._update_health(node, known, changes, before)
        return SyncStats(
            mode=self.name,
            node=node.name,
            seconds=time.perf_counter() - started,
            full=False,
            services=len(mirror.ports),
            rules=self._object_count(mirror),
            changed=len(requests) + len(members) + len(delta.add_addresses)
            + len(delta.delete_addresses),
            extra={
                "scheduler": self.scheduler,
                "backend": self.backend,
                "update": True,
                "virtual_servers": len(mirror.claims),
                "real_servers": mirror.real_servers,
                "netlink_messages": len(requests),
                "write_s": round(write_s, 4),
                "ipset_changes": len(members),
                "addresses_added": len(delta.add_addresses),
                "addresses_removed": len(delta.delete_addresses),
                "iptables_written": False,
                "conntrack_deletes": flushed,
            },
        )

    def kernel_state(self, node: NodeHandle) -> dict[str, Any]:
        """What the node holds, read back: virtual servers (scheduler, persistence, real
        servers with weights), kube-ipvs0's addresses, our ipsets' members, our chains and
        the jumps into them, our sysctls; normalised (sorted, no counters)."""
        layout, addresses = node.call(read_ipvs)
        res = node.call(run, ["ipset", "save"])
        if res.returncode != 0:
            raise DataplaneError(f"ipset save failed on {node.name}: {res.stderr.strip()}")
        sets = parse_ipset_save(res.stdout)
        saved = self._save(node)
        servers = {}
        for key, vs in layout.services.items():
            servers[f"{vs.protocol} {vs.ip}:{vs.port}"] = {
                "scheduler": vs.scheduler,
                "persistence_s": vs.persistence_s,
                "real_servers": {f"{rs.ip}:{rs.port}": rs.weight
                                 for rs in layout.dests.get(key, {}).values()},
            }
        return {
            "virtual_servers": servers,
            "addresses": None if addresses is None else sorted(addresses),
            "ipsets": {name: sorted(members) for name, members in sets.items()},
            "iptables": {f"{table} {chain}": rules for (table, chain), rules in
                         saved.chains.items()},
            "jumps": sorted(" ".join(jump) for jump in saved.jumps),
            "sysctls": node.call(read_sysctls),
        }

    def uninstall(self, node: NodeHandle) -> None:
        healthcheck.uninstall(node)
        self._synced.discard(node.netns)
        self._nodes.pop(node.netns, None)
        self._written.pop(node.netns, None)
        self._iptables_seen.pop(node.netns, None)
        saved = self._save(node)
        lines = []
        for table in TABLES:
            ours = [c for c in CHAINS[table] if (table, c) in saved.chains]
            lines.append(f"*{table}")
            lines += [f":{c} - [0:0]" for c in ours]  # flushed, so nothing refers to the sets
            lines += [f"-D {chain} {spec}" for t, chain, spec in sorted(saved.jumps)
                      if t == table]
            lines += [f"-X {c}" for c in ours]
            lines.append("COMMIT")
        self._restore(node, "\n".join(lines) + "\n")
        node.call(remove_ipvs)
        failures = node.call(ipset_destroy, [s.name for s in IPSETS])
        if failures:
            raise DataplaneError(f"ipset refused to destroy our sets on {node.name}: "
                                 + "; ".join(failures))

    # ------------------------------------------------------------------ pieces

    @staticmethod
    def _object_count(mirror: LayoutMirror) -> int:
        """Virtual servers, real servers and ipset members held."""
        return len(mirror.claims) + mirror.real_servers + sum(mirror.set_counts())

    def _sync_ipsets(self, node: NodeHandle, want: dict[str, set[str]] | None,
                     known: tuple[tuple[int, ...], dict[str, set[str]]] | None) -> int:
        """Apply the members that differ; want None only creates the sets that are missing.

        `known`: (element counts, members) as our last writes left them; trusted while the
        kernel's counts match, else `ipset save` reads what the kernel holds."""
        have = None
        if known is not None:
            fingerprint = node.call(ipset_fingerprint)
            if fingerprint is not None and fingerprint == known[0]:
                have = known[1]
        if have is None:
            res = node.call(run, ["ipset", "save"])
            if res.returncode != 0:
                raise DataplaneError(f"ipset save failed on {node.name}: {res.stderr.strip()}")
            have = parse_ipset_save(res.stdout)
        wanted = want if want is not None else {n: have.get(n, set()) for n in IPSET_BY_NAME}
        payload, changes = ipset_restore(have, wanted)
        if payload and all(name in have for name in IPSET_BY_NAME):
            # Every set exists: members change over netlink, without an `ipset restore`.
            members = [(IPSET_CMD_ADD, name, e) for name in IPSET_BY_NAME
                       for e in sorted(wanted.get(name, set()) - have[name])]
            members += [(IPSET_CMD_DEL, name, e) for name in IPSET_BY_NAME
                        for e in sorted(have[name] - wanted.get(name, set()))]
            failures = node.call(ipset_apply, members)
            if failures:
                raise DataplaneError(f"ipset refused {len(failures)} changes on {node.name}: "
                                     + "; ".join(failures[:5]))
        elif payload:
            res = node.call(run, ["ipset", "restore"], payload)
            if res.returncode != 0:
                raise DataplaneError(f"ipset restore failed on {node.name}: "
                                     f"{res.stderr.strip()}")
        return changes

    def summary(self, node: NodeHandle) -> dict[str, Any]:
        """For `svcbench status`: the scheduler and backend, virtual and real servers (one
        netlink dump), kube-ipvs0's addresses, our ipsets' member counts (`ipset list -t`,
        headers only), our chains and rules, and the health server."""
        layout, addresses = node.call(read_ipvs)
        sets: dict[str, int] = {}
        res = node.call(run, ["ipset", "list", "-t"])
        name = None
        for line in res.stdout.splitlines() if res.returncode == 0 else ():
            if line.startswith("Name: "):
                name = line[6:].strip()
            elif line.startswith("Number of entries: ") and name and name.startswith("KUBE-"):
                sets[name] = int(line.split(":", 1)[1])
        saved = self._save(node)
        return {
            "options": {"scheduler": self.scheduler, "backend": self._backend},
            "virtual_servers": len(layout.services),
            "real_servers": sum(len(d) for d in layout.dests.values()),
            "addresses": None if addresses is None else len(addresses),
            "ipsets": len(sets), "ipset_members": sum(sets.values()), "members_by_set": sets,
            "chains": len(saved.chains), "rules": sum(len(r) for r in saved.chains.values()),
            "jumps": len(saved.jumps),
            "health_server": healthcheck.summary(node),
        }

    def _save(self, node: NodeHandle) -> SavedRules:
        res = node.call(run, self._iptables("-save"))
        if res.returncode != 0:
            raise DataplaneError(f"{self._iptables('-save')[0]} failed on {node.name}: "
                                 f"{res.stderr.strip()}")
        return SavedRules.parse(res.stdout)

    def _sync_iptables(self, node: NodeHandle, cluster_cidr: str) -> bool:
        """Rewrite our chains only when they differ from what we last wrote, or a jump is
        gone."""
        written = self._written.get(node.netns)
        legacy = self.backend == "legacy"
        if legacy and written is not None and written[0] == cluster_cidr:
            seen = self._iptables_seen.get(node.netns)
            if seen is not None and node.call(iptables_fingerprint) == seen:
                return False
        saved = self._save(node)
        rules = iptables_rules(cluster_cidr)
        expected = written[1] if written is not None and written[0] == cluster_cidr else rules
        wrote = not (saved.chains == expected and not saved.missing_jumps())
        if wrote:
            self._restore(node, iptables_payload(rules, saved.missing_jumps()))
            # Remember iptables-save's own spelling, so the next sync compares like with like.
            saved = self._save(node)
        self._written[node.netns] = (cluster_cidr, saved.chains)
        if legacy:
            fingerprint = node.call(iptables_fingerprint)
            if fingerprint is not None:
                self._iptables_seen[node.netns] = fingerprint
        return wrote

    def _restore(self, node: NodeHandle, payload: str) -> None:
        res = node.call(run, [*self._iptables("-restore"), "--noflush"], payload)
        if res.returncode != 0:
            raise DataplaneError(f"{self._iptables('-restore')[0]} failed on {node.name}: "
                                 f"{(res.stderr or res.stdout).strip()}")

    # kube-proxy's conntrack cleanup: UDP flows must not stick to endpoints that left (the
    # real servers a sync removed), nor stay untranslated once their frontend translates.

    @staticmethod
    def _udp_dest_deletes(removed: list[tuple]) -> list[list[str]]:
        return [["conntrack", "-D", "-p", "udp", "--orig-dst", vip, "--orig-port-dst",
                 str(port), "--reply-src", ep_ip, "--reply-port-src", str(ep_port)]
                for vip, port, proto, ep_ip, ep_port in removed if proto == "UDP"]

    @staticmethod
    def _half_open_deletes(node: NodeHandle, updated: dict, before: dict) -> int:
        """Not kube-proxy's (it clears UDP flows only): half-open TCP flows recorded
        untranslated at frontends that start translating (`delete_half_open_tcp`)."""
        fresh = set()
        for key, after in updated.items():
            if after.protocol == "TCP":
                fresh |= fresh_frontends(before.get(key), after)
        if not fresh:
            return 0
        return node.call(delete_half_open_tcp, sorted(fresh, key=lambda f: (f[0] or "", f[1])))

    @staticmethod
    def _run_deletes(node: NodeHandle, commands: list[list[str]]) -> int:
        for argv in commands:
            node.call(run, argv, None, 30)
        return len(commands)

    @staticmethod
    def _update_health(node: NodeHandle, known: _Node, changes: NodeChanges,
                       before: dict[ViewKey, ServicePortView]) -> None:
        """Hand the health server its table again when a changed port has (or had) a
        health-check NodePort; its table holds only those ports."""
        touched = False
        for key in (*changes.updated, *changes.removed):
            after = changes.updated.get(key)
            old = before.get(key)
            if (after is not None and after.health_check_node_port is not None) or (
                    old is not None and old.health_check_node_port is not None):
                touched = True
                if after is not None and after.health_check_node_port is not None:
                    known.health[key] = after
                else:
                    known.health.pop(key, None)
        if touched:
            healthcheck.sync(node, replace(known.view, services=tuple(known.health.values())))
