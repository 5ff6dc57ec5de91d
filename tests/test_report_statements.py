"""What the report states must be true and meaningful: one growth verdict per mode, no
exponent for a cost at or below its floor, figures below their resolution shown as such,
one-size metrics in a table, the floor of the same moments when the bench measured one,
the agreement between passes, why a run is partial, and never nan or inf, also as a
reader sees the page in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bench.metrics import catalog
from reports.agreement import agreement
from reports.render import write_report
from reports.results import write_csv, write_json
from tests.test_report import Chromium, synthetic_rows

GUEST = "6.1.0-um"
NAN_RE = re.compile(r"(?i)\b(nan|inf|infinity)\b")


def text(page: str, section: str) -> str:
    part = page.split(f"id='{section}'")[1].split("</section>")[0]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", part)).replace("&lt;", "<")


def headline(page: str, who: str) -> str:
    """One mode's headline sentence, as text (N<sup>k</sup> reads "Nk")."""
    items = page.split("<ul class='findings'>")[1].split("</ul>")[0].split("<li>")[1:]
    lines = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", li)).strip() for li in items]
    return next(line for line in lines if line.startswith(f"{who} "))


def guest_rows(passes=1, sizes=(1, 1000, 10000), cpu=True, resolution_recorded=True, seed=0):
    """The guest's run as the issue saw it: one pass, three sizes, CPU counted in ticks."""
    rng = np.random.default_rng(seed)
    rows = []
    for mode, slope in (("ipvs", 0.0), ("iptables", 0.08)):
        for rep in range(passes):
            for when in ("start", "end"):
                rows.append(dict(mode=mode, kernel=GUEST, n_services=0,
                                 metric="floor_conn_latency_us", stat="p50",
                                 value=round(900 + rng.normal(0, 5), 1), unit="us", repeat=rep,
                                 target="198.18.130.2", when=when))
            for n in sizes:
                rows.append(dict(mode=mode, kernel=GUEST, n_services=n, metric="conn_latency_us",
                                 stat="p50", value=round(950 + slope * n + rng.normal(0, 5), 1),
                                 unit="us", repeat=rep, target="last", when=""))
                if not cpu:
                    continue
                # 200 connections, 10 ms ticks: 50 µs steps; ipvs jumps one step at 10,000
                tasks = 100.0 if (mode == "ipvs" and n >= 10000) else 50.0
                extra = {"count": 200, "failed": 0, "thread_sys_s": 0.0, "agents_sys_s": 0.01,
                         "host_sys_s": 0.0}
                if resolution_recorded:
                    extra["resolution"] = 50.0
                for stat, value in (("tasks", tasks), ("host", 0.0)):
                    rows.append(dict(mode=mode, kernel=GUEST, n_services=n,
                                     metric="cpu_us_per_conn", stat=stat, value=value, unit="us",
                                     repeat=rep, target="198.19.0.1", when="", extra=extra))
    return rows


def below_floor_rows():
    """nftables rises with N yet stays under the floor measured at the start and the end."""
    rows = synthetic_rows()
    rng = np.random.default_rng(3)
    for r in rows:
        if (r["mode"] == "nftables" and r["metric"] == "conn_latency_us" and r["target"] == "last"
                and r["stat"] != "failed"):
            q = {"p50": 1.0, "p90": 1.3, "p99": 1.6}[r["stat"]]
            r["value"] = round((330 + 0.4 * r["n_services"] ** 0.5) * q + rng.normal(0, 2), 1)
    return rows


def same_moment_rows(with_floor: bool):
    """The machine is slower during the sweep (floor 600 µs) than at its start and end (430);
    nftables stays 10 µs over the floor beside it, iptables adds 0.047 µs per Service."""
    rng = np.random.default_rng(5)
    rows = []
    for mode, slope in (("iptables", 0.047), ("nftables", 0.0)):
        for rep in range(3):
            for when in ("start", "end"):
                rows.append(dict(mode=mode, kernel="6.18.0", n_services=0,
                                 metric="floor_conn_latency_us", stat="p50",
                                 value=round(430 + rng.normal(0, 2), 1), unit="us", repeat=rep,
                                 target="198.18.130.2", when=when))
            for n in (1, 10, 100, 1000, 10000):
                floor = 600 + rng.normal(0, 3)
                if with_floor:
                    rows.append(dict(mode=mode, kernel="6.18.0", n_services=n,
                                     metric="floor_same_moment_us", stat="p50",
                                     value=round(floor, 1), unit="us", repeat=rep,
                                     target="198.18.131.2", when=""))
                rows.append(dict(mode=mode, kernel="6.18.0", n_services=n,
                                 metric="conn_latency_us", stat="p50",
                                 value=round(floor + 10 + slope * n + rng.normal(0, 1), 1),
                                 unit="us", repeat=rep, target="last", when=""))
    return rows


