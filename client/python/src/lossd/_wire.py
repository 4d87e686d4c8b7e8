"""Hand-written protobuf codec for the large messages of ``lossd.v1``.

``EvaluateRequest`` is serialized straight from the arrays' memory and ``EvaluateResponse``
(alone or inside an ``EvaluateStreamResponse``) is parsed without copying tensor data: the
output arrays are ``np.frombuffer`` views of the bytes gRPC received. Going through the
generated message classes instead costs three to four copies of every tensor (array ->
``bytes`` -> message -> serialized string, and message -> ``bytes`` on the way back), which
dominates the client's time for large tensors.

The encoding is standard protobuf (fields in number order, packed repeated scalars, proto3
defaults omitted); tests/client/test_wire.py checks it against the generated classes in both
directions. Messages with less than SMALL_BYTES of tensor data, and the small messages
(Accumulate's reply, capabilities), use the generated classes: for them the C parser beats
Python-level parsing and the copies cost little.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from google.protobuf.message import DecodeError

from ._errors import InternalError
from ._proto.lossd.v1 import lossd_pb2 as pb
from ._tensor import BFLOAT16, bfloat16_bits_to_float32, dtype_name, output_dtype

__all__ = ["WireTensor", "RequestOptions", "encode_request", "ParsedTensor", "ParsedResponse",
           "parse_response", "parse_stream_response", "to_array", "encode_varint",
           "read_varint"]

Buffer = Union[bytes, memoryview]

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5
_MASK64 = (1 << 64) - 1
_VARINT1 = [bytes([i]) for i in range(128)]
_DOUBLE = struct.Struct("<d")


def encode_varint(n: int) -> bytes:
    """Base-128 varint of ``n``; negative values as 64-bit two's complement (10 bytes)."""
    if 0 <= n < 128:
        return _VARINT1[n]
    n &= _MASK64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return encode_varint((field << 3) | wire_type)


@dataclass(frozen=True)
class WireTensor:
    """A tensor ready to be sent: wire dtype, shape and a C-contiguous array of its bytes."""

    code: int
    shape: Tuple[int, ...]
    data: np.ndarray  # C-contiguous, little-endian, nbytes == numel * itemsize(code)


@dataclass(frozen=True)
class RequestOptions:
    """Every field of an ``EvaluateRequest`` except the tensors.

    ``loss`` is "bce" (``bce_with_logits``) or "focal" (``sigmoid_focal_loss``); the options
    of the other loss are ignored. None means "unset" for the optional fields.
    """

    loss: str = "bce"
    reduction: int = 2
    grad_logits: bool = False
    grad_targets: bool = False
    device: int = 0
    reject_nan: bool = False
    ignore_index: Optional[int] = None
    normalize: bool = False
    label_smoothing: float = 0.0
    alpha: Optional[float] = None
    gamma: Optional[float] = None
    #: ``EvaluateRequest.whole`` of a part of a split request: the whole request's element
    #: count (0: the request is whole) and, with normalize and ignore_index, its kept count.
    whole_elements: int = 0
    whole_kept: Optional[int] = None


def _whole_body(o: RequestOptions) -> bytes:
    """The ``WholeRequest`` message of ``o`` (empty when the request is whole)."""
    if not o.whole_elements:
        return b""
    body = b"\x08" + encode_varint(int(o.whole_elements))
    if o.whole_kept is not None:
        body += b"\x10" + encode_varint(int(o.whole_kept))
    return body


def _tensor_parts(field: int, t: WireTensor, parts: List[Buffer]) -> int:
    """Appends tensor field ``field`` to ``parts``; returns the bytes appended."""
    head = bytearray()
    if t.code:
        head += b"\x08" + encode_varint(t.code)
    if t.shape:
        dims = b"".join(encode_varint(int(d)) for d in t.shape)
        head += b"\x12" + encode_varint(len(dims)) + dims
    nbytes = t.data.nbytes
    if nbytes:
        head += b"\x1a" + encode_varint(nbytes)
    body_len = len(head) + nbytes
    prefix = _key(field, _WT_LEN) + encode_varint(body_len)
    parts.append(prefix + bytes(head))
    if nbytes:
        # A flat byte view: works for every dtype (ml_dtypes' included) and for 0-d arrays.
        parts.append(t.data.reshape(-1).view(np.uint8).data)
    return len(prefix) + body_len


