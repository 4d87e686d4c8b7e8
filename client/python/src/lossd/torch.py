"""torch integration: remote losses that autograd can differentiate.

``lossd.torch.bce_with_logits`` mirrors ``torch.nn.functional.binary_cross_entropy_with_logits``
and ``lossd.torch.BCEWithLogitsLoss`` mirrors ``torch.nn.BCEWithLogitsLoss``; the loss is
computed by a lossd server and ``loss.backward()`` uses the gradient the server computed in
the same round trip (no second request): the forward asks for dl/dx (and dl/dy when the
targets require grad), the backward multiplies it by the incoming gradient.

Which server: pass ``client=`` (a :class:`lossd.Client`), or set a default with
:func:`set_default_client`, or set the environment variable ``LOSSD_TARGET``.

This module needs torch (``pip install torch``); ``import lossd`` alone never imports it.

Example
-------
>>> import torch, lossd, lossd.torch                                 # doctest: +SKIP
>>> client = lossd.Client("127.0.0.1:50051")
>>> criterion = lossd.torch.BCEWithLogitsLoss(pos_weight=torch.full((7,), 2.0), client=client)
>>> loss = criterion(model(x), y)
>>> loss.backward()
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional, Tuple

import torch  # the real torch: absolute import (this module is lossd.torch)
from torch import Tensor, nn

from ._client import Client
from ._types import LossResult

__all__ = ["bce_with_logits", "binary_cross_entropy_with_logits", "sigmoid_focal_loss",
           "BCEWithLogitsLoss", "SigmoidFocalLoss", "set_default_client", "get_default_client"]

_lock = threading.Lock()
_default: Optional[Client] = None


def set_default_client(client: Optional[Client]) -> None:
    """Sets the client used when a function or module is given none (None clears it)."""
    global _default
    with _lock:
        _default = client


def get_default_client() -> Client:
    """The default client: the one set by :func:`set_default_client`, else one created for
    ``$LOSSD_TARGET``.

    Raises
    ------
    ValueError
        When neither is available.
    """
    global _default
    with _lock:
        if _default is None:
            target = os.environ.get("LOSSD_TARGET")
            if not target:
                raise ValueError("no lossd client: pass client=..., call "
                                 "lossd.torch.set_default_client(), or set LOSSD_TARGET")
            _default = Client(target)
        return _default


_Run = Callable[[Tensor, Tensor, bool, bool], LossResult]


class _RemoteLoss(torch.autograd.Function):
    """Forward: one server call returning the loss and the requested gradients.
    Backward: incoming gradient times the saved server gradient."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, run: _Run,  # type: ignore[override]
                reduction: str) -> Tensor:
        want_x = bool(ctx.needs_input_grad[0])
        want_y = bool(ctx.needs_input_grad[1])
        result = run(logits, targets, want_x, want_y)
        ctx.reduction = reduction
        ctx.save_for_backward(result.grad, result.grad_targets)
        return result.loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any,  # type: ignore[override]
                 grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        gx, gy = ctx.saved_tensors

        def chain(g: Optional[Tensor]) -> Optional[Tensor]:
            if g is None:
                return None
            if ctx.reduction == "per_sample_mean" and g.dim() > 0:
                return grad_output.unsqueeze(-1) * g
            return grad_output * g  # elementwise (none) or a scalar (mean, sum)

        return chain(gx), chain(gy), None, None


def _check_no_grad(**tensors: Any) -> None:
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but lossd returns no gradient for it; "
                             f"pass {name}.detach()")


def _reduction(reduction: str, size_average: Any = None, reduce: Any = None) -> str:
    if size_average is not None or reduce is not None:
        raise ValueError("size_average and reduce are deprecated in torch; use reduction=")
    r = reduction.lower()
    if r not in ("none", "mean", "sum", "per_sample_mean"):
        raise ValueError(f"reduction: expected 'none', 'mean', 'sum' or 'per_sample_mean', "
                         f"got {reduction!r}")
    return r


