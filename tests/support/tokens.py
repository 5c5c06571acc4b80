"""Credentials: join tokens in a server's store, Kubernetes service-account JWTs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import meshca
import meshca.server
from meshca.pki._trustdir import TrustDir
from meshca.server import JoinToken, SqliteStore, hash_token, new_token, store_path

from .ids import K8S_ISSUER, WEB


def add_token(
    store: meshca.server.Store | Path,
    spiffe_id: meshca.SpiffeId = WEB,
    *,
    uses: int = 1,
    ttl: timedelta = timedelta(hours=1),
    now: datetime | None = None,
    agent: bool = False,
) -> str:
    """A new join token for ``spiffe_id``, added to ``store``: a store, or a trust directory (server running or not).

    ``agent``: a node agent's token (as ``meshca token create --agent`` makes), which may grant an agent ID.
    """
    token = new_token(agent=agent)
    record = JoinToken(hash_token(token), spiffe_id, (now or datetime.now(UTC)) + ttl, uses)
    if not isinstance(store, Path):
        store.add_token(record)
        return token
    opened = SqliteStore(store_path(TrustDir.at(store)))
    try:
        opened.add_token(record)
    finally:
        opened.close()
    return token


def workload_records(records: list[meshca.server.IssuanceRecord]) -> list[meshca.server.IssuanceRecord]:
    """The records of workload certificates: the server's own (api "self") left out."""
    return [r for r in records if r.api != "self"]


@dataclass
class K8sIssuer:
    """A cluster's service-account token signer and the JWKS file meshca verifies against."""

    key: Any
    kid: str = "k1"
    issuer: str = K8S_ISSUER

    @classmethod
    def make(cls, kind: str = "ec") -> K8sIssuer:
        key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
        return cls(key)

    @property
    def alg(self) -> str:
        return "RS256" if isinstance(self.key, rsa.RSAPrivateKey) else "ES256"

    def jwks(self) -> dict[str, Any]:
        public = self.key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(
        self,
        ns: str = "default",
        sa: str = "web",
        *,
        aud: str | Sequence[str] = "meshca",
        iss: str | None = None,
        now: datetime | None = None,
        lifetime: timedelta = timedelta(minutes=10),
        key: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = now or datetime.now(UTC)
        claims = {
            "iss": iss or self.issuer,
            "sub": f"system:serviceaccount:{ns}:{sa}",
            "aud": aud if isinstance(aud, str) else list(aud),
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int((now + lifetime).timestamp()),
            **(extra or {}),
        }
        return jwt.encode(claims, key or self.key, algorithm=self.alg, headers={"kid": self.kid})


def unsigned_jwt(claims: dict[str, Any]) -> str:
    """An ``alg: none`` token, which no verifier may accept."""
    return jwt.encode(claims, None, algorithm="none")


def k8s_config(issuer: K8sIssuer, directory: Path, audiences: tuple[str, ...] = ()) -> meshca.server.K8sJwtConfig:
    return meshca.server.K8sJwtConfig(issuer.write_jwks(directory / "jwks.json"), issuer.issuer, audiences)
