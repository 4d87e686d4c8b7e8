"""Chunk planning: how a request too large for one message is split along the leading axes
of its tensors (:func:`plan_chunks`), the size arithmetic behind it (:func:`message_sizes`),
and the cutting of the inputs into those chunks (:class:`_Slicer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import numpy as np

from ._inputs import Inputs, Operand
from ._tensor import itemsize_of
from ._wire import WireTensor, shape_list

__all__ = ["ChunkPlan", "plan_chunks", "message_sizes", "prod"]

# Bytes of protobuf framing allowed for besides the tensor data: tags, lengths and options
# (about 100 bytes), a request id (up to 64 more), and per dimension of each tensor's shape.
_OVERHEAD = 256
_PER_DIM = 48


def prod(shape: Iterable[int]) -> int:
    """The number of elements of ``shape`` (1 for ``()``)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def message_sizes(inputs: Inputs, loss_count: int, grads: int) -> Tuple[int, int]:
    """Upper bounds of the bytes of the request of ``inputs`` sent whole and of its reply.

    Parameters
    ----------
    inputs : Inputs
    loss_count : int
        Elements of the reply's loss tensor (1 for mean and sum).
    grads : int
        Number of gradient tensors in the reply (each of the logits' size).

    Returns
    -------
    (request_bytes, reply_bytes)
    """
    framing = _OVERHEAD + _PER_DIM * len(inputs.shape)
    req_bytes = inputs.x.nbytes + inputs.y.nbytes + sum(
        o.nbytes for o in (inputs.w, inputs.p) if o is not None) + framing
    resp_bytes = (loss_count + grads * inputs.numel) * itemsize_of(inputs.x.code) + framing
    return req_bytes, resp_bytes


@dataclass(frozen=True)
class ChunkPlan:
    """Split of a tensor of ``shape`` into row ranges of its leading axes ``0..k`` merged.

    The tensor is viewed as ``(rows, *shape[k+1:])`` with ``rows = prod(shape[:k+1])``;
    chunk ``i`` holds rows ``bounds[i]``.
    """

    shape: Tuple[int, ...]
    k: int
    bounds: Tuple[Tuple[int, int], ...]

    @property
    def rows(self) -> int:
        return prod(self.shape[:self.k + 1])

    @property
    def rest(self) -> Tuple[int, ...]:
        return self.shape[self.k + 1:]


def _padded(arr: np.ndarray, ndim: int) -> np.ndarray:
    return arr.reshape((1,) * (ndim - arr.ndim) + arr.shape)


def _is_whole(op: Operand, ndim: int, k: int) -> bool:
    """True when a broadcast operand is the same for every row (leading dims all 1)."""
    return all(d == 1 for d in _padded(op.array, ndim).shape[:k + 1])


def plan_chunks(inputs: Inputs, *, loss_per_row: str, grads: int, limit: int,
                preferred: int, min_rest: int = 0) -> ChunkPlan:
    """Chooses the split axis and the rows per chunk so that requests and replies fit.

    Parameters
    ----------
    loss_per_row : {"elements", "samples", "scalar"}
        What the reply carries per element: the loss of each element, of each last-axis
        row, or one scalar for the chunk.
    grads : int
        Number of gradient tensors in each reply.
    limit : int
        The message size limit (bytes).
    preferred : int
        Preferred chunk size (bytes); smaller chunks pipeline better.
    min_rest : int
        Number of trailing axes that must stay whole (1 for per_sample_mean).

    Raises
    ------
    ValueError
        When even one row of the innermost splittable axis does not fit.
    """
    shape = inputs.shape
    nd = len(shape)
    x_item = itemsize_of(inputs.x.code)
    out_item = itemsize_of(inputs.x.code)
    for k in range(0, max(nd - min_rest, 1)):
        if nd == 0:
            break
        rest = shape[k + 1:]
        rest_n = prod(rest)
        per_row_req = rest_n * (x_item + itemsize_of(inputs.y.code))
        fixed_req = _OVERHEAD + _PER_DIM * nd
        for op in (inputs.w, inputs.p):
            if op is None:
                continue
            if _is_whole(op, nd, k):
                fixed_req += op.nbytes
            else:
                per_row_req += prod(_padded(op.array, nd).shape[k + 1:]) * itemsize_of(op.code)
        per_row_resp = rest_n * out_item * grads
        if loss_per_row == "elements":
            per_row_resp += rest_n * out_item
        elif loss_per_row == "samples":
            per_row_resp += max(rest_n // max(shape[-1], 1), 1) * out_item
        fixed_resp = _OVERHEAD + _PER_DIM * nd
        rows_total = prod(shape[:k + 1])
        for budget in (min(preferred, limit), limit):
            fit = (budget - fixed_req) // max(per_row_req, 1)
            if per_row_resp:
                fit = min(fit, (budget - fixed_resp) // per_row_resp)
            if fit >= 1:
                n = max(-(-rows_total // fit), 1)  # chunks of balanced sizes <= fit
                bounds = tuple((i * rows_total // n, (i + 1) * rows_total // n)
                               for i in range(n))
                return ChunkPlan(shape, k, bounds)
    raise ValueError(
        f"cannot split logits of shape {shape_list(shape)} into requests of at most {limit} "
        "bytes (max_message_bytes): one row of the innermost splittable axis is larger"
        + (" (per_sample_mean keeps last-axis rows whole)" if min_rest else ""))


class _Slicer:
    """Cuts the inputs into the chunks of a plan (copies only what a chunk needs)."""

    def __init__(self, inputs: Inputs, plan: ChunkPlan) -> None:
        self.plan = plan
        self.inputs = inputs
        nd = len(plan.shape)
        merged = (plan.rows,) + plan.rest
        x, y = inputs.x.array, inputs.y.array
        if plan.k > 0:
            # Merging leading axes needs C order (a no-op for the usual contiguous inputs).
            x = np.ascontiguousarray(x).reshape(merged)
            y = np.ascontiguousarray(y).reshape(merged)
        self._x, self._y = x, y
        self._ops: List[Tuple[Optional[Operand], Optional[np.ndarray], bool]] = []
        for op in (inputs.w, inputs.p):
            if op is None:
                self._ops.append((None, None, True))
                continue
            padded = _padded(op.array, nd)
            whole = _is_whole(op, nd, plan.k)
            self._ops.append((op, padded.reshape(padded.shape[plan.k + 1:]) if whole else padded,
                              whole))

    def chunk(self, r0: int, r1: int) -> Tuple[WireTensor, WireTensor, Optional[WireTensor],
                                               Optional[WireTensor]]:
        plan = self.plan
        out: List[Optional[WireTensor]] = [self.inputs.x.wire(self._x[r0:r1]),
                                           self.inputs.y.wire(self._y[r0:r1])]
        for op, arr, whole in self._ops:
            if op is None or arr is None:
                out.append(None)
            elif whole:
                out.append(op.wire(arr))
            elif plan.k == 0:
                out.append(op.wire(arr[r0:r1]))
            else:
                lead = arr.shape[:plan.k + 1]
                idx = np.unravel_index(np.arange(r0, r1), plan.shape[:plan.k + 1])
                index = tuple(idx[j] if lead[j] != 1 else 0 for j in range(plan.k + 1))
                out.append(op.wire(arr[index]))
        return out[0], out[1], out[2], out[3]  # type: ignore[return-value]
