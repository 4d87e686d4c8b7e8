"""The synchronous lossd client."""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import grpc
import numpy as np
from numpy.typing import ArrayLike

from ._channel import (
    DEFAULT_MAX_MESSAGE_BYTES, PemSource, RetryPolicy, Target, channel_spec,
)
from ._cuda_ipc import MODES as CUDA_IPC_MODES, CudaIpc, Decision
from ._errors import InternalError, LossdError, error_for, from_rpc_error
from ._inputs import prepare_inputs
from ._job import AccumulateJob, EvalJob, Progress, _new_id
from ._options import enum_name, make_options
from ._progress import ProgressArg, progress_reporter
from ._proto.lossd.v1 import lossd_pb2 as pb
from ._shm import MODES as SHM_MODES, Control, ShmCall, ShmTransport
from ._tensor import DTypeLike, dtype_name
from ._torch_interop import TorchSpec, convert_inputs, to_torch
from ._types import AccumulateResult, Capabilities, DatasetResult, LossResult
from ._wire import RequestOptions, encode_varint, read_varint

if TYPE_CHECKING:  # imported on first use (evaluate_dataset)
    from ._dataset import ShardedRun

__all__ = ["Client", "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_CHUNK_BYTES"]

logger = logging.getLogger("lossd")

#: Requests or replies larger than this (2 MiB) are sent as pipelined chunks of about this
#: size: on loopback, 10M float32 elements with gradients take ~3x less time than in one
#: message with gRPC Python, and chunks let the server overlap transfer and compute.
DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024

_SERVICE = "/lossd.v1.LossService/"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
_LOSSES = {"bce": "bce", "bce_with_logits": "bce", "focal": "focal",
           "sigmoid_focal_loss": "focal"}


def _identity(b: bytes) -> bytes:
    return b


#: Failures after which the server may still be working on a request.
_UNANSWERED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
               grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)


class CudaJob:
    """An evaluation whose logits are a CUDA tensor, before its path is decided: the
    arguments as given (converted for the host path only if it is taken)."""

    def __init__(self, loss: str, values: Tuple[Any, Any, Any, Any], dtype: Any,
                 request_id: Optional[str], options: dict, request: RequestOptions) -> None:
        self.loss = loss
        self.values = values
        self.dtype = dtype
        self.request_id = request_id if request_id is not None else _new_id()
        self.options = options
        self.request = request


