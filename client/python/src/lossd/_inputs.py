"""The inputs of one evaluation: conversion of the arguments to arrays and the choice of
each one's wire dtype (:func:`prepare_inputs`), and the unpacking of an ``accumulate``
batch (:func:`unpack_batch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from ._tensor import as_array, code_of, itemsize_of, resolve_dtype, wire_array
from ._wire import WireTensor

__all__ = ["Operand", "Inputs", "prepare_inputs", "unpack_batch"]


@dataclass(frozen=True)
class Operand:
    """An input array (any layout) and the dtype it is sent as."""

    array: np.ndarray
    code: int

    def wire(self, values: Optional[np.ndarray] = None) -> WireTensor:
        arr = self.array if values is None else values
        code, data = wire_array(arr, self.code)
        return WireTensor(code, tuple(int(d) for d in arr.shape), data)

    @property
    def nbytes(self) -> int:
        return int(self.array.size) * itemsize_of(self.code)


@dataclass(frozen=True)
class Inputs:
    """Validated inputs of one evaluation."""

    x: Operand
    y: Operand
    w: Optional[Operand]
    p: Optional[Operand]

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.x.array.shape)

    @property
    def numel(self) -> int:
        return int(self.x.array.size)


def prepare_inputs(logits: Any, targets: Any, weight: Any, pos_weight: Any,
                   dtype: Any = None, wire_codes: Optional[Mapping[str, int]] = None) -> Inputs:
    """Converts the arguments to arrays and picks the wire dtype of each.

    Parameters
    ----------
    logits, targets, weight, pos_weight : array_like (weight/pos_weight may be None)
    dtype : dtype-like, optional
        Send every tensor in this dtype (the ``dtype=`` argument of the calls).
    wire_codes : mapping, optional
        Per-argument wire dtype overrides (used for torch bfloat16 tensors).

    Raises
    ------
    ValueError
        An unsupported dtype (named with its argument) or an unknown ``dtype``.
    """
    forced = None if dtype is None else resolve_dtype(dtype, "dtype")
    codes = dict(wire_codes or {})
    x = as_array("logits", logits, None)

    def operand(name: str, value: Any) -> Optional[Operand]:
        if value is None:
            return None
        arr = x if name == "logits" else as_array(name, value, x.dtype)
        code = forced if forced is not None else codes.get(name)
        if code is None:
            code = code_of(arr.dtype)
        assert code is not None
        return Operand(arr, code)

    xo = operand("logits", logits)
    yo = operand("targets", targets)
    assert xo is not None and yo is not None
    return Inputs(xo, yo, operand("weight", weight), operand("pos_weight", pos_weight))


def unpack_batch(batch: Any, index: int) -> Tuple[Any, Any, Any, Any]:
    """The (logits, targets, weight, pos_weight) of one ``accumulate`` batch.

    Parameters
    ----------
    batch : tuple, list or mapping
        ``(logits, targets[, weight[, pos_weight]])`` or a mapping with those keys.
    index : int
        The batch's index, for error messages.

    Raises
    ------
    ValueError
        Any other shape of batch (named by its index).
    """
    if isinstance(batch, Mapping):
        unknown = set(batch) - {"logits", "targets", "weight", "pos_weight"}
        if unknown or "logits" not in batch or "targets" not in batch:
            raise ValueError(f"batch {index}: a mapping needs keys 'logits' and 'targets' "
                             f"(optional 'weight', 'pos_weight'), got {sorted(batch)}")
        return batch["logits"], batch["targets"], batch.get("weight"), batch.get("pos_weight")
    if isinstance(batch, (tuple, list)) and 2 <= len(batch) <= 4:
        items = list(batch) + [None] * (4 - len(batch))
        return items[0], items[1], items[2], items[3]
    raise ValueError(f"batch {index}: expected (logits, targets[, weight[, pos_weight]]) or a "
                     f"mapping, got {type(batch).__name__}")

