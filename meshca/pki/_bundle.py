"""Trust bundles: the anchors of one trust domain, as PEM or SPIFFE bundle JSON."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.verification import Store
from jwt import PyJWK, PyJWTError
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from meshca.pki._certs import certificates_pem, fingerprint, is_signing_certificate, load_certificates, spiffe_ids_of
from meshca.pki._errors import BundleError
from meshca.pki._spiffe import TrustDomain

__all__ = ["TrustBundle"]

_SHA256 = hashes.SHA256()
_JWK_PARAMS = ("kty", "crv", "x", "y", "n", "e")  # the public key members meshca writes and checks


def _jwk_params(cert: x509.Certificate) -> dict[str, str]:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        raise BundleError(f"anchor key type {type(key).__name__} has no JWK form here")
    return {name: jwk[name] for name in _JWK_PARAMS if name in jwk}


def _check_jwk_matches(entry: dict[str, Any], cert: x509.Certificate) -> None:
    """If the JWK carries key parameters, they must be the certificate's key."""
    kty = entry.get("kty")
    if not (kty == "EC" and "x" in entry) and not (kty == "RSA" and "n" in entry):
        return
    try:
        jwk_key = PyJWK({name: entry[name] for name in _JWK_PARAMS if name in entry}).key
    except (PyJWTError, KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"x509-svid key has malformed {kty} parameters") from exc
    if jwk_key != cert.public_key():
        raise BundleError("x509-svid key parameters do not match the certificate in x5c")


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The X.509 trust anchors of one trust domain (several while rotating).

    ``sequence`` grows by one with every change; ``refresh_hint`` tells
    consumers how often to poll. Immutable: `with_anchor` and
    `without_anchor` return new bundles.
    """

    trust_domain: TrustDomain
    anchors: tuple[x509.Certificate, ...]
    sequence: int = 0
    refresh_hint: timedelta | None = None
    _store: Store = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise BundleError("trust_domain must be a TrustDomain")
        if not self.anchors:
            raise BundleError(f"trust bundle for {self.trust_domain} has no anchors")
        seen: dict[bytes, x509.Certificate] = {}
        for cert in self.anchors:
            if not is_signing_certificate(cert):
                raise BundleError(f"bundle certificate {fingerprint(cert)} is not a CA (needs CA true and keyCertSign)")
            for sid in spiffe_ids_of(cert):
                if sid.trust_domain != self.trust_domain:
                    raise BundleError(
                        f"bundle certificate {fingerprint(cert)} names trust domain {sid.trust_domain}, "
                        f"not {self.trust_domain}"
                    )
            seen.setdefault(cert.fingerprint(_SHA256), cert)
        object.__setattr__(self, "anchors", tuple(seen.values()))
        if self.sequence < 0:
            raise BundleError("sequence must not be negative")
        object.__setattr__(self, "_store", Store(list(self.anchors)))

    # -- PEM

    @classmethod
    def from_pem(cls, data: bytes | str, trust_domain: TrustDomain | None = None) -> TrustBundle:
        """Reads concatenated PEM anchors. Without ``trust_domain`` the anchors must name it in a URI SAN."""
        try:
            certs = load_certificates(data.encode() if isinstance(data, str) else data)
        except ValueError as exc:
            raise BundleError(f"cannot read trust bundle: {exc}") from exc
        if trust_domain is None:
            named = {sid.trust_domain for cert in certs for sid in spiffe_ids_of(cert)}
            if len(named) != 1:
                reason = "names no trust domain" if not named else "names several trust domains"
                raise BundleError(f"PEM bundle {reason}; give the trust domain explicitly")
            trust_domain = named.pop()
        return cls(trust_domain, tuple(certs))

    def to_pem(self) -> bytes:
        return certificates_pem(self.anchors)

    # -- SPIFFE bundle JSON (a JWK set)

    @classmethod
    def from_spiffe_json(cls, data: bytes | str, trust_domain: TrustDomain) -> TrustBundle:
        """Reads a SPIFFE trust domain bundle. Keys of other uses (``jwt-svid``) are skipped."""
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise BundleError(f"SPIFFE bundle is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise BundleError("SPIFFE bundle must be a JSON object with a 'keys' array")
        anchors = []
        for entry in doc["keys"]:
            if not isinstance(entry, dict) or entry.get("use") != "x509-svid":
                continue
            x5c = entry.get("x5c")
            if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
                raise BundleError("an x509-svid key must have an x5c of exactly one certificate")
            try:
                cert = load_certificates([base64.b64decode(x5c[0], validate=True)])[0]
            except ValueError as exc:
                raise BundleError(f"x5c entry is not a base64 DER certificate: {exc}") from exc
            _check_jwk_matches(entry, cert)
            anchors.append(cert)
        sequence = doc.get("spiffe_sequence", 0)
        hint = doc.get("spiffe_refresh_hint")
        if not isinstance(sequence, int) or isinstance(sequence, bool):
            raise BundleError("spiffe_sequence must be an integer")
        if hint is not None and (not isinstance(hint, int) or isinstance(hint, bool) or hint < 0):
            raise BundleError("spiffe_refresh_hint must be a non-negative integer")
        refresh = timedelta(seconds=hint) if hint is not None else None
        return cls(trust_domain, tuple(anchors), sequence, refresh)

    def to_spiffe_json(self, jwt_keys: Sequence[Mapping[str, Any]] = ()) -> bytes:
        """The SPIFFE bundle; ``jwt_keys`` (public JWKs with ``kid``, ``use: jwt-svid``) follow the x509-svid keys."""
        keys: list[Mapping[str, Any]] = [
            {
                "use": "x509-svid",
                **_jwk_params(cert),
                "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
            }
            for cert in self.anchors
        ]
        for jwk in jwt_keys:
            if jwk.get("use") != "jwt-svid" or not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
                raise BundleError("a jwt-svid key needs 'use': 'jwt-svid' and a 'kid'")
            keys.append(jwk)
        doc: dict[str, Any] = {"keys": keys, "spiffe_sequence": self.sequence}
        if self.refresh_hint is not None:
            doc["spiffe_refresh_hint"] = int(self.refresh_hint.total_seconds())
        return json.dumps(doc, indent=2).encode() + b"\n"

    # -- changes

    def with_anchor(self, cert: x509.Certificate) -> TrustBundle:
        """A bundle that also trusts ``cert``, with the next sequence number."""
        return TrustBundle(self.trust_domain, (*self.anchors, cert), self.sequence + 1, self.refresh_hint)

    def without_anchor(self, cert: x509.Certificate) -> TrustBundle:
        """A bundle that no longer trusts ``cert``, with the next sequence number."""
        kept = tuple(a for a in self.anchors if a != cert)
        if len(kept) == len(self.anchors):
            raise BundleError(f"certificate {fingerprint(cert)} is not in the bundle")
        return TrustBundle(self.trust_domain, kept, self.sequence + 1, self.refresh_hint)

    def __contains__(self, cert: object) -> bool:
        return cert in self.anchors

    @property
    def store(self) -> Store:
        """The anchors as a cryptography verification `Store`, built once."""
        return self._store
