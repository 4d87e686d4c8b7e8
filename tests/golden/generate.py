#!/usr/bin/env python3
"""Generate lossd's golden data from the real libraries (torch, torchvision, paddle).

Run from the repository root with the golden virtual environment (docs/golden.md):

    .venv-golden/bin/python tests/golden/generate.py [--out tests/golden/data]

It needs torch, torchvision, paddlepaddle, numpy and mpmath (a torch dependency) at the
versions pinned in tests/golden/requirements-golden.txt; `make test` never installs them.
tests/golden/test_golden.py replays the data against a running lossd with numpy only.

Output: one .npz file per library group under tests/golden/data/, written byte for byte
reproducibly (fixed seeds, fixed zip timestamps, no pickles). Each file holds

  __meta__            JSON: library versions, generator, tolerances used for flagging
  __cases__           JSON list of case names, in order
  <case>/options      JSON: the lossd request options (loss, dtype, weight, pos_weight,
                      reduction, ignore_index, normalize, label_smoothing, alpha, gamma,
                      grad_logits, grad_targets) plus library/api/note
  <case>/x, /y, /w, /p  inputs in the case dtype (bfloat16 stored widened to float32, exact);
                      w and p only when present, in their own broadcast shapes
  <case>/<out>        library result in the case dtype, stored as float64 (exact widening),
                      out in {loss, grad_x, grad_y}; grad_x = dl/dx, grad_y = dl/dy of the
                      reduced loss (autograd; "none" backpropagates a ones gradient)
  <case>/<out>_f64    the same library computed in float64 on the same (rounded) inputs;
                      absent for float64 cases, where it equals <out>
  <case>/<out>_flag   int8 per element, present only when some element is flagged:
                        0  compare lossd with the library (torch.testing tolerances)
                        1  lossd is deliberately more exact: the library's result in the case
                           dtype is further than lossd's accuracy bound from the exact value,
                           while the library's float64 result is within 1e-6 of it
                        2  the library's float64 result is also off, or non-finite where the
                           mathematical value is defined (0 * inf -> NaN at infinite logits)
  <case>/<out>_exact  with _flag: the exact value (mpmath, 60 digits, rounded to float64)
  <case>/<out>_bound  with _flag: lossd's accuracy bound there (docs/design.md section 4)

The exact values come from mpmath evaluating docs/design.md section 3's formulas (the focal
gradient by high-precision numerical differentiation of torchvision's definition), because
torch float64 itself cancels in the regions where float32 does (for x=30, y=1 torch float64
gives dl/dx with a relative error of 1e-3; for x=100 it gives 0 instead of -3.7e-44).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import mpmath
import numpy as np

warnings.filterwarnings("ignore")

import paddle  # noqa: E402
import paddle.nn.functional as PF  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torchvision.ops import sigmoid_focal_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "tests" / "golden" / "data"

mpmath.mp.dps = 60
MP = mpmath.mpf
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                "float16": torch.float16, "bfloat16": torch.bfloat16}
# Machine epsilon and smallest subnormal of each dtype.
EPS = {"float32": 2.0**-23, "float64": 2.0**-52, "float16": 2.0**-10, "bfloat16": 2.0**-7}
TINY = {"float32": 2.0**-149, "float64": 2.0**-1074, "float16": 2.0**-24,
        "bfloat16": 2.0**-133}

# Special logits and targets of the extreme-value cases.
X_EXTREME = [-math.inf, -1e4, -100.0, -30.0, -17.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 17.0, 30.0,
             100.0, 1e4, math.inf]
Y_EXTREME = [0.0, 1.0, 0.5, 0.25]


# ----------------------------------------------------------------------------------------
# Inputs


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to `dtype` (nearest even, via torch) and widen back to float64."""
    t = torch.tensor(np.asarray(values, np.float64), dtype=torch.float64)
    return t.to(TORCH_DTYPES[dtype]).to(torch.float64).numpy()


def storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """The array stored for an input: native dtype, bfloat16 widened to float32 (exact)."""
    np_dtype = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
                "bfloat16": np.float32}[dtype]
    return np.asarray(values, np.float64).astype(np_dtype)