def _loss_body(o: RequestOptions, pos_weight: Optional[WireTensor]) -> Tuple[int, List[Buffer]]:
    parts: List[Buffer] = []
    size = 0
    if o.loss == "focal":
        body = b""
        if o.alpha is not None:
            body += b"\x09" + _DOUBLE.pack(float(o.alpha))
        if o.gamma is not None:
            body += b"\x11" + _DOUBLE.pack(float(o.gamma))
        return len(body), [body] if body else []
    if pos_weight is not None:
        size += _tensor_parts(1, pos_weight, parts)
    tail = b""
    if o.ignore_index is not None:
        tail += b"\x10" + encode_varint(int(o.ignore_index))
    if o.normalize:
        tail += b"\x18\x01"
    if o.label_smoothing:
        tail += b"\x21" + _DOUBLE.pack(float(o.label_smoothing))
    if tail:
        parts.append(tail)
        size += len(tail)
    return size, parts


#: Below this many bytes of tensor data the generated (C) message classes are faster than
#: the pure-Python codec, and their copies cost little.
SMALL_BYTES = 64 * 1024


def _pb_tensor(t: WireTensor) -> "pb.Tensor":
    return pb.Tensor(dtype=t.code, shape=t.shape, data=t.data.tobytes())  # type: ignore[arg-type]


def request_message(request_id: str, logits: "pb.Tensor", targets: "pb.Tensor",
                    weight: Optional["pb.Tensor"], pos_weight: Optional["pb.Tensor"],
                    o: RequestOptions) -> "pb.EvaluateRequest":
    """An ``EvaluateRequest`` of the generated classes with these tensors and options (the
    one place the options are encoded into the message; ``pos_weight`` only with BCE)."""
    req = pb.EvaluateRequest(request_id=request_id, logits=logits, targets=targets,
                             reduction=o.reduction, device=o.device,  # type: ignore[arg-type]
                             reject_nan=o.reject_nan)
    if weight is not None:
        req.weight.CopyFrom(weight)
    if o.grad_logits or o.grad_targets:
        req.gradients.logits = o.grad_logits
        req.gradients.targets = o.grad_targets
    if o.whole_elements:
        req.whole.num_elements = o.whole_elements
        if o.whole_kept is not None:
            req.whole.num_kept = o.whole_kept
    if o.loss == "focal":
        focal = req.sigmoid_focal_loss
        focal.SetInParent()
        if o.alpha is not None:
            focal.alpha = o.alpha
        if o.gamma is not None:
            focal.gamma = o.gamma
    else:
        bce = req.bce_with_logits
        bce.SetInParent()
        if pos_weight is not None:
            bce.pos_weight.CopyFrom(pos_weight)
        if o.ignore_index is not None:
            bce.ignore_index = o.ignore_index
        bce.normalize = o.normalize
        bce.label_smoothing = o.label_smoothing
    return req


def _encode_small(request_id: str, logits: WireTensor, targets: WireTensor,
                  weight: Optional[WireTensor], pos_weight: Optional[WireTensor],
                  o: RequestOptions) -> bytes:
    return request_message(request_id, _pb_tensor(logits), _pb_tensor(targets),
                           None if weight is None else _pb_tensor(weight),
                           None if pos_weight is None else _pb_tensor(pos_weight),
                           o).SerializeToString()


def encode_request(request_id: str, logits: WireTensor, targets: WireTensor,
                   weight: Optional[WireTensor], pos_weight: Optional[WireTensor],
                   options: RequestOptions) -> bytes:
    """Serializes one ``lossd.v1.EvaluateRequest``; each tensor's bytes are copied once.

    Small requests go through the generated classes (faster for them); both encodings are
    the canonical protobuf bytes.

    Parameters
    ----------
    request_id : str
    logits, targets : WireTensor
    weight, pos_weight : WireTensor or None
        ``pos_weight`` is only sent with the BCE loss.
    options : RequestOptions

    Returns
    -------
    bytes
        The serialized message.
    """
    data_bytes = logits.data.nbytes + targets.data.nbytes + sum(
        t.data.nbytes for t in (weight, pos_weight) if t is not None)
    if data_bytes < SMALL_BYTES:
        return _encode_small(request_id, logits, targets, weight, pos_weight, options)
    parts: List[Buffer] = []
    if request_id:
        rid = request_id.encode("utf-8")
        parts.append(b"\x0a" + encode_varint(len(rid)) + rid)
    _tensor_parts(2, logits, parts)
    _tensor_parts(3, targets, parts)
    if weight is not None:
        _tensor_parts(4, weight, parts)
    size, loss_parts = _loss_body(options, pos_weight if options.loss == "bce" else None)
    parts.append((b"\x32" if options.loss == "focal" else b"\x2a") + encode_varint(size))
    parts.extend(loss_parts)
    tail = bytearray()
    if options.reduction:
        tail += b"\x80\x01" + encode_varint(options.reduction)
    if options.grad_logits or options.grad_targets:
        g = (b"\x08\x01" if options.grad_logits else b"") + \
            (b"\x10\x01" if options.grad_targets else b"")
        tail += b"\x8a\x01" + encode_varint(len(g)) + g
    if options.device:
        tail += b"\x90\x01" + encode_varint(options.device)
    if options.reject_nan:
        tail += b"\x98\x01\x01"
    whole = _whole_body(options)
    if whole:
        tail += b"\xa2\x01" + encode_varint(len(whole)) + whole
    if tail:
        parts.append(bytes(tail))
    return b"".join(parts)


