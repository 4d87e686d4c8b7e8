"""The one exception type of the lossd client and its per-status-code subclasses."""

from __future__ import annotations

from typing import Dict, Optional, Type

import grpc

# The exception classes: the package exports them as they are (lossd.__all__).
__all__ = [
    "LossdError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "UnavailableError",
    "DeadlineExceededError",
    "UnauthenticatedError",
    "InternalError",
]


class LossdError(Exception):
    """An RPC to a lossd server failed.

    Every ``grpc.RpcError`` raised by a lossd call is converted to this type, or to the
    subclass registered for its status code (e.g. :class:`InvalidArgumentError`). Codes
    without a subclass (CANCELLED, UNIMPLEMENTED, UNKNOWN, ...) raise ``LossdError`` itself.

    Parameters
    ----------
    code : grpc.StatusCode
        The gRPC status code.
    details : str
        The server's message (or gRPC's, for transport failures), e.g.
        ``"targets shape [4,8] != logits shape [4,7]"``.

    Attributes
    ----------
    code : grpc.StatusCode
    details : str
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, details={self.details!r})"


class InvalidArgumentError(LossdError):
    """INVALID_ARGUMENT: a malformed tensor, shape mismatch, bad option or rejected NaN."""


class ResourceExhaustedError(LossdError):
    """RESOURCE_EXHAUSTED: message too large, too many elements, or the work queue is full."""


class FailedPreconditionError(LossdError):
    """FAILED_PRECONDITION: e.g. CUDA requested from a server without a usable GPU."""


class UnavailableError(LossdError):
    """UNAVAILABLE: the server cannot be reached or is draining."""


class DeadlineExceededError(LossdError):
    """DEADLINE_EXCEEDED: the call's timeout expired."""


class UnauthenticatedError(LossdError):
    """UNAUTHENTICATED: a missing or bad token."""


class InternalError(LossdError):
    """INTERNAL: a failure inside the server (or a malformed response)."""


_BY_CODE: Dict[grpc.StatusCode, Type[LossdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def error_for(code: grpc.StatusCode, details: str) -> LossdError:
    """Build the exception of the class registered for ``code``.

    Parameters
    ----------
    code : grpc.StatusCode
    details : str

    Returns
    -------
    LossdError
        An instance of the subclass for ``code``, or of ``LossdError`` itself.
    """
    return _BY_CODE.get(code, LossdError)(code, details)


def from_rpc_error(error: grpc.RpcError) -> LossdError:
    """Convert a ``grpc.RpcError`` raised by a call into a :class:`LossdError`.

    Parameters
    ----------
    error : grpc.RpcError
        The error raised by a call (a ``grpc.Call`` or a ``grpc.aio.AioRpcError``).

    Returns
    -------
    LossdError
    """
    code: Optional[grpc.StatusCode] = None
    details: Optional[str] = None
    # grpc.Call (sync) and grpc.aio.AioRpcError both have code() and details().
    if callable(getattr(error, "code", None)) and callable(getattr(error, "details", None)):
        code = error.code()  # type: ignore[attr-defined]
        details = error.details()  # type: ignore[attr-defined]
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    return error_for(code, details if details is not None else str(error))
