"""torch integration: remote losses that autograd can differentiate.

``lossd.torch.bce_with_logits`` mirrors ``torch.nn.functional.binary_cross_entropy_with_logits``
and ``lossd.torch.BCEWithLogitsLoss`` mirrors ``torch.nn.BCEWithLogitsLoss``; the loss is
computed by a lossd server and ``loss.backward()`` uses the gradient the server computed in
the same round trip (no second request): the forward asks for dl/dx (and dl/dy when the
targets require grad), the backward multiplies it by the incoming gradient.

Which server: pass ``client=`` (a :class:`lossd.Client`), or set a default with
:func:`set_default_client`, or set the environment variable ``LOSSD_TARGET``.

torch.compile: with torch >= 2.4 the losses are the custom operators
``torch.ops.lossd.bce_with_logits`` and ``torch.ops.lossd.sigmoid_focal_loss`` (a fake
implementation for the shapes, a registered autograd formula), traced as one graph node each
without a graph break; older torch uses an eager-only ``autograd.Function``. Higher-order
gradients are not available: differentiating a gradient that went through a lossd loss raises
``RuntimeError`` ("higher-order gradients are not supported by lossd"). CUDA tensors go to
a local server on the same GPU by CUDA IPC (the client's ``cuda_ipc`` argument: the server
reads them and writes the gradients in place); otherwise they are copied to the host for the
call and the results copied back to the logits' device.

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
import weakref
from typing import Any, Callable, Optional, Tuple, cast

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

HIGHER_ORDER_ERROR = ("higher-order gradients are not supported by lossd: the server returns "
                      "first derivatives only (backward(create_graph=True) works, but "
                      "differentiating its result again does not)")


def _chain(grad_output: Tensor, g: Tensor, reduction: str) -> Tensor:
    """The incoming gradient times a saved server gradient."""
    if reduction == "per_sample_mean" and g.dim() > 0 and grad_output.dim() < g.dim():
        return grad_output.unsqueeze(-1) * g
    return grad_output * g  # elementwise (none) or a scalar (mean, sum)


class _FirstOrderOnly(torch.autograd.Function):
    """``_chain`` in a backward that builds a graph (``create_graph=True``): differentiating
    its result raises a clear error instead of giving a wrong zero or torch's "does not
    require grad"."""

    @staticmethod
    def forward(ctx: Any, grad_output: Tensor, g: Tensor,  # type: ignore[override, unused-ignore]
                reduction: str, anchor: Tensor) -> Tensor:
        return _chain(grad_output, g, reduction)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override, unused-ignore]
        raise RuntimeError(HIGHER_ORDER_ERROR)


def _chain_checked(grad_output: Tensor, g: Optional[Tensor], reduction: str,
                   anchor: Tensor) -> Optional[Tensor]:
    if g is None:
        return None
    if torch.is_grad_enabled() and (anchor.requires_grad or grad_output.requires_grad):
        return cast(Tensor, _FirstOrderOnly.apply(grad_output, g, reduction, anchor))
    return _chain(grad_output, g, reduction)