def make_inputs(spec: Dict[str, Any]) -> Dict[str, Optional[np.ndarray]]:
    """Draws x, y, w, p (float64 holding values exactly representable in the case dtype)."""
    rng = np.random.default_rng(zlib.crc32(spec["name"].encode()))
    dtype = spec["dtype"]
    shape = tuple(spec.get("shape", (16, 37)))
    xkind, ykind = spec.get("x", "normal"), spec.get("y", "binary")
    if xkind == "extreme":
        shape = (len(Y_EXTREME), len(X_EXTREME))
        x = np.tile(np.array(X_EXTREME), (len(Y_EXTREME), 1))
        y = np.tile(np.array(Y_EXTREME)[:, None], (1, len(X_EXTREME)))
    else:
        span = 8.0 if dtype in ("float16", "bfloat16") else 12.0
        if xkind == "large":
            span = 40.0
        x = rng.uniform(-span, span, shape)
        if xkind == "nan":
            x.flat[::7] = np.nan
        if ykind == "binary":
            y = rng.integers(0, 2, shape).astype(np.float64)
        else:
            y = rng.uniform(0.0, 1.0, shape)
        if "ignored" in spec:  # put ignore_index (an integer) into every 5th target
            y.flat[::5] = spec["ignored"]
    c = shape[-1] if shape else 1
    n = shape[0] if shape else 1
    w = None
    wkind = spec.get("weight")
    if wkind == "C":
        w = rng.uniform(0.0, 3.0, (c,))
    elif wkind == "N1":
        w = rng.uniform(0.0, 3.0, (n, 1))
    elif wkind == "full":
        w = rng.uniform(0.0, 3.0, shape)
        w.flat[::9] = 0.0
    elif wkind == "scalar":
        w = np.array(rng.uniform(0.5, 3.0))
    elif wkind == "mid":  # [3, 1] against [5, 3, 7]: a pattern lossd expands
        w = rng.uniform(0.0, 3.0, (shape[1], 1))
    p = None
    if spec.get("pos_weight"):
        p = rng.uniform(0.25, 4.0, (c,))
        if xkind == "extreme":
            p[3] = 0.0
    out = {"x": x, "y": y, "w": w, "p": p}
    return {k: (None if v is None else round_to(v, dtype)) for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# Libraries. Each returns (loss, grad_x, grad_y or None) as float64 numpy arrays.


def _torch_in(a: Optional[np.ndarray], dt: torch.dtype, grad: bool = False):
    if a is None:
        return None
    return torch.tensor(a, dtype=torch.float64).to(dt).requires_grad_(grad)


def _backward(loss: torch.Tensor) -> None:
    loss.backward(torch.ones_like(loss))


def _np(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().to(torch.float64).numpy().copy()


def lib_torch(inp, spec, dtype):
    """torch.nn.functional.binary_cross_entropy_with_logits, plus Keras-style options built
    from torch ops: y' = y*(1-s) + s/2 and a mean over the last axis."""
    dt = TORCH_DTYPES[dtype]
    gy = spec.get("grad_targets", True)
    x, y = _torch_in(inp["x"], dt, True), _torch_in(inp["y"], dt, gy)
    w, p = _torch_in(inp["w"], dt), _torch_in(inp["p"], dt)
    s = spec.get("label_smoothing", 0.0)
    ys = y * (1 - s) + s / 2 if s else y
    red = spec["reduction"]
    if red == "per_sample_mean":
        loss = F.binary_cross_entropy_with_logits(x, ys, weight=w, pos_weight=p,
                                                  reduction="none").mean(-1)
    else:
        loss = F.binary_cross_entropy_with_logits(x, ys, weight=w, pos_weight=p, reduction=red)
    _backward(loss)
    return _np(loss), _np(x.grad), _np(y.grad) if gy else None


def lib_torchvision(inp, spec, dtype):
    """torchvision.ops.sigmoid_focal_loss; a weight multiplies its "none" output (torch ops)."""
    dt = TORCH_DTYPES[dtype]
    x, y = _torch_in(inp["x"], dt, True), _torch_in(inp["y"], dt)
    w = _torch_in(inp["w"], dt)
    red = spec["reduction"]
    if w is None:
        loss = sigmoid_focal_loss(x, y, alpha=spec["alpha"], gamma=spec["gamma"], reduction=red)
    else:
        loss = sigmoid_focal_loss(x, y, alpha=spec["alpha"], gamma=spec["gamma"],
                                  reduction="none") * w
        loss = {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[red]
    _backward(loss)
    return _np(loss), _np(x.grad), None


def _paddle_in(a: Optional[np.ndarray], dtype: str, grad: bool = False):
    if a is None:
        return None
    t = paddle.to_tensor(a.astype(dtype))
    t.stop_gradient = not grad
    return t


def _paddle_grad(loss, x):
    (g,) = paddle.grad([loss], [x], grad_outputs=[paddle.ones_like(loss)])
    return g.numpy().astype(np.float64)


def lib_paddle(inp, spec, dtype):
    """paddle.nn.functional.binary_cross_entropy_with_logits (ignores targets == -100)."""
    x, y = _paddle_in(inp["x"], dtype, True), _paddle_in(inp["y"], dtype)
    w, p = _paddle_in(inp["w"], dtype), _paddle_in(inp["p"], dtype)
    loss = PF.binary_cross_entropy_with_logits(x, y, weight=w, reduction=spec["reduction"],
                                               pos_weight=p)
    return loss.numpy().astype(np.float64), _paddle_grad(loss, x), None


def lib_paddle_op(inp, spec, dtype):
    """paddle._C_ops.sigmoid_cross_entropy_with_logits(x, label, pos_weight=None, normalize,
    ignore_index): the operator under paddle's BCE API; "sum" sums its output."""
    x, y = _paddle_in(inp["x"], dtype, True), _paddle_in(inp["y"], dtype)
    out = paddle._C_ops.sigmoid_cross_entropy_with_logits(
        x, y, None, bool(spec["normalize"]), int(spec["ignore_index"]))
    if spec["reduction"] == "sum":
        out = paddle.sum(out)
    return out.numpy().astype(np.float64), _paddle_grad(out, x), None


LIBRARIES: Dict[str, Tuple[Callable, str]] = {
    "torch": (lib_torch, "torch.nn.functional.binary_cross_entropy_with_logits"),
    "torch_keras": (lib_torch, "torch ops: binary_cross_entropy_with_logits on "
                    "y*(1-s)+s/2, .mean(-1) for per_sample_mean"),
    "torchvision": (lib_torchvision, "torchvision.ops.sigmoid_focal_loss"),
    "paddle": (lib_paddle, "paddle.nn.functional.binary_cross_entropy_with_logits"),
    "paddle_op": (lib_paddle_op, "paddle._C_ops.sigmoid_cross_entropy_with_logits"),
}


# ----------------------------------------------------------------------------------------
# Exact values (mpmath) and lossd's accuracy bounds


def _sp(t):  # softplus log(1 + e^t)
    return mpmath.log1p(mpmath.exp(t))


def _sig(t):
    return 1 / (1 + mpmath.exp(-t))


def _term(c, v):  # a term whose coefficient is exactly 0 is skipped (docs/design.md section 3)
    return MP(0) if c == 0 else c * v


def _bce_element(x, y, w, p, s):
    """Exact per-element (loss, dl/dx, dl/dy, |loss| scale, dl/dx scale, dl/dy scale)."""
    ys = y * (1 - s) + s / 2 if s else y
    a, b = 1 - ys, p * ys  # coefficients of sp(x) and sp(-x)
    loss = _term(w, _term(a, _sp(x)) + _term(b, _sp(-x)))
    t1, t2 = _term(a, _sig(x)), _term(b, _sig(-x))
    gx = _term(w, t1 - t2)
    sgx = MP(0) if w == 0 else abs(w) * max(abs(t1), abs(t2))
    u1, u2 = _sp(x), _term(p, _sp(-x))
    gy = _term(w * (1 - s), u2 - u1)
    sgy = MP(0) if w * (1 - s) == 0 else abs(w * (1 - s)) * max(abs(u1), abs(u2))
    return loss, gx, gy, abs(loss), sgx, sgy


def _focal_value(x, y, w, alpha, gamma):
    """torchvision's sigmoid focal loss of one element, exact (1 - p = sigmoid(-x))."""
    ce = _term(1 - y, _sp(x)) + _term(y, _sp(-x))
    q = _term(y, _sig(-x)) + _term(1 - y, _sig(x))  # 1 - p_t
    mod = MP(1) if gamma == 0 else q ** gamma
    at = MP(1) if alpha < 0 else alpha * y + (1 - alpha) * (1 - y)
    return _term(w, at * ce * mod)


def _focal_grad_scale(x, y, w, alpha, gamma):
    """The larger of the two terms of the focal dl/dx (they cancel for soft labels):
    a_t*w*(p-y)*q^gamma and a_t*w*CE*gamma*q^(gamma-1)*(1-2y)*p*(1-p), q = 1 - p_t."""
    p, pm = _sig(x), _sig(-x)
    ce = _term(1 - y, _sp(x)) + _term(y, _sp(-x))
    q = _term(y, pm) + _term(1 - y, p)
    at = MP(1) if alpha < 0 else alpha * y + (1 - alpha) * (1 - y)
    a = abs(w * at * (p - y) * (MP(1) if gamma == 0 else q ** gamma))
    b = MP(0) if gamma == 0 else abs(w * at * ce * gamma * q ** (gamma - 1) * (1 - 2 * y) * p * pm)
    return max(a, b)


def exact(inp, spec) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Exact outputs and their scales (float64) for lossd's semantics of the case."""
    x = inp["x"]
    shape = x.shape
    n = x.size
    bw = lambda a: (np.ones(shape) if a is None else np.broadcast_to(a, shape)).ravel()
    xs, ys, ws, ps = x.ravel(), inp["y"].ravel(), bw(inp["w"]), bw(inp["p"])
    s = MP(spec.get("label_smoothing", 0.0))
    ign = spec.get("ignore_index")
    focal = spec["loss"] == "sigmoid_focal_loss"
    rows = []
    kept = 0
    for i in range(n):
        vals = [xs[i], ys[i], ws[i], ps[i]]
        if any(math.isnan(v) for v in vals):
            rows.append([MP("nan")] * 3 + [MP(0)] * 3)
            kept += 1
            continue
        xi, yi, wi, pi = (MP(float(v)) for v in vals)
        if ign is not None and ys[i] == ign:
            rows.append([MP(0)] * 6)
            continue
        kept += 1
        if focal:
            a, g = MP(spec["alpha"]), MP(spec["gamma"])
            l = _focal_value(xi, yi, wi, a, g)
            gx = mpmath.diff(lambda t: _focal_value(t, yi, wi, a, g), xi)
            rows.append([l, gx, MP(0), abs(l), _focal_grad_scale(xi, yi, wi, a, g), MP(0)])
        else:
            rows.append(list(_bce_element(xi, yi, wi, pi, s)))
    norm = MP(max(kept, 1)) if spec.get("normalize") else MP(1)
    red = spec["reduction"]
    cols = [[r[k] / norm for r in rows] for k in range(6)]
    loss, gx, gy, sl, sgx, sgy = cols
    if red == "none":
        pass
    elif red in ("sum", "mean"):
        div = MP(n) if red == "mean" else MP(1)
        tot = mpmath.fsum(loss) / div if n else (MP("nan") if red == "mean" else MP(0))
        stot = mpmath.fsum(sl) / div if n else MP(0)
        loss, sl = [tot], [stot]
        gx, sgx, gy, sgy = ([v / div for v in col] for col in (gx, sgx, gy, sgy))
    elif red == "per_sample_mean":
        c = shape[-1]
        loss = [mpmath.fsum(loss[j:j + c]) / c for j in range(0, n, c)]
        sl = [mpmath.fsum(sl[j:j + c]) / c for j in range(0, n, c)]
        gx, sgx, gy, sgy = ([v / c for v in col] for col in (gx, sgx, gy, sgy))
    out_shape = {"none": shape, "sum": (), "mean": (), "per_sample_mean": shape[:-1]}[red]
    f = lambda col, shp: np.array([float(v) for v in col], np.float64).reshape(shp)
    return {"loss": (f(loss, out_shape), f(sl, out_shape)),
            "grad_x": (f(gx, shape), f(sgx, shape)),
            "grad_y": (f(gy, shape), f(sgy, shape))}


# Mantissa bits and smallest normal exponent of each dtype (for ulp).
MANT = {"float32": (23, -126), "float64": (52, -1022), "float16": (10, -14),
        "bfloat16": (7, -126)}


def ulp(v: np.ndarray, dtype: str) -> np.ndarray:
    """Unit in the last place of |v| in `dtype` (subnormal spacing below the normal range)."""
    mant, emin = MANT[dtype]
    av = np.where(np.isfinite(v), np.abs(v), 0.0)
    _, k = np.frexp(av)  # av = m * 2**k, m in [0.5, 1): floor(log2(av)) = k - 1
    e = np.maximum(np.where(av > 0, k - 1, emin), emin)
    return np.ldexp(1.0, e - mant)


def bound(dtype: str, exact_v: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """lossd's promised accuracy (docs/design.md section 4). float32: 4 ulp of the scale (the
    value for losses and reductions, the larger term for gradients), taken as 4*eps*scale. Half
    types are computed in float32 and rounded once: half an ulp of the value in the dtype more.
    float64 (no ulp promise in docs/design.md section 4): 1e-13 of the scale, the e2e tests'
    float64 tolerance (the focal loss is computed in log space, whose float64 error grows with
    |log(1-p_t)|)."""
    scale = np.where(np.isfinite(scale), scale, 0.0)
    if dtype == "float32":
        b = 4 * EPS["float32"] * scale
    elif dtype == "float64":
        b = 1e-13 * scale
    else:
        b = 0.5 * ulp(exact_v, dtype) + 4 * EPS["float32"] * scale
    return b + 2 * TINY[dtype]


def classify(lib: np.ndarray, lib64: np.ndarray, ex: np.ndarray, scale: np.ndarray,
             bnd: np.ndarray) -> np.ndarray:
    flag = np.zeros(ex.shape, np.int8)
    for i in np.ndindex(ex.shape):
        e, l, l64 = ex[i], lib[i], lib64[i]
        if math.isnan(e):
            if not math.isnan(l):
                raise AssertionError(f"exact NaN but library {l} at {i}")
            continue
        if math.isinf(e):
            flag[i] = 0 if l == e else 2
            continue
        if not math.isfinite(l):
            flag[i] = 2
        elif abs(l - e) > bnd[i]:
            ok64 = math.isfinite(l64) and abs(l64 - e) <= 1e-6 * scale[i] + TINY["float64"]
            flag[i] = 1 if ok64 else 2
    return flag


# ----------------------------------------------------------------------------------------
# Cases


def case_list() -> List[Dict[str, Any]]:
    cases: List[Dict[str, Any]] = []

    def add(group, name, library, **kw):
        spec = dict(group=group, name=name, library=library, loss="bce_with_logits",
                    reduction="none", grad_targets=library in ("torch", "torch_keras"))
        spec.update(kw)
        cases.append(spec)

    # --- torch: BCE with logits ---------------------------------------------------------
    g = "torch_bce"
    for dt in ("float32", "float64"):
        for red in ("none", "mean", "sum"):
            add(g, f"plain_{dt}_{red}", "torch", dtype=dt, reduction=red)
            add(g, f"wC_pwC_{dt}_{red}", "torch", dtype=dt, reduction=red, weight="C",
                pos_weight=True)
        for wk in ("C", "N1", "full", "scalar"):
            add(g, f"w{wk}_{dt}_mean", "torch", dtype=dt, reduction="mean", weight=wk)
        add(g, f"pwC_{dt}_none", "torch", dtype=dt, pos_weight=True)
        add(g, f"soft_wfull_pwC_{dt}_none", "torch", dtype=dt, y="soft", weight="full",
            pos_weight=True)
        add(g, f"soft_{dt}_mean", "torch", dtype=dt, y="soft", reduction="mean")
        add(g, f"large_soft_pwC_{dt}_sum", "torch", dtype=dt, x="large", y="soft",
            pos_weight=True, reduction="sum")
    add(g, "big_wC_pwC_float32_none", "torch", dtype="float32", shape=(64, 37), weight="C",
        pos_weight=True)
    add(g, "big_soft_wN1_float32_mean", "torch", dtype="float32", shape=(64, 37), y="soft",
        weight="N1", reduction="mean")
    add(g, "rank3_wmid_pw_float32_none", "torch", dtype="float32", shape=(5, 3, 7),
        weight="mid", pos_weight=True)
    add(g, "scalar_float32_none", "torch", dtype="float32", shape=(), y="soft", weight="scalar")
    add(g, "empty_float32_mean", "torch", dtype="float32", shape=(0, 5))
    add(g, "empty_float32_sum", "torch", dtype="float32", shape=(0, 5), reduction="sum")
    add(g, "nan_float32_none", "torch", dtype="float32", x="nan", shape=(4, 9))
    add(g, "nan_float32_sum", "torch", dtype="float32", x="nan", shape=(4, 9), reduction="sum")

    # --- torch: extreme logits (+-30, +-100, -17, +-1e4, +-inf) ---------------------------
    g = "torch_extreme"
    for dt in ("float32", "float64", "float16", "bfloat16"):
        for red in ("none", "mean", "sum"):
            add(g, f"extreme_{dt}_{red}", "torch", dtype=dt, x="extreme", reduction=red)
        add(g, f"extreme_pwC_{dt}_none", "torch", dtype=dt, x="extreme", pos_weight=True)
        add(g, f"extreme_wfull_pwC_{dt}_none", "torch", dtype=dt, x="extreme", weight="full",
            pos_weight=True)

    # --- torch: half types ---------------------------------------------------------------
    g = "torch_half"
    for dt in ("float16", "bfloat16"):
        for red in ("none", "mean", "sum"):
            add(g, f"wC_pwC_{dt}_{red}", "torch", dtype=dt, reduction=red, weight="C",
                pos_weight=True)
        add(g, f"soft_{dt}_none", "torch", dtype=dt, y="soft")

    # --- Keras-style options with torch ops ----------------------------------------------
    g = "torch_keras"
    for dt in ("float32", "float64"):
        for s in (0.1, 0.5):
            for red in ("none", "mean", "sum", "per_sample_mean"):
                add(g, f"ls{s}_{dt}_{red}", "torch_keras", dtype=dt, y="binary",
                    reduction=red, label_smoothing=s)
        add(g, f"per_sample_{dt}", "torch_keras", dtype=dt, y="soft",
            reduction="per_sample_mean")
        add(g, f"per_sample_wC_pwC_{dt}", "torch_keras", dtype=dt, reduction="per_sample_mean",
            weight="C", pos_weight=True)
        add(g, f"ls0.2_wN1_{dt}_per_sample", "torch_keras", dtype=dt, y="soft",
            reduction="per_sample_mean", weight="N1", label_smoothing=0.2)
    for dt in ("float16", "bfloat16"):  # torch's half ops on the CPU
        for red in ("none", "mean", "per_sample_mean"):
            add(g, f"ls0.1_{dt}_{red}", "torch_keras", dtype=dt, y="binary", reduction=red,
                label_smoothing=0.1)
        add(g, f"per_sample_wC_pwC_{dt}", "torch_keras", dtype=dt, reduction="per_sample_mean",
            weight="C", pos_weight=True)
    add(g, "ls1.0_float32_none", "torch_keras", dtype="float32", label_smoothing=1.0)
    add(g, "ls0.1_extreme_float32_none", "torch_keras", dtype="float32", x="extreme",
        label_smoothing=0.1)

    # --- torchvision: sigmoid focal loss -------------------------------------------------
    g = "torchvision_focal"
    for dt in ("float32", "float64"):
        for gamma in (0.0, 0.5, 2.0):
            for red in ("none", "mean", "sum"):
                add(g, f"a0.25_g{gamma}_{dt}_{red}", "torchvision", loss="sigmoid_focal_loss",
                    dtype=dt, reduction=red, alpha=0.25, gamma=gamma, shape=(8, 37))
        add(g, f"soft_a0.25_g2.0_{dt}_none", "torchvision", loss="sigmoid_focal_loss",
            dtype=dt, y="soft", alpha=0.25, gamma=2.0, shape=(8, 37))
        add(g, f"noalpha_g2.0_{dt}_mean", "torchvision", loss="sigmoid_focal_loss", dtype=dt,
            reduction="mean", alpha=-1.0, gamma=2.0, shape=(8, 37))
        add(g, f"large_a0.75_g0.5_{dt}_none", "torchvision", loss="sigmoid_focal_loss",
            dtype=dt, x="large", alpha=0.75, gamma=0.5, shape=(8, 37))
        add(g, f"wC_a0.25_g2.0_{dt}_sum", "torchvision", loss="sigmoid_focal_loss", dtype=dt,
            reduction="sum", alpha=0.25, gamma=2.0, weight="C", shape=(8, 37))
    add(g, "a0.25_g2.0_bfloat16_none", "torchvision", loss="sigmoid_focal_loss",
        dtype="bfloat16", alpha=0.25, gamma=2.0, shape=(8, 37))
    for gamma, red in ((2.0, "none"), (0.5, "mean"), (2.0, "sum")):
        add(g, f"a0.25_g{gamma}_float16_{red}", "torchvision", loss="sigmoid_focal_loss",
            dtype="float16", reduction=red, alpha=0.25, gamma=gamma, shape=(8, 37))
    add(g, "wC_a0.75_g0.5_bfloat16_mean", "torchvision", loss="sigmoid_focal_loss",
        dtype="bfloat16", reduction="mean", alpha=0.75, gamma=0.5, weight="C", shape=(8, 37))

    # --- paddle: BCE API (ignores targets == -100) ----------------------------------------
    g = "paddle_bce"
    for dt in ("float32", "float64"):
        for red in ("none", "mean", "sum"):
            add(g, f"plain_{dt}_{red}", "paddle", dtype=dt, reduction=red, ignore_index=-100)
            add(g, f"wC_pwC_{dt}_{red}", "paddle", dtype=dt, reduction=red, weight="C",
                pos_weight=True, ignore_index=-100)
        add(g, f"wN1_{dt}_mean", "paddle", dtype=dt, reduction="mean", weight="N1",
            ignore_index=-100)
        add(g, f"soft_wfull_pwC_{dt}_none", "paddle", dtype=dt, y="soft", weight="full",
            pos_weight=True, ignore_index=-100)
        add(g, f"ignored_pwC_{dt}_mean", "paddle", dtype=dt, reduction="mean",
            pos_weight=True, ignored=-100, ignore_index=-100)
        add(g, f"extreme_{dt}_none", "paddle", dtype=dt, x="extreme", ignore_index=-100)

    # --- paddle: the operator with ignore_index and normalize ---------------------------
    g = "paddle_op"
    for dt in ("float32", "float64"):
        for ign in (-1, 255):
            for normalize in (False, True):
                for red in ("none", "sum"):
                    add(g, f"ign{ign}_norm{int(normalize)}_{dt}_{red}", "paddle_op", dtype=dt,
                        y="soft", reduction=red, ignored=ign, ignore_index=ign,
                        normalize=normalize)
    return cases


OPTION_KEYS = ("loss", "dtype", "weight", "pos_weight", "reduction", "ignore_index",
               "normalize", "label_smoothing", "alpha", "gamma", "grad_targets")


def options_of(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The lossd request options of a case (and where its expected values come from)."""
    fn, api = LIBRARIES[spec["library"]]
    return {
        "loss": spec["loss"],
        "dtype": spec["dtype"],
        "weight": spec.get("weight") is not None,
        "pos_weight": bool(spec.get("pos_weight")),
        "reduction": spec["reduction"],
        "ignore_index": spec.get("ignore_index"),
        "normalize": bool(spec.get("normalize", False)),
        "label_smoothing": float(spec.get("label_smoothing", 0.0)),
        "alpha": spec.get("alpha"),
        "gamma": spec.get("gamma"),
        "grad_logits": True,
        "grad_targets": bool(spec["grad_targets"]),
        "library": spec["library"],
        "api": api,
    }


def run_case(spec: Dict[str, Any]) -> Tuple[Dict[str, np.ndarray], Dict[str, int]]:
    dtype = spec["dtype"]
    fn, _ = LIBRARIES[spec["library"]]
    inp = make_inputs(spec)
    lib = fn(inp, spec, dtype)
    lib64 = fn(inp, spec, "float64") if dtype != "float64" else lib
    ex = exact(inp, spec)
    arrays: Dict[str, np.ndarray] = {"options": np.array(json.dumps(options_of(spec)))}
    for k in ("x", "y", "w", "p"):
        if inp[k] is not None:
            arrays[k] = storage(inp[k], dtype)
    counts = {"elements": int(inp["x"].size), "flag1": 0, "flag2": 0}
    for j, out in enumerate(("loss", "grad_x", "grad_y")):
        if lib[j] is None:
            continue
        v = np.asarray(lib[j], np.float64)
        v64 = np.asarray(lib64[j], np.float64)
        e, sc = ex[out]
        if v.shape != e.shape:
            raise AssertionError(f"{spec['name']}/{out}: library shape {v.shape} != {e.shape}")
        arrays[out] = v
        if dtype != "float64":
            arrays[out + "_f64"] = v64
        b = bound(dtype, e, sc)
        flag = classify(v, v64, e, sc, b)
        if flag.any():
            arrays[out + "_flag"] = flag
            arrays[out + "_exact"] = e
            arrays[out + "_bound"] = b
            counts["flag1"] += int((flag == 1).sum())
            counts["flag2"] += int((flag == 2).sum())
    return arrays, counts


def write_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Like numpy.savez_compressed, but reproducible byte for byte (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def versions() -> Dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "paddlepaddle": paddle.__version__,
            "numpy": np.__version__, "mpmath": mpmath.__version__}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", help="generate only the groups in this comma-separated list")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    paddle.set_device("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for spec in case_list():
        groups.setdefault(spec["group"], []).append(spec)
    only = set(args.only.split(",")) if args.only else None
    for group, specs in groups.items():
        if only and group not in only:
            continue
        arrays: Dict[str, np.ndarray] = {}
        names, total = [], {"elements": 0, "flag1": 0, "flag2": 0}
        for spec in specs:
            case_arrays, counts = run_case(spec)
            names.append(spec["name"])
            for k, v in case_arrays.items():
                arrays[f"{spec['name']}/{k}"] = v
            for k in total:
                total[k] += counts[k]
        meta = {"group": group, "versions": versions(),
                "generator": "tests/golden/generate.py", "mpmath_dps": mpmath.mp.dps,
                "flag_bound": "float32 4*eps*scale, float64 1e-13*scale, half 0.5*ulp(v) + "
                              "4*eps32*scale; plus 2 smallest subnormals"}
        out = {"__meta__": np.array(json.dumps(meta, sort_keys=True)),
               "__cases__": np.array(json.dumps(names))}
        out.update(arrays)
        path = args.out / f"{group}.npz"
        write_npz(path, out)
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: "
              f"{len(names)} cases, {total['elements']} input elements, flagged outputs: "
              f"{total['flag1']} (1: lossd more exact), {total['flag2']} (2: library off in "
              f"float64 or non-finite); {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
