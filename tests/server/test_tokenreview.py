"""TokenReview against a local HTTPS stand-in for the Kubernetes API server."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshca.server import TokenReviewConfig
from meshca.testing import TestCA

from .harness import (
    API,
    LINKERD_WEB,
    WEB,
    K8sIssuer,
    bearer,
    cert,
    code_of,
    ipb,
    linkerd_csr,
    lpb,
    native_request,
    serving,
    spiffe_csr,
    to_pem,
    uris,
)

C = grpc.StatusCode
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
MESHCA_API_TOKEN = "meshca-reviewer-token"


class FakeApiServer:
    """Answers TokenReviews for the tokens it knows, honouring audiences like the real API server."""

    def __init__(self, ca: TestCA, directory: Path) -> None:
        self.tokens: dict[str, tuple[str, list[str]]] = {}  # token -> (username, audiences)
        self.delay = 0.0
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.bad_auth = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with fake._lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    with fake._lock:
                        fake.requests.append(body)
                    if self.path != REVIEW_PATH or self.headers.get("Authorization") != f"Bearer {MESHCA_API_TOKEN}":
                        fake.bad_auth += 1
                        self._reply(401, {"kind": "Status", "code": 401})
                        return
                    time.sleep(fake.delay)
                    self._reply(201, {**body, "status": fake.review(body["spec"])})
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _reply(self, code: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        svid = ca.issue_svid("spiffe://example.org/kube-apiserver", dns_names=["localhost"])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        svid.configure_cert(context)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.url = f"https://localhost:{self._httpd.server_address[1]}"
        self.ca_file = directory / "k8s-ca.pem"
        self.ca_file.write_bytes(ca.bundle.to_pem())
        self.token_file = directory / "k8s-token"
        self.token_file.write_text(MESHCA_API_TOKEN + "\n")
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def review(self, spec: dict[str, Any]) -> dict[str, Any]:
        found = self.tokens.get(spec["token"])
        if found is None:
            return {"authenticated": False, "error": "invalid bearer token"}
        username, token_audiences = found
        wanted = spec.get("audiences") or ["kubernetes"]
        common = [a for a in wanted if a in token_audiences]
        if not common:
            return {"authenticated": False, "error": "token audiences do not match"}
        return {"authenticated": True, "user": {"username": username, "uid": "1234"}, "audiences": common}

    def reviews_of(self, token: str) -> int:
        return sum(r["spec"]["token"] == token for r in self.requests)

    def config(self, **kwargs: Any) -> TokenReviewConfig:
        return TokenReviewConfig(self.url, self.ca_file, self.token_file, **kwargs)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def api_server(server_ca: TestCA, tmp_path: Path) -> Iterator[FakeApiServer]:
    fake = FakeApiServer(server_ca, tmp_path)
    yield fake
    fake.close()


def _token(fake: FakeApiServer, signer: K8sIssuer, sa: str, audiences: list[str], **kwargs: Any) -> str:
    """A JWT-shaped token the fake API server knows; meshca reads only its ``exp``."""
    token = signer.token("default", sa, aud=audiences, **kwargs)
    fake.tokens[token] = (f"system:serviceaccount:default:{sa}", audiences)
    return token


async def test_issuance_via_tokenreview_is_cached(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    async with serving(d, server_ca, token_review=api_server.config()) as h:
        token = _token(api_server, k8s, "web", ["meshca"])
        for _ in range(3):
            response = await h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token))
            assert uris(cert(response.leaf)) == [str(WEB)]
        assert api_server.reviews_of(token) == 1
        [review] = api_server.requests
        assert review["kind"] == "TokenReview"
        assert review["apiVersion"] == "authentication.k8s.io/v1"
        assert "meshca" in review["spec"]["audiences"]
        assert api_server.bad_auth == 0
        assert {r.principal for r in h.server.store.issuances()} == {"k8s:default:web"}


async def test_cached_answer_expires_with_the_token(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    async with serving(d, server_ca, token_review=api_server.config()) as h:
        token = _token(api_server, k8s, "web", ["meshca"], lifetime=timedelta(minutes=5))
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token))) == C.OK
        h.clock.advance(timedelta(minutes=6))
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token))) == C.OK
        assert api_server.reviews_of(token) == 2


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
        assert h.server.store.issuances() == []


async def test_audience_is_part_of_the_cached_answer(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    """A token the API server accepted for Istio must not then pass on Linkerd from the cache."""
    async with serving(d, server_ca, token_review=api_server.config()) as h:
        token = _token(api_server, k8s, "web", ["istio-ca"])
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
        tokens = [_token(api_server, k8s, sa, ["meshca"]) for sa in sas]
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
        assert code == C.UNAUTHENTICATED
        assert [e["reason"] for e in h.events("auth.failed")] == ["tokenreview_unavailable"]
