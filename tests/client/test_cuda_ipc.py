"""The CUDA IPC path of the client without a GPU: the decision (a pure function) and the UUID
format; the whole path with a stand-in device backend against an in-process fake server
(references, placed outputs, registrations cached per block, NOT_FOUND, leases, close); and
the fallback against a real lossd server over a real socket, which does not take CUDA IPC
regions: results bitwise equal to the host path, the reason logged, cuda_ipc="on" raising.

The stand-in backend (FakeCuda) replaces lossd._cuda_ipc.TorchCuda: its "CUDA tensors" are
numpy arrays carved out of pooled host blocks, exported with made-up 64-byte handles. The
GPU tests of the real torch path are in tests/e2e/test_torch.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import threading
import uuid as uuidlib
from concurrent import futures
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import grpc
import numpy as np
import pytest

import lossd
from lossd._cuda_ipc import (
    PATH_CUDA_IPC, PATH_HOST, CudaIpcUnavailable, CudaRegions, ExportedBlock, decide,
    format_gpu_uuid,
)
from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc
from lossd._tensor import code_of
from lossd._wire import RequestOptions

UUID = "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
OTHER_UUID = "GPU-ffffffff-0000-1111-2222-333333333333"


# ---------------------------------------------------------------------------------------
# format_gpu_uuid


def test_uuid_formats() -> None:
    raw = bytes.fromhex("0a1b2c3d4e5f60718293a4b5c6d7e8f9")
    assert format_gpu_uuid(raw) == UUID
    assert format_gpu_uuid(list(raw)) == UUID  # torch's _CUuuid.bytes: a list of ints

    class CUuuid:  # torch's object: .bytes and a str() without the prefix
        bytes = list(raw)

    assert format_gpu_uuid(CUuuid()) == UUID
    assert format_gpu_uuid(uuidlib.UUID(bytes=raw)) == UUID
    assert format_gpu_uuid("0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9") == UUID
    assert format_gpu_uuid("GPU-0A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9") == UUID
    assert format_gpu_uuid("0a1b2c3d4e5f60718293a4b5c6d7e8f9") == UUID
    assert format_gpu_uuid(" gpu-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9 ") == UUID


@pytest.mark.parametrize("bad", [
    b"\x00" * 15, b"\x00" * 17, [0] * 15, [256] + [0] * 15, [-1] + [0] * 15,
    "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f", "GPU-0a1b2c3d4e5f-6071-8293-a4b5c6d7e8f9",
    "MIG-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9", "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8fz", "",
    None, 12345,
])
def test_malformed_uuids_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="GPU UUID"):
        format_gpu_uuid(bad)


# ---------------------------------------------------------------------------------------
# decide


def _caps(offer: bool = True, uuid: str = UUID) -> pb.Capabilities:
    return pb.Capabilities(cuda_ipc=offer, cuda_device_uuid=uuid)


LOCAL = (True, "a loopback address")
REMOTE = (False, "not a Unix socket or a loopback address")


def _decide(mode: str = "auto", local=LOCAL, caps=None, uuid: Optional[str] = UUID,
            request_device: int = pb.DEVICE_AUTO, dtype_forced: bool = False,
            calls: Optional[List[int]] = None):
    caps = _caps() if caps is None else caps

    def capabilities():
        if calls is not None:
            calls.append(1)
        return None if caps == "none" else caps

    return decide(mode, "127.0.0.1:5", local, capabilities, "cuda:0", uuid, request_device,
                  dtype_forced)


def test_decide_uses_cuda_ipc_for_a_local_server_on_the_same_gpu() -> None:
    d = _decide()
    assert d.path == PATH_CUDA_IPC and d.cuda_ipc
    assert d.reason == f"a loopback address, the server's GPU is cuda:0 ({UUID})"
    d = _decide(caps=_caps(uuid=UUID.upper()))  # the server's spelling is normalized
    assert d.cuda_ipc


def test_decide_mode_on_skips_only_the_locality_check() -> None:
    d = _decide(mode="on", local=REMOTE)
    assert d.cuda_ipc and d.reason.startswith("mode on,")
    assert not _decide(mode="on", local=REMOTE, caps=_caps(offer=False)).cuda_ipc


@pytest.mark.parametrize("kwargs, reason, asks", [
    (dict(mode="off"), "cuda_ipc='off'", False),
    (dict(request_device=pb.DEVICE_CPU),
     "device='cpu' was asked (CUDA IPC tensors are computed on the GPU)", False),
    (dict(dtype_forced=True), "dtype= converts the tensors on the host", False),
    (dict(local=REMOTE), "127.0.0.1:5 is not a Unix socket or a loopback address", False),
    (dict(caps="none"), "the server has no capabilities call", True),
    (dict(caps=_caps(offer=False)),
     "the server does not offer it (Capabilities.cuda_ipc is false)", True),
    (dict(uuid=None), "the UUID of cuda:0 is unknown (torch does not report it)", True),
    (dict(caps=_caps(uuid="")), "the server's GPU UUID '' is not a GPU UUID", True),
    (dict(caps=_caps(uuid=OTHER_UUID)),
     f"the server's GPU {OTHER_UUID} is not cuda:0 ({UUID})", True),
])
def test_decide_host_branches(kwargs, reason, asks) -> None:
    calls: List[int] = []
    d = _decide(calls=calls, **kwargs)
    assert d.path == PATH_HOST and not d.cuda_ipc
    assert d.reason == reason
    assert bool(calls) == asks  # the server is asked only when the decision needs it


# ---------------------------------------------------------------------------------------
# A stand-in device backend


class Dev(np.ndarray):
    """A "CUDA tensor" of the stand-in backend: an array that lives on a device index."""

    index: int = 0

    def __array_finalize__(self, obj) -> None:
        self.index = getattr(obj, "index", 0)


class FakeCuda:
    """The methods of lossd._cuda_ipc.TorchCuda over pooled host blocks ("cudaMalloc"
    blocks carved into tensors, as torch's caching allocator does)."""

    BLOCK = 1 << 20

    def __init__(self, uuid: Optional[str] = UUID, exportable: bool = True) -> None:
        self._uuid = uuid
        self.exportable = exportable
        self.blocks: List[Tuple[np.ndarray, bytes]] = []
        self._used = 0
        self.synchronized = 0
        self.exports = 0

    # -- allocation
    def _take(self, nbytes: int) -> np.ndarray:
        need = (max(nbytes, 1) + 255) // 256 * 256
        if not self.blocks or self._used + need > self.BLOCK:
            root = np.zeros(self.BLOCK, np.uint8)
            generation = len(self.blocks)
            handle = hashlib.sha512(f"block {generation}".encode()).digest()
            self.blocks.append((root, handle))
            self._used = 0
        root = self.blocks[-1][0]
        out = root[self._used:self._used + nbytes]
        self._used += need
        return out

    def tensor(self, values: np.ndarray, index: int = 0) -> Dev:
        values = np.asarray(values)
        mem = self._take(values.nbytes).view(values.dtype).reshape(values.shape)
        mem[...] = values
        t = mem.view(Dev)
        t.index = index
        return t

    def allocation(self, handle: bytes) -> np.ndarray:
        for root, h in self.blocks:
            if h == handle:
                return root
        raise KeyError(handle.hex()[:16])

    # -- TorchCuda's methods
    def device_index(self, value) -> Optional[int]:
        return value.index if isinstance(value, Dev) else None

    def wire_code(self, t) -> Optional[int]:
        return code_of(t.dtype)

    def host_dtype(self, t) -> np.dtype:
        return t.dtype

    def uuid(self, index: int) -> Optional[str]:
        return self._uuid

    def dense(self, t):
        if t.flags.c_contiguous:
            return t
        return self.tensor(np.ascontiguousarray(t), t.index)

    @staticmethod
    def pointer(t) -> Tuple[int, int]:
        return int(t.__array_interface__["data"][0]), int(t.nbytes)

    @staticmethod
    def shape(t) -> Tuple[int, ...]:
        return tuple(int(d) for d in t.shape)

    def empty(self, shape, like):
        return self.tensor(np.zeros(shape, like.dtype), like.index)

    def synchronize(self, index: int) -> None:
        self.synchronized += 1

    def export(self, pointer: int, index: int) -> ExportedBlock:
        self.exports += 1
        if not self.exportable:
            raise CudaIpcUnavailable("the memory cannot be exported (stand-in)")
        for root, handle in self.blocks:
            base = int(root.__array_interface__["data"][0])
            if base <= pointer < base + root.nbytes:
                return ExportedBlock(handle, base, root.nbytes)
        raise CudaIpcUnavailable(f"0x{pointer:x} is in no block")

    def from_host(self, array, like):
        return self.tensor(np.array(array), like.index)

    def to_host(self, value):
        return (np.asarray(value) if isinstance(value, Dev) else value), None


# ---------------------------------------------------------------------------------------
# An in-process fake server that takes CUDA IPC regions


class FakeIpcServer(pb_grpc.LossServiceServicer, pb_grpc.SharedMemoryServicer):
    """Reads the referenced memory through the stand-in backend; loss = x * y per element
    (summed for the mean and sum), dl/dx = x + y, dl/dy = x - y."""

    def __init__(self, backend: FakeCuda) -> None:
        self.backend = backend
        self.regions: Dict[str, Tuple[bytes, int, int]] = {}
        self.registered: List[pb.RegisterRegionRequest] = []
        self.unregistered: List[str] = []
        self.requests: List[pb.EvaluateRequest] = []
        self.not_found_once = False
        self.hold = threading.Event()  # set: Evaluate waits until it is cleared
        self.lock = threading.Lock()

    def GetCapabilities(self, request, context):
        return pb.Capabilities(server_version="fake", cuda_ipc=True, cuda_device_uuid=UUID)

    def RegisterRegion(self, request, context):
        if request.kind != pb.REGION_KIND_CUDA_IPC or len(request.cuda_ipc_handle) != 64 \
                or request.cuda_device_uuid != UUID or request.key:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad CUDA IPC registration")
        with self.lock:
            handle = f"r{len(self.registered)}"
            self.registered.append(request)
            self.regions[handle] = (request.cuda_ipc_handle, request.offset, request.byte_size)
        return pb.RegisterRegionResponse(region=handle, lease_ms=60000)

    def RenewLease(self, request, context):
        unknown = [h for h in request.regions if h not in self.regions]
        return pb.RenewLeaseResponse(unknown=unknown, lease_ms=60000)

    def UnregisterRegion(self, request, context):
        with self.lock:
            self.unregistered.append(request.region)
            self.regions.pop(request.region, None)
        return pb.UnregisterRegionResponse()

    def _memory(self, ref: pb.TensorReference, context) -> np.ndarray:
        if ref.region not in self.regions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"region {ref.region} is not registered")
        key, offset, size = self.regions[ref.region]
        assert ref.offset + ref.byte_size <= size
        root = self.backend.allocation(key)
        return root[offset + ref.offset: offset + ref.offset + ref.byte_size]

    def _input(self, t: pb.Tensor, context) -> np.ndarray:
        dt = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT64: "<f8"}[t.dtype]
        raw = self._memory(t.ref, context) if t.HasField("ref") else np.frombuffer(t.data,
                                                                                   np.uint8)
        return raw.view(dt).astype(np.float64).reshape(tuple(t.shape))

    def Evaluate(self, request, context):
        self.requests.append(request)
        while self.hold.is_set() and context.is_active():
            threading.Event().wait(0.01)
        if self.not_found_once:
            self.not_found_once = False
            self.regions.clear()
            context.abort(grpc.StatusCode.NOT_FOUND, "region expired")
        x = self._input(request.logits, context)
        y = self._input(request.targets, context)
        dt = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT64: np.float64}[request.logits.dtype]
        reply = pb.EvaluateResponse(request_id=request.request_id, device=pb.DEVICE_CUDA,
                                    num_elements=x.size)
        outputs = {"loss": x * y}
        if request.reduction != pb.REDUCTION_NONE:
            outputs["loss"] = np.array((x * y).sum())
        if request.gradients.logits:
            outputs["grad_logits"] = x + y
        if request.gradients.targets:
            outputs["grad_targets"] = x - y
        for name, value in outputs.items():
            value = value.astype(dt)
            placed = getattr(request.outputs, name)
            target = getattr(reply, name)
            target.dtype = request.logits.dtype
            target.shape.extend(value.shape)
            if request.outputs.HasField(name):
                self._memory(placed, context).view(dt)[...] = value.reshape(-1)
                target.ref.CopyFrom(placed)
            else:
                target.data = value.tobytes()
        return reply


