"""End-to-end: requests larger than the client's message limit are split transparently, and
give the same result as one request (bitwise, except where the README says one rounding).

A client with a small max_message_bytes forces many chunks; the reference is the same
request sent whole by a client with the default 256 MiB limit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import lossd

from bce_reference import exact_sum, loss_reference
from helpers import (
    DTYPE_IDS, DTYPES, REDUCTIONS, cast, f64, make_inputs, seed_of, with_nan_target,
)

LIMIT = 64 * 1024  # bytes: the (300, 200) inputs below need about ten chunks


@pytest.fixture(scope="module")
def small(lossd_target):
    with lossd.Client(lossd_target, max_message_bytes=LIMIT, timeout=60) as c:
        yield c


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


OPTIONS = {
    "plain": {},
    "ignore_normalize": {"ignore_index": -100, "normalize": True},
    "smooth": {"label_smoothing": 0.1},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("grads", [False, True], ids=["nograd", "grads"])
@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_chunked_equals_one_shot(client, small, dtype, reduction, grads, case) -> None:
    options = OPTIONS[case]
    rng = np.random.default_rng(seed_of(dtype, reduction, grads, case))
    x, y = make_inputs(rng, (300, 200), dtype)
    # Logits beyond |x| = 80 take the kernels' double path for the element (where a client
    # that divided a float result itself was one ulp off).
    x[rng.uniform(size=x.shape) < 0.05] = cast(rng.choice([-1, 1], 1)[0] * 90.0, dtype)
    if "ignore_index" in options:
        y[rng.uniform(size=y.shape) < 0.2] = cast(-100, dtype)
    w = cast(rng.uniform(0, 2, (300, 1)), dtype)   # sliced per chunk
    p = cast(rng.uniform(0, 3, (200,)), dtype)     # sent whole with every chunk
    kwargs = dict(weight=w, pos_weight=p, reduction=reduction, grad=grads,
                  grad_targets=grads, **options)
    one = client.bce_with_logits(x, y, **kwargs)
    seen = []
    split = small.bce_with_logits(x, y, progress=lambda d, t: seen.append((d, t)), **kwargs)
    assert len(seen) > 3, "the request was not split"
    assert seen[-1] == (x.size, x.size) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert split.num_elements == x.size and split.device == "cpu"
    # Every option and reduction: the server divides each chunk as the whole request
    # (EvaluateRequest.whole), so the split result is the one-shot result, bit for bit.
    assert _same(split.loss, one.loss), (split.loss, one.loss)
    assert _same(split.grad, one.grad)
    assert _same(split.grad_targets, one.grad_targets)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_chunked_focal_equals_one_shot(client, small, reduction, dtype) -> None:
    rng = np.random.default_rng(seed_of("focal", reduction, dtype))
    x, y = make_inputs(rng, (250, 160), dtype)
    w = cast(rng.uniform(0, 2, (250, 1)), dtype)
    one = client.sigmoid_focal_loss(x, y, weight=w, reduction=reduction, grad=True, gamma=1.5)
    split = small.sigmoid_focal_loss(x, y, weight=w, reduction=reduction, grad=True, gamma=1.5)
    assert _same(split.loss, one.loss) and _same(split.grad, one.grad)


WEIGHT_SHAPES = [None, (1,), (5000,), (3, 1), (4, 1, 1), (4, 3, 1), (1, 3, 5000), (4, 3, 5000)]


@pytest.mark.parametrize("wshape", WEIGHT_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "per_sample_mean", "mean"])
def test_rows_larger_than_a_chunk_split_inner_axes(client, small, wshape, reduction) -> None:
    """Each [3, 5000] slab is 120 kB (> LIMIT): the split goes one axis deeper, and weights
    that vary along the merged leading axes are gathered per chunk."""
    rng = np.random.default_rng(seed_of(wshape, reduction))
    x = rng.uniform(-8, 8, (4, 3, 5000)).astype(np.float32)
    y = rng.integers(0, 2, x.shape).astype(np.float32)
    w = None if wshape is None else rng.uniform(0, 2, wshape).astype(np.float32)
    one = client.bce_with_logits(x, y, weight=w, reduction=reduction, grad=True)
    chunks = []
    split = small.bce_with_logits(x, y, weight=w, reduction=reduction, grad=True,
                                  progress=lambda d, t: chunks.append(d))
    assert len(chunks) >= 4
    assert _same(split.loss, one.loss) and _same(split.grad, one.grad)


def test_one_dimensional_and_non_contiguous(client, small) -> None:
    rng = np.random.default_rng(5)
    base = rng.uniform(-5, 5, (40_000, 3)).astype(np.float64)
    x = base[:, 1]                       # strided view
    y = (base[:, 2] > 0).astype(np.float64)
    assert not x.flags.c_contiguous
    for reduction in ("none", "sum", "per_sample_mean"):
        one = client.bce_with_logits(np.ascontiguousarray(x), y, reduction=reduction,
                                     grad=True)
        split = small.bce_with_logits(x, y, reduction=reduction, grad=True)
        if reduction == "per_sample_mean":  # one sample: computed as the mean (README)
            assert split.loss.shape == ()
            assert _same(split.grad, one.grad)
            assert math.isclose(float(split.loss), float(one.loss), rel_tol=1e-15)
        else:
            assert _same(split.loss, one.loss) and _same(split.grad, one.grad)


def test_row_that_cannot_fit_is_a_value_error(small) -> None:
    x = np.zeros((2, 20_000), np.float32)  # one last-axis row is 160 kB of x and y
    with pytest.raises(ValueError, match="max_message_bytes"):
        small.bce_with_logits(x, x, reduction="per_sample_mean")


def test_chunk_error_names_the_chunk(small) -> None:
    x, y = with_nan_target((300, 200), (250, 7))
    with pytest.raises(lossd.InvalidArgumentError) as info:
        small.bce_with_logits(x, y, reduction="none", reject_nan=True)
    assert "chunk" in info.value.details and "NaN" in info.value.details
    with pytest.raises(lossd.InvalidArgumentError, match="NaN"):
        small.bce_with_logits(x, y, reduction="mean", reject_nan=True)  # via Accumulate
    with pytest.raises(lossd.InvalidArgumentError, match="NaN"):
        small.bce_with_logits(x, y, reduction="sum", grad=True, reject_nan=True)
    with pytest.raises(lossd.InvalidArgumentError, match="shape"):
        small.bce_with_logits(x, y[:, :100], reduction="none")
    # The client is still usable.
    assert small.bce_with_logits(x[:2], x[:2]).loss.shape == ()


def test_chunked_results_against_reference(small) -> None:
    rng = np.random.default_rng(9)
    x, y = make_inputs(rng, (257, 300), np.dtype(np.float32))
    r = small.bce_with_logits(x, y, reduction="none", grad=True)
    ref = loss_reference(f64(x), f64(y), reduction="none")
    np.testing.assert_allclose(r.loss, ref.loss, rtol=1e-6, atol=1e-30)
    assert r.loss.flags.writeable and r.loss.flags.c_contiguous


# ---------------------------------------------------------------------------------------
# Accumulate: datasets streamed batch by batch


def _dataset(n: int, dtype=np.float64):
    rng = np.random.default_rng(123)
    x = (rng.standard_normal(n) * 4).astype(dtype)
    y = rng.integers(0, 2, n).astype(dtype)
    w = rng.uniform(0, 2, n).astype(dtype)
    return x, y, w


def _batches(x, y, w, sizes):
    i = 0
    for k, size in enumerate(sizes):
        yield (x[i:i + size], y[i:i + size], w[i:i + size]) if k % 2 else \
            {"logits": x[i:i + size], "targets": y[i:i + size], "weight": w[i:i + size]}
        i += size
    if i < len(x):
        yield x[i:], y[i:], w[i:]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulate_three_million_elements_is_split_invariant(client, lossd_target,
                                                              reduction) -> None:
    n = 3_000_000
    x, y, w = _dataset(n)
    with lossd.Client(lossd_target, chunk_bytes=None) as whole:
        one = whole.bce_with_logits(x, y, weight=w, reduction=reduction)  # one Evaluate
    with lossd.Client(lossd_target, max_message_bytes=1 << 20) as tiny:  # 1 MiB messages
        seen = []
        a = tiny.accumulate(_batches(x, y, w, [1_000_000, 7, 999_993, 500_000]),
                            reduction=reduction, progress=lambda d, t: seen.append(d))
        b = tiny.accumulate(_batches(x, y, w, [2048] * 10 + [123_457] * 3), reduction=reduction)
    with lossd.Client(lossd_target, chunk_bytes=None) as whole:  # one 72 MB message
        c = whole.accumulate([(x, y, w)], reduction=reduction)
    d = client.accumulate([(x, y, w)], reduction=reduction)  # split into 2 MiB chunks
    assert a.num_elements == b.num_elements == c.num_elements == d.num_elements == n
    assert a.num_batches >= 69  # 24 bytes per element: <= 43690 elements per message
    assert c.num_batches == 1 and d.num_batches == 35
    assert a.loss == b.loss == c.loss == d.loss == float(one.loss)  # bitwise, float64
    assert seen == sorted(seen) and seen[-1] == n
    assert a.reduction == reduction and a.device == "cpu"
    total = exact_sum(loss_reference(x, y, w, reduction="none").loss)
    expected = total / n if reduction == "mean" else total
    assert math.isclose(a.loss, expected, rel_tol=1e-13)


def test_accumulate_float32_matches_one_shot_rounding(client, small) -> None:
    x, y, w = _dataset(200_000, np.float32)
    one = client.bce_with_logits(x, y, weight=w, reduction="mean")
    acc = small.accumulate(_batches(x, y, w, [70_000, 70_000]))
    assert np.float32(acc.loss) == one.loss
    split = small.bce_with_logits(x, y, weight=w, reduction="mean")  # Accumulate inside
    assert _same(split.loss, one.loss)


def test_accumulate_options_and_errors(client) -> None:
    x, y, w = _dataset(10_000)
    y = y.copy()
    y[::5] = -100
    kw = dict(ignore_index=-100, normalize=True, label_smoothing=0.1, pos_weight=np.float64(2))
    one = client.bce_with_logits(x, y, weight=w, reduction="mean", **kw)
    acc = client.accumulate(_batches(x, y, w, [3333, 3333]), reduction="mean", **kw)
    assert acc.loss == float(one.loss)
    focal = client.accumulate([(x[:5000], y[:5000].clip(0, 1)), (x[5000:], y[5000:].clip(0, 1))],
                              loss="sigmoid_focal_loss", reduction="sum", gamma=1.0)
    one = client.sigmoid_focal_loss(x, y.clip(0, 1), reduction="sum", gamma=1.0)
    assert focal.loss == float(one.loss)
    with pytest.raises(ValueError, match="reduction"):
        client.accumulate([(x, y)], reduction="none")
    with pytest.raises(ValueError, match="batch 1"):
        client.accumulate([(x, y), (x,)])
    with pytest.raises(lossd.InvalidArgumentError, match="batch 1"):
        client.accumulate([(x, y), (x[:10], y[:11])])
    empty = client.accumulate([], reduction="sum")
    assert empty.loss == 0.0 and empty.num_elements == 0


def test_accumulate_propagates_the_iterables_exception(client) -> None:
    def broken():
        yield np.zeros(4), np.ones(4)
        raise KeyError("disk gone")

    with pytest.raises(KeyError, match="disk gone"):
        client.accumulate(broken())


def test_default_client_splits_large_requests_when_exact(client, lossd_target) -> None:
    """Above chunk_bytes (2 MiB) requests are pipelined in chunks (faster with gRPC Python)
    when that keeps the bits; otherwise they go whole while they fit max_message_bytes."""
    rng = np.random.default_rng(21)
    x, y = make_inputs(rng, (1000, 1000), np.dtype(np.float32))  # 8 MB of inputs
    with lossd.Client(lossd_target, chunk_bytes=None) as whole:
        for kwargs in ({"reduction": "none", "grad": True}, {"reduction": "mean", "grad": True},
                       {"reduction": "sum"}):
            seen = []
            split = client.bce_with_logits(x, y, progress=lambda d, t: seen.append(d), **kwargs)
            one = whole.bce_with_logits(x, y, **kwargs)
            assert len(seen) > 3, kwargs
            assert _same(split.loss, one.loss) and _same(split.grad, one.grad), kwargs
        seen = []
        y[::7] = -100
        kwargs = dict(reduction="per_sample_mean", normalize=True, ignore_index=-100,
                      grad=True)
        split = client.bce_with_logits(x, y, progress=lambda d, t: seen.append(d), **kwargs)
        assert len(seen) > 3  # split: the server divides by the whole's kept count
        one = whole.bce_with_logits(x, y, **kwargs)
        assert _same(split.loss, one.loss) and _same(split.grad, one.grad)
