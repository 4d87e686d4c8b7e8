"""The client against an in-process fake server: what goes on the wire, what comes back,
and how RPC failures are converted. No lossd binary needed."""

from __future__ import annotations

import socket
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

import lossd
from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None


class FakeService(pb_grpc.LossServiceServicer):
    """Records requests; replies with logits echoed as loss/grad, or aborts as told.

    ``unavailable`` makes that many Evaluate attempts fail with UNAVAILABLE first (for the
    retry policy); ``metadata`` keeps the invocation metadata of the last call.
    """

    def __init__(self) -> None:
        self.requests: list = []
        self.abort: tuple | None = None
        self.delay = threading.Event()
        self.reply: pb.EvaluateResponse | None = None
        self.unavailable = 0
        self.attempts = 0
        self.metadata: dict = {}
        self.whole_requests = True

    def Evaluate(self, request, context):
        self.attempts += 1
        self.metadata = dict(context.invocation_metadata())
        if self.unavailable > 0:
            self.unavailable -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        self.requests.append(request)
        if self.abort is not None:
            context.abort(*self.abort)
        if self.reply is not None:
            return self.reply
        scalar = request.reduction != pb.REDUCTION_NONE
        loss = pb.Tensor(dtype=request.logits.dtype, shape=[] if scalar else request.logits.shape,
                         data=request.logits.data[: (len(request.logits.data) and
                                                     _itemsize(request.logits.dtype))]
                         if scalar else request.logits.data)
        resp = pb.EvaluateResponse(request_id=request.request_id, loss=loss,
                                   device=pb.DEVICE_CPU, num_elements=7,
                                   timing=pb.Timing(queue_ns=1, compute_ns=2, total_ns=3))
        if request.gradients.logits:
            resp.grad_logits.CopyFrom(request.logits)
        if request.gradients.targets:
            resp.grad_targets.CopyFrom(request.targets)
        return resp

    def EvaluateStream(self, request_iterator, context):
        for request in request_iterator:
            if request.reject_nan:  # stands for "this batch fails"
                yield pb.EvaluateStreamResponse(
                    request_id=request.request_id,
                    error=pb.BatchError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                        message="logits contains NaN"))
                continue
            saved, self.abort, self.reply = (self.abort, self.reply), None, None
            resp = self.Evaluate(request, context)
            self.abort, self.reply = saved
            yield pb.EvaluateStreamResponse(request_id=request.request_id, response=resp)

    def Accumulate(self, request_iterator, context):
        n = batches = 0
        for request in request_iterator:
            self.requests.append(request)
            n += int(np.prod(request.logits.shape))
            batches += 1
        return pb.AccumulateResponse(loss=float(n), num_elements=n, num_batches=batches,
                                     reduction=pb.REDUCTION_SUM, device=pb.DEVICE_CPU)

    def GetCapabilities(self, request, context):
        return pb.Capabilities(
            server_version="fake-1", losses=["bce_with_logits"],
            dtypes=[pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16], devices=[pb.DEVICE_CPU],
            reductions=[pb.REDUCTION_NONE, pb.REDUCTION_MEAN, pb.REDUCTION_SUM],
            max_message_bytes=1 << 28, max_elements=1 << 28,
            whole_requests=self.whole_requests)


def _itemsize(dtype: int) -> int:
    return {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT64: 8}.get(dtype, 2)


def _health_handler(status: int):
    def check(request: bytes, context) -> bytes:
        if request not in (b"", b"\x0a\x14lossd.v1.LossService"):
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return b"\x08" + bytes([status])

    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check)})


