"""Python client for lossd, a gRPC loss-evaluation service.

Example
-------
>>> import numpy as np, lossd
>>> with lossd.Client("127.0.0.1:50051") as client:                    # doctest: +SKIP
...     r = client.bce_with_logits(logits, targets, pos_weight=pw, reduction="none", grad=True)
...     r.loss, r.grad, r.device

:class:`Client` is synchronous and thread-safe; :class:`AsyncClient` has the same methods as
coroutines (``grpc.aio``). torch tensors are accepted wherever arrays are, and
``lossd.torch`` (imported on first use; needs torch) has differentiable functions and an
``nn.Module``.

Every RPC failure raises :class:`LossdError` (``.code``: a ``grpc.StatusCode``, ``.details``:
the server's message), as the subclass for its code. The package logs to the ``"lossd"``
logger (debug level per request).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _errors
from ._channel import RetryPolicy
from ._client import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, Client
from ._errors import *  # noqa: F401,F403 - the exception classes, listed in _errors.__all__
from ._types import (
    AccumulateResult, BceResult, Capabilities, DatasetResult, LossResult, Timing,
)

if TYPE_CHECKING:  # imported on first use (__getattr__ below)
    from ._aio import AsyncClient

__version__ = "0.2.0"

__all__ = [
    "Client",
    "AsyncClient",
    "RetryPolicy",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "LossResult",
    "BceResult",
    "AccumulateResult",
    "DatasetResult",
    "Capabilities",
    "Timing",
]
__all__ += _errors.__all__


def __getattr__(name: str) -> Any:
    # `lossd.torch` is imported lazily: torch is an optional dependency. AsyncClient too:
    # asyncio and grpc.aio cost more to import than the rest of the package.
    if name == "torch":
        return importlib.import_module(".torch", __name__)
    if name == "AsyncClient":
        from ._aio import AsyncClient

        globals()["AsyncClient"] = AsyncClient
        return AsyncClient
    raise AttributeError(f"module 'lossd' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | {"AsyncClient", "torch"})
