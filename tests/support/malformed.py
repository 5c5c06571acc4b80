"""Malformed CSRs, certificates and JWTs, built at test time where no builder will go.

cryptography refuses to build most of these, so a correct object is built
and its DER edited, then re-signed where the signature must still verify
(so the check under test, not the signature check, is what refuses it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .certbuild import build

_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")  # AlgorithmIdentifier ecdsa-with-SHA256
EC_PUBLIC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")
P256_OID = bytes.fromhex("06082a8648ce3d030107")


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def children(der: bytes) -> list[bytes]:
    """The elements inside a constructed element, each with its own tag and length."""
    offset = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = []
    while offset < len(der):
        first = der[offset + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            header, length = 2 + count, int.from_bytes(der[offset + 2 : offset + 2 + count], "big")
        out.append(der[offset : offset + header + length])
        offset += header + length
    return out


def _uint(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big")  # room for a leading zero: positive
    return tlv(0x02, raw)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr(key: ec.EllipticCurvePrivateKey, san: list[x509.GeneralName]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def resign_csr(info: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR around ``info`` (a CertificationRequestInfo), with a valid signature by ``key``."""
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return tlv(0x30, info + _ECDSA_SHA256 + tlv(0x03, b"\x00" + signature))


def csr_version(spiffe_id: str, version: int) -> bytes:
    key = p256()
    info = children(csr(key, [x509.UniformResourceIdentifier(spiffe_id)]))[0]
    version_field, *rest = children(info)
    assert version_field == bytes.fromhex("020100")
    return resign_csr(tlv(0x30, _uint(version) + b"".join(rest)), key)


def csr_with_san_tag(spiffe_id: str, tag: int) -> bytes:
    """A signed CSR whose SAN holds the URI and a name of ``tag`` (0xa3 x400Address, 0xa5 ediPartyName)."""
    key = p256()
    other = x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    der = csr(key, [x509.UniformResourceIdentifier(spiffe_id), other])
    info = children(der)[0]
    at = info.index(bytes.fromhex("06092b06010401868d1f01")) - 2  # the OtherName's [0] tag, before its OID
    return resign_csr(info[:at] + bytes([tag]) + info[at + 1 :], key)


def csr_with_key(spiffe_id: str, algorithm: bytes) -> bytes:
    """A signed CSR whose SubjectPublicKeyInfo algorithm is ``algorithm`` (the DER of the AlgorithmIdentifier)."""
    key = p256()
    info = children(csr(key, [x509.UniformResourceIdentifier(spiffe_id)]))[0]
    version, subject, spki, attributes = children(info)
    _, bits = children(spki)
    return resign_csr(tlv(0x30, version + subject + tlv(0x30, algorithm + bits) + attributes), key)


def unknown_key_algorithm() -> bytes:
    return tlv(0x30, tlv(0x06, bytes.fromhex("2b0601040182cd1f0101")) + P256_OID)  # 1.3.6.1.4.1.99999.1.1


def explicit_p256_parameters() -> bytes:
    """id-ecPublicKey with P-256 spelled out as explicit parameters (RFC 5480 forbids them)."""
    p = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
    a = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFC
    b = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
    gx = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
    gy = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    field = tlv(0x30, tlv(0x06, bytes.fromhex("2a8648ce3d0101")) + _uint(p))
    curve = tlv(0x30, tlv(0x04, a.to_bytes(32, "big")) + tlv(0x04, b.to_bytes(32, "big")))
    base = tlv(0x04, b"\x04" + gx.to_bytes(32, "big") + gy.to_bytes(32, "big"))
    parameters = tlv(0x30, _uint(1) + field + curve + base + _uint(n) + _uint(1))
    return tlv(0x30, EC_PUBLIC_KEY_OID + parameters)


# -- certificates


def self_signed(spiffe_id: str, now: datetime, *, twin_san: bool = False) -> bytes:
    """A leaf-like certificate; with ``twin_san``, its IssuerAltName is edited into a second SAN."""
    key = p256()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshca tests")])
    san = [x509.UniformResourceIdentifier(spiffe_id)]
    extensions: list[tuple[x509.ExtensionType, bool]] = [(x509.SubjectAlternativeName(san), True)]
    if twin_san:
        extensions.append((x509.IssuerAlternativeName(san), False))
    certificate = build(
        public_key=key.public_key(),
        signer_name=name,
        signer_key=key,
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(hours=1),
        extensions=extensions,
        subject=name,
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    if twin_san:
        ian = bytes.fromhex("0603551d12")
        at = der.index(ian)
        der = der[:at] + bytes.fromhex("0603551d11") + der[at + len(ian) :]
    return der


def certificate_version(der: bytes, version: int) -> bytes:
    """``der`` with its version field set to ``version`` (X.509 knows 0, 1 and 2)."""
    field = bytes.fromhex("a003020102")
    at = der.index(field)
    return der[:at] + bytes.fromhex("a00302") + bytes([1, version]) + der[at + len(field) :]


# -- JWTs


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_jwt(header: dict[str, Any], claims: dict[str, Any], key: Any) -> str:
    """A JWS whatever its header says (PyJWT refuses to build odd ones): signed ES256 with an EC ``key``,
    HMAC-SHA256 with ``bytes`` (a public key used as a secret), unsigned with None."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if key is None:
        signature = b""
    elif isinstance(key, bytes):
        signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    else:
        signature = jwt.algorithms.ECAlgorithm(jwt.algorithms.ECAlgorithm.SHA256).sign(signing_input.encode(), key)
    return f"{signing_input}.{_b64(signature)}"