@pytest.fixture(scope="module")
def fake():
    service = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_LossServiceServicer_to_server(service, server)
    server.add_generic_rpc_handlers((_health_handler(1),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with lossd.Client(f"127.0.0.1:{port}", timeout=10) as client:
        yield service, client
    server.stop(None)


@pytest.fixture()
def svc(fake):
    service, client = fake
    service.requests.clear()
    service.abort = None
    service.reply = None
    return service, client


def test_request_fields(svc) -> None:
    service, client = svc
    x = np.arange(28, dtype=np.float32).reshape(4, 7)
    y = np.zeros((4, 7), np.int64)
    r = client.bce_with_logits(x.T, y.T, weight=2.0, pos_weight=np.ones(4, np.float64),
                               reduction="none", grad=True, grad_targets=True,
                               device="cpu", reject_nan=True, request_id="abc")
    req = service.requests[-1]
    assert req.request_id == "abc"
    assert req.WhichOneof("loss") == "bce_with_logits"
    assert req.logits.dtype == pb.DTYPE_FLOAT32 and list(req.logits.shape) == [7, 4]
    assert req.logits.data == np.ascontiguousarray(x.T).tobytes()
    assert req.targets.dtype == pb.DTYPE_FLOAT32  # int64 targets take the logits' dtype
    assert req.weight.dtype == pb.DTYPE_FLOAT32 and list(req.weight.shape) == []
    assert np.frombuffer(req.weight.data, "<f4")[0] == 2.0
    assert req.bce_with_logits.pos_weight.dtype == pb.DTYPE_FLOAT64  # float arrays keep theirs
    assert req.reduction == pb.REDUCTION_NONE and req.device == pb.DEVICE_CPU
    assert req.gradients.logits and req.gradients.targets and req.reject_nan
    np.testing.assert_array_equal(r.loss, x.T)
    np.testing.assert_array_equal(r.grad, x.T)
    np.testing.assert_array_equal(r.grad_targets, np.zeros((7, 4)))
    assert r.loss.dtype == np.float32 and not r.loss.flags.writeable
    assert r.device == "cpu" and r.request_id == "abc" and r.num_elements == 7
    assert r.timing == lossd.Timing(queue_ns=1, compute_ns=2, total_ns=3)


def test_defaults_and_scalar_loss(svc) -> None:
    service, client = svc
    r = client.bce_with_logits([0.5, 1.5], [1, 0])
    req = service.requests[-1]
    assert req.reduction == pb.REDUCTION_MEAN and req.device == pb.DEVICE_AUTO
    assert not req.HasField("weight") and not req.bce_with_logits.HasField("pos_weight")
    assert req.HasField("bce_with_logits")
    assert not req.gradients.logits and not req.gradients.targets and not req.reject_nan
    assert len(req.request_id) == 32  # a generated uuid4 hex
    assert req.logits.dtype == pb.DTYPE_FLOAT64
    assert r.loss.shape == () and r.loss.dtype == np.float64
    assert r.grad is None and r.grad_targets is None


def test_explicit_wire_dtype(svc) -> None:
    service, client = svc
    x = np.array([1.0, 2.0 + 2.0**-9], np.float32)
    r = client.bce_with_logits(x, [1, 0], weight=np.float64(3.0), dtype="bfloat16",
                               reduction="none")
    req = service.requests[-1]
    for t in (req.logits, req.targets, req.weight):
        assert t.dtype == pb.DTYPE_BFLOAT16
    assert np.frombuffer(req.logits.data, "<u2").tolist() == [0x3F80, 0x4000]
    expected = np.array([1.0, 2.0], np.float32)
    if ml_dtypes is not None:
        assert r.loss.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(r.loss.astype(np.float32), expected)


def test_rpc_errors_are_converted(svc) -> None:
    service, client = svc
    service.abort = (grpc.StatusCode.INVALID_ARGUMENT,
                     "targets shape [4,8] != logits shape [4,7]")
    with pytest.raises(lossd.InvalidArgumentError) as info:
        client.bce_with_logits(np.zeros((4, 7), np.float32), np.zeros((4, 8), np.float32))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details == "targets shape [4,8] != logits shape [4,7]"
    assert "INVALID_ARGUMENT" in str(info.value) and "[4,8]" in str(info.value)
    service.abort = (grpc.StatusCode.FAILED_PRECONDITION, "no usable CUDA device")
    with pytest.raises(lossd.FailedPreconditionError):
        client.bce_with_logits([0.0], [1.0], device="cuda")
    service.abort = (grpc.StatusCode.CANCELLED, "gone")
    with pytest.raises(lossd.LossdError) as info2:
        client.bce_with_logits([0.0], [1.0])
    assert type(info2.value) is lossd.LossdError


def test_malformed_response_is_internal_error(svc) -> None:
    service, client = svc
    service.reply = pb.EvaluateResponse(loss=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3],
                                                       data=b"\0" * 8))
    with pytest.raises(lossd.InternalError, match="loss has 8 bytes, expected 12"):
        client.bce_with_logits([0.0], [1.0])