def userspace_rate_rows():
    return [dict(mode="userspace", kernel="6.18.0", n_services=1, metric=metric, stat="mean",
                 value=value + 40 * rep, unit="conn/s", repeat=rep, target="", when="")
            for rep in range(3)
            for metric, value in (("floor_conn_rate", 5200.0), ("proxied_conn_rate", 1800.0))]


def render(path: Path, rows, meta=None) -> str:
    path.mkdir(parents=True, exist_ok=True)
    write_csv(path / "bench.csv", rows)
    write_json(path / "run.json", {"kernel": "6.18.0", "complete": True, "status": "complete",
                                   "started": "2025-01-01T00:00:00Z",
                                   "finished": "2025-01-01T00:10:00Z", "metrics": catalog(),
                                   **(meta or {})})
    return write_report(path).read_text()


def test_a_guest_run_with_one_pass_and_three_sizes_states_no_growth_and_no_nan(tmp_path):
    page = render(tmp_path / "run", guest_rows())
    ipvs = headline(page, "ipvs")
    assert "no growth verdict: a growth fit needs 3 sizes and 4 measurements" in ipvs, ipvs
    assert "growing" not in ipvs and "flat" not in ipvs
    assert not NAN_RE.search(re.sub(r"<[^>]+>", " ", page))
    assert "one pass: nothing to compare" in text(page, "agreement")


def test_a_cost_below_its_floor_is_flat_even_when_the_fit_rises(tmp_path):
    page = render(tmp_path / "run", below_floor_rows())
    nft = headline(page, "nftables")
    assert re.search(r"flat, [\d.]+ µs below the floor \(measured at the start and end\) \(−\d+ %",
                     nft), nft
    assert "growing" not in nft and "per 1,000" not in nft
    # the fits table says the same, and why, and quotes no exponent for it
    fits = page.split("id='fits'")[1].split("</section>")[0]
    row = next(r for r in fits.split("<tr>") if "the last Service" in r and "<b>nftables" in r)
    assert "flat" in row and "not clearly above the floor" in row and "N<sup>" not in row
    # iptables grows, with one exponent and its interval
    ipt = headline(page, "iptables")
    assert re.search(r"growing as N ?[\d.]+ \(95 % CI [\d.]+–[\d.]+\)", ipt), ipt
    assert "flat" not in ipt


def test_added_figures_are_differences_against_the_floor_of_the_same_moments(tmp_path):
    page = render(tmp_path / "with", same_moment_rows(with_floor=True))
    nft, ipt = headline(page, "nftables"), headline(page, "iptables")
    assert re.search(r"flat, within \d % of the floor \(the last", nft), nft
    m = re.search(r"\+([\d.]+) µs per new connection over the floor", ipt)
    assert m and 440 < float(m.group(1)) < 520, ipt  # 10 + 470, not + 170 more
    assert "growing as N" in ipt
    # the charts draw that floor along N; the ranking uses it
    charts = page.split("id='charts'")[1].split("</section>")[0]
    assert "<g class='floor'><title>floor: new connection on a path no mode touches" in charts
    assert "over the same-moment floor" in text(page, "agreement")
    assert "floor_same_moment_us" not in re.sub(r"<code>[^<]*</code>", "", charts.split(
        "Measured at one size")[0]) or "figcaption" not in charts  # not a chart of its own
    # without those rows: the start and end floors, and the words say so
    page = render(tmp_path / "without", same_moment_rows(with_floor=False))
    nft = headline(page, "nftables")
    assert re.search(r"flat, at \+1\d\d µs \(\+4\d %, 95 % CI .*\) over the floor \(measured at "
                     r"the start and end\)", nft), nft


def test_figures_counted_in_ticks_carry_their_resolution(tmp_path):
    for recorded in (True, False):  # bench rows now carry it; older rows get it from the tick
        rows = guest_rows(passes=2, sizes=(1, 10, 100, 1000, 10000), resolution_recorded=recorded)
        page = render(tmp_path / f"run-{recorded}", rows)
        assert "kernel CPU per connection 100 µs (resolution 50.0 µs)" in headline(page, "ipvs")
        assert "kernel CPU per connection 50.0 µs (resolution 50.0 µs)" in headline(page,
                                                                                   "iptables")
        charts = page.split("id='charts'")[1].split("</section>")[0]
        assert "below the resolution, 50.0 µs" in charts
        assert ": host &lt; 50.0 µs (resolution 50.0 µs)" in charts  # a 0 reads as "< 50 µs"
        # one step up at the largest size is not growth
        fits = page.split("id='fits'")[1].split("</section>")[0]
        row = next(r for r in fits.split("<tr>") if "CPU" in r and "<b>ipvs" in r
                   and "'muted'>tasks, µs<" in r)
        assert "flat" in row and "less than the resolution" in row and "N<sup>" not in row


