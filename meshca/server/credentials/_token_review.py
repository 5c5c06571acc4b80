"""Kubernetes TokenReview against the API server, for clusters without a JWKS."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jwt

from meshca.pki._errors import AuthenticationError, CredentialCheckUnavailable
from meshca.pki._spiffe import TrustDomain
from meshca.pki._time import Clock
from meshca.server._config import TokenReviewConfig
from meshca.server._store import hash_token
from meshca.server.credentials._base import Bearer, Presented, Principal, grant
from meshca.server.credentials._k8s_jwt import is_jwt_form, service_account_id

__all__ = ["TokenReviewCredential"]


class TokenReviewCredential:
    """Asks the Kubernetes API server (TokenReview) with bounded concurrency; caches answers until token expiry."""

    CACHE_SIZE = 10_000  # answers kept; beyond, the expired and then the oldest are dropped

    def __init__(self, config: TokenReviewConfig, trust_domain: TrustDomain, clock: Clock) -> None:
        self._config = config
        self._trust_domain = trust_domain
        self._clock = clock
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._ssl = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)

    async def principal(self, presented: Presented) -> Principal | None:
        if not isinstance(presented, Bearer) or not is_jwt_form(token := presented.token.strip()):
            return None
        return await self.review(token, presented.audiences)

    async def review(self, token: str, audiences: tuple[str, ...]) -> Principal:
        # An answer holds only for the audiences it was asked about: a token
        # accepted for one API must not pass another API from the cache.
        key = hash_token(token) + "|" + ",".join(sorted(audiences))
        now = self._clock().timestamp()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        # The slot is held until the request to the API server ends, even when the caller gives
        # up first (request timeout): the thread cannot be cancelled, and the bound is on requests.
        await self._semaphore.acquire()
        review = asyncio.get_running_loop().run_in_executor(None, self._review, token, list(audiences))
        review.add_done_callback(self._release)
        status = await asyncio.shield(review)
        if not status.get("authenticated"):
            raise AuthenticationError(
                f"TokenReview refused the token: {status.get('error') or 'not authenticated'}", "tokenreview_refused"
            )
        # An empty status.audiences means "valid for the API server's own audience": not ours.
        if audiences and not set(status.get("audiences") or ()) & set(audiences):
            raise AuthenticationError("TokenReview audiences do not match", "tokenreview_audience")
        username = str((status.get("user") or {}).get("username", ""))
        sid = service_account_id(self._trust_domain, username)
        principal = grant("k8s-tokenreview", f"k8s:{username.removeprefix('system:serviceaccount:')}", sid)
        self._cache.pop(key, None)  # re-inserted last: the newest answer is the last to go
        self._cache[key] = (self._expiry(token, now), principal)
        if len(self._cache) > self.CACHE_SIZE:  # the expired first, then the oldest: every valid token is a new key
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            while len(self._cache) > self.CACHE_SIZE:
                del self._cache[next(iter(self._cache))]
        return principal

    def _release(self, review: asyncio.Future[dict[str, Any]]) -> None:
        self._semaphore.release()
        if not review.cancelled():
            review.exception()  # retrieved: a failure nobody waits for any more is not an unhandled error

    @staticmethod
    def _expiry(token: str, now: float) -> float:
        try:
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
        except jwt.exceptions.PyJWTError:
            return now  # no known expiry: do not cache
        return float(exp) if isinstance(exp, int | float) else now

    def _review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._config.token_file is not None:
            headers["Authorization"] = "Bearer " + Path(self._config.token_file).read_text().strip()
        url = self._config.api_url.rstrip("/") + "/apis/authentication.k8s.io/v1/tokenreviews"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(  # noqa: S310 - the URL is operator configuration
                request, timeout=self._config.timeout.total_seconds(), context=self._ssl
            ) as response:
                doc = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise CredentialCheckUnavailable(f"TokenReview request failed: {exc}", "tokenreview_unavailable") from exc
        status = doc.get("status") if isinstance(doc, dict) else None
        if not isinstance(status, dict):
            raise CredentialCheckUnavailable("TokenReview response has no status", "tokenreview_unavailable")
        return status
