"""Unit tests of the request splitting (lossd._chunks, lossd._job), without a server: every
chunk fits the limit, the chunks cover the tensor exactly, and broadcast operands are cut
correctly."""

from __future__ import annotations

import numpy as np
import pytest

from lossd._chunks import _Slicer, plan_chunks
from lossd._inputs import prepare_inputs
from lossd._job import EvalJob
from lossd._options import make_options
from lossd._proto.lossd.v1 import lossd_pb2 as pb


def job_for(shape, limit, reduction="none", w=None, p=None, dtype=np.float32, grad=False,
            **opts):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    y = rng.integers(0, 2, shape).astype(dtype)
    inputs = prepare_inputs(x, y, w, p)
    options = make_options(loss="bce", reduction=reduction, grad=grad, grad_targets=False,
                           device="auto", reject_nan=False, **opts)
    return EvalJob(inputs, options, "id", limit, limit), x, y


def test_small_requests_are_unary() -> None:
    job, _, _ = job_for((10, 10), 1 << 20)
    assert job.mode == "unary" and job.chunks == 1


@pytest.mark.parametrize("reduction,grad,mode", [
    ("none", False, "stream"), ("per_sample_mean", True, "stream"),
    ("mean", False, "accumulate"), ("sum", False, "accumulate"),
    ("mean", True, "both"), ("sum", True, "both")])
def test_modes_and_sizes(reduction, grad, mode) -> None:
    limit = 20_000
    w = np.ones((64, 1), np.float32)
    p = np.ones((300,), np.float32)
    job, x, _ = job_for((64, 300), limit, reduction, w, p, grad=grad)
    assert job.mode == mode
    messages = list(job.stream_requests() if mode != "accumulate"
                    else job.accumulate_requests())
    assert len(messages) == job.chunks > 1
    rows = 0
    for raw in messages:
        assert len(raw) <= limit
        req = pb.EvaluateRequest.FromString(raw)
        assert list(req.bce_with_logits.pos_weight.shape) == [300]  # sent whole
        assert list(req.weight.shape) == [req.logits.shape[0], 1]   # sliced
        rows += req.logits.shape[0]
        # Chunks keep the request's reduction; the stream's chunks name the whole request so
        # that the server divides them as one request (the Accumulate's need not).
        assert req.reduction == (pb.REDUCTION_SUM if reduction == "sum" else
                                 pb.REDUCTION_MEAN if reduction == "mean" else
                                 pb.REDUCTION_NONE if reduction == "none" else
                                 pb.REDUCTION_PER_SAMPLE_MEAN)
        assert req.HasField("whole") == (mode != "accumulate")
        if req.HasField("whole"):
            assert req.whole.num_elements == x.size
    assert rows == 64
    sizes = [b - a for a, b in job.plan.bounds]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_per_sample_mean_never_splits_the_last_axis() -> None:
    job, _, _ = job_for((3, 4, 1000), 10_000, "per_sample_mean")
    assert job.plan.k == 1 and job.plan.rest == (1000,)
    with pytest.raises(ValueError, match="per_sample_mean keeps last-axis rows whole"):
        job_for((3, 4000), 10_000, "per_sample_mean")


def test_one_dimensional_per_sample_mean_becomes_mean() -> None:
    job, _, _ = job_for((10_000,), 10_000, "per_sample_mean", grad=True)
    assert job.mode == "both" and job.reduction == pb.REDUCTION_MEAN


@pytest.mark.parametrize("wshape", [(), (1,), (7,), (5, 1), (4, 1, 1), (4, 5, 1), (1, 5, 7),
                                    (4, 5, 7), (4, 1, 7)], ids=str)
@pytest.mark.parametrize("budget", [200, 600, 3000], ids=["k2", "k1", "k0"])
def test_slices_reassemble_the_broadcast_operand(wshape, budget) -> None:
    shape = (4, 5, 7)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(wshape).astype(np.float32)
    inputs = prepare_inputs(x, x, w, None)
    plan = plan_chunks(inputs, loss_per_row="elements", grads=0, limit=budget + 400,
                       preferred=budget + 400)
    slicer = _Slicer(inputs, plan)
    got_x, got_w = [], []
    for r0, r1 in plan.bounds:
        cx, _, cw, _ = slicer.chunk(r0, r1)
        xx = cx.data.view(np.float32).reshape(cx.shape)
        ww = cw.data.view(np.float32).reshape(cw.shape)
        got_x.append(xx)
        got_w.append(np.broadcast_to(ww, xx.shape))  # the server's broadcast of the chunk
    merged = (-1,) + shape[plan.k + 1:]
    np.testing.assert_array_equal(np.concatenate(got_x), x.reshape(merged))
    np.testing.assert_array_equal(np.concatenate(got_w),
                                  np.broadcast_to(w, shape).reshape(merged))


def test_normalize_chunks_carry_the_servers_kept_count() -> None:
    """With normalize and ignore_index the Accumulate call's num_kept goes into every chunk;
    logits keep their dtype (the server divides, the client does no arithmetic)."""
    job, _, _ = job_for((64, 300), 20_000, "none", dtype=np.float16, normalize=True,
                        ignore_index=-100)
    assert job.needs_kept and job.runs_accumulate
    with pytest.raises(RuntimeError, match="must finish before"):
        next(iter(job.stream_requests()))
    acc = pb.EvaluateRequest.FromString(next(iter(job.accumulate_requests())))
    assert acc.bce_with_logits.normalize and acc.reduction == pb.REDUCTION_SUM
    assert not acc.HasField("whole")
    job.accumulate_reply(pb.AccumulateResponse(num_kept=12345, num_elements=64 * 300))
    req = pb.EvaluateRequest.FromString(next(iter(job.stream_requests())))
    assert req.logits.dtype == pb.DTYPE_FLOAT16
    assert req.bce_with_logits.normalize
    assert req.whole.num_elements == 64 * 300 and req.whole.num_kept == 12345