def test_metrics_measured_at_one_size_are_a_table_not_a_chart(tmp_path):
    page = render(tmp_path / "run", synthetic_rows() + userspace_rate_rows())
    charts = page.split("id='charts'")[1].split("</section>")[0]
    captions = " ".join(re.findall(r"<figcaption.*?</figcaption>", charts))
    assert "proxied_conn_rate" not in captions and "floor_conn_rate" not in captions
    table = charts.split("<table class='single'>")[1].split("</table>")[0]
    # the catalog's titles and units, not the ids
    assert "Connection rate through the userspace proxy</span> <span class='muted'>mean, conn/s" \
        in table
    assert "1,840 conn/s" in table and "1,800 conn/s to 1,880" in table
    assert "Connection rate to a pod IP, no proxy (floor)" in table
    fits = page.split("id='fits'")[1].split("</section>")[0]
    assert "proxied" not in fits


@pytest.mark.parametrize("status,reason,banner", [
    ("incomplete", "the 15-minute budget ran out at nftables, 5,000 Services",
     "Partial run: it stopped before the end (the 15-minute budget ran out at nftables, 5,000 "
     "Services)"),
    ("killed", None, "Killed run: it was stopped from outside before the end (no reason recorded)"),
])
def test_a_partial_or_killed_run_says_so_and_why(tmp_path, status, reason, banner):
    meta = {"status": status, "complete": False, "finished": None}
    if reason:
        meta[f"{status}_reason"] = reason
    page = render(tmp_path / "run", synthetic_rows(), meta)
    top = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page.split("id='findings'")[0]))
    assert banner in top, top
    assert f"<span class='chip partial'>{status}</span>" in page


def test_agreement_is_read_from_run_json_when_it_covers_the_rows_else_computed(tmp_path):
    rows = synthetic_rows()
    stored = agreement(rows, resamples=20)
    stored["ranking"][0]["same"] = False  # a mark only run.json's copy carries
    stored["ranking"][0]["disagreeing"] = [{"repeat": 7, "order": ["iptables", "nftables"],
                                            "swapped": [["nftables", "iptables"]]}]
    page = render(tmp_path / "stored", rows, {"agreement": stored})
    agree = text(page, "agreement")
    assert "From run.json" in agree and "pass 8 put iptables before nftables" in agree
    assert "The passes ranked the modes differently at 1, " in text(page, "findings")
    # a guest run merged in later is not in run.json's figures: computed from bench.csv
    page = render(tmp_path / "merged", rows + guest_rows(), {"agreement": stored})
    agree = text(page, "agreement")
    assert "From bench.csv" in agree and "pass 8 put" not in agree
    assert re.search(r"iptables 6\.18\.0 grows \(k [\d.]+\), grows \(k [\d.]+\), grows", agree), agree


def test_the_headline_quotes_agreement_only_when_several_sets_of_passes_were_fitted(tmp_path):
    # two passes of three sizes: a pass alone cannot be fitted, so every resample is one fit
    page = render(tmp_path / "two", guest_rows(passes=2))
    assert "resamples" not in headline(page, "iptables")
    assert re.search(r"of \d+ resamples, 1 distinct set of passes", text(page, "agreement"))
    page = render(tmp_path / "five", guest_rows(passes=2, sizes=(1, 10, 100, 1000, 10000)))
    assert "(the same verdict in 100 % of 200 resamples of its 2 passes)" in headline(page,
                                                                                     "iptables")


# --------------------------------------------------------------------------- in Chromium


def missing_run(path: Path) -> Path:
    """Hardly anything: one mode, two sizes, columns missing, run.json with NaN and Infinity."""
    path.mkdir(parents=True)
    write_csv(path / "bench.csv", [
        dict(mode="ebpf", n_services=n, metric="conn_latency_us", value=v)
        for n, v in ((1, 420.0), (100, 425.0), (100, "not measured"))])
    (path / "run.json").write_text(
        '{"kernel": "6.18.0", "status": "killed", "complete": false, "wall_s": NaN, '
        '"spread": [{"mode": "ebpf", "spread": Infinity, "values": [NaN, 1]}], '
        '"noisy": [{"mode": "ebpf", "spread": Infinity, "values": [NaN, 1]}], '
        f'"metrics": {json.dumps(catalog())}}}')
    return path


def single_point_run(path: Path) -> Path:
    path.mkdir(parents=True)
    rows = [{**r, "n_services": 1} for r in guest_rows(sizes=(1,))] + userspace_rate_rows()
    write_csv(path / "bench.csv", rows)
    write_json(path / "run.json", {"kernel": "6.18.0", "status": "incomplete", "complete": False,
                                   "incomplete_reason": "stopped after the first size",
                                   "metrics": catalog()})
    return path