# ---------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class ParsedTensor:
    """A tensor inside a received buffer: its data is ``buf[offset:offset + length]``, or
    ``source[offset:offset + length]`` when ``source`` is set."""

    dtype: int
    shape: Tuple[int, ...]
    offset: int
    length: int
    source: Optional[bytes] = None


@dataclass(frozen=True)
class ParsedResponse:
    """The fields of an ``EvaluateResponse``; tensors point into the received buffer."""

    request_id: str = ""
    loss: Optional[ParsedTensor] = None
    grad_logits: Optional[ParsedTensor] = None
    grad_targets: Optional[ParsedTensor] = None
    device: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    total_ns: int = 0
    num_elements: int = 0
    # Timing's received, compute start, compute end and reply instants (fields 4 to 7).
    instants: Tuple[int, int, int, int] = (0, 0, 0, 0)


def _malformed(what: str) -> InternalError:
    return InternalError(grpc.StatusCode.INTERNAL, f"client: malformed response ({what})")


def read_varint(buf: Buffer, i: int, end: int) -> Tuple[int, int]:
    """Reads the base-128 varint at ``buf[i:end]``.

    Returns
    -------
    (value, next_index)
        The value as an unsigned 64-bit integer (see :func:`_signed64`) and the index of
        the byte after it.

    Raises
    ------
    InternalError
        The varint runs past ``end`` or over 10 bytes.
    """
    result = 0
    shift = 0
    while True:
        if i >= end or shift > 63:
            raise _malformed("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _signed64(n: int) -> int:
    n &= _MASK64
    return n - (1 << 64) if n >> 63 else n


def _fields(buf: Buffer, i: int, end: int):
    """Yields (field, wire_type, value, start) for each field in ``buf[i:end]``.

    value is the integer for varints, the length for LEN fields (whose data begins at
    ``start``), and ``start`` is also where fixed-size values begin.
    """
    while i < end:
        key, i = read_varint(buf, i, end)
        field, wt = key >> 3, key & 7
        if wt == _WT_VARINT:
            value, i = read_varint(buf, i, end)
            yield field, wt, value, i
        elif wt == _WT_LEN:
            length, i = read_varint(buf, i, end)
            if i + length > end:
                raise _malformed("truncated field")
            yield field, wt, length, i
            i += length
        elif wt == _WT_I64:
            if i + 8 > end:
                raise _malformed("truncated fixed64")
            yield field, wt, 0, i
            i += 8
        elif wt == _WT_I32:
            if i + 4 > end:
                raise _malformed("truncated fixed32")
            yield field, wt, 0, i
            i += 4
        else:
            raise _malformed(f"wire type {wt}")


def _parse_tensor(buf: Buffer, i: int, end: int) -> ParsedTensor:
    dtype = 0
    shape: List[int] = []
    offset, length = i, 0
    for field, wt, value, start in _fields(buf, i, end):
        if field == 1 and wt == _WT_VARINT:
            dtype = value
        elif field == 2 and wt == _WT_LEN:  # packed
            j = start
            while j < start + value:
                d, j = read_varint(buf, j, start + value)
                shape.append(_signed64(d))
        elif field == 2 and wt == _WT_VARINT:  # unpacked
            shape.append(_signed64(value))
        elif field == 3 and wt == _WT_LEN:
            offset, length = start, value
    return ParsedTensor(dtype, tuple(shape), offset, length)


def _parse_response(buf: Buffer, i: int, end: int) -> ParsedResponse:
    kw: Dict[str, object] = {}
    for field, wt, value, start in _fields(buf, i, end):
        if wt == _WT_LEN:
            if field == 1:
                kw["request_id"] = bytes(buf[start:start + value]).decode("utf-8", "replace")
            elif field in (2, 3, 4):
                kw[("loss", "grad_logits", "grad_targets")[field - 2]] = \
                    _parse_tensor(buf, start, start + value)
            elif field == 6:
                instants = [0, 0, 0, 0]
                for f2, wt2, v2, _ in _fields(buf, start, start + value):
                    if wt2 == _WT_VARINT and f2 in (1, 2, 3):
                        kw[("queue_ns", "compute_ns", "total_ns")[f2 - 1]] = _signed64(v2)
                    elif wt2 == _WT_VARINT and 4 <= f2 <= 7:
                        instants[f2 - 4] = _signed64(v2)
                kw["instants"] = tuple(instants)
        elif wt == _WT_VARINT:
            if field == 5:
                kw["device"] = value
            elif field == 7:
                kw["num_elements"] = _signed64(value)
    return ParsedResponse(**kw)  # type: ignore[arg-type]


def _from_pb_tensor(t: "pb.Tensor") -> ParsedTensor:
    data = t.data
    return ParsedTensor(t.dtype, tuple(t.shape), 0, len(data), data)


def _parse_small(buf: Buffer) -> ParsedResponse:
    try:
        r = pb.EvaluateResponse.FromString(bytes(buf))
    except DecodeError:
        raise _malformed("not an EvaluateResponse") from None
    t = r.timing
    return ParsedResponse(
        request_id=r.request_id,
        loss=_from_pb_tensor(r.loss) if r.HasField("loss") else None,
        grad_logits=_from_pb_tensor(r.grad_logits) if r.HasField("grad_logits") else None,
        grad_targets=_from_pb_tensor(r.grad_targets) if r.HasField("grad_targets") else None,
        device=r.device, queue_ns=t.queue_ns, compute_ns=t.compute_ns, total_ns=t.total_ns,
        num_elements=r.num_elements,
        instants=(t.received_unix_ns, t.compute_start_unix_ns, t.compute_end_unix_ns,
                  t.reply_unix_ns))


def parse_response(buf: Buffer) -> ParsedResponse:
    """Parses a serialized ``EvaluateResponse`` (small replies with the generated classes,
    large ones without copying their tensors).

    Raises
    ------
    InternalError
        If the bytes are not a well-formed message.
    """
    if len(buf) < SMALL_BYTES:
        return _parse_small(buf)
    return _parse_response(buf, 0, len(buf))


StreamReply = Tuple[str, Optional[ParsedResponse], Optional[Tuple[int, str]]]


def parse_stream_response(buf: Buffer) -> StreamReply:
    """Parses a serialized ``EvaluateStreamResponse``.

    Returns
    -------
    (request_id, response, error)
        Exactly one of ``response`` and ``error`` (a (code, message) pair) is set; a reply
        with neither is malformed.
    """
    request_id = ""
    response: Optional[ParsedResponse] = None
    error: Optional[Tuple[int, str]] = None
    for field, wt, value, start in _fields(buf, 0, len(buf)):
        if wt != _WT_LEN:
            continue
        if field == 1:
            request_id = bytes(buf[start:start + value]).decode("utf-8", "replace")
        elif field == 2:
            response, error = _parse_response(buf, start, start + value), None
        elif field == 3:
            code, message = 0, ""
            for f2, wt2, v2, s2 in _fields(buf, start, start + value):
                if f2 == 1 and wt2 == _WT_VARINT:
                    code = _signed64(v2)
                elif f2 == 2 and wt2 == _WT_LEN:
                    message = bytes(buf[s2:s2 + v2]).decode("utf-8", "replace")
            response, error = None, (code, message)
    if response is None and error is None:
        raise _malformed("stream reply has neither a response nor an error")
    return request_id, response, error


def to_array(buf: bytes, tensor: Optional[ParsedTensor], field: str) -> np.ndarray:
    """A read-only numpy view of a parsed tensor's data inside ``buf`` (no copy).

    bfloat16 is returned as ``ml_dtypes.bfloat16`` when installed, else widened to float32
    (a copy). The view may be unaligned; numpy handles that transparently.

    Raises
    ------
    InternalError
        If the tensor is missing or malformed (unknown dtype, negative dimension, wrong
        data length).
    """
    if tensor is None:
        raise _malformed(f"{field} is missing")
    try:
        dt = output_dtype(tensor.dtype)
    except KeyError:
        raise InternalError(grpc.StatusCode.INTERNAL,
                            f"client: response {field} has unknown dtype {tensor.dtype}") from None
    raw_dt = np.dtype("<u2") if tensor.dtype == 4 and BFLOAT16 is None else dt
    shape = tensor.shape
    numel = 1
    for d in shape:
        numel *= d
    if any(d < 0 for d in shape) or tensor.length != numel * raw_dt.itemsize:
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"client: response {field} has {tensor.length} bytes, expected "
            f"{max(numel, 0) * raw_dt.itemsize} ({dtype_name(tensor.dtype)} {list(shape)})")
    source = tensor.source if tensor.source is not None else buf
    arr = np.frombuffer(source, dtype=raw_dt, count=numel, offset=tensor.offset).reshape(shape)
    if raw_dt != dt:  # bfloat16 bits without ml_dtypes
        arr = bfloat16_bits_to_float32(arr)
        arr.flags.writeable = False
    return arr


def shape_list(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"
