"""The HTML report: tolerant reading, findings written from the data, and the acceptance
test: a real small run rendered and opened in headless Chromium (no console errors, every
chart drawn, a screenshot in the run folder, no http(s) reference in the file)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from bench.metrics import catalog
from reports.render import (
    ReportError,
    compare_runs,
    load_run,
    main,
    normalize_bench,
    render_html,
    write_report,
)
from reports.results import environment, write_csv, write_json

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio")
URL_RE = re.compile(r"https?://", re.I)
SIZES = (1, 10, 100)  # the real run: small, still three sizes for a growth fit


# --------------------------------------------------------------------------- synthetic runs


def synthetic_rows(modes=("iptables", "nftables"), sizes=(1, 10, 100, 1000, 10000), repeats=3,
                   seed=1, slope=0.047):
    """bench.csv rows shaped like the sweep's: iptables grows O(N), the others are flat."""
    rng = np.random.default_rng(seed)
    rows = []
    for mode in modes:
        grow = slope if mode == "iptables" else 0.0
        for rep in range(repeats):
            for when in ("start", "end"):
                for stat, q in (("p50", 1.0), ("p99", 1.6)):
                    rows.append(dict(mode=mode, kernel="6.18.0", n_services=0,
                                     metric="floor_conn_latency_us", stat=stat,
                                     value=round(430 * q + rng.normal(0, 4), 1), unit="us",
                                     repeat=rep, target="198.18.130.2", when=when))
            for n in sizes:
                for target in ("first", "last"):
                    cost = grow * n if target == "last" else 0.0
                    for stat, q in (("p50", 1.0), ("p90", 1.3), ("p99", 1.6)):
                        rows.append(dict(mode=mode, kernel="6.18.0", n_services=n,
                                         metric="conn_latency_us", stat=stat,
                                         value=round((440 + cost) * q + rng.normal(0, 5), 1),
                                         unit="us", repeat=rep, target=target, when=""))
                    rows.append(dict(mode=mode, kernel="6.18.0", n_services=n,
                                     metric="conn_latency_us", stat="failed", value=0,
                                     unit="connections", repeat=rep, target=target, when=""))
                rows.append(dict(mode=mode, kernel="6.18.0", n_services=n, metric="sync_full_s",
                                 stat="value", value=0.05 + 4e-4 * n * (1 if grow else 0.2),
                                 unit="s", repeat=rep, target="", when=""))
                rows.append(dict(mode=mode, kernel="6.18.0", n_services=n, metric="rules",
                                 stat="count", value=11 + 14 * n, unit="rules", repeat=rep,
                                 target="", when=""))
    return rows


def conformance_doc(mode, failed=()):
    checks = []
    for i, name in enumerate(("clusterip_tcp_uniform", "session_affinity_switch",
                              "udp_stale_conntrack_cleared", "external_ips_reachable")):
        outcome = "failed" if name in failed else ("skipped" if i == 3 else "passed")
        reason = {"failed": "only web-1 answered after the switch; see https://example.invalid/x",
                  "skipped": "no external client in this kernel"}.get(outcome, "")
        checks.append({"name": name, "outcome": outcome, "reason": reason, "duration_s": 0.4})
    return {"mode": mode, "kernel": "host", "checks": checks}


def write_synthetic_run(path: Path, complete=True, **kw) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_csv(path / "bench.csv", synthetic_rows(**kw))
    write_json(path / "run.json", {
        "kernel": "6.18.0", "cpu": "test CPU", "versions": {"iptables": "v1.8.9 (nf_tables)"},
        "git": "abc123", "args": {"services": "1,10,100,1000,10000", "repeats": 3},
        "complete": complete, "started": "2025-01-01T00:00:00Z",
        "finished": "2025-01-01T00:10:00Z" if complete else None,
        "modes_skipped": {"ipvs": "the host kernel has no ip_vs"}, "noisy": [],
        "metrics": catalog(),  # as the runner writes it: the report's titles and roles
    })
    return path


