"""Conversion between numpy arrays and ``lossd.v1.Tensor`` messages.

Wire format: ``{dtype enum, shape, bytes data}``, data little-endian and row-major.

bfloat16
--------
numpy has no bfloat16. When the optional package ``ml_dtypes`` is importable,
``ml_dtypes.bfloat16`` arrays are accepted as inputs and bfloat16 outputs are returned as
``ml_dtypes.bfloat16`` arrays. Without it, bfloat16 can still be sent by passing
``dtype="bfloat16"`` to a call (the client rounds the values to nearest even), and bfloat16
outputs are returned widened to float32 (exactly: every bfloat16 value is a float32).
bfloat16 assumes a little-endian host (as every platform numpy and ml_dtypes ship for).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union, cast

import numpy as np

import grpc

from ._errors import InternalError
from ._proto.lossd.v1 import lossd_pb2 as pb

try:  # Optional dependency: numpy dtype extensions (bfloat16).
    import ml_dtypes as _ml_dtypes

    BFLOAT16: Optional[np.dtype] = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    BFLOAT16 = None

__all__ = ["DTypeLike", "BFLOAT16", "resolve_dtype", "encode", "decode", "dtype_name",
           "wire_array", "code_of", "itemsize_of", "output_dtype", "round_from_double"]

#: What a ``dtype=`` argument accepts: a name ("float32", "bfloat16", ...) or a numpy dtype.
DTypeLike = Union[str, np.dtype, type]

_NAMES: Dict[int, str] = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT64: "float64",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
}
_BY_NAME: Dict[str, int] = {name: code for code, name in _NAMES.items()}
_NUMPY: Dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
}
_SUPPORTED = "float32, float64, float16, bfloat16"


def dtype_name(code: int) -> str:
    """Name of a ``lossd.v1.DType`` value ("float32", ...; "DType(<n>)" if unknown)."""
    return _NAMES.get(code, f"DType({code})")


def resolve_dtype(dtype: DTypeLike, argument: str = "dtype") -> int:
    """Map a dtype name or numpy dtype to a ``lossd.v1.DType`` value.

    Parameters
    ----------
    dtype : str or numpy dtype
        "float32", "float64", "float16", "bfloat16", or an equivalent numpy dtype
        (``ml_dtypes.bfloat16`` when installed).
    argument : str
        Name used in the error message.

    Returns
    -------
    int
        The ``lossd.v1.DType`` enum value.

    Raises
    ------
    ValueError
        If the dtype is not one of the four supported types.
    """
    if isinstance(dtype, str) and dtype.lower() in _BY_NAME:
        return _BY_NAME[dtype.lower()]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"{argument}: unknown dtype {dtype!r}; supported: {_SUPPORTED}") from None
    code = _code_of(dt)
    if code is None:
        raise ValueError(f"{argument}: dtype {dt} is not supported; supported: {_SUPPORTED}")
    return code


_CODES: Dict[np.dtype, Optional[int]] = {}


def _code_of(dt: np.dtype) -> Optional[int]:
    try:
        return _CODES[dt]
    except KeyError:
        pass
    code: Optional[int] = None
    if BFLOAT16 is not None and dt == BFLOAT16:
        code = pb.DTYPE_BFLOAT16
    elif dt.kind == "f":
        for c, ndt in _NUMPY.items():
            if dt.itemsize == ndt.itemsize:
                code = c
    _CODES[dt] = code
    return code


def float_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16, nearest even, returning the uint16 bit patterns.

    float64 input is first rounded to float32 *to odd*, which makes the two-step rounding
    equal to a single correct rounding. NaN stays NaN (quiet), overflow gives infinity.

    Parameters
    ----------
    values : numpy.ndarray
        float16, float32 or float64 values.

    Returns
    -------
    numpy.ndarray
        uint16 array of the same shape.
    """
    values = np.asarray(values)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    with np.errstate(over="ignore"):
        f32 = values.astype(np.float32)
    if values.dtype.itemsize > 4:
        # Round to odd: where the float32 rounding was inexact and landed on an even
        # significand, step to the neighbour on the other side of the exact value (odd).
        with np.errstate(invalid="ignore", over="ignore"):
            inexact = np.isfinite(f32) & (f32.astype(np.float64) != values)
            even = (f32.view(np.uint32) & 1) == 0
            fix = inexact & even
            if np.any(fix):
                toward = np.where(values > f32.astype(np.float64), np.inf, -np.inf).astype(
                    np.float32)
                f32 = np.where(fix, np.nextafter(f32, toward), f32)
    # Typed constants: numpy 1.x would promote uint64 with a Python int to float64.
    u16, one = np.uint64(16), np.uint64(1)
    bits = np.asarray(f32).view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> u16) & one)) >> u16
    nan = np.isnan(f32)
    quiet = (bits >> u16) | np.uint64(0x40)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32, exactly."""
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32)
    np.left_shift(wide, np.uint32(16), out=wide)  # in place: stays an array, also 0-d
    return wide.view(np.float32)


def as_array(argument: str, value: Any, like: Optional[np.dtype]) -> np.ndarray:
    """Turn an input into a numpy array of a supported dtype, keeping its dtype if possible.

    Parameters
    ----------
    argument : str
        Argument name for error messages ("logits", "targets", ...).
    value : array_like
        Anything ``numpy.asarray`` accepts.
    like : numpy dtype or None
        The logits' dtype. Inputs without a dtype of their own (Python scalars and lists) and
        integer or boolean arrays are converted to it. None for the logits themselves.

    Returns
    -------
    numpy.ndarray
        An array whose dtype is float16/32/64 or ``ml_dtypes.bfloat16``.

    Raises
    ------
    ValueError
        If the dtype is not supported (e.g. complex, object, integer logits).
    """
    has_dtype = hasattr(value, "dtype")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{argument}: cannot convert {type(value).__name__} to an array: "
                         f"{exc}") from None
    if like is not None:
        if not has_dtype or arr.dtype.kind in "biu":
            if arr.dtype.kind not in "biuf":
                raise ValueError(f"{argument}: dtype {arr.dtype} is not supported; "
                                 f"supported: {_SUPPORTED} (integers and booleans are "
                                 "converted to the logits' dtype)")
            return _convert(arr, like)
    if _code_of(arr.dtype) is None:
        hint = "" if like is None else " (integers and booleans are converted to the logits' dtype)"
        raise ValueError(f"{argument}: dtype {arr.dtype} is not supported; "
                         f"supported: {_SUPPORTED}{hint}")
    return arr


def _convert(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if BFLOAT16 is not None and dtype == BFLOAT16:
        return float_to_bfloat16_bits(arr).view(BFLOAT16)
    return arr.astype(dtype)


def code_of(dtype: np.dtype) -> Optional[int]:
    """The ``lossd.v1.DType`` of a numpy dtype, or None when it is not one of the four."""
    return _code_of(np.dtype(dtype))


def itemsize_of(code: int) -> int:
    """Bytes per element of a ``lossd.v1.DType`` value (2, 4 or 8)."""
    return 2 if code in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16) else _NUMPY[code].itemsize


def output_dtype(code: int) -> np.dtype:
    """The numpy dtype in which outputs of a ``lossd.v1.DType`` are returned.

    bfloat16 is ``ml_dtypes.bfloat16`` when installed, else float32.
    """
    if code == pb.DTYPE_BFLOAT16:
        return BFLOAT16 if BFLOAT16 is not None else np.dtype(np.float32)
    return _NUMPY[code]


def wire_array(array: np.ndarray, wire: Optional[int] = None) -> Tuple[int, np.ndarray]:
    """The C-contiguous little-endian array whose bytes are a tensor's ``data``.

    No copy when ``array`` already is C-contiguous, little-endian and of the wire dtype.

    Parameters
    ----------
    array : numpy.ndarray
        Values of a supported dtype, any memory layout.
    wire : int, optional
        ``lossd.v1.DType`` to send as; the values are rounded to it (nearest even).
        Default: the array's own dtype.

    Returns
    -------
    (int, numpy.ndarray)
        The wire dtype and a C-contiguous array with ``shape == array.shape`` whose memory
        is the wire bytes (bfloat16 as uint16 bit patterns).
    """
    code = _code_of(array.dtype)
    if wire is None:
        wire = code
    if wire is None:  # pragma: no cover - callers go through as_array first
        raise ValueError(f"dtype {array.dtype} is not supported; supported: {_SUPPORTED}")
    if wire == code and array.flags.c_contiguous:  # the common case: no conversion at all
        if code == pb.DTYPE_BFLOAT16:
            return wire, array.view(np.uint16)
        if array.dtype == _NUMPY[code]:
            return wire, array
    if wire == pb.DTYPE_BFLOAT16:
        if code == pb.DTYPE_BFLOAT16:
            data = np.ascontiguousarray(array).view(np.uint16)
        else:
            data = float_to_bfloat16_bits(array)
        data = data.astype("<u2", copy=False)
    else:
        src = array
        if code == pb.DTYPE_BFLOAT16:
            src = bfloat16_bits_to_float32(np.ascontiguousarray(array).view(np.uint16))
        with np.errstate(over="ignore"):  # values beyond the wire dtype's range become inf
            data = src.astype(_NUMPY[wire], copy=False)
    return wire, np.ascontiguousarray(data).reshape(array.shape)


def round_from_double(value: Union[float, np.ndarray], code: int) -> np.ndarray:
    """Round doubles to a wire dtype as the server does (via float32 for half types).

    Returns an array (0-d for a scalar) of :func:`output_dtype` ``(code)``.
    """
    if code == pb.DTYPE_FLOAT64:
        return np.array(value, np.float64)
    with np.errstate(over="ignore"):  # beyond the dtype's range: infinity, as the server
        f32 = np.array(value, np.float64).astype(np.float32)
        if code == pb.DTYPE_FLOAT32:
            return f32
        if code == pb.DTYPE_FLOAT16:
            return f32.astype(np.float16)
    bits = float_to_bfloat16_bits(f32)
    if BFLOAT16 is not None:
        return bits.view(BFLOAT16)
    return bfloat16_bits_to_float32(bits)


def encode(array: np.ndarray, wire: Optional[int] = None) -> "pb.Tensor":
    """Encode an array as a ``lossd.v1.Tensor`` (one copy: the bytes of the message).

    Parameters
    ----------
    array : numpy.ndarray
        Values of a supported dtype, any memory layout (non-contiguous arrays are copied
        into row-major order).
    wire : int, optional
        ``lossd.v1.DType`` to send as; the values are rounded to it (nearest even). Default:
        the array's own dtype.

    Returns
    -------
    lossd.v1.Tensor
    """
    wire, data = wire_array(array, wire)
    return pb.Tensor(dtype=cast(Any, wire), shape=array.shape, data=data.tobytes())


def decode(tensor: "pb.Tensor", field: str) -> np.ndarray:
    """Decode a response tensor into a numpy array without copying its data.

    The result is a read-only view of the message's bytes (``np.frombuffer``); copy it
    (``arr.copy()``) to write to it. bfloat16 is returned as ``ml_dtypes.bfloat16`` when
    installed, else widened to float32 (a copy).

    Parameters
    ----------
    tensor : lossd.v1.Tensor
    field : str
        Field name for error messages.

    Returns
    -------
    numpy.ndarray
        Shaped like ``tensor.shape`` (0-d for an empty shape).

    Raises
    ------
    InternalError
        If the tensor is malformed (unknown dtype or wrong data length).
    """
    shape: Tuple[int, ...] = tuple(int(d) for d in tensor.shape)
    dt: np.dtype
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        dt = BFLOAT16 if BFLOAT16 is not None else np.dtype("<u2")
    elif tensor.dtype in _NUMPY:
        dt = _NUMPY[tensor.dtype]
    else:
        raise InternalError(grpc.StatusCode.INTERNAL,
                            f"client: response {field} has unknown dtype {tensor.dtype}")
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if any(d < 0 for d in shape) or len(tensor.data) != numel * dt.itemsize:
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"client: response {field} has {len(tensor.data)} bytes, expected "
            f"{numel * dt.itemsize} ({dtype_name(tensor.dtype)} {list(shape)})")
    arr = np.frombuffer(tensor.data, dtype=dt).reshape(shape)
    if tensor.dtype == pb.DTYPE_BFLOAT16 and BFLOAT16 is None:
        arr = bfloat16_bits_to_float32(arr)
        arr.flags.writeable = False
    return arr