class _ClientBase:
    """What the synchronous and the asyncio clients share: arguments, conversions."""

    _timeout: Optional[float]
    _limit: int
    _chunk_bytes: Optional[int]
    _window: int
    _metadata: Optional[Tuple[Tuple[str, str], ...]]
    _wait_for_ready: Optional[bool]
    _target_description: str
    #: The gRPC module of the client's channel: ``grpc`` or ``grpc.aio``.
    _grpc: Any

    def __init__(self, target: Target, *, timeout: Optional[float] = 30.0,
                 root_certificates: Optional[PemSource] = None,
                 private_key: Optional[PemSource] = None,
                 certificate_chain: Optional[PemSource] = None,
                 tls: Optional[bool] = None, server_name: Optional[str] = None,
                 token: Optional[str] = None, retry: Optional[RetryPolicy] = RetryPolicy(),
                 load_balancing: str = "round_robin", wait_for_ready: bool = False,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 chunk_bytes: Optional[int] = DEFAULT_CHUNK_BYTES, stream_window: int = 4,
                 channel_args: Optional[Sequence[Tuple[str, Any]]] = None,
                 shared_memory: str = "off", cuda_ipc: str = "auto") -> None:
        self._remember_replica_args(
            target, timeout=timeout, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, tls=tls, server_name=server_name, token=token,
            wait_for_ready=wait_for_ready, max_message_bytes=max_message_bytes,
            chunk_bytes=chunk_bytes, stream_window=stream_window, channel_args=channel_args)
        spec = self._configure(
            target, timeout=timeout, max_message_bytes=max_message_bytes,
            chunk_bytes=chunk_bytes, stream_window=stream_window, wait_for_ready=wait_for_ready,
            shared_memory=shared_memory, cuda_ipc=cuda_ipc,
            root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, tls=tls, server_name=server_name, token=token,
            retry=retry, load_balancing=load_balancing, channel_args=channel_args)
        self._channel = spec.open(self._grpc)
        self._bind_stubs(self._channel)

    def _bind_stubs(self, channel: Any) -> None:
        """The stubs of the client's calls on ``channel``."""
        self._evaluate = channel.unary_unary(_SERVICE + "Evaluate",
                                             request_serializer=_identity,
                                             response_deserializer=_identity)
        self._stream = channel.stream_stream(_SERVICE + "EvaluateStream",
                                             request_serializer=_identity,
                                             response_deserializer=_identity)
        self._accumulate = channel.stream_unary(
            _SERVICE + "Accumulate", request_serializer=_identity,
            response_deserializer=pb.AccumulateResponse.FromString)
        self._get_capabilities = channel.unary_unary(
            _SERVICE + "GetCapabilities",
            request_serializer=pb.GetCapabilitiesRequest.SerializeToString,
            response_deserializer=pb.Capabilities.FromString)
        self._health = channel.unary_unary(_HEALTH_CHECK, request_serializer=None,
                                           response_deserializer=None)

    def _configure(self, target: Target, *, timeout: Optional[float],
                   max_message_bytes: int, chunk_bytes: Optional[int], stream_window: int,
                   wait_for_ready: bool, shared_memory: str = "off", cuda_ipc: str = "auto",
                   **channel_kwargs: Any) -> Any:
        if shared_memory not in SHM_MODES:
            raise ValueError(f"shared_memory: expected 'auto', 'on' or 'off', got "
                             f"{shared_memory!r}")
        if not isinstance(cuda_ipc, str) or cuda_ipc not in CUDA_IPC_MODES:
            raise ValueError(f"cuda_ipc: expected 'auto', 'on' or 'off', got {cuda_ipc!r}")
        spec = channel_spec(target, max_message_bytes=max_message_bytes, **channel_kwargs)
        self._spec = spec
        self._shm_mode = shared_memory
        self._shm: Optional[ShmTransport] = None
        self._shm_decided = shared_memory == "off"
        self._shm_lock = threading.Lock()
        self._cuda = CudaIpc(cuda_ipc, spec.target, self._cuda_control)
        self._cuda_control_obj: Optional[Control] = None
        if stream_window < 1:
            raise ValueError(f"stream_window must be >= 1, got {stream_window}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {timeout}")
        self._target = target if isinstance(target, str) else ",".join(target)
        self._timeout = timeout
        self._limit = int(max_message_bytes)
        if chunk_bytes is not None and chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive or None, got {chunk_bytes}")
        self._chunk_bytes = None if chunk_bytes is None else min(int(chunk_bytes), self._limit)
        self._window = int(stream_window)
        self._metadata = spec.metadata
        self._wait_for_ready = True if wait_for_ready else None
        self._target_description = spec.description
        self._server_capabilities: Optional[Capabilities] = None  # fetched for the first split
        logger.debug("lossd client for %s, timeout %s, max message %d bytes", spec.description,
                     timeout, max_message_bytes)
        return spec

    @property
    def target(self) -> str:
        """The server address(es) this client talks to."""
        return self._target

    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        t = self._timeout if timeout is None else timeout
        if t is None or math.isinf(t):
            return None
        if not t > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        return t

    def _call_kwargs(self, timeout: Optional[float]) -> dict:
        return {"timeout": self._deadline(timeout), "metadata": self._metadata,
                "wait_for_ready": self._wait_for_ready}

    def _cuda_control(self) -> Control:
        """The SharedMemory calls of the CUDA IPC path, on the client's channel."""
        if self._cuda_control_obj is None:
            self._cuda_control_obj = Control(self._channel, self._metadata)
        return self._cuda_control_obj

    @property
    def cuda_ipc_decision(self) -> Optional[Decision]:
        """How the latest evaluation of CUDA logits travelled: ``.path`` ("cuda_ipc" or
        "host") and ``.reason``; None before any (see the ``cuda_ipc`` argument)."""
        return self._cuda.last

    def _job(self, loss: str, logits: Any, targets: Any, weight: Any, pos_weight: Any,
             dtype: Any, request_id: Optional[str], **options: Any
             ) -> Tuple[Any, Optional[TorchSpec]]:
        if self._cuda.candidate(logits):
            # The path (and with it whether the tensors are copied to the host) is decided
            # by _run_job, which may ask the server.
            return CudaJob(loss, (logits, targets, weight, pos_weight), dtype, request_id,
                           options, make_options(loss=loss, **options)), None
        return self._host_job(loss, logits, targets, weight, pos_weight, dtype, request_id,
                              **options)

    def _host_job(self, loss: str, logits: Any, targets: Any, weight: Any, pos_weight: Any,
                  dtype: Any, request_id: Optional[str], **options: Any
                  ) -> Tuple[EvalJob, Optional[TorchSpec]]:
        logits, targets, weight, pos_weight, codes, spec = convert_inputs(
            logits, targets, weight, pos_weight)
        opts = make_options(loss=loss, **options)
        inputs = prepare_inputs(logits, targets, weight, pos_weight, dtype, codes)
        if self._shm is not None:
            # Tensors travel by reference: one Evaluate whatever their size.
            job = EvalJob(inputs, opts, request_id, 1 << 62, None)
            return job, spec
        job = EvalJob(inputs, opts, request_id, self._limit, self._chunk_bytes)
        if job.mode != "unary":
            logger.debug("request %s: %d elements in %d chunks (%s, limit %d bytes)",
                         job.request_id, job.total, job.chunks, job.mode, self._limit)
        return job, spec

    def _cuda_fallback(self, job: CudaJob) -> Tuple[EvalJob, Optional[TorchSpec]]:
        """The host-path job of a CudaJob."""
        return self._host_job(job.loss, *job.values, job.dtype, job.request_id, **job.options)

    def _cuda_retry(self, job: CudaJob, call: Any, exc: grpc.RpcError, attempt: int) -> None:
        """After the Evaluate of a CUDA IPC call failed: returns to retry once after
        NOT_FOUND (the server dropped a region: a lease that ended while this process was
        stopped; the regions are registered again), else raises the LossdError."""
        err = from_rpc_error(exc)
        if err.code == grpc.StatusCode.NOT_FOUND and attempt == 0:
            logger.debug("Evaluate %s: %s; registering the CUDA IPC regions again",
                         job.request_id, err)
            self._cuda.forget(call)
            return
        logger.debug("Evaluate %s failed: %s", job.request_id, err)
        if err.code in _UNANSWERED:
            self._cuda.abandon(call)
        raise err from None

    @staticmethod
    def _cuda_done(result: LossResult, progress: ProgressArg) -> LossResult:
        with progress_reporter(progress, auto=False) as report:
            if report is not None:
                report(result.num_elements, result.num_elements)
        logger.debug("%s: %d elements through CUDA IPC on %s, %d ns server time",
                     result.request_id, result.num_elements, result.device,
                     result.timing.total_ns)
        return result

    @staticmethod
    def _finish(job: EvalJob, result: LossResult, spec: Optional[TorchSpec]) -> LossResult:
        logger.debug("%s: %d elements %s %s on %s, %d ns server time", result.request_id,
                     result.num_elements, dtype_name(job.out_code),
                     enum_name(pb.Reduction, "REDUCTION_", job.options.reduction),
                     result.device, result.timing.total_ns)
        if spec is None:
            return result
        return LossResult(loss=to_torch(result.loss, spec), grad=to_torch(result.grad, spec),
                          grad_targets=to_torch(result.grad_targets, spec),
                          device=result.device, timing=result.timing,
                          request_id=result.request_id, num_elements=result.num_elements,
                          parts=result.parts)

    def _accumulate_job(self, loss: str, reduction: Any, device: Any, reject_nan: bool,
                        ignore_index: Optional[int], normalize: bool, label_smoothing: float,
                        alpha: Optional[float], gamma: Optional[float], pos_weight: Any,
                        dtype: Any, request_id: Optional[str]) -> AccumulateJob:
        if loss not in _LOSSES:
            raise ValueError(f"loss: expected 'bce_with_logits' or 'sigmoid_focal_loss', got "
                             f"{loss!r}")
        opts = make_options(loss=_LOSSES[loss], reduction=reduction, grad=False,
                            grad_targets=False, device=device, reject_nan=reject_nan,
                            ignore_index=ignore_index, normalize=normalize,
                            label_smoothing=label_smoothing, alpha=alpha, gamma=gamma)

        def convert(x: Any, y: Any, w: Any, p: Any) -> Any:
            x, y, w, p, codes, _ = convert_inputs(x, y, w, p)
            return x, y, w, p, codes

        return AccumulateJob(opts, request_id, self._limit, self._chunk_bytes, dtype,
                             pos_weight, convert)

    def _shm_job(self, job: EvalJob) -> EvalJob:
        """The job as one unary Evaluate when tensors travel by reference (a job planned
        before shared memory was decided may have been split for the message limit)."""
        if self._shm is None or job.mode == "unary":
            return job
        return EvalJob(job.inputs, job.options, job.request_id, 1 << 62, None)

    def _shm_probe(self, channel: Any) -> None:
        """Decides once whether this client uses shared memory (see ShmTransport.probe)."""
        if self._shm_decided:
            return
        with self._shm_lock:
            if self._shm_decided:
                return
            self._shm = ShmTransport.probe(self._shm_mode, self._spec.target,
                                           Control(channel, self._metadata))
            self._shm_decided = True

    @staticmethod
    def _evaluate_error(exc: grpc.RpcError, job: EvalJob) -> LossdError:
        """The LossdError of a failed Evaluate (logged)."""
        err = from_rpc_error(exc)
        logger.debug("Evaluate %s failed: %s", job.request_id, err)
        return err

    @staticmethod
    def _shm_retry(call: ShmCall, exc: BaseException, attempt: int, job: EvalJob) -> bool:
        """After an Evaluate through shared memory failed with ``exc``: releases the call's
        blocks and tells whether to register the regions again and retry. True for NOT_FOUND
        at the first attempt (a region the server dropped: a lease that ended while this
        process was stopped); False for an exception that is not a gRPC failure, which the
        caller re-raises; any other gRPC failure raises its LossdError."""
        call.release()
        if not isinstance(exc, grpc.RpcError):
            return False
        err = from_rpc_error(exc)
        if err.code == grpc.StatusCode.NOT_FOUND and attempt == 0:
            logger.debug("Evaluate %s: %s; renewing the regions", job.request_id, err)
            return True
        logger.debug("Evaluate %s failed: %s", job.request_id, err)
        raise err from None

    @staticmethod
    def _evaluated(job: EvalJob, result: LossResult, progress: Optional[Progress]) -> LossResult:
        """The result of a job evaluated in one Evaluate, reported to ``progress``."""
        if progress is not None:
            progress(job.total, job.total)
        return result

    @staticmethod
    def _accumulate_mode_requests(job: EvalJob,
                                  progress: Optional[Progress]) -> Iterator[bytes]:
        """The Accumulate requests of an "accumulate" job, reporting each one sent."""
        for index, message in enumerate(job.accumulate_requests()):
            yield message
            if progress is not None:
                progress(job.accumulated(index), job.total)

    @staticmethod
    def _reply_handler(job: EvalJob,
                       progress: Optional[Progress]) -> Callable[[int, bytes], None]:
        """``on_reply`` of a job's EvaluateStream: takes the reply, reports the progress."""
        def on_reply(index: int, raw: bytes) -> None:
            done = job.stream_reply(index, raw)
            if progress is not None:
                progress(done, job.total)
        return on_reply

    @staticmethod
    def _capabilities(c: "pb.Capabilities") -> Capabilities:
        return Capabilities(
            server_version=c.server_version,
            losses=tuple(c.losses),
            dtypes=tuple(dtype_name(d) for d in c.dtypes),
            devices=tuple(enum_name(pb.Device, "DEVICE_", d) for d in c.devices),
            reductions=tuple(enum_name(pb.Reduction, "REDUCTION_", r) for r in c.reductions),
            max_message_bytes=c.max_message_bytes,
            max_elements=c.max_elements,
            cuda_device_name=c.cuda_device_name,
            whole_requests=c.whole_requests,
            partial_state_versions=tuple(int(v) for v in c.partial_state_versions),
            cuda_ipc=c.cuda_ipc,
            cuda_device_uuid=c.cuda_device_uuid,
        )

    def _require_whole_requests(self, capabilities: Capabilities, job: EvalJob) -> None:
        """Raises when the server cannot divide a split request's chunks as one request."""
        if not capabilities.whole_requests:
            raise error_for(grpc.StatusCode.FAILED_PRECONDITION, (
                f"request {job.request_id} needs splitting into {job.chunks} chunks, but this "
                f"server (lossd {capabilities.server_version or 'of unknown version'}) does not "
                "divide chunks as one request (Capabilities.whole_requests); upgrade the "
                "server, or send the request whole (chunk_bytes=None and a large enough "
                "max_message_bytes)"))

    @staticmethod
    def _health_request(service: str) -> bytes:
        # HealthCheckRequest { string service = 1; } encoded by hand: no extra dependency.
        name = service.encode("utf-8")
        return (b"\x0a" + encode_varint(len(name)) + name) if name else b""

    @staticmethod
    def _health_status(reply: bytes) -> str:
        return _HEALTH_STATUS.get(_parse_health_status(reply), "UNKNOWN")

    def _remember_replica_args(self, target: Target, **kwargs: Any) -> None:
        """What a replica's own client needs (evaluate_dataset)."""
        self._target_arg = target
        self._replica_kwargs = kwargs

    def _dataset_run(self, data: Any, targets: Any, weight: Any, batch_rows: Optional[int],
                     replicas: Optional[Sequence[str]], checkpoint_batches: int,
                     queue_depth: int, timeout: Optional[float], progress: Optional[Progress],
                     *job_args: Any) -> Tuple["ShardedRun", Iterator[Any], Optional[int]]:
        """The plan of an evaluate_dataset call, shared by both clients: the
        :class:`~lossd._dataset.ShardedRun` over one synchronous client per replica (its
        ``run`` closes them), the batches and their total element count."""
        from ._dataset import ShardedRun, dataset_batches, resolve_replicas

        job = self._accumulate_job(*job_args)
        batches, total = dataset_batches(data, targets, weight, batch_rows)
        addresses = list(replicas) if replicas is not None else resolve_replicas(self._target_arg)
        clients = [self._replica_client(a) for a in addresses]
        try:
            run = ShardedRun(clients, addresses, job, checkpoint_batches=checkpoint_batches,
                             queue_depth=queue_depth, timeout=timeout, progress=progress)
        except BaseException:
            for c in clients:
                c.close()
            raise
        return run, batches, total

    def _replica_client(self, address: str) -> "Client":
        """A client of one replica, with this client's credentials and limits. Failover is
        evaluate_dataset's (gRPC's own retries would only try the same replica again)."""
        kwargs = dict(self._replica_kwargs)
        if (self._spec.credentials is not None and kwargs.get("server_name") is None
                and isinstance(self._target_arg, str) and self._target_arg.startswith("dns:")):
            # Certificates name the service, not the resolved address.
            from ._dataset import _split_host_port
            name = self._target_arg[4:].lstrip("/")
            name = name.split("/", 1)[-1]
            kwargs["server_name"] = _split_host_port(name)[0]
        return Client(address, retry=None, **kwargs)


