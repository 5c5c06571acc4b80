"""Authenticators: who is asking, and which SPIFFE ID may they hold.

Each credential is verified by exactly one authenticator, configured
explicitly; a credential no enabled authenticator understands is refused.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt

from meshca.pki._errors import AuthenticationError, InvalidSpiffeId, MeshcaError
from meshca.pki._proof import SvidProof, verify_svid_proof
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._time import Clock
from meshca.pki._verify import BundleSource
from meshca.server._config import K8sJwtConfig, TokenReviewConfig
from meshca.server._store import TOKEN_PREFIX, JoinToken, Store, hash_token

__all__ = [
    "Authenticators",
    "CredentialCheckUnavailable",
    "JoinTokenAuthenticator",
    "K8sJwtAuthenticator",
    "Principal",
    "TokenReviewAuthenticator",
    "service_account_id",
]

JWT_LEEWAY = timedelta(seconds=60)


class CredentialCheckUnavailable(AuthenticationError):
    """The credential could not be checked now (the Kubernetes API is unreachable): retry, not refuse."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``name`` is safe to log; it never holds a secret."""

    kind: str
    name: str
    spiffe_id: SpiffeId
    token_hash: str | None = None  # a join token to consume with the issuance


def service_account_id(trust_domain: TrustDomain, subject: str) -> SpiffeId:
    """``system:serviceaccount:NS:SA`` -> ``spiffe://TD/ns/NS/sa/SA``."""
    parts = subject.split(":")
    if (
        len(parts) != 4
        or parts[:2] != ["system", "serviceaccount"]
        or not parts[2]
        or not parts[3]
        or "/" in parts[2] + parts[3]  # one path segment each, never more
    ):
        raise AuthenticationError("token subject is not a Kubernetes service account", "not_service_account")
    try:
        return trust_domain.spiffe_id(f"/ns/{parts[2]}/sa/{parts[3]}")
    except InvalidSpiffeId as exc:
        raise AuthenticationError(
            f"service account name cannot form a SPIFFE ID: {exc}", "not_service_account"
        ) from exc


class JoinTokenAuthenticator:
    """Join tokens from the store.

    A token row is cached for a second, so a burst from one multi-use token
    reads the database once. The cache can only be stale in one direction
    (uses left): the use is consumed in the issuance transaction, which fails
    when none is left, so a stale entry never yields a certificate.
    """

    CACHE_SECONDS = 1.0

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[str, tuple[float, JoinToken]] = {}

    def _lookup(self, token_hash: str) -> JoinToken | None:
        now = time.monotonic()
        cached = self._cache.get(token_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = self._store.get_token(token_hash)
        if found is not None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[token_hash] = (now + self.CACHE_SECONDS, found)
        return found

    def authenticate(self, token: str) -> Principal:
        token_hash = hash_token(token)
        found = self._lookup(token_hash)
        if found is None:
            raise AuthenticationError("unknown join token", "unknown_token")
        if found.expires_at <= self._clock():
            raise AuthenticationError("join token expired", "token_expired")
        if found.uses_left <= 0:
            raise AuthenticationError("join token has no use left", "token_used_up")
        return Principal("join-token", f"join-token:{token_hash[:12]}", found.spiffe_id, token_hash)


class K8sJwtAuthenticator:
    """Verifies service-account JWTs offline: signature, algorithm, issuer, audience, expiry, not-before.

    The JWKS file is re-read when it changes, so key rotation needs no restart.
    Times are checked against the injected clock, not PyJWT's.
    """

    def __init__(self, config: K8sJwtConfig, trust_domain: TrustDomain, clock: Clock) -> None:
        self._config = config
        self._trust_domain = trust_domain
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._load()

    def _load(self) -> None:
        path = self._config.jwks_path
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            jwks = jwt.PyJWKSet.from_json(path.read_text())
        except (OSError, jwt.exceptions.PyJWKSetError, ValueError) as exc:
            if self._stamp is None:
                raise MeshcaError(f"cannot load JWKS {path}: {exc}") from exc
            return  # keep the last good key set
        self._keys = {k.key_id: k for k in jwks.keys}
        self._stamp = stamp

    def authenticate(self, token: str, audiences: Collection[str]) -> Principal:
        with self._lock:
            self._load()
            keys = self._keys
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.DecodeError:
            raise AuthenticationError("token is not a JWT", "malformed") from None
        alg = header.get("alg")
        if alg not in self._config.algorithms:
            raise AuthenticationError(f"JWT algorithm {alg!r} is not allowed", "jwt_algorithm")
        key = keys.get(header.get("kid")) or (next(iter(keys.values())) if len(keys) == 1 else None)
        if key is None:
            raise AuthenticationError("JWT key id is not in the JWKS", "jwt_unknown_key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(audiences),
                issuer=self._config.issuer,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "require": ["exp", "sub"]},
            )
        except jwt.exceptions.InvalidAudienceError:
            raise AuthenticationError("JWT audience is not accepted here", "jwt_audience") from None
        except jwt.exceptions.InvalidIssuerError:
            raise AuthenticationError("JWT issuer is not the configured one", "jwt_issuer") from None
        except jwt.exceptions.InvalidSignatureError:
            raise AuthenticationError("JWT signature does not verify", "jwt_signature") from None
        except jwt.exceptions.PyJWTError as exc:
            raise AuthenticationError(f"JWT is invalid: {exc}", "jwt_invalid") from None
        now = self._clock().timestamp()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float) or now > exp + JWT_LEEWAY.total_seconds():
            raise AuthenticationError("JWT expired", "jwt_expired")
        if isinstance(nbf, int | float) and now < nbf - JWT_LEEWAY.total_seconds():
            raise AuthenticationError("JWT is not valid yet", "jwt_not_yet_valid")
        subject = str(claims["sub"])
        sid = service_account_id(self._trust_domain, subject)
        return Principal("k8s-jwt", f"k8s:{subject.removeprefix('system:serviceaccount:')}", sid)


