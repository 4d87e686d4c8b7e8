"""End-to-end: lossd-bench's own HTTP/2 transport (--transport=h2, client/loadtest/h2_transport.h)
against a real lossd and the echo and raw baselines over real sockets. As in
test_lossd_bench_e2e.py, its reports are checked against independent counts: lossd's
Prometheus request counters and the exact number of calls a fixed-rate schedule sends; replies
are checked against the float64 reference with --verify. Nothing here asserts a speed or a
duration.

lossd-bench is found beside the server under test (lossd_bench_helpers.py)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import lossd_binary, start_server
from helpers import metrics_address, settled_counts, value
from lossd_bench_helpers import (baseline_server, bench_binary,
                                 interrupt_after_successful_calls, run_bench)

H2 = "--transport=h2"
SHORT = ("--concurrency=1", "--warmup=0.1s", "--requests=30", "--rounds=1", "--elements=256")


def server_counts(server) -> tuple:
    s = settled_counts(metrics_address(server))
    total = "lossd_requests_total"
    return (value(s, total, method="Evaluate", code="OK", device="cpu"),
            value(s, total, method="Evaluate", code="INVALID_ARGUMENT", device="none"))


def assert_counts_match_the_server(server, rows) -> None:
    """Every call lossd counted is a measured or a warm-up call of the report, and the
    measured ones land in OK and INVALID_ARGUMENT exactly as lossd counted them."""
    server_ok, server_bad = server_counts(server)
    sent = sum(r["sent"] for r in rows)
    warm = sum(r["warmup_calls"] for r in rows)
    ok = sum(r["ok"] for r in rows)
    bad = sum(r["errors"] for r in rows)
    assert server_ok + server_bad == sent + warm
    assert ok <= server_ok and bad <= server_bad
    assert (server_ok - ok) + (server_bad - bad) == warm


@pytest.mark.parametrize("threads,extra", [(1, ()), (2, ()), (3, ("--shared_channel",))])
def test_closed_loop_counts_match_the_server(server_factory, tmp_path, threads, extra) -> None:
    """Closed loop over h2: four callers on one poller thread, on two, and on one shared
    connection; every OK and every refused call (the badshape kind) is counted once, as lossd
    counted it, and the server's timing is read from each reply."""
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    report = run_bench(tmp_path, f"--target={server.target}", H2, "--concurrency=4",
                       f"--client_threads={threads}", *extra, "--warmup=0.2s",
                       "--requests=400", "--rounds=1", "--mix=0.6:64,0.4:64:badshape",
                       "--stop_errors=0.9")
    assert "h2 transport" in report["config"]
    [row] = report["rows"]
    assert row["server"].startswith("lossd ")  # named by GetCapabilities
    assert row["load"] == "closed" and row["concurrency"] == 4
    assert row["ok"] + row["errors"] == row["sent"] >= 400
    assert row["ok"] > 0 and row["errors"] > 0
    assert row["error_codes"] == {"INVALID_ARGUMENT": row["errors"]}
    assert row["server_us"]["total_p50"] > 0
    assert row["warmup_calls"] > 0
    assert row["qps"] == pytest.approx(row["ok"] / row["seconds"], rel=1e-4)
    assert_counts_match_the_server(server, [row])


def test_the_servers_stream_limit_is_respected(server_factory, tmp_path) -> None:
    """Eight callers on one connection to a server that allows two streams at a time: the
    calls past the limit wait for a free stream (none is refused), and all succeed."""
    server = server_factory("--max_concurrent_streams", "2", "--metrics_port", "0",
                            "--metrics_host", "127.0.0.1")
    report = run_bench(tmp_path, f"--target={server.target}", H2, "--concurrency=8",
                       "--shared_channel", "--warmup=0.1s", "--requests=300", "--rounds=1",
                       "--elements=256")
    [row] = report["rows"]
    assert row["errors"] == 0 and row["ok"] == row["sent"] >= 300
    assert_counts_match_the_server(server, [row])


@pytest.mark.parametrize("load", [("--concurrency=4",),
                                  ("--rps=300", "--arrivals=fixed", "--channels=2")])
def test_connections_the_server_closes_gracefully_lose_no_call(server_factory, tmp_path,
                                                               load) -> None:
    """lossd ends each connection after 300 ms (GOAWAY, max_connection_age): the calls in
    flight finish on the old connection, the next ones go to a new one, none fails."""
    server = server_factory("--max_connection_age", "300ms", "--max_connection_age_grace",
                            "30s", "--metrics_port", "0", "--metrics_host", "127.0.0.1")
    report = run_bench(tmp_path, f"--target={server.target}", H2, *load, "--warmup=0.1s",
                       "--duration=1.5s", "--rounds=1", "--elements=1k", "--stop_errors=1")
    [row] = report["rows"]
    assert row["errors"] == 0, row["error_codes"]
    assert row["ok"] == row["sent"] > 0
    assert_counts_match_the_server(server, [row])