_DOC_CLIENT_PARAMS = """
    target : str or sequence of str
        Server address: any gRPC target string (``"127.0.0.1:50051"``,
        ``"dns:///lossd.example:50051"`` to balance over every address of a name, which gRPC
        re-resolves), or a list of ``"host:port"`` addresses balanced client-side
        (``ipv4:``/``ipv6:`` target; host names in a list are resolved once, here).
    timeout : float or None, optional
        Default deadline of each call in seconds (a split request's calls share one
        deadline); None or ``math.inf``: no deadline. Default 30.
    root_certificates, private_key, certificate_chain : bytes or path, optional
        PEM data (bytes) or files (paths). Any of them turns TLS on; ``root_certificates``
        verifies the server (default: the system's roots), ``private_key`` and
        ``certificate_chain`` are the client's certificate for mutual TLS.
    tls : bool, optional
        Force TLS on (with the system's roots) or off. Default: on when certificates are
        given.
    server_name : str, optional
        Host name expected in the server's certificate, when it differs from the target's.
    token : str, optional
        Bearer token sent as ``authorization: Bearer <token>`` with every call.
    retry : RetryPolicy or None, optional
        Automatic retries (by gRPC, with exponential backoff) of calls that fail with
        UNAVAILABLE. None disables them. Default ``RetryPolicy()``.
    load_balancing : str, optional
        gRPC load-balancing policy over the target's addresses. Default "round_robin".
    wait_for_ready : bool, optional
        Queue calls while the server cannot be reached (until the deadline) instead of
        failing fast with UNAVAILABLE. Default False.
    max_message_bytes : int, optional
        Send and receive message size limit, 256 MiB by default (gRPC's own default is 4
        MiB). Requests or replies larger than this are always split into chunks; set it to
        the server's ``--max_message_bytes`` when that is lower.
    chunk_bytes : int or None, optional
        Requests or replies larger than this are also split, into pipelined chunks of about
        this size, when that gives the same bits as one request (see the README). Default
        2 MiB; None splits only what exceeds ``max_message_bytes``.
    stream_window : int, optional
        Chunks in flight at once on a stream (bounds the client's memory). Default 4.
    channel_args : sequence of (str, value), optional
        Extra gRPC channel arguments; they override the ones set from the parameters.
    shared_memory : {"auto", "on", "off"}, optional
        Pass tensors through POSIX shared memory instead of the socket (see
        docs/shared-memory.md). "off" (default): never; "auto": for ``unix:`` and loopback
        targets whose server offers it (``Capabilities.shared_memory``), decided at the first
        evaluation by registering a region, and logged (one INFO line on the "lossd" logger);
        "on": always, raising when the registration fails. With shared memory, an evaluation
        is one ``Evaluate`` of any size; ``accumulate`` still sends bytes.
    cuda_ipc : {"auto", "on", "off"}, optional
        Pass torch CUDA tensors to a server on the same GPU by CUDA IPC handles: the server
        reads the inputs and writes the gradients (and a per-element loss) in this process's
        device memory, and the results are CUDA tensors on the logits' device, with no copy
        to the host. "auto" (default): when the logits are a CUDA tensor, the target is a
        ``unix:`` or loopback one and the server offers it (``Capabilities.cuda_ipc``) on
        the logits' GPU (``Capabilities.cuda_device_uuid``); otherwise, or when registering
        the memory fails, the tensors are copied to the host as without it. The choice is
        logged once (INFO, "lossd" logger) and kept in :attr:`cuda_ipc_decision`. "on": the
        same without the locality check, raising FailedPreconditionError (or the
        registration's error) instead of copying CUDA logits to the host. "off": never.
"""


