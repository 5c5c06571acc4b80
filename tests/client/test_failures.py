"""The one classification of failed calls: retry, reconnect first, or give up (and with what message)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from support.fake_identity import FakeIdentity
from support.ids import TD, WEB
from support.serving import free_port

import meshca
from meshca.client._core import Credentials
from meshca.client._failures import _host_port, certificate_names, classify
from meshca.client._state import SourceConfig
from meshca.testing import TestCA

C = grpc.StatusCode
CONFIG = SourceConfig("127.0.0.1:1", WEB, Credentials("tok"))
MISMATCH = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Custom verification check "
    "failed with error: UNAUTHENTICATED: Hostname Verification Check failed."
)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "permanent", "reconnect"),
    [
        (C.UNAVAILABLE, False, True),  # a new channel: gRPC's own reconnect backoff must not hold the retry back
        (C.DEADLINE_EXCEEDED, False, False),
        (C.RESOURCE_EXHAUSTED, False, False),
        (C.INTERNAL, False, False),
        (C.UNKNOWN, False, False),
        (C.CANCELLED, False, False),
        (C.ABORTED, False, False),
        (C.UNAUTHENTICATED, True, False),
        (C.PERMISSION_DENIED, True, False),
        (C.INVALID_ARGUMENT, True, False),
        (C.FAILED_PRECONDITION, True, False),
        (C.UNIMPLEMENTED, True, False),
        (C.NOT_FOUND, True, False),
    ],
    ids=lambda v: v.name if isinstance(v, grpc.StatusCode) else str(v),
)
def test_grpc_status_classification(code: grpc.StatusCode, permanent: bool, reconnect: bool, ca: TestCA) -> None:
    failure = classify(rpc_error(code, "the reason"), CONFIG, ca.bundle)
    assert failure.reason == f"{code.name}: the reason"
    assert failure.reconnect is reconnect
    if not permanent:
        assert failure.refusal is None
        return
    assert isinstance(failure.refusal, meshca.RequestRefused)
    assert (failure.refusal.code, failure.refusal.details) == (code.name, "the reason")
    assert str(failure.refusal) == f"no SVID for {WEB}: the identity service refused: {code.name}: the reason"


def test_an_unauthenticated_jwt_is_retried_because_the_file_rotates(ca: TestCA) -> None:
    config = SourceConfig("127.0.0.1:1", WEB, Credentials(jwt_file=Path("/var/run/token")))
    assert classify(rpc_error(C.UNAUTHENTICATED, "JWT expired"), config, ca.bundle).refusal is None
    assert classify(rpc_error(C.PERMISSION_DENIED, "not yours"), config, ca.bundle).refusal is not None


def test_other_exceptions_are_transient_with_a_short_reason(ca: TestCA) -> None:
    cases: list[tuple[BaseException, str]] = [
        (meshca.VerificationError("no anchor"), "VerificationError: no anchor"),
        (EOFError("the bundle stream ended"), "EOFError: the bundle stream ended"),
        (asyncio.CancelledError(), "CancelledError"),
    ]
    for exc, reason in cases:
        failure = classify(exc, CONFIG, ca.bundle)
        assert (failure.reason, failure.refusal, failure.reconnect) == (reason, None, False)


@pytest.mark.parametrize(
    "details", [MISMATCH, "failed to connect to all addresses; Peer name 127.0.0.1 is not in peer certificate"]
)
def test_a_name_mismatch_is_permanent_and_says_what_to_do(details: str, ca: TestCA) -> None:
    config = SourceConfig(f"127.0.0.1:{free_port()}", WEB, Credentials("tok"))  # nothing there to ask for names
    failure = classify(rpc_error(C.UNAVAILABLE, details), config, ca.bundle)
    assert isinstance(failure.refusal, meshca.VerificationError)
    assert str(failure.refusal) == (
        f"no SVID for {WEB}: the server's certificate does not name 127.0.0.1: "
        "dial a name it carries, or pass server_name= (meshca fetch --server-name NAME)"
    )
    named = SourceConfig(config.server, WEB, Credentials("tok"), server_name="ca.example")
    assert "does not name ca.example:" in str(classify(rpc_error(C.UNAVAILABLE, details), named, ca.bundle).refusal)


def test_the_names_come_only_from_a_certificate_the_bundle_trusts() -> None:
    service = FakeIdentity(TestCA(TD), TestCA(TD)).start()  # its certificate names localhost
    try:
        assert certificate_names(service.address, service.ca.bundle) == ["localhost"]
        assert certificate_names(service.address, TestCA(TD).bundle) == []
        config = SourceConfig(service.address, WEB, Credentials("tok"))
        refusal = classify(rpc_error(C.UNAVAILABLE, MISMATCH), config, service.ca.bundle).refusal
        assert "does not name 127.0.0.1 (it names localhost)" in str(refusal)
        assert str(refusal).endswith("(meshca fetch --server-name localhost)")
    finally:
        service.close()
    assert certificate_names(f"127.0.0.1:{free_port()}", service.ca.bundle) == []


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("localhost:8443", ("localhost", 8443)),
        ("[::1]:8443", ("::1", 8443)),
        ("dns:///ca.example:443", ("ca.example", 443)),
        ("ipv4:10.0.0.1:8443", ("10.0.0.1", 8443)),
        ("ca.example", None),
        ("unix:/run/meshca.sock", None),
    ],
)
def test_host_and_port_of_a_target(target: str, expected: tuple[str, int] | None) -> None:
    assert _host_port(target) == expected
