"""evaluate_dataset against in-process fake replicas: how batches are cut into segments and
spread, what goes on the wire (accumulate_slice on the first message of each segment), and
failover: a replica that fails mid-run costs only its unacknowledged segments, which are sent
again elsewhere and counted once. No lossd binary needed.

A fake replica's "partial state" is the exact sum of its logits as a fraction, with the
slice's offset and count; the fake merge checks that the slices tile [0, N) and rounds the
exact total once, so the result must equal math.fsum of every logit.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent import futures
from fractions import Fraction
from typing import List, Optional

import grpc
import numpy as np
import pytest

import lossd
from lossd._dataset import dataset_batches, resolve_replicas
from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc


class FakeReplica(pb_grpc.LossServiceServicer):
    """Accumulate: sums float32 logits exactly; fails with UNAVAILABLE from its
    ``fail_after``-th call on (None: never)."""

    def __init__(self, fail_after: Optional[int] = None) -> None:
        self.fail_after = fail_after
        self.calls = 0
        self.slices: List[tuple] = []  # (offset, count) of each call that succeeded
        self.lock = threading.Lock()

    def Accumulate(self, request_iterator, context):
        with self.lock:
            self.calls += 1
            call = self.calls
        offset: Optional[int] = None
        total, count = Fraction(0), 0
        for k, r in enumerate(request_iterator):
            if k == 0:
                assert r.HasField("accumulate_slice")
                offset = r.accumulate_slice.element_offset
            else:
                assert not r.HasField("accumulate_slice")
            assert r.logits.dtype == pb.DTYPE_FLOAT32
            x = np.frombuffer(r.logits.data, np.float32)
            total += sum((Fraction(float(v)) for v in x), Fraction(0))
            count += x.size
            if self.fail_after is not None and call > self.fail_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "replica gone")
        with self.lock:
            self.slices.append((offset, count))
        state = f"{offset}:{count}:{total.numerator}/{total.denominator}".encode()
        return pb.AccumulateResponse(loss=float(total), num_elements=count, num_batches=1,
                                     num_kept=count, reduction=pb.REDUCTION_SUM,
                                     partial_state=state)

    def MergePartials(self, request, context):
        parts = []
        for s in request.partial_states:
            off, n, frac = s.decode().split(":")
            parts.append((int(off), int(n), Fraction(frac)))
        parts.sort()
        end = 0
        for off, n, _ in parts:
            if off != end:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gap or overlap at {off}")
            end += n
        total = sum((p[2] for p in parts), Fraction(0))
        return pb.AccumulateResponse(
            loss=float(total), num_elements=end, num_kept=end, num_batches=len(parts),
            reduction=pb.REDUCTION_SUM, device=pb.DEVICE_CPU,
            partial_state=f"0:{end}:{total.numerator}/{total.denominator}".encode())


@pytest.fixture()
def fakes():
    started = []

    def make(*fail_after: Optional[int]):
        out = []
        for f in fail_after:
            svc = FakeReplica(f)
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            pb_grpc.add_LossServiceServicer_to_server(svc, server)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            started.append(server)
            out.append((f"127.0.0.1:{port}", svc))
        return out

    yield make
    for s in started:
        s.stop(None)


def _random_batches(seed: int, count: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(0, 300))
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-5, 6)).astype(np.float32)
        out.append((x, np.zeros(n, np.float32)))
    return out


def _fsum(batches) -> float:
    return math.fsum(float(v) for x, *_ in batches for v in x)


def test_spreads_segments_over_every_replica(fakes) -> None:
    reps = fakes(None, None, None)
    batches = _random_batches(1, 100)
    seen = []
    with lossd.Client([t for t, _ in reps]) as client:
        r = client.evaluate_dataset(iter(batches), reduction="sum", checkpoint_batches=7,
                                    progress=lambda done, total: seen.append((done, total)))
    assert r.loss == _fsum(batches)
    assert r.num_elements == sum(x.size for x, _ in batches)
    assert r.checkpoints == math.ceil(100 / 7)
    assert r.failed_replicas == () and r.resent_batches == 0
    assert r.replicas == tuple(t for t, _ in reps)
    counts = [len(svc.slices) for _, svc in reps]
    assert sum(counts) == r.checkpoints
    assert all(c > 0 for c in counts), counts
    assert seen[-1] == (r.num_elements, None)
    # The merge's own time is reported (one MergePartials round trip), within the run's.
    assert r.merge_calls == 1
    assert 0 < r.merge_ns <= r.timing.total_ns


def test_slow_reader_still_spreads_over_every_replica(fakes) -> None:
    # Each batch is read after the previous segment's state has arrived: every replica is
    # idle at each choice, and the ties go round robin (not always to the first replica).
    reps = fakes(None, None, None)
    batches = _random_batches(6, 12)

    def slow():
        for k, b in enumerate(batches):
            while k and sum(len(svc.slices) for _, svc in reps) < k:
                time.sleep(0.001)
            yield b

    with lossd.Client([t for t, _ in reps]) as client:
        r = client.evaluate_dataset(slow(), reduction="sum", checkpoint_batches=1)
    assert r.loss == _fsum(batches)
    assert [len(svc.slices) for _, svc in reps] == [4, 4, 4]


def test_failed_replica_segments_are_resent_once(fakes) -> None:
    reps = fakes(None, 2, None)  # the second replica fails from its third call on
    batches = _random_batches(2, 200)
    with lossd.Client([t for t, _ in reps]) as client:
        r = client.evaluate_dataset(batches, reduction="sum", checkpoint_batches=5)
    assert r.loss == _fsum(batches)
    assert r.failed_replicas == (reps[1][0],)
    assert "replica gone" in r.failures[0]
    assert 5 <= r.resent_batches <= 10  # the segment in flight and at most one queued
    assert len(reps[1][1].slices) == 2  # its two acknowledged segments were kept
    assert sum(len(svc.slices) for _, svc in reps) == r.checkpoints == 40


def test_every_replica_failing_raises(fakes) -> None:
    reps = fakes(0, 1)
    with lossd.Client([t for t, _ in reps]) as client:
        with pytest.raises(lossd.UnavailableError, match="every replica failed"):
            client.evaluate_dataset(_random_batches(3, 50), reduction="sum",
                                    checkpoint_batches=2)


def test_iterable_error_propagates_and_no_batches(fakes) -> None:
    reps = fakes(None, None)

    def broken():
        yield from _random_batches(4, 10)
        raise RuntimeError("disk on fire")

    with lossd.Client([t for t, _ in reps]) as client:
        with pytest.raises(RuntimeError, match="disk on fire"):
            client.evaluate_dataset(broken(), reduction="sum", checkpoint_batches=3)
        r = client.evaluate_dataset([], reduction="sum")
    assert r.num_elements == 0 and r.checkpoints == 1


def test_arrays_and_memory_mapped_npy_are_cut_into_batches(fakes, tmp_path) -> None:
    reps = fakes(None, None)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1001, 7)).astype(np.float32)
    y = (rng.random((1001, 7)) < 0.5).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    want = math.fsum(float(v) for v in x.ravel())
    with lossd.Client([t for t, _ in reps]) as client:
        a = client.evaluate_dataset(x, y, reduction="sum", batch_rows=64, checkpoint_batches=3)
        b = client.evaluate_dataset(str(tmp_path / "x.npy"), tmp_path / "y.npy",
                                    reduction="sum", batch_rows=100)
    assert a.loss == b.loss == want
    assert a.num_batches == math.ceil(math.ceil(1001 / 64) / 3)  # the fake counts segments
    assert a.num_elements == b.num_elements == x.size
    batches, total = dataset_batches(x, y, np.ones((1001, 1), np.float32), 400)
    cut = list(batches)
    assert total == x.size and [len(b[0]) for b in cut] == [400, 400, 201]
    assert cut[2][2].shape == (201, 1)  # a weight with the logits' rows is cut with them
    batches, _ = dataset_batches(x, y, np.ones(7, np.float32), 400)
    assert all(b[2].shape == (7,) for b in batches)  # a broadcast weight is not
    with pytest.raises(ValueError, match="targets: required"):
        dataset_batches(x, None, None, None)
    with pytest.raises(ValueError, match="not with an iterable"):
        dataset_batches([(x, y)], y, None, None)


def test_resolve_replicas() -> None:
    assert resolve_replicas(["a:1", "b:2"]) == ["a:1", "b:2"]
    assert resolve_replicas("a:1,b:2") == ["a:1", "b:2"]
    assert resolve_replicas("unix:/run/lossd.sock") == ["unix:/run/lossd.sock"]
    assert resolve_replicas("dns:///localhost:50051")[0].endswith(":50051")
    assert resolve_replicas("dns:127.0.0.1:7") == ["127.0.0.1:7"]
    with pytest.raises(ValueError, match="expected dns"):
        resolve_replicas("dns:///nohostport")
