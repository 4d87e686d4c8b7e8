"""Helpers of the lossd-bench end-to-end tests (test_lossd_bench*_e2e.py): finding the
lossd-bench binary, running it for its JSON report, and interrupting a run once it has made
successful calls.

lossd-bench is found beside the server under test: Path(LOSSD_BINARY).parents[1] is the build
directory (LOSSD_BENCH overrides it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import pytest

from conftest import lossd_binary


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


def interrupt_after_successful_calls(p: subprocess.Popen,
                                     while_running: Optional[Callable[[], None]] = None,
                                     interrupt: bool = True) -> Tuple[str, str]:
    """SIGINT to a running lossd-bench once one of its progress lines ("... ok N errors M in
    flight K", once a second, on stderr) shows successful calls, so that its partial report has
    something in it; ``while_running()`` is called just before (with ``interrupt`` False it is
    all that happens: the run ends by itself). Returns (stdout, stderr) once it has exited;
    kills it if anything fails."""
    try:
        assert p.stderr is not None
        seen = []
        for line in p.stderr:
            seen.append(line)
            m = re.search(r" ok (\d+) errors", line)
            if m and int(m.group(1)) > 0:
                break
        else:
            pytest.fail("no progress line with successful calls:\n" + "".join(seen))
        if while_running is not None:
            while_running()
        if interrupt:
            p.send_signal(signal.SIGINT)
        return p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@contextlib.contextmanager
def baseline_server(service: str) -> Iterator[str]:
    """tools/bench's lossd_bench_server --service=`service` (echo or raw) on a free loopback
    port, beside the server under test in its build directory; yields its host:port and stops
    it afterwards."""
    server = subprocess.Popen([str(lossd_binary().parents[1] / "tools" / "bench" /
                                   "lossd_bench_server"), f"--service={service}", "--port=0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        m = None
        for line in server.stderr:
            m = re.search(r"listening on (\S+:\d+)", line)
            if m:
                break
        assert m, f"the {service} server did not start"
        yield m.group(1)
    finally:
        server.terminate()
        server.wait(10)

