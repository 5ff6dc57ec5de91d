"""Every proxy mode by name: the one place that knows which module implements which mode,
which options each takes, and how a mode and its options are written (a mode spec).

A mode spec is `NAME[:FIELD[,FIELD...]]`, each FIELD `KEY=VALUE` or, at most once, a bare
`VALUE` for the mode's main option (its balancing algorithm; for iptables, its backend):

    iptables   iptables:legacy   iptables:backend=nft
    ipvs:lc    ipvs:scheduler=sh,backend=legacy    ipvs:sh,backend=legacy
    userspace:random   userspace:balancing=rr
    nftables   ebpf    (no options: they balance at random)

`parse_mode` checks a spec and gives its canonical form (`ModeSpec.label`: options in the
order the mode declares them, the main option bare when it is the only one), which names
the mode in cluster metadata, conformance.json, bench.csv and the report. In a list of
specs (`bench --modes`), a comma-separated word holding `=` continues the spec before it:
`ipvs:scheduler=sh,backend=legacy,iptables` is two specs.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dataplanes.base import Dataplane
from dataplanes.ipvs_layout import DEFAULT_SCHEDULER, SCHEDULERS
from kube.yamlload import shortened

# mode -> (module, class, options it accepts; the first is its main option)
MODES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "iptables": ("dataplanes.iptables", "IptablesDataplane", ("backend",)),
    "nftables": ("dataplanes.nftables", "NftablesDataplane", ()),
    "ipvs": ("dataplanes.ipvs", "IpvsDataplane", ("scheduler", "backend")),
    "ebpf": ("dataplanes.ebpf", "EbpfDataplane", ()),
    "userspace": ("dataplanes.userspace", "UserspaceDataplane", ("balancing",)),
}
IPTABLES_BACKENDS = ("nft", "legacy")
USERSPACE_BALANCING = ("rr", "random")  # round robin (kube-proxy's userspace mode), random
# option -> accepted values, per mode
OPTION_VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    "iptables": {"backend": IPTABLES_BACKENDS},
    "nftables": {},
    "ipvs": {"scheduler": SCHEDULERS, "backend": IPTABLES_BACKENDS},
    "ebpf": {},
    "userspace": {"balancing": USERSPACE_BALANCING},
}
# What each mode balances with when no option says otherwise (Dataplane.balancing).
DEFAULT_BALANCING = {"iptables": "random", "nftables": "random", "ipvs": DEFAULT_SCHEDULER,
                     "ebpf": "random", "userspace": "rr"}
SPEC_FORM = "NAME[:VALUE][,KEY=VALUE...]"


class UnknownMode(ValueError):
    """A mode spec names no mode, or an option or value the mode does not take: one sentence
    naming the field and the accepted values."""


@dataclass(frozen=True)
class ModeSpec:
    name: str  # "ipvs"
    options: tuple[tuple[str, str], ...] = ()  # ("scheduler", "lc"), in MODES' order

    @property
    def label(self) -> str:
        """The canonical spec: "ipvs:lc", "ipvs:scheduler=sh,backend=legacy", "nftables"."""
        if not self.options:
            return self.name
        main = MODES[self.name][2][0]
        if len(self.options) == 1 and self.options[0][0] == main:
            return f"{self.name}:{self.options[0][1]}"
        return f"{self.name}:" + ",".join(f"{k}={v}" for k, v in self.options)

    def get(self, key: str) -> str | None:
        return dict(self.options).get(key)

    def __str__(self) -> str:
        return self.label


def parse_mode(text: str, flag: str = "--mode") -> ModeSpec:
    """`text` as a ModeSpec, or UnknownMode naming `flag`, the field and what it accepts."""
    raw = str(text).strip()
    shown = shortened(raw, 60)  # a flag's value in a message: never the whole of a long one
    name, colon, rest = raw.partition(":")
    name = name.strip()
    if name not in MODES:
        raise UnknownMode(f"{flag} {shown!r} is not a proxy mode; accepted: {', '.join(MODES)}, "
                          f"each as {SPEC_FORM}")
    accepted = MODES[name][2]
    values = OPTION_VALUES[name]
    if colon and not accepted:
        raise UnknownMode(f"{flag} {shown!r}: mode {name} takes no options (it balances at "
                          f"random); write {name}")
    given: dict[str, str] = {}
    fields = [f.strip() for f in rest.split(",")] if colon else []
    for field in fields:
        key, eq, value = field.partition("=")
        key, value = key.strip(), value.strip()
        if not eq:
            key, value = accepted[0], field
        if key not in accepted:
            raise UnknownMode(f"{flag} {shown!r}: mode {name} has no option {key!r}; accepted: "
                              f"{', '.join(accepted)}")
        if key in given:
            raise UnknownMode(f"{flag} {shown!r}: option {key} is given twice")
        if value not in values[key]:
            raise UnknownMode(f"{flag} {shown!r}: {name} {key} {value!r} is not one of "
                              f"{', '.join(values[key])}")
        given[key] = value
    return ModeSpec(name, tuple((k, given[k]) for k in accepted if k in given))


def parse_modes(text: str, flag: str = "--modes") -> list[ModeSpec]:
    """A comma-separated list of specs (a word with `=` continues the spec before it), each
    once (by canonical label)."""
    specs: list[str] = []
    for word in (w.strip() for w in str(text).split(",")):
        if not word:
            continue
        if "=" in word and ":" not in word and specs:
            specs[-1] += "," + word
        else:
            specs.append(word)
    if not specs:
        raise UnknownMode(f"{flag} names no mode; accepted: {', '.join(MODES)}, each as "
                          f"{SPEC_FORM}")
    parsed = {s.label: s for s in (parse_mode(word, flag) for word in specs)}
    return list(parsed.values())


def mode_name(spec: str | ModeSpec) -> str:
    """"ipvs:lc" -> "ipvs" (the mode's name, as Dataplane.name says it)."""
    return spec.name if isinstance(spec, ModeSpec) else str(spec).split(":", 1)[0].strip()


def gc_leftovers(netns_names: list[str] | None = None,
                 modes: Sequence[str] | None = None) -> list[str]:
    """Every mode's (or `modes`', names or specs) `gc` (see `Dataplane`), one line per thing
    removed. A mode whose module cannot be imported here (bcc missing) cannot have left
    anything."""
    removed: list[str] = []
    wanted = None if modes is None else {mode_name(m) for m in modes}
    for mode, (module_name, cls_name, _) in MODES.items():
        if wanted is not None and mode not in wanted:
            continue
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except ImportError:
            continue
        gc = getattr(cls, "gc", None)
        if gc is not None:
            removed += gc(netns_names)
    return removed


def make(mode: str | ModeSpec, **options: Any) -> Dataplane:
    """Build the data plane for `mode`, a name or a spec ("ipvs:lc"); keyword options (as
    `--backend` gives) are used where the spec does not set them, and ignored when None or
    not the mode's. UnknownMode for a bad spec."""
    spec = mode if isinstance(mode, ModeSpec) else parse_mode(mode)
    module_name, cls_name, accepted = MODES[spec.name]
    cls = getattr(importlib.import_module(module_name), cls_name)
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    kwargs.update(spec.options)
    return cls(**kwargs)
