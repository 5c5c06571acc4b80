"""The issuer: an intermediate CA key that signs X.509-SVIDs.

An `Issuer` is checked once when it is made (key matches certificate, it is
a CA, it chains to the bundle) and its time window is checked on every
signature, so an expired or not-yet-valid issuer fails closed. Everything
that does not change between leaves (AKI, names, the chain's DER) is
computed once here, and leaves are encoded from a template checked against
cryptography's builder (`pki/_template.py`), which keeps the per-leaf cost
close to one signature.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import (
    certificates_pem,
    fingerprint,
    is_signing_certificate,
    load_certificates,
    subject_key_identifier,
)
from meshca.pki._custody import SigningKey, as_signer, load_signing_key, sign_certificate
from meshca.pki._errors import IssuanceError, IssuerUnavailable, KeyPolicyError
from meshca.pki._keys import PublicKey, key_type_of, signature_hash
from meshca.pki._profiles import LEAF_TTL, leaf_builder, leaf_fields
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._template import LeafTemplate

__all__ = ["IssuedSvid", "Issuer"]

_DER = serialization.Encoding.DER


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    """A freshly signed leaf and the intermediates that lead to the bundle (issuer first, no anchor)."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    intermediates_der: tuple[bytes, ...]
    _leaf_der: bytes = field(default=b"", repr=False, compare=False)

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    def leaf_der(self) -> bytes:
        return self._leaf_der or self.leaf.public_bytes(_DER)

    def chain_der(self) -> list[bytes]:
        return [self.leaf_der(), *self.intermediates_der]

    def chain_pem(self) -> bytes:
        return certificates_pem([self.leaf, *self.intermediates])


class Issuer:
    """Signs X.509-SVIDs for one trust domain with one issuer key.

    ``chain`` is the issuer certificate followed by any further intermediates
    up to (not including) an anchor of ``bundle``.
    """

    __slots__ = (
        "_aki",
        "_hash",
        "_intermediates_der",
        "_key",
        "_not_after",
        "_not_before",
        "_template",
        "anchor",
        "bundle",
        "certificate",
        "intermediates",
    )

    def __init__(self, chain: Sequence[x509.Certificate], key: SigningKey, bundle: TrustBundle) -> None:
        """``key`` is a cryptography private key or any `Signer` (a key on a PKCS#11 token)."""
        if not chain:
            raise IssuerUnavailable("issuer chain is empty")
        certificate = chain[0]
        public_key = as_signer(key).public_key()
        key_type_of(public_key)
        if public_key != certificate.public_key():
            raise IssuerUnavailable("issuer key does not match the issuer certificate")
        for cert in chain:
            if not is_signing_certificate(cert):
                raise IssuerUnavailable(f"certificate {fingerprint(cert)} in the issuer chain is not a CA")
        self._check_chains_to(chain, bundle)
        self.certificate = certificate
        self.intermediates = tuple(chain)
        self.bundle = bundle
        self._key = key
        self._hash = signature_hash(public_key)
        self._intermediates_der = tuple(c.public_bytes(_DER) for c in chain)
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_identifier(certificate))
        # A leaf must never outlive anything in its chain, the anchor included.
        self.anchor = anchor = self._anchor_of(chain[-1], bundle)
        self._not_after = min(c.not_valid_after_utc for c in (*chain, anchor))
        self._not_before = max(c.not_valid_before_utc for c in (*chain, anchor))
        self._template = LeafTemplate.make(key, certificate.subject, bundle.trust_domain, self._aki, self._not_before)

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, bundle: TrustBundle, passphrase: bytes | None = None) -> Issuer:
        """``key_pem`` may also be a PKCS#11 URI (what `DIR/issuer.key.uri` holds): the token is opened now."""
        try:
            chain = load_certificates(chain_pem)
        except ValueError as exc:
            raise IssuerUnavailable(f"issuer certificate cannot be read: {exc}") from exc
        try:
            key = load_signing_key(key_pem, passphrase)
        except KeyPolicyError as exc:
            raise IssuerUnavailable(f"issuer key: {exc}") from exc
        return cls(chain, key, bundle)

    @staticmethod
    def _anchor_of(cert: x509.Certificate, bundle: TrustBundle) -> x509.Certificate:
        for anchor in bundle.anchors:
            if anchor.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(anchor)
            except (InvalidSignature, ValueError, TypeError):
                continue
            return anchor
        raise IssuerUnavailable(
            f"issuer certificate {fingerprint(cert)} does not chain to any anchor of {bundle.trust_domain}"
        )

    @classmethod
    def _check_chains_to(cls, chain: Sequence[x509.Certificate], bundle: TrustBundle) -> None:
        for child, parent in itertools.pairwise(chain):
            try:
                child.verify_directly_issued_by(parent)
            except (InvalidSignature, ValueError, TypeError) as exc:
                raise IssuerUnavailable(
                    f"issuer chain is out of order: {fingerprint(child)} is not signed by {fingerprint(parent)}"
                ) from exc
        cls._anchor_of(chain[-1], bundle)

    @property
    def trust_domain(self) -> TrustDomain:
        return self.bundle.trust_domain

    @property
    def not_after(self) -> datetime:
        """The latest moment a leaf may be valid: the earliest NotAfter in the chain."""
        return self._not_after

    @property
    def not_before(self) -> datetime:
        return self._not_before

    def check(self, now: datetime) -> None:
        """Raises `IssuerUnavailable` unless every certificate up to the anchor is valid at ``now``."""
        if now < self._not_before:
            raise IssuerUnavailable(f"issuer is not valid before {self._not_before:%Y-%m-%dT%H:%M:%SZ}")
        if now >= self._not_after:
            raise IssuerUnavailable(f"issuer chain expired at {self._not_after:%Y-%m-%dT%H:%M:%SZ}")

    def sign(
        self,
        public_key: PublicKey,
        spiffe_id: SpiffeId,
        *,
        now: datetime,
        ttl: timedelta = LEAF_TTL,
        dns_names: Sequence[str] = (),
    ) -> IssuedSvid:
        """Signs a leaf for ``spiffe_id``; NotAfter is clamped to the chain, NotBefore backdated by the skew."""
        self.check(now)
        if spiffe_id.trust_domain != self.bundle.trust_domain:
            raise IssuanceError(f"{spiffe_id} is not in this issuer's trust domain {self.bundle.trust_domain}")
        if not spiffe_id.path:
            raise IssuanceError("an X.509-SVID needs a SPIFFE ID with a path")
        if ttl <= timedelta():
            raise IssuanceError("ttl must be positive")
        key_type_of(public_key)  # only the key types meshca supports become leaves
        ttl = min(ttl, self._not_after - now)  # clamp before adding, so no lifetime overflows
        fields = leaf_fields(
            public_key,
            spiffe_id,
            dns_names,
            self._aki,
            now=now,
            not_after=now + ttl,
            not_before_floor=self._not_before,
        )
        if self._template is not None:
            der = self._template.sign(fields, public_key)
            leaf = x509.load_der_x509_certificate(der)
        else:
            leaf = sign_certificate(leaf_builder(self.certificate.subject, public_key, fields), self._key)
            der = leaf.public_bytes(_DER)
        return IssuedSvid(spiffe_id, leaf, self.intermediates, self._intermediates_der, der)

    def __repr__(self) -> str:
        short = fingerprint(self.certificate)[:23]
        return f"Issuer({self.bundle.trust_domain}, {short}, until {self._not_after:%Y-%m-%d})"
