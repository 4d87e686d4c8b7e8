"""The hand-written protobuf codec (lossd._wire) against the generated message classes."""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest

import lossd
from lossd import _wire
from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._tensor import wire_array

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None


@pytest.fixture(params=["python", "generated"])
def codec(request, monkeypatch) -> str:
    """Runs a test with the pure-Python codec (large messages) and with the generated
    classes (small messages)."""
    monkeypatch.setattr(_wire, "SMALL_BYTES", 0 if request.param == "python" else 1 << 62)
    return request.param


def wt(array, code=None) -> _wire.WireTensor:
    c, data = wire_array(np.asarray(array), code)
    return _wire.WireTensor(c, tuple(np.shape(array)), data)


def pb_tensor(t: _wire.WireTensor) -> pb.Tensor:
    return pb.Tensor(dtype=t.code, shape=t.shape, data=t.data.tobytes())


OPTION_CASES = [
    _wire.RequestOptions(),
    _wire.RequestOptions(reduction=1, grad_logits=True, device=2, reject_nan=True),
    _wire.RequestOptions(reduction=4, grad_targets=True, ignore_index=-100, normalize=True,
                         label_smoothing=0.1),
    _wire.RequestOptions(reduction=3, ignore_index=0),
    _wire.RequestOptions(reduction=3, ignore_index=2**40),
    _wire.RequestOptions(loss="focal", reduction=1, grad_logits=True),
    _wire.RequestOptions(loss="focal", alpha=-1.0, gamma=0.0),
    _wire.RequestOptions(loss="focal", alpha=0.25, gamma=2.0, device=1),
]


def expected_request(rid, x, y, w, p, o: _wire.RequestOptions) -> pb.EvaluateRequest:
    req = pb.EvaluateRequest(request_id=rid, logits=pb_tensor(x), targets=pb_tensor(y),
                             reduction=o.reduction, device=o.device, reject_nan=o.reject_nan,
                             gradients=pb.GradientRequest(logits=o.grad_logits,
                                                          targets=o.grad_targets))
    if not (o.grad_logits or o.grad_targets):
        req.ClearField("gradients")
    if w is not None:
        req.weight.CopyFrom(pb_tensor(w))
    if o.loss == "focal":
        req.sigmoid_focal_loss.SetInParent()
        if o.alpha is not None:
            req.sigmoid_focal_loss.alpha = o.alpha
        if o.gamma is not None:
            req.sigmoid_focal_loss.gamma = o.gamma
    else:
        req.bce_with_logits.SetInParent()
        if p is not None:
            req.bce_with_logits.pos_weight.CopyFrom(pb_tensor(p))
        if o.ignore_index is not None:
            req.bce_with_logits.ignore_index = o.ignore_index
        req.bce_with_logits.normalize = o.normalize
        req.bce_with_logits.label_smoothing = o.label_smoothing
    return req


@pytest.mark.parametrize("options", OPTION_CASES, ids=range(len(OPTION_CASES)))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 200)], ids=str)
def test_request_matches_generated_code(codec, options, shape) -> None:
    rng = np.random.default_rng(0)
    x = wt(rng.standard_normal(shape).astype(np.float32))
    y = wt(rng.standard_normal(shape), 3)
    w = wt(np.float64(2.5))
    p = wt(rng.standard_normal(shape[-1:]).astype(np.float16))
    for rid, weight, pos in itertools.product(["", "id-\u00e9/3"], [None, w], [None, p]):
        raw = _wire.encode_request(rid, x, y, weight, pos, options)
        parsed = pb.EvaluateRequest.FromString(raw)
        assert parsed == expected_request(rid, x, y, weight, pos, options)
        # Canonical encoding: byte-identical to the generated serializer.
        assert raw == expected_request(rid, x, y, weight, pos, options).SerializeToString(
            deterministic=True)


def test_request_with_negative_dimension_and_bfloat16_bits(codec) -> None:
    t = _wire.WireTensor(pb.DTYPE_BFLOAT16, (2, -1), np.array([0x3F80, 0x4000], "<u2"))
    raw = _wire.encode_request("r", t, t, None, None, _wire.RequestOptions())
    parsed = pb.EvaluateRequest.FromString(raw)
    assert list(parsed.logits.shape) == [2, -1]
    assert parsed.logits.data == b"\x80\x3f\x00\x40"


def full_response() -> pb.EvaluateResponse:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    return pb.EvaluateResponse(
        request_id="abc", loss=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=x.tobytes()),
        grad_logits=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[3],
                              data=np.array([1.5, -2, 3]).tobytes()),
        grad_targets=pb.Tensor(dtype=pb.DTYPE_FLOAT16, shape=[], data=np.float16(7).tobytes()),
        device=pb.DEVICE_CUDA, timing=pb.Timing(queue_ns=1, compute_ns=2**40, total_ns=-5),
        num_elements=6)


