"""torch CUDA tensors passed to a server on the same GPU by CUDA IPC handles.

A server that computes on the client's GPU (``Capabilities.cuda_ipc``, with
``Capabilities.cuda_device_uuid`` the UUID of the tensor's device) maps the client's device
memory itself: the client registers each exported allocation as a ``REGION_KIND_CUDA_IPC``
region (``RegisterRegionRequest.cuda_ipc_handle``, see ``RegionKind`` in
proto/lossd/v1/lossd.proto), names its input tensors by ``TensorReference`` and places the
gradients (and a per-element loss) in fresh CUDA tensors it allocated, which the server
writes on the GPU. No tensor byte crosses the socket or the PCIe bus to the host. The
``SharedMemory`` service, leases and references are those of docs/shared-memory.md.

Exporting memory. torch's caching allocator carves tensors out of large ``cudaMalloc``
blocks. The block that holds a tensor is found with ``cuMemGetAddressRange`` and exported
with ``cuIpcGetMemHandle`` (the driver API, through ctypes); a tensor is then a range of
that block. torch's own ``UntypedStorage._share_cuda_()`` returns the same handle, but it
also moves the storage behind torch's inter-process reference counter, which only another
torch process releases: a block shared that way with a server that is not torch would
never return to the allocator. Memory that cannot be exported with a classic 64-byte
handle (``expandable_segments`` of ``PYTORCH_CUDA_ALLOC_CONF``) makes the client fall back
to the host path.

Registrations are cached per exported block, keyed by its handle bytes, so a training loop
registers each block once. The driver gives a new handle to memory allocated again at the
address of freed memory, so a block freed and reused is registered again, and the stale
region (same address, old handle) is unregistered at once. A daemon thread renews the
leases (the one of :mod:`lossd._shm`); regions the server no longer knows are dropped from
the cache; closing the client unregisters them all.

The choice of path is the pure function :func:`decide`; the client logs each decision once
(logger "lossd", INFO) and falls back to the host path when a registration fails for any
reason.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import grpc
import numpy as np

from ._errors import InternalError, LossdError, error_for
from ._proto.lossd.v1 import lossd_pb2 as pb
from ._shm import Control, _build_request, _loss_shape, _renew_loop, _tensor_message, \
    local_target, parse_reply, placed_result
from ._tensor import BFLOAT16, as_array, code_of, decode
from ._inputs import Operand
from ._types import LossResult
from ._wire import RequestOptions

__all__ = ["MODES", "HANDLE_BYTES", "Decision", "decide", "format_gpu_uuid", "ExportedBlock",
           "CudaIpcUnavailable", "CudaRegions", "CudaIpc", "TorchCuda"]

logger = logging.getLogger("lossd")

#: Values of the ``cuda_ipc`` argument of the clients.
MODES = ("auto", "on", "off")
#: Size of a cudaIpcMemHandle_t (CU_IPC_HANDLE_SIZE).
HANDLE_BYTES = 64
#: Registered blocks kept per client; the least recently used one is unregistered beyond it
#: (the server also limits the regions of one uid, docs/shared-memory.md).
MAX_REGIONS = 128
#: The device memory of a call that failed without the server's answer (a deadline, a
#: cancellation, a lost connection) is kept this long, for at most LIMBO_CALLS calls: the
#: server may still be writing the outputs, and memory returned to torch's allocator at
#: once could be handed to another tensor under those writes.
LIMBO_S = 60.0
LIMBO_CALLS = 16

PATH_CUDA_IPC = "cuda_ipc"
PATH_HOST = "host"

_UUID_HEX = re.compile(r"^[0-9a-f]{32}$")


# ---------------------------------------------------------------------------------------
# The decision


def format_gpu_uuid(value: Any) -> str:
    """A GPU's UUID as nvidia-smi -L prints it: ``"GPU-"`` and the 8-4-4-4-12 lowercase
    hex form.

    Accepts the 16 bytes (``bytes``, or a sequence of 16 integers 0..255 such as
    ``torch.cuda.get_device_properties(i).uuid.bytes``), an object with such a ``bytes``
    attribute (torch's ``_CUuuid``, ``uuid.UUID``), or a string of 32 hex digits with or
    without dashes and the ``GPU-`` prefix, in any case.

    Raises
    ------
    ValueError
        Anything else (the message shows the value).
    """
    raw = value
    if not isinstance(raw, (str, bytes, bytearray, list, tuple)) and hasattr(raw, "bytes"):
        raw = raw.bytes
    if isinstance(raw, (list, tuple)):
        if not all(isinstance(b, int) and 0 <= b <= 255 for b in raw):
            raise ValueError(f"GPU UUID: expected 16 bytes, got {value!r}")
        raw = bytes(raw)
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) != 16:
            raise ValueError(f"GPU UUID: expected 16 bytes, got {len(raw)} ({value!r})")
        digits = raw.hex()
    elif isinstance(raw, str):
        text = raw.strip().lower()
        if text.startswith("gpu-"):
            text = text[4:]
        digits = text.replace("-", "")
        if not _UUID_HEX.match(digits) or (
                "-" in text and [len(p) for p in text.split("-")] != [8, 4, 4, 4, 12]):
            raise ValueError(f"GPU UUID: expected 32 hex digits (8-4-4-4-12), got {value!r}")
    else:
        raise ValueError(f"GPU UUID: expected bytes or a string, got {type(value).__name__}")
    return (f"GPU-{digits[0:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-"
            f"{digits[20:32]}")


@dataclass(frozen=True)
class Decision:
    """Which path an evaluation of CUDA tensors takes, and why (for the log)."""

    path: str  # PATH_CUDA_IPC or PATH_HOST
    reason: str

    @property
    def cuda_ipc(self) -> bool:
        return self.path == PATH_CUDA_IPC


def decide(mode: str, target: str, local: Tuple[bool, str],
           capabilities: Callable[[], Optional["pb.Capabilities"]], device: str,
           device_uuid: Optional[str], request_device: int = pb.DEVICE_AUTO,
           dtype_forced: bool = False) -> Decision:
    """The path of an evaluation whose logits are a CUDA tensor.

    Parameters
    ----------
    mode : {"auto", "on", "off"}
        The client's ``cuda_ipc``; "on" skips the locality check (the UUID check still
        proves that the server is on this machine's GPU).
    target : str
        The client's target, for the messages.
    local : (bool, str)
        :func:`lossd._shm.local_target` of the target.
    capabilities : callable
        Returns the server's ``Capabilities`` (None: the server has no capabilities call);
        called only when the decision needs them.
    device : str
        The logits' device ("cuda:0").
    device_uuid : str or None
        Its UUID (:func:`format_gpu_uuid`); None when torch does not report it.
    request_device : lossd.v1.Device
        The call's ``device`` option.
    dtype_forced : bool
        The call passed ``dtype=`` (the client converts the values on the host).
    """
    def host(reason: str) -> Decision:
        return Decision(PATH_HOST, reason)

    if mode == "off":
        return host("cuda_ipc='off'")
    if request_device == pb.DEVICE_CPU:
        return host("device='cpu' was asked (CUDA IPC tensors are computed on the GPU)")
    if dtype_forced:
        return host("dtype= converts the tensors on the host")
    is_local, why = local
    if mode == "auto" and not is_local:
        return host(f"{target} is {why}")
    caps = capabilities()
    if caps is None:
        return host("the server has no capabilities call")
    if not caps.cuda_ipc:
        return host("the server does not offer it (Capabilities.cuda_ipc is false)")
    if device_uuid is None:
        return host(f"the UUID of {device} is unknown (torch does not report it)")
    try:
        server_uuid = format_gpu_uuid(caps.cuda_device_uuid)
    except ValueError:
        return host(f"the server's GPU UUID {caps.cuda_device_uuid!r} is not a GPU UUID")
    if server_uuid != device_uuid:
        return host(f"the server's GPU {server_uuid} is not {device} ({device_uuid})")
    return Decision(PATH_CUDA_IPC,
                    f"{why if is_local else 'mode on'}, the server's GPU is {device} "
                    f"({device_uuid})")


# ---------------------------------------------------------------------------------------
# Exporting device memory (CUDA driver API)


class CudaIpcUnavailable(Exception):
    """The memory of a tensor cannot be exported with a classic CUDA IPC handle."""


@dataclass(frozen=True)
class ExportedBlock:
    """The ``cudaMalloc`` allocation that contains a pointer: its handle, base and size."""

    handle: bytes  # HANDLE_BYTES
    base: int
    size: int


_CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10


class _Driver:
    """The few driver calls that export memory, on the process's primary contexts."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise CudaIpcUnavailable(f"cannot load the CUDA driver (libcuda.so.1): {exc}") \
                from None
        self._lib = lib
        u64, c_int, vp = ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p

        def fn(name: str, *argtypes: Any) -> Any:
            f = getattr(lib, name)
            f.argtypes = list(argtypes)
            f.restype = c_int
            return f

        self._init = fn("cuInit", ctypes.c_uint)
        self._error_string = fn("cuGetErrorString", c_int, ctypes.POINTER(ctypes.c_char_p))
        self._device_get = fn("cuDeviceGet", ctypes.POINTER(c_int), c_int)
        self._retain = fn("cuDevicePrimaryCtxRetain", ctypes.POINTER(vp), c_int)
        self._push = fn("cuCtxPushCurrent_v2", vp)
        self._pop = fn("cuCtxPopCurrent_v2", ctypes.POINTER(vp))
        self._attribute = fn("cuPointerGetAttribute", vp, c_int, u64)
        self._range = fn("cuMemGetAddressRange_v2", ctypes.POINTER(u64),
                         ctypes.POINTER(ctypes.c_size_t), u64)
        self._ipc_handle = fn("cuIpcGetMemHandle", ctypes.c_char_p, u64)
        self._contexts: Dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()
        self._check(self._init(0), "cuInit")

    def _message(self, result: int) -> str:
        text = ctypes.c_char_p()
        if self._error_string(result, ctypes.byref(text)) == 0 and text.value:
            return f"{text.value.decode(errors='replace')} ({result})"
        return f"CUDA error {result}"

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise CudaIpcUnavailable(f"{what} failed: {self._message(result)}")

    def _context(self, ordinal: int) -> ctypes.c_void_p:
        """The primary context of a device (the one torch uses), retained once for good."""
        with self._lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                dev = ctypes.c_int()
                self._check(self._device_get(ctypes.byref(dev), ordinal), "cuDeviceGet")
                ctx = ctypes.c_void_p()
                self._check(self._retain(ctypes.byref(ctx), dev.value),
                            "cuDevicePrimaryCtxRetain")
                self._contexts[ordinal] = ctx
            return ctx

    def export(self, pointer: int, ordinal: int) -> ExportedBlock:
        ctx = self._context(ordinal)
        self._check(self._push(ctx), "cuCtxPushCurrent")
        try:
            capable = ctypes.c_int(0)  # 1 or 0, whether the driver writes 1 or 4 bytes
            if self._attribute(ctypes.byref(capable),
                               _CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                               pointer) == 0 and capable.value == 0:
                raise CudaIpcUnavailable(
                    f"the memory at 0x{pointer:x} cannot be exported with cudaIpcGetMemHandle "
                    "(is PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True set?)")
            base, size = ctypes.c_uint64(), ctypes.c_size_t()
            self._check(self._range(ctypes.byref(base), ctypes.byref(size), pointer),
                        "cuMemGetAddressRange")
            handle = ctypes.create_string_buffer(HANDLE_BYTES)
            self._check(self._ipc_handle(handle, base.value), "cuIpcGetMemHandle")
            return ExportedBlock(handle.raw, int(base.value), int(size.value))
        finally:
            popped = ctypes.c_void_p()
            self._pop(ctypes.byref(popped))


_driver: Optional[_Driver] = None
_driver_lock = threading.Lock()


def _the_driver() -> _Driver:
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = _Driver()
        return _driver


# ---------------------------------------------------------------------------------------
# What the path needs from torch


class TorchCuda:
    """torch's side of the path (torch is imported by the caller, never here).

    The client reaches torch only through these methods, so that tests without a GPU can
    substitute another device backend.
    """

    def __init__(self) -> None:
        self._uuids: Dict[int, Optional[str]] = {}

    @staticmethod
    def _torch() -> Any:
        return sys.modules.get("torch")

    def device_index(self, value: Any) -> Optional[int]:
        """The CUDA device index of a torch CUDA tensor; None for anything else."""
        torch = self._torch()
        if torch is None or not isinstance(value, torch.Tensor) or value.device.type != "cuda":
            return None
        index = value.device.index
        return int(index) if index is not None else int(torch.cuda.current_device())

    def wire_code(self, t: Any) -> Optional[int]:
        """The wire dtype of a float tensor; None for other dtypes."""
        torch = self._torch()
        return {torch.float32: pb.DTYPE_FLOAT32, torch.float64: pb.DTYPE_FLOAT64,
                torch.float16: pb.DTYPE_FLOAT16, torch.bfloat16: pb.DTYPE_BFLOAT16}.get(t.dtype)

    def host_dtype(self, t: Any) -> np.dtype:
        """The numpy dtype of the tensor on the host path (what ``like`` is there)."""
        torch = self._torch()
        if t.dtype == torch.bfloat16:
            return BFLOAT16 if BFLOAT16 is not None else np.dtype(np.float32)
        names: Dict[Any, str] = {torch.float32: "<f4", torch.float64: "<f8",
                                 torch.float16: "<f2"}
        return np.dtype(names[t.dtype])

    def uuid(self, index: int) -> Optional[str]:
        if index not in self._uuids:
            torch = self._torch()
            try:
                self._uuids[index] = format_gpu_uuid(
                    torch.cuda.get_device_properties(index).uuid)
            except (AttributeError, ValueError):  # torch before 2.0 has no uuid
                self._uuids[index] = None
        return self._uuids[index]

    @staticmethod
    def dense(t: Any) -> Any:
        """The tensor's values in a C-contiguous tensor on its device (itself if it is)."""
        t = t.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        return t.contiguous()

    @staticmethod
    def pointer(t: Any) -> Tuple[int, int]:
        """(address, bytes) of a dense tensor."""
        return int(t.data_ptr()), int(t.numel()) * int(t.element_size())

    @staticmethod
    def shape(t: Any) -> Tuple[int, ...]:
        return tuple(int(d) for d in t.shape)

    def empty(self, shape: Tuple[int, ...], like: Any) -> Any:
        return self._torch().empty(shape, dtype=like.dtype, device=like.device)

    def synchronize(self, index: int) -> None:
        """Waits for the work queued on the caller's current stream of the device (the
        inputs' producers, and the earlier users of memory the outputs reuse)."""
        self._torch().cuda.current_stream(index).synchronize()

    @staticmethod
    def export(pointer: int, index: int) -> ExportedBlock:
        return _the_driver().export(pointer, index)

    def from_host(self, array: Any, like: Any) -> Any:
        """An output that came back as bytes, as a tensor like the logits."""
        from ._torch_interop import TorchSpec, to_torch
        return to_torch(array, TorchSpec(like.dtype, like.device))

    def to_host(self, value: Any) -> Tuple[Any, Optional[int]]:
        """An input for the host path: (array, wire dtype override)."""
        from ._torch_interop import from_torch, is_tensor
        if is_tensor(value):
            return from_torch(value)
        return value, None


# ---------------------------------------------------------------------------------------
# Registered blocks


@dataclass
class Region:
    """A registered block."""

    handle: str  # RegisterRegionResponse.region
    device: int
    key: bytes  # the CUDA IPC handle
    base: int
    size: int
    lease_ms: int


@dataclass
class _RegionsState:
    """What the cache's finalizer needs (never the cache itself)."""

    control: Control
    pid: int
    regions: "OrderedDict[Tuple[int, bytes], Region]" = field(default_factory=OrderedDict)
    stop: threading.Event = field(default_factory=threading.Event)
    closed: bool = False


def _unregister(control: Control, region: Region) -> None:
    try:
        control.unregister(region.handle, timeout=2.0)
    except Exception:  # the server is gone or dropped it already: the lease ends it
        pass


def _close_regions(state: _RegionsState) -> None:
    """Unregisters every block; at most once, and only in the registering process."""
    if state.closed:
        return
    state.closed = True
    state.stop.set()
    if os.getpid() == state.pid:
        for region in list(state.regions.values()):
            _unregister(state.control, region)
    state.regions.clear()


class CudaRegions:
    """The blocks a client registered, by (device, handle bytes). Thread-safe."""

    def __init__(self, control: Control, name: str) -> None:
        self._lock = threading.Lock()
        self._name = name
        self._state = _RegionsState(control, os.getpid())
        self._finalizer = weakref.finalize(self, _close_regions, self._state)
        self._renewer: Optional[threading.Thread] = None
        #: RegisterRegion calls made (the tests check that blocks are registered once).
        self.registrations = 0

    def __len__(self) -> int:
        return len(self._state.regions)

    @property
    def closed(self) -> bool:
        return self._state.closed

    def region(self, device: int, uuid: str, block: ExportedBlock) -> Region:
        """The region of a block, registering it on first use.

        Raises
        ------
        LossdError
            The registration failed.
        """
        key = (device, block.handle)
        with self._lock:
            if self._state.closed:
                raise ValueError("the client is closed")
            regions = self._state.regions
            region = regions.get(key)
            if region is not None and region.base == block.base and region.size == block.size:
                regions.move_to_end(key)
                return region
            stale = [r for k, r in regions.items()
                     if k == key or (r.device == device and r.base == block.base)]
            for r in stale:  # freed and allocated again: the server must let it go now
                del regions[(r.device, r.key)]
                _unregister(self._state.control, r)
            reply = self._state.control.register_cuda(
                block.handle, uuid, 0, block.size, self._name)
            self.registrations += 1
            region = Region(reply.region, device, block.handle, block.base, block.size,
                            reply.lease_ms)
            regions[key] = region
            while len(regions) > MAX_REGIONS:
                _, oldest = regions.popitem(last=False)
                _unregister(self._state.control, oldest)
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=_renew_loop, args=(weakref.ref(self), self._state.stop),
                    name="lossd-cuda-ipc-lease", daemon=True)
                self._renewer.start()
            return region

    def forget(self, regions: List[Region]) -> None:
        """Drops regions the server no longer knows (they are registered again on use)."""
        with self._lock:
            for r in regions:
                if self._state.regions.get((r.device, r.key)) is r:
                    del self._state.regions[(r.device, r.key)]

    def lease_s(self) -> float:
        leases = [r.lease_ms for r in self._state.regions.values() if r.lease_ms]
        return min(leases) / 1000.0 if leases else 30.0

    def renew(self) -> None:
        """Renews every lease; regions the server reports unknown leave the cache."""
        with self._lock:
            regions = list(self._state.regions.values())
        if not regions or self._state.closed:
            return
        reply = self._state.control.renew([r.handle for r in regions])
        unknown = set(reply.unknown)
        dropped = [r for r in regions if r.handle in unknown]
        if dropped:
            logger.info("lossd: the server dropped %d CUDA IPC region(s); they are registered "
                        "again when used", len(dropped))
            self.forget(dropped)

    def close(self) -> None:
        self._finalizer()


