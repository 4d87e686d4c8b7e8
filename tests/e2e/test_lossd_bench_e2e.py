"""End-to-end: lossd-bench (client/loadtest) against a real lossd. Its JSON report is checked
against independent counts: the server's own Prometheus request counters, and the exact number
of calls a fixed-rate schedule sends. Nothing here asserts a speed or a duration.

lossd-bench is found beside the server under test: Path(LOSSD_BINARY).parents[1] is the build
directory (LOSSD_BENCH overrides it)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import List

import pytest

from conftest import lossd_binary
from helpers import metrics_address, scrape, value


def bench_binary() -> Path:
    path = Path(os.environ.get("LOSSD_BENCH",
                               lossd_binary().parents[1] / "client" / "loadtest" / "lossd-bench"))
    if not path.is_file():
        pytest.fail(f"lossd-bench not found at {path}; build the target lossd_bench",
                    pytrace=False)
    return path


def run_bench(tmp_path: Path, *args: str, check: bool = True) -> dict:
    out = tmp_path / "report.json"
    cmd = [str(bench_binary()), f"--json={out}", "--progress=false", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, f"{cmd}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    report = json.loads(out.read_text())
    report["_stdout"] = p.stdout
    return report


def settled_counts(address: str) -> dict:
    deadline = time.monotonic() + 5
    while True:
        s = scrape(address)
        if value(s, "lossd_in_flight_calls") == 0 or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_sweep_counts_add_up_and_failures_are_not_successes(server_factory, tmp_path) -> None:
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    address = metrics_address(server)
    report = run_bench(tmp_path, f"--target={server.target}", "--concurrency=1:2:x2",
                       "--warmup=0.4s", "--duration=0.8s", "--rounds=1",
                       "--mix=0.7:1k,0.3:1k:badshape", "--stop_errors=0.9")
    rows: List[dict] = report["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        assert r["server"].startswith("lossd ")  # named by GetCapabilities
        assert r["ok"] + r["errors"] == r["sent"]
        assert r["ok"] > 0 and r["errors"] > 0
        # The wrong-shape kind lands in the error counts, never among the successes.
        assert r["error_codes"] == {"INVALID_ARGUMENT": r["errors"]}
        assert r["qps"] == pytest.approx(r["ok"] / r["seconds"], rel=1e-4)
        assert r["warmup_calls"] > 0
    s = settled_counts(address)
    total = "lossd_requests_total"
    server_ok = value(s, total, method="Evaluate", code="OK", device="cpu")
    server_bad = value(s, total, method="Evaluate", code="INVALID_ARGUMENT", device="none")
    sent = sum(r["sent"] for r in rows)
    warm = sum(r["warmup_calls"] for r in rows)
    ok = sum(r["ok"] for r in rows)
    bad = sum(r["errors"] for r in rows)
    # Every call the server saw is either measured or warm-up, and the warm-up calls are in
    # neither the successes nor the errors.
    assert server_ok + server_bad == sent + warm
    assert ok <= server_ok and bad <= server_bad
    assert (server_ok - ok) + (server_bad - bad) == warm


def test_fixed_rate_sends_exactly_its_schedule(server_factory, tmp_path) -> None:
    server = server_factory()
    # 200 calls/s evenly spaced: arrivals at k * 5 ms; the warm-up [0, 300 ms) holds k = 0..59,
    # the measured second [300, 1300 ms) k = 60..259.
    report = run_bench(tmp_path, f"--target={server.target}", "--rps=200", "--arrivals=fixed",
                       "--warmup=0.3s", "--duration=1s", "--rounds=1", "--elements=256")
    [row] = report["rows"]
    assert row["load"] == "open-fixed" and row["rate"] == 200
    assert row["sent"] == 200
    assert row["warmup_calls"] == 60
    assert row["ok"] == 200 and row["errors"] == 0


def test_baselines_alternate_and_replies_verify(tmp_path) -> None:
    report = run_bench(tmp_path, f"--lossd_binary={lossd_binary()}", "--concurrency=2",
                       "--warmup=0.2s", "--duration=0.4s", "--rounds=2", "--elements=1k",
                       "--verify", "--grad=both", "--weight")
    names = [r["server"] for r in report["rows"]]
    assert names == ["lossd", "echo", "raw"]
    for r in report["rows"]:
        assert r["rounds"] == 2
        assert r["errors"] == 0 and r["ok"] > 0, r
    assert [x["ratio"]["baseline"] for x in report["ratios"]] == ["echo", "raw"]
    assert all(x["ratio"]["qps_ratio"] > 0 for x in report["ratios"])
    assert "lossd/echo" in report["_stdout"]


@pytest.mark.parametrize("rpc,extra", [("stream", ["--stream_window=3", "--reduction=none"]),
                                       ("accumulate", ["--batches=3", "--reduction=sum"])])
def test_streaming_kinds_verify(server_factory, tmp_path, rpc, extra) -> None:
    server = server_factory()
    report = run_bench(tmp_path, f"--target={server.target}", f"--rpc={rpc}", *extra,
                       "--concurrency=2", "--warmup=0.1s", "--requests=40", "--rounds=1",
                       "--elements=3000", "--dtype=float16", "--verify")
    [row] = report["rows"]
    assert row["errors"] == 0 and row["mismatches"] == 0
    assert row["ok"] == row["sent"] and row["sent"] >= 40


def test_stop_rule_ends_the_sweep(server_factory, tmp_path) -> None:
    server = server_factory()
    report = run_bench(tmp_path, f"--target={server.target}", "--concurrency=1:8:x2",
                       "--warmup=0.1s", "--duration=0.3s", "--rounds=1", "--stop_p99=1ns")
    assert len(report["rows"]) == 1
    assert "p99" in report["stopped"]


def test_help_and_bad_values(tmp_path) -> None:
    p = subprocess.run([str(bench_binary()), "--help"], capture_output=True, text=True,
                       timeout=30)
    text = p.stdout + p.stderr
    for flag in ("--concurrency", "--rps", "--mix", "--verify", "--json", "--target",
                 "--warmup", "--stop_p99"):
        assert flag in text, flag
    assert "No flags matched" not in text
    for bad in (["--concurrency=0"], ["--mix=0.5:1k:oops"], ["--rps=-3"], ["--dtype=int8"],
                ["--rpc=stream", "--rps=100"]):
        p = subprocess.run([str(bench_binary()), *bad], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2, (bad, p.stderr)
        assert "lossd-bench:" in p.stderr, (bad, p.stderr)