@pytest.fixture()
def fake_ipc() -> Iterator[Tuple[FakeIpcServer, FakeCuda, str]]:
    backend = FakeCuda()
    service = FakeIpcServer(backend)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_LossServiceServicer_to_server(service, server)
    pb_grpc.add_SharedMemoryServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield service, backend, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _client(target: str, backend: FakeCuda, **kwargs) -> lossd.Client:
    client = lossd.Client(target, timeout=30, **kwargs)
    client._cuda.backend = backend
    return client


def _values(shape=(5, 7), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-4, 4, shape).astype(dtype), rng.uniform(0, 1, shape).astype(dtype))


def test_tensors_travel_as_references_and_outputs_are_placed(fake_ipc, caplog) -> None:
    service, backend, target = fake_ipc
    x, y = _values()
    with caplog.at_level(logging.INFO, logger="lossd"):
        with _client(target, backend) as client:
            dx, dy = backend.tensor(x), backend.tensor(y)
            r = client.bce_with_logits(dx, dy, reduction="none", grad=True, grad_targets=True)
            assert client.cuda_ipc_decision.path == PATH_CUDA_IPC
            request = service.requests[-1]
            for name in ("logits", "targets"):
                t = getattr(request, name)
                assert t.HasField("ref") and not t.data, name
                assert t.ref.byte_size == x.nbytes
            for name in ("loss", "grad_logits", "grad_targets"):
                assert request.outputs.HasField(name), name
            # The results are the stand-in device arrays the server wrote.
            for got, want in ((r.loss, x.astype(np.float64) * y),
                              (r.grad, x.astype(np.float64) + y),
                              (r.grad_targets, x.astype(np.float64) - y)):
                assert isinstance(got, Dev) and got.index == 0
                assert got.tobytes() == want.astype(np.float32).tobytes()
            assert r.device == "cuda" and backend.synchronized == 1
            assert len(service.registered) == 1  # one block holds inputs and outputs
            reg = service.registered[0]
            assert reg.offset == 0 and reg.byte_size == FakeCuda.BLOCK and reg.name

            # Mean: the scalar loss comes back as bytes, converted to the logits' device.
            r = client.bce_with_logits(dx, dy, grad=True)
            assert isinstance(r.loss, Dev) and r.loss.shape == ()
            assert r.loss.tobytes() == np.float32((x.astype(np.float64) * y).sum()).tobytes()
            assert not service.requests[-1].outputs.HasField("loss")
            assert len(service.registered) == 1  # the block is registered once
        assert service.unregistered == ["r0"]  # close() unregisters
    lines = [r.getMessage() for r in caplog.records if "CUDA IPC" in r.getMessage()]
    assert lines == [f"lossd: CUDA IPC on for {target} (cuda:0): a loopback address, the "
                     f"server's GPU is cuda:0 ({UUID}); CUDA tensors travel as references to "
                     "their device memory"]