# ---------------------------------------------------------------------------------------
# One evaluation


_INPUTS = ("logits", "targets", "weight", "pos_weight")


class CudaCall:
    """One ``Evaluate`` whose CUDA tensors travel by reference: the request, and the result
    once the reply arrives. Holds the tensors the server reads or writes until then."""

    def __init__(self, backend: Any, regions: CudaRegions, device: int, uuid: str,
                 request_id: str, options: RequestOptions, values: Tuple[Any, ...]) -> None:
        self._backend = backend
        self._regions = regions
        self._device = device
        self._uuid = uuid
        self._options = options
        self.used: List[Region] = []
        self._keep: List[Any] = []
        self._outputs: Dict[str, Tuple[Any, "pb.TensorReference"]] = {}
        self.request_id = request_id
        self.request = self._prepare(values)

    def _reference(self, t: Any) -> "pb.TensorReference":
        address, nbytes = self._backend.pointer(t)
        block = self._backend.export(address, self._device)
        if not block.base <= address or address + nbytes > block.base + block.size:
            raise CudaIpcUnavailable(f"the memory at 0x{address:x} ({nbytes} bytes) is not "
                                     f"inside its allocation at 0x{block.base:x} "
                                     f"({block.size} bytes)")
        if len(block.handle) != HANDLE_BYTES:
            raise CudaIpcUnavailable(f"a CUDA IPC handle of {len(block.handle)} bytes (the "
                                     f"server takes the {HANDLE_BYTES}-byte format)")
        region = self._regions.region(self._device, self._uuid, block)
        if region not in self.used:
            self.used.append(region)
        return pb.TensorReference(region=region.handle, offset=address - block.base,
                                  byte_size=nbytes)

    def _prepare(self, values: Tuple[Any, ...]) -> bytes:
        b = self._backend
        logits = values[0]
        self._logits = logits
        like = b.host_dtype(logits)
        out_code = b.wire_code(logits)
        self.shape: Tuple[int, ...] = b.shape(logits)
        tensors: Dict[str, "pb.Tensor"] = {}
        for name, value in zip(_INPUTS, values):
            if value is None or (name == "pos_weight" and self._options.loss != "bce"):
                continue
            code = b.wire_code(value) if b.device_index(value) == self._device else None
            if code is None:
                # Not a float tensor on this GPU: bytes, converted as on the host path.
                array, override = b.to_host(value)
                arr = as_array(name, array, None if name == "logits" else like)
                wire = Operand(arr, override or code_of(arr.dtype)).wire()  # type: ignore
                tensors[name] = _tensor_message(wire)
                continue
            t = b.dense(value)
            self._keep.append(t)
            shape = b.shape(t)
            if b.pointer(t)[1] == 0:
                tensors[name] = pb.Tensor(dtype=code, shape=shape)  # type: ignore[arg-type]
            else:
                tensors[name] = pb.Tensor(dtype=code, shape=shape,  # type: ignore[arg-type]
                                          ref=self._reference(t))
        o = self._options
        wanted: List[Tuple[str, Tuple[int, ...]]] = []
        loss_shape = _loss_shape(self.shape, o.reduction or pb.REDUCTION_MEAN)
        if loss_shape:
            wanted.append(("loss", loss_shape))
        if o.grad_logits:
            wanted.append(("grad_logits", self.shape))
        if o.grad_targets:
            wanted.append(("grad_targets", self.shape))
        refs: Dict[str, "pb.TensorReference"] = {}
        for name, shape in wanted:
            if int(np.prod(shape, dtype=np.int64)) == 0:
                continue  # nothing to place: comes back as (no) bytes
            out = b.empty(shape, logits)
            ref = self._reference(out)
            self._outputs[name] = (out, ref)
            refs[name] = ref
        self._out_code = out_code
        # The server reads and writes this memory once the request arrives: the work queued
        # on it (the inputs' producers, and the earlier users of the outputs' memory) must
        # be done.
        b.synchronize(self._device)
        return _build_request(self.request_id, tensors, o, refs)

    def _output(self, reply: "pb.EvaluateResponse", name: str) -> Any:
        tensor = getattr(reply, name)
        if name not in self._outputs:
            return self._backend.from_host(decode(tensor, name), self._logits)
        out, ref = self._outputs[name]
        got = tensor.ref
        if (got.region != ref.region or got.offset != ref.offset
                or tuple(tensor.shape) != self._backend.shape(out) or tensor.data
                or tensor.dtype != self._out_code):
            raise InternalError(grpc.StatusCode.INTERNAL, (
                f"client: response {name} is not the placed CUDA output (shape "
                f"{list(tensor.shape)}, ref offset {got.offset}; expected "
                f"{list(self._backend.shape(out))} at offset {ref.offset})"))
        return out

    def memory(self) -> List[Any]:
        """The tensors the server may read or write for this call (the copies made for
        it and the outputs)."""
        return list(self._keep) + [out for out, _ in self._outputs.values()]

    def result(self, raw: bytes) -> LossResult:
        reply = parse_reply(raw)
        o = self._options
        loss = self._output(reply, "loss")
        grad = self._output(reply, "grad_logits") if o.grad_logits else None
        grad_targets = self._output(reply, "grad_targets") if o.grad_targets else None
        self._keep.clear()
        return placed_result(reply, loss, grad, grad_targets)


