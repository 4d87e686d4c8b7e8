"""End-to-end: the server binary explains itself (--help, --version) and probes a running
server's health for container HEALTHCHECKs (--health_check)."""

from __future__ import annotations

import re
import subprocess

from conftest import lossd_binary


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(lossd_binary()), *args], capture_output=True, text=True,
                          timeout=30)


def test_help_lists_every_flag() -> None:
    out = run("--help")
    text = out.stdout + out.stderr
    source = (lossd_binary().parents[2] / "server" / "main.cc").read_text()
    flags = re.findall(r"ABSL_FLAG\([^,]+,\s*(\w+),", source)
    assert len(flags) > 20
    missing = [f for f in flags if f"--{f} " not in text]
    assert not missing, f"--help does not list {missing}:\n{text}"


def test_version_names_the_build() -> None:
    out = run("--version")
    assert out.returncode == 0
    assert re.match(r"lossd \d+\.\d+\.\d+ \((Release|Debug|RelWithDebInfo|MinSizeRel)? ?build, "
                    r"CUDA (compiled in|not compiled in)\)", out.stdout), out.stdout


def test_health_check_probe(server_factory) -> None:
    server = server_factory()
    ok = run(f"--health_check={server.target}")
    assert ok.returncode == 0, ok.stderr
    assert "SERVING" in ok.stderr
    host, port = server.target.rsplit(":", 1)
    server.stop()
    down = run(f"--health_check={host}:{port}")
    assert down.returncode == 1, down.stderr


def test_json_log_lines(server_factory) -> None:
    import json

    import numpy as np

    import lossd

    server = server_factory("--log_format", "json")
    with lossd.Client(server.target) as c:
        try:
            c.bce_with_logits(np.zeros(4), np.zeros(3), request_id="id-\u00e9\"x")
        except lossd.InvalidArgumentError:
            pass
    server.stop()
    lines = [line for line in server.lines if line.startswith("{")]
    assert len(lines) >= 3, server.stderr_text()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(set(e) == {"time", "level", "message"} for e in events)
    failure = [e for e in events if "Evaluate failed" in e["message"]]
    assert failure and failure[0]["level"] == "WARN"
    assert "INVALID_ARGUMENT" in failure[0]["message"]
    assert any("lossd 0.1.0 config" in e["message"] for e in events)