def test_mixed_inputs_and_non_contiguous_tensors(fake_ipc) -> None:
    service, backend, target = fake_ipc
    x, y = _values((6, 4))
    with _client(target, backend) as client:
        dx = backend.tensor(x.T.copy()).T  # a transposed view: made dense on the device
        r = client.bce_with_logits(dx, y.astype(np.float64), reduction="none", grad=True)
        request = service.requests[-1]
        assert request.logits.HasField("ref")
        assert request.targets.data and request.targets.dtype == pb.DTYPE_FLOAT64  # bytes
        assert r.loss.tobytes() == (x.astype(np.float64) * y.astype(np.float64)).astype(
            np.float32).tobytes()
        # Integer targets on the device are converted as on the host path.
        r = client.bce_with_logits(backend.tensor(x), backend.tensor(np.ones(x.shape, np.int64)),
                                   reduction="none")
        assert service.requests[-1].targets.dtype == pb.DTYPE_FLOAT32
        assert r.loss.tobytes() == x.tobytes()


def test_new_blocks_are_registered_and_stale_ones_dropped(fake_ipc) -> None:
    service, backend, target = fake_ipc
    x, y = _values()
    with _client(target, backend) as client:
        client.bce_with_logits(backend.tensor(x), backend.tensor(y), reduction="none")
        assert len(service.registered) == 1
        backend._used = FakeCuda.BLOCK  # the next tensors come from a new block
        client.bce_with_logits(backend.tensor(x), backend.tensor(y), reduction="none")
        assert len(service.registered) == 2 and len(client._cuda.regions) == 2
        # A block freed and allocated again at the same address: a new handle, so it is
        # registered again and its stale registration is unregistered at once.
        root, _ = backend.blocks[-1]
        backend.blocks[-1] = (root, hashlib.sha512(b"reused").digest())
        client.bce_with_logits(backend.tensor(x), backend.tensor(y), reduction="none")
        assert len(service.registered) == 3 and service.unregistered == ["r1"]
        assert len(client._cuda.regions) == 2


