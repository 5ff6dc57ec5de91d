"""Every proxy mode by name: the one place that knows which module implements which mode."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from dataplanes.base import Dataplane

# mode -> (module, class, options it accepts)
MODES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "iptables": ("dataplanes.iptables", "IptablesDataplane", ("backend",)),
    "nftables": ("dataplanes.nftables", "NftablesDataplane", ()),
    "ipvs": ("dataplanes.ipvs", "IpvsDataplane", ("scheduler", "backend")),
    "ebpf": ("dataplanes.ebpf", "EbpfDataplane", ()),
    "userspace": ("dataplanes.userspace", "UserspaceDataplane", ()),
}
IPTABLES_BACKENDS = ("nft", "legacy")


class UnknownMode(ValueError):
    pass


def gc_leftovers(netns_names: list[str] | None = None,
                 modes: Sequence[str] | None = None) -> list[str]:
    """Every mode's (or `modes`') `gc` (see `Dataplane`), one line per thing removed. A mode
    whose module cannot be imported here (bcc missing) cannot have left anything."""
    removed: list[str] = []
    for mode, (module_name, cls_name, _) in MODES.items():
        if modes is not None and mode not in modes:
            continue
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except ImportError:
            continue
        gc = getattr(cls, "gc", None)
        if gc is not None:
            removed += gc(netns_names)
    return removed


def make(mode: str, **options: Any) -> Dataplane:
    """Build the data plane for `mode`; options it does not take are ignored when None."""
    if mode not in MODES:
        raise UnknownMode(f"--mode {mode!r} is not a proxy mode; accepted: {', '.join(MODES)}")
    module_name, cls_name, accepted = MODES[mode]
    cls = getattr(importlib.import_module(module_name), cls_name)
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(**kwargs)