class _RemoteLoss(torch.autograd.Function):
    """torch < 2.4 (no ``torch.library.custom_op``), or ``lossd.torch.USE_CUSTOM_OP = False``:
    eager autograd only. Forward: one server call returning the loss and the requested
    gradients. Backward: incoming gradient times the saved server gradient."""

    @staticmethod
    def forward(  # type: ignore[override, unused-ignore]
            ctx: Any, logits: Tensor, targets: Tensor, run: _Run, reduction: str) -> Tensor:
        want_x = bool(ctx.needs_input_grad[0])
        want_y = bool(ctx.needs_input_grad[1])
        result = run(logits, targets, want_x, want_y)
        ctx.reduction = reduction
        ctx.save_for_backward(result.grad, result.grad_targets, logits, targets)
        return cast(Tensor, result.loss)

    @staticmethod
    def backward(ctx: Any,  # type: ignore[override, unused-ignore]
                 grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        gx, gy, x, y = ctx.saved_tensors
        return (_chain_checked(grad_output, gx, ctx.reduction, x),
                _chain_checked(grad_output, gy, ctx.reduction, y), None, None)


# -- torch.library custom ops (torch >= 2.4): torch.compile traces them as single graph nodes
#
# An op's arguments must be tensors and scalars, so the client travels as an integer key into
# _CLIENTS (a constant in a compiled graph). Each op returns (loss, dl/dx, dl/dy); a gradient
# that was not asked for is an empty tensor. The fake implementations give the shapes that
# the server returns, for tracing without a server.

_CLIENTS: "weakref.WeakValueDictionary[int, Client]" = weakref.WeakValueDictionary()

#: Use the torch.library custom ops when torch has them (torch >= 2.4); False forces the
#: eager-only autograd.Function, which torch.compile cannot trace without a graph break.
USE_CUSTOM_OP: bool = hasattr(torch.library, "custom_op") and \
    hasattr(torch.library, "register_autograd")


def _client_key(client: Optional[Client]) -> int:
    """The key of a client (0: the default client, looked up when the op runs). torch.compile
    calls it once while tracing (assume_constant_result) and guards on the client object,
    so a graph compiled for one client is not reused for another."""
    if client is None:
        return 0
    key = id(client)
    _CLIENTS[key] = client
    return key


if USE_CUSTOM_OP:
    _constant: Any = torch.compiler.assume_constant_result
    _client_key = _constant(_client_key)


def _client_of(key: int) -> Client:
    if key == 0:
        return get_default_client()
    client = _CLIENTS.get(key)
    if client is None:  # pragma: no cover - the key is taken while the caller holds it
        raise RuntimeError("lossd.torch: the client of this compiled graph was closed and "
                           "collected; pass a live client")
    return client


def _loss_shape(x: Tensor, reduction: str) -> Tuple[int, ...]:
    if reduction == "none":
        return tuple(x.shape)
    if reduction == "per_sample_mean" and x.dim() > 1:
        return tuple(x.shape[:-1])
    return ()


def _outputs(x: Tensor, r: LossResult, want_x: bool, want_y: bool
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """The op's outputs: fresh tensors (an op's outputs may not be views)."""
    def out(t: Any) -> Tensor:
        if t is None:
            return x.new_empty(0)
        t = t if isinstance(t, Tensor) else torch.as_tensor(t, device=x.device)
        return cast(Tensor, t.clone() if t._base is not None else t)

    return (out(r.loss), out(r.grad if want_x else None),
            out(r.grad_targets if want_y else None))


def _fake(x: Tensor, y: Tensor, reduction: str, want_x: bool, want_y: bool
          ) -> Tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty(_loss_shape(x, reduction)), x.new_empty(x.shape if want_x else (0,)),
            x.new_empty(y.shape if want_y else (0,)))


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
    ctx.reduction = inputs[5]
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx: Any, grad_loss: Tensor, _gx: Any, _gy: Any) -> Tuple[Any, ...]:
    gx, gy = cast(Tuple[Tensor, Tensor], ctx.saved_tensors)
    dx = _op_chain(grad_loss, gx, ctx.reduction) if ctx.needs_input_grad[0] else None
    dy = _op_chain(grad_loss, gy, ctx.reduction) if ctx.needs_input_grad[1] else None
    return (dx, dy) + (None,) * (int(ctx.n_inputs) - 2)


def _op_chain(grad_output: Tensor, g: Tensor, reduction: str) -> Tensor:
    # The saved gradient is an output of the op, so it requires grad when the op's inputs do:
    # in a backward that builds a graph, the product is differentiable and its backward
    # raises HIGHER_ORDER_ERROR.
    if torch.is_grad_enabled() and (g.requires_grad or grad_output.requires_grad):
        return cast(Tensor, _FirstOrderOnly.apply(grad_output, g, reduction, g))
    return _chain(grad_output, g, reduction)


