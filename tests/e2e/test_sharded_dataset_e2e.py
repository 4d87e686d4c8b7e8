"""End-to-end: a dataset of 10^7 elements (LOSSD_SHARDED_ELEMENTS to change it) in batches of
random size, evaluated by ``Client.evaluate_dataset`` over three replicas on loopback (one
Accumulate call per segment of batches, then MergePartials). The loss must have the bits of
one server's Accumulate over the same batches, and of a one-shot Evaluate of all the data
(rounded to float32 as that reply is) -- also when a replica is SIGKILLed mid-run, whose
unacknowledged batches are re-sent to the others. A float64 numpy reference summed with
math.fsum checks the value itself (1e-6 relative: the element losses' own error).

Timings are printed, never asserted: run with ``-s`` to see them.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

import lossd

from bce_reference import bce_reference
from helpers import Dataset, dataset_batches, random_dataset

ELEMENTS = int(os.environ.get("LOSSD_SHARDED_ELEMENTS", 10_000_000))
MAX_BATCH = 400_000  # batch sizes are uniform in [1, MAX_BATCH]
SEED = 20240611


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return random_dataset(SEED, ELEMENTS, MAX_BATCH)


def _bits(v: float) -> int:
    return int(np.float64(v).view(np.uint64))


@pytest.fixture(scope="module")
def reference(dataset, lossd_target):
    """One server's Accumulate over the batches, and (when it fits a message) one Evaluate."""
    x, y, _ = dataset
    t0 = time.monotonic()
    with lossd.Client(lossd_target, timeout=600) as client:
        acc = client.accumulate(dataset_batches(dataset), reduction="mean")
        t1 = time.monotonic()
        one_shot = None
        if 8 * ELEMENTS < 200 * 1024 * 1024:
            with lossd.Client(lossd_target, timeout=600, chunk_bytes=None) as whole:
                one_shot = whole.bce_with_logits(x, y, reduction="mean").loss
    print(f"\n{ELEMENTS} elements in {len(dataset[2]) - 1} batches: one server's Accumulate "
          f"{t1 - t0:.2f} s, one-shot Evaluate {time.monotonic() - t1:.2f} s")
    assert acc.num_elements == ELEMENTS
    return acc, one_shot


def _check(result: lossd.DatasetResult, reference) -> None:
    acc, one_shot = reference
    assert result.num_elements == ELEMENTS
    assert result.reduction == "mean"
    assert _bits(result.loss) == _bits(acc.loss), (result.loss, acc.loss)
    if one_shot is not None:
        assert one_shot.dtype == np.float32
        assert np.float32(result.loss).view(np.uint32) == one_shot.view(np.uint32)


def test_reference_value_is_right(dataset, reference) -> None:
    x, y, _ = dataset
    # The float64 reference of every element, summed exactly (in pieces: memory).
    sums = [math.fsum(bce_reference(x[i:i + 1_000_000], y[i:i + 1_000_000]).loss.tolist())
            for i in range(0, ELEMENTS, 1_000_000)]
    want = math.fsum(sums) / ELEMENTS
    assert reference[0].loss == pytest.approx(want, rel=1e-6)


def test_three_replicas_equal_one_server_bit_for_bit(replicas, dataset, reference) -> None:
    rs = replicas(3)
    with lossd.Client(rs.targets, timeout=120) as client:
        t0 = time.monotonic()
        r = client.evaluate_dataset(dataset_batches(dataset), reduction="mean",
                                    checkpoint_batches=4)
        print(f"\nthree replicas: {time.monotonic() - t0:.2f} s, {r.checkpoints} segments")
    _check(r, reference)
    assert r.replicas == tuple(rs.targets)
    assert r.failed_replicas == () and r.resent_batches == 0
    assert r.num_batches == reference[0].num_batches  # messages: big batches are split


def test_replica_killed_mid_run(replicas, dataset, reference) -> None:
    rs = replicas(3)
    batches = len(dataset[2]) - 1
    killed = []

    def on_batch(k: int) -> None:
        if k == int(batches * 0.4) and not killed:
            killed.append(rs.kill(1))

    with lossd.Client(rs.targets, timeout=120) as client:
        t0 = time.monotonic()
        r = client.evaluate_dataset(dataset_batches(dataset, on_batch), reduction="mean",
                                    checkpoint_batches=3)
        print(f"\nreplica 1 killed after {int(batches * 0.4)} of {batches} batches: "
              f"{time.monotonic() - t0:.2f} s, {r.resent_batches} batches re-sent")
    assert killed == [-9]
    _check(r, reference)
    assert r.failed_replicas == (rs.target(1),)
    assert r.resent_batches >= 1
    assert r.num_batches == reference[0].num_batches  # every message counted once


def test_memory_mapped_npy(replicas, dataset, reference, tmp_path) -> None:
    x, y, _ = dataset
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    rs = replicas(3)
    with lossd.Client(rs.targets, timeout=120) as client:
        r = client.evaluate_dataset(tmp_path / "x.npy", tmp_path / "y.npy", reduction="mean",
                                    batch_rows=777_777)
    _check(r, reference)
    assert r.checkpoints == math.ceil(math.ceil(ELEMENTS / 777_777) / 8)
