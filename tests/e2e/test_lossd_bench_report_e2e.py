"""End-to-end: a short lossd-bench sweep against real servers (lossd and the echo and raw
baselines that lossd-bench starts), its per-interval time series and latency histogram in the
JSON report, and tools/bench/plot_report.py's HTML page and SVG files made from it: every
series of the JSON is a plotted line with one marker per point. Nothing here asserts a speed.

lossd-bench is found as in lossd_bench_helpers.py; plot_report.py needs matplotlib
(tests/requirements.txt)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import lossd_binary
from lossd_bench_helpers import run_bench

REPO = Path(__file__).resolve().parents[2]
PLOT = REPO / "tools" / "bench" / "plot_report.py"
SVG = "{http://www.w3.org/2000/svg}"


def series_points(svg_root: ET.Element) -> Dict[str, int]:
    """Each plotted line's id (series--...) and its number of markers (data points)."""
    out: Dict[str, int] = {}
    for g in svg_root.iter(f"{SVG}g"):
        gid = g.get("id", "")
        if gid.startswith("series--"):
            out[gid] = len(list(g.iter(f"{SVG}use")))
    return out


def sid(*parts: str) -> str:
    return "--".join(["series"] + [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip("_")
                                   for p in parts])


def plot(report: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PLOT), str(report), "--out",
                           str(out_dir / "report.html"), "--svg-dir", str(out_dir / "svg"),
                           *extra], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real 2-second sweep (three points, two rounds) of lossd and its baselines."""
    d = tmp_path_factory.mktemp("bench-report")
    report = run_bench(d, f"--lossd_binary={lossd_binary()}", "--concurrency=1:4:x2",
                       "--elements=1k", "--warmup=0.2s", "--duration=1s", "--rounds=2",
                       "--verify")
    report.pop("_stdout")
    path = d / "sweep.json"
    path.write_text(json.dumps(report))
    return path


def test_json_has_intervals_and_histogram_that_add_up(sweep) -> None:
    rows = json.loads(sweep.read_text())["rows"]
    assert len(rows) == 9  # lossd, echo, raw at c1, c2, c4
    for r in rows:
        assert r["errors"] == 0 and r["ok"] > 0, r
        iv = r["intervals"]
        # Two rounds of about a second each; each round's intervals start at 0 on its own
        # clock and follow the previous round on the row's time axis.
        assert {p["round"] for p in iv} == {1, 2}
        assert 2 <= len(iv) <= 6, iv
        assert sum(p["ok"] for p in iv) == r["ok"]
        assert sum(p["errors"] for p in iv) == r["errors"]
        for a, b in zip(iv, iv[1:]):
            assert b["t_s"] == pytest.approx(a["t_s"] + a["seconds"], abs=1e-5)
        assert sum(p["seconds"] for p in iv) == pytest.approx(r["seconds"], rel=1e-4)
        for p in iv:
            assert p["qps"] == pytest.approx(p["ok"] / p["seconds"], rel=1e-4)
            assert 0 < p["p50_us"] <= p["p99_us"] <= p["max_us"] * 1.0001
        hist = r["latency_histogram_us"]
        assert sum(b[2] for b in hist) == r["ok"]
        assert all(lo <= hi for lo, hi, _ in hist)
        assert all(a[1] < b[0] for a, b in zip(hist, hist[1:]))  # increasing, disjoint (ns)
        # The row's p50 lies in the histogram's range (fine buckets vs 64 per power of two).
        assert hist[0][0] <= r["latency_us"]["p50"] <= hist[-1][1] * 1.001


def test_plot_report_draws_every_series_of_the_json(sweep, tmp_path) -> None:
    p = plot(sweep, tmp_path)
    assert p.returncode == 0, p.stderr
    rows: List[dict] = json.loads(sweep.read_text())["rows"]
    servers = ["lossd", "echo", "raw"]
    points = sorted({r["concurrency"] for r in rows})
    assert points == [1, 2, 4]
    svgs = {name: ET.parse(tmp_path / "svg" / f"{name}.svg").getroot()
            for name in ("latency", "qps", "histogram", "timeseries")}
    lat = series_points(svgs["latency"])
    qps = series_points(svgs["qps"])
    for s in servers:
        for q in ("p50", "p90", "p99"):
            assert lat[sid("latency", s, q)] == len(points), (s, q, lat)
        assert qps[sid("qps", s)] == len(points), qps
    assert len(lat) == 9 and len(qps) == 3
    # The histogram and time series are of the last point (c4) by default.
    last = {r["server"]: r for r in rows if r["concurrency"] == 4}
    hist = series_points(svgs["histogram"])
    ts = series_points(svgs["timeseries"])
    for s in servers:
        assert hist[sid("histogram", s)] == len(last[s]["latency_histogram_us"])
        assert ts[sid("timeseries-qps", s)] == len(last[s]["intervals"])
        assert ts[sid("timeseries-p99", s)] == sum(1 for p in last[s]["intervals"] if p["ok"])
    # The HTML page holds the same four plots inline, the config and one table row per row.
    page = (tmp_path / "report.html").read_text()
    for name in ("latency", "qps", "histogram", "timeseries"):
        assert f'id="plot-{name}"' in page
    assert page.count("<svg") == 4
    assert "closed loop" in page and "verified" in page
    assert page.count("<tr>") == len(rows) + 1
    for s in servers:
        for q in ("p50", "p90", "p99"):
            assert f'id="{sid("latency", s, q)}"' in page
    # Another point by name: the histogram of c1.
    p = plot(sweep, tmp_path / "c1", "--point=c1")
    assert p.returncode == 0, p.stderr
    hist = series_points(ET.parse(tmp_path / "c1" / "svg" / "histogram.svg").getroot())
    first = {r["server"]: r for r in rows if r["concurrency"] == 1}
    for s in servers:
        assert hist[sid("histogram", s)] == len(first[s]["latency_histogram_us"])
    p = plot(sweep, tmp_path / "bad", "--point=c3")
    assert p.returncode != 0 and "c3" in p.stderr


def test_plot_report_of_an_open_loop_csv(server_factory, tmp_path) -> None:
    """The CSV report (no histogram, no intervals) gives the sweep plots against the offered
    rate, and says what is missing."""
    server = server_factory()
    csv = tmp_path / "report.csv"
    run_bench(tmp_path, f"--target={server.target}", "--rps=50:100:x2", "--arrivals=fixed",
              "--warmup=0.1s", "--duration=0.5s", "--rounds=1", "--elements=256",
              f"--csv={csv}")
    p = subprocess.run([sys.executable, str(PLOT), str(csv), "--out", str(tmp_path / "r.html"),
                        "--svg-dir", str(tmp_path / "svg")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "svg").iterdir()) == ["latency.svg", "qps.svg"]
    lat = series_points(ET.parse(tmp_path / "svg" / "latency.svg").getroot())
    name = next(iter(lat)).split("--")[2]
    assert name.startswith("lossd")
    assert all(n == 2 for n in lat.values()) and len(lat) == 3
    page = (tmp_path / "r.html").read_text()
    assert "offered load" in page and "No histogram or timeseries plot" in page
