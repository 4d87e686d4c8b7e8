"""Helpers of the lossd-bench end-to-end tests (test_lossd_bench*_e2e.py): finding the
lossd-bench binary, running it for its JSON report, and reading the server's counters once its
calls have settled.

lossd-bench is found beside the server under test: Path(LOSSD_BINARY).parents[1] is the build
directory (LOSSD_BENCH overrides it)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import lossd_binary
from helpers import scrape, value


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
