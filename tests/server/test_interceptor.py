"""The error table: exception class -> status code, looked up along the class hierarchy."""

from __future__ import annotations

import re

import grpc
import pytest

from meshca.pki import _errors as errors
from meshca.server._interceptor import STATUS, status_for
from meshca.server.api._linkerd import LINKERD_STATUS

C = grpc.StatusCode


class _NoIssuerYet(errors.IssuerUnavailable):
    """A subclass the table does not name: its nearest named ancestor decides."""


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidCsr("x"), C.INVALID_ARGUMENT),
        (errors.KeyPolicyError("x"), C.INVALID_ARGUMENT),
        (errors.InvalidSpiffeId("x"), C.INVALID_ARGUMENT),
        (errors.InvalidRequest("x"), C.INVALID_ARGUMENT),
        (errors.AuthenticationError("x"), C.UNAUTHENTICATED),
        (errors.CredentialCheckUnavailable("x"), C.UNAVAILABLE),
        (errors.TokenUsedUp("x"), C.UNAUTHENTICATED),
        (errors.PermissionDenied("x"), C.PERMISSION_DENIED),
        (errors.IdentityMismatch("x"), C.PERMISSION_DENIED),
        (errors.CsrNameMismatch("x"), C.PERMISSION_DENIED),
        (errors.IssuanceError("x"), C.FAILED_PRECONDITION),
        (errors.IssuerUnavailable("x"), C.UNAVAILABLE),
        (_NoIssuerYet("x"), C.UNAVAILABLE),
        (errors.StoreError("x"), C.UNAVAILABLE),
        (errors.RateLimited("x"), C.RESOURCE_EXHAUSTED),
        (errors.RequestTooLarge("x"), C.RESOURCE_EXHAUSTED),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_each_error_maps_to_its_status(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_for(exc) == code


@pytest.mark.parametrize(
    "exc", [ValueError("x"), OverflowError("x"), KeyError("x"), RuntimeError("x"), errors.MeshcaError("x")]
)
def test_what_nobody_expected_has_no_status_and_becomes_internal(exc: Exception) -> None:
    assert status_for(exc) is None


def test_linkerd_overrides_only_the_name_mismatches() -> None:
    assert status_for(errors.IdentityMismatch("x"), LINKERD_STATUS) == C.FAILED_PRECONDITION
    assert status_for(errors.CsrNameMismatch("x"), LINKERD_STATUS) == C.FAILED_PRECONDITION
    assert status_for(errors.PermissionDenied("x"), LINKERD_STATUS) == C.PERMISSION_DENIED
    changed = {cls for cls in LINKERD_STATUS if LINKERD_STATUS[cls] != STATUS.get(cls)}
    assert changed == {errors.IdentityMismatch, errors.CsrNameMismatch}


def test_every_error_class_is_in_the_tree_drawn_in_the_errors_module() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert re.search(rf"\b{name}\b", doc), name