def test_requests_over_the_limit_are_split(fake) -> None:
    service, client = fake
    service.requests.clear()
    x = np.arange(1000, dtype=np.float32).reshape(100, 10)
    progress = []
    with lossd.Client(client.target, max_message_bytes=1024) as small:
        r = small.bce_with_logits(x, np.zeros_like(x), reduction="none", grad=True,
                                  request_id="big", progress=lambda d, t: progress.append(d))
    chunks = service.requests
    assert len(chunks) > 5
    assert all(len(c.SerializeToString()) <= 1024 for c in chunks)
    assert [c.request_id for c in chunks] == [f"big/{i}" for i in range(len(chunks))]
    assert sum(c.logits.shape[0] for c in chunks) == 100
    np.testing.assert_array_equal(r.loss, x)  # the fake echoes the logits
    np.testing.assert_array_equal(r.grad, x)
    assert r.loss.flags.writeable and progress[-1] == 1000 and len(progress) == len(chunks)
    # Every chunk tells the server the whole request's size, so it divides as for one request.
    assert all(c.HasField("whole") and c.whole.num_elements == 1000 for c in chunks)
    assert not any(c.whole.HasField("num_kept") for c in chunks)


def test_split_needs_a_server_that_divides_chunks_as_one(svc) -> None:
    service, client = svc
    service.whole_requests = False
    x = np.zeros((100, 10), np.float32)
    try:
        with lossd.Client(client.target, max_message_bytes=1024) as small:
            with pytest.raises(lossd.LossdError, match="whole_requests") as info:
                small.bce_with_logits(x, x, reduction="none")
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            # A request that fits is sent whole as before.
            small.bce_with_logits(x[:2], x[:2], reduction="none")
    finally:
        service.whole_requests = True
    assert len(service.requests) == 1


def test_split_batch_error_and_too_large_rows(fake) -> None:
    service, client = fake
    x = np.zeros((100, 10), np.float32)
    with lossd.Client(client.target, max_message_bytes=1024) as small:
        with pytest.raises(lossd.InvalidArgumentError, match=r"chunk 0 \(rows 0:\d+\): logits"):
            small.bce_with_logits(x, x, reduction="none", reject_nan=True)
        with pytest.raises(ValueError, match="max_message_bytes"):
            small.bce_with_logits(np.zeros((2, 1000), np.float32), np.zeros((2, 1000)),
                                  reduction="per_sample_mean")


def test_accumulate_over_an_iterable(svc) -> None:
    service, client = svc
    batches = [(np.zeros(3), np.ones(3)), {"logits": np.zeros((2, 2)), "targets": np.ones(4)
                                           .reshape(2, 2), "weight": 2.0}]
    seen = []
    r = client.accumulate(iter(batches), reduction="sum", pos_weight=[3.0],
                          progress=lambda d, t: seen.append((d, t)))
    assert r == lossd.AccumulateResult(loss=7.0, num_elements=7, num_batches=2, reduction="sum",
                                       device="cpu", timing=lossd.Timing())
    assert seen == [(3, None), (7, None)]
    first, second = service.requests
    assert first.reduction == pb.REDUCTION_SUM and not first.gradients.logits
    assert np.frombuffer(first.bce_with_logits.pos_weight.data, "<f8")[0] == 3.0
    assert second.HasField("weight")
    service.requests.clear()
    client.accumulate([], reduction="sum")
    assert len(service.requests) == 1 and list(service.requests[0].logits.shape) == [0]


