"""End-to-end: lossd-bench --shared_memory (client/loadtest/shm.h) against a real lossd. The
tensors lie in a POSIX shared-memory region registered with the server, each Evaluate refers to
them and places its outputs in the caller's slot, and --verify reads those outputs from the
region. Counts are checked against the server's own counters and the exact schedule of a
fixed-rate run; the server's ListRegions shows the region gone after the run (also after
Ctrl-C). Nothing here asserts a speed.

lossd serves shared memory to loopback TCP clients and on its Unix socket by default
(--shared_memory_prefix=/lossd-); an empty prefix turns it off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest

from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

from helpers import metrics_address, settled_counts, value
from lossd_bench_helpers import bench_binary, interrupt_after_successful_calls, run_bench


def regions(target: str) -> list:
    """This uid's registered regions on the server (ListRegions)."""
    with grpc.insecure_channel(target) as channel:
        return list(pb_grpc.SharedMemoryStub(channel).ListRegions(
            pb.ListRegionsRequest(), timeout=10).regions)


def leftover_objects() -> list:
    return [n for n in os.listdir("/dev/shm") if n.startswith("lossd-bench-")]


def test_closed_loop_counts_and_verified_outputs(server_factory, tmp_path) -> None:
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    before = set(leftover_objects())
    report = run_bench(tmp_path, f"--target={server.target}", "--shared_memory", "--verify",
                       "--concurrency=1:3:+2", "--warmup=0.1s", "--requests=40", "--rounds=1",
                       "--grad=both", "--weight", "--reduction=none",
                       "--mix=0.8:3000,0.2:3000:badshape", "--stop_errors=0.9")
    assert "shared memory" in report["config"] and "verified" in report["config"]
    assert "shared memory: one region of" in report["_stdout"]
    rows = report["rows"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["mismatches"] == 0, r
        assert r["ok"] > 0 and r["ok"] + r["errors"] == r["sent"] >= 40
        assert r["error_codes"] == {"INVALID_ARGUMENT": r["errors"]}  # the wrong-shape kind
        assert r["elements_per_s"] == pytest.approx(3000 * r["qps"], rel=1e-4)
    s = settled_counts(metrics_address(server))
    ok = value(s, "lossd_requests_total", method="Evaluate", code="OK", device="cpu")
    bad = value(s, "lossd_requests_total", method="Evaluate", code="INVALID_ARGUMENT",
                device="none")
    assert ok + bad == sum(r["sent"] + r["warmup_calls"] for r in rows)
    assert ok >= sum(r["ok"] for r in rows)
    # Unregistered at the end; the object was unlinked once registered.
    assert regions(server.target) == []
    assert set(leftover_objects()) <= before


@pytest.mark.parametrize("reduction", ["per_sample_mean", "mean"])
def test_open_loop_sends_its_schedule_through_few_slots(server_factory, tmp_path,
                                                       reduction) -> None:
    server = server_factory()
    # 200 calls/s evenly spaced: 60 in the 0.3 s warm-up, 200 in the measured second, through
    # two output slots (at most two calls in flight; latency still counts from the schedule).
    report = run_bench(tmp_path, f"--target={server.target}", "--shared_memory",
                       "--shared_memory_slots=2", "--rps=200", "--arrivals=fixed",
                       "--warmup=0.3s", "--duration=1s", "--rounds=1", "--elements=4096",
                       f"--reduction={reduction}", "--grad=logits", "--dtype=float16",
                       "--verify")
    [row] = report["rows"]
    assert row["sent"] == 200 and row["warmup_calls"] == 60
    assert row["ok"] == 200 and row["errors"] == 0 and row["mismatches"] == 0
    assert "2 output slot(s)" in report["_stdout"]


def test_unix_socket_and_lease_renewal(server_factory, tmp_path) -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))
    try:
        path = socket_dir / "lossd.sock"
        # A 1 s lease: the region survives a 2.5 s run only if lossd-bench renews it.
        server = server_factory("--unix_socket", str(path), "--shared_memory_max_lease=1s")
        report = run_bench(tmp_path, f"--target=unix:{path}", "--shared_memory", "--verify",
                           "--concurrency=2", "--warmup=0.2s", "--duration=2.5s",
                           "--rounds=1", "--elements=64k", "--grad=both")
        [row] = report["rows"]
        assert row["errors"] == 0 and row["ok"] == row["sent"] > 0, row
        assert "lease 1000 ms" in report["_stdout"]
        assert regions(server.target) == []
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_server_without_shared_memory_is_a_clear_error(server_factory, tmp_path) -> None:
    server = server_factory("--shared_memory_prefix=")
    p = subprocess.run([str(bench_binary()), f"--target={server.target}", "--shared_memory",
                        "--requests=10", "--warmup=0s"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1, p.stderr
    assert "--shared_memory:" in p.stderr and "does not offer shared memory" in p.stderr
    assert "shared_memory false" in p.stderr


def test_flags_that_do_not_go_with_shared_memory(tmp_path) -> None:
    for bad, part in ((["--rpc=stream"], "--rpc"), (["--protocol=oip"], "--protocol"),
                      (["--baselines=echo"], "--baselines=none"),
                      (["--target=127.0.0.1:1,127.0.0.1:2"], "one --target"),
                      (["--shared_memory_slots=0"], "--shared_memory_slots")):
        p = subprocess.run([str(bench_binary()), "--shared_memory", *bad], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 2, (bad, p.stderr)
        assert part in p.stderr, (bad, p.stderr)


def test_sigint_unregisters_the_region(server_factory, tmp_path) -> None:
    server = server_factory()
    out = tmp_path / "report.json"
    p = subprocess.Popen([str(bench_binary()), f"--target={server.target}", "--shared_memory",
                          f"--json={out}", "--concurrency=2", "--warmup=0.1s",
                          "--duration=60s", "--rounds=1", "--elements=1k"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def registered_while_running() -> None:
        assert len(regions(server.target)) == 1

    stdout, stderr = interrupt_after_successful_calls(p, registered_while_running)
    assert p.returncode == 130, (stdout, stderr)
    report = json.loads(out.read_text())
    assert report["interrupted"] is True
    assert report["rows"][0]["ok"] > 0 and report["rows"][0]["errors"] == 0
    assert regions(server.target) == []