def test_findings_are_written_from_the_data(tmp_path):
    run = write_synthetic_run(tmp_path / "run")
    write_json(run / "conformance-iptables.json", conformance_doc("iptables", {"session_affinity_switch"}))
    write_json(run / "conformance-nftables.json", conformance_doc("nftables"))
    page = write_report(run).read_text()
    findings = page.split("id='findings'")[1].split("</section>")[0]
    text = re.sub(r"<[^>]+>", "", findings)
    # iptables: the last Service costs ~+470 µs at 10,000 and grows as N^~1.0
    m = re.search(r"iptables at 10,000 Services: \+([\d.]+) (µs|ms) per new connection over "
                  r"the floor.*?growing as N([\d.]+)", text)
    assert m, text
    added_us = float(m.group(1)) * (1000 if m.group(2) == "ms" else 1)
    assert 400 < added_us < 550 and 0.9 < float(m.group(3)) < 1.1
    assert re.search(r"nftables at 10,000 Services: flat, within \d+ % of the floor", text), text
    assert "conformance 2/4 passed (1 failed, 1 skipped)" in text
    assert "Fastest: nftables" in text
    # sections in the order
    order = [page.index(f"id='{s}'") for s in ("findings", "conformance", "charts", "fits", "environment")]
    assert order == sorted(order)
    assert not URL_RE.search(page)


def test_conformance_matrix_has_a_cell_per_check_and_mode_with_its_reason(tmp_path):
    run = write_synthetic_run(tmp_path / "run")
    # several files and a list in one file are both accepted
    write_json(run / "conformance.json", [conformance_doc("iptables", {"session_affinity_switch"}),
                                          conformance_doc("nftables")])
    page = write_report(run).read_text()
    matrix = page.split("<table class='matrix'>")[1].split("</table>")[0]
    assert matrix.count("<td class='o-") == 8
    assert "title='iptables: failed in 0.40 s: only web-1 answered after the switch" in matrix
    assert "<td class='bad'>2/4</td>" in matrix and "<td class='good'>3/4</td>" in matrix
    # a reason quoting an address does not put a fetchable URL into the file
    assert "example.invalid" in matrix and not URL_RE.search(page)