class Client(_ClientBase):
    __doc__ = """A connection to a lossd server.

    Thread-safe: one client (one gRPC channel) may be shared by many threads. Use it as a
    context manager, or call :meth:`close` when done.

    Parameters
    ----------""" + _DOC_CLIENT_PARAMS + """
    Examples
    --------
    >>> import numpy as np, lossd
    >>> with lossd.Client("127.0.0.1:50051") as client:          # doctest: +SKIP
    ...     r = client.bce_with_logits(np.zeros(3, np.float32), np.ones(3, np.float32))
    ...     float(r.loss)
    0.6931471824645996
    """

    _grpc = grpc

    def _bind_stubs(self, channel: Any) -> None:
        super()._bind_stubs(channel)
        self._merge = channel.unary_unary(
            _SERVICE + "MergePartials",
            request_serializer=pb.MergePartialsRequest.SerializeToString,
            response_deserializer=pb.AccumulateResponse.FromString)

    def close(self) -> None:
        """Close the channel (first unregistering and unlinking the shared memory, if any:
        arrays backed by it stay readable). Calls after this fail; closing twice is
        harmless."""
        with self._shm_lock:
            self._shm_decided = True
            if self._shm is not None:
                self._shm.close()
        self._cuda.close()
        self._channel.close()

    @property
    def shared_memory(self) -> bool:
        """True when evaluations pass tensors through shared memory (decides it now if no
        evaluation has yet)."""
        self._shm_probe(self._channel)
        return self._shm is not None

    def empty(self, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        """A new uninitialized array, in shared memory when the client uses it.

        Inputs that lie in such an array (or a C-contiguous view of one) are passed to the
        server by reference, without any copy; ``torch.from_numpy(client.empty(...))`` gives a
        tensor over the same memory. Its memory returns to the client when the array and
        every view of it are garbage-collected. Without shared memory, ``numpy.empty``.

        Parameters
        ----------
        shape : int or tuple of int
        dtype : dtype-like, optional
            Default float32.
        """
        self._shm_probe(self._channel)
        if self._shm is None:
            return np.empty(shape, dtype)
        return self._shm.empty(shape, dtype)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"lossd.Client({self._target!r})"

    # -- losses -------------------------------------------------------------------------

    def bce_with_logits(
        self,
        logits: ArrayLike,
        targets: ArrayLike,
        *,
        weight: Optional[ArrayLike] = None,
        pos_weight: Optional[ArrayLike] = None,
        reduction: str = "mean",
        grad: bool = False,
        grad_targets: bool = False,
        ignore_index: Optional[int] = None,
        normalize: bool = False,
        label_smoothing: float = 0.0,
        device: str = "auto",
        reject_nan: bool = False,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        dtype: Optional[DTypeLike] = None,
        progress: ProgressArg = None,
    ) -> LossResult:
        """Binary cross-entropy with logits, and optionally its gradients, on the server.

        With x logits, y targets, w weight, p pos_weight and sp(t) = log(1 + exp(t)):
        ``loss = w * [(1-y) * sp(x) + p*y * sp(-x)]`` per element, computed without
        cancellation; a term whose coefficient is exactly 0 is skipped (x=+inf, y=1 gives
        0); NaN inputs give NaN outputs for that element. Same definition as
        ``torch.nn.functional.binary_cross_entropy_with_logits``; ``"mean"`` always divides
        by the number of elements.

        Requests larger than ``max_message_bytes`` are split into chunks transparently
        (see the package README for how each reduction is split and how exact it is).

        Parameters
        ----------
        logits : array_like or torch.Tensor
            float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``) values of any
            shape and memory layout; a 0-d array is one element. The outputs have this
            dtype; for a ``torch.Tensor`` they are tensors on its device.
        targets : array_like or torch.Tensor
            Same shape as the logits. A supported float dtype is sent as is; integers,
            booleans and Python scalars/lists are converted to the logits' dtype.
        weight : array_like, optional
            Per-element weight w, broadcast to the logits' shape (numpy rules, e.g. a scalar,
            ``[C]``, ``[N, 1]`` or the full shape). Default: 1. Dtype rules as for targets.
        pos_weight : array_like, optional
            Positive-class weight p, broadcast to the logits' shape (typically ``[C]``).
            Default: 1. Dtype rules as for targets.
        reduction : {"mean", "sum", "none", "per_sample_mean"}, optional
            ``"mean"`` is sum / numel (NaN for no elements), ``"sum"`` is 0 for no elements,
            ``"none"`` returns the per-element loss, ``"per_sample_mean"`` the mean over the
            last axis (Keras; gradients of the sum of those means). Default "mean".
        grad : bool, optional
            Also return dl/dx, the gradient of the reduced loss with respect to the logits.
        grad_targets : bool, optional
            Also return dl/dy, the gradient with respect to the (unsmoothed) targets.
        ignore_index : int, optional
            Elements whose target equals it give 0 loss and 0 gradients (paddle; its BCE
            API uses -100). Default: none ignored.
        normalize : bool, optional
            Divide losses and gradients by the count of elements not ignored (1 when all
            are ignored), as paddle's operator option does.
        label_smoothing : float, optional
            Keras's label smoothing s in [0, 1]: targets become ``y*(1-s) + s/2``.
        device : {"auto", "cpu", "cuda"}, optional
            Where to run. "cuda" fails with :class:`FailedPreconditionError` on a server
            without a usable GPU. Default "auto".
        reject_nan : bool, optional
            Fail with :class:`InvalidArgumentError` when any input holds a NaN, instead of
            returning NaN for the affected elements.
        request_id : str, optional
            Id echoed by the server and written to its logs (chunks get ``"<id>/<n>"``).
            Default: a random UUID.
        timeout : float, optional
            Deadline of this call in seconds; default: the client's. ``math.inf``: none.
        dtype : {"float32", "float64", "float16", "bfloat16"} or numpy dtype, optional
            Send every tensor in this dtype instead of its own, rounding on the client
            (nearest even). ``dtype="bfloat16"`` sends bfloat16 without ``ml_dtypes``.
        progress : callable or bool, optional
            ``True`` draws a progress bar on stderr (tqdm when installed); a callable is
            called as ``progress(done_elements, total_elements)`` as the chunks of a split
            request complete (and once at the end).

        Returns
        -------
        LossResult
            ``loss``, ``grad``, ``grad_targets``, ``device``, ``timing``, ``request_id``,
            ``num_elements``.

        Raises
        ------
        ValueError
            Unsupported dtype of an argument (named in the message), unknown ``reduction``,
            ``device`` or ``dtype``, out-of-range options.
        LossdError
            Any RPC failure, as the subclass for its status code: InvalidArgumentError
            (shape mismatch, weight not broadcastable, NaN with ``reject_nan``, ...),
            ResourceExhaustedError, FailedPreconditionError, UnavailableError,
            DeadlineExceededError, UnauthenticatedError, ...
        """
        job, spec = self._job("bce", logits, targets, weight, pos_weight, dtype, request_id,
                              reduction=reduction, grad=grad, grad_targets=grad_targets,
                              device=device, reject_nan=reject_nan, ignore_index=ignore_index,
                              normalize=normalize, label_smoothing=label_smoothing)
        return self._run_job(job, spec, timeout, progress)

    def sigmoid_focal_loss(
        self,
        logits: ArrayLike,
        targets: ArrayLike,
        *,
        alpha: Optional[float] = 0.25,
        gamma: float = 2.0,
        weight: Optional[ArrayLike] = None,
        reduction: str = "none",
        grad: bool = False,
        device: str = "auto",
        reject_nan: bool = False,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        dtype: Optional[DTypeLike] = None,
        progress: ProgressArg = None,
    ) -> LossResult:
        """torchvision's sigmoid focal loss, and optionally its gradient, on the server.

        ``loss = w * alpha_t * BCE(x, y) * (1 - p_t)^gamma`` with ``p = sigmoid(x)``,
        ``p_t = p*y + (1-p)*(1-y)``, ``alpha_t = alpha*y + (1-alpha)*(1-y)``; computed in
        log space in float64, so the gradient stays finite for gamma < 1.

        Parameters
        ----------
        logits, targets : array_like or torch.Tensor
            As for :meth:`bce_with_logits`.
        alpha : float or None, optional
            Weight of the positive class in [0, 1]; None or a negative value disables the
            alpha weighting (torchvision: ``alpha=-1``). Default 0.25.
        gamma : float, optional
            Focusing exponent, >= 0. Default 2.
        weight : array_like, optional
            Per-element weight, broadcast to the logits' shape (multiplies the loss).
        reduction : {"none", "mean", "sum", "per_sample_mean"}, optional
            Default "none" (torchvision's default).
        grad : bool, optional
            Also return dl/dx (dl/dy is not available for this loss).
        device, reject_nan, request_id, timeout, dtype, progress
            As for :meth:`bce_with_logits`.

        Returns
        -------
        LossResult

        Raises
        ------
        ValueError, LossdError
            As for :meth:`bce_with_logits`.
        """
        job, spec = self._job("focal", logits, targets, weight, None, dtype, request_id,
                              reduction=reduction, grad=grad, grad_targets=False,
                              device=device, reject_nan=reject_nan, alpha=alpha, gamma=gamma)
        return self._run_job(job, spec, timeout, progress)

    def accumulate(
        self,
        batches: Iterable[Any],
        *,
        loss: str = "bce_with_logits",
        reduction: str = "mean",
        pos_weight: Optional[ArrayLike] = None,
        ignore_index: Optional[int] = None,
        normalize: bool = False,
        label_smoothing: float = 0.0,
        alpha: Optional[float] = 0.25,
        gamma: float = 2.0,
        device: str = "auto",
        reject_nan: bool = False,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        dtype: Optional[DTypeLike] = None,
        progress: ProgressArg = None,
    ) -> AccumulateResult:
        """The exact dataset-level SUM or MEAN of a loss over many batches (one call).

        Batches are read from ``batches`` lazily, one at a time, as gRPC sends them, so a
        dataset of any size streams with bounded memory (a generator reading from disk
        works). The result is the same bits for any split of the data into batches, and
        equals a one-shot evaluation of all of it rounded to float64.

        Parameters
        ----------
        batches : iterable
            Each item is ``(logits, targets)``, ``(logits, targets, weight)``,
            ``(logits, targets, weight, pos_weight)`` or a mapping with those keys; arrays
            or torch tensors. A batch larger than the message limit is split.
        loss : {"bce_with_logits", "sigmoid_focal_loss"}, optional
        reduction : {"mean", "sum"}, optional
            ``"mean"`` divides by the total element count.
        pos_weight : array_like, optional
            pos_weight of every batch that has none of its own (BCE only).
        ignore_index, normalize, label_smoothing : optional
            BCE options, as for :meth:`bce_with_logits` (normalize counts over all batches).
        alpha, gamma : optional
            Focal loss options, as for :meth:`sigmoid_focal_loss`.
        device, reject_nan, request_id, dtype : optional
            As for :meth:`bce_with_logits`.
        timeout : float, optional
            Deadline of the whole call; default: the client's. Pass ``math.inf`` for a
            long dataset.
        progress : bool or callable, optional
            A progress bar on stderr: None (default) when stderr is a terminal, True always
            (tqdm when installed, else a built-in one), False never. A callable is called
            instead as ``progress(elements_sent, None)`` after each batch is handed to gRPC
            (called
            from gRPC's sending thread).

        Returns
        -------
        AccumulateResult
            ``loss`` (a float), ``num_elements``, ``num_batches``, ``reduction``,
            ``device``, ``timing``.

        Raises
        ------
        ValueError
            A malformed batch (named by its index) or bad options; an exception raised by
            the iterable itself propagates unchanged.
        LossdError
            Any RPC failure; the message names the failing batch.
        """
        job = self._accumulate_job(loss, reduction, device, reject_nan, ignore_index, normalize,
                                   label_smoothing, alpha, gamma, pos_weight, dtype, request_id)
        with progress_reporter(progress) as report:
            response = self._run_accumulate(job.requests(batches, report), timeout)
        return job.result(response)

    def evaluate_dataset(
        self,
        data: Any,
        targets: Any = None,
        weight: Any = None,
        *,
        loss: str = "bce_with_logits",
        reduction: str = "mean",
        pos_weight: Optional[ArrayLike] = None,
        ignore_index: Optional[int] = None,
        normalize: bool = False,
        label_smoothing: float = 0.0,
        alpha: Optional[float] = 0.25,
        gamma: float = 2.0,
        device: str = "auto",
        reject_nan: bool = False,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        dtype: Optional[DTypeLike] = None,
        batch_rows: Optional[int] = None,
        replicas: Optional[Sequence[str]] = None,
        checkpoint_batches: int = 8,
        queue_depth: int = 1,
        progress: ProgressArg = None,
    ) -> DatasetResult:
        """The exact SUM or MEAN of a loss over a dataset, spread over every replica.

        The batches are spread over the replicas (one thread and one ``Accumulate`` stream
        at a time per replica); every ``checkpoint_batches`` batches a replica's call is
        finished and the exact partial state of its slice of the dataset kept; at the end
        one ``MergePartials`` call joins the states on a replica. The result has the bits
        of :meth:`accumulate` over the same batches on one server, whatever the number of
        replicas, the batch sizes and the order in which the replicas finish. A replica
        that fails (UNAVAILABLE, a dropped connection, ...) costs only its unacknowledged
        segments, which are sent again to the others; the server refuses states that
        overlap, so nothing is counted twice.

        Parameters
        ----------
        data : array_like, path or iterable
            An array of logits (a numpy array, or the path of a ``.npy`` file, which is
            memory-mapped), cut along its first axis into batches of ``batch_rows`` rows;
            or an iterable of batches as for :meth:`accumulate` (read lazily, in the
            caller's thread).
        targets, weight : array_like or path, optional
            With an array of logits: targets of the same shape (required), and a weight
            (a weight with the logits' first dimension is cut with them; any other shape
            is broadcast to every batch).
        loss, reduction, pos_weight, ignore_index, normalize, label_smoothing, alpha, gamma,
        device, reject_nan, request_id, dtype : optional
            As for :meth:`accumulate`.
        timeout : float, optional
            Deadline of each ``Accumulate`` call (one segment) and of the merge; default:
            the client's.
        batch_rows : int, optional
            Rows per batch of an array; default: about 2^20 elements per batch.
        replicas : sequence of str, optional
            The replica addresses; default: the client's target (a list of targets as
            given, a ``dns:`` name's addresses, else the one target).
        checkpoint_batches : int, optional
            Batches per ``Accumulate`` call (the most a replica failure costs). Default 8.
        queue_depth : int, optional
            Segments waiting per replica; memory holds at most ``replicas x (queue_depth +
            1) x checkpoint_batches`` encoded batches. Default 1.
        progress : bool or callable, optional
            A progress bar on stderr, as for :meth:`accumulate`. A callable is called instead
            as ``progress(elements_done, total_or_None)`` after each segment's state arrives
            (called from the replica threads).

        Returns
        -------
        DatasetResult
            ``loss``, ``num_elements``, ``num_kept``, ``num_batches``, ``reduction``,
            ``checkpoints``, ``replicas``, ``failed_replicas``, ``resent_batches``,
            ``merge_ns`` (the client's wall time of the final merge) and ``merge_calls``.

        Raises
        ------
        ValueError
            Bad options or a malformed batch (named by its index); an exception raised by
            the iterable itself propagates unchanged.
        LossdError
            A failure that is not the replica's (INVALID_ARGUMENT for a bad batch, ...), or
            every replica failed.
        """
        with progress_reporter(progress) as report:
            run, batches, total = self._dataset_run(
                data, targets, weight, batch_rows, replicas, checkpoint_batches, queue_depth,
                timeout, report, loss, reduction, device, reject_nan, ignore_index, normalize,
                label_smoothing, alpha, gamma, pos_weight, dtype, request_id)
            return run.run(batches, total)

    def _merge_partials(self, request: "pb.MergePartialsRequest",
                        timeout: Optional[float]) -> "pb.AccumulateResponse":
        try:
            return self._merge(request, **self._call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # -- transport ------------------------------------------------------------------------

    def _run_job(self, job: Any, spec: Optional[TorchSpec], timeout: Optional[float],
                 progress: ProgressArg) -> LossResult:
        """Evaluates ``job``: CUDA IPC and shared memory are decided here, once _job
        validated the arguments."""
        if isinstance(job, CudaJob):
            result = self._run_cuda(job, timeout)
            if result is not None:
                return self._cuda_done(result, progress)
            job, spec = self._cuda_fallback(job)
        self._shm_probe(self._channel)
        with progress_reporter(progress, auto=False) as report:
            return self._finish(job, self._run(self._shm_job(job), timeout, report), spec)

    def _run_cuda(self, job: CudaJob, timeout: Optional[float]) -> Optional[LossResult]:
        """The evaluation through CUDA IPC; None when it takes the host path."""
        for attempt in (0, 1):
            call = self._cuda.call(job.values, job.request, job.request_id,
                                   job.dtype is not None)
            if call is None:
                return None
            try:
                raw = self._evaluate(call.request, **self._call_kwargs(timeout))
            except grpc.RpcError as exc:
                self._cuda_retry(job, call, exc, attempt)
                continue
            except BaseException:  # KeyboardInterrupt: the request may be on its way
                self._cuda.abandon(call)
                raise
            return call.result(raw)
        raise AssertionError("unreachable")

    def _run_shm(self, shm: ShmTransport, job: EvalJob, timeout: Optional[float],
                 progress: Optional[Progress]) -> LossResult:
        for attempt in (0, 1):
            call = shm.call(job)
            try:
                raw = self._evaluate(call.request, **self._call_kwargs(timeout))
            except BaseException as exc:
                if not self._shm_retry(call, exc, attempt, job):
                    raise
                shm.arena.renew()
                continue
            return self._evaluated(job, call.result(raw), progress)
        raise AssertionError("unreachable")

    def _run(self, job: EvalJob, timeout: Optional[float],
             progress: Optional[Progress]) -> LossResult:
        shm = self._shm
        if shm is not None and job.mode == "unary":
            return self._run_shm(shm, job, timeout, progress)
        if job.mode == "unary":
            request = job.unary_request()
            try:
                raw = self._evaluate(request, **self._call_kwargs(timeout))
            except grpc.RpcError as exc:
                raise self._evaluate_error(exc, job) from None
            return self._evaluated(job, job.unary_result(raw), progress)
        if job.uses_whole:
            if self._server_capabilities is None:
                self._server_capabilities = self.capabilities(timeout=timeout)
            self._require_whole_requests(self._server_capabilities, job)
        if job.mode == "accumulate":
            job.accumulate_reply(self._run_accumulate(
                self._accumulate_mode_requests(job, progress), timeout))
            return job.result()
        acc = None
        if job.runs_accumulate and job.needs_kept:
            # The kept count goes into every chunk: the Accumulate call comes first.
            job.accumulate_reply(self._run_accumulate(job.accumulate_requests(), timeout))
        elif job.runs_accumulate:
            acc = self._start_accumulate(job.accumulate_requests(), timeout)
        try:
            self._run_stream(job.stream_requests(), job.chunks, self._reply_handler(job, progress),
                             timeout)
            if acc is not None:
                job.accumulate_reply(self._finish_accumulate(*acc))
        finally:
            if acc is not None:
                acc[0].cancel()
        return job.result()

    def _run_stream(self, requests: Iterator[bytes], expected: int,
                    on_reply: Callable[[int, bytes], None], timeout: Optional[float]) -> None:
        """Sends ``requests`` on one EvaluateStream with at most ``stream_window`` chunks in
        flight, calling ``on_reply(index, raw)`` for each reply in order."""
        window = threading.Semaphore(self._window)
        stop = threading.Event()

        def gated() -> Iterator[bytes]:
            for message in requests:
                while not window.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                yield message

        source = _Capture(gated())
        call = self._stream(iter(source), **self._call_kwargs(timeout))
        source.call = call
        try:
            index = 0
            for raw in call:
                window.release()
                if index >= expected:
                    raise InternalError(grpc.StatusCode.INTERNAL,
                                        f"client: more than {expected} stream replies")
                on_reply(index, raw)
                index += 1
            source.check()
            if index != expected:
                raise InternalError(grpc.StatusCode.INTERNAL,
                                    f"client: {index} stream replies for {expected} chunks")
        except grpc.RpcError as exc:
            source.check()
            raise from_rpc_error(exc) from None
        finally:
            stop.set()
            call.cancel()

    def _start_accumulate(self, requests: Iterable[bytes],
                          timeout: Optional[float]) -> Tuple[Any, _Capture]:
        source = _Capture(requests)
        future = self._accumulate.future(iter(source), **self._call_kwargs(timeout))
        source.call = future
        return future, source

    @staticmethod
    def _finish_accumulate(future: Any, source: _Capture) -> "pb.AccumulateResponse":
        try:
            response = future.result()
        except (grpc.RpcError, grpc.FutureCancelledError) as exc:
            source.check()
            if isinstance(exc, grpc.RpcError):
                raise from_rpc_error(exc) from None
            raise
        finally:
            future.cancel()
        source.check()  # the iterator failed after its last message was already sent
        return response

    def _run_accumulate(self, requests: Iterable[bytes],
                        timeout: Optional[float]) -> "pb.AccumulateResponse":
        return self._finish_accumulate(*self._start_accumulate(requests, timeout))

    # -- service information --------------------------------------------------------------

    def capabilities(self, *, timeout: Optional[float] = None) -> Capabilities:
        """Ask the server what it supports and its limits.

        Parameters
        ----------
        timeout : float, optional
            Deadline in seconds; default: the client's.

        Returns
        -------
        Capabilities

        Raises
        ------
        LossdError
            Any RPC failure.
        """
        try:
            c = self._get_capabilities(pb.GetCapabilitiesRequest(), **self._call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return self._capabilities(c)

    def health(self, service: str = "", *, timeout: Optional[float] = None) -> str:
        """Query the standard ``grpc.health.v1.Health/Check`` service.

        Parameters
        ----------
        service : str, optional
            Service name; "" (default) is the server as a whole, ``"lossd.v1.LossService"``
            the loss service.
        timeout : float, optional
            Deadline in seconds; default: the client's.

        Returns
        -------
        str
            "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN".

        Raises
        ------
        LossdError
            Any RPC failure (NOT_FOUND for a service the server does not know).
        """
        try:
            reply = self._health(self._health_request(service), **self._call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return self._health_status(reply)


class _Capture:
    """Re-yields request messages, recording an exception they raise.

    gRPC consumes request iterators on its own thread, where an exception would only be
    logged and reported as CANCELLED. Instead the exception is kept, the call (once set in
    ``call``) is cancelled, and the caller re-raises the exception itself.
    """

    def __init__(self, requests: Iterable[bytes]) -> None:
        self._requests = requests
        self.failure: Optional[BaseException] = None
        self.call: Any = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._requests
        except Exception as exc:  # re-raised in the caller's thread by check()
            self.failure = exc
            if self.call is not None:
                self.call.cancel()

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure


def _parse_health_status(data: bytes) -> int:
    """Field 1 (enum ServingStatus) of a HealthCheckResponse; 0 when absent."""
    status, i, end = 0, 0, len(data)
    try:
        while i < end:
            key, i = read_varint(data, i, end)
            field, wire_type = key >> 3, key & 7
            if wire_type == 0:
                value, i = read_varint(data, i, end)
                if field == 1:
                    status = value
            elif wire_type == 2:
                length, i = read_varint(data, i, end)
                i += length
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            else:
                raise ValueError(f"wire type {wire_type}")
    except (InternalError, ValueError):  # InternalError: a truncated varint
        raise LossdError(grpc.StatusCode.INTERNAL, "client: malformed health response") from None
    return status
