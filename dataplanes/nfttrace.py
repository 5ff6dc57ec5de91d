"""Trace one new connection's first packet through an `nft -f` script of the nftables mode.

Enough of nf_tables to follow what `dataplanes.nftables` renders: base chains ordered by
hook and priority, jump/goto/return, verdict maps, set and map lookups over
concatenations (in interval maps an element's part may be a network), `numgen random`
(each value a branch with its probability), dynamic set `update`, mark arithmetic, `fib ... type local`, dnat, masquerade and reject. A packet
from a pod or an external client takes prerouting, then input (to a local address) or
forward, then postrouting; a process on the node takes output, then postrouting.

    trace(script, "198.18.129.5", "198.19.0.1", "tcp", 80, local_addrs=["198.18.0.1"])
      -> DNAT 198.18.129.2:8080 p=0.3333, DNAT 198.18.130.2:8080 p=0.3333, ...
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

HOOKS_FROM_OUTSIDE = ("prerouting", "routing", "postrouting")
HOOKS_FROM_NODE = ("output", "postrouting")
PRIORITY_NAMES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
                  "srcnat": 100}
MAX_DEPTH = 64
ATOM = re.compile(r"ip saddr|ip daddr|meta l4proto|th dport|numgen random mod (\d+)(?: offset (\d+))?")


class TraceError(ValueError):
    """The script uses something this tracer does not model (named in the message)."""


# --------------------------------------------------------------------------- the script


@dataclass
class Table:
    chains: dict[str, list[str]] = field(default_factory=dict)
    hooks: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # hook -> (prio, chain)
    maps: dict[str, dict[tuple[str, ...], str]] = field(default_factory=dict)
    sets: dict[str, set[tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, script: str) -> Table:
        t = cls()
        for line in script.splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "add table", "delete table")):
                continue
            m = re.match(r"add chain \S+ \S+ (\S+)(?: \{ (.*) \})?$", line)
            if m:
                t.chains.setdefault(m.group(1), [])
                if m.group(2):
                    h = re.search(r"type \w+ hook (\w+) priority (-?\w+)", m.group(2))
                    if not h:
                        raise TraceError(f"base chain without a hook: {line}")
                    prio = PRIORITY_NAMES.get(h.group(2))
                    prio = int(h.group(2)) if prio is None else prio
                    t.hooks.setdefault(h.group(1), []).append((prio, m.group(1)))
                    t.hooks[h.group(1)].sort()
                continue
            m = re.match(r"add (map|set) \S+ \S+ (\S+) \{", line)
            if m:
                (t.maps if m.group(1) == "map" else t.sets).setdefault(m.group(2), {} if m.group(1) == "map" else set())
                continue
            m = re.match(r"add element \S+ \S+ (\S+) \{ (.*) \}$", line)
            if m:
                name = m.group(1)
                for item in m.group(2).split(", "):
                    key, _, value = item.partition(" : ")
                    parts = tuple(key.split(" . "))
                    if name in t.maps:
                        t.maps[name][parts] = value
                    elif name in t.sets:
                        t.sets[name].add(parts)
                    else:
                        raise TraceError(f"element for an undeclared map or set: {line}")
                continue
            m = re.match(r"add rule \S+ \S+ (\S+) (.*)$", line)
            if m:
                if m.group(1) not in t.chains:
                    raise TraceError(f"rule for an undeclared chain: {line}")
                t.chains[m.group(1)].append(m.group(2))
                continue
            raise TraceError(f"not modelled: {line}")
        return t


# --------------------------------------------------------------------------- packets


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str  # "tcp" | "udp"
    dport: int
    mark: int = 0
    dnat: str | None = None  # "ip:port" once translated
    masquerade: bool = False
    recorded: tuple[tuple[str, ...], ...] = ()  # affinity keys this packet added or refreshed
    probability: float = 1.0

    @property
    def daddr(self) -> str:
        return self.dnat.rsplit(":", 1)[0] if self.dnat else self.dst

    @property
    def dport_now(self) -> int:
        return int(self.dnat.rsplit(":", 1)[1]) if self.dnat else self.dport


@dataclass(frozen=True)
class Outcome:
    verdict: str  # ACCEPT | DROP | REJECT
    to: str | None  # the endpoint, when translated
    masquerade: bool
    probability: float
    recorded: tuple[tuple[str, ...], ...] = ()

    def __str__(self) -> str:
        what = f"DNAT {self.to}" if self.to and self.verdict == "ACCEPT" else self.verdict
        masq = " masquerade" if self.masquerade else ""
        return f"{what}{masq} p={self.probability:.4f}"


@dataclass(frozen=True)
class TraceResult:
    outcomes: tuple[Outcome, ...]

    def verdicts(self) -> set[str]:
        return {("DNAT" if o.to and o.verdict == "ACCEPT" else o.verdict) for o in self.outcomes}

    def endpoints(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.outcomes:
            if o.to and o.verdict == "ACCEPT":
                out[o.to] = out.get(o.to, 0.0) + o.probability
        return out

    @property
    def masquerade(self) -> bool | None:
        """True when every outcome is masqueraded, False when none is, None when mixed."""
        flags = {o.masquerade for o in self.outcomes}
        return flags.pop() if len(flags) == 1 else None

    def remembered(self) -> dict[str, tuple[tuple[str, ...], ...]]:
        """endpoint -> the affinity keys recorded on the way there."""
        return {o.to: o.recorded for o in self.outcomes if o.to}

    def __str__(self) -> str:
        return ", ".join(map(str, self.outcomes))


# --------------------------------------------------------------------------- walking


class _Walker:
    def __init__(self, table: Table, local_addrs: Iterable[str], remembered: Iterable[tuple]):
        self.t = table
        self.local = {ipaddress.ip_address(a) for a in local_addrs}
        self.remembered = {tuple(map(str, k)) for k in remembered}

    def is_local(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return addr in self.local or addr.is_loopback

    # Each returns [(value parts, probability)] for a concatenation in packet p.
    def key(self, expr: str, p: Packet) -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = [((), 1.0)]
        for atom in expr.split(" . "):
            m = ATOM.fullmatch(atom.strip())
            if not m:
                raise TraceError(f"expression not modelled: {atom!r}")
            if m.group(1):
                n, base = int(m.group(1)), int(m.group(2) or 0)
                values = [(str(base + i), 1.0 / n) for i in range(n)]
            else:
                one = {"ip saddr": p.src, "ip daddr": p.daddr, "meta l4proto": p.proto,
                       "th dport": str(p.dport_now)}[atom.strip()]
                values = [(one, 1.0)]
            out = [(k + (v,), q * w) for k, q in out for v, w in values]
        return out

    def rule(self, text: str, p: Packet) -> list[tuple[str, Packet]]:
        """Evaluate one rule: [(control, packet)]; control "" means on to the next rule."""
        branches: list[tuple[str, Packet]] = [(text.strip(), p)]
        done: list[tuple[str, Packet]] = []
        while branches:
            rest, p = branches.pop()
            if not rest:
                done.append(("", p))
                continue
            for control, q, remaining in self.step(rest, p):
                if control is None:  # a match failed: the rule ends, the chain goes on
                    done.append(("", q))
                elif control:
                    done.append((control, q))
                else:
                    branches.append((remaining, q))
        return done

    def step(self, s: str, p: Packet) -> list[tuple[str | None, Packet, str]]:
        """Consume one match or statement at the start of s: [(control, packet, rest)].

        control None: a match failed; "": go on with rest; else a verdict.
        """

        def fail(q: Packet) -> list[tuple[str | None, Packet, str]]:
            return [(None, q, "")]

        m = re.match(r"ip (saddr|daddr) (!= )?(\d[\d./]*)\s*", s)
        if m:
            ip = p.src if m.group(1) == "saddr" else p.daddr
            inside = ipaddress.ip_address(ip) in ipaddress.ip_network(m.group(3), strict=False)
            ok = inside != bool(m.group(2))
            return [("", p, s[m.end():])] if ok else fail(p)
        m = re.match(r"meta l4proto (tcp|udp|sctp)\s*", s)
        if m:
            return [("", p, s[m.end():])] if p.proto == m.group(1) else fail(p)
        m = re.match(r"fib (saddr|daddr) type local\s*", s)
        if m:
            ok = self.is_local(p.src if m.group(1) == "saddr" else p.daddr)
            return [("", p, s[m.end():])] if ok else fail(p)
        m = re.match(r"ct state new\s*", s)
        if m:
            return [("", p, s[m.end():])]
        m = re.match(r"ct status dnat\s*", s)
        if m:
            return [("", p, s[m.end():])] if p.dnat else fail(p)
        m = re.match(r"meta mark & (0x[0-9a-f]+) == (0x[0-9a-f]+|\d+)\s*", s)
        if m:
            ok = p.mark & int(m.group(1), 16) == int(m.group(2), 0)
            return [("", p, s[m.end():])] if ok else fail(p)
        m = re.match(r"numgen random mod (\d+) == 0\s*", s)
        if m:
            n = int(m.group(1))
            yes = replace(p, probability=p.probability / n)
            no = replace(p, probability=p.probability * (n - 1) / n)
            return [("", yes, s[m.end():])] + (fail(no) if n > 1 else [])
        m = re.match(r"meta mark set meta mark (or|xor) (0x[0-9a-f]+)\s*", s)
        if m:
            v = int(m.group(2), 16)
            mark = p.mark | v if m.group(1) == "or" else p.mark ^ v
            return [("", replace(p, mark=mark), s[m.end():])]
        m = re.match(r"update @(\S+) \{ (.+?)(?: timeout \d+s)? \}\s*", s)
        if m:
            out = []
            for k, q in self.key(m.group(2), p):
                out.append(("", replace(p, recorded=p.recorded + (k,), probability=p.probability * q),
                            s[m.end():]))
            return out
        m = re.match(r"dnat to (.+?) map @(\S+)\s*$", s)
        if m:
            out = []
            emap = m.group(2)
            if emap.endswith(("-tcp", "-udp", "-sctp")) and not emap.endswith("-" + p.proto):
                # nft typed the map's data `tcp dport` (or udp, sctp): an implicit l4proto match.
                return fail(p)
            for k, q in self.key(m.group(1), p):
                target = self.t.maps.get(emap, {}).get(k)
                if target is None:  # the lookup fails, the rule ends
                    out += fail(replace(p, probability=p.probability * q))
                    continue
                ip, port = target.split(" . ")
                out.append(("DNAT", replace(p, dnat=f"{ip}:{port}", probability=p.probability * q), ""))
            return out
        m = re.match(r"(.+?) vmap @(\S+)\s*$", s)
        if m:
            out = []
            for k, q in self.key(m.group(1), p):
                verdict = _lookup(self.t.maps.get(m.group(2), {}), k)
                pk = replace(p, probability=p.probability * q)
                if verdict is None:
                    out += fail(pk)
                else:
                    out.append((verdict, pk, ""))
            return out
        m = re.match(r"(.+?) @(\S+)\s*", s)
        if m and ATOM.match(m.group(1)):
            out = []
            for k, q in self.key(m.group(1), p):
                pk = replace(p, probability=p.probability * q)
                found = k in self.t.sets.get(m.group(2), set()) or (
                    m.group(2) == "affinity" and k in self.remembered
                )
                out += [("", pk, s[m.end():])] if found else fail(pk)
            return out
        m = re.match(r"masquerade( fully-random)?\s*$", s)
        if m:
            return [("MASQUERADE", replace(p, masquerade=True), "")]
        m = re.match(r"(jump|goto) (\S+)\s*$", s)
        if m:
            return [(f"{m.group(1)} {m.group(2)}", p, "")]
        m = re.match(r"(return|reject|drop|accept)\s*$", s)
        if m:
            return [(m.group(1), p, "")]
        raise TraceError(f"not modelled: {s!r}")

    def chain(self, name: str, p: Packet, depth: int = 0) -> list[tuple[str, Packet]]:
        """Run a chain: [(verdict, packet)], verdict "" when it fell off the end or returned."""
        if depth > MAX_DEPTH:
            raise TraceError(f"chain depth over {MAX_DEPTH} at {name}")
        if name not in self.t.chains:
            raise TraceError(f"no chain {name}")
        return self._from(name, 0, p, depth)

    def _from(self, name: str, start: int, p: Packet, depth: int) -> list[tuple[str, Packet]]:
        rules = self.t.chains[name]
        out: list[tuple[str, Packet]] = []
        for i in range(start, len(rules)):
            results = self.rule(rules[i], p)
            goes_on = [q for c, q in results if c == ""]
            for control, q in results:
                if control == "":
                    continue
                if control == "return":
                    out.append(("", q))
                elif control.startswith("jump "):
                    for verdict, r in self.chain(control[5:], q, depth + 1):
                        if verdict:
                            out.append((verdict, r))
                        else:
                            out += self._from(name, i + 1, r, depth)
                elif control.startswith("goto "):
                    out += self.chain(control[5:], q, depth + 1)
                else:
                    out.append((control, q))
            if not goes_on:
                return out
            if len(goes_on) > 1:
                for q in goes_on[1:]:
                    out += self._from(name, i + 1, q, depth)
            p = goes_on[0]
        out.append(("", p))
        return out

    def hook(self, hook: str, p: Packet) -> list[tuple[str, Packet]]:
        """Every base chain of the hook in priority order; ("", p) means accepted."""
        states: list[tuple[str, Packet]] = [("", p)]
        for _, chain in self.t.hooks.get(hook, []):
            nxt: list[tuple[str, Packet]] = []
            for verdict, q in states:
                if verdict:
                    nxt.append((verdict, q))
                    continue
                for v, r in self.chain(chain, q):
                    # dnat, masquerade and accept end this chain, not the packet.
                    nxt.append(("" if v in ("", "accept", "DNAT", "MASQUERADE") else v, r))
            states = nxt
        return states


def _lookup(elements: dict[tuple[str, ...], str], key: tuple[str, ...]) -> str | None:
    """A map's value for key: an exact element, else one whose parts hold a network the
    key's address lies in (an interval map)."""
    found = elements.get(key)
    if found is not None:
        return found
    for parts, value in elements.items():
        if len(parts) != len(key) or not any("/" in part for part in parts):
            continue
        pairs = zip(parts, key, strict=True)
        if all(part == k or ("/" in part and _in_network(k, part)) for part, k in pairs):
            return value
    return None


