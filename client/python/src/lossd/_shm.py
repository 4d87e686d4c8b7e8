"""Tensors passed through POSIX shared memory instead of the socket (docs/shared-memory.md).

A client on the server's host creates shared-memory objects named under the server's prefix
(``Capabilities.shared_memory_prefix``), maps them, and registers each with the server's
``lossd.v1.SharedMemory`` service, which returns an unguessable handle and a lease. An
``Evaluate`` request then names its tensors by ``TensorReference`` (handle, offset, size) and
asks for its outputs to be written into blocks of the same objects (``EvaluateRequest.outputs``):
no tensor byte crosses the socket and no message size limit applies.

:class:`Arena` is an allocator of blocks over those objects ("segments"): inputs that already
lie in a segment (arrays from :meth:`lossd.Client.empty`) are referenced in place, other
inputs are copied once into a block, and outputs come back as numpy arrays backed by blocks,
which return to the arena when the arrays are garbage-collected. A daemon thread renews the
leases; closing the client (or the interpreter's exit) unregisters and unlinks the objects.
"""

from __future__ import annotations

import ipaddress
import logging
import mmap
import os
import secrets
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from ._errors import InternalError, LossdError, error_for, from_rpc_error
from ._options import enum_name
from ._proto.lossd.v1 import lossd_pb2 as pb
from ._tensor import BFLOAT16, bfloat16_bits_to_float32, decode, itemsize_of, output_dtype
from ._types import LossResult, Timing
from ._wire import RequestOptions, WireTensor, request_message

try:  # CPython's own binding of shm_open/shm_unlink (what multiprocessing.shared_memory uses)
    import _posixshmem
except ImportError:  # pragma: no cover - other interpreters: the Linux path of shm_open
    _posixshmem = None

__all__ = ["MODES", "local_target", "Control", "Arena", "ShmTransport", "DEFAULT_PREFIX"]

logger = logging.getLogger("lossd")

#: Values of the ``shared_memory`` argument of the clients.
MODES = ("auto", "on", "off")
#: The server's default prefix, used when its capabilities do not name one.
DEFAULT_PREFIX = "/lossd-"
#: Size of the first segment; later ones double (or fit the block that needs them).
FIRST_SEGMENT_BYTES = 16 * 1024 * 1024
#: Blocks start on this boundary (cache lines, and every dtype's alignment).
ALIGN = 64
#: Inputs smaller than this that are not already in a segment travel inline (copying them
#: into a block would cost more than it saves).
INLINE_BYTES = 4096

_SERVICE = "/lossd.v1.SharedMemory/"
_CONTROL_TIMEOUT_S = 10.0


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


# ---------------------------------------------------------------------------------------
# Targets


def _host_is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _address_host(address: str) -> str:
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() else address