def test_not_found_registers_again_and_retries_once(fake_ipc) -> None:
    service, backend, target = fake_ipc
    x, y = _values()
    with _client(target, backend) as client:
        dx, dy = backend.tensor(x), backend.tensor(y)
        client.bce_with_logits(dx, dy, reduction="none")
        service.not_found_once = True
        r = client.bce_with_logits(dx, dy, reduction="none", grad=True)
        assert len(service.registered) == 2 and len(service.requests) == 3
        assert r.grad.tobytes() == (x.astype(np.float64) + y).astype(np.float32).tobytes()


def test_memory_of_an_unanswered_call_is_kept(fake_ipc) -> None:
    service, backend, target = fake_ipc
    x, y = _values()
    with _client(target, backend) as client:
        service.hold.set()  # the server does not answer before the deadline
        try:
            with pytest.raises(lossd.DeadlineExceededError):
                client.bce_with_logits(backend.tensor(x), backend.tensor(y), reduction="none",
                                       grad=True, timeout=0.3)
        finally:
            service.hold.clear()
        # The inputs and the two outputs (loss, grad) the server may still write.
        (_, kept), = client._cuda._limbo
        assert len(kept) == 4 and all(isinstance(t, Dev) and t.shape == x.shape for t in kept)
        r = client.bce_with_logits(backend.tensor(x), backend.tensor(y), reduction="none")
        assert r.loss.tobytes() == (x.astype(np.float64) * y).astype(np.float32).tobytes()


