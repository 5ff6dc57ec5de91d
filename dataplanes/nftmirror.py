"""The nftables mode's memory of one node: what its table holds, changed in place.

A `Mirror` holds each Service port's view and frontends, the frontend each key serves
(the claimant with the smallest ViewKey, when load-balancer IPs of two Services collide),
reference counts of what frontends share (hairpin pairs, ClusterIPs, class members) and
the classes present. `apply(updated, removed)` changes it in work that grows with the
changed views and returns a `Delta`: the transaction that takes the table from before to
after, net of what it both added and removed. `load` + `script` render a whole table,
through the same steps, so that both ways lead to the same table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dataplanes.nftlayout import (
    CLUSTER_IPS,
    ENDPOINTS,
    FAMILY,
    HAIRPIN,
    MAPS,
    SETS,
    SHORT_CIRCUIT_BASE,
    TABLE,
    Element,
    Frontend,
    FrontendKey,
    ServiceClass,
    declare_chain,
    elements_command,
    fixed_chains,
    render_frontends,
)
from kube.state import ServicePortView
from kube.tracker import ViewKey


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()  # an element's value when the table does not hold it


@dataclass
class Delta:
    """One transaction: the net change of every element touched and of the classes present
    (created with their set, chain and rule in their path's chain, or deleted); what the
    caller must clean up besides (affinity, conntrack, health)."""

    touched: dict[Element, list[Any]] = field(default_factory=dict)  # -> [before, after]
    hairpin: dict[str, list[bool]] = field(default_factory=dict)  # pair -> [before, after]
    cluster_ips: dict[str, list[bool]] = field(default_factory=dict)
    classes: dict[str, list[Any]] = field(default_factory=dict)  # name -> [before, after]
    services: list[ViewKey] = field(default_factory=list)  # Service ports rendered again
    stale: dict[tuple[str, str], set[int]] = field(default_factory=dict)  # (proto, key): slots
    udp: list[tuple[ServicePortView | None, ServicePortView | None]] = field(
        default_factory=list)  # UDP ports changed: (before, after)
    health: bool = False  # a health-check NodePort changed
    purged: list[str] = field(default_factory=list)  # idle classes a full sync took out
    cluster_cidr: str = ""

    @property
    def created(self) -> list[ServiceClass]:
        return [after for before, after in self.classes.values() if after and not before]

    @property
    def deleted(self) -> list[ServiceClass]:
        return [before for before, after in self.classes.values() if before and not after]

    def _split(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        gone: dict[str, list[str]] = {}
        fresh: dict[str, list[str]] = {}
        dead = {name for cls in self.deleted for name in (cls.chain, cls.endpoints)}  # go whole
        for (name, key), (before, after) in self.touched.items():
            if before == after:
                continue
            if before is not ABSENT and name not in dead:
                gone.setdefault(name, []).append(key)
            if after is not ABSENT:
                fresh.setdefault(name, []).append(key if after is None else f"{key} : {after}")
        for name, flips in ((HAIRPIN, self.hairpin), (CLUSTER_IPS, self.cluster_ips)):
            for key, (before, after) in flips.items():
                if before and not after:
                    gone.setdefault(name, []).append(key)
                elif after and not before:
                    fresh.setdefault(name, []).append(key)
        return gone, fresh

    def script(self) -> str:
        """The `nft -f` transaction: new classes' sets and chains, the path chains that
        gained or lost a class rewritten, element deletes before adds (a map element whose
        value changes is both), then the classes that lost their last member."""
        t = f"{FAMILY} {TABLE}"
        created = self.created
        out = [f"add set {t} {c.chain} {{ typeof {c.key} ; }}" for c in created]
        out += [f"add map {t} {c.endpoints} {{ {c.endpoints_body} ; }}" for c in created]
        out += [declare_chain(c.chain) for c in created]
        out += [f"add rule {t} {c.chain} {rule}" for c in created
                for rule in c.rules(self.cluster_cidr)]
        # A new class's rule is appended to its path's chain: the classes' sets hold
        # disjoint frontends, so their order does not matter.
        out += [f"add rule {t} {c.partition} {c.rule}" for c in created]
        gone, fresh = self._split()
        out += [elements_command("delete", name, keys) for name, keys in gone.items()]
        out += [elements_command("add", name, items) for name, items in fresh.items()]
        for c in self.deleted:
            out += [f"delete chain {t} {c.chain}", f"delete set {t} {c.chain}",
                    f"delete map {t} {c.endpoints}"]
        return "\n".join(out) + "\n" if out else ""

    def counts(self) -> tuple[int, int]:
        """(elements added, elements deleted)."""
        gone, fresh = self._split()
        return sum(map(len, fresh.values())), sum(map(len, gone.values()))

    def chains_written(self) -> list[str]:
        created = self.created
        return [c.chain for c in created] + sorted({c.partition for c in created})


class Mirror:
    """What one node's table holds (see the module's docstring)."""

    def __init__(self, cluster_cidr: str, service_cidr: str = "", node_ip: str | None = None):
        self.cluster_cidr = cluster_cidr
        self.service_cidr = service_cidr
        self.node_ip = node_ip
        self.views: dict[ViewKey, ServicePortView] = {}
        self.claims: dict[ViewKey, tuple[FrontendKey, ...]] = {}  # a port's frontends
        self.owners: dict[FrontendKey, dict[ViewKey, Frontend]] = {}  # claimants of a key
        self.active: dict[FrontendKey, Frontend] = {}  # the frontend the table holds
        self.classes: dict[str, ServiceClass] = {}  # present: those with a member
        self.members: dict[str, int] = {}  # class -> active frontends in it
        self.idle: set[str] = set()  # classes left without members since the last full sync
        self.purged: list[str] = []  # what the last purge_idle took out
        self.hairpin: dict[str, int] = {}
        self.cluster_ips: dict[str, int] = {}
        self.health: dict[ViewKey, ServicePortView] = {}  # ports with a health-check port
        self.element_count = 0  # elements of active frontends
        self.generation = 0  # nf_tables generation after our last transaction
        # The whole view the mirror holds, in its order, while no update changed it since.
        self.order: tuple[ServicePortView, ...] | None = None

    # ------------------------------------------------------------------ changing

    def load(self, services: Iterable[ServicePortView]) -> None:
        """Render views into the mirror (a full sync), recording no transaction: the steps
        of `_put` and `_settle` for a port the mirror does not hold yet, inlined (100,000
        Service ports)."""
        owners, active, hairpin, cluster_ips = (
            self.owners, self.active, self.hairpin, self.cluster_ips)
        node_ip = self.node_ip
        count = 0
        for sp in services:
            vk = (sp.namespace, sp.service, sp.port_name, sp.protocol, sp.port)
            if vk in self.views:
                self._put(vk, sp, None)
                continue
            fronts = render_frontends(sp, None, node_ip)
            for fk, front in fronts.items():
                claimants = owners.get(fk)
                if claimants is not None:  # a key another port claims too
                    claimants[vk] = front
                    self._settle(fk, None)
                    continue
                owners[fk] = {vk: front}
                active[fk] = front
                count += len(front.elements)
                for pair in front.hairpin:
                    hairpin[pair] = hairpin.get(pair, 0) + 1
                if front.cls is not None:
                    self._member(front.cls, 1, None)
            self.claims[vk] = tuple(fronts)
            self.views[vk] = sp
            cluster_ips[sp.cluster_ip] = cluster_ips.get(sp.cluster_ip, 0) + 1
            if sp.health_check_node_port is not None:
                self.health[vk] = sp
        self.element_count += count
        self.order = tuple(services) if isinstance(services, tuple) else None

    def apply(self, updated: Mapping[ViewKey, ServicePortView],
              removed: Iterable[ViewKey] = (),
              order: tuple[ServicePortView, ...] | None = None) -> Delta:
        """Take the changed views in; the transaction that makes the table follow.
        order: the whole view they come from, when there is one (see `changes`)."""
        d = Delta(cluster_cidr=self.cluster_cidr)
        for vk in removed:
            if vk in self.views:
                self._put(vk, None, d)
        for vk, sp in updated.items():
            if self.views.get(vk) is not sp:
                self._put(vk, sp, d)
        if d.services or order is not None:
            self.order = order
        # A class created and deleted again (or the reverse) within the change: nothing to do.
        d.classes = {name: pair for name, pair in d.classes.items()
                     if (pair[0] is None) != (pair[1] is None)}
        return d

    def purge_idle(self) -> str:
        """Drop the idle classes (see `_member`): the transaction that takes them out of the
        table, their paths' chains rewritten; "" when there is none. O(classes) rules, whose
        re-binding walks every member: for full syncs, which are O(N) anyway."""
        if not self.idle:
            return ""
        t = f"{FAMILY} {TABLE}"
        gone = [self.classes.pop(name) for name in sorted(self.idle)]
        self.idle.clear()
        self.purged = [cls.chain for cls in gone]
        out = []
        for partition in sorted({cls.partition for cls in gone}):
            out.append(f"flush chain {t} {partition}")
            out += [f"add rule {t} {partition} {rule}" for rule in self.partition_rules(partition)]
        for cls in gone:
            out += [f"delete chain {t} {cls.chain}", f"delete set {t} {cls.chain}",
                    f"delete map {t} {cls.endpoints}"]
        return "\n".join(out) + "\n"

    def changes(self, services: tuple[ServicePortView, ...]
                ) -> tuple[dict[ViewKey, ServicePortView], list[ViewKey]]:
        """(updated, removed) between the mirror and a whole view (O(N), for sync).

        When the mirror was last given a whole view and the new one has its ports in the
        same places, they are compared position by position, mostly by identity.
        """
        updated: dict[ViewKey, ServicePortView] = {}
        order = self.order
        if order is not None and len(order) == len(services):
            for a, b in zip(order, services, strict=True):
                if a is b:
                    continue
                vk = _view_key(b)
                if _view_key(a) != vk:
                    break
                if a != b:
                    updated[vk] = b
            else:
                return updated, []
            updated = {}
        seen = set()
        for sp in services:
            vk = _view_key(sp)
            seen.add(vk)
            old = self.views.get(vk)
            if old is not sp and old != sp:
                updated[vk] = sp
        return updated, [vk for vk in self.views if vk not in seen]

    def _put(self, vk: ViewKey, sp: ServicePortView | None, d: Delta | None) -> None:
        before = self.views.get(vk)
        old_keys = self.claims.get(vk, ())
        previous = {fk: self.owners[fk][vk] for fk in old_keys}
        fronts = render_frontends(sp, previous, self.node_ip) if sp is not None else {}
        for fk in old_keys:
            if fk not in fronts:
                claimants = self.owners[fk]
                del claimants[vk]
                if not claimants:
                    del self.owners[fk]
                self._settle(fk, d)
        for fk, front in fronts.items():
            self.owners.setdefault(fk, {})[vk] = front
            self._settle(fk, d)
        if fronts:
            self.claims[vk] = tuple(fronts)
            self.views[vk] = sp
        else:
            self.claims.pop(vk, None)
            self.views.pop(vk, None)
        old_ip = before.cluster_ip if before is not None else None
        new_ip = sp.cluster_ip if sp is not None else None
        if old_ip != new_ip:
            if old_ip is not None:
                _count(self.cluster_ips, old_ip, -1, d.cluster_ips if d else None)
            if new_ip is not None:
                _count(self.cluster_ips, new_ip, 1, d.cluster_ips if d else None)
        health = any(v is not None and v.health_check_node_port is not None for v in (before, sp))
        if health:
            if sp is not None and sp.health_check_node_port is not None:
                self.health[vk] = sp
            else:
                self.health.pop(vk, None)
        if d is not None:
            d.services.append(vk)
            d.health |= health
            if (sp or before).protocol == "UDP":
                d.udp.append((before, sp))

    def _settle(self, fk: FrontendKey, d: Delta | None) -> None:
        """Make the table hold the frontend `fk`'s first claimant serves (or nothing)."""
        claimants = self.owners.get(fk)
        new = claimants[min(claimants)] if claimants else None
        old = self.active.get(fk)
        if new is old:
            return
        if new is not None:
            self.active[fk] = new
            if new == old:
                return
        else:
            del self.active[fk]
        old_el = old.elements if old is not None else {}
        new_el = new.elements if new is not None else {}
        self.element_count += len(new_el) - len(old_el)
        if d is not None:
            touched = d.touched
            for e in old_el.keys() | new_el.keys():
                a, b = old_el.get(e, ABSENT), new_el.get(e, ABSENT)
                if a is b or a == b:
                    continue
                if e in touched:
                    touched[e][1] = b
                else:
                    touched[e] = [a, b]
        old_pairs = old.hairpin if old is not None else frozenset()
        new_pairs = new.hairpin if new is not None else frozenset()
        flips = d.hairpin if d is not None else None
        for pair in old_pairs - new_pairs:
            _count(self.hairpin, pair, -1, flips)
        for pair in new_pairs - old_pairs:
            _count(self.hairpin, pair, 1, flips)
        old_cls = old.cls if old is not None else None
        new_cls = new.cls if new is not None else None
        if old_cls is not new_cls:
            if new_cls is not None:
                self._member(new_cls, 1, d)
            if old_cls is not None:
                self._member(old_cls, -1, d)
        if d is not None and old is not None and old.affinity is not None:
            _stale_slots(old, new, d.stale)

    def _member(self, cls: ServiceClass, step: int, d: Delta | None) -> None:
        """Count a class's members; it is present while it has one."""
        name = cls.chain
        before = self.members.get(name, 0)
        after = before + step
        if after:
            self.members[name] = after
        else:
            del self.members[name]
        if (before == 0) == (after == 0):
            return
        if not after:
            # Emptied: kept, idle, until the next full sync (`purge_idle`). Taking its rule
            # out of its path's chain now would rewrite that chain, and re-adding rules bound
            # to the other classes' sets makes the kernel walk all their members: O(N).
            self.idle.add(name)
            return
        if name in self.idle:
            self.idle.discard(name)  # back in use: its set, chain and rule are still there
            return
        self.classes[name] = cls
        if d is not None:
            if name in d.classes:
                d.classes[name][1] = cls
            else:
                d.classes[name] = [None, cls]

    def partition_rules(self, partition: str) -> list[str]:
        """The rules of a path's chain: one per class present, in name order (O(classes))."""
        return [self.classes[name].rule for name in sorted(self.classes)
                if self.classes[name].partition == partition]

    # ------------------------------------------------------------------ reading

    def rule_count(self) -> int:
        rules = sum(len(r) for r in fixed_chains(self.service_cidr).values())
        return rules + sum(1 + len(c.rules(self.cluster_cidr)) for c in self.classes.values())

    def total_elements(self) -> int:
        return self.element_count + len(self.hairpin) + len(self.cluster_ips)

    def chain_count(self) -> int:
        return len(fixed_chains(self.service_cidr)) + len(self.classes)

    def table_elements(self) -> dict[str, dict[str, str | None]]:
        """Every map's and set's elements by name, key -> value (None in a set); O(N), for
        tests and tools."""
        out: dict[str, dict[str, str | None]] = {name: {} for name in (*MAPS, *SETS)}
        out.update((name, {}) for cls in self.classes.values()
                   for name in (cls.chain, cls.endpoints))
        for front in self.active.values():
            for (name, key), value in front.elements.items():
                out[name][key] = value
        out[HAIRPIN] = dict.fromkeys(self.hairpin)
        out[CLUSTER_IPS] = dict.fromkeys(self.cluster_ips)
        return out

    def script(self) -> str:
        """An `nft -f` transaction that replaces the whole table with what the mirror holds."""
        t = f"{FAMILY} {TABLE}"
        fixed = fixed_chains(self.service_cidr)
        out = [f"add table {t}", f"delete table {t}", f"add table {t}"]
        classes = sorted(self.classes)
        out += [declare_chain(name) for name in (*fixed, *classes)]
        out += [f"add map {t} {name} {{ {body} ; }}" for name, body in MAPS.items()]
        out += [f"add set {t} {name} {{ {body} ; }}" for name, body in SETS.items()]
        for name in classes:
            cls = self.classes[name]
            out += [f"add set {t} {name} {{ typeof {cls.key} ; }}",
                    f"add map {t} {cls.endpoints} {{ {cls.endpoints_body} ; }}"]
        # Rules before elements: a rule bound to a set holding elements makes the kernel
        # walk them (15% less of the kernel's time at 30,000 Services).
        rules = dict(fixed)
        for name in classes:
            cls = self.classes[name]
            rules[cls.partition].append(cls.rule)
            rules[name] = cls.rules(self.cluster_cidr)
        out += [f"add rule {t} {name} {rule}" for name, chain in rules.items() for rule in chain]
        containers: dict[str, list[str]] = {}
        for front in self.active.values():
            for (name, key), value in front.elements.items():
                items = containers.get(name)
                if items is None:
                    items = containers[name] = []
                items.append(key if value is None else f"{key} : {value}")
        containers[HAIRPIN] = list(self.hairpin)
        containers[CLUSTER_IPS] = list(self.cluster_ips)
        out += [elements_command("add", name, items) for name, items in containers.items()
                if items]
        return "\n".join(out) + "\n"


