"""An independent float64 numpy reference for BCE with logits (docs/design.md section 3).

Stable forms, no cancellation:
    sp(t)  = max(t, 0) + log1p(exp(-|t|))          (softplus)
    s(t)   = sigmoid(t)
    loss   = w * [(1-y) * sp(x) + p*y * sp(-x)]
    dl/dx  = w * [(1-y) * s(x)  - p*y * s(-x)]
    dl/dy  = w * [-sp(x) + p * sp(-x)]
A term whose coefficient (1-y, p*y, p, w) is exactly 0 is skipped; a NaN in any input of an
element makes all of that element's outputs NaN. MEAN = sum / numel (NaN when empty), and the
gradients of MEAN are divided by numel.

loss_reference() adds the other options of the service:
    ignore_index     elements whose raw target equals it: loss 0, gradients 0
    normalize        divide losses and gradients by the count of elements not ignored (1 if 0)
    label_smoothing  y' = y (1-s) + s/2 before the loss; dl/dy is wrt the raw y: (1-s) dl/dy'
    per_sample_mean  mean over the last axis (a 0-d tensor is one sample of one element);
                     gradients of the sum of the per-sample means
    focal            torchvision's sigmoid focal loss, straight from its definition in float64:
                     loss = w * alpha_t * ce * q^gamma, q = 1 - p_t = (1-y) s(x) + y s(-x),
                     alpha_t = alpha y + (1-alpha)(1-y) (alpha < 0: 1), ce = BCE(x, y);
                     dl/dx = w alpha_t [ ((1-y) s(x) - y s(-x)) q^gamma
                                         + gamma ce q^(gamma-1) (1-2y) s(x) s(-x) ]
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


def _per_sample(values: np.ndarray) -> np.ndarray:
    """Exact per-row sums over the last axis (a 0-d array is one row of one element)."""
    v = np.asarray(values, f64)
    rows = v.reshape(-1, v.shape[-1] if v.ndim else 1)
    out = np.array([exact_sum(r) for r in rows], f64) if rows.shape[0] else np.zeros(0)
    return out.reshape(v.shape[:-1] if v.ndim else ())


def focal_elements(x, y, w, alpha, gamma):
    """float64 focal loss, dl/dx and their magnitudes (see the module docstring)."""
    with np.errstate(all="ignore"):
        sx, sn = sigmoid(x), sigmoid(-x)
        a, b = 1.0 - y, y
        ce = _skip(a, softplus(x)) + _skip(b, softplus(-x))
        q = _skip(a, sx) + _skip(b, sn)
        at = np.ones_like(x) if alpha < 0 else alpha * y + (1.0 - alpha) * (1.0 - y)
        mod = np.ones_like(q) if gamma == 0 else q ** gamma
        loss = np.where(ce == 0, 0.0, at * ce * mod)
        # s(x) - y without cancellation: (1-y) s(x) - y s(-x).
        t1 = (_skip(a, sx) - _skip(b, sn)) * mod
        if gamma == 0:
            t2 = np.zeros_like(x)
        else:
            dq = (a - b) * sx * sn
            t2 = np.where((ce == 0) | (dq == 0), 0.0, gamma * ce * q ** (gamma - 1.0) * dq)
        grad = at * (t1 + t2)
        gscale = np.abs(at) * np.maximum(np.abs(t1), np.abs(t2))
        loss, grad = _skip(w, loss), _skip(w, grad)
        gscale = np.abs(w) * gscale
    return loss, grad, gscale


def loss_reference(x, y, w=None, p=None, reduction: str = "none", *, ignore_index=None,
                   normalize: bool = False, label_smoothing: float = 0.0,
                   focal: Optional[tuple] = None) -> Reference:
    """float64 reference with every option of the service (module docstring).

    focal: (alpha, gamma) for the sigmoid focal loss (p is then unused); grad_targets is
    NaN for it (not offered by the service).
    """
    x = np.asarray(x).astype(f64)
    y_raw = np.asarray(y).astype(f64)
    assert y_raw.shape == x.shape
    s = float(label_smoothing)
    y = y_raw * (1.0 - s) + s * 0.5 if s != 0.0 else y_raw
    wb = np.broadcast_to(np.asarray(1.0 if w is None else w).astype(f64), x.shape)
    if focal is not None:
        loss, grad, gscale = focal_elements(x, y, wb, float(focal[0]), float(focal[1]))
        nan = np.isnan(x) | np.isnan(y) | np.isnan(wb)
        grad_y = np.full(x.shape, np.nan)
        gyscale = np.zeros(x.shape)
        lscale = np.abs(loss)
        for arr in (loss, grad):
            arr[nan] = np.nan
    else:
        r = bce_reference(x, y, w, p, "none")
        loss, grad, grad_y = r.loss, r.grad, r.grad_targets * (1.0 - s)
        lscale, gscale, gyscale = r.loss_scale, r.grad_scale, r.grad_targets_scale * (1.0 - s)
    if ignore_index is not None:
        ignored = y_raw == float(ignore_index)
        for arr in (loss, grad, grad_y, lscale, gscale, gyscale):
            arr[ignored] = 0.0
        kept = int(x.size - ignored.sum())
    else:
        kept = x.size
    count = float(kept) if (normalize and kept > 0) else 1.0
    n = x.size
    with np.errstate(all="ignore"):
        if reduction == "none":
            return Reference(loss / count, grad / count, grad_y / count, lscale / count,
                             gscale / count, gyscale / count)
        if reduction == "per_sample_mean":
            last = x.shape[-1] if x.ndim else 1
            div = float(last) * count
            return Reference(_per_sample(loss) / last / count, grad / div, grad_y / div,
                             _per_sample(np.abs(loss)) / last / count, gscale / div,
                             gyscale / div)
        total = exact_sum(loss) / count
        scale = exact_sum(np.abs(loss)) / count
        if reduction == "sum":
            return Reference(np.array(total), grad / count, grad_y / count, np.array(scale),
                             gscale / count, gyscale / count)
        if reduction == "mean":
            div = count * n
            return Reference(np.array(total / n if n else math.nan), grad / div, grad_y / div,
                             np.array(scale / n if n else math.nan), gscale / div,
                             gyscale / div)
    raise ValueError(reduction)