def test_renewal_drops_regions_the_server_forgot(fake_ipc) -> None:
    service, backend, target = fake_ipc
    x, y = _values()
    with _client(target, backend) as client:
        client.bce_with_logits(backend.tensor(x), backend.tensor(y), reduction="none")
        regions = client._cuda.regions
        assert isinstance(regions, CudaRegions) and len(regions) == 1
        regions.renew()
        assert len(regions) == 1
        service.regions.clear()  # the lease ended on the server
        regions.renew()
        assert len(regions) == 0
        client.bce_with_logits(backend.tensor(x), backend.tensor(y), reduction="none")
        assert len(service.registered) == 2


def test_async_client_takes_the_same_path(fake_ipc) -> None:
    service, backend, target = fake_ipc
    x, y = _values()

    async def run():
        async with lossd.AsyncClient(target, timeout=30) as client:
            client._cuda.backend = backend
            r = await client.bce_with_logits(backend.tensor(x), backend.tensor(y),
                                             reduction="none", grad=True)
            assert client.cuda_ipc_decision.cuda_ipc
            return r

    r = asyncio.run(run())
    assert isinstance(r.grad, Dev)
    assert r.grad.tobytes() == (x.astype(np.float64) + y).astype(np.float32).tobytes()
    assert len(service.registered) == 1 and service.unregistered == ["r0"]


