#!/usr/bin/env python3
"""Plots of a lossd-bench report: a self-contained HTML page with the plots inline as SVG, and
optionally each plot as its own SVG file.

Input: lossd-bench's --json=FILE (every plot), or its --csv=FILE (the sweep plots only: the CSV
has no histogram and no time series). Plots:

- latency (p50, p90, p99) against the load (closed loop: callers; open loop: offered calls/s),
  one line per server and percentile;
- successful calls/s against the load, one line per server;
- the latency histogram of one load point (share of the calls per bucket, 64 buckets per power
  of two), one line per server;
- the time series of that point: calls/s and p99 per interval of the measured window (each round
  after the other, a dotted line between rounds), one line per server.

The load point of the histogram and the time series is --point (c16, 500/s, or an index into
the sweep's points; default the last point). Every plotted line carries an SVG id
``series--<plot>--<server>[--<percentile>]`` (letters, digits, '.', '_', '-') and one marker
per data point, so a reader can find and count each series in the SVG.

Usage: plot_report.py report.json --out report.html [--svg-dir DIR] [--png-dir DIR] [--point c16]
(needs matplotlib; the test venv has it: tests/requirements.txt).
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

# Text stays text in the SVG (searchable, smaller); the same fonts give the same files.
plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "lossd-bench",
                     "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})

PERCENTILES = (("p50", "-"), ("p90", "--"), ("p99", ":"))


def series_id(*parts: str) -> str:
    """The SVG id of a plotted line: 'series--latency--lossd--p50'."""
    return "--".join(["series"] + [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip("_") for p in parts])


def load_report(path: Path) -> dict:
    """lossd-bench's JSON report, or its CSV turned into the same shape (no histogram or
    intervals)."""
    text = path.read_text()
    if path.suffix.lower() == ".csv" or not text.lstrip().startswith("{"):
        rows = []
        for r in csv.DictReader(io.StringIO(text)):
            f = {k: float(v) for k, v in r.items() if k not in ("server", "load")}
            rows.append({"server": r["server"], "load": r["load"],
                         "concurrency": f["concurrency"], "rate": f["rate"],
                         "rounds": int(f["rounds"]), "seconds": f["seconds"],
                         "sent": int(f["sent"]), "ok": int(f["ok"]), "errors": int(f["errors"]),
                         "qps": f["qps"], "latency_us": {"p50": f["p50_us"], "p90": f["p90_us"],
                                                         "p99": f["p99_us"], "max": f["max_us"]},
                         "latency_histogram_us": [], "intervals": []})
        return {"tool": "lossd-bench", "config": f"{path.name} (CSV)", "rows": rows}
    report = json.loads(text)
    if report.get("tool") != "lossd-bench" or "rows" not in report:
        raise SystemExit(f"{path}: not a lossd-bench sweep report (no \"rows\")")
    return report


def sweep_axis(rows: Sequence[dict]) -> Tuple[str, str]:
    """('concurrency' or 'rate', axis label) from the first row's kind of load."""
    if rows and rows[0]["load"] != "closed":
        return "rate", "offered load (calls/s)"
    return "concurrency", "concurrent callers (closed loop)"


def point_name(row: dict) -> str:
    return (f"c{row['concurrency']:g}" if row["load"] == "closed" else f"{row['rate']:g}/s")


def servers_in_order(rows: Sequence[dict]) -> List[str]:
    names: List[str] = []
    for r in rows:
        if r["server"] not in names:
            names.append(r["server"])
    return names


def choose_point(rows: Sequence[dict], key: str, wanted: Optional[str]) -> float:
    """The load value of the histogram and time series: --point as 'c16', '500/s', a number or
    an index (0, -1, ...) into the sweep's points; default the last point."""
    values = sorted({r[key] for r in rows})
    if not values:
        raise SystemExit("the report has no rows")
    if wanted is None:
        return values[-1]
    m = re.fullmatch(r"c?([0-9.]+)(?:/s)?", wanted)
    if m and (wanted.startswith("c") or wanted.endswith("/s")):
        v = float(m.group(1))
        if v in values:
            return v
        raise SystemExit(f"--point={wanted}: the sweep has {[point_label(key, x) for x in values]}")
    try:
        return values[int(wanted)]
    except (ValueError, IndexError):
        raise SystemExit(f"--point={wanted}: expected c<N>, <R>/s or an index below {len(values)}")


