"""The synchronous lossd client."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Optional, Sequence, Tuple

import grpc
from numpy.typing import ArrayLike

from ._errors import LossdError, from_rpc_error
from ._proto.lossd.v1 import lossd_pb2 as pb
from ._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc
from ._tensor import DTypeLike, as_array, decode, dtype_name, encode, resolve_dtype
from ._types import BceResult, Capabilities, Timing

__all__ = ["Client", "DEFAULT_MAX_MESSAGE_BYTES"]

logger = logging.getLogger("lossd")

#: Default send/receive message size limit of a :class:`Client` (256 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

_REDUCTIONS = {"none": pb.REDUCTION_NONE, "mean": pb.REDUCTION_MEAN, "sum": pb.REDUCTION_SUM}
_DEVICES = {"auto": pb.DEVICE_AUTO, "cpu": pb.DEVICE_CPU, "cuda": pb.DEVICE_CUDA}


def _enum_name(enum: Any, prefix: str, value: int) -> str:
    """Map e.g. REDUCTION_SUM to "sum"; a value this client does not know to its number."""
    try:
        return enum.Name(value)[len(prefix):].lower()
    except ValueError:
        return str(value)


_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


class Client:
    """A connection to a lossd server.

    Thread-safe: one client (one gRPC channel) may be shared by many threads. Use it as a
    context manager, or call :meth:`close` when done.

    Parameters
    ----------
    target : str
        Server address, e.g. ``"127.0.0.1:50051"`` (any gRPC target string).
    timeout : float or None, optional
        Default deadline of each call in seconds; None means no deadline. Default 30.
    max_message_bytes : int, optional
        Send and receive message size limit of the channel. Default 256 MiB (gRPC's own
        default is 4 MiB). The server has its own limit (``--max_message_bytes``).
    channel_args : sequence of (str, value) pairs, optional
        Extra gRPC channel arguments; they override the ones set from the parameters above.

    Examples
    --------
    >>> import numpy as np, lossd
    >>> with lossd.Client("127.0.0.1:50051") as client:          # doctest: +SKIP
    ...     r = client.bce_with_logits(np.zeros(3, np.float32), np.ones(3, np.float32))
    ...     float(r.loss)
    0.6931471824645996
    """

    def __init__(self, target: str, *, timeout: Optional[float] = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel_args: Optional[Sequence[Tuple[str, Any]]] = None) -> None:
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        options = {
            "grpc.max_send_message_length": int(max_message_bytes),
            "grpc.max_receive_message_length": int(max_message_bytes),
        }
        for key, value in channel_args or ():
            options[key] = value
        self._target = target
        self._timeout = timeout
        self._channel = grpc.insecure_channel(target, options=list(options.items()))
        self._stub = pb_grpc.LossServiceStub(self._channel)
        self._health = self._channel.unary_unary(
            _HEALTH_CHECK, request_serializer=None, response_deserializer=None)
        logger.debug("lossd client for %s (timeout %s, max message %d bytes)", target, timeout,
                     max_message_bytes)

    @property
    def target(self) -> str:
        """The server address this client talks to."""
        return self._target

    def close(self) -> None:
        """Close the channel. Calls after this fail; closing twice is harmless."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"lossd.Client({self._target!r})"

    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        return self._timeout if timeout is None else timeout

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
        device: str = "auto",
        reject_nan: bool = False,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        dtype: Optional[DTypeLike] = None,
    ) -> BceResult:
        """Binary cross-entropy with logits, and optionally its gradients, on the server.

        With x logits, y targets, w weight, p pos_weight and sp(t) = log(1 + exp(t)):
        ``loss = w * [(1-y) * sp(x) + p*y * sp(-x)]`` per element, computed without
        cancellation; a term whose coefficient is exactly 0 is skipped (x=+inf, y=1 gives
        0); NaN inputs give NaN outputs for that element. Same definition as
        ``torch.nn.functional.binary_cross_entropy_with_logits``, except that ``"mean"``
        always divides by the number of elements.

        Parameters
        ----------
        logits : array_like
            float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``) values of any
            shape; a 0-d array is one element. The outputs have this dtype. Any memory layout.
        targets : array_like
            Same shape as the logits. A supported float dtype is sent as is; integers,
            booleans and Python scalars/lists are converted to the logits' dtype.
        weight : array_like, optional
            Per-element weight w, broadcast to the logits' shape (numpy rules, e.g. a scalar,
            ``[C]``, ``[N, 1]`` or the full shape). Default: 1. Dtype rules as for targets.
        pos_weight : array_like, optional
            Positive-class weight p, broadcast to the logits' shape (typically ``[C]``).
            Default: 1. Dtype rules as for targets.
        reduction : {"mean", "sum", "none"}, optional
            ``"mean"`` is sum / numel (NaN for no elements), ``"sum"`` is 0 for no elements,
            ``"none"`` returns the per-element loss. Default "mean".
        grad : bool, optional
            Also return dl/dx, the gradient of the reduced loss with respect to the logits.
        grad_targets : bool, optional
            Also return dl/dy, the gradient with respect to the targets.
        device : {"auto", "cpu", "cuda"}, optional
            Where to run. "cuda" fails with :class:`FailedPreconditionError` on a server
            without a usable GPU. Default "auto".
        reject_nan : bool, optional
            Fail with :class:`InvalidArgumentError` when any input holds a NaN, instead of
            returning NaN for the affected elements.
        request_id : str, optional
            Id echoed by the server and written to its logs. Default: a random UUID.
        timeout : float, optional
            Deadline of this call in seconds; default: the client's.
        dtype : {"float32", "float64", "float16", "bfloat16"} or numpy dtype, optional
            Send every tensor in this dtype instead of its own, rounding on the client
            (nearest even). ``dtype="bfloat16"`` sends bfloat16 without ``ml_dtypes``.

        Returns
        -------
        BceResult
            ``loss`` (logits' shape for "none", 0-d otherwise), ``grad``, ``grad_targets``,
            ``device``, ``timing``, ``request_id``. The arrays are read-only views of the
            response's bytes.

        Raises
        ------
        ValueError
            Unsupported dtype of an argument (named in the message), unknown ``reduction``,
            ``device`` or ``dtype``.
        LossdError
            Any RPC failure, as the subclass for its status code: InvalidArgumentError
            (shape mismatch, weight not broadcastable, NaN with ``reject_nan``, ...),
            ResourceExhaustedError, FailedPreconditionError, UnavailableError,
            DeadlineExceededError, ...
        """
        red = _REDUCTIONS.get(reduction.lower() if isinstance(reduction, str) else reduction)
        if red is None:
            raise ValueError(f"reduction: expected one of {sorted(_REDUCTIONS)}, got {reduction!r}")
        dev = _DEVICES.get(device.lower() if isinstance(device, str) else device)
        if dev is None:
            raise ValueError(f"device: expected one of {sorted(_DEVICES)}, got {device!r}")
        wire = None if dtype is None else resolve_dtype(dtype, "dtype")

        x = as_array("logits", logits, None)
        bce = pb.BceWithLogits()
        if pos_weight is not None:
            bce.pos_weight.CopyFrom(encode(as_array("pos_weight", pos_weight, x.dtype), wire))
        request = pb.EvaluateRequest(
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            logits=encode(x, wire),
            targets=encode(as_array("targets", targets, x.dtype), wire),
            bce_with_logits=bce,
            reduction=red,
            gradients=pb.GradientRequest(logits=bool(grad), targets=bool(grad_targets)),
            device=dev,
            reject_nan=bool(reject_nan),
        )
        if weight is not None:
            request.weight.CopyFrom(encode(as_array("weight", weight, x.dtype), wire))
        return self._evaluate_bce(request, timeout)

    def _evaluate_bce(self, request: "pb.EvaluateRequest",
                      timeout: Optional[float]) -> BceResult:
        try:
            response = self._stub.Evaluate(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            logger.debug("Evaluate %s failed: %s", request.request_id, err)
            raise err from None
        t = response.timing
        result = BceResult(
            loss=decode(response.loss, "loss"),
            grad=decode(response.grad_logits, "grad_logits")
            if response.HasField("grad_logits") else None,
            grad_targets=decode(response.grad_targets, "grad_targets")
            if response.HasField("grad_targets") else None,
            device=_enum_name(pb.Device, "DEVICE_", response.device),
            timing=Timing(queue_ns=t.queue_ns, compute_ns=t.compute_ns, total_ns=t.total_ns),
            request_id=response.request_id,
            num_elements=response.num_elements,
        )
        logger.debug("Evaluate %s: %d elements %s %s on %s, %d ns total", result.request_id,
                     result.num_elements, dtype_name(request.logits.dtype),
                     _enum_name(pb.Reduction, "REDUCTION_", request.reduction), result.device,
                     result.timing.total_ns)
        return result

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
            c = self._stub.GetCapabilities(pb.GetCapabilitiesRequest(),
                                           timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return Capabilities(
            server_version=c.server_version,
            losses=tuple(c.losses),
            dtypes=tuple(dtype_name(d) for d in c.dtypes),
            devices=tuple(_enum_name(pb.Device, "DEVICE_", d) for d in c.devices),
            reductions=tuple(_enum_name(pb.Reduction, "REDUCTION_", r) for r in c.reductions),
            max_message_bytes=c.max_message_bytes,
            max_elements=c.max_elements,
            cuda_device_name=c.cuda_device_name,
        )

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
        # HealthCheckRequest { string service = 1; } encoded by hand: no extra dependency.
        name = service.encode("utf-8")
        request = (b"\x0a" + _varint(len(name)) + name) if name else b""
        try:
            reply = self._health(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _HEALTH_STATUS.get(_parse_health_status(reply), "UNKNOWN")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _parse_health_status(data: bytes) -> int:
    """Field 1 (enum ServingStatus) of a HealthCheckResponse; 0 when absent."""
    status, i = 0, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _read_varint(data, i)
            if field == 1:
                status = value
        elif wire_type == 2:
            length, i = _read_varint(data, i)
            i += length
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        else:
            raise LossdError(grpc.StatusCode.INTERNAL, "client: malformed health response")
    return status


def _read_varint(data: bytes, i: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data) or shift > 63:
            raise LossdError(grpc.StatusCode.INTERNAL, "client: malformed health response")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