def test_memory_that_cannot_be_exported_takes_the_host_path(fake_ipc, caplog) -> None:
    service, backend, target = fake_ipc
    backend.exportable = False
    x, y = _values()
    with caplog.at_level(logging.INFO, logger="lossd"):
        with _client(target, backend) as client:
            r = client.bce_with_logits(backend.tensor(x), backend.tensor(y), reduction="none")
            assert client.cuda_ipc_decision.path == PATH_HOST
            assert "exporting the tensor's memory failed" in client.cuda_ipc_decision.reason
            assert not isinstance(r.loss, Dev)  # the host path's arrays
            assert service.requests[-1].logits.data and not service.registered
        with _client(target, backend, cuda_ipc="on") as client:
            with pytest.raises(lossd.FailedPreconditionError, match="cuda_ipc='on'.*export"):
                client.bce_with_logits(backend.tensor(x), backend.tensor(y))


# ---------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("bad", ["yes", "ON", "", None, True])
def test_bad_cuda_ipc_values_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="cuda_ipc: expected 'auto', 'on' or 'off'"):
        lossd.Client("127.0.0.1:1", cuda_ipc=bad)

    async def make():
        lossd.AsyncClient("127.0.0.1:1", cuda_ipc=bad)

    with pytest.raises(ValueError, match="cuda_ipc"):
        asyncio.run(make())


def test_remote_target_is_decided_without_calling(caplog) -> None:
    backend = FakeCuda()
    x, y = _values()
    with caplog.at_level(logging.INFO, logger="lossd"):
        with _client("10.255.255.1:9", backend) as client:
            assert client._cuda.call((backend.tensor(x), backend.tensor(y), None, None),
                                     RequestOptions(), "id", False) is None
            assert client.cuda_ipc_decision.reason == (
                "10.255.255.1:9 is not a Unix socket or a loopback address")
    assert [r.getMessage() for r in caplog.records if "CUDA IPC" in r.getMessage()] == [
        "lossd: CUDA IPC off for 10.255.255.1:9 (cuda:0): 10.255.255.1:9 is not a Unix "
        "socket or a loopback address; CUDA tensors are copied to the host"]


# ---------------------------------------------------------------------------------------
# Against the real server, which takes no CUDA IPC regions


