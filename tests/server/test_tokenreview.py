"""TokenReview against a local HTTPS stand-in for the Kubernetes API server."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import grpc
from support.calls import bearer, code_of, ipb, lpb, native_request
from support.certs import cert, linkerd_csr, spiffe_csr, to_pem, uris
from support.ids import API, LINKERD_WEB, TD, WEB
from support.kubeapi import FakeApiServer, review_token
from support.poll import eventually
from support.serving import serving
from support.tokens import K8sIssuer

from meshca import TrustDomain
from meshca.pki._time import system_clock
from meshca.server import TokenReviewConfig
from meshca.server.credentials import TokenReviewCredential
from meshca.testing import TestCA

C = grpc.StatusCode


async def test_issuance_via_tokenreview_is_cached(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    async with serving(d, server_ca, token_review=api_server.config()) as h:
        token = review_token(api_server, k8s, "web", ["meshca"])
        for _ in range(3):
            response = await h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token))
            assert uris(cert(response.leaf)) == [str(WEB)]
        assert api_server.reviews_of(token) == 1
        [review] = api_server.requests
        assert review["kind"] == "TokenReview"
        assert review["apiVersion"] == "authentication.k8s.io/v1"
        assert "meshca" in review["spec"]["audiences"]
        assert api_server.bad_auth == 0
        assert {r.principal for r in h.issued()} == {"k8s:default:web"}


async def test_cached_answer_expires_with_the_token(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    async with serving(d, server_ca, token_review=api_server.config()) as h:
        token = review_token(api_server, k8s, "web", ["meshca"], lifetime=timedelta(minutes=5))
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token))) == C.OK
        h.clock.advance(timedelta(minutes=6))
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token))) == C.OK
        assert api_server.reviews_of(token) == 2


async def test_a_review_without_audiences_is_not_for_meshca(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    """An authenticated review with empty status.audiences is valid for the API server only."""
    token = review_token(api_server, k8s, "web", ["meshca"])
    original = api_server.review

    def audience_agnostic(spec: dict[str, object]) -> dict[str, object]:
        answer = original(spec)
        answer.pop("audiences", None)
        return answer

    api_server.review = audience_agnostic  # type: ignore[method-assign]
    async with serving(d, server_ca, token_review=api_server.config()) as h:
        code = await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token)))
        assert code == C.UNAUTHENTICATED
        assert [e["reason"] for e in h.events("auth.failed")] == ["tokenreview_audience"]
        assert h.issued() == []


async def test_refused_token_is_unauthenticated(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    async with serving(d, server_ca, token_review=api_server.config()) as h:
        unknown = k8s.token("default", "web", aud="meshca")  # never registered with the API server
        for _ in range(2):
            code = await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=unknown)))
            assert code == C.UNAUTHENTICATED
        assert api_server.reviews_of(unknown) == 2  # refusals are not cached
        assert [e["reason"] for e in h.events("auth.failed")] == ["tokenreview_refused"] * 2
        assert h.issued() == []


async def test_audience_is_part_of_the_cached_answer(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    """A token the API server accepted for Istio must not then pass on Linkerd from the cache."""
    async with serving(d, server_ca, token_review=api_server.config()) as h:
        token = review_token(api_server, k8s, "web", ["istio-ca"])
        istio = ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(WEB)[1]))
        assert await code_of(h.istio.CreateCertificate(istio, metadata=bearer(token))) == C.OK
        linkerd = lpb.CertifyRequest(
            identity=LINKERD_WEB, token=token.encode(), certificate_signing_request=linkerd_csr()[1]
        )
        assert await code_of(h.linkerd.Certify(linkerd)) == C.UNAUTHENTICATED
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token))) == (
            C.UNAUTHENTICATED
        )
        # and the accepted audience is still served from the cache
        assert await code_of(h.istio.CreateCertificate(istio, metadata=bearer(token))) == C.OK
        assert api_server.reviews_of(token) == 3


async def test_concurrency_towards_the_api_server_is_bounded(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    api_server.delay = 0.25
    async with serving(d, server_ca, token_review=api_server.config(max_concurrency=2)) as h:
        sas = [f"sa{i}" for i in range(6)]
        tokens = [review_token(api_server, k8s, sa, ["meshca"]) for sa in sas]
        calls = [
            h.native.IssueSVID(native_request(spiffe_csr(f"spiffe://example.org/ns/default/sa/{sa}")[1], jwt_token=t))
            for sa, t in zip(sas, tokens, strict=True)
        ]
        started = time.monotonic()
        codes = await asyncio.gather(*(code_of(c) for c in calls))
        elapsed = time.monotonic() - started
        assert codes == [C.OK] * len(tokens)
        assert api_server.max_in_flight == 2
        assert len(api_server.requests) == len(tokens)
        assert elapsed >= 3 * api_server.delay  # six reviews, two at a time


async def test_api_server_unreachable_fails_closed(d: Path, server_ca: TestCA, k8s: K8sIssuer, tmp_path: Path) -> None:
    config = TokenReviewConfig("https://localhost:1", None, None, timeout=timedelta(seconds=2))
    async with serving(d, server_ca, token_review=config) as h:
        token = k8s.token("default", "api", aud="meshca")
        code = await code_of(h.native.IssueSVID(native_request(spiffe_csr(API)[1], jwt_token=token)))
        # Nothing issued, and the caller is told to retry rather than that its token is bad.
        assert code == C.UNAVAILABLE
        assert h.issued() == []
        assert [e["reason"] for e in h.events("auth.failed")] == ["tokenreview_unavailable"]


async def test_concurrency_stays_bounded_when_callers_time_out(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    """A caller that gives up does not free its slot while its request to the API server is still running."""
    api_server.delay = 0.6
    config = api_server.config(max_concurrency=2)
    async with serving(d, server_ca, token_review=config, request_timeout=timedelta(milliseconds=200)) as h:
        tokens = [review_token(api_server, k8s, f"sa{i}", ["meshca"]) for i in range(6)]
        calls = [h.native.IssueSVID(native_request(spiffe_csr()[1], jwt_token=t)) for t in tokens]
        codes = await asyncio.gather(*(code_of(c) for c in calls))
        assert set(codes) == {C.DEADLINE_EXCEEDED}
        assert len(h.events("request.timeout")) == len(tokens)
        await eventually(lambda: api_server.in_flight == 0, timeout=10, what="the API server to go idle")
        assert api_server.max_in_flight <= 2


async def test_the_cache_stays_bounded_while_every_answer_is_unexpired(
    k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    """Pruning the expired answers alone let the cache grow with every valid token; the oldest go first."""
    credential = TokenReviewCredential(api_server.config(), TrustDomain(TD), system_clock)
    credential.CACHE_SIZE = 4
    tokens = [review_token(api_server, k8s, f"web{n}", ["meshca"]) for n in range(7)]
    for token in tokens:
        await credential.review(token, ("meshca",))
    assert len(credential._cache) == 4
    await credential.review(tokens[-1], ("meshca",))  # the newest is still cached
    assert api_server.reviews_of(tokens[-1]) == 1
    await credential.review(tokens[0], ("meshca",))  # the oldest was dropped
    assert api_server.reviews_of(tokens[0]) == 2
