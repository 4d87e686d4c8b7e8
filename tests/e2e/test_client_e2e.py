"""End-to-end tests: the lossd Python client against the real lossd binary (CPU).

Every value is checked against an independent float64 numpy implementation
(bce_reference.py) with the tolerances of docs/design.md section 4: float32 loss elements within
4 ulp of the float64 value rounded to float32 (gradients: 4 ulp of their larger term),
reductions within 1e-6 relative; float64 within 1e-13 relative; float16/bfloat16 within
1e-2 relative or 1e-3 absolute.
"""

from __future__ import annotations

import zlib

import grpc
import numpy as np
import pytest

import lossd
from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

from bce_reference import bce_reference, violations
from helpers import BF16, DTYPE_IDS, DTYPES, cast, f64, kind_of, make_inputs

REDUCTIONS = ["none", "mean", "sum"]


def evaluate_and_check(client, x, y, w=None, p=None, reduction="none", **kwargs):
    """Runs one request with both gradients and checks everything against the reference."""
    r = client.bce_with_logits(x, y, weight=w, pos_weight=p, reduction=reduction, grad=True,
                               grad_targets=True, **kwargs)
    x_arr = np.asarray(x)
    wire_dtype = x_arr.dtype
    # The client converts Python scalars and integer arrays to the logits' dtype: so must we.
    def as_sent(v):
        if v is None:
            return None
        if not hasattr(v, "dtype") or np.asarray(v).dtype.kind in "biu":
            return cast(v, wire_dtype)
        return np.asarray(v)
    ref = bce_reference(f64(x_arr), f64(as_sent(y)), f64(as_sent(w)), f64(as_sent(p)),
                        reduction)
    kind = kind_of(wire_dtype)
    assert r.loss.dtype == wire_dtype
    assert r.loss.shape == (x_arr.shape if reduction == "none" else ())
    assert r.grad is not None and r.grad_targets is not None
    for name, got in (("grad", r.grad), ("grad_targets", r.grad_targets)):
        assert got.dtype == wire_dtype and got.shape == x_arr.shape, name
    msg = violations(r.loss, ref.loss, ref.loss_scale, kind, reduced=reduction != "none")
    assert msg is None, f"loss ({reduction}): {msg}"
    msg = violations(r.grad, ref.grad, ref.grad_scale, kind)
    assert msg is None, f"dl/dx ({reduction}): {msg}"
    msg = violations(r.grad_targets, ref.grad_targets, ref.grad_targets_scale, kind)
    assert msg is None, f"dl/dy ({reduction}): {msg}"
    assert r.device == "cpu"
    assert r.num_elements == x_arr.size
    return r, ref


@pytest.fixture(scope="module")
def stub(lossd_target):
    channel = grpc.insecure_channel(lossd_target)
    yield pb_grpc.LossServiceStub(channel)
    channel.close()


def raw_error(stub, request) -> grpc.RpcError:
    """Sends a hand-made request that must fail; returns the RpcError."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(request, timeout=30)
    return info.value


def f32_tensor(values, shape=None) -> pb.Tensor:
    a = np.asarray(values, np.float32)
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=a.shape if shape is None else shape,
                     data=a.tobytes())


def good_request(**fields) -> pb.EvaluateRequest:
    req = pb.EvaluateRequest(logits=f32_tensor(np.zeros((4, 7))),
                             targets=f32_tensor(np.zeros((4, 7))),
                             bce_with_logits=pb.BceWithLogits(),
                             reduction=pb.REDUCTION_NONE)
    for k, v in fields.items():
        if isinstance(v, pb.Tensor):
            getattr(req, k).CopyFrom(v)
        else:
            setattr(req, k, v)
    return req


# ---------------------------------------------------------------------------------------
# Values


def test_seed_article_example(client) -> None:
    """The demo's example: 4x7 float32, weight [C], pos_weight [C], all reductions."""
    np.random.seed(1107)
    logits = np.random.rand(4, 7).astype(np.float32)
    targets = np.random.randint(0, 2, size=(4, 7)).astype(np.float32)
    pos_weight = np.random.randint(2, 4, size=(7,)).astype(np.float32)
    weight = np.random.randint(2, 4, size=(7,)).astype(np.float32)
    for reduction in REDUCTIONS:
        evaluate_and_check(client, logits, targets, weight, pos_weight, reduction)


WEIGHTS = ["none", "C", "1C", "N1", "scalar", "scalar0d", "full"]


