"""End-to-end: each failure reaches the caller as the LossdError subclass of its status code,
and the security options (bearer token, TLS, mutual TLS) work against the real server."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

import lossd

from helpers import make_certificates


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slow_inputs(n: int = 4_000_000):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    return x, (x > 0).astype(np.float32)


def test_invalid_argument(client) -> None:
    with pytest.raises(lossd.InvalidArgumentError) as info:
        client.sigmoid_focal_loss(np.zeros((2, 3)), np.zeros((3, 2)))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "[3,2]" in info.value.details and "[2,3]" in info.value.details


def test_failed_precondition_unary_and_split(client, lossd_target) -> None:
    with pytest.raises(lossd.FailedPreconditionError, match="(?i)cuda"):
        client.sigmoid_focal_loss(np.zeros(3), np.zeros(3), device="cuda")
    with lossd.Client(lossd_target, max_message_bytes=32 * 1024) as small:
        x = np.zeros((100, 100))
        with pytest.raises(lossd.FailedPreconditionError, match="chunk 0"):
            small.bce_with_logits(x, x, reduction="none", device="cuda")
        with pytest.raises(lossd.FailedPreconditionError):
            small.bce_with_logits(x, x, reduction="mean", device="cuda")


def test_resource_exhausted_when_the_queue_is_full(server_factory) -> None:
    server = server_factory("--workers", "1", "--queue_capacity", "1", "--cpu_threads", "1")
    x, y = _slow_inputs()
    outcomes: list = []
    lock = threading.Lock()
    calls = 8
    start = threading.Barrier(calls)

    def call(c) -> None:
        start.wait()
        try:
            c.sigmoid_focal_loss(x, y, reduction="sum", timeout=60)
            result = "ok"
        except lossd.LossdError as exc:
            result = exc
        with lock:
            outcomes.append(result)

    with lossd.Client(server.target) as c:
        threads = [threading.Thread(target=call, args=(c,)) for _ in range(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        errors = [o for o in outcomes if o != "ok"]
        assert len(outcomes) == calls
        # One computes, one waits, the others arrive while both places are taken (a few
        # may arrive after a place frees up: how many depends on timing).
        assert outcomes.count("ok") >= 1, outcomes
        assert errors and all(isinstance(e, lossd.ResourceExhaustedError) for e in errors)
        assert all("queue is full" in e.details for e in errors), errors
        assert c.health() == "SERVING"


def test_resource_exhausted_for_too_many_elements(server_factory) -> None:
    server = server_factory("--max_elements", "1000")
    with lossd.Client(server.target) as c:
        with pytest.raises(lossd.ResourceExhaustedError, match="1001"):
            c.bce_with_logits(np.zeros(1001), np.zeros(1001))
        with pytest.raises(lossd.ResourceExhaustedError, match="batch 1"):
            c.accumulate([(np.zeros(10), np.zeros(10)), (np.zeros(1001), np.zeros(1001))])


def test_deadline_exceeded_stops_a_slow_request(server_factory) -> None:
    server = server_factory("--cpu_threads", "1")
    x, y = _slow_inputs()
    with lossd.Client(server.target) as c:
        t0 = time.monotonic()
        with pytest.raises(lossd.DeadlineExceededError) as info:
            c.sigmoid_focal_loss(x, y, grad=True, timeout=0.05)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 5
        # The server is free again at once (the abandoned work stopped).
        r = c.bce_with_logits(x[:10], y[:10], reduction="sum", timeout=10)
        assert np.isfinite(r.loss)


def test_unavailable_when_nothing_listens() -> None:
    t0 = time.monotonic()
    with lossd.Client(f"127.0.0.1:{_free_port()}", timeout=10) as c:
        with pytest.raises(lossd.UnavailableError) as info:
            c.bce_with_logits(np.zeros(3), np.zeros(3))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < 9  # retries with backoff, then gives up before the deadline
    with lossd.Client(f"127.0.0.1:{_free_port()}", retry=None, timeout=5) as c:
        with pytest.raises(lossd.UnavailableError):
            c.accumulate([(np.zeros(3), np.zeros(3))])


def test_unauthenticated_and_tokens(server_factory, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("let-me-in\n")
    server = server_factory("--auth_token_file", str(token_file))
    x = np.zeros((4, 3))
    with lossd.Client(server.target) as anonymous:
        with pytest.raises(lossd.UnauthenticatedError, match="authorization"):
            anonymous.bce_with_logits(x, x)
        with pytest.raises(lossd.UnauthenticatedError):
            anonymous.accumulate([(x, x)])
        assert anonymous.health() == "SERVING"  # health stays open
    with lossd.Client(server.target, token="wrong") as c:
        with pytest.raises(lossd.UnauthenticatedError, match="invalid bearer token"):
            c.capabilities()
    with lossd.Client(server.target, token="let-me-in", max_message_bytes=1024) as c:
        assert c.bce_with_logits(x, x).loss.shape == ()
        assert c.bce_with_logits(np.zeros((100, 4)), np.zeros((100, 4)),
                                 reduction="none").loss.shape == (100, 4)  # stream
        assert c.accumulate([(x, x)]).num_elements == 12


# ---------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("tls"), "lossd-test-ca")


def test_tls(server_factory, certs) -> None:
    server = server_factory("--tls_cert", str(certs / "server.crt"), "--tls_key",
                            str(certs / "server.key"))
    port = server.target.rsplit(":", 1)[1]
    with lossd.Client(f"localhost:{port}", root_certificates=certs / "ca.crt") as c:
        assert c.bce_with_logits([0.0], [1.0]).loss.shape == ()
    pem = (certs / "ca.crt").read_bytes()
    with lossd.Client(f"127.0.0.1:{port}", root_certificates=pem) as c:
        assert c.health() == "SERVING"
    with lossd.Client(f"127.0.0.1:{port}", retry=None, timeout=5) as plaintext:
        with pytest.raises(lossd.UnavailableError):
            plaintext.capabilities()


def test_mutual_tls(server_factory, certs) -> None:
    server = server_factory("--tls_cert", str(certs / "server.crt"), "--tls_key",
                            str(certs / "server.key"), "--tls_client_ca", str(certs / "ca.crt"))
    port = server.target.rsplit(":", 1)[1]
    with lossd.Client(f"localhost:{port}", root_certificates=certs / "ca.crt",
                      private_key=certs / "client.key",
                      certificate_chain=certs / "client.crt") as c:
        assert c.bce_with_logits([0.0], [1.0]).loss.shape == ()
    with lossd.Client(f"localhost:{port}", root_certificates=certs / "ca.crt", retry=None,
                      timeout=5) as no_cert:
        with pytest.raises(lossd.UnavailableError):
            no_cert.capabilities()