def noisy_run(path: Path) -> Path:
    """Noise of 30 %, a guest with one pass, a cost under its floor, ticks, one-size rates."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(9)
    rows = below_floor_rows()
    for r in rows:
        if r["stat"] != "failed" and r["n_services"] > 0:
            r["value"] = round(r["value"] * float(rng.uniform(0.7, 1.3)), 1)
    rows += guest_rows() + userspace_rate_rows()
    write_csv(path / "bench.csv", rows)
    write_json(path / "run.json", {"kernel": "6.18.0", "status": "complete", "complete": True,
                                   "noisy": [], "spread": [], "metrics": catalog()})
    return path


READ = """(function () {
  var titles = Array.from(document.querySelectorAll('[title]')).map(function (e) {
    return e.getAttribute('title'); });
  var tips = Array.from(document.querySelectorAll('svg title')).map(function (t) {
    return t.textContent; });
  var heads = Array.from(document.querySelectorAll('ul.findings li')).map(function (li) {
    return li.innerText; });
  var single = document.querySelector('table.single');
  return {text: document.body.innerText, hover: titles.concat(tips).join('\\n'), heads: heads,
          banner: (document.querySelector('.banner') || {innerText: ''}).innerText,
          charts: document.querySelectorAll('svg.chart').length,
          single: single ? single.innerText : ''};
})()"""


def read_in_chromium(pages: list[Path]) -> list[dict]:
    """What a reader sees of each page: the text, every hover text, the headlines."""
    seen = []
    with tempfile.TemporaryDirectory(prefix="svb-chromium-") as profile:
        browser = Chromium(profile)
        try:
            browser.open_tab(("Page", "Runtime"))
            for page in pages:
                browser.events.clear()
                browser.send("Page.navigate", {"url": page.as_uri()})
                browser.wait_for("Page.loadEventFired")
                got = browser.send("Runtime.evaluate", {"returnByValue": True,
                                                        "expression": READ})["result"]["value"]
                got["errors"] = [e for e in browser.events
                                 if e.get("method") == "Runtime.exceptionThrown"]
                seen.append(got)
        finally:
            browser.close()
    return seen


def test_reports_of_missing_single_point_and_noisy_runs_read_true_in_chromium(tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("needs Debian's chromium for the browser check: apt-get install chromium")
    runs = [missing_run(tmp_path / "missing"), single_point_run(tmp_path / "single"),
            noisy_run(tmp_path / "noisy")]
    missing, single, noisy = read_in_chromium([write_report(r) for r in runs])
    for seen in (missing, single, noisy):
        assert seen["errors"] == []
        assert not NAN_RE.search(seen["text"]), NAN_RE.search(seen["text"])
        assert not NAN_RE.search(seen["hover"]), NAN_RE.search(seen["hover"])
        for head in seen["heads"]:  # one verdict each
            assert not ("flat" in head and "growing" in head), head
    # missing: what there is, and what is not
    assert "Killed run" in missing["banner"] and "1 rows without a numeric value" in missing["banner"]
    assert any(h.startswith("ebpf at 100 Services: 425 µs per new connection") and
               "no growth verdict" in h for h in missing["heads"]), missing["heads"]
    # single point: no chart, every figure in the table, ticks as "< resolution"
    assert single["charts"] == 0 and "Partial run" in single["banner"]
    assert "stopped after the first size" in single["banner"]
    assert "< 50.0 µs (resolution 50.0 µs)" in single["single"]
    assert "Connection rate through the userspace proxy" in single["single"]
    assert "Connection rate to a pod IP, no proxy (floor)" in single["single"]
    # noisy: one verdict per mode; the cost under its floor is flat, with no exponent
    nft = next(h for h in noisy["heads"] if h.startswith("nftables (6.18.0)"))
    assert "growing" not in nft and "N<sup>" not in nft, nft
    ipvs = next(h for h in noisy["heads"] if h.startswith("ipvs (6.1.0-um)"))
    assert "no growth verdict" in ipvs and "kernel CPU per connection" in ipvs, ipvs
    assert "Connection rate through the userspace proxy" in noisy["single"]
    assert noisy["charts"] >= 4


def test_a_mode_skipped_here_but_measured_in_the_guest_says_where():
    from reports.render import measured_elsewhere

    meta = {"modes_skipped": {"ipvs": "the kernel has no IPVS"},
            "other_runs": {"/runs/guest/bench-1": {"kernel": "6.1.176", "modes": {
                "ipvs": {"status": "done"}, "iptables": {"status": "failed"}}}}}
    assert measured_elsewhere(meta) == {"ipvs": "6.1.176"}
    assert measured_elsewhere({"modes_skipped": {"ipvs": "no IPVS"}}) == {}
