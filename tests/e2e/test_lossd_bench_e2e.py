"""End-to-end: lossd-bench (client/loadtest) against a real lossd. Its JSON report is checked
against independent counts: the server's own Prometheus request counters, and the exact number
of calls a fixed-rate schedule sends. Nothing here asserts a speed or a duration.

lossd-bench is found beside the server under test: Path(LOSSD_BINARY).parents[1] is the build
directory (LOSSD_BENCH overrides it; lossd_bench_helpers.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import pytest

from conftest import lossd_binary
from helpers import make_certificates, metrics_address, settled_counts, value
from lossd_bench_helpers import (baseline_server, bench_binary,
                                 interrupt_after_successful_calls, run_bench)


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


@pytest.mark.parametrize("threads,extra", [(1, ()), (3, ("--shared_channel",)), (0, ())])
def test_unary_pollers_count_every_call_and_error(server_factory, tmp_path, threads,
                                                  extra) -> None:
    """Unary calls run on --client_threads completion-queue pollers (0: one per usable CPU), a
    closed-loop caller staying on its poller call after call: with one poller for four callers,
    with more pollers than channels, and by default, each successful and each failed call is
    counted once, as the server counted it."""
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    address = metrics_address(server)
    report = run_bench(tmp_path, f"--target={server.target}", "--concurrency=4",
                       f"--client_threads={threads}", *extra, "--warmup=0.2s",
                       "--requests=400", "--rounds=1", "--mix=0.6:64,0.4:64:badshape",
                       "--stop_errors=0.9")
    [row] = report["rows"]
    assert row["ok"] + row["errors"] == row["sent"] >= 400
    assert row["ok"] > 0 and row["errors"] > 0
    assert row["error_codes"] == {"INVALID_ARGUMENT": row["errors"]}
    assert row["server_us"]["total_p50"] > 0  # the server's timing, read from each reply
    s = settled_counts(address)
    total = "lossd_requests_total"
    server_ok = value(s, total, method="Evaluate", code="OK", device="cpu")
    server_bad = value(s, total, method="Evaluate", code="INVALID_ARGUMENT", device="none")
    assert server_ok + server_bad == row["sent"] + row["warmup_calls"]
    assert row["ok"] <= server_ok and row["errors"] <= server_bad


def test_unary_deadline_failures_are_counted(server_factory, tmp_path) -> None:
    # gRPC's deadlines have millisecond resolution: 1 ms, with requests of 1M elements (8 MB)
    # that take longer than that to send.
    server = server_factory()
    for load in (("--concurrency=2",), ("--rps=100", "--arrivals=fixed", "--channels=2",
                                        "--client_threads=2")):
        report = run_bench(tmp_path, f"--target={server.target}", *load, "--deadline=1ms",
                           "--warmup=0.1s", "--duration=0.5s", "--rounds=1", "--elements=1M",
                           "--stop_errors=1")
        [row] = report["rows"]
        assert row["ok"] == 0 and row["sent"] == row["errors"] > 0
        assert row["error_codes"] == {"DEADLINE_EXCEEDED": row["errors"]}


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


@pytest.mark.parametrize("rpc,extra", [("stream", ["--reduction=none", "--channels=2"]),
                                       ("accumulate", ["--batches=2", "--reduction=sum"])])
def test_open_loop_streams_send_exactly_their_schedule(server_factory, tmp_path, rpc,
                                                       extra) -> None:
    server = server_factory()
    # As test_fixed_rate_sends_exactly_its_schedule: 200 arrivals/s evenly spaced, 60 in the
    # warm-up, 200 in the measured second. Each arrival is one EvaluateStream batch (on one of
    # two streams) or one Accumulate call; a fifth of them have the wrong shape.
    report = run_bench(tmp_path, f"--target={server.target}", f"--rpc={rpc}", *extra,
                       "--rps=200", "--arrivals=fixed", "--warmup=0.3s", "--duration=1s",
                       "--rounds=1", "--mix=0.8:3000,0.2:3000:badshape", "--stop_errors=0.9",
                       "--dtype=float16", "--verify")
    [row] = report["rows"]
    assert row["load"] == "open-fixed" and row["rate"] == 200
    assert row["sent"] == 200 and row["warmup_calls"] == 60
    assert row["mismatches"] == 0
    assert row["ok"] > 0 and row["errors"] > 0
    assert row["error_codes"] == {"INVALID_ARGUMENT": row["errors"]}


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
                 "--warmup", "--stop_p99", "--find_max_rps", "--slo_p99", "--logits_npy",
                 "--targets_npy", "--weight_npy", "--protocol", "--self_check",
                 "--target_service", "--tls_ca", "--token_file", "--shared_memory",
                 "--shared_memory_slots", "--precision"):
        assert flag in text, flag
    assert "No flags matched" not in text
    for bad in (["--concurrency=0"], ["--mix=0.5:1k:oops"], ["--rps=-3"], ["--dtype=int8"],
                ["--rps=100", "--channels=0"], ["--self_check", "--rps=100"],
                ["--target_service=raw"], ["--precision=exact"],
                ["--protocol=oip", "--precision=correctly_rounded"]):
        p = subprocess.run([str(bench_binary()), *bad], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2, (bad, p.stderr)
        assert "lossd-bench:" in p.stderr, (bad, p.stderr)


# ---------------------------------------------------------------------------------------
# Connections: TLS, mutual TLS, bearer token, unix: targets (README.md, "Load testing with
# lossd-bench"). The server's own flags are those of server/main.cc.


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    return make_certificates(tmp_path_factory.mktemp("bench-tls"), "lossd-bench-test-ca")


SHORT = ("--concurrency=1", "--warmup=0.1s", "--requests=30", "--rounds=1", "--elements=256")


def test_tls_and_mutual_tls(server_factory, certs, tmp_path) -> None:
    server = server_factory("--tls_cert", str(certs / "server.crt"), "--tls_key",
                            str(certs / "server.key"))
    port = server.target.rsplit(":", 1)[1]
    report = run_bench(tmp_path, f"--target=localhost:{port}", f"--tls_ca={certs / 'ca.crt'}",
                       *SHORT, "--verify")
    [row] = report["rows"]
    assert row["server"].startswith("lossd ")  # GetCapabilities answered over TLS
    assert row["errors"] == 0 and row["ok"] == row["sent"] >= 30
    # The same server through its IP with the name in the certificate given explicitly.
    report = run_bench(tmp_path, f"--target=127.0.0.1:{port}", f"--tls_ca={certs / 'ca.crt'}",
                       "--tls_server_name=localhost", *SHORT)
    assert report["rows"][0]["errors"] == 0 and report["rows"][0]["ok"] >= 30

    mtls = server_factory("--tls_cert", str(certs / "server.crt"), "--tls_key",
                          str(certs / "server.key"), "--tls_client_ca", str(certs / "ca.crt"))
    port = mtls.target.rsplit(":", 1)[1]
    report = run_bench(tmp_path, f"--target=localhost:{port}", f"--tls_ca={certs / 'ca.crt'}",
                       f"--tls_cert={certs / 'client.crt'}", f"--tls_key={certs / 'client.key'}",
                       *SHORT)
    [row] = report["rows"]
    assert row["server"].startswith("lossd ")
    assert row["errors"] == 0 and row["ok"] >= 30
    # Without a client certificate the handshake fails: every measured call is an error.
    report = run_bench(tmp_path, f"--target=localhost:{port}", f"--tls_ca={certs / 'ca.crt'}",
                       "--concurrency=1", "--warmup=0s", "--duration=0.3s", "--rounds=1",
                       "--elements=256", "--deadline=2s")
    [row] = report["rows"]
    assert row["server"] == "unknown server"
    assert row["ok"] == 0 and row["errors"] == row["sent"] > 0
    assert set(row["error_codes"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, row


def test_bearer_token(server_factory, tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("let-me-in\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("let-me-out\n")
    server = server_factory("--auth_token_file", str(token))
    report = run_bench(tmp_path, f"--target={server.target}", f"--token_file={token}", *SHORT)
    [row] = report["rows"]
    assert row["server"].startswith("lossd ")
    assert row["errors"] == 0 and row["ok"] >= 30
    report = run_bench(tmp_path, f"--target={server.target}", f"--token_file={wrong}", *SHORT)
    [row] = report["rows"]
    assert row["server"] == "unknown server"  # GetCapabilities is refused as well
    assert row["ok"] == 0
    assert row["error_codes"] == {"UNAUTHENTICATED": row["errors"]}
    assert row["sent"] == row["errors"] >= 30
    p = subprocess.run([str(bench_binary()), f"--target={server.target}",
                        f"--token_file={tmp_path / 'missing'}"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and "--token_file" in p.stderr, p.stderr


def test_unix_socket_target(server_factory, tmp_path) -> None:
    # A short directory: a socket path is limited to about 100 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))
    try:
        path = socket_dir / "lossd.sock"
        server_factory("--unix_socket", str(path))
        report = run_bench(tmp_path, f"--target=unix:{path}", *SHORT, "--verify")
        [row] = report["rows"]
        assert row["server"].startswith("lossd ")
        assert row["errors"] == 0 and row["ok"] == row["sent"] >= 30
        assert report["servers"][0]["target"] == f"unix:{path}"
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Ctrl-C


def test_sigint_prints_the_partial_report_and_exits_130(server_factory, tmp_path) -> None:
    server = server_factory()
    out = tmp_path / "report.json"
    cmd = [str(bench_binary()), f"--target={server.target}", f"--json={out}",
           "--concurrency=1:4:x2", "--warmup=0.1s", "--duration=60s", "--rounds=1",
           "--elements=256"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = interrupt_after_successful_calls(p)
    assert p.returncode == 130, (stdout, stderr)
    assert "interrupted (SIGINT)" in stdout
    report = json.loads(out.read_text())
    assert report["interrupted"] is True
    [row] = report["rows"]  # only the first point of the sweep was reached
    assert row["concurrency"] == 1
    assert row["ok"] > 0 and row["ok"] + row["errors"] == row["sent"]
    assert row["seconds"] < 60
    assert "c1 " in stdout  # the row is in the table too


# ---------------------------------------------------------------------------------------
# Sustainable-rate search (--find_max_rps; client/bench/search.h). Its logic is unit-tested
# with made-up measurements (tests/bench/search_test.cc); here it runs against a real server.
# Only what does not depend on speed is asserted.

SEARCH = ("--find_max_rps", "--arrivals=fixed", "--warmup=0.1s", "--duration=0.4s",
          "--rounds=1", "--elements=256")


def test_rate_search_reports_every_point(server_factory, tmp_path) -> None:
    server = server_factory()
    report = run_bench(tmp_path, f"--target={server.target}", *SEARCH, "--slo_p99=2s",
                       "--search_start_rps=20", "--search_max_rps=80",
                       "--search_max_points=4")
    [search] = report["search"]
    assert search["server"].startswith("lossd ")
    assert search["slo_p99_us"] == 2e6
    points = search["points"]
    assert 1 <= len(points) <= 4
    assert points[0]["offered_rps"] == 20
    # Every point tried is a row of the report, at the rate offered.
    assert [r["rate"] for r in report["rows"]] == [p["offered_rps"] for p in points]
    for p, r in zip(points, report["rows"]):
        assert r["load"] == "open-fixed"
        assert r["ok"] + r["errors"] == r["sent"] == p["sent"]
        assert p["holds"] == (p["why"] == "")
        assert all(q["offered_rps"] <= 80 for q in points)
    held = [p["offered_rps"] for p in points if p["holds"]]
    assert search["best_rps"] == (max(held) if held else 0)
    if points[0]["holds"] and len(points) > 1:
        assert points[1]["offered_rps"] == 40  # doubling
    out = report["_stdout"]
    assert "sustainable rate" in out or "no sustainable rate found" in out


def test_rate_search_with_an_objective_nothing_meets(server_factory, tmp_path) -> None:
    server = server_factory()
    report = run_bench(tmp_path, f"--target={server.target}", *SEARCH, "--slo_p99=1ns",
                       "--search_start_rps=40", "--search_max_points=3")
    [search] = report["search"]
    assert search["best_rps"] == 0
    assert [p["offered_rps"] for p in search["points"]] == [40, 20, 10]  # halving
    for p in search["points"]:
        assert not p["holds"]
        assert p["why"].startswith("p99 ") or p["why"] == "no successful call", p
    assert "no sustainable rate found" in report["_stdout"]


def test_rate_search_bad_values(tmp_path) -> None:
    for bad, part in ((["--find_max_rps"], "--slo_p99"),
                      (["--find_max_rps", "--slo_p99=5ms", "--rps=100"], "--rps"),
                      (["--find_max_rps", "--slo_p99=5ms", "--slo_errors=2"], "--slo_errors"),
                      (["--find_max_rps", "--slo_p99=5ms", "--search_start_rps=500",
                        "--search_max_rps=100"], "--search_max_rps"),
                      (["--find_max_rps", "--slo_p99=5ms", "--search_precision=0"],
                       "--search_precision")):
        p = subprocess.run([str(bench_binary()), *bad], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2, (bad, p.stderr)
        assert part in p.stderr, (bad, p.stderr)


# ---------------------------------------------------------------------------------------
# .npy inputs (--logits_npy, --targets_npy, --weight_npy; client/bench/npy.h)


def test_npy_inputs_are_sent_and_verified(server_factory, tmp_path) -> None:
    import numpy as np

    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64, np.float16):
        x = rng.uniform(-6, 6, (8, 16)).astype(dtype)
        y = rng.integers(0, 2, (8, 16)).astype(dtype)
        w = rng.uniform(0.5, 2, (8, 16)).astype(dtype)
        for name, a in (("x", x), ("y", y), ("w", w)):
            np.save(tmp_path / f"{name}.npy", a)
        report = run_bench(tmp_path, f"--target={server.target}",
                           f"--logits_npy={tmp_path / 'x.npy'}",
                           f"--targets_npy={tmp_path / 'y.npy'}",
                           f"--weight_npy={tmp_path / 'w.npy'}", "--verify", "--grad=both",
                           "--reduction=per_sample_mean", "--concurrency=1", "--warmup=0s",
                           "--requests=10", "--rounds=1")
        [row] = report["rows"]
        assert row["errors"] == 0 and row["mismatches"] == 0 and row["ok"] >= 10, row
        # The wire dtype is the file's; the shape is the file's.
        assert f"{np.dtype(dtype).name} file 128 [8,16]" in report["config"], report["config"]
        assert row["elements_per_s"] == pytest.approx(128 * row["qps"], rel=1e-4)
    # The server saw float16 calls (the last file), as many as were sent and warmed up.
    s = settled_counts(metrics_address(server))
    assert value(s, "lossd_requests_total", method="Evaluate", code="OK", device="cpu") >= 30


def test_npy_inputs_that_cannot_be_used(tmp_path) -> None:
    import numpy as np

    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 4), np.float32))
    cases = {
        "big.npy": (np.zeros((4, 4), ">f4"), "big-endian"),
        "int.npy": (np.zeros((4, 4), np.int32), "'<i4' is not read"),
        "fortran.npy": (np.asfortranarray(np.zeros((4, 4), np.float32)), "Fortran order"),
        "shape.npy": (np.zeros((2, 8), np.float32), "must be equal"),
    }
    for name, (array, part) in cases.items():
        np.save(tmp_path / name, array)
        p = subprocess.run([str(bench_binary()), "--target=127.0.0.1:1",
                            f"--logits_npy={good}", f"--targets_npy={tmp_path / name}"],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (name, p.stderr)
        assert part in p.stderr and "lossd-bench:" in p.stderr, (name, p.stderr)
    p = subprocess.run([str(bench_binary()), f"--logits_npy={good}"], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2 and "--targets_npy" in p.stderr, p.stderr
    p = subprocess.run([str(bench_binary()), f"--logits_npy={good}", f"--targets_npy={good}",
                        "--elements=1k"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--elements" in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------
# Is lossd-bench the bottleneck, and do its figures agree with another client? (docs/perf.md,
# "Is lossd-bench the bottleneck?"). Both tests print their figures (pytest -s shows them)
# and assert only what does not depend on speed: the ratios are measured figures for
# docs/perf.md, not pass/fail criteria on a shared machine.


def test_self_check_runs_one_and_two_testers(tmp_path) -> None:
    report = run_bench(tmp_path, f"--lossd_binary={lossd_binary()}", "--self_check",
                       "--concurrency=4", "--elements=16", "--warmup=0.1s", "--duration=0.4s",
                       "--rounds=1")
    sc = report["self_check"]
    print(f"\nself-check: {sc}")
    assert sc["server"] == "raw" and sc["concurrency"] == 4
    assert sc["errors"] == 0
    assert sc["one_process_qps"] > 0 and sc["two_processes_qps"] > 0
    assert sc["two_over_one"] == pytest.approx(
        sc["two_processes_qps"] / sc["one_process_qps"], rel=1e-3)
    assert "self-check against raw at c4" in report["_stdout"]


def test_target_service_raw(tmp_path) -> None:
    with baseline_server("raw") as target:
        report = run_bench(tmp_path, f"--target={target}", "--target_service=raw", *SHORT)
    [row] = report["rows"]
    assert row["server"] == "raw"
    assert row["errors"] == 0 and row["ok"] >= 30


def python_grpcio_client(target: str, warmup_s: float, seconds: float) -> dict:
    """The 1000-element call lossd-bench sends by default (float32 [1000], pos_weight [1000],
    reduction none, gradient of the logits), made with grpcio's blocking unary call, one at a
    time. Like lossd-bench it serializes the request once and sends its bytes; unlike it, it
    parses only the last reply (lossd-bench parses every reply for the server's timings)."""
    import grpc
    import numpy as np
    from lossd._proto.lossd.v1 import lossd_pb2 as pb

    rng = np.random.default_rng(1)
    n = 1000

    def tensor(a):
        return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=a.astype("<f4").tobytes())

    req = pb.EvaluateRequest(
        request_id="python-cross-check", logits=tensor(rng.uniform(-8, 8, n)),
        targets=tensor(rng.integers(0, 4, n) / 3),
        bce_with_logits=pb.BceWithLogits(pos_weight=tensor(rng.uniform(0.5, 2, n))),
        reduction=pb.REDUCTION_NONE, gradients=pb.GradientRequest(logits=True))
    body = req.SerializeToString()
    with grpc.insecure_channel(target) as channel:
        evaluate = channel.unary_unary("/lossd.v1.LossService/Evaluate")  # bytes in, bytes out
        end = time.perf_counter() + warmup_s
        warm = 0
        while time.perf_counter() < end:
            evaluate(body)
            warm += 1
        latencies = []
        start = time.perf_counter()
        end = start + seconds
        last = b""
        while time.perf_counter() < end:
            t = time.perf_counter()
            last = evaluate(body)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
    reply = pb.EvaluateResponse.FromString(last)
    assert list(reply.loss.shape) == [n] and len(reply.grad_logits.data) == 4 * n
    latencies.sort()
    return {"calls": len(latencies), "warmup_calls": warm, "qps": len(latencies) / elapsed,
            "p50_us": 1e6 * latencies[len(latencies) // 2]}


def test_cross_check_with_a_python_grpcio_client(server_factory, tmp_path) -> None:
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    address = metrics_address(server)
    py, lb = [], []
    for _ in range(2):  # alternately, so drifts of a shared machine hit both alike
        py.append(python_grpcio_client(server.target, 0.3, 1.0))
        report = run_bench(tmp_path, f"--target={server.target}", "--concurrency=1",
                           "--elements=1k", "--warmup=0.3s", "--duration=1s", "--rounds=1")
        lb.append(report["rows"][0])
    py_qps = sum(p["qps"] for p in py) / 2
    lb_qps = sum(r["qps"] for r in lb) / 2
    py_p50 = sum(p["p50_us"] for p in py) / 2
    lb_p50 = sum(r["latency_us"]["p50"] for r in lb) / 2
    print(f"\ncross-check at 1000 elements, c1: lossd-bench {lb_qps:.0f} calls/s p50 "
          f"{lb_p50:.1f} us; python grpcio {py_qps:.0f} calls/s p50 {py_p50:.1f} us; "
          f"calls/s ratio {lb_qps / py_qps:.3f}, p50 ratio {lb_p50 / py_p50:.3f}")
    for r in lb:
        assert r["errors"] == 0 and r["ok"] == r["sent"] > 0
        assert "1000 [1000]" in report["config"]
    # The server counted every call of both clients, warm-up included: no call went missing
    # or was counted twice by either side.
    s = settled_counts(address)
    served = value(s, "lossd_requests_total", method="Evaluate", code="OK", device="cpu")
    assert served == (sum(p["calls"] + p["warmup_calls"] for p in py) +
                      sum(r["sent"] + r["warmup_calls"] for r in lb))


def test_cross_check_script_sends_the_same_calls(tmp_path) -> None:
    """tools/bench/cross_check.py (docs/perf.md): lossd-bench and a Python grpcio client in open
    loop at the same fixed rate with the same request bytes, alternately. Asserted: both sent
    their whole schedule without errors, and their calls moved the same bytes (request and
    reply; the reply's timings may differ in length by a few bytes)."""
    out = tmp_path / "cc.json"
    script = Path(__file__).resolve().parents[2] / "tools" / "bench" / "cross_check.py"
    p = subprocess.run([sys.executable, str(script), f"--lossd-binary={lossd_binary()}",
                        f"--lossd-bench={bench_binary()}", "--elements=4096", "--rate=50",
                        "--warmup=0.1", "--seconds=0.4", "--rounds=2", f"--json={out}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    print("\n" + p.stdout)
    r = json.loads(out.read_text())
    assert len(r["rounds"]) == 2
    for rnd in r["rounds"]:
        for who in ("lossd-bench", "python"):
            assert rnd[who]["calls"] == 20 and rnd[who]["errors"] == 0, rnd
            assert rnd[who]["p50_us"] > 0
    assert r["request_bytes"] > 2 * 4096 * 4
    assert abs(r["bytes_per_call"]["lossd-bench"] - r["bytes_per_call"]["python"]) <= 16, r
    assert "within 10%: " in p.stdout


# ---------------------------------------------------------------------------------------
# Open Inference Protocol (--protocol=oip): the same computation sent as
# inference.GRPCInferenceService/ModelInfer (docs/interop.md), replies verified against the
# float64 reference like lossd.v1 replies, counts checked against the server's own counters.


@pytest.mark.parametrize("extra", [["--grad=both", "--weight", "--reduction=none"],
                                   ["--loss=focal", "--alpha=0.3", "--gamma=1.5",
                                    "--reduction=mean", "--dtype=float16"]])
def test_oip_protocol_counts_and_verifies(server_factory, tmp_path, extra) -> None:
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    address = metrics_address(server)
    report = run_bench(tmp_path, f"--target={server.target}", "--protocol=oip", *extra,
                       "--verify", "--concurrency=2", "--warmup=0.1s", "--requests=40",
                       "--rounds=1", "--mix=0.8:1k,0.2:1k:badshape", "--stop_errors=0.9")
    [row] = report["rows"]
    assert row["server"].startswith("lossd ") and row["server"].endswith("(oip)")  # ServerMetadata
    assert report["config"].startswith("ModelInfer (oip)")
    assert row["mismatches"] == 0
    assert row["ok"] > 0 and row["ok"] + row["errors"] == row["sent"] >= 40
    assert row["error_codes"] == {"INVALID_ARGUMENT": row["errors"]}  # the wrong-shape kind
    s = settled_counts(address)
    ok = value(s, "lossd_requests_total", method="ModelInfer", code="OK", device="cpu")
    bad = value(s, "lossd_requests_total", method="ModelInfer", code="INVALID_ARGUMENT",
                device="none")
    assert ok + bad == row["sent"] + row["warmup_calls"]
    assert value(s, "lossd_requests_total", method="Evaluate", code="OK", device="cpu") == 0


def test_oip_protocol_bad_combinations(tmp_path) -> None:
    for bad, part in ((["--protocol=oip", "--rpc=stream"], "--protocol=oip"),
                      (["--protocol=oip", "--baselines=echo"], "--protocol=oip"),
                      (["--protocol=kserve"], "--protocol=kserve")):
        p = subprocess.run([str(bench_binary()), *bad], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2, (bad, p.stderr)
        assert part in p.stderr, (bad, p.stderr)


def test_python_baseline_is_measured_beside_lossd(tmp_path) -> None:
    report = run_bench(tmp_path, f"--lossd_binary={lossd_binary()}", "--concurrency=2",
                       "--warmup=0.2s", "--duration=0.4s", "--rounds=1", "--elements=1k",
                       "--baselines=echo,python", f"--python={sys.executable}")
    assert [r["server"] for r in report["rows"]] == ["lossd", "echo", "python"]
    for r in report["rows"]:
        assert r["errors"] == 0 and r["ok"] > 0, r
    assert "lossd/python" in report["_stdout"]


def test_python_baseline_computes_the_loss(tmp_path) -> None:
    """The python baseline answers real Evaluate calls: its float32 results are those of the
    float64 reference within float32 evaluation error (it is not held to lossd's bounds)."""
    import grpc
    import numpy as np
    from bce_reference import bce_reference
    from lossd._proto.lossd.v1 import lossd_pb2 as pb
    from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

    script = Path(__file__).resolve().parents[2] / "tools" / "bench" / "python_server.py"
    p = subprocess.Popen([sys.executable, str(script), "--port=0"], stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stderr.readline()
        m = re.search(r"listening on ([^\s]+)", line)
        assert m, line
        stub = pb_grpc.LossServiceStub(grpc.insecure_channel(m.group(1)))
        rng = np.random.default_rng(7)
        x = rng.uniform(-20, 20, (8, 64)).astype(np.float32)
        y = rng.random((8, 64)).astype(np.float32)
        w = rng.uniform(0, 2, (8, 64)).astype(np.float32)
        pw = rng.uniform(0.5, 3, (64,)).astype(np.float32)

        def t(a):
            return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())

        for name, red in (("none", pb.REDUCTION_NONE), ("mean", pb.REDUCTION_MEAN),
                          ("sum", pb.REDUCTION_SUM)):
            req = pb.EvaluateRequest(logits=t(x), targets=t(y), weight=t(w), reduction=red,
                                     bce_with_logits=pb.BceWithLogits(pos_weight=t(pw)))
            req.gradients.logits = True
            req.gradients.targets = True
            r = stub.Evaluate(req, timeout=30)
            ref = bce_reference(x, y, w, pw, name)
            for got, want, scale in ((r.loss, ref.loss, ref.loss_scale),
                                     (r.grad_logits, ref.grad, ref.grad_scale),
                                     (r.grad_targets, ref.grad_targets, ref.grad_targets_scale)):
                g = np.frombuffer(got.data, np.float32).reshape(np.shape(want))
                assert np.all(np.abs(g - want) <= 1e-4 * np.maximum(scale, 1e-30)), name
    finally:
        p.terminate()
        p.wait(timeout=10)
