"""End-to-end hardening checks against the real binary over real sockets: no accepted call is
lost when the server drains in the middle of uploads, unparseable requests are answered,
counted and logged within bounds, and an over-limit message is dropped before it is buffered
whole."""

from __future__ import annotations

import re
import signal
import threading
import time
from typing import Dict

import grpc
import numpy as np

from lossd._proto.lossd.v1 import lossd_pb2 as pb

from helpers import metrics_address, scrape, value

EVALUATE = "/lossd.v1.LossService/Evaluate"
_MAX = 512 << 20


def _raw_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", _MAX),
                                                  ("grpc.max_receive_message_length", _MAX)])


def _request(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype("<f4")
    y = (rng.random(n) < 0.5).astype("<f4")
    return pb.EvaluateRequest(
        logits=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=x.tobytes()),
        targets=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=y.tobytes()),
        bce_with_logits=pb.BceWithLogits(), reduction=pb.REDUCTION_MEAN,
        gradients=pb.GradientRequest(logits=True), request_id=f"drain-{seed}").SerializeToString()


def _vm(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def test_drain_answers_every_accepted_call(server_factory) -> None:
    """SIGTERM while 16 clients upload 32 MB requests: every call completes or gets
    UNAVAILABLE (which clients retry); none is CANCELLED, and the server exits 0."""
    server = server_factory("--drain_timeout", "60s", "--workers", "2")
    clients = 16
    payload = [_request(4 << 20, seed) for seed in range(clients)]  # 32 MiB of tensors each
    codes: Dict[int, str] = {}
    started = threading.Barrier(clients + 1)

    def call(i: int) -> None:
        channel = _raw_channel(server.target)
        try:
            stub = channel.unary_unary(EVALUATE)
            started.wait()
            try:
                reply = pb.EvaluateResponse.FromString(stub(payload[i], timeout=120))
                assert reply.num_elements == 4 << 20 and reply.request_id == f"drain-{i}"
                codes[i] = "OK"
            except grpc.RpcError as e:
                codes[i] = e.code().name
        finally:
            channel.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    rss0 = _vm(server.proc.pid, "VmRSS")
    started.wait()
    # 512 MiB are on their way over loopback: signal once the server holds 64 MiB of them,
    # while most of it is still arriving.
    deadline = time.monotonic() + 60
    while _vm(server.proc.pid, "VmRSS") - rss0 < 64 << 20 and time.monotonic() < deadline:
        time.sleep(0.002)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(180)
    rc = server.proc.wait(120)
    assert rc == 0, server.stderr_text()
    assert len(codes) == clients, codes
    unexpected = {i: c for i, c in codes.items() if c not in ("OK", "UNAVAILABLE")}
    assert not unexpected, f"calls lost at shutdown: {unexpected}\n{server.stderr_text()}"
    # The signal landed mid-upload: gRPC held calls that no handler had yet.
    m = [re.search(r"draining: (\d+) calls being handled, (\d+) open in gRPC", line)
         for line in server.lines]
    handled, open_ = next((int(x.group(1)), int(x.group(2))) for x in m if x)
    assert open_ > handled, server.stderr_text()
    assert any("drained:" in line for line in server.lines), server.stderr_text()


def test_unparseable_requests_are_answered_counted_and_rate_limited(server_factory) -> None:
    """Malformed bytes and a non-UTF-8 request_id: INVALID_ARGUMENT with a message, counted in
    lossd_requests_total, and at most the log's burst of lines per second."""
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    good = pb.EvaluateRequest(
        logits=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 8),
        targets=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 8),
        bce_with_logits=pb.BceWithLogits(), request_id="ok").SerializeToString()
    bad_utf8 = good.replace(b"\x0a\x02ok", b"\x0a\x02\xff\xfe")
    assert bad_utf8 != good
    garbage = b"\x0a\xff\x01\x00"
    channel = _raw_channel(server.target)
    stub = channel.unary_unary(EVALUATE)
    sent = 0
    begin = time.monotonic()
    for payload in [bad_utf8] * 300 + [garbage] * 300:
        try:
            stub(payload, timeout=10)
            raise AssertionError("a malformed request was answered OK")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert "do not parse as lossd.v1.EvaluateRequest" in e.details(), e.details()
            if payload is bad_utf8:
                assert "UTF-8" in e.details(), e.details()
        sent += 1
    elapsed = time.monotonic() - begin
    channel.close()
    s = scrape(metrics_address(server))
    assert value(s, "lossd_requests_total", method="Evaluate", code="INVALID_ARGUMENT",
                 device="none") == sent
    time.sleep(0.2)
    lines = [line for line in server.lines if "Evaluate failed" in line or "protobuf" in line]
    # 50 lines per second at most (log.h), over the seconds the test spanned.
    assert 0 < len(lines) <= 50 * (int(elapsed) + 2), (len(lines), elapsed)
    assert len(lines) < sent


def test_over_limit_message_is_dropped_before_it_is_buffered(server_factory) -> None:
    """A 256 MiB message against a 1 MiB limit: RESOURCE_EXHAUSTED, and with a 32 MiB memory
    budget (which also sizes gRPC's resource quota) the server never holds the whole message."""
    server = server_factory("--max_message_bytes", str(1 << 20),
                            "--max_inflight_bytes", str(32 << 20))
    pid = server.proc.pid
    before = _vm(pid, "VmHWM")
    channel = _raw_channel(server.target)
    payload = b"\x0a\x80\x80\x80\x80\x01" + b"\0" * (256 << 20)  # logits: a 256 MiB field
    try:
        channel.unary_unary(EVALUATE)(payload, timeout=60)
        raise AssertionError("an over-limit message was answered OK")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    finally:
        channel.close()
    peak = _vm(pid, "VmHWM")
    assert peak - before < 128 << 20, f"peak RSS grew by {(peak - before) >> 20} MiB"
    # Still serving.
    with _raw_channel(server.target) as ok_channel:
        reply = pb.EvaluateResponse.FromString(
            ok_channel.unary_unary(EVALUATE)(_request(1000, 1), timeout=30))
        assert reply.num_elements == 1000
