"""End-to-end: every loss option and reduction, for every dtype, against the float64 reference
(bce_reference.loss_reference): ignore_index, normalize, label smoothing, per-sample mean and
the sigmoid focal loss. Tolerances as in test_client_e2e.py (docs/design.md section 4)."""

from __future__ import annotations

import numpy as np
import pytest

import lossd

from helpers import (
    DTYPE_IDS, DTYPES, REDUCTIONS, cast, check_result, make_inputs, seed_of, with_nan_target,
)

IGNORE = -100

BCE_CASES = {
    "plain": {},
    "ignore": {"ignore_index": IGNORE},
    "ignore_normalize": {"ignore_index": IGNORE, "normalize": True},
    "normalize": {"normalize": True},
    "smooth": {"label_smoothing": 0.1},
    "smooth_ignore_normalize": {"label_smoothing": 0.3, "ignore_index": IGNORE,
                                "normalize": True},
    "smooth_one": {"label_smoothing": 1.0},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(BCE_CASES))
def test_bce_options(client, dtype, reduction, case) -> None:
    options = BCE_CASES[case]
    rng = np.random.default_rng(seed_of(dtype, reduction, case))
    x, y = make_inputs(rng, (6, 7), dtype, soft=case.startswith("smooth"))
    if "ignore_index" in options:
        y = y.copy()
        y[rng.uniform(size=y.shape) < 0.3] = cast(IGNORE, dtype)
    w = cast(rng.uniform(0, 3, (7,)), dtype)
    p = cast(rng.uniform(0, 3, (6, 1)), dtype)
    r = client.bce_with_logits(x, y, weight=w, pos_weight=p, reduction=reduction, grad=True,
                               grad_targets=True, **options)
    check_result(r, x, y, w, p, reduction, **options)


def test_all_ignored_normalize_divides_by_one(client) -> None:
    x = np.array([[0.5, -1.0], [2.0, 3.0]], np.float64)
    y = np.full((2, 2), -100.0)
    r = client.bce_with_logits(x, y, ignore_index=-100, normalize=True, reduction="none",
                               grad=True)
    assert not r.loss.any() and not r.grad.any()
    r = client.bce_with_logits(x, y, ignore_index=-100, normalize=True, reduction="mean")
    assert float(r.loss) == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(), (5,), (1, 1), (3, 4), (2, 3, 5), (4, 0), (0, 3)])
def test_per_sample_mean_shapes(client, dtype, shape) -> None:
    rng = np.random.default_rng(seed_of(dtype, shape))
    x, y = make_inputs(rng, shape, dtype)
    w = cast(rng.uniform(0, 2, shape[-1:]), dtype) if shape else None
    if 0 in shape:
        r = client.bce_with_logits(x, y, reduction="per_sample_mean", grad=True)
        assert r.loss.shape == shape[:-1] and r.grad.shape == shape
        if shape[-1] == 0:
            assert np.isnan(r.loss.astype(np.float64)).all()
        return
    r = client.bce_with_logits(x, y, weight=w, reduction="per_sample_mean", grad=True,
                               grad_targets=True)
    check_result(r, x, y, w, None, "per_sample_mean")


FOCAL_CASES = {
    "default": {},
    "no_alpha": {"alpha": None},
    "negative_alpha": {"alpha": -1.0},
    "gamma0": {"alpha": 0.5, "gamma": 0.0},
    "gamma_half": {"alpha": 0.25, "gamma": 0.5},
    "alpha1_gamma3": {"alpha": 1.0, "gamma": 3.0},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(FOCAL_CASES))
def test_sigmoid_focal_loss(client, dtype, reduction, case) -> None:
    options = FOCAL_CASES[case]
    rng = np.random.default_rng(seed_of("focal", dtype, reduction, case))
    x, y = make_inputs(rng, (8, 5), dtype, soft=case == "gamma_half")
    w = cast(rng.uniform(0, 2, (8, 1)), dtype)
    r = client.sigmoid_focal_loss(x, y, weight=w, reduction=reduction, grad=True, **options)
    alpha = options.get("alpha", 0.25)
    focal = (-1.0 if alpha is None else alpha, options.get("gamma", 2.0))
    check_result(r, x, y, w, None, reduction, grad_targets=False, focal=focal)


def test_focal_defaults_and_limits(client) -> None:
    x = np.linspace(-30, 30, 61)
    y = (np.arange(61) % 2).astype(np.float64)
    r = client.sigmoid_focal_loss(x, y)  # torchvision defaults: alpha .25, gamma 2, "none"
    assert r.loss.shape == (61,) and r.grad is None
    check_result(r, x, y, reduction="none", grad=False, grad_targets=False,
                 focal=(0.25, 2.0))
    inf = np.array([np.inf, -np.inf, np.inf, -np.inf])
    r = client.sigmoid_focal_loss(inf, np.array([1.0, 0.0, 0.0, 1.0]), grad=True, gamma=0.5)
    assert r.loss[0] == 0 and r.loss[1] == 0 and r.grad[0] == 0 and r.grad[1] == 0
    assert np.isfinite(r.grad).all()


def test_focal_rejects_bad_options(client) -> None:
    x = np.zeros(3, np.float32)
    with pytest.raises(TypeError):
        client.sigmoid_focal_loss(x, x, grad_targets=True)  # dl/dy is not offered
    with pytest.raises(ValueError, match="gamma"):
        client.sigmoid_focal_loss(x, x, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        client.sigmoid_focal_loss(x, x, alpha=1.5)


def test_bce_rejects_bad_options(client) -> None:
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="label_smoothing"):
        client.bce_with_logits(x, x, label_smoothing=1.5)
    with pytest.raises(ValueError, match="ignore_index"):
        client.bce_with_logits(x, x, ignore_index=0.5)
    with pytest.raises(ValueError, match="reduction"):
        client.bce_with_logits(x, x, reduction="avg")


def test_reject_nan_with_options(client) -> None:
    x, y = with_nan_target((2, 3), (1, 1))
    with pytest.raises(lossd.InvalidArgumentError, match="targets.*NaN"):
        client.sigmoid_focal_loss(x, y, reject_nan=True)
    r = client.bce_with_logits(x, y, reduction="per_sample_mean")
    assert np.isnan(r.loss[1]) and np.isfinite(r.loss[0])
