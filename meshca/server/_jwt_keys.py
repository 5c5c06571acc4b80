"""JWT-SVID signing keys: generated in memory, published through the store, rotated (docs/architecture.md, JWT keys).

Each serving process (each replica, each worker) holds its own ES256 (P-256)
key, never written anywhere, and publishes the public half in the store's
``jwt_keys`` with a ``not_after``; the Agent API's Sync returns every
published key that has not passed it, so a token signed by any replica
validates everywhere.

The rotation rules are pure (`RotationPolicy`, `KeyWindow`):

- a key signs during its window ``[signs_from, signs_until)``
  (`RotationPolicy.sign_for`, 24 hours);
- its successor is published ``publish_ahead`` (10 minutes) before it
  signs, so every agent that syncs at least that often knows a key before
  any token it signed arrives. A successor made late (the process was
  stopped or stalled, even past the current key's window) still waits
  ``publish_ahead``: the current key signs on until then, and its
  publication is extended (published again) to match;
- a key stays published until the last token it signed has expired:
  ``signs_until + max_token_ttl + CLOCK_SKEW``;
- the first key of a process signs at once: nothing older is held, and
  agents pick it up at their next sync.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from meshca.pki._errors import IssuanceError
from meshca.pki._profiles import CLOCK_SKEW
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock
from meshca.server._entries import MAX_JWT_TTL
from meshca.server._store import JwtPublicKey, Store

__all__ = ["CLOCK_SKEW", "JWT_KEY_USE", "JwtKeyring", "KeyWindow", "RotationPolicy", "jwk_thumbprint", "jwks"]

log = structlog.get_logger("meshca.server")

JWT_KEY_USE = "jwt-svid"


@dataclass(frozen=True, slots=True)
class KeyWindow:
    """When one key signs."""

    signs_from: datetime
    signs_until: datetime

    def signs_at(self, now: datetime) -> bool:
        return self.signs_from <= now < self.signs_until


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    sign_for: timedelta = timedelta(hours=24)
    publish_ahead: timedelta = timedelta(minutes=10)
    max_token_ttl: timedelta = MAX_JWT_TTL

    def __post_init__(self) -> None:
        if not timedelta() < self.publish_ahead < self.sign_for or self.max_token_ttl <= timedelta():
            raise ValueError("JWT key rotation needs 0 < publish_ahead < sign_for and a positive max_token_ttl")

    def first(self, now: datetime) -> KeyWindow:
        return KeyWindow(now, now + self.sign_for)

    def successor_due(self, current: KeyWindow, now: datetime) -> bool:
        return now >= current.signs_until - self.publish_ahead

    def successor(self, current: KeyWindow, now: datetime) -> tuple[KeyWindow, KeyWindow]:
        """(the current window, extended if the successor is late; the successor's), for a successor made at ``now``."""
        starts = max(current.signs_until, now + self.publish_ahead)
        return KeyWindow(current.signs_from, starts), KeyWindow(starts, starts + self.sign_for)

    def published_until(self, window: KeyWindow) -> datetime:
        """Until when a key must stay published: its last token's expiry, plus clock skew."""
        return window.signs_until + self.max_token_ttl + CLOCK_SKEW


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 thumbprint of an EC public JWK, base64url: the key's ``kid``."""
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def jwks(keys: Sequence[JwtPublicKey]) -> dict[str, Any]:
    """A JWK set (RFC 7517) of published keys."""
    return {"keys": [json.loads(k.jwk) for k in keys]}


@dataclass(frozen=True, slots=True)
class _Held:
    kid: str
    key: ec.EllipticCurvePrivateKey
    jwk: str
    window: KeyWindow


class JwtKeyring:
    """The private JWT-SVID keys of one serving process and their publication.

    `maintain` (blocking: it writes the store) makes and publishes keys as the
    rules say; the server calls it at start and on its reload loop. `sign` signs
    with the key whose window holds now.
    """

    def __init__(self, store: Store, clock: Clock, policy: RotationPolicy | None = None) -> None:
        self._store = store
        self._clock = clock
        self.policy = policy or RotationPolicy()
        self.writer = secrets.token_hex(8)
        self._held: list[_Held] = []
        self._lock = threading.Lock()

    def maintain(self) -> None:
        """Publishes a first key, or the next one when due; forgets private keys that no longer sign."""
        now = self._clock()
        with self._lock:
            # A superseded key whose window ended signs no more; the newest is kept even then (see `successor`).
            self._held = [h for h in self._held[:-1] if h.window.signs_until > now] + self._held[-1:]
            if not self._held:
                self._held = [self._publish(self.policy.first(now), now)]
                return
            current = self._held[-1]
            if not self.policy.successor_due(current.window, now):
                return
            extended, window = self.policy.successor(current.window, now)
            successor = self._publish(window, now)
            if extended != current.window:  # late: the current key signs on, and stays published to match
                current = self._republish(current, extended, now)
            self._held = [*self._held[:-1], current, successor]

    def _publish(self, window: KeyWindow, now: datetime) -> _Held:
        key = ec.generate_private_key(ec.SECP256R1())
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        kid = jwk_thumbprint(jwk)
        public = json.dumps(
            {"kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"], "y": jwk["y"], "kid": kid, "use": JWT_KEY_USE}
        )
        held = _Held(kid, key, public, window)
        self._record(held, now)
        log.info(
            "jwt_key.published",
            kid=kid,
            signs_from=window.signs_from.isoformat(),
            signs_until=window.signs_until.isoformat(),
        )
        return held

    def _republish(self, held: _Held, window: KeyWindow, now: datetime) -> _Held:
        extended = _Held(held.kid, held.key, held.jwk, window)
        self._record(extended, now)
        log.warning("jwt_key.extended", kid=held.kid, signs_until=window.signs_until.isoformat())
        return extended

    def _record(self, held: _Held, now: datetime) -> None:
        self._store.publish_jwt_key(
            JwtPublicKey(held.kid, self.writer, held.jwk, self.policy.published_until(held.window), now)
        )

    def published(self) -> list[JwtPublicKey]:
        """Every key any replica published that is still valid (blocking: reads the store)."""
        return self._store.jwt_keys(self._clock())

    def sign(self, subject: SpiffeId, audience: Sequence[str], ttl: timedelta) -> tuple[str, datetime]:
        """A JWT-SVID (compact JWS) and its expiry. ``ttl`` is at most the policy's ``max_token_ttl``."""
        if not timedelta() < ttl <= self.policy.max_token_ttl:
            raise ValueError("JWT-SVID lifetime out of range")
        now = self._clock()
        with self._lock:
            held = next((h for h in reversed(self._held) if h.window.signs_at(now)), None)
        if held is None:
            self.maintain()  # nothing signs yet (or the reload loop stalled): the first key signs at once
            with self._lock:
                held = next((h for h in reversed(self._held) if h.window.signs_at(now)), None)
        if held is None:
            raise IssuanceError("no JWT signing key is ready")
        issued_at = int(now.timestamp())
        expires = issued_at + int(ttl.total_seconds())
        claims = {"sub": str(subject), "aud": list(audience), "exp": expires, "iat": issued_at}
        token = jwt.encode(claims, held.key, algorithm="ES256", headers={"kid": held.kid, "typ": "JWT"})
        return token, datetime.fromtimestamp(expires, now.tzinfo)
