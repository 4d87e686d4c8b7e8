"""Result types returned by :class:`lossd.Client`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["Timing", "BceResult", "Capabilities"]


@dataclass(frozen=True)
class Timing:
    """Server-side timings of one request, in nanoseconds.

    Attributes
    ----------
    queue_ns : int
        From decode to the start of compute.
    compute_ns : int
        Kernel time.
    total_ns : int
        From the start of the handler to the reply.
    """

    queue_ns: int = 0
    compute_ns: int = 0
    total_ns: int = 0


@dataclass(frozen=True)
class BceResult:
    """The result of :meth:`lossd.Client.bce_with_logits`.

    Arrays are read-only views of the response message's bytes (no copy); call ``.copy()``
    on one to modify it. They have the logits' dtype (bfloat16 without ``ml_dtypes``:
    float32).

    Attributes
    ----------
    loss : numpy.ndarray
        Per-element loss with the logits' shape for ``reduction="none"``; a 0-d array for
        ``"mean"`` and ``"sum"``.
    grad : numpy.ndarray or None
        Gradient of the (reduced) loss with respect to the logits, logits' shape; None
        unless ``grad=True`` was asked.
    grad_targets : numpy.ndarray or None
        Gradient of the (reduced) loss with respect to the targets; None unless
        ``grad_targets=True`` was asked.
    device : str
        Where the server ran it: "cpu" or "cuda".
    timing : Timing
        Server-side timings.
    request_id : str
        The request id echoed by the server.
    num_elements : int
        Number of elements of the logits.
    """

    loss: np.ndarray
    grad: Optional[np.ndarray]
    grad_targets: Optional[np.ndarray]
    device: str
    timing: Timing
    request_id: str
    num_elements: int


@dataclass(frozen=True)
class Capabilities:
    """What a server supports and its limits (:meth:`lossd.Client.capabilities`).

    Attributes
    ----------
    server_version : str
    losses : tuple of str
        E.g. ``("bce_with_logits",)``.
    dtypes : tuple of str
        Subset of "float32", "float64", "float16", "bfloat16".
    devices : tuple of str
        Devices usable now: "cpu" (always) and "cuda" with a usable GPU.
    reductions : tuple of str
        Subset of "none", "mean", "sum".
    max_message_bytes : int
        The server's message size limit.
    max_elements : int
        The largest number of elements per request.
    cuda_device_name : str
        Empty without a GPU.
    """

    server_version: str
    losses: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    devices: Tuple[str, ...]
    reductions: Tuple[str, ...]
    max_message_bytes: int
    max_elements: int
    cuda_device_name: str

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}
