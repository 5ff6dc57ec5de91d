"""What run.json's metric catalog says about each metric, and a readable fallback.

bench/metrics.py declares every metric and `catalog()` writes them into run.json under
`metrics`: a name, a unit, what it measures (`doc`) and how the report shows it (`title`,
`short`, which way is `better`, the `headline` series, the `floor` a cost stands on, a
`finding` phrase, a `scorecard` column, what limits its `resolution`, and `verdict`: each
mode's sentence and the scorecard state its growth verdict). The report spells
no metric name: everything it knows about a metric comes from here.

A run.json from before a field existed still renders: a metric the catalog does not
describe is titled from its id ("queue_wait_s" -> "Queue wait", unit s), has no known better
direction, and the findings fall back on the bench's conventions, which name no metric: a
floor's name starts with `floor_`, and the headline is the cost of a new connection to the
Service named by a target word (the last one first: it walks the most rules).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

TARGETS = {"first": "the first Service", "last": "the last Service", "random": "random Services"}
FLOOR_PREFIX = "floor_"  # before the catalog named floors: the bench's naming convention
FALLBACK_HEADLINE = ("last", "random", "first")  # target words, best first
UNIT_SUFFIX = re.compile(r"_(us|ms|s|rps|bytes)$")
IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def series_key(metric: str, target: Any) -> str:
    """`metric:last`: a word target (first/last/random) names a series; an address or a
    number does not."""
    target = "" if target is None or (isinstance(target, float) and math.isnan(target)) \
        else str(target)
    if ":" not in metric and target and not IP_RE.match(target) and not target.isdigit():
        return f"{metric}:{target}"
    return metric


def split_key(key: str) -> tuple[str, str]:
    """(metric, target) of a series key."""
    base, _, target = str(key).partition(":")
    return base, target


def in_sentence(title: str) -> str:
    """A heading inside a sentence: "New connection" -> "new connection", "SYN" stays."""
    first = title.split(" ", 1)[0]
    return title if first[1:2].isupper() else title[:1].lower() + title[1:]


def title_from_id(name: str) -> str:
    """A heading for a metric the catalog does not describe: its id, readable."""
    words = UNIT_SUFFIX.sub("", name).replace("_", " ").strip() or name
    return words[:1].upper() + words[1:]


@dataclass(frozen=True)
class Track:
    """A regression gate on one series of a metric: `svcbench report --compare` calls it a
    regression when the newer run's median is worse than the older's by more than
    `threshold` (a fraction) and lies outside what the older run measured."""

    threshold: float
    stat: str = "value"
    target: str = ""  # the series' target word ("last"); "" for a metric without targets
    size: int | None = None  # at this many Services where both runs have it, else the largest

    @classmethod
    def of(cls, entry: Any) -> Track | None:
        """One catalog `track` entry; None for one this version cannot read."""
        if not isinstance(entry, Mapping):
            return None
        threshold, size = entry.get("threshold"), entry.get("size")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not math.isfinite(threshold) or threshold < 0:
            return None
        stat, target = entry.get("stat", "value"), entry.get("target") or ""
        if not isinstance(stat, str) or not stat or not isinstance(target, str):
            return None
        ok_size = isinstance(size, int) and not isinstance(size, bool) and size > 0
        return cls(float(threshold), stat, target, size if ok_size else None)


@dataclass(frozen=True)
class MetricInfo:
    """One catalog entry; what it lacks has a default that says nothing false."""

    name: str
    unit: str = ""
    doc: str = ""
    title: str = ""
    short: str = ""
    better: str | None = None  # "lower", "higher", or None: not known
    headline: tuple[str, ...] = ()
    floor: str | None = None
    finding: str = ""
    scorecard: bool = False
    resolution: str = ""
    verdict: bool = False  # each mode's sentence and the scorecard state its growth verdict
    track: tuple[Track, ...] = ()  # the regression gates on it (`report --compare`)
    described: bool = True  # False: not in the catalog at all

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> MetricInfo:
        def text(key: str) -> str:
            value = entry.get(key)
            return value if isinstance(value, str) else ""

        headline = entry.get("headline")
        better = entry.get("better")
        floor = entry.get("floor")
        return cls(
            name=str(entry["name"]), unit=text("unit"), doc=text("doc"), title=text("title"),
            short=text("short"), better=better if better in ("lower", "higher") else None,
            headline=tuple(str(t) for t in headline) if isinstance(headline, list) else (),
            floor=floor if isinstance(floor, str) and floor else None,
            finding=text("finding"), scorecard=entry.get("scorecard") is True,
            resolution=text("resolution"), verdict=entry.get("verdict") is True,
            track=tuple(t for t in map(Track.of, entry.get("track") or ()) if t)
            if isinstance(entry.get("track"), list) else ())

    @property
    def heading(self) -> str:
        return self.title or title_from_id(self.name)

    @property
    def phrase(self) -> str:
        """A short name for a sentence or a table header."""
        return self.short or in_sentence(self.heading)


class Catalog:
    """The metrics of one run (run.json's `metrics`), looked up by metric or series key."""

    def __init__(self, entries: Iterable[Any] | None = None):
        self.entries: dict[str, MetricInfo] = {}
        for entry in entries or ():
            if isinstance(entry, Mapping) and isinstance(entry.get("name"), str) and entry["name"]:
                self.entries.setdefault(entry["name"], MetricInfo.of(entry))

    @classmethod
    def of(cls, catalog: Catalog | Iterable[Any] | None) -> Catalog:
        return catalog if isinstance(catalog, Catalog) else cls(catalog)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Catalog:
        metrics = meta.get("metrics") if isinstance(meta, Mapping) else None
        return cls(metrics if isinstance(metrics, list) else None)

    def merged(self, other: Catalog) -> Catalog:
        """This catalog, with what only `other` describes (an older run's metrics)."""
        out = Catalog()
        out.entries = {**other.entries, **self.entries}  # before anything is cached
        return out

    def info(self, key: str) -> MetricInfo:
        base, _ = split_key(key)
        return self.entries.get(base) or MetricInfo(base, described=False)

    def __contains__(self, key: str) -> bool:
        return split_key(key)[0] in self.entries

    # ------------------------------------------------------------------ words

    def title(self, key: str) -> str:
        """A series' heading: the metric's title, with the Service it went to."""
        info = self.info(key)
        _, target = split_key(key)
        label = info.heading
        if target:
            if "a Service" in label and target in TARGETS:
                label = label.replace("a Service", TARGETS[target])
            elif target in TARGETS:
                label += f" to {TARGETS[target]}"
            elif target.lower() not in label.lower():
                label += f" ({target})"
        return label

    def subject(self, key: str) -> str:
        """What a series went to, for a sentence: "the last Service", else its title."""
        _, target = split_key(key)
        if target in TARGETS:
            return TARGETS[target]
        return in_sentence(self.title(key))

    def doc(self, key: str) -> str:
        return self.info(key).doc

    def unit(self, key: str) -> str:
        return self.info(key).unit

    def resolution_doc(self, key: str) -> str:
        return self.info(key).resolution

    def higher_is_better(self, key: str) -> bool | None:
        better = self.info(key).better
        return None if better is None else better == "higher"

    # ------------------------------------------------------------------ roles

    @cached_property
    def floors(self) -> frozenset[str]:
        """The metrics others stand on."""
        return frozenset(m.floor for m in self.entries.values() if m.floor)

    def is_floor(self, key: str) -> bool:
        """A metric some other one stands on; one the catalog does not name: by its name."""
        base, _ = split_key(key)
        if base in self.floors:
            return True
        return base.startswith(FLOOR_PREFIX) and not (base in self.entries and self.floors)

    def headline_series(self, present: Iterable[str]) -> list[str]:
        """The series the findings are about, best first, of those present: the catalog's
        headline metric in its order; without one, the series named by a target word."""
        present = list(dict.fromkeys(present))
        wanted = [series_key(m.name, t) for m in self.entries.values() for t in m.headline]
        if wanted:
            return [k for k in wanted if k in present]
        return [k for t in FALLBACK_HEADLINE for k in present
                if split_key(k)[1] == t and not self.is_floor(k)]

    def is_headline(self, key: str) -> bool:
        return bool(self.info(key).headline)

    def floored(self, key: str, headline: Iterable[str] = ()) -> bool:
        """Whether a series is a cost over a floor (new connections): the catalog names its
        floor; a catalog that names no floor at all: the headline series are."""
        if self.info(key).floor:
            return True
        return not self.floors and key in set(headline)

    def findings(self) -> list[MetricInfo]:
        return [m for m in self.entries.values() if m.finding]

    def scorecard(self) -> list[MetricInfo]:
        return [m for m in self.entries.values() if m.scorecard]

    def tracked(self) -> list[tuple[MetricInfo, Track]]:
        """Every regression gate the catalog declares, in its order."""
        return [(m, t) for m in self.entries.values() for t in m.track]

    def verdicts(self) -> list[MetricInfo]:
        """The metrics whose growth verdict every mode's sentence states."""
        return [m for m in self.entries.values() if m.verdict]

    def rank(self, key: str, headline: list[str] = ()) -> tuple:
        """Reading order: the headline series, then the catalog's order, then the rest."""
        if key in headline:
            return (0, list(headline).index(key), "")
        base, target = split_key(key)
        names = list(self.entries)
        if base in names:
            return (1, names.index(base), target)
        return (2, 0, key)