# ---------------------------------------------------------------------------------------
# The client's state


class CudaIpc:
    """The CUDA IPC path of one client: the decisions, the registered blocks, the calls.

    Parameters
    ----------
    mode : {"auto", "on", "off"}
    target : str
        The client's gRPC target.
    control : callable
        Returns the client's :class:`lossd._shm.Control` (opened on first use).
    """

    def __init__(self, mode: str, target: str, control: Callable[[], Control]) -> None:
        self.mode = mode
        self.target = target
        self._control = control
        self.backend: Any = TorchCuda()
        self._lock = threading.Lock()
        self._capabilities: Optional[Tuple[Optional["pb.Capabilities"]]] = None
        self._broken: Dict[int, str] = {}
        self._logged: set = set()
        self._regions: Optional[CudaRegions] = None
        self._closed = False
        self._limbo: "deque[Tuple[float, List[Any]]]" = deque(maxlen=LIMBO_CALLS)
        #: The decision of the latest evaluation of CUDA logits (None before any).
        self.last: Optional[Decision] = None

    # -- decisions ------------------------------------------------------------------------

    def candidate(self, logits: Any) -> bool:
        """True when the logits are a float tensor on a CUDA device (the path may apply)."""
        if self.mode == "off":
            return False
        b = self.backend
        return b.device_index(logits) is not None and b.wire_code(logits) is not None

    def needs_capabilities(self, logits: Any) -> bool:
        """True when deciding the path of these logits would ask the server (first time)."""
        return (self.candidate(logits) and self._capabilities is None
                and (self.mode == "on" or local_target(self.target)[0]))

    def fetch_capabilities(self) -> None:
        """Asks the server now (the asyncio client calls it in its executor)."""
        self._server_capabilities()

    def _server_capabilities(self) -> Optional["pb.Capabilities"]:
        with self._lock:
            if self._capabilities is not None:
                return self._capabilities[0]
        try:
            caps: Optional[pb.Capabilities] = self._control().capabilities()
        except LossdError as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise  # the evaluation would fail the same way; decided at the next one
            caps = None
        with self._lock:
            self._capabilities = (caps,)
        return caps

    def _record(self, decision: Decision, device: str) -> None:
        """Keeps the decision and logs it once (per path, device and reason)."""
        self.last = decision
        key = (decision.path, device, decision.reason)
        with self._lock:
            if key in self._logged:
                return
            self._logged.add(key)
        if decision.cuda_ipc:
            logger.info("lossd: CUDA IPC on for %s (%s): %s; CUDA tensors travel as "
                        "references to their device memory", self.target, device,
                        decision.reason)
        else:
            logger.info("lossd: CUDA IPC off for %s (%s): %s; CUDA tensors are copied to the "
                        "host", self.target, device, decision.reason)

    def _refuse(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION
                ) -> LossdError:
        return error_for(code, f"cuda_ipc='on': CUDA IPC with {self.target} is not "
                               f"available: {reason}")

    def decision(self, logits: Any, options: RequestOptions, dtype_forced: bool) -> Decision:
        b = self.backend
        index = b.device_index(logits)
        device = f"cuda:{index}"
        if index in self._broken:
            decision = Decision(PATH_HOST, self._broken[index])
        else:
            decision = decide(self.mode, self.target, local_target(self.target),
                              self._server_capabilities, device, b.uuid(index),
                              options.device, dtype_forced)
        if not decision.cuda_ipc:
            self._record(decision, device)
            if self.mode == "on":
                raise self._refuse(decision.reason)
        return decision  # CUDA IPC is recorded once the call's registrations succeeded

    # -- calls ----------------------------------------------------------------------------

    def _regions_of(self) -> CudaRegions:
        with self._lock:
            if self._closed:
                raise ValueError("the client is closed")
            if self._regions is None:
                self._regions = CudaRegions(self._control(),
                                            f"lossd-python pid {os.getpid()} cuda")
            return self._regions

    @property
    def regions(self) -> Optional[CudaRegions]:
        return self._regions

    def call(self, values: Tuple[Any, ...], options: RequestOptions, request_id: str,
             dtype_forced: bool) -> Optional[CudaCall]:
        """The call of an evaluation through CUDA IPC, or None for the host path (decided,
        logged, and raised for mode "on").

        Raises
        ------
        LossdError
            Mode "on" and the path is unavailable; or the capabilities call failed.
        ValueError
            A bad input that is not a tensor on the GPU (as the host path raises it).
        """
        logits = values[0]
        if not self.candidate(logits):
            return None
        decision = self.decision(logits, options, dtype_forced)
        if not decision.cuda_ipc:
            return None
        index = self.backend.device_index(logits)
        device = f"cuda:{index}"
        uuid = self.backend.uuid(index)
        try:
            call = CudaCall(self.backend, self._regions_of(), index, uuid, request_id, options,
                            values)
            self._record(decision, device)
            return call
        except (LossdError, CudaIpcUnavailable) as exc:
            if isinstance(exc, LossdError):
                reason = f"registering a CUDA IPC region failed ({exc})"
                code = exc.code
            else:
                reason = f"exporting the tensor's memory failed ({exc})"
                code = grpc.StatusCode.FAILED_PRECONDITION
            # The server refuses the kind, the GPU or the memory: the same would happen at
            # every call, so this device stays on the host path.
            self._broken[index] = reason
            self._record(Decision(PATH_HOST, reason), device)
            if self.mode == "on":
                raise self._refuse(reason, code) from None
            return None

    def abandon(self, call: CudaCall) -> None:
        """Keeps the memory of a failed call a while (LIMBO_S)."""
        now = time.monotonic()
        with self._lock:
            while self._limbo and now - self._limbo[0][0] > LIMBO_S:
                self._limbo.popleft()
            self._limbo.append((now, call.memory()))

    def forget(self, call: CudaCall) -> None:
        """After NOT_FOUND for a call's regions: the server dropped them."""
        if self._regions is not None:
            self._regions.forget(call.used)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            regions = self._regions
        if regions is not None:
            regions.close()