def _view_key(sp: ServicePortView) -> ViewKey:
    return (sp.namespace, sp.service, sp.port_name, sp.protocol, sp.port)


def _count(counts: dict[str, int], key: str, step: int, flips: dict[str, list[bool]] | None
           ) -> None:
    """Reference-count `key`; record in `flips` when it enters or leaves the table."""
    before = counts.get(key, 0)
    after = before + step
    if after:
        counts[key] = after
    else:
        del counts[key]
    if flips is not None and (before == 0) != (after == 0):
        if key in flips:
            flips[key][1] = after > 0
        else:
            flips[key] = [before > 0, after > 0]


def _stale_slots(old: Frontend, new: Frontend | None,
                 out: dict[tuple[str, str], set[int]]) -> None:
    """Slots of `old` whose remembered clients must choose afresh: its group lost affinity
    or went away, or the slot now holds another endpoint (or none)."""
    now = dict(new.slots) if new is not None and new.affinity == old.affinity else {}
    for group, addrs in old.slots:
        current = now.get(group, ())
        bad = {group.base + k for k, addr in enumerate(addrs)
               if k >= len(current) or current[k] != addr}
        if bad:
            out.setdefault((old.cls.protocol, group.key), set()).update(bad)


# --------------------------------------------------------------------------- reading back


