"""Kubernetes service-account JWTs, verified offline against a JWKS file."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import jwt

from meshca.pki._errors import AuthenticationError, InvalidSpiffeId, MeshcaError
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._time import Clock
from meshca.server._config import K8sJwtConfig
from meshca.server.credentials._base import Bearer, Presented, Principal, grant

__all__ = ["JWT_LEEWAY", "K8sJwtCredential", "is_jwt_form", "service_account_id"]

JWT_LEEWAY = timedelta(seconds=60)


def is_jwt_form(token: str) -> bool:
    """Three dot-separated parts: the compact JWS form, whatever is inside."""
    return token.count(".") == 2


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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class K8sJwtCredential:
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

    async def principal(self, presented: Presented) -> Principal | None:
        if not isinstance(presented, Bearer) or not is_jwt_form(token := presented.token.strip()):
            return None
        return self.verify(token, presented.audiences)

    def verify(self, token: str, audiences: tuple[str, ...]) -> Principal:
        with self._lock:
            self._load()
            keys = self._keys
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.PyJWTError:
            raise AuthenticationError("token is not a JWT", "malformed") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self._config.algorithms:
            raise AuthenticationError(f"JWT algorithm {alg!r} is not allowed", "jwt_algorithm")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("JWT key id is not a string", "malformed")
        if "crit" in header:  # no critical header extension is understood here (RFC 7515, 4.1.11)
            raise AuthenticationError("JWT has critical header extensions", "malformed")
        key = keys.get(kid) or (next(iter(keys.values())) if len(keys) == 1 else None)
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
        for claim in ("exp", "nbf", "iat"):
            if claim in claims and not _is_number(claims[claim]):
                raise AuthenticationError(f"JWT claim {claim!r} is not a number", "jwt_invalid")
        now = self._clock().timestamp()
        leeway = JWT_LEEWAY.total_seconds()
        if now > claims["exp"] + leeway:
            raise AuthenticationError("JWT expired", "jwt_expired")
        if "nbf" in claims and now < claims["nbf"] - leeway:
            raise AuthenticationError("JWT is not valid yet", "jwt_not_yet_valid")
        subject = str(claims["sub"])
        sid = service_account_id(self._trust_domain, subject)
        return grant("k8s-jwt", f"k8s:{subject.removeprefix('system:serviceaccount:')}", sid)