if USE_CUSTOM_OP:
    @torch.library.custom_op("lossd::bce_with_logits", mutates_args=())
    def _bce_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
                pos_weight: Optional[Tensor], client: int, reduction: str, want_x: bool,
                want_y: bool, ignore_index: Optional[int], normalize: bool,
                label_smoothing: float, device: str, timeout: Optional[float]
                ) -> Tuple[Tensor, Tensor, Tensor]:
        r = _client_of(client).bce_with_logits(
            input, target, weight=weight, pos_weight=pos_weight, reduction=reduction,
            grad=want_x, grad_targets=want_y, ignore_index=ignore_index, normalize=normalize,
            label_smoothing=label_smoothing, device=device, timeout=timeout)
        return _outputs(input, r, want_x, want_y)

    @_bce_op.register_fake
    def _bce_fake(input: Tensor, target: Tensor, weight: Optional[Tensor],
                  pos_weight: Optional[Tensor], client: int, reduction: str, want_x: bool,
                  want_y: bool, ignore_index: Optional[int], normalize: bool,
                  label_smoothing: float, device: str, timeout: Optional[float]
                  ) -> Tuple[Tensor, Tensor, Tensor]:
        return _fake(input, target, reduction, want_x, want_y)

    @torch.library.custom_op("lossd::sigmoid_focal_loss", mutates_args=())
    def _focal_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
                  alpha: Optional[float], client: int, reduction: str, want_x: bool,
                  gamma: float, device: str, timeout: Optional[float]
                  ) -> Tuple[Tensor, Tensor, Tensor]:
        r = _client_of(client).sigmoid_focal_loss(
            input, target, alpha=alpha, gamma=gamma, weight=weight, reduction=reduction,
            grad=want_x, device=device, timeout=timeout)
        return _outputs(input, r, want_x, False)

    @_focal_op.register_fake
    def _focal_fake(input: Tensor, target: Tensor, weight: Optional[Tensor],
                    alpha: Optional[float], client: int, reduction: str, want_x: bool,
                    gamma: float, device: str, timeout: Optional[float]
                    ) -> Tuple[Tensor, Tensor, Tensor]:
        return _fake(input, target, reduction, want_x, False)

    for _op in (_bce_op, _focal_op):
        torch.library.register_autograd(  # type: ignore[attr-defined, unused-ignore]
            _op._qualname, _backward, setup_context=_setup_context)


def _seconds(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else float(timeout)


def _wants(t: Tensor) -> bool:
    return bool(t.requires_grad) and torch.is_grad_enabled()


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
        Logits, float32/float64/float16/bfloat16 on any device (CUDA tensors by CUDA IPC
        when the client can, else a CPU round trip).
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
    if USE_CUSTOM_OP:
        loss, _, _ = torch.ops.lossd.bce_with_logits(
            input, target, weight, pos_weight, _client_key(client), red, _wants(input),
            _wants(target), ignore_index, bool(normalize), float(label_smoothing), device,
            _seconds(timeout))
        return cast(Tensor, loss)

    c = client if client is not None else get_default_client()

    def run(x: Tensor, y: Tensor, want_x: bool, want_y: bool) -> LossResult:
        return c.bce_with_logits(x, y, weight=weight, pos_weight=pos_weight, reduction=red,
                                 grad=want_x, grad_targets=want_y, ignore_index=ignore_index,
                                 normalize=normalize, label_smoothing=label_smoothing,
                                 device=device, timeout=timeout)

    return cast(Tensor, _RemoteLoss.apply(input, target, run, red))


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
    if USE_CUSTOM_OP:
        loss, _, _ = torch.ops.lossd.sigmoid_focal_loss(
            inputs, targets, weight, None if alpha is None else float(alpha), _client_key(client),
            red, _wants(inputs), float(gamma), device, _seconds(timeout))
        return cast(Tensor, loss)

    c = client if client is not None else get_default_client()

    def run(x: Tensor, y: Tensor, want_x: bool, want_y: bool) -> LossResult:
        return c.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, weight=weight,
                                    reduction=red, grad=want_x, device=device, timeout=timeout)

    return cast(Tensor, _RemoteLoss.apply(inputs, targets, run, red))


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
        return bce_with_logits(input, target, cast(Optional[Tensor], self.weight),
                               cast(Optional[Tensor], self.pos_weight), self.reduction,
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