def _e2e_conftest():
    path = Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"
    spec = importlib.util.spec_from_file_location("lossd_e2e_conftest_for_cuda_ipc", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_server() -> Iterator[str]:
    server = _e2e_conftest().start_server()
    try:
        yield server.target
    finally:
        alive = server.proc.poll() is None
        rc = server.stop()
        assert alive and rc == 0, f"lossd died or failed to stop ({rc}):\n{server.stderr_text()}"


def _offering(client: lossd.Client) -> None:
    """Makes the client see a server that offers CUDA IPC on the stand-in GPU (the real
    server's registration then decides)."""
    client._cuda._capabilities = (pb.Capabilities(cuda_ipc=True, cuda_device_uuid=UUID),)


def _same(a, b, what: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert a.tobytes() == b.tobytes(), what


def test_real_server_refusing_the_registration_gives_the_host_path(real_server, caplog) -> None:
    backend = FakeCuda()
    x, y = _values((9, 13), seed=3)
    w = np.linspace(0.5, 2, 13).astype(np.float32)
    with lossd.Client(real_server, cuda_ipc="off") as host:
        want = host.bce_with_logits(x, y, weight=w, reduction="none", grad=True,
                                    grad_targets=True)
        want_mean = host.bce_with_logits(x, y, grad=True)
    with caplog.at_level(logging.INFO, logger="lossd"):
        with _client(real_server, backend) as client:
            _offering(client)
            dx, dy = backend.tensor(x), backend.tensor(y)
            got = client.bce_with_logits(dx, dy, weight=w, reduction="none", grad=True,
                                         grad_targets=True)
            decision = client.cuda_ipc_decision
            assert decision.path == PATH_HOST
            assert decision.reason.startswith("registering a CUDA IPC region failed (")
            for name in ("loss", "grad", "grad_targets"):
                _same(getattr(got, name), getattr(want, name), name)
            exports = backend.exports
            got = client.bce_with_logits(dx, dy, grad=True)  # no second attempt
            assert backend.exports == exports
            _same(got.loss, want_mean.loss, "mean loss")
            _same(got.grad, want_mean.grad, "mean grad")
    lines = [r.getMessage() for r in caplog.records if "CUDA IPC" in r.getMessage()]
    assert len(lines) == 1, lines  # logged once, after the failed registration
    assert lines[0].startswith(f"lossd: CUDA IPC off for {real_server} (cuda:0): registering a "
                               "CUDA IPC region failed (")
    assert lines[0].endswith("; CUDA tensors are copied to the host")


def test_real_server_refusing_the_registration_raises_with_mode_on(real_server) -> None:
    backend = FakeCuda()
    x, y = _values()
    with _client(real_server, backend, cuda_ipc="on") as client:
        _offering(client)
        with pytest.raises(lossd.LossdError,
                           match="cuda_ipc='on': CUDA IPC with .* is not available: "
                                 "registering a CUDA IPC region failed"):
            client.bce_with_logits(backend.tensor(x), backend.tensor(y))


def test_real_server_capabilities_say_no(real_server, caplog) -> None:
    backend = FakeCuda()
    x, y = _values()
    with lossd.Client(real_server, cuda_ipc="off") as host:
        want = host.bce_with_logits(x, y, reduction="none", grad=True)
    with caplog.at_level(logging.INFO, logger="lossd"):
        with _client(real_server, backend) as client:
            assert not client.capabilities().cuda_ipc
            got = client.bce_with_logits(backend.tensor(x), backend.tensor(y),
                                         reduction="none", grad=True)
            assert client.cuda_ipc_decision.reason == (
                "the server does not offer it (Capabilities.cuda_ipc is false)")
            _same(got.loss, want.loss, "loss")
            _same(got.grad, want.grad, "grad")
            assert backend.exports == 0
    assert any("CUDA IPC off" in r.getMessage() and "Capabilities.cuda_ipc is false"
               in r.getMessage() for r in caplog.records)
    with _client(real_server, backend, cuda_ipc="on") as client:
        with pytest.raises(lossd.FailedPreconditionError,
                           match=r"cuda_ipc='on'.*Capabilities.cuda_ipc is false"):
            client.bce_with_logits(backend.tensor(x), backend.tensor(y))
        # Inputs that are not CUDA tensors are not concerned by the option.
        r = client.bce_with_logits(x, y, reduction="none", grad=True)
        _same(r.loss, want.loss, "numpy logits")
        _same(r.grad, want.grad, "numpy logits' gradient")
        assert client.cuda_ipc_decision.path == PATH_HOST  # the CUDA logits' decision


def test_async_client_falls_back_on_the_real_server(real_server) -> None:
    backend = FakeCuda()
    x, y = _values(seed=5)
    with lossd.Client(real_server, cuda_ipc="off") as host:
        want = host.bce_with_logits(x, y, reduction="none", grad=True)

    async def run():
        async with lossd.AsyncClient(real_server, timeout=30) as client:
            client._cuda.backend = backend
            _offering(client)
            r = await client.bce_with_logits(backend.tensor(x), backend.tensor(y),
                                             reduction="none", grad=True)
            assert client.cuda_ipc_decision.path == PATH_HOST
            return r

    got = asyncio.run(run())
    _same(got.loss, want.loss, "loss")
    _same(got.grad, want.grad, "grad")