def normalise(listing: dict[str, Any]) -> dict[str, Any]:
    """`nft -j list table ip kube-proxy` as `kernel_state` compares it: what forwards alike
    compares equal.

    Chains as their rules' expressions in order, sets and maps with their elements sorted.
    Left out: handles; elements of dynamic sets (clients that traffic made remembered);
    which slot of a slot group holds which endpoint (a full sync numbers them in view
    order, updates keep each endpoint's slot: both pick uniformly among them).
    """
    chains: dict[str, dict[str, Any]] = {}
    sets: dict[str, dict[str, Any]] = {}
    for item in listing.get("nftables", []):
        kind, body = next(iter(item.items()))
        if kind == "chain":
            chains[body["name"]] = {k: body[k] for k in ("type", "hook", "prio", "policy")
                                    if k in body} | {"rules": []}
        elif kind in ("set", "map"):
            # the affinity set: nft -j shows its flags as ["timeout"]
            dynamic = {"dynamic", "timeout"} & set(body.get("flags", ()))
            elements = [json.dumps(e, sort_keys=True) for e in body.get("elem", ())]
            if kind == "map" and body["name"].endswith(ENDPOINTS):
                elements = _slot_groups(elements)
            sets[body["name"]] = {
                "kind": kind,
                "type": body.get("type"),
                "map": body.get("map"),
                "flags": sorted(body.get("flags", ())),
                "elements": [] if dynamic else sorted(elements),
            }
        elif kind == "rule":
            chains[body["chain"]]["rules"].append(json.dumps(body["expr"], sort_keys=True))
    # A class left without members forwards nothing: updates keep it until the next full
    # sync (Mirror.purge_idle), a full sync has none. Left out, with its path rule.
    idle = {name for name, body in sets.items()
            if name in chains and not body["elements"] and name + ENDPOINTS in sets}
    for name in idle:
        del chains[name], sets[name], sets[name + ENDPOINTS]
    for chain in chains.values():
        rules = [r for r in chain["rules"] if not any(f'"@{c}"' in r for c in idle)]
        # A path's chain holds one rule per class, appended as classes come: in any order.
        if rules and all(('"goto"' in r or '"jump"' in r) and any(f'"@{c}"' in r for c in sets)
                         for r in rules):
            rules.sort()
        chain["rules"] = rules
    return {"chains": chains, "sets": sets}


def _slot_groups(elements: list[str]) -> list[Any]:
    """Endpoint map elements as slot groups: (lookup key, base) -> the slots used and the
    endpoints they hold, sorted."""
    groups: dict[str, dict[str, list]] = {}
    for text in elements:
        key, value = json.loads(text)
        parts = key["concat"]
        slot = int(parts[-1])
        base = SHORT_CIRCUIT_BASE if slot >= SHORT_CIRCUIT_BASE else 0
        g = groups.setdefault(json.dumps([parts[:-1], base]), {"slots": [], "endpoints": []})
        g["slots"].append(slot - base)
        g["endpoints"].append(json.dumps(value, sort_keys=True))
    return [[k, sorted(g["slots"]), sorted(g["endpoints"])] for k, g in groups.items()]