def point_label(key: str, v: float) -> str:
    return f"c{v:g}" if key == "concurrency" else f"{v:g}/s"


PNG_DIR: Optional[Path] = None  # --png-dir: each plot also as PNG


def svg_text(fig, name: str) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    if PNG_DIR is not None:
        fig.savefig(PNG_DIR / f"{name}.png", format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML


def load_axis(ax, rows, key) -> None:
    """Logarithmic load axis labelled with the sweep's own values (1, 2, 4 ... or 500, 1000)."""
    values = sorted({r[key] for r in rows})
    ax.set_xscale("log", base=2 if key == "concurrency" else 10)
    ax.set_xticks(values)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def log_us_axis(axis) -> None:
    """A logarithmic axis of microseconds labelled 100, 200, 500, 1000 ... (not 2x10^2)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def plot_latency(rows, key, xlabel) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, server in enumerate(servers_in_order(rows)):
        mine = sorted((r for r in rows if r["server"] == server), key=lambda r: r[key])
        xs = [r[key] for r in mine]
        color = f"C{i}"
        for name, style in PERCENTILES:
            (line,) = ax.plot(xs, [r["latency_us"][name] for r in mine], style, marker="o",
                              markersize=3.5, color=color, label=f"{server} {name}")
            line.set_gid(series_id("latency", server, name))
    load_axis(ax, rows, key)
    ax.set_yscale("log")
    log_us_axis(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latency of successful calls (us)")
    ax.set_title("Latency against load")
    ax.legend(fontsize=7, ncol=max(1, len(servers_in_order(rows))))
    return svg_text(fig, "latency")


def plot_qps(rows, key, xlabel) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, server in enumerate(servers_in_order(rows)):
        mine = sorted((r for r in rows if r["server"] == server), key=lambda r: r[key])
        (line,) = ax.plot([r[key] for r in mine], [r["qps"] for r in mine], "-", marker="o",
                          markersize=3.5, color=f"C{i}", label=server)
        line.set_gid(series_id("qps", server))
    if key == "rate":
        xs = sorted({r[key] for r in rows})
        ax.plot(xs, xs, color="0.6", linewidth=0.8, label="offered")
    load_axis(ax, rows, key)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("successful calls/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput against load")
    ax.legend(fontsize=7)
    return svg_text(fig, "qps")


def plot_histogram(here, key, value) -> str:
    """The latency histogram of each row of ``here`` (the chosen point's rows that have one)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(here):
        buckets = r["latency_histogram_us"]
        total = sum(b[2] for b in buckets)
        mids = [math.sqrt(max(b[0], 1e-3) * max(b[1], 1e-3)) for b in buckets]
        (line,) = ax.plot(mids, [100.0 * b[2] / total for b in buckets], "-", marker=".",
                          markersize=3, linewidth=0.8, color=f"C{i}",
                          label=f"{r['server']} ({total} calls)")
        line.set_gid(series_id("histogram", r["server"]))
        for name, style in PERCENTILES:
            ax.axvline(r["latency_us"][name], color=f"C{i}", linestyle=style, linewidth=0.7)
    ax.set_xscale("log")
    log_us_axis(ax.xaxis)
    ax.set_xlabel("latency (us); vertical lines: p50 solid, p90 dashed, p99 dotted")
    ax.set_ylabel("share of successful calls per bucket (%)")
    ax.set_title(f"Latency histogram at {point_label(key, value)}")
    ax.legend(fontsize=7)
    return svg_text(fig, "histogram")


def plot_timeseries(here, key, value) -> str:
    """The per-interval calls/s and p99 of each row of ``here`` (the chosen point's rows that
    have intervals)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for i, r in enumerate(here):
        iv = r["intervals"]
        mids = [p["t_s"] + p["seconds"] / 2 for p in iv]
        (line,) = top.plot(mids, [p["qps"] for p in iv], "-", marker="o", markersize=3,
                           color=f"C{i}", label=r["server"])
        line.set_gid(series_id("timeseries-qps", r["server"]))
        ok = [(m, p["p99_us"]) for m, p in zip(mids, iv) if p["ok"] > 0]
        (line,) = bottom.plot([m for m, _ in ok], [v for _, v in ok], "-", marker="o",
                              markersize=3, color=f"C{i}", label=r["server"])
        line.set_gid(series_id("timeseries-p99", r["server"]))
        for a, b in zip(iv, iv[1:]):
            if b["round"] != a["round"] and i == 0:
                for ax in (top, bottom):
                    ax.axvline(b["t_s"], color="0.5", linestyle=":", linewidth=0.8)
    top.set_ylabel("successful calls/s")
    top.set_ylim(bottom=0)
    top.set_title(f"Per interval at {point_label(key, value)} (rounds one after the other)")
    top.legend(fontsize=7)
    bottom.set_ylabel("p99 (us)")
    bottom.set_yscale("log")
    log_us_axis(bottom.yaxis)
    bottom.set_xlabel("measured time (s)")
    return svg_text(fig, "timeseries")


def table_html(rows: Sequence[dict]) -> str:
    head = ("server", "point", "seconds", "ok", "errors", "calls/s", "p50 us", "p90 us",
            "p99 us", "max us")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        lat = r["latency_us"]
        cells = (r["server"], point_name(r), f"{r['seconds']:.2f}", r["ok"], r["errors"],
                 f"{r['qps']:.0f}", f"{lat['p50']:.1f}", f"{lat['p90']:.1f}",
                 f"{lat['p99']:.1f}", f"{lat['max']:.0f}")
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def build(report: dict, point: Optional[str]) -> Tuple[str, Dict[str, str]]:
    """The HTML page and the SVG of each plot by name."""
    rows = report["rows"]
    if not rows:
        raise SystemExit("the report has no rows (nothing was measured)")
    key, xlabel = sweep_axis(rows)
    rows = [r for r in rows if (r["load"] == "closed") == (key == "concurrency")]
    value = choose_point(rows, key, point)
    plots: Dict[str, str] = {"latency": plot_latency(rows, key, xlabel),
                             "qps": plot_qps(rows, key, xlabel)}
    # The plots of one point, drawn from the rows of that point that have their data.
    for name, fn, field in (("histogram", plot_histogram, "latency_histogram_us"),
                            ("timeseries", plot_timeseries, "intervals")):
        here = [r for r in rows if r[key] == value and r.get(field)]
        if here:
            plots[name] = fn(here, key, value)
    missing = [n for n in ("histogram", "timeseries") if n not in plots]
    note = (f"<p>No {' or '.join(missing)} plot: the input has no per-call histogram or "
            "intervals (a CSV report, or a lossd-bench older than its time series).</p>"
            if missing else "")
    body = "\n".join(f'<div class="plot" id="plot-{n}">{svg}</div>' for n, svg in plots.items())
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lossd-bench report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto}}
table{{border-collapse:collapse;font-size:80%}}td,th{{border:1px solid #ccc;padding:2px 6px;
text-align:right}}.plot{{margin:1em 0}}</style></head><body>
<h1>lossd-bench report</h1>
<p>{html.escape(report.get("config", ""))}</p>
{body}
{note}
<h2>Rows</h2>
{table_html(rows)}
</body></html>
"""
    return page, plots


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="lossd-bench --json (or --csv) output")
    ap.add_argument("--out", type=Path, help="HTML page to write (default: REPORT.html)")
    ap.add_argument("--svg-dir", type=Path, help="also write each plot as DIR/<plot>.svg")
    ap.add_argument("--png-dir", type=Path, help="also write each plot as DIR/<plot>.png")
    ap.add_argument("--point", help="load point of the histogram and time series: c16, 500/s "
                    "or an index into the sweep's points (default: the last)")
    args = ap.parse_args(argv)
    global PNG_DIR
    if args.png_dir:
        args.png_dir.mkdir(parents=True, exist_ok=True)
        PNG_DIR = args.png_dir
    page, plots = build(load_report(args.report), args.point)
    out = args.out or args.report.with_suffix(".html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    written = [str(out)]
    if args.svg_dir:
        args.svg_dir.mkdir(parents=True, exist_ok=True)
        for name, svg in plots.items():
            path = args.svg_dir / f"{name}.svg"
            path.write_text('<?xml version="1.0" encoding="utf-8" standalone="no"?>\n' + svg)
            written.append(str(path))
    if args.png_dir:
        written.extend(str(args.png_dir / f"{name}.png") for name in plots)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