def local_target(target: str) -> Tuple[bool, str]:
    """Whether a gRPC target reaches this host: (local, reason for the log).

    Local: ``unix:`` and ``unix-abstract:`` sockets, and TCP to ``localhost``, 127.0.0.0/8
    or ``::1`` (also as ``ipv4:``/``ipv6:`` address lists and ``dns:`` names)."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return True, "a Unix socket"
    if t.startswith(("ipv4:", "ipv6:")):
        addresses = [a for a in t.split(":", 1)[1].split(",") if a]
        if addresses and all(_host_is_loopback(_address_host(a)) for a in addresses):
            return True, "loopback addresses"
        return False, "not a loopback address"
    if t.startswith("dns:"):
        t = t[4:]
        if t.startswith("//"):
            t = t[2:].partition("/")[2]  # dns://authority/host:port
    if _host_is_loopback(_address_host(t)):
        return True, "a loopback address"
    return False, "not a Unix socket or a loopback address"


# ---------------------------------------------------------------------------------------
# The SharedMemory service


class Control:
    """The ``lossd.v1.SharedMemory`` calls (and ``GetCapabilities``) on a synchronous channel."""

    def __init__(self, channel: grpc.Channel,
                 metadata: Optional[Tuple[Tuple[str, str], ...]]) -> None:
        self._metadata = metadata

        def stub(method: str, request: Any, response: Any) -> Any:
            return channel.unary_unary(method, request_serializer=request.SerializeToString,
                                       response_deserializer=response.FromString)

        self._register = stub(_SERVICE + "RegisterRegion", pb.RegisterRegionRequest,
                              pb.RegisterRegionResponse)
        self._renew = stub(_SERVICE + "RenewLease", pb.RenewLeaseRequest,
                           pb.RenewLeaseResponse)
        self._unregister = stub(_SERVICE + "UnregisterRegion", pb.UnregisterRegionRequest,
                                pb.UnregisterRegionResponse)
        self._list = stub(_SERVICE + "ListRegions", pb.ListRegionsRequest,
                          pb.ListRegionsResponse)
        self._capabilities = stub("/lossd.v1.LossService/GetCapabilities",
                                  pb.GetCapabilitiesRequest, pb.Capabilities)

    def _call(self, fn: Any, request: Any, timeout: float = _CONTROL_TIMEOUT_S) -> Any:
        try:
            return fn(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def capabilities(self) -> "pb.Capabilities":
        return self._call(self._capabilities, pb.GetCapabilitiesRequest())

    def register(self, key: str, size: int, name: str,
                 lease_ms: int = 0) -> "pb.RegisterRegionResponse":
        return self._call(self._register, pb.RegisterRegionRequest(
            name=name, kind=pb.REGION_KIND_SYSTEM, key=key, offset=0, byte_size=size,
            lease_ms=lease_ms))

    def register_cuda(self, handle: bytes, device_uuid: str, offset: int, size: int,
                      name: str, lease_ms: int = 0) -> "pb.RegisterRegionResponse":
        """Registers ``size`` bytes at ``offset`` of a client allocation exported with a CUDA
        IPC handle (``REGION_KIND_CUDA_IPC``; see lossd._cuda_ipc)."""
        return self._call(self._register, pb.RegisterRegionRequest(
            name=name, kind=pb.REGION_KIND_CUDA_IPC, offset=offset, byte_size=size,
            lease_ms=lease_ms, cuda_ipc_handle=handle, cuda_device_uuid=device_uuid))

    def renew(self, handles: Sequence[str]) -> "pb.RenewLeaseResponse":
        return self._call(self._renew, pb.RenewLeaseRequest(regions=list(handles)))

    def unregister(self, handle: str, timeout: float = _CONTROL_TIMEOUT_S) -> None:
        self._call(self._unregister, pb.UnregisterRegionRequest(region=handle), timeout)

    def list(self) -> "pb.ListRegionsResponse":
        return self._call(self._list, pb.ListRegionsRequest())


# ---------------------------------------------------------------------------------------
# Segments and the arena


def _shm_create(name: str) -> int:
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
    if _posixshmem is not None:
        return _posixshmem.shm_open(name, flags, mode=0o600)
    return os.open("/dev/shm" + name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _shm_unlink(name: str) -> None:
    try:
        if _posixshmem is not None:
            _posixshmem.shm_unlink(name)
        else:
            os.unlink("/dev/shm" + name)
    except OSError:
        pass  # already gone


class Segment:
    """One shared-memory object, mapped here and registered with the server."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.handle = ""
        self.lease_ms = 0
        fd = _shm_create(name)
        try:
            # Reserve the memory now: a full /dev/shm fails here (ENOSPC) instead of killing
            # this process with SIGBUS on the first write past what tmpfs can hold.
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot reserve {size} bytes of shared memory for "
                                         f"{name}: {exc.strerror}") from None
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            _shm_unlink(name)
            raise
        os.close(fd)
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)
        self.address = int(self.bytes.__array_interface__["data"][0])
        self.free: List[List[int]] = [[0, size]]  # sorted [offset, size] runs
        self.used = 0

    def allocate(self, nbytes: int) -> Optional[int]:
        """First fit; the offset of a block of ``nbytes`` (rounded to ALIGN) or None."""
        need = _round_up(max(nbytes, 1), ALIGN)
        for run in self.free:
            if run[1] >= need:
                offset = run[0]
                run[0] += need
                run[1] -= need
                if run[1] == 0:
                    self.free.remove(run)
                self.used += need
                return offset
        return None

    def release(self, offset: int, nbytes: int) -> None:
        need = _round_up(max(nbytes, 1), ALIGN)
        self.used -= need
        runs = self.free
        i = 0
        while i < len(runs) and runs[i][0] < offset:
            i += 1
        runs.insert(i, [offset, need])
        if i + 1 < len(runs) and runs[i][0] + runs[i][1] == runs[i + 1][0]:
            runs[i][1] += runs[i + 1][1]
            del runs[i + 1]
        if i > 0 and runs[i - 1][0] + runs[i - 1][1] == runs[i][0]:
            runs[i - 1][1] += runs[i][1]
            del runs[i]

    def contains(self, address: int, nbytes: int) -> bool:
        return self.address <= address and address + nbytes <= self.address + self.size

    def close(self) -> None:
        """Unmaps, unless arrays still use the memory (then it is unmapped with them)."""
        self.bytes = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            pass


