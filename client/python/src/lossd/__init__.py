"""Python client for lossd, a gRPC loss-evaluation service.

Example
-------
>>> import numpy as np, lossd
>>> with lossd.Client("127.0.0.1:50051") as client:                    # doctest: +SKIP
...     r = client.bce_with_logits(logits, targets, pos_weight=pw, reduction="none", grad=True)
...     r.loss, r.grad, r.device

Every RPC failure raises :class:`LossdError` (``.code``: a ``grpc.StatusCode``, ``.details``:
the server's message), as the subclass for its code. The package logs to the ``"lossd"``
logger (debug level per request).
"""

from ._client import DEFAULT_MAX_MESSAGE_BYTES, Client
from ._errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LossdError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from ._types import BceResult, Capabilities, Timing

__version__ = "0.1.0"

__all__ = [
    "Client",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "BceResult",
    "Capabilities",
    "Timing",
    "LossdError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "UnavailableError",
    "DeadlineExceededError",
    "UnauthenticatedError",
    "InternalError",
]
