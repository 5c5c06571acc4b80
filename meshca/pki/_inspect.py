"""Plain descriptions of certificates, CSRs and bundles, for `meshca inspect` and `meshca check`."""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from meshca.pki._certs import fingerprint, is_signing_certificate
from meshca.pki._errors import KeyPolicyError
from meshca.pki._keys import key_type_of
from meshca.pki._spiffe import SpiffeId

__all__ = ["describe_certificate", "describe_csr", "describe_key", "role_of"]


def describe_key(key: object) -> str:
    try:
        return str(key_type_of(key))
    except KeyPolicyError:
        if isinstance(key, ec.EllipticCurvePublicKey):
            return f"ec-{key.curve.name} (unsupported)"
        if isinstance(key, rsa.RSAPublicKey):
            return f"rsa-{key.key_size} (unsupported)"
        return f"{type(key).__name__} (unsupported)"


def _sans(obj: x509.Certificate | x509.CertificateSigningRequest) -> dict[str, list[str]]:
    try:
        san = obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return {"uri": [], "dns": [], "ip": [], "email": []}
    return {
        "uri": san.get_values_for_type(x509.UniformResourceIdentifier),
        "dns": san.get_values_for_type(x509.DNSName),
        "ip": [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
        "email": san.get_values_for_type(x509.RFC822Name),
    }


def _spiffe_id(uris: list[str]) -> str | None:
    for uri in uris:
        try:
            return str(SpiffeId.parse(uri))
        except ValueError:
            continue
    return None


# RFC 4514 names only a few attributes; the others would print as dotted OIDs (2.5.4.5=...).
_NAMES = {NameOID.SERIAL_NUMBER: "serialNumber"}


def _name(name: x509.Name) -> str:
    return name.rfc4514_string(_NAMES)


def role_of(cert: x509.Certificate) -> str:
    """``trust-anchor`` (a self-signed CA), ``issuer`` (a CA signed by another) or ``leaf``."""
    if not is_signing_certificate(cert):
        return "leaf"
    if cert.subject == cert.issuer:
        try:
            cert.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature):
            return "issuer"
        return "trust-anchor"
    return "issuer"


def describe_certificate(cert: x509.Certificate) -> dict[str, Any]:
    sans = _sans(cert)
    return {
        "type": "certificate",
        "role": role_of(cert),
        "subject": _name(cert.subject),
        "issuer": _name(cert.issuer),
        "serial": format(cert.serial_number, "x"),
        "is_ca": is_signing_certificate(cert),
        "spiffe_id": _spiffe_id(sans["uri"]),
        "sans": {k: v for k, v in sans.items() if v},
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key": describe_key(cert.public_key()),
        "sha256": fingerprint(cert),
    }


def describe_csr(csr: x509.CertificateSigningRequest) -> dict[str, Any]:
    sans = _sans(csr)
    return {
        "type": "csr",
        "subject": _name(csr.subject),
        "spiffe_id": _spiffe_id(sans["uri"]),
        "sans": {k: v for k, v in sans.items() if v},
        "key": describe_key(csr.public_key()),
        "signature_valid": csr.is_signature_valid,
    }
