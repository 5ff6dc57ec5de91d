"""Words and numbers as the report writes them: escaped, with units a reader knows, never
nan or inf (a value that cannot be shown is "–")."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from reports.catalog import Catalog

UNIT_WORDS = {"us": "µs", "s": "seconds", "ms": "ms", "rps": "requests/s", "bytes": "bytes"}


def unit_word(unit: str) -> str:
    return UNIT_WORDS.get(unit, unit)


def with_unit(title: str, unit: str) -> str:
    """A heading with its unit: "New connection to the last Service (µs)"; a heading that
    names its unit already ("Rules, chains ...", in rules) stays as it is."""
    word = unit_word(unit or "")
    if not word or re.search(rf"(?<!\w){re.escape(word)}(?!\w)", title, re.IGNORECASE):
        return title
    return f"{title} ({word})"


def esc(text: Any) -> str:
    """HTML-escape, and write URL schemes so that the file never holds a fetchable address."""
    out = html.escape(str(text), quote=True)
    return re.sub(r"(?i)(https?):/", r"\1&#58;/", out)


def significant(v: float, digits: int = 3) -> str:
    if not finite(v):
        return "–"  # a reader never sees nan or inf
    if v == 0:
        return "0"
    if abs(v) < 1e-3:  # a per-Service coefficient can be tiny: scientific, not 12 zeros
        return f"{v:.{digits - 1}e}"
    decimals = max(digits - 1 - int(math.floor(math.log10(abs(v)))), 0)
    return f"{v:,.{decimals}f}"


def fmt(v: float, unit: str, signed: bool = False, digits: int = 3) -> str:
    """A value with a unit a reader knows: 430 µs, 0.90 ms, 4.1 s, 12 MiB, 140,006 rules."""
    if not finite(v):
        return "–"
    v = float(v)

    def num(x: float) -> str:
        text = significant(x, digits)
        # A 2-digit axis label drops the zeros a 3-digit figure keeps: 90 ms, not 90.0 ms.
        return text.rstrip("0").rstrip(".") if digits < 3 and "." in text and "e" not in text else text

    sign = "+" if signed and v > 0 else ("−" if v < 0 else "")
    a = abs(v)
    unit = unit or ""
    if unit in ("us", "µs"):
        text = f"{num(a / 1000)} ms" if a >= 1000 else f"{num(a)} µs"
    elif unit == "ms":
        text = f"{num(a / 1000)} s" if a >= 1000 else f"{num(a)} ms"
    elif unit == "s":
        text = (f"{num(a)} s" if a >= 1 else f"{num(a * 1000)} ms" if a >= 1e-3
                else f"{num(a * 1e6)} µs")
    elif unit in ("bytes", "B"):
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if a >= scale:
                text = f"{num(a / scale)} {name}"
                break
        else:
            text = f"{a:,.0f} B"
    elif float(a).is_integer():  # a count: 7 rules, 140,006 rules
        text = f"{a:,.0f} {unit}".strip()
    else:
        text = f"{num(a)} {unit}".strip()
    return sign + text


def fmt_measured(v: float, unit: str, resolution: float = math.nan) -> str:
    """A value that cannot be finer than `resolution`: below it, "< resolution"."""
    if finite(resolution) and finite(v) and v < resolution:
        return f"< {fmt(resolution, unit)}"
    return fmt(v, unit)


def resolution_note(resolution: float, unit: str) -> str:
    return f" (resolution {fmt(resolution, unit)})" if finite(resolution) else ""


def fmt_tick(v: float, unit: str) -> str:
    """A short axis label: durations and sizes with their unit, counts as 140k."""
    if unit in ("us", "µs", "ms", "s", "bytes", "B"):
        return fmt(v, unit, digits=2)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def fmt_n(n: float) -> str:
    return f"{int(n):,}"


def fmt_tick_n(n: float) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else f"{n:g}"


def pct(ratio: float) -> str:
    if not finite(ratio):
        return "–"
    return f"{'−' if ratio < 0 else '+'}{abs(ratio) * 100:.0f} %"


def finite(v: Any) -> bool:
    try:
        return v is not None and not isinstance(v, bool) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def html_table(cls: str, head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of HTML cells under a header row."""
    return (f"<table class='{cls}'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
            + "</tbody></table>")


def ci(v: float, lo: float, hi: float, form: str) -> str:
    if not finite(v):
        return "–"
    if not (finite(lo) and finite(hi)):
        return form.format(v) + " <span class='muted'>(CI unknown)</span>"
    return f"{form.format(v)} <span class='muted'>({form.format(lo)} to {form.format(hi)})</span>"


def ci_fmt(v: float, lo: float, hi: float, unit: str, signed: bool = False) -> str:
    if not (finite(lo) and finite(hi)):
        return fmt(v, unit, signed) + " <span class='muted'>(CI unknown)</span>"
    return (f"{fmt(v, unit, signed)} <span class='muted'>({fmt(lo, unit, signed)} to "
            f"{fmt(hi, unit, signed)})</span>")


def value_html(value: Any) -> str:
    if isinstance(value, dict):
        if not value:
            return "<span class='muted'>none</span>"
        if "revision" in value:  # git: {"revision", "dirty"}
            dirty = " <span class='bad'>with uncommitted changes</span>" if value.get("dirty") else ""
            return f"<code>{esc(str(value.get('revision') or 'unknown')[:12])}</code>{dirty}"
        if all(not isinstance(v, dict) and not (isinstance(v, list) and any(
                isinstance(x, (dict, list)) for x in v)) for v in value.values()):
            return " · ".join(f"<span class='muted'>{esc(k)}</span> {value_html(v)}"
                              for k, v in value.items())
        return ("<table class='kv'>" + "".join(
            f"<tr><th>{esc(k)}</th><td>{value_html(v)}</td></tr>" for k, v in value.items())
            + "</table>")
    if isinstance(value, list):
        if not value:
            return "<span class='muted'>none</span>"
        if all(not isinstance(v, (dict, list)) for v in value):
            return "<code>" + esc(" ".join(str(v) for v in value)) + "</code>"
        return "<ul>" + "".join(f"<li>{value_html(v)}</li>" for v in value) + "</ul>"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "<span class='muted'>unknown</span>"
    return esc(value)


def metric_cell(catalog: Catalog, key: str, stat: str, unit: str) -> str:
    """A metric's name in a table: its title, the stat and unit beside it, the id on hover."""
    detail = ", ".join(x for x in (stat, unit_word(unit)) if x)
    return (f"<span title='{esc(key)}: {esc(catalog.doc(key))}'>{esc(catalog.title(key))}</span> "
            f"<span class='muted'>{esc(detail)}</span>")
