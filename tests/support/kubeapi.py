"""A local HTTPS stand-in for the Kubernetes API server's TokenReview endpoint."""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from meshca.server import TokenReviewConfig
from meshca.testing import TestCA

from .tokens import K8sIssuer

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


def review_token(fake: FakeApiServer, signer: K8sIssuer, sa: str, audiences: list[str], **kwargs: Any) -> str:
    """A JWT-shaped token the fake API server knows; meshca reads only its ``exp``."""
    token = signer.token("default", sa, aud=audiences, **kwargs)
    fake.tokens[token] = (f"system:serviceaccount:default:{sa}", audiences)
    return token