def make_weight(kind, rng, shape, dtype):
    n, c = shape
    if kind == "none":
        return None
    if kind == "scalar":
        return 2.5
    if kind == "scalar0d":
        return cast(0.75, dtype).reshape(())
    sub = {"C": (c,), "1C": (1, c), "N1": (n, 1), "full": (n, c)}[kind]
    w = rng.uniform(0, 4, sub)
    w.flat[0] = 0.0  # an exactly-zero weight
    return cast(w, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("pos_weight", [False, True], ids=["p1", "pC"])
def test_values_weights_and_reductions(client, dtype, reduction, weight, pos_weight) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{dtype}{reduction}{weight}{pos_weight}".encode()))
    shape = (6, 7)
    x, y = make_inputs(rng, shape, dtype)
    w = make_weight(weight, rng, shape, dtype)
    p = cast(rng.uniform(0, 4, (7,)), dtype) if pos_weight else None
    evaluate_and_check(client, x, y, w, p, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_soft_labels(client, dtype, reduction) -> None:
    rng = np.random.default_rng(7)
    x, y = make_inputs(rng, (64, 5), dtype, soft=True)
    p = cast(rng.uniform(0, 10, (5,)), dtype)
    w = cast(rng.uniform(0, 10, (64, 1)), dtype)
    evaluate_and_check(client, x, y, w, p, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,wshape,pshape", [
    ((5,), (5,), (1,)),
    ((1,), None, None),
    ((1, 1), (1,), (1, 1)),
    ((), (), ()),
    ((2, 3, 4), (3, 1), (4,)),      # weight along the middle axis (expanded by the server)
    ((3, 1, 4), (2, 1), None),      # broadcasting can't grow the logits: invalid, see below
    ((2, 3, 4), (2, 3, 4), (1, 3, 1)),
    ((4, 2, 3, 5), (2, 1, 5), (5,)),
])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shapes(client, dtype, shape, wshape, pshape, reduction) -> None:
    rng = np.random.default_rng(11)
    x, y = make_inputs(rng, shape, dtype)
    w = None if wshape is None else cast(rng.uniform(0, 3, wshape), dtype)
    p = None if pshape is None else cast(rng.uniform(0, 3, pshape), dtype)
    if shape == (3, 1, 4):
        with pytest.raises(lossd.InvalidArgumentError, match=r"weight.*\[2,1\].*\[3,1,4\]"):
            client.bce_with_logits(x, y, weight=w, reduction=reduction)
        return
    evaluate_and_check(client, x, y, w, p, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 7)])
def test_empty(client, dtype, shape) -> None:
    x = cast(np.zeros(shape), dtype)
    p = cast(np.ones(shape[-1:]) * 2, dtype)
    r = client.bce_with_logits(x, x, pos_weight=p, reduction="none", grad=True,
                               grad_targets=True)
    assert r.loss.shape == shape and r.loss.dtype == dtype
    assert r.grad.shape == shape and r.grad_targets.shape == shape
    mean = client.bce_with_logits(x, x, pos_weight=p, reduction="mean", grad=True)
    assert mean.loss.shape == () and np.isnan(mean.loss.astype(np.float64))
    assert mean.grad.shape == shape
    total = client.bce_with_logits(x, x, pos_weight=p, reduction="sum")
    assert total.loss.shape == () and float(total.loss.astype(np.float64)) == 0.0
    assert total.num_elements == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_infinities_and_tails(client, dtype) -> None:
    inf = np.inf
    x = cast([inf, -inf, inf, -inf, -17.0, 17.0, 0.0, 30.0], dtype)
    y = cast([1, 0, 0, 1, 0, 1, 0.5, 0.25], dtype)
    r, ref = evaluate_and_check(client, x, y, reduction="none")
    loss = r.loss.astype(np.float64)
    assert loss[0] == 0.0 and loss[1] == 0.0          # the mathematical limit (torch: NaN)
    assert loss[2] == inf and loss[3] == inf
    assert r.grad.astype(np.float64)[0] == 0.0 and r.grad.astype(np.float64)[1] == 0.0
    if dtype in (np.float32, np.float64):
        # softplus(-17) = 4.14e-8: torch float32 gives 0 here; lossd must not.
        assert loss[4] == pytest.approx(4.139937633e-8, rel=1e-6)
        assert loss[5] == pytest.approx(4.139937633e-8, rel=1e-6)
    for reduction in ("mean", "sum"):
        evaluate_and_check(client, x[[0, 1, 4, 5, 6]], y[[0, 1, 4, 5, 6]], reduction=reduction)


