"""End-to-end: ``AsyncClient.evaluate_dataset`` over real replicas on loopback (the replica
fixture), and the progress bar of long calls against a real server.

The async call shares the synchronous client's plan (lossd._dataset.ShardedRun): its loss must
have the bits of one server's ``Accumulate`` over the same batches, for sync and async
iterables and for arrays, also when a replica is SIGKILLed mid-run. A float64 reference
(bce_reference) checks the value itself.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import lossd

from bce_reference import bce_reference
from helpers import Dataset, dataset_batches, random_dataset

ELEMENTS = 600_000
MAX_BATCH = 39_999  # batch sizes are uniform in [1, MAX_BATCH]
SEED = 7


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return random_dataset(SEED, ELEMENTS, MAX_BATCH)


async def abatches(data, on_batch=None):
    for k, batch in enumerate(dataset_batches(data)):
        if on_batch is not None:
            on_batch(k)
        await asyncio.sleep(0)  # a real async source yields to the loop
        yield batch


@pytest.fixture(scope="module")
def one_server(dataset, lossd_target) -> float:
    """One server's Accumulate over the same batches (the bits every split must give)."""
    x, y, _ = dataset
    with lossd.Client(lossd_target, timeout=300) as c:
        acc = c.accumulate(dataset_batches(dataset), reduction="mean", progress=False)
    ref = float(bce_reference(x, y, reduction="mean").loss)
    assert acc.loss == pytest.approx(ref, rel=1e-6)
    return acc.loss


def bits(v: float) -> int:
    return int(np.float64(v).view(np.uint64))


@pytest.mark.parametrize("source", ["iterable", "async_iterable", "array"])
def test_async_evaluate_dataset_equals_one_server(replicas, dataset, one_server,
                                                  source) -> None:
    rs = replicas(3)
    x, y, _ = dataset
    loop_threads = []
    seen = []

    def progress(done, total):
        loop_threads.append(threading.get_ident())
        seen.append((done, total))

    async def main():
        async with lossd.AsyncClient(rs.targets, timeout=120) as c:
            if source == "iterable":
                data, kw = dataset_batches(dataset), {}
            elif source == "async_iterable":
                data, kw = abatches(dataset), {}
            else:
                data, kw = x.reshape(-1, 100), {"targets": y.reshape(-1, 100),
                                                "batch_rows": 777}
            r = await c.evaluate_dataset(data, checkpoint_batches=3, progress=progress, **kw)
            return r, threading.get_ident()

    r, loop_thread = asyncio.run(main())
    assert bits(r.loss) == bits(one_server)
    assert r.num_elements == ELEMENTS and r.reduction == "mean"
    assert r.replicas == tuple(rs.targets) and r.failed_replicas == ()
    assert r.checkpoints >= 3
    assert seen and seen[-1][0] == ELEMENTS
    assert seen[-1][1] == (ELEMENTS if source == "array" else None)
    assert set(loop_threads) == {loop_thread}  # callbacks run in the event loop


def test_async_evaluate_dataset_survives_a_killed_replica(replicas, dataset,
                                                          one_server) -> None:
    rs = replicas(3)

    def on_batch(k: int) -> None:
        if k == 20:
            rs.kill(1)

    async def main():
        async with lossd.AsyncClient(rs.targets, timeout=120) as c:
            return await c.evaluate_dataset(abatches(dataset, on_batch), checkpoint_batches=2,
                                            queue_depth=2, progress=False)

    r = asyncio.run(main())
    assert bits(r.loss) == bits(one_server)
    assert r.failed_replicas == (rs.targets[1],)
    assert r.resent_batches >= 1


def test_async_evaluate_dataset_errors_and_cancellation(replicas, dataset) -> None:
    rs = replicas(2)
    x, y, _ = dataset

    async def bad():
        async with lossd.AsyncClient(rs.targets, timeout=60) as c:
            await c.evaluate_dataset([(x[:10], y[:9])])

    with pytest.raises(lossd.InvalidArgumentError, match="batch 0"):
        asyncio.run(bad())

    async def failing_source():
        yield x[:10], y[:10]
        raise KeyError("the source failed")

    async def propagate():
        async with lossd.AsyncClient(rs.targets, timeout=60) as c:
            await c.evaluate_dataset(failing_source())

    with pytest.raises(KeyError, match="the source failed"):
        asyncio.run(propagate())

    async def endless():
        while True:
            await asyncio.sleep(0)
            yield x[:50_000], y[:50_000]

    async def cancel():
        async with lossd.AsyncClient(rs.targets, timeout=60) as c:
            task = asyncio.ensure_future(c.evaluate_dataset(endless(), progress=False))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The client still works after the cancelled run.
            r = await c.bce_with_logits(x[:4], y[:4], reduction="sum")
            return r

    r = asyncio.run(cancel())
    assert r.loss.shape == ()


# -- progress bars against a real server ------------------------------------------------------

def test_progress_bar_forced_or_on_a_terminal(replicas, dataset, lossd_target,
                                              monkeypatch) -> None:
    rs = replicas(2)
    for progress, stream in ((True, io.StringIO()), (None, FakeTTY())):
        monkeypatch.setattr(sys, "stderr", stream)
        with lossd.Client(lossd_target, timeout=120) as c:
            c.accumulate(dataset_batches(dataset), progress=progress)
        text = stream.getvalue()
        assert "lossd: " in text and "elements" in text, text
        stream2 = FakeTTY() if progress is None else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream2)
        with lossd.Client(rs.targets, timeout=120) as c:
            x, y, _ = dataset
            c.evaluate_dataset(x, y, batch_rows=50_000, checkpoint_batches=1, progress=progress)
        assert "elements (100.0%)" in stream2.getvalue(), stream2.getvalue()


def test_no_progress_on_a_pipe_or_when_off(replicas, dataset, lossd_target,
                                           monkeypatch) -> None:
    rs = replicas(2)
    x, y, _ = dataset
    for progress, stream in ((None, io.StringIO()), (False, FakeTTY())):
        monkeypatch.setattr(sys, "stderr", stream)
        with lossd.Client(lossd_target, timeout=120) as c:
            c.accumulate(dataset_batches(dataset), progress=progress)
            big = c.bce_with_logits(x, y, reduction="none", progress=progress)  # split
            assert big.loss.shape == x.shape
        with lossd.Client(rs.targets, timeout=120) as c:
            c.evaluate_dataset(x, y, batch_rows=50_000, checkpoint_batches=1, progress=progress)
        assert stream.getvalue() == ""


def test_cli_progress_flags(lossd_target, dataset, tmp_path) -> None:
    x, y, _ = dataset
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    env = dict(os.environ)
    env.pop("LOSSD_TARGET", None)

    def cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lossd", "eval", "--target", lossd_target, "--logits",
             str(tmp_path / "x.npy"), "--targets", str(tmp_path / "y.npy"), "--reduction",
             "none", "--max-message-bytes", "400000", *extra],
            capture_output=True, text=True, timeout=120, env=env)

    forced = cli("--progress")
    assert forced.returncode == 0, forced.stderr
    assert "lossd eval: " in forced.stderr and "elements (100.0%)" in forced.stderr
    for quiet in (cli(), cli("--no-progress")):  # stderr is a pipe here: silent by default
        assert quiet.returncode == 0, quiet.stderr
        assert quiet.stderr == ""
    both = cli("--progress", "--no-progress")
    assert both.returncode == 2 and "not allowed with" in both.stderr
