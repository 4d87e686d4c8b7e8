"""End-to-end: tensors passed through POSIX shared memory (docs/shared-memory.md), with a real
server over its Unix socket and loopback TCP, checked bit for bit against the bytes path.

Every Evaluate here sends TensorReference inputs and OutputPlacement outputs; the
SharedMemory calls (RegisterRegion, RenewLease, UnregisterRegion, ListRegions) are also
called directly through lossd._shm.Control.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import grpc
import numpy as np
import pytest

import lossd
from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._shm import ALIGN, Control

from conftest import ServerProcess, start_server
from helpers import BF16


@pytest.fixture(scope="module")
def shm_server() -> Iterator[Tuple[ServerProcess, str]]:
    directory = tempfile.mkdtemp(prefix="lossd-shm-")
    path = os.path.join(directory, "lossd.sock")
    server = start_server("--unix_socket", path)
    try:
        yield server, path
    finally:
        alive = server.proc.poll() is None
        rc = server.stop()
        shutil.rmtree(directory, ignore_errors=True)
        assert alive and rc == 0, f"lossd died or failed to stop ({rc}):\n{server.stderr_text()}"


@pytest.fixture(scope="module")
def unix_target(shm_server) -> str:
    return f"unix:{shm_server[1]}"


def _inputs(shape=(33, 257), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-12, 12, shape).astype(np.float64)
    y = rng.uniform(0, 1, shape)
    w = rng.uniform(0, 2, shape[-1:])
    p = rng.uniform(0.5, 3, shape[-1:])
    if BF16 is not None and dtype == BF16:
        return tuple(a.astype(np.float32).astype(BF16) for a in (x, y, w, p))
    return tuple(a.astype(dtype) for a in (x, y, w, p))


def _same_bits(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, what
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    assert a.tobytes() == b.tobytes(), what


def _in_region(client: lossd.Client, arr: np.ndarray) -> bool:
    return client._shm is not None and client._shm.arena.locate(arr) is not None


def _object(name: str, size: int) -> int:
    import _posixshmem
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    os.ftruncate(fd, size)
    return fd


def _unlink(name: str) -> None:
    import _posixshmem
    try:
        _posixshmem.shm_unlink(name)
    except OSError:
        pass


def _raw_evaluate(target: str, request: "pb.EvaluateRequest") -> "pb.EvaluateResponse":
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/lossd.v1.LossService/Evaluate",
                                   request_serializer=pb.EvaluateRequest.SerializeToString,
                                   response_deserializer=pb.EvaluateResponse.FromString)
        return call(request, timeout=30)


def _ref_request(handle: str, offset: int, n: int, byte_size=None) -> "pb.EvaluateRequest":
    size = 4 * n if byte_size is None else byte_size
    req = pb.EvaluateRequest(reduction=pb.REDUCTION_SUM)
    req.logits.dtype = pb.DTYPE_FLOAT32
    req.logits.shape.append(n)
    req.logits.ref.region = handle
    req.logits.ref.offset = offset
    req.logits.ref.byte_size = size
    req.targets.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n],
                                   data=np.zeros(n, np.float32).tobytes()))
    req.bce_with_logits.SetInParent()
    return req


# ---- results equal the bytes path --------------------------------------------------------

DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "per_sample_mean"])
def test_shared_memory_results_equal_the_bytes_path(unix_target, shm_server, dtype,
                                                    reduction) -> None:
    x, y, w, p = _inputs(dtype=dtype)
    kwargs = dict(weight=w, pos_weight=p, reduction=reduction, grad=True, grad_targets=True)
    with lossd.Client(unix_target, shared_memory="off") as plain, \
            lossd.Client(unix_target, shared_memory="on") as shm, \
            lossd.Client(shm_server[0].target, shared_memory="on") as tcp:
        assert shm.shared_memory and tcp.shared_memory and not plain.shared_memory
        expected = plain.bce_with_logits(x, y, **kwargs)
        for client in (shm, tcp):
            got = client.bce_with_logits(x, y, **kwargs)
            for name in ("loss", "grad", "grad_targets"):
                _same_bits(getattr(got, name), getattr(expected, name), f"{name} {reduction}")
            assert got.num_elements == x.size
            if reduction in ("none", "per_sample_mean"):
                assert _in_region(client, got.loss)
            assert _in_region(client, got.grad) and _in_region(client, got.grad_targets)
        focal_expected = plain.sigmoid_focal_loss(x, y, weight=w, reduction=reduction,
                                                  grad=True)
        focal = shm.sigmoid_focal_loss(x, y, weight=w, reduction=reduction, grad=True)
        _same_bits(focal.loss, focal_expected.loss, "focal loss")
        _same_bits(focal.grad, focal_expected.grad, "focal grad")


def test_options_and_large_tensors_without_chunking(unix_target) -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-8, 8, (2048, 1500)).astype(np.float32)  # 12 MB: chunked as bytes
    y = rng.integers(-1, 2, x.shape).astype(np.float32)
    kwargs = dict(reduction="mean", grad=True, ignore_index=-1, normalize=True,
                  label_smoothing=0.1)
    with lossd.Client(unix_target, shared_memory="off") as plain, \
            lossd.Client(unix_target, shared_memory="on", max_message_bytes=1 << 20) as shm:
        expected = plain.bce_with_logits(x, y, **kwargs)
        got = shm.bce_with_logits(x, y, **kwargs)
        _same_bits(got.loss, expected.loss, "loss")
        _same_bits(got.grad, expected.grad, "grad")
        # Accumulate still goes as bytes (chunks under the message limit), same bits.
        acc = shm.accumulate([(x[:1000], y[:1000]), (x[1000:], y[1000:])], reduction="sum")
        assert acc.loss == plain.accumulate([(x, y)], reduction="sum").loss


def test_inputs_in_the_region_are_referenced_without_copies(unix_target) -> None:
    x0, y0, _, _ = _inputs(seed=5)
    with lossd.Client(unix_target, shared_memory="on") as client:
        x = client.empty(x0.shape, np.float32)
        y = client.empty(y0.shape, np.float32)
        x[...] = x0
        y[...] = y0
        assert _in_region(client, x) and _in_region(client, y)
        arena = client._shm.arena
        allocated: List[int] = []
        original = arena.allocate

        def counting(nbytes: int):
            allocated.append(nbytes)
            return original(nbytes)

        arena.allocate = counting  # type: ignore[method-assign]
        got = client.bce_with_logits(x, y, reduction="none", grad=True)
        assert allocated == [x.nbytes, x.nbytes]  # the two outputs, no input copies
        expected = client.bce_with_logits(x0.copy(), y0.copy(), reduction="none", grad=True)
        _same_bits(got.loss, expected.loss, "loss")
        _same_bits(got.grad, expected.grad, "grad")
        # A view into the region is referenced too.
        half = client.bce_with_logits(x[:10], y[:10], reduction="sum")
        assert half.loss.tobytes() == client.bce_with_logits(
            x0[:10].copy(), y0[:10].copy(), reduction="sum").loss.tobytes()


def test_output_blocks_return_to_the_arena(unix_target) -> None:
    x, y, _, _ = _inputs(seed=6)
    with lossd.Client(unix_target, shared_memory="on") as client:
        assert client.shared_memory
        segment = client._shm.arena.segments[0]
        client.bce_with_logits(x, y, reduction="none", grad=True)  # warm up
        gc.collect()
        before = segment.used
        r = client.bce_with_logits(x, y, reduction="none", grad=True)
        block = (x.nbytes + ALIGN - 1) // ALIGN * ALIGN
        assert segment.used == before + 2 * block
        del r
        gc.collect()
        assert segment.used == before
        arr = client.empty((100,), np.float64)
        view = arr[10:20]
        del arr
        gc.collect()
        assert segment.used > before  # the view keeps the block
        del view
        gc.collect()
        assert segment.used == before


def test_outputs_grow_the_arena_past_its_first_segment(unix_target) -> None:
    rng = np.random.default_rng(8)
    x = rng.uniform(-5, 5, (4096, 2048)).astype(np.float32)  # 32 MB, > the first 16 MiB
    y = (rng.random(x.shape) > 0.5).astype(np.float32)
    with lossd.Client(unix_target, shared_memory="on") as client, \
            lossd.Client(unix_target, shared_memory="off") as plain:
        got = client.bce_with_logits(x, y, reduction="none", grad=True)
        assert len(client._shm.arena.segments) >= 2
        expected = plain.bce_with_logits(x, y, reduction="none", grad=True)
        _same_bits(got.loss, expected.loss, "loss")
        _same_bits(got.grad, expected.grad, "grad")


def test_async_client_uses_shared_memory(unix_target) -> None:
    x, y, w, _ = _inputs(seed=9)

    async def run():
        async with lossd.AsyncClient(unix_target, shared_memory="on") as client:
            r = await client.bce_with_logits(x, y, weight=w, reduction="none", grad=True)
            assert client.shared_memory is True
            buf = await client.empty(x.shape, np.float32)
            buf[...] = x
            r2 = await client.bce_with_logits(buf, y, weight=w, reduction="none", grad=True)
            return r, r2

    r, r2 = asyncio.run(run())
    with lossd.Client(unix_target, shared_memory="off") as plain:
        expected = plain.bce_with_logits(x, y, weight=w, reduction="none", grad=True)
    for got in (r, r2):
        _same_bits(got.loss, expected.loss, "loss")
        _same_bits(got.grad, expected.grad, "grad")


# ---- errors ------------------------------------------------------------------------------


def test_bad_references_are_invalid_arguments_and_unknown_handles_not_found(
        unix_target) -> None:
    name = f"/lossd-e2e-{os.getpid()}-refs"
    fd = _object(name, 4096)
    try:
        with grpc.insecure_channel(unix_target) as channel:
            control = Control(channel, None)
            handle = control.register(name, 4096, "refs").region
            ok = _raw_evaluate(unix_target, _ref_request(handle, 0, 1024))
            assert ok.loss.dtype == pb.DTYPE_FLOAT32
            for offset, n, byte_size, needle in ((4, 1024, None, "logits"),
                                                 (4096, 1, None, "4096"),
                                                 (2 ** 64 - 4, 1, None, "logits"),
                                                 (0, 16, 60, "byte_size")):
                with pytest.raises(grpc.RpcError) as info:
                    _raw_evaluate(unix_target, _ref_request(handle, offset, n, byte_size))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
                assert needle in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                _raw_evaluate(unix_target, _ref_request("0" * 32, 0, 16))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            control.unregister(handle)
            with pytest.raises(grpc.RpcError) as info:
                _raw_evaluate(unix_target, _ref_request(handle, 0, 16))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(lossd.LossdError) as err:
                control.unregister(handle)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        os.close(fd)
        _unlink(name)


def test_registration_errors(unix_target, shm_server) -> None:
    name = f"/lossd-e2e-{os.getpid()}-reg"
    fd = _object(name, 8192)
    try:
        with grpc.insecure_channel(unix_target) as channel:
            control = Control(channel, None)
            for key, size, code, needle in (
                    ("/elsewhere-x", 8, grpc.StatusCode.INVALID_ARGUMENT, "prefix"),
                    ("/lossd-a/b", 8, grpc.StatusCode.INVALID_ARGUMENT, "'/'"),
                    (name, 8193, grpc.StatusCode.INVALID_ARGUMENT, "8192"),
                    (name + "-missing", 8, grpc.StatusCode.NOT_FOUND, "missing")):
                with pytest.raises(lossd.LossdError) as err:
                    control.register(key, size, "bad")
                assert err.value.code == code, err.value
                assert needle in err.value.details
            assert len(control.list().regions) == 0
    finally:
        os.close(fd)
        _unlink(name)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_another_uids_object_is_refused(unix_target, shm_server) -> None:
    name = f"/lossd-e2e-{os.getpid()}-chown"
    fd = _object(name, 4096)
    try:
        os.fchown(fd, 65534, 65534)
        for target in (unix_target, shm_server[0].target):
            with grpc.insecure_channel(target) as channel:
                with pytest.raises(lossd.LossdError) as err:
                    Control(channel, None).register(name, 4096, "not mine")
                assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert "uid 65534" in err.value.details
    finally:
        os.close(fd)
        _unlink(name)


def test_a_region_unlinked_under_the_server_still_works(unix_target) -> None:
    x, y, _, _ = _inputs(seed=11)
    with lossd.Client(unix_target, shared_memory="on") as client, \
            lossd.Client(unix_target, shared_memory="off") as plain:
        assert client.shared_memory
        for segment in client._shm.arena.segments:
            _unlink(segment.name)  # still mapped by both processes
        got = client.bce_with_logits(x, y, reduction="none", grad=True)
        expected = plain.bce_with_logits(x, y, reduction="none", grad=True)
        _same_bits(got.loss, expected.loss, "loss")
        _same_bits(got.grad, expected.grad, "grad")


def test_a_region_truncated_under_the_server_fails_cleanly(unix_target, shm_server) -> None:
    name = f"/lossd-e2e-{os.getpid()}-trunc"
    n = 64 * 1024
    fd = _object(name, 4 * n)
    try:
        os.pwrite(fd, np.linspace(-3, 3, n).astype(np.float32).tobytes(), 0)
        with grpc.insecure_channel(unix_target) as channel:
            control = Control(channel, None)
            handle = control.register(name, 4 * n, "truncated").region
            _raw_evaluate(unix_target, _ref_request(handle, 0, n))
            os.ftruncate(fd, 0)
            for _ in range(2):  # the first read faults; the next is refused up front
                with pytest.raises(grpc.RpcError) as info:
                    _raw_evaluate(unix_target, _ref_request(handle, 0, n))
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
            control.unregister(handle)
        assert shm_server[0].proc.poll() is None
        with lossd.Client(unix_target, shared_memory="on") as client:
            x, y, _, _ = _inputs(seed=12)
            assert client.bce_with_logits(x, y).loss.dtype == np.float32
            assert client.health() == "SERVING"
    finally:
        os.close(fd)
        _unlink(name)


def test_shared_memory_on_fails_clearly_when_registration_fails(shm_server) -> None:
    # A server whose shared memory is disabled.
    directory = tempfile.mkdtemp(prefix="lossd-shm-")
    path = os.path.join(directory, "off.sock")
    server = start_server("--unix_socket", path, "--shared_memory_prefix=")
    try:
        with lossd.Client(f"unix:{path}", shared_memory="on") as client:
            with pytest.raises(lossd.FailedPreconditionError) as err:
                client.bce_with_logits(np.zeros(4, np.float32), np.ones(4, np.float32))
            assert "shared_memory='on'" in str(err.value)
        with lossd.Client(f"unix:{path}") as client:  # auto: bytes
            assert not client.shared_memory
            assert client.bce_with_logits(np.zeros(4, np.float32),
                                          np.ones(4, np.float32)).loss.dtype == np.float32
    finally:
        assert server.stop() == 0
        shutil.rmtree(directory, ignore_errors=True)


# ---- life of registrations ---------------------------------------------------------------


def test_close_unregisters_and_unlinks(unix_target) -> None:
    with grpc.insecure_channel(unix_target) as channel:
        observer = Control(channel, None)
        before = {r.key for r in observer.list().regions}
        client = lossd.Client(unix_target, shared_memory="on")
        out = client.bce_with_logits(np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32),
                                     reduction="none")
        names = [s.name for s in client._shm.arena.segments]
        assert set(names) <= {r.key for r in observer.list().regions}
        assert all(os.path.exists("/dev/shm" + n) for n in names)
        client.close()
        assert not ({r.key for r in observer.list().regions} - before)
        assert not any(os.path.exists("/dev/shm" + n) for n in names)
        assert float(out.loss[0, 0]) > 0  # still readable after close


def test_leases_end_without_renewal() -> None:
    directory = tempfile.mkdtemp(prefix="lossd-shm-")
    path = os.path.join(directory, "lease.sock")
    server = start_server("--unix_socket", path, "--shared_memory_max_lease=300ms")
    name = f"/lossd-e2e-{os.getpid()}-lease"
    fd = _object(name, 4096)
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            control = Control(channel, None)
            reply = control.register(name, 4096, "lease", lease_ms=60000)
            assert reply.lease_ms == 300
            while control.list().regions:  # no renewal: the registration goes
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as info:
                _raw_evaluate(f"unix:{path}", _ref_request(reply.region, 0, 16))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert control.renew([reply.region]).unknown == [reply.region]
        # A client renews at a third of the lease: its region outlives many leases.
        with lossd.Client(f"unix:{path}", shared_memory="on") as client:
            x, y, _, _ = _inputs(seed=13)
            first = client.bce_with_logits(x, y, reduction="sum")
            time.sleep(1.0)
            assert client.bce_with_logits(x, y, reduction="sum").loss == first.loss
    finally:
        os.close(fd)
        _unlink(name)
        assert server.stop() == 0
        shutil.rmtree(directory, ignore_errors=True)


# ---- concurrency -------------------------------------------------------------------------


def _process_worker(target: str, seed: int, queue) -> None:
    x, y, _, _ = _inputs(seed=seed)
    with lossd.Client(target, shared_memory="on") as client:
        r = client.bce_with_logits(x, y, reduction="none", grad=True)
        queue.put((seed, client._shm.arena.segments[0].name, r.loss.tobytes(),
                   r.grad.tobytes()))


def test_concurrent_clients_in_threads_and_processes(unix_target) -> None:
    seeds = list(range(20, 24))
    with lossd.Client(unix_target, shared_memory="off") as plain:
        expected = {s: plain.bce_with_logits(*_inputs(seed=s)[:2], reduction="none", grad=True)
                    for s in seeds + [30, 31]}
    results = {}
    names = {}

    def thread_worker(seed: int) -> None:
        with lossd.Client(unix_target, shared_memory="on") as client:
            for _ in range(3):
                r = client.bce_with_logits(*_inputs(seed=seed)[:2], reduction="none", grad=True)
            results[seed] = r
            names[seed] = client._shm.arena.segments[0].name

    threads = [threading.Thread(target=thread_worker, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names.values())) == len(seeds)  # each client its own region
    for s in seeds:
        _same_bits(results[s].loss, expected[s].loss, f"thread {s} loss")
        _same_bits(results[s].grad, expected[s].grad, f"thread {s} grad")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(unix_target, s, queue)) for s in (30, 31)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len({g[1] for g in got}) == 2
    for seed, _, loss, grad in got:
        assert loss == expected[seed].loss.tobytes()
        assert grad == expected[seed].grad.tobytes()


# ---- auto mode ---------------------------------------------------------------------------


def test_auto_mode_picks_shared_memory_on_local_targets_and_logs_it(shm_server, unix_target,
                                                                    caplog) -> None:
    x, y, _, _ = _inputs(seed=40)
    for target, why in ((unix_target, "a Unix socket"), (shm_server[0].target, "loopback")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lossd"):
            with lossd.Client(target, shared_memory="auto") as client:
                r = client.bce_with_logits(x, y, reduction="none", grad=True)
                assert client.shared_memory, caplog.text
                assert _in_region(client, r.grad)
        lines = [rec.getMessage() for rec in caplog.records
                 if "shared memory" in rec.getMessage()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"lossd: shared memory on for {target}") and why in lines[0]


def test_default_is_bytes_even_on_local_targets(shm_server, unix_target) -> None:
    x, y, _, _ = _inputs(seed=41)
    for target in (unix_target, shm_server[0].target):
        with lossd.Client(target) as client:
            r = client.bce_with_logits(x, y, reduction="none", grad=True)
            assert not client.shared_memory
            assert not _in_region(client, r.grad)
