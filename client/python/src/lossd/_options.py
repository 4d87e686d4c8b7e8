"""The loss options of a request: their names on the client's API, their validation, and
their ``EvaluateRequest`` fields (:class:`~lossd._wire.RequestOptions`)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from ._proto.lossd.v1 import lossd_pb2 as pb
from ._wire import RequestOptions

__all__ = ["REDUCTIONS", "DEVICES", "enum_name", "make_options"]

REDUCTIONS: Dict[str, int] = {"none": pb.REDUCTION_NONE, "mean": pb.REDUCTION_MEAN,
                              "sum": pb.REDUCTION_SUM,
                              "per_sample_mean": pb.REDUCTION_PER_SAMPLE_MEAN}
DEVICES: Dict[str, int] = {"auto": pb.DEVICE_AUTO, "cpu": pb.DEVICE_CPU, "cuda": pb.DEVICE_CUDA}


def enum_name(enum: Any, prefix: str, value: int) -> str:
    """Maps e.g. REDUCTION_SUM to "sum"; a value this client does not know to its number."""
    try:
        return enum.Name(value)[len(prefix):].lower()
    except ValueError:
        return str(value)


def _choice(table: Dict[str, int], value: Any, argument: str) -> int:
    key = value.lower() if isinstance(value, str) else value
    if key not in table:
        raise ValueError(f"{argument}: expected one of {sorted(table)}, got {value!r}")
    return table[key]


def make_options(*, loss: str, reduction: Any, grad: bool, grad_targets: bool, device: Any,
                 reject_nan: bool, ignore_index: Optional[int] = None, normalize: bool = False,
                 label_smoothing: float = 0.0, alpha: Optional[float] = None,
                 gamma: Optional[float] = None) -> RequestOptions:
    """Validates the loss options on the client and returns the request's option fields.

    Raises
    ------
    ValueError
        Unknown ``reduction``/``device``, ``label_smoothing`` outside [0, 1], ``gamma`` < 0,
        ``alpha`` > 1, ``grad_targets`` with the focal loss, non-integer ``ignore_index``.
    """
    red = _choice(REDUCTIONS, reduction, "reduction")
    dev = _choice(DEVICES, device, "device")
    if loss == "bce":
        s = float(label_smoothing)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"label_smoothing: {label_smoothing!r} is outside [0, 1]")
        if ignore_index is not None:
            if isinstance(ignore_index, bool) or int(ignore_index) != ignore_index:
                raise ValueError(f"ignore_index: expected an integer, got {ignore_index!r}")
            ignore_index = int(ignore_index)
        return RequestOptions(loss="bce", reduction=red, grad_logits=bool(grad),
                              grad_targets=bool(grad_targets), device=dev,
                              reject_nan=bool(reject_nan), ignore_index=ignore_index,
                              normalize=bool(normalize), label_smoothing=s)
    if grad_targets:
        raise ValueError("grad_targets: sigmoid_focal_loss offers only the gradient wrt the "
                         "logits")
    a = -1.0 if alpha is None else float(alpha)
    g = float(gamma) if gamma is not None else 2.0
    if not (math.isfinite(a) and a <= 1.0):
        raise ValueError(f"alpha: {alpha!r} must be in [0, 1], or negative (or None) to "
                         "disable the alpha weighting")
    if not 0.0 <= g <= 1e4:
        raise ValueError(f"gamma: {gamma!r} is outside [0, 10000]")
    return RequestOptions(loss="focal", reduction=red, grad_logits=bool(grad), device=dev,
                          reject_nan=bool(reject_nan), alpha=a, gamma=g)
