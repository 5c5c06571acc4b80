"""Every way a request can be wrong, on every API: the status code, nothing issued, and a log line saying why."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.duration_pb2 import Duration
from structlog.testing import capture_logs
from support.calls import bearer, code_of, ipb, lpb, native_request, pb
from support.certs import csr_der, flip_last_byte, linkerd_csr, p256, spiffe_csr, to_pem
from support.ids import API, LINKERD_WEB, TD, WEB
from support.serving import Harness, serving
from support.tokens import K8sIssuer, k8s_config, unsigned_jwt

import meshca
from meshca.server import JoinToken, hash_token, new_token
from meshca.testing import TestCA

C = grpc.StatusCode
MAX_TTL = timedelta(hours=48)


@dataclass
class Ctx:
    h: Harness
    k8s: K8sIssuer
    token: str  # valid, one use, for WEB
    expired: str
    used_up: str

    def jwt(self, sa: str = "web", **kwargs: Any) -> str:
        return self.k8s.token("default", sa, **kwargs)


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], Awaitable[Any]]
    code: grpc.StatusCode
    reason: str | None = None  # the auth.failed reason slug, for UNAUTHENTICATED


def web_csr() -> bytes:
    return spiffe_csr(WEB)[1]


def rsa1024_csr() -> bytes:
    return csr_der(rsa.generate_private_key(65537, 1024), uris=[str(WEB)])


def p521_csr() -> bytes:
    return csr_der(ec.generate_private_key(ec.SECP521R1()), uris=[str(WEB)], algorithm=hashes.SHA512())


def p384_csr() -> bytes:
    return csr_der(ec.generate_private_key(ec.SECP384R1()), uris=[str(WEB)], algorithm=hashes.SHA384())


def native(c: Ctx, csr: bytes | None = None, **kwargs: Any) -> Awaitable[Any]:
    if not any(k in kwargs for k in ("join_token", "jwt_token", "proof", "no_credential")):
        kwargs["join_token"] = c.token
    kwargs.pop("no_credential", None)
    return c.h.native.IssueSVID(native_request(web_csr() if csr is None else csr, **kwargs))


def negative_ttl(c: Ctx) -> Awaitable[Any]:
    request = native_request(web_csr(), join_token=c.token)
    request.ttl.CopyFrom(Duration(seconds=-60))
    return c.h.native.IssueSVID(request)


def certify(c: Ctx, *, identity: str = LINKERD_WEB, token: bytes | None = None, csr: bytes | None = None) -> Any:
    token = c.jwt(aud="identity.l5d.io").encode() if token is None else token
    csr = linkerd_csr(identity)[1] if csr is None else csr
    return c.h.linkerd.Certify(lpb.CertifyRequest(identity=identity, token=token, certificate_signing_request=csr))


def create(c: Ctx, *, csr: str | None = None, metadata: Any = None, validity: int = 0) -> Any:
    metadata = bearer(c.jwt(aud="istio-ca")) if metadata is None else metadata
    csr = to_pem(web_csr()) if csr is None else csr
    request = ipb.IstioCertificateRequest(csr=csr, validity_duration=validity)
    return c.h.istio.CreateCertificate(request, metadata=metadata)


CASES = [
    # -- native
    Case("native missing csr", lambda c: native(c, b""), C.INVALID_ARGUMENT),
    Case("native garbage csr", lambda c: native(c, b"\x30\x03not a csr"), C.INVALID_ARGUMENT),
    Case("native csr bad signature", lambda c: native(c, flip_last_byte(web_csr())), C.INVALID_ARGUMENT),
    Case("native rsa-1024 key", lambda c: native(c, rsa1024_csr()), C.INVALID_ARGUMENT),
    Case("native p-521 key", lambda c: native(c, p521_csr()), C.INVALID_ARGUMENT),
    Case("native key type the policy disallows", lambda c: native(c, p384_csr()), C.INVALID_ARGUMENT),
    Case("native no credential", lambda c: native(c, no_credential=True), C.UNAUTHENTICATED, "missing"),
    Case("native unknown token", lambda c: native(c, join_token=new_token()), C.UNAUTHENTICATED, "unknown_token"),
    Case("native malformed token", lambda c: native(c, join_token="hunter2"), C.UNAUTHENTICATED, "unknown_token"),
    Case("native expired token", lambda c: native(c, join_token=c.expired), C.UNAUTHENTICATED, "token_expired"),
    Case("native used-up token", lambda c: native(c, join_token=c.used_up), C.UNAUTHENTICATED, "token_used_up"),
    Case(
        "native jwt wrong audience",
        lambda c: native(c, jwt_token=c.jwt(aud="istio-ca")),
        C.UNAUTHENTICATED,
        "jwt_audience",
    ),
    Case(
        "native jwt wrong issuer",
        lambda c: native(c, jwt_token=c.jwt(iss="https://evil.example")),
        C.UNAUTHENTICATED,
        "jwt_issuer",
    ),
    Case(
        "native jwt expired",
        lambda c: native(c, jwt_token=c.jwt(now=datetime.now(UTC) - timedelta(hours=1))),
        C.UNAUTHENTICATED,
        "jwt_expired",
    ),
    Case(
        "native jwt not yet valid",
        lambda c: native(c, jwt_token=c.jwt(now=datetime.now(UTC) + timedelta(hours=1))),
        C.UNAUTHENTICATED,
        "jwt_not_yet_valid",
    ),
    Case(
        "native jwt bad signature",
        lambda c: native(c, jwt_token=c.jwt(key=ec.generate_private_key(ec.SECP256R1()))),
        C.UNAUTHENTICATED,
        "jwt_signature",
    ),
    Case(
        "native jwt alg none",
        lambda c: native(
            c,
            jwt_token=unsigned_jwt(
                {"iss": c.k8s.issuer, "sub": "system:serviceaccount:default:web", "aud": "meshca", "exp": 2**33}
            ),
        ),
        C.UNAUTHENTICATED,
        "jwt_algorithm",
    ),
    Case(
        "native jwt not a service account",
        lambda c: native(c, jwt_token=c.jwt(extra={"sub": "system:node:worker-1"})),
        C.UNAUTHENTICATED,
        "not_service_account",
    ),
    Case("native jwt garbage", lambda c: native(c, jwt_token="a.b.c"), C.UNAUTHENTICATED, "malformed"),
    Case("native token for another id than the csr", lambda c: native(c, spiffe_csr(API)[1]), C.PERMISSION_DENIED),
    Case("native spiffe_id field differs", lambda c: native(c, spiffe_id=str(API)), C.PERMISSION_DENIED),
    Case("native spiffe_id field invalid", lambda c: native(c, spiffe_id="spiffe://Example.org/x"), C.INVALID_ARGUMENT),
    Case(
        "native csr asks for a dns name",
        lambda c: native(c, csr_der(p256(), uris=[str(WEB)], dns=["web.example.org"])),
        C.PERMISSION_DENIED,
    ),
    Case("native ttl above max", lambda c: native(c, ttl=MAX_TTL + timedelta(seconds=1)), C.INVALID_ARGUMENT),
    Case("native negative ttl", negative_ttl, C.INVALID_ARGUMENT),
    # -- Linkerd
    Case("linkerd missing csr", lambda c: certify(c, csr=b""), C.INVALID_ARGUMENT),
    Case("linkerd missing identity", lambda c: certify(c, identity=""), C.INVALID_ARGUMENT),
    Case("linkerd garbage csr", lambda c: certify(c, csr=b"garbage"), C.INVALID_ARGUMENT),
    Case("linkerd csr bad signature", lambda c: certify(c, csr=flip_last_byte(linkerd_csr()[1])), C.INVALID_ARGUMENT),
    Case(
        "linkerd rsa-1024 key",
        lambda c: certify(c, csr=csr_der(rsa.generate_private_key(65537, 1024), dns=[LINKERD_WEB], cn=LINKERD_WEB)),
        C.INVALID_ARGUMENT,
    ),
    Case(
        "linkerd identity in another trust domain",
        lambda c: certify(c, identity="web.default.serviceaccount.identity.linkerd.other.org"),
        C.PERMISSION_DENIED,
    ),
    Case(
        "linkerd identity of another control plane",
        lambda c: certify(c, identity=f"web.default.serviceaccount.identity.linkerd2.{TD}"),
        C.PERMISSION_DENIED,
    ),
    Case("linkerd no token", lambda c: certify(c, token=b""), C.UNAUTHENTICATED, "missing"),
    Case("linkerd token not text", lambda c: certify(c, token=b"\xff\xfe"), C.UNAUTHENTICATED, "malformed"),
    Case(
        "linkerd jwt wrong audience",
        lambda c: certify(c, token=c.jwt(aud="meshca").encode()),
        C.UNAUTHENTICATED,
        "jwt_audience",
    ),
    Case("linkerd used-up token", lambda c: certify(c, token=c.used_up.encode()), C.UNAUTHENTICATED, "token_used_up"),
    # -- Istio
    Case("istio missing csr", lambda c: create(c, csr=""), C.INVALID_ARGUMENT),
    Case(
        "istio garbage csr", lambda c: create(c, csr="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"), C.INVALID_ARGUMENT
    ),
    Case("istio csr bad signature", lambda c: create(c, csr=to_pem(flip_last_byte(web_csr()))), C.INVALID_ARGUMENT),
    Case("istio rsa-1024 key", lambda c: create(c, csr=to_pem(rsa1024_csr())), C.INVALID_ARGUMENT),
    Case("istio no credential", lambda c: create(c, metadata=()), C.UNAUTHENTICATED, "missing"),
    Case(
        "istio not a bearer credential",
        lambda c: create(c, metadata=(("authorization", "Basic d2ViOnB3"),)),
        C.UNAUTHENTICATED,
        "missing",
    ),
    Case(
        "istio jwt wrong audience",
        lambda c: create(c, metadata=bearer(c.jwt(aud="identity.l5d.io"))),
        C.UNAUTHENTICATED,
        "jwt_audience",
    ),
    Case("istio unknown token", lambda c: create(c, metadata=bearer(new_token())), C.UNAUTHENTICATED, "unknown_token"),
    Case(
        "istio token for another id than the csr",
        lambda c: create(c, metadata=bearer(c.jwt("api", aud="istio-ca"))),
        C.PERMISSION_DENIED,
    ),
    Case(
        "istio validity above max",
        lambda c: create(c, validity=int(MAX_TTL.total_seconds()) + 1),
        C.INVALID_ARGUMENT,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_refused(case: Case, d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    async with serving(
        d,
        server_ca,
        k8s_jwt=k8s_config(k8s, d.parent),
        max_leaf_ttl=MAX_TTL,
        key_policy=meshca.KeyPolicy(frozenset({meshca.KeyType.EC_P256, meshca.KeyType.RSA_2048})),
    ) as h:
        store = h.server.store
        now = h.clock()
        expired, used_up = new_token(), new_token()
        store.add_token(JoinToken(hash_token(expired), WEB, now - timedelta(seconds=1), 5))
        store.add_token(JoinToken(hash_token(used_up), WEB, now + timedelta(hours=1), 0))
        ctx = Ctx(h, k8s, h.token(WEB), expired, used_up)

        assert await code_of(case.call(ctx)) == case.code
        assert h.issued() == []
        refusals = h.events("auth.failed") + h.events("request.refused")
        assert len(refusals) == 1, h.logs
        [event] = refusals
        assert event["reason"]
        if case.code == C.UNAUTHENTICATED:
            assert (event["event"], event["reason"]) == ("auth.failed", case.reason)
        else:
            assert (event["event"], event["code"]) == ("request.refused", case.code.name)
        # the one-use token was not spent by a refused request
        assert store.get_token(hash_token(ctx.token)).uses_left == 1


async def test_rate_limit_per_principal(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca, rate_limit=1, rate_burst=2) as h:
        web, api = h.token(WEB, uses=10), h.token(API, uses=10)
        codes = [await code_of(h.native.IssueSVID(native_request(web_csr(), join_token=web))) for _ in range(3)]
        assert codes == [C.OK, C.OK, C.RESOURCE_EXHAUSTED]
        # another principal has its own bucket
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr(API)[1], join_token=api))) == C.OK
        [event] = h.events("request.refused")
        assert event["code"] == "RESOURCE_EXHAUSTED"
        assert "rate limit" in event["reason"]
        # the bucket refills at one per second of the server's clock
        h.clock.advance(timedelta(seconds=1))
        assert await code_of(h.native.IssueSVID(native_request(web_csr(), join_token=web))) == C.OK
        assert len(h.issued()) == 4


async def test_oversized_message_is_refused_and_logged(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca, max_message_bytes=16 * 1024) as h:
        token = h.token()
        padded = pb.IssueSVIDRequest(csr=web_csr(), credential=pb.Credential(join_token=token), spiffe_id="x" * 20_000)
        with capture_logs() as logs:
            assert await code_of(h.native.IssueSVID(padded)) == C.RESOURCE_EXHAUSTED
            big_csr = ipb.IstioCertificateRequest(csr="A" * 20_000)
            assert await code_of(h.istio.CreateCertificate(big_csr, metadata=bearer(token))) == C.RESOURCE_EXHAUSTED
        refused = [e for e in logs if e["event"] == "request.refused"]
        assert len(refused) == 2 and all("above the limit" in e["reason"] for e in refused)
        # far above the limit, gRPC itself refuses before meshca sees the request
        huge = pb.IssueSVIDRequest(csr=web_csr(), credential=pb.Credential(join_token=token), spiffe_id="x" * 400_000)
        assert await code_of(h.native.IssueSVID(huge)) == C.RESOURCE_EXHAUSTED
        # the connection and the token are still good
        assert await code_of(h.native.IssueSVID(native_request(web_csr(), join_token=token))) == C.OK


def test_every_case_is_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split()[0] for c in CASES} == {"native", "linkerd", "istio"}
