"""The benchmark's request: BCE with logits on float32 logits [n/64, 64] (or [n]), targets 0/1,
no weights, REDUCTION_NONE with dl/dx (a training step's loss evaluation).

``encode_request`` writes the canonical protobuf bytes of that ``lossd.v1.EvaluateRequest``
(what the lossd client sends for a request that fits in one message) without the generated
classes, so that the echo and raw baselines send the same bytes as lossd's client would.
``fields`` is a minimal protobuf reader for the few replies the harness inspects.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

DTYPE_FLOAT32 = 1
REDUCTION_NONE = 1
_BCE_WITH_LOGITS_FIELD = 5


def shape_of(elements: int) -> Tuple[int, ...]:
    """[n/64, 64] when 64 divides n (n >= 64), else [n]."""
    if elements >= 64 and elements % 64 == 0:
        return (elements // 64, 64)
    return (elements,)


def make_arrays(elements: int, seed: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Logits uniform in [-4, 4) and alternating 0/1 targets, float32, shape_of(elements)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-4.0, 4.0, elements).astype(np.float32).reshape(shape_of(elements))
    y = (np.arange(elements) % 2).astype(np.float32).reshape(shape_of(elements))
    return x, y


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative integer."""
    if n < 0:
        raise ValueError(f"varint of a negative number: {n}")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(field: int, body: bytes) -> bytes:
    return varint((field << 3) | 2) + varint(len(body)) + body


def _tensor(a: np.ndarray) -> bytes:
    body = b"\x08" + varint(DTYPE_FLOAT32)
    dims = b"".join(varint(int(d)) for d in a.shape)
    body += _len_field(2, dims)
    data = np.ascontiguousarray(a, dtype="<f4").tobytes()
    if data:
        body += _len_field(3, data)
    return body


def encode_request(x: np.ndarray, y: np.ndarray, request_id: str = "") -> bytes:
    """EvaluateRequest{request_id, logits, targets, bce_with_logits{}, REDUCTION_NONE,
    gradients{logits: true}} in field order (proto3 defaults omitted)."""
    out = bytearray()
    if request_id:
        out += _len_field(1, request_id.encode("utf-8"))
    out += _len_field(2, _tensor(x))
    out += _len_field(3, _tensor(y))
    out += _len_field(_BCE_WITH_LOGITS_FIELD, b"")
    out += varint((16 << 3) | 0) + varint(REDUCTION_NONE)
    out += _len_field(17, b"\x08\x01")
    return bytes(out)


Value = Union[int, bytes]


def _read_varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    shift = 0
    value = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def iter_fields(data: Union[bytes, memoryview]) -> Iterator[Tuple[int, Value]]:
    """(field number, value) of each field of a serialized message: varints as int,
    length-delimited fields as bytes, fixed32/64 as int (raw bits)."""
    buf = memoryview(data)
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            yield field, value
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            yield field, bytes(buf[pos:pos + n])
            pos += n
        elif wire == 1:
            yield field, int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wire == 5:
            yield field, int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def fields(data: Union[bytes, memoryview]) -> Dict[int, List[Value]]:
    """{field number: [values in order]} of a serialized message."""
    out: Dict[int, List[Value]] = {}
    for f, v in iter_fields(data):
        out.setdefault(f, []).append(v)
    return out


class Payload:
    """One request size: the arrays (for the lossd client) and, built on first use, their
    request bytes (for the echo and raw baselines)."""

    def __init__(self, elements: int) -> None:
        self.elements = elements
        self.x, self.y = make_arrays(elements)
        self._request: Optional[bytes] = None

    @property
    def request(self) -> bytes:
        if self._request is None:
            self._request = encode_request(self.x, self.y, request_id="bench")
        return self._request
