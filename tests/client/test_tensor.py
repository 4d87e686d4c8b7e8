"""Unit tests of the numpy <-> lossd.v1.Tensor conversion (no server)."""

from __future__ import annotations

import numpy as np
import pytest

import lossd
from lossd import _tensor
from lossd._proto.lossd.v1 import lossd_pb2 as pb

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

needs_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")

WIRE = {np.float32: pb.DTYPE_FLOAT32, np.float64: pb.DTYPE_FLOAT64, np.float16: pb.DTYPE_FLOAT16}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)])
def test_round_trip(dtype, shape) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    t = _tensor.encode(x)
    assert t.dtype == WIRE[dtype]
    assert list(t.shape) == list(shape)
    assert t.data == x.tobytes()
    y = _tensor.decode(t, "x")
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(y, x)
    assert not y.flags.writeable  # zero-copy view of the message bytes


def test_non_contiguous_and_big_endian_inputs() -> None:
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    for view in (x.T, x[:, ::2], x[::-1]):
        t = _tensor.encode(view)
        assert list(t.shape) == list(view.shape)
        np.testing.assert_array_equal(_tensor.decode(t, "x"), view)
    be = x.astype(">f8")
    t = _tensor.encode(be)
    assert t.dtype == pb.DTYPE_FLOAT64
    assert t.data == x.astype("<f8").tobytes()


def test_wire_dtype_conversion() -> None:
    x = np.array([1.0, 1.0 / 3.0, 65504.0, 1e6], np.float64)
    t = _tensor.encode(x, pb.DTYPE_FLOAT16)
    assert t.dtype == pb.DTYPE_FLOAT16
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    assert np.isinf(expected[-1])
    np.testing.assert_array_equal(np.frombuffer(t.data, "<f2"), expected)


def test_bfloat16_rounding_without_ml_dtypes_matches_reference() -> None:
    f = _tensor.float_to_bfloat16_bits
    bits = lambda v: int(f(np.array([v], np.float32))[0])  # noqa: E731
    assert bits(1.0) == 0x3F80
    assert bits(-2.0) == 0xC000
    assert bits(np.inf) == 0x7F80 and bits(-np.inf) == 0xFF80
    assert np.isnan(_tensor.bfloat16_bits_to_float32(np.array([bits(np.nan)], np.uint16))[0])
    # Ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
    assert bits(1.0 + 2.0**-8) == 0x3F80
    assert bits(1.0 + 3 * 2.0**-8) == 0x3F82
    # Overflow rounds to infinity.
    assert bits(np.finfo(np.float32).max) == 0x7F80
    # float64 rounds once (round-to-odd through float32): just above a tie goes up.
    assert int(f(np.array([1.0 + 2.0**-8 + 2.0**-40]))[0]) == 0x3F81
    assert int(f(np.array([1.0 + 2.0**-8]))[0]) == 0x3F80


@needs_ml_dtypes
def test_bfloat16_rounding_agrees_with_ml_dtypes() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-42], np.float32),
    ]).astype(np.float32)
    ours = _tensor.float_to_bfloat16_bits(x)
    theirs = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


@needs_ml_dtypes
def test_bfloat16_arrays_round_trip() -> None:
    x = np.array([[0.5, -1.25], [3.0, 1e30]], np.float32).astype(ml_dtypes.bfloat16)
    t = _tensor.encode(x)
    assert t.dtype == pb.DTYPE_BFLOAT16 and len(t.data) == 8
    y = _tensor.decode(t, "x")
    assert y.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(y.astype(np.float32), x.astype(np.float32))
    t32 = _tensor.encode(x, pb.DTYPE_FLOAT32)
    np.testing.assert_array_equal(np.frombuffer(t32.data, "<f4").reshape(2, 2),
                                  x.astype(np.float32))


def test_bfloat16_decode_without_ml_dtypes(monkeypatch) -> None:
    monkeypatch.setattr(_tensor, "BFLOAT16", None)
    x = np.array([1.5, -3.0, 0.0078125], np.float32)
    t = pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[3],
                  data=_tensor.float_to_bfloat16_bits(x).astype("<u2").tobytes())
    y = _tensor.decode(t, "loss")
    assert y.dtype == np.float32 and not y.flags.writeable
    np.testing.assert_array_equal(y, x)
    # Sending bfloat16 from float32 input works without ml_dtypes too.
    t2 = _tensor.encode(x, pb.DTYPE_BFLOAT16)
    assert t2.dtype == pb.DTYPE_BFLOAT16 and t2.data == t.data


def test_as_array_dtype_rules() -> None:
    f32 = np.dtype(np.float32)
    logits = _tensor.as_array("logits", np.zeros(3, np.float16), None)
    assert logits.dtype == np.float16
    assert _tensor.as_array("logits", [0.5, 1.0], None).dtype == np.float64
    # targets: float arrays keep their dtype; ints, bools, lists and scalars take the logits'.
    assert _tensor.as_array("targets", np.zeros(3, np.float64), f32).dtype == np.float64
    assert _tensor.as_array("targets", np.zeros(3, np.int64), f32).dtype == np.float32
    assert _tensor.as_array("targets", np.zeros(3, bool), f32).dtype == np.float32
    assert _tensor.as_array("targets", [0, 1, 1], f32).dtype == np.float32
    assert _tensor.as_array("weight", 2.5, f32).dtype == np.float32
    assert _tensor.as_array("weight", np.float64(2.5), f32).dtype == np.float64


@pytest.mark.parametrize("argument,value", [
    ("logits", np.zeros(3, np.int32)),
    ("logits", np.zeros(3, np.complex64)),
    ("logits", np.array(["a"])),
    ("targets", np.zeros(3, np.complex128)),
    ("weight", np.array([object()])),
    ("pos_weight", np.zeros(3, np.longdouble) if np.finfo(np.longdouble).bits > 64
     else np.zeros(3, np.complex64)),
])
def test_unsupported_dtype_names_the_argument(argument, value) -> None:
    like = None if argument == "logits" else np.dtype(np.float32)
    with pytest.raises(ValueError, match=f"^{argument}: "):
        _tensor.as_array(argument, value, like)


def test_client_rejects_bad_arguments_before_any_rpc() -> None:
    # No server at this address: these must fail locally, before connecting.
    with lossd.Client("127.0.0.1:1", timeout=1) as client:
        x = np.zeros((2, 3), np.float32)
        with pytest.raises(ValueError, match="^logits: "):
            client.bce_with_logits(np.zeros((2, 3), np.int64), x)
        with pytest.raises(ValueError, match="^targets: "):
            client.bce_with_logits(x, np.zeros((2, 3), np.complex64))
        with pytest.raises(ValueError, match="^weight: "):
            client.bce_with_logits(x, x, weight=np.array(["w"]))
        with pytest.raises(ValueError, match="^pos_weight: "):
            client.bce_with_logits(x, x, pos_weight=np.zeros(3, np.complex64))
        with pytest.raises(ValueError, match="^reduction: "):
            client.bce_with_logits(x, x, reduction="avg")
        with pytest.raises(ValueError, match="^device: "):
            client.bce_with_logits(x, x, device="tpu")
        with pytest.raises(ValueError, match="^dtype: "):
            client.bce_with_logits(x, x, dtype="int8")