def _in_network(ip: str, net: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(net, strict=False)
    except ValueError:
        return False


def trace(
    script: str,
    src: str,
    dst: str,
    proto: str,
    dport: int,
    *,
    local_addrs: Iterable[str] = (),
    from_node: bool = False,
    remembered: Iterable[tuple] = (),
) -> TraceResult:
    """Every outcome of a new connection's first packet, with its probability.

    from_node: the packet comes from a process on the node (output hook) rather than
    from a pod or an external client (prerouting). remembered: affinity keys the kernel
    holds, as tuples of strings (client, VIP, proto, port, slot).
    """
    walker = _Walker(Table.parse(script), local_addrs, remembered)
    start = Packet(src, dst, proto.lower(), dport)
    first = walker.hook("output" if from_node else "prerouting", start)
    outcomes: list[Outcome] = []
    for verdict, p in first:
        if verdict:
            outcomes.append(_outcome(verdict, p))
            continue
        if from_node:
            after = [("", p)]
        else:
            after = walker.hook("input" if walker.is_local(p.daddr) else "forward", p)
        for v2, q in after:
            if v2:
                outcomes.append(_outcome(v2, q))
                continue
            for v3, r in walker.hook("postrouting", q):
                outcomes.append(_outcome(v3 or "accept", r))
    return TraceResult(tuple(outcomes))


def _outcome(verdict: str, p: Packet) -> Outcome:
    if verdict.startswith(("jump ", "goto ")):
        raise TraceError(f"a verdict left a hook unresolved: {verdict}")
    v = {"accept": "ACCEPT", "drop": "DROP", "reject": "REJECT"}.get(verdict, verdict.upper())
    return Outcome(v, p.dnat, p.masquerade, round(p.probability, 10), p.recorded)