@dataclass
class Block:
    """``nbytes`` at ``offset`` of ``segment``."""

    segment: Segment
    offset: int
    nbytes: int

    def ref(self) -> "pb.TensorReference":
        return pb.TensorReference(region=self.segment.handle, offset=self.offset,
                                  byte_size=self.nbytes)


@dataclass
class _State:
    """What the arena's finalizer needs (never the arena itself)."""

    control: Control
    pid: int
    segments: List[Segment] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    closed: bool = False


def _close_state(state: _State) -> None:
    """Unregisters and unlinks every segment; at most once, and only in the creating process
    (a forked child must not remove its parent's objects)."""
    if state.closed:
        return
    state.closed = True
    state.stop.set()
    if os.getpid() != state.pid:
        return
    for segment in state.segments:
        if segment.handle:
            try:
                state.control.unregister(segment.handle, timeout=2.0)
            except Exception:  # the server is gone or the channel closed: the lease ends it
                pass
        _shm_unlink(segment.name)
        segment.close()
    state.segments.clear()


class Arena:
    """Blocks of registered shared-memory segments. Thread-safe.

    Parameters
    ----------
    control : Control
    prefix : str
        The server's key prefix; objects are named ``prefix + "<pid>-<random>"``.
    first_bytes : int
        Size of the first segment (registered at once: the probe of the server).
    """

    def __init__(self, control: Control, prefix: str,
                 first_bytes: int = FIRST_SEGMENT_BYTES) -> None:
        self._lock = threading.Lock()
        self._prefix = prefix
        self._state = _State(control, os.getpid())
        self._finalizer = weakref.finalize(self, _close_state, self._state)
        self._add_segment(first_bytes)
        self._renewer = threading.Thread(target=_renew_loop,
                                         args=(weakref.ref(self), self._state.stop),
                                         name="lossd-shm-lease", daemon=True)
        self._renewer.start()

    # -- segments --------------------------------------------------------------------------

    def _add_segment(self, size: int) -> Segment:
        size = _round_up(size, mmap.PAGESIZE)
        name = f"{self._prefix}{os.getpid()}-{secrets.token_hex(8)}"
        segment = Segment(name, size)
        try:
            self._register(segment)
        except BaseException:
            _shm_unlink(name)
            segment.close()
            raise
        self._state.segments.append(segment)
        return segment

    def _register(self, segment: Segment) -> None:
        reply = self._state.control.register(segment.name, segment.size,
                                             f"lossd-python pid {os.getpid()}")
        segment.handle = reply.region
        segment.lease_ms = reply.lease_ms

    @property
    def segments(self) -> List[Segment]:
        return list(self._state.segments)

    @property
    def closed(self) -> bool:
        return self._state.closed

    def lease_s(self) -> float:
        leases = [s.lease_ms for s in self._state.segments if s.lease_ms]
        return min(leases) / 1000.0 if leases else 30.0

    def renew(self) -> None:
        """Renews every lease; a segment the server no longer knows (its lease ended while
        this process was stopped, say) is registered again under a new handle."""
        with self._lock:
            segments = list(self._state.segments)
        if not segments or self._state.closed:
            return
        reply = self._state.control.renew([s.handle for s in segments])
        unknown = set(reply.unknown)
        for segment in segments:
            if segment.handle in unknown:
                logger.info("lossd: shared-memory region %s was dropped by the server; "
                            "registering it again", segment.name)
                self._register(segment)

    # -- blocks ----------------------------------------------------------------------------

    def allocate(self, nbytes: int) -> Block:
        if self._state.closed:
            raise ValueError("the client is closed: its shared memory is released")
        with self._lock:
            for segment in self._state.segments:
                offset = segment.allocate(nbytes)
                if offset is not None:
                    return Block(segment, offset, nbytes)
            last = self._state.segments[-1].size if self._state.segments else 0
            segment = self._add_segment(max(2 * last, _round_up(nbytes, ALIGN)))
            offset = segment.allocate(nbytes)
            assert offset is not None
            return Block(segment, offset, nbytes)

    def free(self, block: Block) -> None:
        with self._lock:
            if not self._state.closed:
                block.segment.release(block.offset, block.nbytes)

    def view(self, block: Block, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The block as an array (no copy), for use while the block is held."""
        return self.owned(block, shape, dtype, owner=False)

    def owned(self, block: Block, shape: Tuple[int, ...], dtype: np.dtype,
              owner: bool = True) -> np.ndarray:
        """The block as an array; with ``owner``, the block returns to the arena once the
        array and every view of it are garbage-collected.

        The flat array from ``np.frombuffer`` holds an export of the mapping (so the mapping
        cannot be closed under it) and is the base that every reshape, slice or view of the
        result refers to: the finalizer goes on it."""
        count = 1
        for d in shape:
            count *= int(d)
        flat = np.frombuffer(block.segment.mm, dtype=dtype, count=count, offset=block.offset)
        if owner:
            weakref.finalize(flat, self.free, block)
        return flat.reshape(shape)

    def array(self, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A new array in a block, which returns to the arena when the array (and every
        view of it) is garbage-collected."""
        dtype = np.dtype(dtype)
        count = 1
        for d in shape:
            if int(d) < 0:
                raise ValueError(f"shape: negative dimension in {tuple(shape)}")
            count *= int(d)
        block = self.allocate(count * dtype.itemsize)
        return self.owned(block, tuple(int(d) for d in shape), dtype)

    def locate(self, data: np.ndarray) -> Optional[Block]:
        """The block spanned by a C-contiguous array's memory when it lies inside a segment."""
        if not data.flags.c_contiguous:
            return None
        address = int(data.__array_interface__["data"][0])
        nbytes = int(data.nbytes)
        for segment in self._state.segments:
            if segment.contains(address, nbytes):
                return Block(segment, address - segment.address, nbytes)
        return None

    def close(self) -> None:
        self._finalizer()


def _renew_loop(arena_ref: "weakref.ref[Arena]", stop: threading.Event) -> None:
    """Renews the arena's leases at a third of the lease until it is closed or collected."""
    while True:
        arena = arena_ref()
        if arena is None:
            return
        interval = max(arena.lease_s() / 3.0, 0.05)
        del arena
        if stop.wait(interval):
            return
        arena = arena_ref()
        if arena is None:
            return
        try:
            arena.renew()
        except Exception as exc:  # the next round tries again; a dead server ends the lease
            logger.debug("lossd: renewing shared-memory leases failed: %s", exc)
        del arena


# ---------------------------------------------------------------------------------------
# Requests through shared memory


def _tensor_message(t: WireTensor) -> "pb.Tensor":
    return pb.Tensor(dtype=t.code, shape=t.shape, data=t.data.tobytes())  # type: ignore


def _build_request(request_id: str, tensors: Dict[str, "pb.Tensor"], o: RequestOptions,
                   outputs: Dict[str, "pb.TensorReference"]) -> bytes:
    req = request_message(request_id, tensors["logits"], tensors["targets"],
                          tensors.get("weight"), tensors.get("pos_weight"), o)
    for name, ref in outputs.items():
        getattr(req.outputs, name).CopyFrom(ref)
    return req.SerializeToString()


def _loss_shape(shape: Tuple[int, ...], reduction: int) -> Tuple[int, ...]:
    if reduction == pb.REDUCTION_NONE:
        return shape
    if reduction == pb.REDUCTION_PER_SAMPLE_MEAN:
        return shape[:-1]
    return ()


def parse_reply(raw: bytes) -> "pb.EvaluateResponse":
    """The EvaluateResponse of a reply's bytes; INTERNAL when they are not one."""
    try:
        return pb.EvaluateResponse.FromString(raw)
    except Exception:
        raise InternalError(grpc.StatusCode.INTERNAL,
                            "client: malformed response (not an EvaluateResponse)") from None


def placed_result(reply: "pb.EvaluateResponse", loss: Any, grad: Any,
                  grad_targets: Any) -> LossResult:
    """The LossResult of a reply whose outputs were placed in registered memory: the outputs
    as the caller read them, the rest from the reply."""
    t = reply.timing
    timing = Timing(queue_ns=t.queue_ns, compute_ns=t.compute_ns, total_ns=t.total_ns,
                    received_unix_ns=t.received_unix_ns,
                    compute_start_unix_ns=t.compute_start_unix_ns,
                    compute_end_unix_ns=t.compute_end_unix_ns, reply_unix_ns=t.reply_unix_ns)
    return LossResult(
        loss=loss, grad=grad, grad_targets=grad_targets,
        device=enum_name(pb.Device, "DEVICE_", reply.device), timing=timing,
        request_id=reply.request_id, num_elements=reply.num_elements, parts=(timing,))


class ShmCall:
    """One ``Evaluate`` whose tensors travel by reference: the request, and the result once
    the reply arrives. :meth:`release` returns the temporary blocks (and, after a failure,
    the output blocks) to the arena."""

    def __init__(self, arena: Arena, job: Any) -> None:
        self._arena = arena
        self._temporary: List[Block] = []
        self._outputs: Dict[str, Tuple[Block, Tuple[int, ...]]] = {}
        self._job = job
        self._done = False
        try:
            self.request = self._prepare(job)
        except BaseException:
            self.release(failed=True)
            raise

    def _input(self, name: str, wire: WireTensor) -> "pb.Tensor":
        data = wire.data
        block = self._arena.locate(data) if data.nbytes else None
        if block is None and data.nbytes >= INLINE_BYTES:
            block = self._arena.allocate(int(data.nbytes))
            self._temporary.append(block)
            target = self._arena.view(block, (int(data.nbytes),), np.dtype(np.uint8))
            target[...] = data.reshape(-1).view(np.uint8)
        if block is None:
            return _tensor_message(wire)
        return pb.Tensor(dtype=wire.code, shape=wire.shape, ref=block.ref())  # type: ignore

    def _prepare(self, job: Any) -> bytes:
        i = job.inputs
        tensors = {"logits": self._input("logits", i.x.wire()),
                   "targets": self._input("targets", i.y.wire())}
        if i.w is not None:
            tensors["weight"] = self._input("weight", i.w.wire())
        if i.p is not None and job.options.loss == "bce":
            tensors["pos_weight"] = self._input("pos_weight", i.p.wire())
        shape = i.shape
        itemsize = itemsize_of(job.out_code)
        numel = 1
        for d in shape:
            numel *= d
        wanted: List[Tuple[str, Tuple[int, ...]]] = []
        loss_shape = _loss_shape(shape, job.options.reduction or pb.REDUCTION_MEAN)
        if loss_shape:
            wanted.append(("loss", loss_shape))
        if job.options.grad_logits:
            wanted.append(("grad_logits", shape))
        if job.options.grad_targets:
            wanted.append(("grad_targets", shape))
        refs: Dict[str, "pb.TensorReference"] = {}
        for name, out_shape in wanted:
            count = 1
            for d in out_shape:
                count *= d
            if count == 0:
                continue
            block = self._arena.allocate(count * itemsize)
            self._outputs[name] = (block, out_shape)
            refs[name] = block.ref()
        return _build_request(job.request_id, tensors, job.options, refs)

    def _output(self, reply: "pb.EvaluateResponse", name: str) -> Optional[np.ndarray]:
        tensor = getattr(reply, name)
        if name not in self._outputs:
            return decode(tensor, name)
        block, shape = self._outputs[name]
        ref = tensor.ref
        if (ref.region != block.segment.handle or ref.offset != block.offset
                or tuple(tensor.shape) != tuple(shape) or tensor.data):
            raise InternalError(grpc.StatusCode.INTERNAL, (
                f"client: response {name} is not the placed output (shape "
                f"{list(tensor.shape)}, ref offset {ref.offset}; expected {list(shape)} at "
                f"offset {block.offset})"))
        code = tensor.dtype
        if code == pb.DTYPE_BFLOAT16 and BFLOAT16 is None:
            bits = self._arena.view(block, shape, np.dtype("<u2"))
            widened = bfloat16_bits_to_float32(bits)
            self._arena.free(block)
            return widened
        return self._arena.owned(block, shape, output_dtype(code))

    def result(self, raw: bytes) -> LossResult:
        reply = parse_reply(raw)
        o = self._job.options
        loss = self._output(reply, "loss")
        grad = self._output(reply, "grad_logits") if o.grad_logits else None
        grad_targets = self._output(reply, "grad_targets") if o.grad_targets else None
        self._done = True
        self._outputs.clear()  # owned by the arrays now
        self.release(failed=False)
        return placed_result(reply, loss, grad, grad_targets)

    def release(self, failed: bool = True) -> None:
        for block in self._temporary:
            self._arena.free(block)
        self._temporary.clear()
        if failed:
            for block, _ in self._outputs.values():
                self._arena.free(block)
            self._outputs.clear()


class ShmTransport:
    """Shared memory for one client: the arena and the decision to use it."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena

    @staticmethod
    def probe(mode: str, target: str, control: Control,
              capabilities: Optional["pb.Capabilities"] = None) -> Optional["ShmTransport"]:
        """Decides whether a client uses shared memory and logs the decision (one INFO
        line). "auto": for local targets whose server offers it, once a first segment
        registers; "on": always tries, and raises when that fails; "off": never.

        Raises
        ------
        LossdError, OSError
            Mode "on" only: the registration (or the object's creation) failed.
        """
        if mode == "off":
            return None
        local, why = local_target(target)
        if mode == "auto" and not local:
            logger.info("lossd: shared memory off for %s: %s (tensors travel as bytes)",
                        target, why)
            return None
        prefix = DEFAULT_PREFIX
        try:
            caps = capabilities if capabilities is not None else control.capabilities()
            if caps.shared_memory_prefix:
                prefix = caps.shared_memory_prefix
            offered = bool(caps.shared_memory and caps.shared_memory_prefix)
        except LossdError as exc:
            if mode == "on" or exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise  # the evaluation would fail the same way; decided at the next one
            logger.info("lossd: shared memory off for %s: the server has no capabilities "
                        "call (%s)", target, exc)
            return None
        if mode == "auto" and not offered:
            logger.info("lossd: shared memory off for %s: the server does not offer it "
                        "(Capabilities.shared_memory is false); tensors travel as bytes",
                        target)
            return None
        try:
            arena = Arena(control, prefix)
        except (LossdError, OSError) as exc:
            if mode == "on":
                if isinstance(exc, LossdError):
                    raise error_for(exc.code, f"shared_memory='on': registering a region with "
                                              f"{target} failed: {exc.details}") from None
                raise
            logger.info("lossd: shared memory off for %s: registering a region failed (%s); "
                        "tensors travel as bytes", target, exc)
            return None
        segment = arena.segments[0]
        logger.info("lossd: shared memory on for %s (%s): region %s of %d MiB, lease %.1f s",
                    target, why if local else "mode 'on'", segment.name,
                    segment.size >> 20, segment.lease_ms / 1000.0)
        return ShmTransport(arena)

    def call(self, job: Any) -> ShmCall:
        return ShmCall(self.arena, job)

    def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        if isinstance(shape, (int, np.integer)):
            shape = (int(shape),)
        return self.arena.array(tuple(int(d) for d in shape), np.dtype(dtype))

    def close(self) -> None:
        self.arena.close()


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, LossdError) and exc.code == grpc.StatusCode.NOT_FOUND

