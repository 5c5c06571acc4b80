"""Certificate profiles: trust anchor, issuer, and workload leaf (X.509-SVID).

The defaults are the profile table in docs/architecture.md. Every builder takes the time it
builds at; none reads a clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshca.pki._certs import subject_key_identifier
from meshca.pki._custody import SigningKey, as_signer, sign_certificate
from meshca.pki._keys import KeyType, PublicKey, generate_key
from meshca.pki._spiffe import SpiffeId, TrustDomain

__all__ = [
    "ANCHOR_LIFETIME",
    "CLOCK_SKEW",
    "ISSUER_LIFETIME",
    "LEAF_TTL",
    "build_anchor",
    "LeafFields",
    "build_issuer",
    "leaf_builder",
    "leaf_fields",
    "new_trust_domain",
    "random_serial",
]

ANCHOR_LIFETIME = timedelta(days=3650)
ISSUER_LIFETIME = timedelta(days=365)
LEAF_TTL = timedelta(hours=24)
CLOCK_SKEW = timedelta(seconds=60)
"""How far NotBefore is backdated, so a peer whose clock lags still accepts a new certificate."""

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _leaf_key_usage(rsa_key: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def random_serial() -> int:
    """A random positive serial of 127 bits (RFC 5280 allows up to 20 octets)."""
    return secrets.randbits(127) | (1 << 126)


def _ca_subject(trust_domain: TrustDomain, role: str) -> x509.Name:
    # A serial in the subject keeps two anchors (or issuers) of one trust
    # domain apart during rotation, so path building never confuses them.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain.name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshca {role}"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8)),
        ]
    )


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    trust_domain: TrustDomain,
    not_before: datetime,
    not_after: datetime,
    path_length: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]), critical=False
        )
    )


def build_anchor(
    key: SigningKey,
    trust_domain: TrustDomain,
    *,
    now: datetime,
    lifetime: timedelta = ANCHOR_LIFETIME,
) -> x509.Certificate:
    """A self-signed trust anchor for ``trust_domain`` (CA, pathlen 1, URI SAN ``spiffe://td``)."""
    subject = _ca_subject(trust_domain, "trust anchor")
    public_key = as_signer(key).public_key()
    return sign_certificate(
        _ca_builder(subject, subject, public_key, trust_domain, now - CLOCK_SKEW, now + lifetime, 1), key
    )


@dataclass(frozen=True)
class NewTrustDomain:
    """A fresh anchor and an issuer signed by it. ``repr`` shows no key."""

    anchor_key: SigningKey = field(repr=False)
    anchor: x509.Certificate
    issuer_key: SigningKey = field(repr=False)
    issuer: x509.Certificate


def new_trust_domain(
    trust_domain: TrustDomain,
    *,
    now: datetime,
    key_type: KeyType = KeyType.EC_P256,
    anchor_lifetime: timedelta = ANCHOR_LIFETIME,
    issuer_lifetime: timedelta = ISSUER_LIFETIME,
    anchor_key: SigningKey | None = None,
    issuer_key: SigningKey | None = None,
) -> NewTrustDomain:
    """What `meshca init` (and `meshca.testing.TestCA`) start from: new keys of ``key_type``
    unless keys are given (made on a PKCS#11 token, say)."""
    anchor_key = generate_key(key_type) if anchor_key is None else anchor_key
    anchor = build_anchor(anchor_key, trust_domain, now=now, lifetime=anchor_lifetime)
    issuer_key = generate_key(key_type) if issuer_key is None else issuer_key
    issuer = build_issuer(
        as_signer(issuer_key).public_key(),
        signer_certificate=anchor,
        signer_key=anchor_key,
        trust_domain=trust_domain,
        now=now,
        lifetime=issuer_lifetime,
    )
    return NewTrustDomain(anchor_key, anchor, issuer_key, issuer)


def build_issuer(
    public_key: PublicKey,
    *,
    signer_certificate: x509.Certificate,
    signer_key: SigningKey,
    trust_domain: TrustDomain,
    now: datetime,
    lifetime: timedelta = ISSUER_LIFETIME,
) -> x509.Certificate:
    """An issuer (CA, pathlen 0) signed by an anchor; it never outlives its signer.

    No URI name constraint: cryptography's verifier (which meshca and many
    peers rely on) rejects URI name constraints as unsupported.
    """
    not_after = min(now + lifetime, signer_certificate.not_valid_after_utc)
    ski = subject_key_identifier(signer_certificate)
    builder = _ca_builder(
        _ca_subject(trust_domain, "issuer"),
        signer_certificate.subject,
        public_key,
        trust_domain,
        now - CLOCK_SKEW,
        not_after,
        0,
    ).add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    return sign_certificate(builder, signer_key)


_LEAF_BASIC_CONSTRAINTS = x509.Extension(
    x509.BasicConstraints.oid, True, x509.BasicConstraints(ca=False, path_length=None)
)
_LEAF_KEY_USAGE = {
    rsa_key: x509.Extension(x509.KeyUsage.oid, True, _leaf_key_usage(rsa_key)) for rsa_key in (False, True)
}
_LEAF_EKU = x509.Extension(
    x509.ExtendedKeyUsage.oid,
    False,
    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
)


@dataclass(frozen=True, slots=True)
class LeafFields:
    """Everything of a leaf but its issuer name and public key, as the profile sets them."""

    serial: int
    subject: x509.Name
    not_before: datetime
    not_after: datetime
    extensions: tuple[x509.Extension[x509.ExtensionType], ...]


def leaf_fields(
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    dns_names: Sequence[str],
    authority_key_identifier: x509.AuthorityKeyIdentifier,
    *,
    now: datetime,
    not_after: datetime,
    not_before_floor: datetime,
) -> LeafFields:
    """The whole X.509-SVID leaf profile.

    Subject: CN = the first DNS name when DNS names are granted (Linkerd's
    form), else empty with a critical SAN. NotBefore is backdated by
    `CLOCK_SKEW` but never before ``not_before_floor`` (the issuer chain's own
    NotBefore). The caller has clamped ``not_after`` to the chain. Both
    `leaf_builder` and the issuer's leaf template (`pki/_template.py`) encode
    these fields, so the profile lives here only.
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])] if dns_names else [])
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(x509.DNSName(n) for n in dns_names)
    extensions = (
        _LEAF_BASIC_CONSTRAINTS,
        _LEAF_KEY_USAGE[isinstance(public_key, rsa.RSAPublicKey)],
        _LEAF_EKU,
        x509.Extension(x509.SubjectKeyIdentifier.oid, False, x509.SubjectKeyIdentifier.from_public_key(public_key)),
        x509.Extension(x509.AuthorityKeyIdentifier.oid, False, authority_key_identifier),
        # RFC 5280 4.2.1.6: the SAN is critical when the subject is empty.
        x509.Extension(x509.SubjectAlternativeName.oid, not dns_names, x509.SubjectAlternativeName(names)),
    )
    return LeafFields(random_serial(), subject, max(now - CLOCK_SKEW, not_before_floor), not_after, extensions)


def leaf_builder(issuer_subject: x509.Name, public_key: PublicKey, fields: LeafFields) -> x509.CertificateBuilder:
    """The leaf of ``fields`` as cryptography's builder, ready to sign."""
    return x509.CertificateBuilder(
        issuer_name=issuer_subject,
        subject_name=fields.subject,
        public_key=public_key,
        serial_number=fields.serial,
        not_valid_before=fields.not_before,
        not_valid_after=fields.not_after,
        extensions=list(fields.extensions),
    )
