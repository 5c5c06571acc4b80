"""Keys and CSRs as workloads send them, and the certificate fields tests look at."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshca
from meshca.pki._bundle import TrustBundle
from meshca.pki._files import atomic_write

from .ids import LINKERD_WEB, TD, WEB


def p256() -> meshca.PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_der(
    key: Any,
    *,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    cn: str | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    """A PKCS#10 request with exactly the names given; any key type cryptography can sign with."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=cn is None)
    return builder.sign(key, algorithm or hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def spiffe_csr(spiffe_id: meshca.SpiffeId | str = WEB, key: Any = None) -> tuple[Any, bytes]:
    key = key or p256()
    return key, csr_der(key, uris=[str(spiffe_id)])


def linkerd_csr(identity: str = LINKERD_WEB, key: Any = None) -> tuple[Any, bytes]:
    """What linkerd2-proxy sends: CN = identity and one DNS SAN = identity."""
    key = key or p256()
    return key, csr_der(key, dns=[identity], cn=identity)


def to_pem(der: bytes) -> str:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


def flip_last_byte(der: bytes) -> bytes:
    """The last byte of a CSR is in its signature: the request still parses, the signature fails."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def cert(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def uris(c: x509.Certificate) -> list[str]:
    return c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


def dns_names(c: x509.Certificate) -> list[str]:
    return c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def serial_hex(c: x509.Certificate) -> str:
    return format(c.serial_number, "x")


def signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except Exception:
        return False
    return True


def serial(svid: meshca.client.X509Svid) -> int:
    return int(svid.leaf.serial_number)


def within_validity(svid: meshca.client.X509Svid, at: datetime | None = None) -> bool:
    at = at or datetime.now(UTC)
    return svid.not_before <= at < svid.not_after


def write_bundle(directory: Path, *anchors: x509.Certificate) -> None:
    """Replaces DIR/bundle.pem, as an operator rotating anchors would (atomically)."""
    atomic_write(directory / "bundle.pem", TrustBundle(meshca.TrustDomain.parse(TD), anchors).to_pem())


def looping_chain(
    spiffe_id: str, copies: int, now: datetime, *, distinct_keys: bool = False
) -> tuple[list[bytes], ec.EllipticCurvePrivateKey]:
    """A leaf for ``spiffe_id`` and ``copies`` CA certificates of one name, each issued by that name, leading to no
    anchor (DER, leaf first), and the leaf's key. With one key for all (the default) every copy is a valid issuer
    of every other, the path search a verifier may make over them grows as copies ** depth."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loop")])
    shared = ec.generate_private_key(ec.SECP256R1())
    keys = [ec.generate_private_key(ec.SECP256R1()) if distinct_keys else shared for _ in range(copies)]
    window = (now - timedelta(hours=1), now + timedelta(days=1))

    def make(subject_key: Any, signer: Any, serial: int, *, ca: bool, subject: x509.Name) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(name)
            .public_key(subject_key.public_key())
            .serial_number(serial)
            .not_valid_before(window[0])
            .not_valid_after(window[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, ca, ca, False, False),
                critical=True,
            )
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
            )
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = make(leaf_key, keys[0], 1, ca=False, subject=x509.Name([]))
    cas = [make(keys[i], keys[(i + 1) % copies], i + 2, ca=True, subject=name) for i in range(copies)]
    return [leaf, *cas], leaf_key