def test_extreme_float32_tail_accuracy(client) -> None:
    """Large |x| where naive forms cancel or underflow: still 4 ulp in float32."""
    x = np.array([-100, -80, -40, -20, -10, -1e-3, 1e-3, 10, 20, 40, 80, 100], np.float32)
    for y in (np.zeros_like(x), np.ones_like(x)):
        evaluate_and_check(client, x, y, p=np.float32(3.0), reduction="none")


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float64)],
                         ids=["float32", "float64"])
def test_nan_propagates_per_element(client, dtype) -> None:
    rng = np.random.default_rng(3)
    x, y = make_inputs(rng, (4, 7), dtype)
    w = cast(rng.uniform(0, 2, (7,)), dtype)
    p = cast(rng.uniform(0, 2, (7,)), dtype)
    x[1, 2] = np.nan
    y[2, 3] = np.nan
    w[5] = np.nan
    p[6] = np.nan
    r, _ = evaluate_and_check(client, x, y, w, p, reduction="none")
    nan = np.isnan(r.loss)
    expected = np.zeros((4, 7), bool)
    expected[1, 2] = expected[2, 3] = True
    expected[:, 5] = expected[:, 6] = True
    np.testing.assert_array_equal(nan, expected)
    np.testing.assert_array_equal(np.isnan(r.grad), expected)
    np.testing.assert_array_equal(np.isnan(r.grad_targets), expected)
    for reduction in ("mean", "sum"):
        assert np.isnan(client.bce_with_logits(x, y, weight=w, reduction=reduction).loss)


@pytest.mark.parametrize("field", ["logits", "targets", "weight", "pos_weight"])
def test_reject_nan(client, field) -> None:
    x = np.zeros((4, 7), np.float32)
    y = np.ones((4, 7), np.float32)
    w = np.ones((7,), np.float32)
    p = np.ones((7,), np.float32)
    arrays = {"logits": x, "targets": y, "weight": w, "pos_weight": p}
    arrays[field].flat[3] = np.nan
    with pytest.raises(lossd.InvalidArgumentError) as info:
        client.bce_with_logits(x, y, weight=w, pos_weight=p, reject_nan=True)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith(field + " ") or info.value.details.startswith(field + ":")
    assert "NaN" in info.value.details
    # Without reject_nan the same request succeeds with NaN outputs.
    r = client.bce_with_logits(x, y, weight=w, pos_weight=p, reduction="none")
    assert np.isnan(r.loss).any()


