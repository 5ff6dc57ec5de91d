"""The root network namespace, recorded before and after a run: nothing may change there.

A snapshot holds what the suite could plausibly break by accident: links (name, kind,
admin state, addresses, attached XDP), routes of every table, policy rules, qdiscs,
the forwarding/rp_filter/bridge-netfilter sysctls, `iptables-save` of both backends and
`nft list ruleset`. Counters, lifetimes and timestamps are stripped, so two snapshots
of an untouched namespace compare equal.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator

from clusters.nsenter import in_netns

SAVE_COMMANDS = {
    "iptables-legacy": ["iptables-legacy-save"],
    "ip6tables-legacy": ["ip6tables-legacy-save"],
    "iptables-nft": ["iptables-nft-save"],
    "ip6tables-nft": ["ip6tables-nft-save"],
    "nft": ["nft", "list", "ruleset"],
}
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/all/rp_filter",
    "net/ipv4/conf/default/rp_filter",
    "net/ipv4/conf/all/proxy_arp",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv6/conf/all/forwarding",
    "net/ipv6/conf/all/disable_ipv6",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/bridge/bridge-nf-call-arptables",
)
# Route attributes the kernel changes on its own (cached PMTU, expiry of RA routes).
VOLATILE_ROUTE_KEYS = {"expires", "cache", "age", "used", "users", "error"}

_COUNTERS = [
    (re.compile(r"\[\d+:\d+\]"), "[0:0]"),  # iptables-save chain policy counters
    (re.compile(r"counter packets \d+ bytes \d+"), "counter"),  # nft
    (re.compile(r"\bexpires \S+"), ""),  # nft set elements with timeouts
    (re.compile(r"used \d+ bytes"), "used"),  # nft quotas
]


class RootNamespaceChanged(AssertionError):
    """The root network namespace differs from the snapshot taken before."""

    def __init__(self, changes: list[str]):
        self.changes = changes
        shown = changes[:60]
        more = f"\n... and {len(changes) - len(shown)} more" if len(changes) > len(shown) else ""
        super().__init__("the root network namespace changed:\n" + "\n".join(shown) + more)


def _which(cmd: str) -> str | None:
    return shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _ip_json(*args: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout or "[]")


def _links() -> list[str]:
    lines = []
    for link in _ip_json("-d", "addr", "show"):
        kind = (link.get("linkinfo") or {}).get("info_kind", link.get("link_type", ""))
        state = "up" if "UP" in link.get("flags", []) else "down"
        addrs = sorted(
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if "local" in a and not a.get("temporary")
        )
        xdp = link.get("xdp")
        extra = f" xdp={json.dumps(xdp, sort_keys=True)}" if xdp else ""
        master = f" master={link['master']}" if link.get("master") else ""
        lines.append(f"{link['ifname']} {kind} {state}{master} {' '.join(addrs)}{extra}".rstrip())
    return sorted(lines)


def _routes() -> list[str]:
    lines = []
    for family in ("-4", "-6"):
        for route in _ip_json(family, "route", "show", "table", "all"):
            kept = {k: v for k, v in route.items() if k not in VOLATILE_ROUTE_KEYS}
            lines.append(json.dumps(kept, sort_keys=True))
    return sorted(lines)


def _rules() -> list[str]:
    return sorted(
        json.dumps(rule, sort_keys=True)
        for family in ("-4", "-6")
        for rule in _ip_json(family, "rule", "show")
    )


def _qdiscs() -> list[str]:
    if not _which("tc"):
        return []
    out = subprocess.run(["tc", "-j", "qdisc", "show"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return [f"tc failed: {out.stderr.strip()}"]
    qdiscs = ({k: v for k, v in q.items() if k != "refcnt"} for q in json.loads(out.stdout or "[]"))
    return sorted(json.dumps(q, sort_keys=True) for q in qdiscs)


def _sysctls() -> list[str]:
    lines = []
    for key in SYSCTLS:
        try:
            with open(f"/proc/sys/{key}") as fh:
                lines.append(f"{key.replace('/', '.')} = {fh.read().strip()}")
        except OSError:
            continue
    return lines


def _ruleset(argv: list[str]) -> list[str] | None:
    """A rule dump without comments and counters; None when the tool is absent."""
    if not _which(argv[0]):
        return None
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return [f"{argv[0]} failed ({out.returncode}): {out.stderr.strip()}"]
    lines = []
    for line in out.stdout.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        for pattern, repl in _COUNTERS:
            line = pattern.sub(repl, line)
        lines.append(line.rstrip())
    return lines


def _snapshot_here() -> dict[str, list[str]]:
    snap = {
        "links": _links(),
        "routes": _routes(),
        "rules": _rules(),
        "qdiscs": _qdiscs(),
        "sysctls": _sysctls(),
    }
    for name, argv in SAVE_COMMANDS.items():
        dump = _ruleset(argv)
        if dump is not None:
            snap[name] = dump
    return snap


def snapshot(netns: str | None = None) -> dict[str, list[str]]:
    """The comparable state of a network namespace: this process's own one when None.

    Everything runs on a thread inside the namespace (commands inherit it), so the
    answer is right even when the caller's thread sits in some other namespace.
    """
    target = netns if netns is not None else f"/proc/{os.getpid()}/ns/net"
    return in_netns(target, _snapshot_here)


def snapshot_root() -> dict[str, list[str]]:
    """The root network namespace (the one this process runs in)."""
    return snapshot(None)


def diff(before: dict[str, list[str]], after: dict[str, list[str]]) -> list[str]:
    """One line per difference, "<section>: -old" / "<section>: +new"; empty when equal."""
    changes: list[str] = []
    for section in sorted(set(before) | set(after)):
        old, new = before.get(section), after.get(section)
        if old == new:
            continue
        if old is None or new is None:
            changes.append(f"{section}: {'appeared' if old is None else 'disappeared'}")
            old, new = old or [], new or []
        for line in difflib.unified_diff(old, new, lineterm="", n=0):
            if line.startswith(("---", "+++", "@@")):
                continue
            changes.append(f"{section}: {line}")
    return changes


@contextlib.contextmanager
def guard_root(netns: str | None = None) -> Iterator[dict[str, list[str]]]:
    """Raise RootNamespaceChanged when the namespace (root by default) changed inside the block.

    A change is reported even when the block raised; the block's error is chained.
    """
    before = snapshot(netns)
    try:
        yield before
    except BaseException as exc:
        changes = diff(before, snapshot(netns))
        if changes:
            raise RootNamespaceChanged(changes) from exc
        raise
    changes = diff(before, snapshot(netns))
    if changes:
        raise RootNamespaceChanged(changes)