def test_partial_run_renders_what_is_there_and_says_what_is_missing(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    rows = [r for r in synthetic_rows() if not (r["mode"] == "nftables" and r["n_services"] > 100)]
    write_csv(run / "bench.csv", rows)
    write_json(run / "run.json", {"kernel": "6.18.0", "complete": False, "started": "now"})
    page = write_report(run).read_text()
    assert "<span class='chip partial'>incomplete</span>" in page
    assert "Incomplete run" in page
    assert "<b>nftables</b> stopped at 100 Services (the sweep reached 10,000)" in page
    assert "no conformance*.json" in page
    assert page.count("<svg class='chart'") == 4  # last and first Service, sync, rules
    # nothing but run.json: still a page, with every section saying what is missing
    only_meta = tmp_path / "meta-only"
    only_meta.mkdir()
    write_json(only_meta / "run.json", {"kernel": "6.18.0", "complete": False})
    page = write_report(only_meta).read_text()
    assert "no bench.csv" in page and "No measurements to chart." in page


def test_bench_rows_name_targets_either_way_and_extra_columns_are_kept_out_of_the_way(tmp_path):
    raw = [
        dict(mode="iptables", kernel="k", n_services=10, metric="conn_latency_us:last", stat="p50",
             value=500, unit="us", repeat=0, extra=json.dumps({"target": "198.19.0.11"})),
        dict(mode="iptables", kernel="k", n_services=10, metric="conn_latency_us", stat="p50",
             value=400, unit="us", repeat=0, extra=json.dumps({"target": "first", "node": "n1"})),
        dict(mode="iptables", kernel="k", n_services=10, metric="rules", stat="count",
             value="not a number", unit="rules", repeat=0, extra=""),
    ]
    write_csv(tmp_path / "bench.csv", raw)
    import pandas as pd

    df = normalize_bench(pd.read_csv(tmp_path / "bench.csv"))
    assert sorted(df["metric"]) == ["conn_latency_us:first", "conn_latency_us:last"]
    run = load_run(tmp_path)
    assert any("1 rows without a numeric value" in p for p in run.problems)


def test_compare_flags_regressions_beyond_noise_only(tmp_path):
    old = write_synthetic_run(tmp_path / "old", seed=1)
    same = write_synthetic_run(tmp_path / "same", seed=2)
    worse = write_synthetic_run(tmp_path / "worse", seed=3, slope=0.094)
    table = compare_runs(load_run(same), load_run(old))
    assert set(table["verdict"]) == {"within noise"}, table
    table = compare_runs(load_run(worse), load_run(old)).set_index(["metric", "mode"])
    assert table.loc[("conn_latency_us:last", "iptables"), "verdict"] == "regression"
    assert table.loc[("conn_latency_us:last", "nftables"), "verdict"] == "within noise"
    assert table.loc[("conn_latency_us:last", "iptables"), "n"] == 10000
    page = write_report(worse, compare=old).read_text()
    assert "<tr class='regress'>" in page and "id='compare'" in page


def test_kernels_are_never_mixed_and_lower_throughput_is_a_regression(tmp_path):
    rows = synthetic_rows(modes=("iptables",), repeats=2)
    rows += [{**r, "kernel": "6.1.0-um", "mode": "ipvs"} for r in synthetic_rows(modes=("nftables",), repeats=2)]
    for rps, run in ((9000, "old"), (6000, "new")):
        extra = [dict(mode="iptables", kernel="6.18.0", n_services=n, metric="throughput_rps",
                      stat="value", value=rps * (1 + 0.01 * rep), unit="rps", repeat=rep)
                 for n in (1, 10, 100, 1000, 10000) for rep in range(2)]
        (tmp_path / run).mkdir()
        write_csv(tmp_path / run / "bench.csv", rows + extra)
        write_json(tmp_path / run / "run.json", {"metrics": catalog()})
    page = write_report(tmp_path / "new", compare=tmp_path / "old").read_text()
    charts = page.split("id='charts'")[1].split("</section>")[0]
    # a chart per kernel: ipvs (guest kernel) never shares axes with iptables (host kernel)
    captions = re.findall(r"<figcaption[^>]*>(.*?)</figcaption>", charts)
    last = [c for c in captions if "conn_latency_us:last" in c]
    assert len(last) == 2 and any("kernel 6.1.0-um" in c for c in last)
    text = re.sub(r"<[^>]+>", "", page.split("id='findings'")[1].split("</section>")[0])
    assert "iptables (6.18.0)" in text and "ipvs (6.1.0-um)" in text
    assert re.search(r"iptables \(6.18.0\) at 10,000 Services: .*throughput 6,0\d0 rps", text), text
    table = compare_runs(load_run(tmp_path / "new"), load_run(tmp_path / "old")).set_index(["metric", "mode"])
    assert table.loc[("throughput_rps", "iptables"), "verdict"] == "regression"
    assert table.loc[("conn_latency_us:last", "ipvs"), "verdict"] == "within noise"


def test_command_prints_the_path_and_refuses_a_folder_without_results(tmp_path, capsys):
    run = write_synthetic_run(tmp_path / "run")
    out = tmp_path / "elsewhere" / "r.html"
    assert main([str(run), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().startswith("<!DOCTYPE html>")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "holds none of bench.csv" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "missing")
    # python -m reports works the same way
    done = subprocess.run([sys.executable, "-m", "reports", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(run / "report.html")


def test_render_html_is_one_self_contained_file(tmp_path):
    run = write_synthetic_run(tmp_path / "run")
    page = render_html(load_run(run))
    assert not URL_RE.search(page)
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page)
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert "default-src 'none'" in page  # the page forbids itself any fetch


# --------------------------------------------------------------------------- the acceptance test


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, profile: str):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        argv = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                "--remote-debugging-pipe", "about:blank"]
        # exec with the two pipes renumbered to 3 and 4, where Chromium expects them
        # (bash: dash only redirects from one-digit descriptors).
        self.log = open(os.path.join(profile, "chromium.log"), "w+b")
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', "bash", *argv],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
            stderr=self.log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def open_tab(self, domains: tuple[str, ...]) -> None:
        """A blank tab that later commands go to, with these DevTools domains enabled."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        for domain in domains:
            self.send(f"{domain}.enable")

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._next(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"Chromium closed the DevTools pipe; its log ends:\n{tail}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def close(self) -> None:
        try:
            self.session = None
            self.send("Browser.close", timeout=5)
        except Exception:  # it may be gone already; the wait below still reaps it
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self.log.close()


def open_in_chromium(page: Path, screenshot: Path) -> dict:
    """Load the page, collect console errors and requests, check every chart, screenshot it."""
    with tempfile.TemporaryDirectory(prefix="svb-chromium-") as profile:
        browser = Chromium(profile)
        try:
            browser.open_tab(("Page", "Runtime", "Log", "Network"))
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": 1320, "height": 900, "deviceScaleFactor": 1, "mobile": False})
            browser.send("Page.navigate", {"url": page.as_uri()})
            browser.wait_for("Page.loadEventFired")
            charts = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """
                Array.from(document.querySelectorAll('figure')).map(function (f) {
                  var svg = f.querySelector('svg.chart'), r = svg ? svg.getBoundingClientRect() : null;
                  return {id: svg ? svg.id : null, width: r ? r.width : 0, height: r ? r.height : 0,
                          points: svg ? svg.querySelectorAll('g.series circle.pt').length : 0,
                          lines: svg ? svg.querySelectorAll('g.series polyline.line').length : 0,
                          floor: svg ? svg.querySelectorAll('g.floor line, g.floor polyline').length : 0,
                          caption: f.querySelector('figcaption').textContent};
                })"""})["result"]["value"]
            # the legend toggles a mode's line in every chart
            toggled = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """
                (function () { var b = document.querySelector('button.key'); b.click();
                  var hidden = document.querySelectorAll('g.series.off').length; b.click();
                  return [hidden, document.querySelectorAll('g.series.off').length]; })()"""
            })["result"]["value"]
            height = browser.send("Runtime.evaluate", {
                "returnByValue": True, "expression": "document.documentElement.scrollHeight"
            })["result"]["value"]
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": 1320, "height": int(height), "deviceScaleFactor": 1,
                          "mobile": False})
            shot = browser.send("Page.captureScreenshot", {"format": "png"}, timeout=60)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            events = list(browser.events)
        finally:
            browser.close()
    errors = [e["params"] for e in events
              if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    requests = [e["params"]["request"]["url"] for e in events
                if e.get("method") == "Network.requestWillBeSent"]
    return {"charts": charts, "errors": errors, "requests": requests, "toggled": toggled}


def _sweep_rows(sizes, count, repeat):
    from bench.metrics import sweep_mode
    from bench.sweep import SweepConfig

    rows = sweep_mode(SweepConfig(["iptables"], list(sizes), count=count), "iptables", lambda s: None)
    out = []
    for row in rows:
        d = row.as_dict()
        extra = d.pop("extra")
        d["repeat"] = repeat
        out.append({**d, "target": extra.get("target", ""), "when": extra.get("when", ""),
                    "node": extra.get("node", "")})
    return out


def _modes_skipped() -> dict[str, str]:
    from dataplanes.base import Host
    from dataplanes.modes import MODES, make

    skipped = {}
    for mode in MODES:
        if mode == "iptables":
            continue
        try:
            missing = make(mode).missing(Host())
        except ImportError:
            skipped[mode] = "not implemented yet"
            continue
        except Exception as exc:  # a mode being written may not load yet
            skipped[mode] = f"cannot load: {exc}"
            continue
        skipped[mode] = "; ".join(missing) if missing else "left out of this small run"
    return skipped


def write_sweep_run(path: Path, sizes=SIZES, count=100, repeats=1) -> Path:
    """A small real run from the sweep alone, bench.csv and run.json written here."""
    path.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = [r for rep in range(repeats) for r in _sweep_rows(sizes, count, rep)]
    write_csv(path / "bench.csv", rows)
    env = environment()
    write_json(path / "run.json", {
        **env, "cpu": env["cpu_model"], "versions": {**env["tools"], **env["packages"]},
        "args": {"modes": "iptables", "services": ",".join(map(str, sizes)), "count": count,
                 "repeats": repeats},
        "complete": True, "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modes_skipped": _modes_skipped(), "noisy": [],
    })
    return path


def write_bench_run(base: Path) -> Path:
    """A small real run through `svcbench bench`'s runner when it exists, else the sweep."""
    if importlib.util.find_spec("bench.runner") is None:
        return write_sweep_run(base / "run", repeats=2)
    done = subprocess.run(
        [sys.executable, "-m", "bench.runner", "--modes", "iptables",
         "--services", ",".join(map(str, SIZES)), "--repeats", "2", "--count", "100",
         "--load-seconds", "1", "--out", str(base)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = base.glob("bench-*")
    return run


def add_conformance(run: Path) -> None:
    """Fast conformance checks of the same mode into the run folder, when the suite exists."""
    if importlib.util.find_spec("conformance.runner") is None:
        return
    # In a child process: the checks are a pytest session of their own.
    code = ("from conformance.runner import run_conformance; run_conformance('iptables', "
            "keyword='clusterip_tcp_uniform or clusterip_udp_uniform or "
            "no_endpoints_refused_fast or session_affinity_switch or nodeport_on_every_node', "
            f"out_dir={str(run / 'conformance-iptables')!r}, progress=lambda s: None)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=300, capture_output=True)


@pytest.mark.root
def test_real_run_report_opens_in_chromium_with_every_chart_drawn(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("needs Debian's chromium for the browser check: apt-get install chromium")
    base = tmp_path_factory.mktemp("report")
    older = write_sweep_run(base / "older")
    run = write_bench_run(base / "bench")
    add_conformance(run)
    page_path = write_report(run, compare=older)
    assert page_path == run / "report.html"
    page = page_path.read_text()
    assert not URL_RE.search(page), "the report references an http(s) resource"

    result = open_in_chromium(page_path, run / "report.png")
    assert result["errors"] == [], result["errors"]
    assert result["requests"] == [page_path.as_uri()], "the page fetched something"
    charts = result["charts"]
    # sync time, rules, new connections to the first and last Service and to the pod IP
    assert len(charts) >= 5, charts
    for chart in charts:
        assert chart["width"] > 300 and chart["height"] > 150, chart
        assert chart["points"] >= 3 and chart["lines"] >= 1, chart
    floored = [c for c in charts if "conn_latency_us" in c["caption"]]
    assert floored and all(c["floor"] == 1 for c in floored), floored
    assert result["toggled"][0] >= 1 and result["toggled"][1] == 0
    shot = (run / "report.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 50_000
    # the findings name the mode, the scale and the cost, from the real numbers
    assert re.search(r"<b>iptables</b> at 100 Services: ", page)
    assert "id='compare'" in page
    if list(run.glob("conformance*/conformance.json")):
        assert "<table class='matrix'>" in page
    print(f"report: {page_path}\nscreenshot: {run / 'report.png'}")


def test_merge_adds_the_guest_run_once_and_the_report_shows_both_kernels(tmp_path):
    from reports.merge import main as merge_main
    from reports.render import load_run
    from reports.results import read_bench_csv, read_json, write_bench_csv

    def run(name: str, kernel: str, mode: str, value: float) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        write_json(folder / "run.json", {"kernel": kernel, "status": "complete", "complete": True})
        write_bench_csv(folder, [{"mode": mode, "kernel": kernel, "n_services": n, "metric": "conn_latency_us",
                                  "target": "last", "stat": "p50", "value": value + n / 100, "unit": "us",
                                  "repeat": 0} for n in (1, 100, 1000)])
        return folder

    host = run("bench-host", "6.18.0", "nftables", 400.0)
    guest = run("bench-guest", "6.1.176", "ipvs", 900.0)
    assert merge_main([str(host), str(guest)]) == 0
    assert merge_main([str(host), str(guest)]) == 0  # a second merge adds nothing
    rows = read_bench_csv(host / "bench.csv")
    assert sorted({(r["kernel"], r["mode"]) for r in rows}) == [("6.1.176", "ipvs"), ("6.18.0", "nftables")]
    assert len(rows) == 6
    assert read_json(host / "run.json")["other_runs"][str(guest.resolve())]["kernel"] == "6.1.176"
    loaded = load_run(host)
    assert set(loaded.bench["kernel"]) == {"6.1.176", "6.18.0"}
    assert merge_main([str(host), str(tmp_path / "missing")]) == 2