def bce_with_logits(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                    pos_weight: Optional[Tensor] = None, reduction: str = "mean", *,
                    client: Optional[Client] = None, ignore_index: Optional[int] = None,
                    normalize: bool = False, label_smoothing: float = 0.0,
                    device: str = "auto", timeout: Optional[float] = None) -> Tensor:
    """Differentiable binary cross-entropy with logits computed by a lossd server.

    Same arguments and result as ``torch.nn.functional.binary_cross_entropy_with_logits``
    (``"mean"`` divides by the element count, as torch does), plus lossd's options.

    Parameters
    ----------
    input : torch.Tensor
        Logits, float32/float64/float16/bfloat16 on any device (a CPU round trip).
    target : torch.Tensor
        Same shape; may require grad (dl/dy then comes from the server too).
    weight, pos_weight : torch.Tensor, optional
        Broadcast to the input's shape; must not require grad.
    reduction : {"mean", "sum", "none", "per_sample_mean"}, optional
    client : lossd.Client, optional
        Default: :func:`get_default_client`.
    ignore_index, normalize, label_smoothing, device, timeout : optional
        As for :meth:`lossd.Client.bce_with_logits`.

    Returns
    -------
    torch.Tensor
        The loss, with the input's dtype and device; differentiable wrt input and target.

    Raises
    ------
    ValueError, lossd.LossdError
        As for :meth:`lossd.Client.bce_with_logits`.
    """
    red = _reduction(reduction)
    _check_no_grad(weight=weight, pos_weight=pos_weight)
    c = client if client is not None else get_default_client()

    def run(x: Tensor, y: Tensor, want_x: bool, want_y: bool) -> LossResult:
        return c.bce_with_logits(x, y, weight=weight, pos_weight=pos_weight, reduction=red,
                                 grad=want_x, grad_targets=want_y, ignore_index=ignore_index,
                                 normalize=normalize, label_smoothing=label_smoothing,
                                 device=device, timeout=timeout)

    return _RemoteLoss.apply(input, target, run, red)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Optional[Tensor] = None, size_average: Any = None,
                                     reduce: Any = None, reduction: str = "mean",
                                     pos_weight: Optional[Tensor] = None,
                                     **kwargs: Any) -> Tensor:
    """:func:`bce_with_logits` with torch's exact signature (for drop-in replacement)."""
    return bce_with_logits(input, target, weight, pos_weight,
                           _reduction(reduction, size_average, reduce), **kwargs)


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0, reduction: str = "none", *,
                       client: Optional[Client] = None, weight: Optional[Tensor] = None,
                       device: str = "auto", timeout: Optional[float] = None) -> Tensor:
    """Differentiable ``torchvision.ops.sigmoid_focal_loss`` computed by a lossd server.

    Same arguments as torchvision's (``alpha < 0`` disables the alpha weighting), plus an
    optional per-element ``weight``. Differentiable wrt ``inputs`` only.
    """
    red = _reduction(reduction)
    _check_no_grad(targets=targets, weight=weight)
    c = client if client is not None else get_default_client()

    def run(x: Tensor, y: Tensor, want_x: bool, want_y: bool) -> LossResult:
        return c.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, weight=weight,
                                    reduction=red, grad=want_x, device=device, timeout=timeout)

    return _RemoteLoss.apply(inputs, targets, run, red)


class BCEWithLogitsLoss(nn.Module):
    """``torch.nn.BCEWithLogitsLoss`` computed by a lossd server (see :func:`bce_with_logits`).

    Parameters
    ----------
    weight : torch.Tensor, optional
        Registered as a buffer, as in torch.
    size_average, reduce : deprecated
        Must be None (as torch warns, use ``reduction``).
    reduction : {"mean", "sum", "none", "per_sample_mean"}, optional
    pos_weight : torch.Tensor, optional
        Registered as a buffer, as in torch.
    client : lossd.Client, optional
        Default: :func:`get_default_client` at each call.
    **options
        ``ignore_index``, ``normalize``, ``label_smoothing``, ``device``, ``timeout``.
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average: Any = None,
                 reduce: Any = None, reduction: str = "mean",
                 pos_weight: Optional[Tensor] = None, *, client: Optional[Client] = None,
                 **options: Any) -> None:
        super().__init__()
        self.reduction = _reduction(reduction, size_average, reduce)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.client = client
        self.options = options

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return bce_with_logits(input, target, self.weight, self.pos_weight, self.reduction,
                               client=self.client, **self.options)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, client={self.client!r}"


class SigmoidFocalLoss(nn.Module):
    """``torchvision.ops.sigmoid_focal_loss`` as a module (see :func:`sigmoid_focal_loss`)."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none", *,
                 client: Optional[Client] = None, **options: Any) -> None:
        super().__init__()
        self.alpha, self.gamma = alpha, gamma
        self.reduction = _reduction(reduction)
        self.client = client
        self.options = options

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction,
                                  client=self.client, **self.options)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"
