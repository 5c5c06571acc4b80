"""Leaf template: the issuer encodes each TBSCertificate itself, then signs the bytes.

cryptography's builder re-encodes the whole certificate for every leaf; a
high-volume CA encodes the constant parts once. Here the profile's fields
(`leaf_fields`, the one place the profile lives) are encoded with
cryptography's own encoders (subject name, extension values, public key);
only the TBSCertificate frame is written here (sequence headers, version,
serial, validity), and the constant parts (version, signature algorithm,
issuer name) are cut by DER structure from a leaf the builder signed when
the template was made. The template then encodes that same leaf's fields
itself and must reproduce its TBSCertificate byte for byte, or it is not
used (`LeafTemplate.make` returns None and the issuer keeps the builder).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from meshca.pki._custody import MemoryKey, SigningKey, as_signer, checked_signature, sign_certificate
from meshca.pki._der import SEQUENCE, certificate_der, children, tlv
from meshca.pki._keys import PublicKey, signature_hash
from meshca.pki._profiles import LeafFields, leaf_builder, leaf_fields
from meshca.pki._spiffe import TrustDomain

__all__ = ["LeafTemplate"]

_UTC_TIME_YEARS = range(1950, 2050)  # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime after
_PROTOTYPE_DNS = ("leaf-template.meshca.invalid",)


def _integer(value: int) -> bytes:
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def _time(at: datetime) -> bytes:
    # cryptography reads a naive datetime as UTC and drops microseconds. Before
    # 1950 its builder fails (a Rust panic, from its constructor): RFC 5280's
    # GeneralizedTime is written instead, though no issuer valid then exists.
    utc = at if at.tzinfo is None else at.astimezone(UTC)
    clock = (utc.month, utc.day, utc.hour, utc.minute, utc.second)
    if utc.year in _UTC_TIME_YEARS:  # bytes formatting: datetime.strftime costs about 10 us here
        return tlv(0x17, b"%02d%02d%02d%02d%02d%02dZ" % (utc.year % 100, *clock))
    return tlv(0x18, b"%04d%02d%02d%02d%02d%02dZ" % (utc.year, *clock))


def _oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


_CRITICAL = b"\x01\x01\xff"


class LeafTemplate:
    """Encodes and signs leaves for one issuer certificate and key."""

    __slots__ = ("_constant", "_head", "_mid", "_oids", "_sign", "_signature_algorithm")

    def __init__(self, issuer_key: SigningKey, prototype: x509.Certificate, fields: LeafFields) -> None:
        tbs = children(prototype.tbs_certificate_bytes)
        self._head = tbs[0]  # [0] EXPLICIT version v3
        self._mid = tbs[2] + tbs[3]  # signature algorithm, issuer name
        self._signature_algorithm = children(prototype.public_bytes(serialization.Encoding.DER))[1]
        self._oids: dict[x509.ObjectIdentifier, bytes] = {}
        # The profile hands out the same extension value objects for every leaf
        # of this issuer (basic constraints, key usage, EKU, the issuer's AKI):
        # those are encoded once, by identity; the entry keeps the object alive.
        self._constant: dict[tuple[int, bool], tuple[x509.ExtensionType, bytes]] = {}
        self._constant = {(id(e.value), e.critical): (e.value, self._extension(e)) for e in fields.extensions}
        signer = as_signer(issuer_key)
        hash_ = signature_hash(signer.public_key())
        self._sign: Callable[[bytes], bytes]
        if not isinstance(signer, MemoryKey):
            self._sign = lambda data: checked_signature(signer, data, hash_)
        elif isinstance(private := signer.private_key, rsa.RSAPrivateKey):
            pkcs1 = padding.PKCS1v15()
            self._sign = lambda data: private.sign(data, pkcs1, hash_)
        else:
            ecdsa = ec.ECDSA(hash_)
            self._sign = lambda data: private.sign(data, ecdsa)

    @classmethod
    def make(
        cls,
        issuer_key: SigningKey,
        issuer_subject: x509.Name,
        trust_domain: TrustDomain,
        authority_key_identifier: x509.AuthorityKeyIdentifier,
        now: datetime,
    ) -> LeafTemplate | None:
        """A template checked against the builder, or None if the two encode differently.

        The prototype leaf (for the issuer's own public key and a reserved
        SPIFFE ID, valid for no time at all) exists only in memory here.
        """
        public_key = as_signer(issuer_key).public_key()
        fields = leaf_fields(
            public_key,
            trust_domain.spiffe_id("/meshca/leaf-template"),
            _PROTOTYPE_DNS,
            authority_key_identifier,
            now=now,
            not_after=now - timedelta(seconds=1),
            not_before_floor=now,
        )
        prototype = sign_certificate(leaf_builder(issuer_subject, public_key, fields), issuer_key)
        template = cls(issuer_key, prototype, fields)
        if template.tbs(fields, public_key) != prototype.tbs_certificate_bytes:
            return None
        return template

    def tbs(self, fields: LeafFields, public_key: PublicKey) -> bytes:
        """The DER TBSCertificate of ``fields`` for ``public_key``, as the builder encodes it."""
        spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return tlv(
            SEQUENCE,
            b"".join(
                (
                    self._head,
                    _integer(fields.serial),
                    self._mid,
                    tlv(SEQUENCE, _time(fields.not_before) + _time(fields.not_after)),
                    fields.subject.public_bytes(),
                    spki,
                    tlv(0xA3, tlv(SEQUENCE, b"".join(self._extension(e) for e in fields.extensions))),
                )
            ),
        )

    def _extension(self, extension: x509.Extension[x509.ExtensionType]) -> bytes:
        constant = self._constant.get((id(extension.value), extension.critical))
        if constant is not None and constant[0] is extension.value:
            return constant[1]
        oid = self._oids.get(extension.oid)
        if oid is None:
            oid = self._oids[extension.oid] = _oid(extension.oid)
        critical = _CRITICAL if extension.critical else b""
        return tlv(SEQUENCE, oid + critical + tlv(0x04, extension.value.public_bytes()))

    def sign(self, fields: LeafFields, public_key: PublicKey) -> bytes:
        """The DER certificate: TBSCertificate, signature algorithm, signature."""
        tbs = self.tbs(fields, public_key)
        signature = self._sign(tbs)
        return certificate_der(tbs, self._signature_algorithm, signature)