class TokenReviewAuthenticator:
    """Asks the Kubernetes API server (TokenReview) with bounded concurrency; caches answers until token expiry."""

    def __init__(self, config: TokenReviewConfig, trust_domain: TrustDomain, clock: Clock) -> None:
        self._config = config
        self._trust_domain = trust_domain
        self._clock = clock
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._ssl = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)

    async def authenticate(self, token: str, audiences: Collection[str]) -> Principal:
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
        principal = Principal("k8s-tokenreview", f"k8s:{username.removeprefix('system:serviceaccount:')}", sid)
        self._cache[key] = (self._expiry(token, now), principal)
        if len(self._cache) > 10_000:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
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


class Authenticators:
    """The enabled authenticators, and which one a credential goes to."""

    def __init__(
        self,
        join_tokens: JoinTokenAuthenticator,
        k8s_jwt: K8sJwtAuthenticator | None = None,
        token_review: TokenReviewAuthenticator | None = None,
        *,
        clock: Clock,
    ) -> None:
        self.join_tokens = join_tokens
        self.k8s_jwt = k8s_jwt
        self.token_review = token_review
        self._clock = clock

    async def bearer(self, token: str, audiences: Collection[str]) -> Principal:
        """A join token or a service-account JWT, told apart by form."""
        token = token.strip()
        if not token:
            raise AuthenticationError("no credential", "missing")
        if token.startswith(TOKEN_PREFIX):
            return self.join_tokens.authenticate(token)
        if token.count(".") == 2:
            if self.k8s_jwt is not None:
                return self.k8s_jwt.authenticate(token, audiences)
            if self.token_review is not None:
                return await self.token_review.authenticate(token, audiences)
            raise AuthenticationError("JWT credentials are not enabled on this server", "jwt_disabled")
        raise AuthenticationError("credential is neither a join token nor a JWT", "malformed")

    def svid(self, proof: SvidProof, csr_der: bytes, bundles: BundleSource) -> Principal:
        sid = verify_svid_proof(proof, csr_der, bundles, now=self._clock())
        return Principal("svid", f"svid:{sid}", sid)