@pytest.mark.parametrize("arrivals", ["fixed", "poisson"])
def test_open_loop_counts_match_the_server(server_factory, tmp_path, arrivals) -> None:
    """Open loop over h2: calls handed from the sender thread to two poller threads, each
    owning one of two connections. At 200 calls/s evenly spaced the measured second holds
    exactly 200 arrivals and the 0.3 s warm-up 60 (k * 5 ms, k = 0..59)."""
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    report = run_bench(tmp_path, f"--target={server.target}", H2, "--rps=200",
                       f"--arrivals={arrivals}", "--channels=2", "--client_threads=2",
                       "--warmup=0.3s", "--duration=1s", "--rounds=1",
                       "--mix=0.7:256,0.3:256:badshape", "--stop_errors=0.9")
    [row] = report["rows"]
    assert row["load"] == f"open-{arrivals}" and row["rate"] == 200
    if arrivals == "fixed":
        assert row["sent"] == 200
        assert row["warmup_calls"] == 60
    assert row["ok"] + row["errors"] == row["sent"] > 0
    assert row["ok"] > 0 and row["errors"] > 0
    assert row["error_codes"] == {"INVALID_ARGUMENT": row["errors"]}
    assert_counts_match_the_server(server, [row])


def test_deadline_failures_are_counted(server_factory, tmp_path) -> None:
    """1 ms deadlines on 1M-element requests (8 MB, longer than that to send): the client's
    timer resets each stream and counts DEADLINE_EXCEEDED, closed and open loop."""
    server = server_factory()
    for load in (("--concurrency=2",), ("--rps=100", "--arrivals=fixed", "--channels=2",
                                        "--client_threads=2")):
        report = run_bench(tmp_path, f"--target={server.target}", H2, *load, "--deadline=1ms",
                           "--warmup=0.1s", "--duration=0.5s", "--rounds=1", "--elements=1M",
                           "--stop_errors=1")
        [row] = report["rows"]
        assert row["ok"] == 0 and row["sent"] == row["errors"] > 0
        assert row["error_codes"] == {"DEADLINE_EXCEEDED": row["errors"]}
    # A deadline long enough: the same calls succeed (the grpc-timeout header is well formed).
    report = run_bench(tmp_path, f"--target={server.target}", H2, "--concurrency=2",
                       "--deadline=60s", "--warmup=0s", "--requests=20", "--rounds=1",
                       "--elements=1k")
    [row] = report["rows"]
    assert row["errors"] == 0 and row["ok"] == row["sent"] >= 20
    # The calls reset while their request was arriving are not left open: the drain ends as
    # soon as nothing is in flight, far within its 30 s deadline (gRPC's own call count keeps
    # such calls "started" forever; lossd counts the streams of live connections instead).
    assert server.stop(timeout=10) == 0


def test_a_host_name_is_resolved(server_factory, tmp_path) -> None:
    server = server_factory()
    port = server.target.rsplit(":", 1)[1]
    report = run_bench(tmp_path, f"--target=localhost:{port}", H2, *SHORT)
    [row] = report["rows"]
    assert row["server"].startswith("lossd ")
    assert row["errors"] == 0 and row["ok"] == row["sent"] >= 30


def test_unix_socket_target_verifies(server_factory, tmp_path) -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))
    try:
        path = socket_dir / "lossd.sock"
        server_factory("--unix_socket", str(path))
        report = run_bench(tmp_path, f"--target=unix:{path}", H2, *SHORT, "--verify")
        [row] = report["rows"]
        assert row["server"].startswith("lossd ")
        assert row["errors"] == 0 and row["ok"] == row["sent"] >= 30
        assert row["error_codes"] == {} and row["mismatches"] == 0
        assert report["servers"][0]["target"] == f"unix:{path}"
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_lossd_and_baselines_verify(tmp_path) -> None:
    """lossd with the echo and raw baselines started here, all over h2: lossd's replies pass
    --verify (outputs and gradients against the float64 reference), the echo's parse, and the
    raw server sends the reply size its x-reply-bytes metadata asks for (MB/s counts it)."""
    report = run_bench(tmp_path, f"--lossd_binary={lossd_binary()}", H2, "--concurrency=2",
                       "--warmup=0.1s", "--requests=200", "--rounds=2", "--elements=1k",
                       "--verify", "--grad=both", "--weight")
    names = [r["server"] for r in report["rows"]]
    assert names == ["lossd", "echo", "raw"]
    for r in report["rows"]:
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["ok"] == r["sent"] >= 400, r
        assert r["mb_per_s"] > 0
    lossd, echo, raw = report["rows"]
    # The raw server's reply is as large as the echo's: bytes per call agree within the
    # requests' framing.
    per_call = [r["mb_per_s"] / r["qps"] for r in report["rows"]]
    assert per_call[2] == pytest.approx(per_call[1], rel=0.01)
    assert lossd["server_us"]["total_p50"] > 0
    assert "lossd/echo" in report["_stdout"]