def test_parse_response(codec) -> None:
    raw = full_response().SerializeToString()
    parsed = _wire.parse_response(raw)
    assert parsed.request_id == "abc" and parsed.device == pb.DEVICE_CUDA
    assert (parsed.queue_ns, parsed.compute_ns, parsed.total_ns) == (1, 2**40, -5)
    assert parsed.num_elements == 6
    loss = _wire.to_array(raw, parsed.loss, "loss")
    np.testing.assert_array_equal(loss, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert loss.base is not None and not loss.flags.writeable
    if codec == "python":  # zero copy: a view of the received bytes
        assert np.shares_memory(loss, np.frombuffer(raw, np.uint8))
    np.testing.assert_array_equal(_wire.to_array(raw, parsed.grad_logits, "g"), [1.5, -2, 3])
    gy = _wire.to_array(raw, parsed.grad_targets, "gy")
    assert gy.shape == () and gy.dtype == np.float16 and gy == 7


def test_parse_skips_unknown_fields_and_accepts_unpacked_shapes(codec) -> None:
    raw = full_response().SerializeToString()
    # Unknown fields of every wire type (numbers 50..53), before and after the known ones.
    unknown = (b"\x90\x03\x07" + b"\x99\x03" + b"\0" * 8 + b"\xa2\x03\x02hi" + b"\xad\x03" +
               b"\0" * 4)
    parsed = _wire.parse_response(unknown + raw + unknown)
    assert parsed.num_elements == 6 and parsed.loss.shape == (2, 3)
    # shape as unpacked varints (field 2, wire type 0), as an old encoder might write it.
    body = b"\x08\x01" + b"\x10\x02" + b"\x10\x01" + b"\x1a\x08" + bytes(8)
    msg = b"\x12" + bytes([len(body)]) + body
    t = _wire.parse_response(msg).loss
    assert t.shape == (2, 1) and t.length == 8


def test_stream_response() -> None:
    ok = pb.EvaluateStreamResponse(request_id="r/1", response=full_response())
    rid, resp, err = _wire.parse_stream_response(ok.SerializeToString())
    assert rid == "r/1" and err is None and resp.num_elements == 6
    bad = pb.EvaluateStreamResponse(request_id="r/2", error=pb.BatchError(code=3, message="x"))
    rid, resp, err = _wire.parse_stream_response(bad.SerializeToString())
    assert rid == "r/2" and resp is None and err == (3, "x")
    with pytest.raises(lossd.InternalError, match="neither"):
        _wire.parse_stream_response(pb.EvaluateStreamResponse(request_id="x").SerializeToString())


@pytest.mark.parametrize("raw", [b"\x12", b"\x12\x05ab", b"\x08", b"\x0f", b"\x11\0\0"])
def test_malformed_bytes_are_internal_errors(codec, raw) -> None:
    with pytest.raises(lossd.InternalError) as info:
        _wire.parse_response(raw)
    assert info.value.code == grpc.StatusCode.INTERNAL


def test_to_array_checks_lengths_and_dtypes(codec) -> None:
    raw = pb.EvaluateResponse(loss=pb.Tensor(dtype=1, shape=[3], data=b"\0" * 8)) \
        .SerializeToString()
    with pytest.raises(lossd.InternalError, match="loss has 8 bytes, expected 12"):
        _wire.to_array(raw, _wire.parse_response(raw).loss, "loss")
    raw = pb.EvaluateResponse(loss=pb.Tensor(dtype=9, shape=[1], data=b"\0" * 4)) \
        .SerializeToString()
    with pytest.raises(lossd.InternalError, match="unknown dtype 9"):
        _wire.to_array(raw, _wire.parse_response(raw).loss, "loss")
    with pytest.raises(lossd.InternalError, match="grad is missing"):
        _wire.to_array(b"", None, "grad")


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
def test_bfloat16_response() -> None:
    bits = np.array([0x3F80, 0xC000], "<u2")
    raw = pb.EvaluateResponse(loss=pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[2],
                                             data=bits.tobytes())).SerializeToString()
    arr = _wire.to_array(raw, _wire.parse_response(raw).loss, "loss")
    assert arr.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(arr.astype(np.float32), [1.0, -2.0])


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**31 - 1, 2**63 - 1, -1, -300, -2**63])
def test_varint_matches_generated_code_and_round_trips(n) -> None:
    v = _wire.encode_varint(n)
    # Tensor.shape is a packed repeated int64: tag, length, then the varint of n.
    assert pb.Tensor(shape=[n]).SerializeToString() == b"\x12" + bytes([len(v)]) + v
    value, end = _wire.read_varint(v + b"\xff", 0, len(v))
    assert end == len(v) and value == n & ((1 << 64) - 1)
    with pytest.raises(lossd.InternalError, match="truncated varint"):
        _wire.read_varint(v, 0, len(v) - 1)


def test_health_status_parsing() -> None:
    from lossd._client import _parse_health_status

    assert _parse_health_status(b"") == 0
    assert _parse_health_status(b"\x08\x01") == 1
    assert _parse_health_status(b"\x12\x02ab\x08\x02\x19" + bytes(8)) == 2  # unknown fields
    for raw in (b"\x08", b"\x08\x80", b"\x0f"):
        with pytest.raises(lossd.LossdError, match="malformed health response") as info:
            _parse_health_status(raw)
        assert info.value.code == grpc.StatusCode.INTERNAL
