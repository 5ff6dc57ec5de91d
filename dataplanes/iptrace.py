"""Trace one new connection's first packet through an iptables-restore payload.

Enough of netfilter to follow what `dataplanes.iptables` renders: the nat and filter
tables on the PREROUTING path (a packet arriving from a pod or an external client) or the
OUTPUT path (a process on the node). Random matches branch with their probability; a
`recent --rcheck` match branches on whether the client is remembered, unless
`recent_state` says which lists hold it. The result is every possible outcome.

    trace(payload, "198.18.129.5", "198.19.0.1", "tcp", 80)
      -> DNAT 198.18.129.2:8080 p=0.3333, DNAT 198.18.129.3:8080 p=0.3333, ...
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from dataplanes.iptables import hook_rules

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
TERMINAL = {"ACCEPT", "DROP", "REJECT"}
MAX_DEPTH = 64
COUNTERS = re.compile(r"^\[\d+:\d+\]\s+")


class TraceError(ValueError):
    """The payload uses something this tracer does not model (named in the message)."""


# --------------------------------------------------------------------------- rules


@dataclass
class Rule:
    chain: str
    text: str
    # Each match is (name, negated, value); evaluated in order by _Walker.matches.
    matches: list[tuple[str, bool, object]] = field(default_factory=list)
    target: str = ""
    goto: bool = False
    target_args: dict[str, str] = field(default_factory=dict)


def _net(value: str):
    return ipaddress.ip_network(value, strict=False)


def _ports(value: str) -> tuple[int, int]:
    lo, _, hi = value.partition(":")
    return int(lo), int(hi or lo)


def _mark(value: str) -> tuple[int, int]:
    v, _, m = value.partition("/")
    return int(v, 0), int(m, 0) if m else 0xFFFFFFFF


def parse_rule(line: str) -> Rule:
    """One `-A CHAIN ...` line into a Rule; unknown options raise TraceError."""
    tokens = shlex.split(line)
    if len(tokens) < 2 or tokens[0] != "-A":
        raise TraceError(f"not an append rule: {line}")
    rule = Rule(chain=tokens[1], text=line)
    i, negate, module = 2, False, ""
    recent: dict[str, object] = {}

    def value() -> str:
        nonlocal i
        i += 1
        if i >= len(tokens):
            raise TraceError(f"option {tokens[i - 1]} needs a value: {line}")
        return tokens[i]

    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        if rule.target:
            if tok.startswith("--"):
                flag_only = tok in ("--random-fully", "--random", "--persistent")
                rule.target_args[tok] = "" if flag_only else value()
            else:
                raise TraceError(f"unexpected {tok!r} after the target: {line}")
        elif tok in ("-s", "--source"):
            rule.matches.append(("src", negate, _net(value())))
        elif tok in ("-d", "--destination"):
            rule.matches.append(("dst", negate, _net(value())))
        elif tok in ("-p", "--protocol"):
            rule.matches.append(("proto", negate, value().lower()))
        elif tok == "-m":
            module = value()
            if module == "recent":
                recent = {"name": "DEFAULT", "mode": None}
                rule.matches.append(("recent", False, recent))
            elif module not in (
                "tcp",
                "udp",
                "sctp",
                "comment",
                "addrtype",
                "mark",
                "statistic",
                "conntrack",
            ):
                raise TraceError(f"match module {module!r} is not modelled: {line}")
        elif tok in ("-j", "-g"):
            rule.goto = tok == "-g"
            rule.target = value()
        elif tok == "--comment":
            value()
        elif tok in ("--dport", "--destination-port"):
            rule.matches.append(("dport", negate, _ports(value())))
        elif tok in ("--sport", "--source-port"):
            rule.matches.append(("sport", negate, _ports(value())))
        elif tok in ("--dst-type", "--src-type"):
            rule.matches.append((tok[2:5] + "type", negate, value().upper()))
        elif tok == "--mark":
            rule.matches.append(("mark", negate, _mark(value())))
        elif tok == "--ctstate":
            rule.matches.append(("ctstate", negate, set(value().upper().split(","))))
        elif tok == "--mode":
            if value() != "random":
                raise TraceError(f"only statistic --mode random is modelled: {line}")
        elif tok == "--probability":
            rule.matches.append(("random", negate, float(value())))
        elif module == "recent" and tok in ("--rcheck", "--set", "--update", "--remove"):
            recent["mode"] = tok[2:]
            recent["negate"] = negate
        elif module == "recent" and tok == "--name":
            recent["name"] = value()
        elif module == "recent" and tok in ("--seconds", "--mask", "--hitcount"):
            value()  # time and masks are not modelled: a remembered client is within them
        elif module == "recent" and tok in ("--reap", "--rsource", "--rttl"):
            pass
        else:
            raise TraceError(f"option {tok!r} is not modelled: {line}")
        negate = False
        i += 1
    return rule  # no target: a rule that only counts (kube-proxy's KUBE-FW chains end with one)


@dataclass
class Tables:
    """Chains per table, parsed from a restore payload (later sections amend earlier ones)."""

    chains: dict[str, dict[str, list[Rule]]] = field(default_factory=dict)

    @classmethod
    def parse(
        cls, payload: str, hooks: Mapping[tuple[str, str], list[str]] | None = None
    ) -> Tables:
        tables = cls()
        table = ""
        for raw in payload.splitlines():
            line = COUNTERS.sub("", raw.strip())  # iptables-save -c prefixes "[pkts:bytes] "
            if not line or line.startswith("#") or line == "COMMIT":
                continue
            if line.startswith("*"):
                table = line[1:]
                tables.chains.setdefault(table, {})
            elif line.startswith(":"):
                tables.chains[table][line[1:].split()[0]] = []  # a declaration flushes
            elif line.startswith("-X"):
                tables.chains[table].pop(line.split()[1], None)
            elif line.startswith("-A"):
                rule = parse_rule(line)
                tables.chains[table].setdefault(rule.chain, []).append(rule)
            elif line.startswith(("-I", "-D", "-F", "-N")):
                raise TraceError(f"only -A, -X and chain declarations are modelled: {line}")
        # The jumps install() puts in built-in chains, unless the payload shows them itself.
        for (tbl, chain), lines in (hooks if hooks is not None else hook_rules()).items():
            chains = tables.chains.setdefault(tbl, {})
            if not chains.get(chain):
                chains[chain] = [parse_rule(x) for x in lines]
        return tables

    def rules(self, table: str, chain: str) -> list[Rule]:
        chains = self.chains.get(table, {})
        if chain not in chains:
            if chain in BUILTIN:
                return []
            raise TraceError(f"chain {chain} does not exist in table {table}")
        return chains[chain]


# --------------------------------------------------------------------------- packets


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str
    dport: int
    sport: int = 40000
    mark: int = 0
    dnat: str | None = None  # "ip:port" once a DNAT rule rewrote the destination
    masquerade: bool = False
    probability: float = 1.0
    chains: tuple[str, ...] = ()
    remembered: tuple[tuple[str, bool], ...] = ()  # (recent list, holds the client?) assumed
    recorded: tuple[str, ...] = ()  # recent lists a `--set` added the client to


@dataclass(frozen=True)
class Outcome:
    verdict: str  # "DNAT" | "ACCEPT" | "REJECT" | "DROP"
    to: str | None  # "ip:port" after DNAT
    masquerade: bool
    probability: float  # for the random branches; given the recent assumptions
    chains: tuple[str, ...]
    remembered: tuple[tuple[str, bool], ...] = ()
    recorded: tuple[str, ...] = ()

    @property
    def fresh(self) -> bool:
        """True when no recent list was assumed to hold the client."""
        return not any(held for _, held in self.remembered)

    def __str__(self) -> str:
        what = f"DNAT {self.to}" if self.verdict == "DNAT" else self.verdict
        masq = " masquerade" if self.masquerade else ""
        held = [name for name, yes in self.remembered if yes]
        cond = f" if remembered in {held[0]}" if held else ""
        return f"{what}{masq} p={self.probability:.4f}{cond} via {' > '.join(self.chains)}"


@dataclass(frozen=True)
class TraceResult:
    outcomes: tuple[Outcome, ...]

    def verdicts(self) -> set[str]:
        return {o.verdict for o in self.outcomes}

    def fresh(self) -> tuple[Outcome, ...]:
        """Outcomes for a client no `recent` list remembers yet."""
        return tuple(o for o in self.outcomes if o.fresh)

    def endpoints(self) -> dict[str, float]:
        """DNAT destination -> probability, for a client no `recent` list remembers."""
        out: dict[str, float] = {}
        for o in self.fresh():
            if o.verdict == "DNAT" and o.to:
                out[o.to] = out.get(o.to, 0.0) + o.probability
        return out

    def remembered(self) -> dict[str, str]:
        """recent list -> DNAT destination, for a client remembered in that list."""
        out: dict[str, str] = {}
        for o in self.outcomes:
            held = [name for name, yes in o.remembered if yes]
            if held and o.to:
                out[held[0]] = o.to
        return out

    @property
    def masquerade(self) -> bool | None:
        """True or False when every outcome agrees, None when they differ."""
        seen = {o.masquerade for o in self.outcomes}
        return seen.pop() if len(seen) == 1 else None

    def __str__(self) -> str:
        return "\n".join(str(o) for o in self.outcomes)


# --------------------------------------------------------------------------- walking


class _Walker:
    def __init__(self, tables: Tables, local_addrs: Iterable[str], recent_state):
        self.tables = tables
        self.local = {ipaddress.ip_address(a) for a in local_addrs}
        self.recent = (
            None
            if recent_state is None
            else {k: {ipaddress.ip_address(a) for a in v} for k, v in recent_state.items()}
        )

    def is_local(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return addr in self.local or addr in LOOPBACK

    def matches(self, rule: Rule, pkt: Packet) -> list[tuple[bool, Packet]]:
        """Branches of (matched, packet): one unless a random or recent match splits them."""
        branches = [(True, pkt)]
        for kind, neg, val in rule.matches:
            nxt: list[tuple[bool, Packet]] = []
            for ok, p in branches:
                if not ok:
                    nxt.append((ok, p))
                    continue
                for hit, q in self._one(kind, val, p):
                    nxt.append((hit != neg, q))
            branches = nxt
        return branches

    def _one(self, kind: str, val, p: Packet) -> list[tuple[bool, Packet]]:
        if kind == "src":
            return [(ipaddress.ip_address(p.src) in val, p)]
        if kind == "dst":
            return [(ipaddress.ip_address(p.dst) in val, p)]
        if kind == "proto":
            return [(p.proto == val or val == "all", p)]
        if kind == "dport":
            return [(val[0] <= p.dport <= val[1], p)]
        if kind == "sport":
            return [(val[0] <= p.sport <= val[1], p)]
        if kind == "dsttype":
            return [(val == "LOCAL" and self.is_local(p.dst), p)]
        if kind == "srctype":
            return [(val == "LOCAL" and self.is_local(p.src), p)]
        if kind == "mark":
            value, mask = val
            return [((p.mark & mask) == value, p)]
        if kind == "ctstate":
            state = {"NEW"} | ({"DNAT"} if p.dnat else set())
            return [(bool(state & val), p)]
        if kind == "random":
            return [
                (True, replace(p, probability=p.probability * val)),
                (False, replace(p, probability=p.probability * (1 - val))),
            ]
        if kind == "recent":
            return self._recent(val, p)
        raise TraceError(f"match {kind} is not modelled")

    def _recent(self, val: dict, p: Packet) -> list[tuple[bool, Packet]]:
        name, mode = str(val["name"]), val.get("mode")
        hit_negated = bool(val.get("negate"))
        if mode == "set":
            return [(not hit_negated, replace(p, recorded=p.recorded + (name,)))]
        if mode not in ("rcheck", "update"):
            raise TraceError(f"recent --{mode} is not modelled")
        for held_name, held in p.remembered:
            if held_name == name:
                return [(held != hit_negated, p)]
        if self.recent is not None:
            held = ipaddress.ip_address(p.src) in self.recent.get(name, set())
            return [(held != hit_negated, p)]
        return [
            (not hit_negated, replace(p, remembered=p.remembered + ((name, True),))),
            (hit_negated, replace(p, remembered=p.remembered + ((name, False),))),
        ]

    def run(self, table: str, chain: str, pkt: Packet, depth: int = 0) -> list[tuple[str, Packet]]:
        """(verdict, packet) branches; verdict "RETURN" means the chain fell through."""
        if depth > MAX_DEPTH:
            raise TraceError(f"chain depth above {MAX_DEPTH} at {chain}: a loop?")
        step = f"{table}:{chain}" if chain in BUILTIN else chain
        pkt = replace(pkt, chains=pkt.chains + (step,))
        return self._from(table, chain, 0, pkt, depth)

    def _from(self, table: str, chain: str, start: int, pkt: Packet, depth: int):
        rules = self.tables.rules(table, chain)
        for i in range(start, len(rules)):
            rule = rules[i]
            branches = self.matches(rule, pkt)
            if len(branches) == 1 and not branches[0][0]:
                pkt = branches[0][1]
                continue
            out: list[tuple[str, Packet]] = []
            for hit, p in branches:
                if hit:
                    out += self._target(table, chain, i, rule, p, depth)
                else:
                    out += self._from(table, chain, i + 1, p, depth)
            return out
        return [("RETURN", pkt)]

    def _target(self, table, chain, i, rule: Rule, p: Packet, depth: int):
        t, args = rule.target, rule.target_args
        if not t:
            return self._from(table, chain, i + 1, p, depth)
        if t in TERMINAL:
            return [(t, p)]
        if t == "RETURN":
            return [("RETURN", p)]
        if t == "MARK":
            if "--or-mark" in args:
                mark = p.mark | int(args["--or-mark"], 0)
            elif "--xor-mark" in args:
                mark = p.mark ^ int(args["--xor-mark"], 0)
            elif "--set-xmark" in args:
                value, mask = _mark(args["--set-xmark"])
                mark = (p.mark & ~mask) ^ value
            elif "--set-mark" in args:
                value, mask = _mark(args["--set-mark"])
                mark = (p.mark & ~mask) | value
            else:
                raise TraceError(f"MARK form not modelled: {rule.text}")
            return self._from(table, chain, i + 1, replace(p, mark=mark & 0xFFFFFFFF), depth)
        if t == "DNAT":
            to = args.get("--to-destination", "")
            ip, _, port = to.partition(":")
            moved = replace(p, dst=ip, dport=int(port) if port else p.dport, dnat=to)
            return [("ACCEPT", moved)]
        if t == "MASQUERADE":
            return [("ACCEPT", replace(p, masquerade=True))]
        if t not in self.tables.chains.get(table, {}):
            raise TraceError(f"target {t} is neither modelled nor a chain of {table}: {rule.text}")
        out = []
        for verdict, q in self.run(table, t, p, depth + 1):
            if verdict == "RETURN" and not rule.goto:
                out += self._from(table, chain, i + 1, q, depth)
            else:
                out.append((verdict, q))
        return out


def trace(
    payload: str,
    src: str,
    dst: str,
    proto: str,
    dport: int,
    hook: str = "PREROUTING",
    local_addrs: Iterable[str] = (),
    recent_state: Mapping[str, Iterable[str]] | None = None,
    hooks: Mapping[tuple[str, str], list[str]] | None = None,
) -> TraceResult:
    """Every way the first packet of a new connection src -> dst:dport can end.

    hook: "PREROUTING" for a packet arriving at the node (from a pod or outside),
    "OUTPUT" for one sent by a process on the node. local_addrs: the node's own
    addresses (loopback always counts). recent_state: recent list -> client IPs it holds;
    None branches on both answers. hooks: built-in chain rules when the payload has none
    (default: what IptablesDataplane.install() creates).
    """
    if hook not in ("PREROUTING", "OUTPUT"):
        raise TraceError(f"hook {hook!r}: use 'PREROUTING' or 'OUTPUT'")
    walker = _Walker(Tables.parse(payload, hooks), local_addrs, recent_state)
    start = Packet(src=src, dst=dst, proto=proto.lower(), dport=dport)
    outcomes: list[Outcome] = []
    for verdict, p in walker.run("nat", hook, start):
        if verdict in ("DROP", "REJECT"):
            outcomes.append(_outcome(verdict, p))
            continue
        if hook == "PREROUTING":
            path = ["INPUT"] if walker.is_local(p.dst) else ["FORWARD", "POSTROUTING"]
        else:
            path = ["OUTPUT", "POSTROUTING"] + (["INPUT"] if walker.is_local(p.dst) else [])
        outcomes += _continue(walker, path, p)
    return TraceResult(tuple(outcomes))


def _continue(walker: _Walker, path: list[str], p: Packet) -> list[Outcome]:
    if not path:
        return [_outcome("DNAT" if p.dnat else "ACCEPT", p)]
    chain, rest = path[0], path[1:]
    table = "nat" if chain == "POSTROUTING" else "filter"
    out: list[Outcome] = []
    for verdict, q in walker.run(table, chain, p):
        if verdict in ("DROP", "REJECT"):
            out.append(_outcome(verdict, q))
        else:
            out += _continue(walker, rest, q)
    return out


def _outcome(verdict: str, p: Packet) -> Outcome:
    return Outcome(
        verdict=verdict,
        to=p.dnat,
        masquerade=p.masquerade,
        probability=p.probability,
        chains=p.chains,
        remembered=p.remembered,
        recorded=p.recorded,
    )