def test_a_million_elements_per_call(server_factory, tmp_path) -> None:
    """Requests and replies of several MB (1M float32 logits and targets; the loss and the
    gradient back): many DATA frames each way under the server's flow control and ours."""
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    report = run_bench(tmp_path, f"--target={server.target}", H2, "--concurrency=2",
                       "--warmup=0s", "--requests=6", "--rounds=1", "--elements=1M",
                       "--verify")
    [row] = report["rows"]
    assert row["errors"] == 0 and row["mismatches"] == 0 and row["ok"] == row["sent"] >= 6
    # 8 MB in and 8 MB out per call at least.
    assert row["mb_per_s"] / row["qps"] >= 16
    assert_counts_match_the_server(server, [row])


@pytest.mark.parametrize("load", [("--concurrency=3",),
                                  ("--rps=200", "--arrivals=fixed", "--shared_memory_slots=2")])
def test_shared_memory_calls_verify(server_factory, tmp_path, load) -> None:
    """--shared_memory over h2: the requests name the region's tensors, the outputs land in
    the call's slot and --verify reads them from there; counts match the server's."""
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    report = run_bench(tmp_path, f"--target={server.target}", H2, "--shared_memory", "--verify",
                       *load, "--warmup=0.3s", "--duration=1s", "--rounds=1", "--grad=both",
                       "--reduction=none", "--mix=0.8:3000,0.2:3000:badshape",
                       "--stop_errors=0.9")
    assert "shared memory" in report["config"]
    [row] = report["rows"]
    assert row["mismatches"] == 0, row
    assert row["ok"] > 0 and row["ok"] + row["errors"] == row["sent"]
    assert row["error_codes"] == {"INVALID_ARGUMENT": row["errors"]}
    if load[0].startswith("--rps"):
        assert row["sent"] == 200 and row["warmup_calls"] == 60
    assert_counts_match_the_server(server, [row])


def test_oip_model_infer_counts_and_verifies(server_factory, tmp_path) -> None:
    """--protocol=oip over h2: unary ModelInfer calls on the same path, checked as the
    EvaluateResponse they stand for and counted as lossd counted them."""
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    report = run_bench(tmp_path, f"--target={server.target}", H2, "--protocol=oip",
                       "--grad=both", "--weight", "--reduction=none", "--verify",
                       "--concurrency=2", "--warmup=0.1s", "--requests=40", "--rounds=1",
                       "--mix=0.8:1k,0.2:1k:badshape", "--stop_errors=0.9")
    [row] = report["rows"]
    assert row["server"].endswith("(oip)")
    assert row["mismatches"] == 0
    assert row["ok"] > 0 and row["ok"] + row["errors"] == row["sent"] >= 40
    assert row["error_codes"] == {"INVALID_ARGUMENT": row["errors"]}
    s = settled_counts(metrics_address(server))
    ok = value(s, "lossd_requests_total", method="ModelInfer", code="OK", device="cpu")
    bad = value(s, "lossd_requests_total", method="ModelInfer", code="INVALID_ARGUMENT",
                device="none")
    assert ok + bad == row["sent"] + row["warmup_calls"]
    assert ok >= row["ok"] and bad >= row["errors"]


def test_echo_target_and_metadata(tmp_path) -> None:
    """The echo baseline as --target: its protobuf method over h2, with extra metadata."""
    with baseline_server("echo") as target:
        report = run_bench(tmp_path, f"--target={target}", "--target_service=echo", H2,
                           "--metadata=x-one=1,x-two=zwei", *SHORT)
    [row] = report["rows"]
    assert row["server"] == "echo"
    assert row["errors"] == 0 and row["ok"] == row["sent"] >= 30


def test_self_check_over_h2(tmp_path) -> None:
    """--self_check starts its tester processes with the same --transport."""
    report = run_bench(tmp_path, "--self_check", H2, "--concurrency=4", "--elements=16",
                       "--warmup=0.1s", "--duration=0.4s", "--rounds=1")
    assert "h2 transport" in report["config"]
    sc = report["self_check"]
    assert sc["server"] == "raw" and sc["errors"] == 0
    assert sc["one_process_qps"] > 0 and sc["two_processes_qps"] > 0


