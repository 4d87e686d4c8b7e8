"""Shared helpers of the end-to-end tests (dtypes, inputs, checks against the reference)."""

from __future__ import annotations

import re
import urllib.request
from typing import Optional

import numpy as np
import pytest

from bce_reference import loss_reference, violations

try:
    import ml_dtypes

    BF16: Optional[np.dtype] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is pinned in tests/requirements.txt
    BF16 = None

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
if BF16 is not None:
    DTYPES.append(BF16)
DTYPE_IDS = [str(d) for d in DTYPES]
REDUCTIONS = ["none", "mean", "sum", "per_sample_mean"]


def kind_of(dtype: np.dtype) -> str:
    if dtype == np.float32:
        return "float32"
    if dtype == np.float64:
        return "float64"
    return "half"


def cast(values, dtype: np.dtype) -> np.ndarray:
    if BF16 is not None and dtype == BF16:
        return np.asarray(values, np.float64).astype(np.float32).astype(dtype)
    return np.asarray(values, np.float64).astype(dtype)


def f64(v) -> Optional[np.ndarray]:
    if v is None:
        return None
    a = np.asarray(v)
    if a.dtype.kind not in "fbiu":  # bfloat16
        a = a.astype(np.float32)
    return a.astype(np.float64)


def make_inputs(rng, shape, dtype, soft=False):
    half = kind_of(dtype) == "half"
    x = cast(rng.uniform(-6 if half else -12, 6 if half else 12, shape), dtype)
    y = rng.uniform(0, 1, shape) if soft else rng.integers(0, 2, shape)
    return x, cast(y, dtype)


def loss_shape(shape, reduction):
    if reduction == "none":
        return tuple(shape)
    if reduction == "per_sample_mean":
        return tuple(shape[:-1])
    return ()


def check_result(r, x, y, w=None, p=None, reduction="none", *, grad=True, grad_targets=True,
                 **options):
    """Compares a LossResult with loss_reference (inputs as the client sent them)."""
    ref = loss_reference(f64(x), f64(y), f64(w), f64(p), reduction, **options)
    dtype = np.asarray(x).dtype
    kind = kind_of(dtype)
    assert r.loss.dtype == dtype, (r.loss.dtype, dtype)
    assert r.loss.shape == loss_shape(np.shape(x), reduction)
    reduced = reduction in ("mean", "sum")
    msg = violations(r.loss, ref.loss, ref.loss_scale, kind, reduced=reduced)
    assert msg is None, f"loss ({reduction}, {options}): {msg}"
    if grad:
        assert r.grad is not None and r.grad.shape == np.shape(x) and r.grad.dtype == dtype
        msg = violations(r.grad, ref.grad, ref.grad_scale, kind)
        assert msg is None, f"dl/dx ({reduction}, {options}): {msg}"
    else:
        assert r.grad is None
    if grad_targets:
        assert r.grad_targets is not None and r.grad_targets.shape == np.shape(x)
        msg = violations(r.grad_targets, ref.grad_targets, ref.grad_targets_scale, kind)
        assert msg is None, f"dl/dy ({reduction}, {options}): {msg}"
    return ref


# ---- Prometheus metrics of a running server ----

prometheus_parser = pytest.importorskip(
    "prometheus_client.parser", reason="prometheus_client is pinned in tests/requirements.txt")

_METRICS = re.compile(r"lossd metrics on (\S+):(\d+)\s*$")


def metrics_address(server) -> str:
    for line in server.lines:
        m = _METRICS.search(line)
        if m:
            return f"{m.group(1)}:{m.group(2)}"
    raise AssertionError(f"no 'lossd metrics on' line in:\n{server.stderr_text()}")


def scrape(address: str) -> dict:
    """{(sample name, frozenset(labels)): value} of every sample."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode("utf-8")
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
