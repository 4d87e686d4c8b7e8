"""Unit tests of the exception hierarchy (no server)."""

from __future__ import annotations

import grpc
import pytest

import lossd
from lossd._errors import error_for

CASES = [
    (grpc.StatusCode.INVALID_ARGUMENT, lossd.InvalidArgumentError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, lossd.ResourceExhaustedError),
    (grpc.StatusCode.FAILED_PRECONDITION, lossd.FailedPreconditionError),
    (grpc.StatusCode.UNAVAILABLE, lossd.UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, lossd.DeadlineExceededError),
    (grpc.StatusCode.UNAUTHENTICATED, lossd.UnauthenticatedError),
    (grpc.StatusCode.INTERNAL, lossd.InternalError),
]


@pytest.mark.parametrize("code,cls", CASES)
def test_code_maps_to_subclass(code, cls) -> None:
    err = error_for(code, "targets shape [4,8] != logits shape [4,7]")
    assert type(err) is cls
    assert isinstance(err, lossd.LossdError) and isinstance(err, Exception)
    assert err.code is code
    assert err.details == "targets shape [4,8] != logits shape [4,7]"
    assert str(err) == f"{code.name}: targets shape [4,8] != logits shape [4,7]"
    assert cls.__name__ in repr(err)


@pytest.mark.parametrize("code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNIMPLEMENTED,
                                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND])
def test_other_codes_are_plain_lossd_error(code) -> None:
    err = error_for(code, "x")
    assert type(err) is lossd.LossdError and err.code is code


def test_catchable_as_base() -> None:
    with pytest.raises(lossd.LossdError) as info:
        raise error_for(grpc.StatusCode.INVALID_ARGUMENT, "logits: dtype is unset")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
