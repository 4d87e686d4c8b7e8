"""An independent float64 numpy reference for BCE with logits (DESIGN.md section 4).

Stable forms, no cancellation:
    sp(t)  = max(t, 0) + log1p(exp(-|t|))          (softplus)
    s(t)   = sigmoid(t)
    loss   = w * [(1-y) * sp(x) + p*y * sp(-x)]
    dl/dx  = w * [(1-y) * s(x)  - p*y * s(-x)]
    dl/dy  = w * [-sp(x) + p * sp(-x)]
A term whose coefficient (1-y, p*y, p, w) is exactly 0 is skipped; a NaN in any input of an
element makes all of that element's outputs NaN. MEAN = sum / numel (NaN when empty), and the
gradients of MEAN are divided by numel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

f64 = np.float64


def softplus(t: np.ndarray) -> np.ndarray:
    return np.maximum(t, 0.0) + np.log1p(np.exp(-np.abs(t)))


def sigmoid(t: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(t))
    return np.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass
class Reference:
    loss: np.ndarray          # per element (reduction none) or 0-d
    grad: np.ndarray          # dl/dx of the reduced loss
    grad_targets: np.ndarray  # dl/dy of the reduced loss
    loss_scale: np.ndarray    # magnitudes for error bounds: |loss|, and for each gradient
                              # its larger term (the two can cancel for soft labels)
    grad_scale: np.ndarray
    grad_targets_scale: np.ndarray


def _skip(coef: np.ndarray, value: np.ndarray) -> np.ndarray:
    return np.where(coef == 0, 0.0, coef * value)


def exact_sum(values: np.ndarray) -> float:
    flat = np.asarray(values, f64).ravel()
    if flat.size == 0:
        return 0.0
    if not np.all(np.isfinite(flat)):
        return float(np.sum(flat))
    return math.fsum(flat.tolist())


def bce_reference(x, y, w=None, p=None, reduction: str = "none") -> Reference:
    """float64 loss and gradients; inputs are converted to float64 exactly."""
    x = np.asarray(x).astype(f64)
    y = np.asarray(y).astype(f64)
    assert y.shape == x.shape
    w = np.broadcast_to(np.asarray(1.0 if w is None else w).astype(f64), x.shape)
    p = np.broadcast_to(np.asarray(1.0 if p is None else p).astype(f64), x.shape)
    with np.errstate(all="ignore"):
        a = 1.0 - y
        b = p * y
        l1, l2 = _skip(a, softplus(x)), _skip(b, softplus(-x))
        g1, g2 = _skip(a, sigmoid(x)), _skip(b, sigmoid(-x))
        h1, h2 = -softplus(x), _skip(p, softplus(-x))
        loss = _skip(w, l1 + l2)
        grad = _skip(w, g1 - g2)
        grad_y = _skip(w, h1 + h2)
        # The loss terms have one sign for w, p >= 0 and y in [0, 1]: bound by the value.
        loss_scale = np.abs(loss)
        grad_scale = np.abs(w) * np.maximum(np.abs(g1), np.abs(g2))
        grad_y_scale = np.abs(w) * np.maximum(np.abs(h1), np.abs(h2))
    nan = np.isnan(x) | np.isnan(y) | np.isnan(w) | np.isnan(p)
    for arr in (loss, grad, grad_y):
        arr[nan] = np.nan
    n = x.size
    if reduction == "none":
        return Reference(loss, grad, grad_y, loss_scale, grad_scale, grad_y_scale)
    total = exact_sum(loss)
    scale_total = exact_sum(np.abs(loss))
    if reduction == "sum":
        return Reference(np.array(total), grad, grad_y, np.array(scale_total), grad_scale,
                         grad_y_scale)
    if reduction == "mean":
        mean = total / n if n else math.nan
        with np.errstate(all="ignore"):
            return Reference(np.array(mean), grad / n, grad_y / n,
                             np.array(scale_total / n if n else math.nan),
                             grad_scale / n, grad_y_scale / n)
    raise ValueError(reduction)


def violations(got: np.ndarray, ref: np.ndarray, scale: np.ndarray, kind: str,
               reduced: bool = False) -> Optional[str]:
    """None when `got` is within tolerance of `ref`, else a description of the worst miss.

    kind: "float32" (4 ulp of the float32-rounded scale per element; rel 1e-6 for reductions),
    "float64" (rel 1e-13), "half" (rel 1e-2, abs 1e-3).
    """
    got = np.asarray(got)
    if got.dtype.kind != "f":  # ml_dtypes.bfloat16
        got = got.astype(np.float32)
    g = got.astype(f64)
    ref = np.asarray(ref, f64)
    scale = np.asarray(scale, f64)
    if g.shape != ref.shape:
        return f"shape {g.shape} != expected {ref.shape}"
    special = ~np.isfinite(ref)
    bad = np.zeros(ref.shape, bool)
    # NaN where NaN, the same infinity where infinite.
    bad |= special & ~((np.isnan(ref) & np.isnan(g)) | (g == ref))
    fin = ~special
    with np.errstate(all="ignore"):
        err = np.abs(g - ref)
        if kind == "float32":
            if reduced:
                tol = 1e-6 * scale + 1e-38
            else:
                tol = 4.0 * np.spacing(np.abs(scale.astype(np.float32))).astype(f64)
                # The value itself is compared after rounding to float32.
                err = np.abs(g - ref.astype(np.float32).astype(f64))
        elif kind == "float64":
            tol = 1e-13 * scale + 1e-300
        elif kind == "half":
            tol = 1e-3 + 1e-2 * np.maximum(np.abs(ref), scale)
        else:
            raise ValueError(kind)
        bad |= fin & ~(err <= tol)
    if not bad.any():
        return None
    idx = np.argwhere(bad)[0] if bad.ndim else ()
    idx = tuple(int(i) for i in idx)
    return (f"{int(bad.sum())} of {bad.size} elements out of tolerance ({kind}); first at "
            f"{idx}: got {g[idx]!r}, expected {ref[idx]!r}, scale {scale[idx]!r}")
