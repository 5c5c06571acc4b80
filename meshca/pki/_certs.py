"""Small readers over cryptography's X.509 objects, shared by the core modules."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from meshca.pki._errors import InvalidSpiffeId
from meshca.pki._spiffe import SpiffeId

__all__ = [
    "UNREADABLE",
    "certificates_pem",
    "fingerprint",
    "is_signing_certificate",
    "load_certificates",
    "spiffe_ids_of",
    "subject_key_identifier",
    "uri_sans",
]


UNREADABLE = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)
"""What cryptography raises for X.509 structures it cannot read (not all of it is a ValueError)."""


def load_certificates(data: bytes | str | Sequence[bytes] | Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Certificates from PEM (one or many), a single DER, a list of DER, or certificate objects.

    Raises ``ValueError`` with a short reason for anything else, including a
    certificate whose extensions or key cryptography cannot read: every
    certificate meshca holds has been read whole once, here, so no later
    rule meets a parse error.
    """
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, bytes):
        if b"-----BEGIN" in data:
            try:
                return [_readable(c) for c in x509.load_pem_x509_certificates(data)]
            except UNREADABLE as exc:
                raise ValueError(f"not a PEM certificate: {exc}") from exc
        items: Sequence[bytes | x509.Certificate] = [data]
    else:
        items = data
    certs = []
    for item in items:
        if isinstance(item, x509.Certificate):
            certs.append(_readable(item))  # parsed elsewhere, perhaps not read whole yet
            continue
        try:
            cert = x509.load_der_x509_certificate(item)
        except UNREADABLE as exc:
            raise ValueError(f"not a DER or PEM certificate: {exc}") from exc
        certs.append(_readable(cert))
    if not certs:
        raise ValueError("no certificates")
    return certs


def _readable(cert: x509.Certificate) -> x509.Certificate:
    try:
        cert.extensions  # noqa: B018 - parsed (and cached) now, so later reads cannot fail
        cert.public_key()
    except UNREADABLE as exc:
        raise ValueError(f"certificate cannot be read: {exc}") from exc
    return cert


def certificates_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, lower-case hex with colons, as `openssl x509 -fingerprint` prints."""
    return cert.fingerprint(hashes.SHA256()).hex(":")


def subject_key_identifier(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    """The certificate's SKI, or the RFC 5280 method-1 one computed from its key when it has none."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_ids_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[SpiffeId]:
    """Every URI SAN that is a valid SPIFFE ID; others are skipped."""
    ids = []
    for uri in uri_sans(cert):
        try:
            ids.append(SpiffeId.parse(uri))
        except InvalidSpiffeId:
            continue
    return ids


def is_signing_certificate(cert: x509.Certificate) -> bool:
    """CA true in basicConstraints and keyCertSign in keyUsage."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca and ku.key_cert_sign
