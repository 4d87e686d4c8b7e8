"""End-to-end: lossd.AsyncClient (grpc.aio) against the real server: the same results as the
synchronous client, split requests, accumulate over sync and async iterables, errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import lossd

from helpers import check_result, make_inputs, with_nan_target


def run(coro):
    return asyncio.run(coro)


def test_unary_matches_sync_client(client, lossd_target) -> None:
    rng = np.random.default_rng(1)
    x, y = make_inputs(rng, (16, 9), np.dtype(np.float32))
    w = rng.uniform(0, 2, (9,)).astype(np.float32)

    async def main():
        async with lossd.AsyncClient(lossd_target) as c:
            r = await c.bce_with_logits(x, y, weight=w, reduction="none", grad=True,
                                        grad_targets=True, request_id="aio-1")
            f = await c.sigmoid_focal_loss(x, y, reduction="sum", grad=True)
            return r, f, await c.capabilities(), await c.health(), \
                await c.health("lossd.v1.LossService")

    r, f, caps, health, service_health = run(main())
    check_result(r, x, y, w, None, "none")
    assert r.request_id == "aio-1" and r.device == "cpu"
    sync = client.bce_with_logits(x, y, weight=w, reduction="none", grad=True)
    assert r.loss.tobytes() == sync.loss.tobytes()
    sync_f = client.sigmoid_focal_loss(x, y, reduction="sum", grad=True)
    assert f.loss.tobytes() == sync_f.loss.tobytes() and f.grad.tobytes() == sync_f.grad.tobytes()
    assert "sigmoid_focal_loss" in caps.losses
    assert health == service_health == "SERVING"


@pytest.mark.parametrize("reduction,grad", [("none", True), ("per_sample_mean", False),
                                            ("mean", False), ("mean", True), ("sum", True)])
def test_split_requests(client, lossd_target, reduction, grad) -> None:
    rng = np.random.default_rng(2)
    x, y = make_inputs(rng, (300, 200), np.dtype(np.float32))
    w = rng.uniform(0, 2, (300, 1)).astype(np.float32)
    one = client.bce_with_logits(x, y, weight=w, reduction=reduction, grad=grad,
                                 grad_targets=grad)
    seen = []

    async def main():
        async with lossd.AsyncClient(lossd_target, max_message_bytes=64 * 1024) as c:
            return await c.bce_with_logits(x, y, weight=w, reduction=reduction, grad=grad,
                                           grad_targets=grad,
                                           progress=lambda d, t: seen.append(d))

    split = run(main())
    assert len(seen) > 3 and seen[-1] == x.size
    assert split.loss.tobytes() == one.loss.tobytes()
    if grad:
        assert split.grad.tobytes() == one.grad.tobytes()
        assert split.grad_targets.tobytes() == one.grad_targets.tobytes()


def test_concurrent_calls(client, lossd_target) -> None:
    rng = np.random.default_rng(3)
    xs = [make_inputs(rng, (50, 40), np.dtype(np.float64)) for _ in range(20)]

    async def main():
        async with lossd.AsyncClient(lossd_target) as c:
            return await asyncio.gather(*(c.bce_with_logits(x, y, reduction="sum")
                                          for x, y in xs))

    results = run(main())
    for (x, y), r in zip(xs, results):
        assert r.loss.tobytes() == client.bce_with_logits(x, y, reduction="sum").loss.tobytes()


def test_accumulate_sync_and_async_iterables(client, lossd_target) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal(100_000)
    y = rng.integers(0, 2, 100_000).astype(np.float64)
    one = client.bce_with_logits(x, y, reduction="mean")

    async def batches():
        for i in range(0, len(x), 30_000):
            await asyncio.sleep(0)
            yield x[i:i + 30_000], y[i:i + 30_000]

    async def main():
        async with lossd.AsyncClient(lossd_target, max_message_bytes=100_000) as c:
            a = await c.accumulate(batches())
            b = await c.accumulate([(x[:10], y[:10]), (x[10:], y[10:])])
            empty = await c.accumulate(_none(), reduction="sum")
            return a, b, empty

    async def _none():  # an async iterable with no batches
        return
        yield

    a, b, empty = run(main())
    assert a.loss == b.loss == float(one.loss)
    assert a.num_elements == 100_000 and a.num_batches > 4
    assert empty.loss == 0.0 and empty.reduction == "sum"


def test_errors(lossd_target) -> None:
    async def main():
        async with lossd.AsyncClient(lossd_target) as c:
            with pytest.raises(lossd.InvalidArgumentError, match=r"\[4,8\]"):
                await c.bce_with_logits(np.zeros((4, 7), np.float32),
                                        np.zeros((4, 8), np.float32))
            with pytest.raises(lossd.FailedPreconditionError):
                await c.bce_with_logits(np.zeros(3), np.zeros(3), device="cuda")
            with pytest.raises(lossd.DeadlineExceededError):
                x = np.zeros(1 << 20, np.float32)
                await c.sigmoid_focal_loss(x, x, timeout=1e-4)
        async with lossd.AsyncClient(lossd_target, max_message_bytes=64 * 1024) as small:
            x, y = with_nan_target((300, 200), (280, 3))
            with pytest.raises(lossd.InvalidArgumentError, match="chunk .*NaN"):
                await small.bce_with_logits(x, y, reduction="none", reject_nan=True)
            with pytest.raises(lossd.InvalidArgumentError, match="NaN"):
                await small.bce_with_logits(x, y, reduction="mean", grad=True, reject_nan=True)
            with pytest.raises(ValueError, match="batch 1"):
                await small.accumulate([(y, y), ("not", "arrays", 1, 2, 3)])

    run(main())
