"""Trust bundles: the anchors of one trust domain, as PEM or SPIFFE bundle JSON."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.verification import Store

from meshca.pki._certs import certificates_pem, fingerprint, is_signing_certificate, load_certificates, spiffe_ids_of
from meshca.pki._errors import BundleError
from meshca.pki._spiffe import TrustDomain

__all__ = ["TrustBundle"]

_SHA256 = hashes.SHA256()
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_CURVES_BY_JWK = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_int(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwk_params(cert: x509.Certificate) -> dict[str, str]:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        size = (key.curve.key_size + 7) // 8
        nums = key.public_numbers()
        return {
            "kty": "EC",
            "crv": _CURVE_NAMES[key.curve.name],
            "x": _b64url(nums.x.to_bytes(size, "big")),
            "y": _b64url(nums.y.to_bytes(size, "big")),
        }
    if isinstance(key, rsa.RSAPublicKey):
        rnums = key.public_numbers()
        return {"kty": "RSA", "n": _b64url_int(rnums.n), "e": _b64url_int(rnums.e)}
    raise BundleError(f"anchor key type {type(key).__name__} has no JWK form here")


def _check_jwk_matches(entry: dict[str, Any], cert: x509.Certificate) -> None:
    """If the JWK carries key parameters, they must be the certificate's key."""
    kty = entry.get("kty")
    key = cert.public_key()
    try:
        if kty == "EC" and "x" in entry:
            jwk_key: object = ec.EllipticCurvePublicNumbers(
                int.from_bytes(_unb64url(entry["x"]), "big"),
                int.from_bytes(_unb64url(entry["y"]), "big"),
                _CURVES_BY_JWK[entry["crv"]],
            ).public_key()
        elif kty == "RSA" and "n" in entry:
            jwk_key = rsa.RSAPublicNumbers(
                int.from_bytes(_unb64url(entry["e"]), "big"), int.from_bytes(_unb64url(entry["n"]), "big")
            ).public_key()
        else:
            return
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"x509-svid key has malformed {kty} parameters") from exc
    if jwk_key != key:
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
                cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
            except ValueError as exc:
                raise BundleError("x5c entry is not a base64 DER certificate") from exc
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

    def to_spiffe_json(self) -> bytes:
        keys = [
            {
                "use": "x509-svid",
                **_jwk_params(cert),
                "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
            }
            for cert in self.anchors
        ]
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