def test_retries_unavailable(svc) -> None:
    service, client = svc
    service.unavailable, service.attempts = 2, 0
    r = client.bce_with_logits([0.0], [1.0])
    assert service.attempts == 3 and r.loss.shape == ()
    with lossd.Client(client.target, retry=None) as no_retry:
        service.unavailable, service.attempts = 1, 0
        with pytest.raises(lossd.UnavailableError, match="draining"):
            no_retry.bce_with_logits([0.0], [1.0])
        assert service.attempts == 1
    policy = lossd.RetryPolicy(max_attempts=2, initial_backoff=0.01)
    with lossd.Client(client.target, retry=policy) as two:
        service.unavailable, service.attempts = 5, 0
        with pytest.raises(lossd.UnavailableError):
            two.bce_with_logits([0.0], [1.0])
        assert service.attempts == 2
    service.unavailable = 0


def test_token_is_sent_as_bearer_metadata(svc) -> None:
    service, client = svc
    with lossd.Client(client.target, token="s3cret") as c:
        c.bce_with_logits([0.0], [1.0])
    assert service.metadata.get("authorization") == "Bearer s3cret"
    client.bce_with_logits([0.0], [1.0])
    assert "authorization" not in service.metadata
    with pytest.raises(ValueError, match="token"):
        lossd.Client(client.target, token="a\nb")


def test_list_of_addresses_round_robin(fake) -> None:
    _, client = fake
    port = client.target.rsplit(":", 1)[1]
    dead = _free_port()
    with lossd.Client([f"127.0.0.1:{dead}", f"127.0.0.1:{port}"], timeout=10) as c:
        assert c.target == f"127.0.0.1:{dead},127.0.0.1:{port}"
        for _ in range(5):  # round_robin picks only the reachable address
            assert c.bce_with_logits([0.0], [1.0]).loss.shape == ()
    with lossd.Client([f"localhost:{port}"]) as c:  # one address: used as is
        assert c.health() == "SERVING"
    with lossd.Client(f"dns:///localhost:{port}") as c:
        assert c.health() == "SERVING"


def test_torch_tensors_without_torch_installed_are_not_detected() -> None:
    from lossd._torch_interop import is_tensor
    assert not is_tensor(np.zeros(3))


def test_capabilities_and_health(fake) -> None:
    _, client = fake
    caps = client.capabilities()
    assert caps.server_version == "fake-1"
    assert caps.dtypes == ("float32", "bfloat16")
    assert caps.devices == ("cpu",)
    assert caps.reductions == ("none", "mean", "sum")
    assert caps.to_dict()["losses"] == ["bce_with_logits"]
    assert client.health() == "SERVING"
    assert client.health("lossd.v1.LossService") == "SERVING"
    with pytest.raises(lossd.LossdError) as info:
        client.health("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_unavailable() -> None:
    with lossd.Client(f"127.0.0.1:{_free_port()}", timeout=5) as client:
        with pytest.raises(lossd.UnavailableError) as info:
            client.capabilities()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_deadline_exceeded(svc) -> None:
    _, client = svc
    with pytest.raises(lossd.DeadlineExceededError):
        client.bce_with_logits(np.zeros(1 << 20, np.float32), np.zeros(1 << 20, np.float32),
                               timeout=1e-6)


def test_closed_client_fails(fake) -> None:
    _, client = fake
    c = lossd.Client(client.target)
    c.close()
    c.close()
    with pytest.raises((lossd.LossdError, ValueError)):
        c.capabilities()