def test_mixed_input_dtypes(client) -> None:
    """targets/weight/pos_weight keep their own float dtype; the outputs have the logits'."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-5, 5, (8, 3)).astype(np.float32)
    y = rng.uniform(0, 1, (8, 3))                                    # float64
    w = rng.uniform(0, 2, (3,)).astype(np.float16)
    p = np.array([1, 2, 3], np.int32)                                # -> float32
    for reduction in REDUCTIONS:
        evaluate_and_check(client, x, y, w, p, reduction)
    r = client.bce_with_logits(x.astype(np.float64), [[1, 0, 1]] * 8, weight=[1, 2, 3],
                               reduction="none")
    assert r.loss.dtype == np.float64


def test_bfloat16_arrays_are_covered() -> None:
    """Says so (as a skip) when the bfloat16 array cases above were not generated."""
    if BF16 is None:
        pytest.skip("ml_dtypes is not installed: bfloat16 array cases were not run "
                    "(install tests/requirements.txt)")


def test_bfloat16_via_dtype_argument(client) -> None:
    """dtype="bfloat16" rounds float32 input on the client (works without ml_dtypes)."""
    rng = np.random.default_rng(9)
    x = rng.uniform(-4, 4, (5, 6)).astype(np.float32)
    y = rng.integers(0, 2, (5, 6)).astype(np.float32)
    r = client.bce_with_logits(x, y, reduction="none", grad=True, dtype="bfloat16")
    from lossd._tensor import bfloat16_bits_to_float32, float_to_bfloat16_bits

    xb = bfloat16_bits_to_float32(float_to_bfloat16_bits(x))
    ref = bce_reference(xb.astype(np.float64), y.astype(np.float64))
    assert r.loss.shape == (5, 6)
    if BF16 is not None:
        assert r.loss.dtype == BF16
    assert violations(r.loss, ref.loss, ref.loss_scale, "half") is None
    assert violations(r.grad, ref.grad, ref.grad_scale, "half") is None


def test_non_contiguous_inputs(client) -> None:
    rng = np.random.default_rng(13)
    base_x = rng.uniform(-5, 5, (7, 10)).astype(np.float32)
    base_y = rng.integers(0, 2, (7, 10)).astype(np.float32)
    w = rng.uniform(0, 2, (20,)).astype(np.float32)[::2]
    x, y = base_x.T[::2], base_y.T[::2]                        # (5, 7), strided
    assert not x.flags.c_contiguous
    r, _ = evaluate_and_check(client, x, y, w[:7], reduction="none")
    np.testing.assert_array_equal(
        r.loss, client.bce_with_logits(np.ascontiguousarray(x), np.ascontiguousarray(y),
                                       weight=np.ascontiguousarray(w[:7]),
                                       reduction="none").loss)


def test_outputs_are_read_only_views(client) -> None:
    r = client.bce_with_logits(np.zeros(4, np.float32), np.ones(4, np.float32),
                               reduction="none", grad=True)
    assert not r.loss.flags.writeable and not r.grad.flags.writeable
    copy = r.loss.copy()
    copy[0] = 1.0


def test_reductions_are_deterministic(client) -> None:
    rng = np.random.default_rng(17)
    x = rng.standard_normal(300_001).astype(np.float32) * 10
    y = rng.uniform(0, 1, x.shape).astype(np.float32)
    first = client.bce_with_logits(x, y, reduction="sum")
    for _ in range(3):
        again = client.bce_with_logits(x, y, reduction="sum")
        assert again.loss.tobytes() == first.loss.tobytes()
    ref = bce_reference(x, y, reduction="sum")
    assert violations(first.loss, ref.loss, ref.loss_scale, "float32", reduced=True) is None


def test_large_request_above_grpc_default_limit(lossd_target) -> None:
    """8 MiB of logits (16 MiB per request, 24 MiB reply): above gRPC's 4 MiB default, sent
    as one message (chunk_bytes=None: the client splits only above max_message_bytes)."""
    n = 2 * 1024 * 1024
    x = np.linspace(-10, 10, n, dtype=np.float32)
    y = (np.arange(n) % 2).astype(np.float32)
    calls = []
    with lossd.Client(lossd_target, chunk_bytes=None) as client:
        r = client.bce_with_logits(x, y, reduction="none", grad=True,
                                   progress=lambda d, t: calls.append(d))
    assert calls == [n]  # one request
    assert r.loss.shape == (n,)
    ref = bce_reference(x[::997], y[::997])
    assert violations(r.loss[::997], ref.loss, ref.loss_scale, "float32") is None


def test_request_metadata(client) -> None:
    r = client.bce_with_logits(np.zeros(3, np.float32), np.ones(3, np.float32),
                               request_id="e2e-42", device="cpu")
    assert r.request_id == "e2e-42"
    assert r.device == "cpu"
    assert r.num_elements == 3
    assert r.timing.total_ns >= r.timing.compute_ns >= 0 and r.timing.queue_ns >= 0
    assert r.timing.total_ns > 0
    auto = client.bce_with_logits(np.zeros(3, np.float32), np.ones(3, np.float32))
    assert auto.device == "cpu"  # this server runs with --device cpu
    assert len(auto.request_id) == 32


def test_capabilities(client) -> None:
    caps = client.capabilities()
    assert "bce_with_logits" in caps.losses
    expected_dtypes = {"float32", "float64", "float16", "bfloat16"}
    assert set(caps.dtypes) == expected_dtypes
    assert {"none", "mean", "sum"} <= set(caps.reductions)
    assert caps.devices == ("cpu",)
    assert caps.cuda_device_name == ""
    assert caps.max_message_bytes > 4 * 1024 * 1024
    assert caps.max_elements > 0
    assert caps.server_version


def test_health(client) -> None:
    assert client.health() == "SERVING"
    assert client.health("lossd.v1.LossService") == "SERVING"


# ---------------------------------------------------------------------------------------
# Errors


def test_targets_shape_mismatch(client) -> None:
    with pytest.raises(lossd.InvalidArgumentError) as info:
        client.bce_with_logits(np.zeros((4, 7), np.float32), np.zeros((4, 8), np.float32))
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "targets" in err.details and "[4,8]" in err.details and "[4,7]" in err.details
    assert str(err).startswith("INVALID_ARGUMENT: ")


@pytest.mark.parametrize("field", ["weight", "pos_weight"])
@pytest.mark.parametrize("bad_shape,text", [((3,), "[3]"), ((4, 7, 1), "[4,7,1]"),
                                            ((2, 7), "[2,7]")])
def test_not_broadcastable(client, field, bad_shape, text) -> None:
    x = np.zeros((4, 7), np.float32)
    kwargs = {field: np.ones(bad_shape, np.float32)}
    with pytest.raises(lossd.InvalidArgumentError) as info:
        client.bce_with_logits(x, x, **kwargs)
    d = info.value.details
    assert d.startswith(field + " ") and text in d and "[4,7]" in d, d


def test_data_length_mismatch(stub) -> None:
    req = good_request(logits=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4, 7], data=b"\0" * 12))
    e = raw_error(stub, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    d = e.details()
    assert d.startswith("logits") and "12" in d and "112" in d and "[4,7]" in d, d
    req = good_request(weight=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[7], data=b"\0" * 28))
    e = raw_error(stub, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("weight") and "28" in e.details() and "56" in e.details()


def test_dtype_unset_and_unknown(stub) -> None:
    req = good_request(targets=pb.Tensor(shape=[4, 7], data=b"\0" * 112))
    e = raw_error(stub, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("targets") and "dtype" in e.details(), e.details()
    req = good_request()
    req.logits.dtype = 9
    e = raw_error(stub, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("logits") and "9" in e.details(), e.details()


def test_unknown_reduction_and_device(stub) -> None:
    e = raw_error(stub, good_request(reduction=99))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reduction" in e.details() and "99" in e.details(), e.details()
    e = raw_error(stub, good_request(device=7))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "device" in e.details() and "7" in e.details(), e.details()


def test_missing_fields(stub) -> None:
    req = good_request()
    req.ClearField("logits")
    e = raw_error(stub, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "logits" in e.details()
    req = good_request()
    req.ClearField("targets")
    e = raw_error(stub, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "targets" in e.details()
    req = good_request()
    req.ClearField("bce_with_logits")
    e = raw_error(stub, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "loss" in e.details()


def test_malformed_shapes(stub) -> None:
    e = raw_error(stub, good_request(logits=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4, -7])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("logits") and "negative" in e.details(), e.details()
    huge = [2**31, 2**31, 2**31]
    e = raw_error(stub, good_request(logits=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=huge)))
    assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert e.details().startswith("logits"), e.details()
    e = raw_error(stub, good_request(logits=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 40,
                                                      data=b"\0" * 4)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("logits") and "rank" in e.details(), e.details()


def test_cuda_on_a_cpu_only_server(client) -> None:
    with pytest.raises(lossd.FailedPreconditionError) as info:
        client.bce_with_logits(np.zeros(3, np.float32), np.ones(3, np.float32), device="cuda")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "cuda" in info.value.details.lower(), info.value.details


def test_server_survives_errors(client) -> None:
    """After all the bad requests above, the server still answers correctly."""
    r = client.bce_with_logits(np.zeros(2, np.float32), np.ones(2, np.float32), reduction="sum")
    assert float(r.loss) == pytest.approx(2 * np.log(2), rel=1e-6)


def test_deadline(client) -> None:
    x = np.zeros(1 << 20, np.float32)
    with pytest.raises(lossd.DeadlineExceededError):
        client.bce_with_logits(x, x, timeout=1e-6)


def test_server_message_limit(server_factory) -> None:
    server = server_factory("--max_message_bytes", "65536")
    with lossd.Client(server.target) as c:
        assert c.capabilities().max_message_bytes == 65536
        small = c.bce_with_logits(np.zeros(100, np.float32), np.ones(100, np.float32))
        assert small.loss.shape == ()
        x = np.zeros(20_000, np.float32)  # 160 kB request
        with pytest.raises(lossd.ResourceExhaustedError) as info:
            c.bce_with_logits(x, x)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_element_limit(server_factory) -> None:
    server = server_factory("--max_elements", "100")
    with lossd.Client(server.target) as c:
        assert c.capabilities().max_elements == 100
        c.bce_with_logits(np.zeros(100, np.float32), np.ones(100, np.float32))
        with pytest.raises(lossd.ResourceExhaustedError) as info:
            c.bce_with_logits(np.zeros(101, np.float32), np.ones(101, np.float32))
        d = info.value.details
        assert d.startswith("logits") and "101" in d and "100" in d, d
