"""Malformed input on every API gets a clean status (INVALID_ARGUMENT or UNAUTHENTICATED), never INTERNAL.

Each input here once reached the server as an exception no table knew (a
cryptography or PyJWT error, an OverflowError, a protobuf DecodeError). The
refusal is logged at warning level without a traceback, nothing is issued,
and the caller reads a plain message.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from support import malformed
from support.calls import bearer, ipb, lpb, native_request, pb
from support.certs import to_pem
from support.ids import LINKERD_WEB, WEB
from support.serving import Harness, serving
from support.tokens import K8sIssuer, k8s_config

from meshca.testing import TestCA

C = grpc.StatusCode


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Harness, K8sIssuer], Awaitable[Any]]
    code: grpc.StatusCode


def _native(h: Harness, csr: bytes, **kwargs: Any) -> Awaitable[Any]:
    if not kwargs:
        kwargs["join_token"] = h.token()
    return h.native.IssueSVID(native_request(csr, **kwargs))


def _web_csr() -> bytes:
    return malformed.csr(malformed.p256(), [x509.UniformResourceIdentifier(str(WEB))])


def _pem(der: bytes) -> str:
    """PEM armour around any bytes: to_pem() would have to parse them first."""
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _proof(leaf: bytes) -> pb.SvidProof:
    message = pb.SvidProof(chain=[leaf], signature=b"\x30\x00")
    message.signed_at.FromDatetime(datetime.now(UTC))
    return message


def _claims(k8s: K8sIssuer, **extra: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    claims = {"iss": k8s.issuer, "sub": "system:serviceaccount:default:web", "aud": "meshca", "exp": now + 600}
    return {**claims, **extra}


def _jwt(k8s: K8sIssuer, header: dict[str, Any] | None = None, **claims: Any) -> str:
    return malformed.forge_jwt({"alg": "ES256", "kid": k8s.kid, **(header or {})}, _claims(k8s, **claims), k8s.key)


def _ttl(h: Harness, seconds: int) -> Awaitable[Any]:
    request = native_request(_web_csr(), join_token=h.token())
    request.ttl.seconds = seconds
    return h.native.IssueSVID(request)


def _raw(h: Harness, method: str, body: bytes, metadata: Any = None) -> Awaitable[Any]:
    """Bytes sent as a request body as they are, without a protobuf serializer."""
    return h.channel.unary_unary(method)(body, metadata=metadata)


async def _watch_raw(h: Harness, body: bytes) -> None:
    async for _ in h.channel.unary_stream("/meshca.identity.v1.Identity/WatchBundle")(body):
        pass


NOT_A_MESSAGE = b"\x0a\xff\x01truncated"  # field 1, length 255, then far fewer bytes
W = str(WEB)

CASES = [
    # -- before authentication: what parses the request
    Case("native csr version 5", lambda h, k: _native(h, malformed.csr_version(W, 5)), C.INVALID_ARGUMENT),
    Case(
        "linkerd csr version 5",
        lambda h, k: h.linkerd.Certify(
            lpb.CertifyRequest(
                identity=LINKERD_WEB,
                token=k.token(aud="identity.l5d.io").encode(),
                certificate_signing_request=malformed.csr_version(LINKERD_WEB, 5),
            )
        ),
        C.INVALID_ARGUMENT,
    ),
    Case(
        "istio csr version 5",
        lambda h, k: h.istio.CreateCertificate(
            ipb.IstioCertificateRequest(csr=_pem(malformed.csr_version(W, 5))),
            metadata=bearer(h.token()),
        ),
        C.INVALID_ARGUMENT,
    ),
    Case(
        "native body not a message",
        lambda h, k: _raw(h, "/meshca.identity.v1.Identity/IssueSVID", NOT_A_MESSAGE),
        C.INVALID_ARGUMENT,
    ),
    Case(
        "linkerd body not a message",
        lambda h, k: _raw(h, "/io.linkerd.proxy.identity.Identity/Certify", NOT_A_MESSAGE),
        C.INVALID_ARGUMENT,
    ),
    Case(
        "istio body not a message",
        lambda h, k: _raw(h, "/istio.v1.auth.IstioCertificateService/CreateCertificate", NOT_A_MESSAGE),
        C.INVALID_ARGUMENT,
    ),
    Case("native watch body not a message", lambda h, k: _watch_raw(h, NOT_A_MESSAGE), C.INVALID_ARGUMENT),
    # -- the credential
    Case(
        "native proof leaf version 7",
        lambda h, k: _native(
            h, _web_csr(), proof=_proof(malformed.certificate_version(malformed.self_signed(W, datetime.now(UTC)), 7))
        ),
        C.UNAUTHENTICATED,
    ),
    Case(
        "native proof leaf with two SANs",
        lambda h, k: _native(h, _web_csr(), proof=_proof(malformed.self_signed(W, datetime.now(UTC), twin_san=True))),
        C.UNAUTHENTICATED,
    ),
    Case(
        "native jwt integer kid", lambda h, k: _native(h, _web_csr(), jwt_token=_jwt(k, {"kid": 7})), C.UNAUTHENTICATED
    ),
    Case(
        "native jwt list kid",
        lambda h, k: _native(h, _web_csr(), jwt_token=_jwt(k, {"kid": ["k1"]})),
        C.UNAUTHENTICATED,
    ),
    Case(
        "native jwt crit header",
        lambda h, k: _native(h, _web_csr(), jwt_token=_jwt(k, {"crit": ["exp"]})),
        C.UNAUTHENTICATED,
    ),
    Case(
        "native jwt string nbf", lambda h, k: _native(h, _web_csr(), jwt_token=_jwt(k, nbf="soon")), C.UNAUTHENTICATED
    ),
    Case(
        "native jwt string exp", lambda h, k: _native(h, _web_csr(), jwt_token=_jwt(k, exp="later")), C.UNAUTHENTICATED
    ),
    Case("native jwt list iat", lambda h, k: _native(h, _web_csr(), jwt_token=_jwt(k, iat=[1])), C.UNAUTHENTICATED),
    Case(
        "istio jwt integer kid",
        lambda h, k: h.istio.CreateCertificate(
            ipb.IstioCertificateRequest(csr=to_pem(_web_csr())), metadata=bearer(_jwt(k, {"kid": 7}, aud="istio-ca"))
        ),
        C.UNAUTHENTICATED,
    ),
    # -- after authentication: the CSR and the lifetime
    Case("native x400Address san", lambda h, k: _native(h, malformed.csr_with_san_tag(W, 0xA3)), C.INVALID_ARGUMENT),
    Case("native ediPartyName san", lambda h, k: _native(h, malformed.csr_with_san_tag(W, 0xA5)), C.INVALID_ARGUMENT),
    Case(
        "native unknown key algorithm",
        lambda h, k: _native(h, malformed.csr_with_key(W, malformed.unknown_key_algorithm())),
        C.INVALID_ARGUMENT,
    ),
    Case(
        "native explicit ec parameters",
        lambda h, k: _native(h, malformed.csr_with_key(W, malformed.explicit_p256_parameters())),
        C.INVALID_ARGUMENT,
    ),
    Case(
        "istio x400Address san",
        lambda h, k: h.istio.CreateCertificate(
            ipb.IstioCertificateRequest(csr=to_pem(malformed.csr_with_san_tag(W, 0xA3))), metadata=bearer(h.token())
        ),
        C.INVALID_ARGUMENT,
    ),
    Case("native ttl of -2^62 seconds", lambda h, k: _ttl(h, -(2**62)), C.INVALID_ARGUMENT),
    Case(
        "istio validity of -2^62 seconds",
        lambda h, k: h.istio.CreateCertificate(
            ipb.IstioCertificateRequest(csr=to_pem(_web_csr()), validity_duration=-(2**62)), metadata=bearer(h.token())
        ),
        C.INVALID_ARGUMENT,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_malformed_input_gets_a_clean_status(case: Case, d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent)) as h:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await case.call(h, k8s)
        assert refused.value.code() == case.code
        details = refused.value.details() or ""
        assert "<class" not in details and "Traceback" not in details and "Error" not in details
        assert h.issued() == []
        assert h.events("request.failed") == []
        [event] = h.events("auth.failed") + h.events("request.refused")
        assert event["log_level"] == "warning"
        assert "exc_info" not in event


def test_every_case_is_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split()[0] for c in CASES} == {"native", "linkerd", "istio"}