def test_bearer_token_as_metadata(server_factory, tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("let-me-in\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("let-me-out\n")
    server = server_factory("--auth_token_file", str(token))
    report = run_bench(tmp_path, f"--target={server.target}", H2, f"--token_file={token}",
                       *SHORT)
    [row] = report["rows"]
    assert row["errors"] == 0 and row["ok"] >= 30
    # The server's refusal arrives as a trailers-only response: counted by its grpc-status.
    report = run_bench(tmp_path, f"--target={server.target}", H2, f"--token_file={wrong}",
                       *SHORT)
    [row] = report["rows"]
    assert row["ok"] == 0
    assert row["error_codes"] == {"UNAUTHENTICATED": row["errors"]}
    assert row["sent"] == row["errors"] >= 30


def test_a_server_that_is_not_there_fails_every_call(tmp_path) -> None:
    """Nothing listens on the port: every call fails UNAVAILABLE, none counts as a success."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the run: refused connections
    report = run_bench(tmp_path, f"--target=127.0.0.1:{port}", H2, "--concurrency=2",
                       "--warmup=0s", "--duration=0.3s", "--rounds=1", "--elements=256",
                       "--stop_errors=1")
    [row] = report["rows"]
    assert row["ok"] == 0 and row["sent"] == row["errors"] > 0
    assert row["error_codes"] == {"UNAVAILABLE": row["errors"]}


def test_a_server_that_dies_fails_the_calls_not_the_successes(tmp_path) -> None:
    """lossd is killed while the calls run: the calls in flight and every later one (the
    connection is dialled again and refused) count as UNAVAILABLE, the earlier ones as OK."""
    server = start_server()
    out = tmp_path / "report.json"
    cmd = [str(bench_binary()), f"--target={server.target}", H2, f"--json={out}",
           "--concurrency=4", "--warmup=0s", "--duration=3s", "--rounds=1", "--elements=4k",
           "--stop_errors=1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = interrupt_after_successful_calls(p, while_running=server.kill,
                                                          interrupt=False)
    finally:
        server.kill()
    assert p.returncode == 0, (stdout, stderr)
    [row] = json.loads(out.read_text())["rows"]
    assert row["ok"] > 0 and row["errors"] > 0
    assert row["ok"] + row["errors"] == row["sent"]
    assert set(row["error_codes"]) == {"UNAVAILABLE"}, row["error_codes"]


def test_sigint_resets_the_streams_and_prints_what_was_measured(server_factory,
                                                                 tmp_path) -> None:
    server = server_factory()
    out = tmp_path / "report.json"
    cmd = [str(bench_binary()), f"--target={server.target}", H2, f"--json={out}",
           "--concurrency=1:4:x2", "--warmup=0.1s", "--duration=60s", "--rounds=1",
           "--elements=256"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = interrupt_after_successful_calls(p)
    assert p.returncode == 130, (stdout, stderr)
    assert "interrupted (SIGINT)" in stdout
    report = json.loads(out.read_text())
    assert report["interrupted"] is True
    [row] = report["rows"]
    assert row["concurrency"] == 1
    assert row["ok"] > 0 and row["ok"] + row["errors"] == row["sent"]
    assert row["seconds"] < 60


@pytest.mark.parametrize("args,message", [
    (("--tls",), "plaintext HTTP/2 only"),
    (("--tls_ca=/nonexistent.pem",), "plaintext HTTP/2 only"),
    (("--rpc=stream",), "--rpc=stream needs --transport=grpc"),
    (("--rpc=accumulate", "--reduction=sum"), "--rpc=accumulate needs --transport=grpc"),
    (("--target=127.0.0.1:1,127.0.0.1:2",), "several --target addresses"),
    (("--target=127.0.0.1:1", "--lb_policy=round_robin"), "--lb_policy=round_robin"),
    (("--transport=h3",), "--transport=h3: expected one of grpc, h2"),
])
def test_unsupported_combinations_are_refused(tmp_path, args, message) -> None:
    cmd = [str(bench_binary()), *(a for a in (H2,) if not any(x.startswith("--transport")
                                                              for x in args)), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr, p.stderr


def test_a_target_h2_cannot_parse_is_refused(tmp_path) -> None:
    p = subprocess.run([str(bench_binary()), H2, "--target=xds:///lossd", "--requests=1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert 'target "xds:///lossd"' in p.stderr and "unsupported scheme" in p.stderr, p.stderr
