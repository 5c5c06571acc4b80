"""Hand-built certificates for negative tests: every field of a leaf or CA can be bent.

Each builder starts from a correct X.509-SVID profile, so a test changes
exactly the one thing it is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import meshca
from meshca.testing import TestCA

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
"""The frozen time every core test runs at."""

DEFAULT = object()
"""Marks an argument left at the correct profile value."""

KU_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def key_usage(*set_bits: str) -> x509.KeyUsage:
    unknown = set(set_bits) - set(KU_FIELDS)
    assert not unknown, unknown
    return x509.KeyUsage(**{f: f in set_bits for f in KU_FIELDS})


def ext(cert: x509.Certificate | x509.CertificateSigningRequest, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


def build(
    *,
    public_key: meshca.PublicKey,
    signer_name: x509.Name,
    signer_key: meshca.PrivateKey,
    not_before: datetime,
    not_after: datetime,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
    subject: x509.Name | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else x509.Name([]))
        .issuer_name(signer_name)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(signer_key, hashes.SHA256())


def leaf(
    ca: TestCA,
    *,
    now: datetime,
    uris: Sequence[str] = ("spiffe://example.org/web",),
    ca_flag: bool = False,
    ku: object = DEFAULT,
    eku: object = DEFAULT,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    signer: tuple[x509.Certificate, meshca.PrivateKey] | None = None,
    key: meshca.PrivateKey | None = None,
) -> x509.Certificate:
    """An X.509-SVID leaf signed by ``ca``'s issuer (or ``signer``), with the named fields bent.

    ``ku=None`` / ``eku=None`` leave the extension out.
    """
    signer_cert, signer_key = signer or (ca.issuer_certificate, ca.issuer_key)
    public_key = (key or meshca.generate_key()).public_key()
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=ca_flag, path_length=None), True),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
        (
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ext(signer_cert, x509.SubjectKeyIdentifier).value
            ),
            False,
        ),
    ]
    if ku is DEFAULT:
        extensions.append((key_usage("digital_signature"), True))
    elif ku is not None:
        extensions.append((ku, True))  # type: ignore[arg-type]
    if eku is DEFAULT:
        extensions.append(
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        )
    elif eku is not None:
        extensions.append((eku, False))  # type: ignore[arg-type]
    if uris:
        extensions.append((x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), True))
    return build(
        public_key=public_key,
        signer_name=signer_cert.subject,
        signer_key=signer_key,
        not_before=not_before or now - timedelta(minutes=1),
        not_after=not_after or now + timedelta(hours=1),
        extensions=extensions,
        subject=None if uris else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-san")]),
    )


def intermediate(
    ca: TestCA,
    *,
    now: datetime,
    ca_flag: bool = True,
    ku: object = DEFAULT,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    trust_domain: str = "example.org",
) -> tuple[x509.Certificate, meshca.PrivateKey]:
    """A signing certificate under ``ca``'s anchor, with the named fields bent, and its key."""
    key = meshca.generate_key()
    public_key = key.public_key()
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=ca_flag, path_length=0 if ca_flag else None), True),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
        (
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ext(ca.anchor, x509.SubjectKeyIdentifier).value
            ),
            False,
        ),
        (x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), False),
    ]
    if ku is DEFAULT:
        extensions.append((key_usage("key_cert_sign", "crl_sign"), True))
    elif ku is not None:
        extensions.append((ku, True))  # type: ignore[arg-type]
    cert = build(
        public_key=public_key,
        signer_name=ca.anchor.subject,
        signer_key=ca.anchor_key,
        not_before=not_before or now - timedelta(minutes=1),
        not_after=not_after or now + timedelta(days=30),
        extensions=extensions,
        subject=x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "hand-built intermediate"),
            ]
        ),
    )
    return cert, key
