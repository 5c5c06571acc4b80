"""The certificate profiles of DESIGN.md, field by field, on certificates meshca makes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.certbuild import KU_FIELDS, NOW, build, ext, key_usage

import meshca
from meshca import KeyType, SpiffeId, TrustDir, TrustDomain
from meshca.pki._profiles import build_anchor
from meshca.testing import TestCA

SKEW = timedelta(seconds=60)
TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")


@dataclass(frozen=True)
class Pki:
    anchor: x509.Certificate
    issuer_certificate: x509.Certificate
    issuer: meshca.Issuer


@pytest.fixture(scope="module", params=["TestCA", "TrustDir.init"])
def pki(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if request.param == "TestCA":
        ca = TestCA("example.org", now=NOW)
        return Pki(ca.anchor, ca.issuer_certificate, ca.issuer)
    tdir = TrustDir.at(tmp_path_factory.mktemp("trustdir"))
    issuer = tdir.init(TD, now=NOW)
    anchor = x509.load_pem_x509_certificate(tdir.anchor_cert.read_bytes())
    issuer_cert = x509.load_pem_x509_certificate(tdir.issuer_cert.read_bytes())
    assert issuer.certificate == issuer_cert
    assert tdir.load_bundle().anchors == (anchor,)
    return Pki(anchor, issuer_cert, issuer)


def _ku_bits(cert: x509.Certificate) -> set[str]:
    ku = ext(cert, x509.KeyUsage).value
    # encipher_only and decipher_only may only be read when key_agreement is set
    readable = [n for n in KU_FIELDS if ku.key_agreement or n not in ("encipher_only", "decipher_only")]
    return {name for name in readable if getattr(ku, name)}


def _no_extension(cert: x509.Certificate, cls: type) -> bool:
    try:
        ext(cert, cls)
    except x509.ExtensionNotFound:
        return True
    return False


def _check_serial(cert: x509.Certificate) -> None:
    serial = cert.serial_number
    assert serial > 0
    assert serial.bit_length() >= 64
    assert serial.bit_length() <= 159, "RFC 5280: at most 20 octets"


def _ski_of_key(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


# -- trust anchor


def test_anchor_profile(pki: Pki) -> None:
    anchor = pki.anchor
    bc = ext(anchor, x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is True
    assert bc.value.path_length == 1
    ku = ext(anchor, x509.KeyUsage)
    assert ku.critical
    assert _ku_bits(anchor) == {"key_cert_sign", "crl_sign"}
    assert _no_extension(anchor, x509.ExtendedKeyUsage)
    san = ext(anchor, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert ext(anchor, x509.SubjectKeyIdentifier).value.digest == _ski_of_key(anchor)
    assert anchor.subject == anchor.issuer
    anchor.verify_directly_issued_by(anchor)
    assert anchor.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "example.org"
    assert anchor.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER), "a unique serial in the subject"
    _check_serial(anchor)
    assert meshca.key_type_of(anchor.public_key()) is KeyType.EC_P256
    assert isinstance(anchor.signature_hash_algorithm, hashes.SHA256)


def test_anchor_lifetime(pki: Pki) -> None:
    assert pki.anchor.not_valid_before_utc == NOW - SKEW
    assert pki.anchor.not_valid_after_utc == NOW + timedelta(days=3650)


def test_two_anchors_never_share_a_subject() -> None:
    key = meshca.generate_key()
    a = build_anchor(key, TD, now=NOW)
    b = build_anchor(key, TD, now=NOW)
    assert a.subject != b.subject
    assert a.serial_number != b.serial_number


# -- issuer


def test_issuer_profile(pki: Pki) -> None:
    issuer, anchor = pki.issuer_certificate, pki.anchor
    bc = ext(issuer, x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is True
    assert bc.value.path_length == 0
    assert ext(issuer, x509.KeyUsage).critical
    assert _ku_bits(issuer) == {"key_cert_sign", "crl_sign"}
    assert _no_extension(issuer, x509.ExtendedKeyUsage)
    assert ext(issuer, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org"
    ]
    assert ext(issuer, x509.SubjectKeyIdentifier).value.digest == _ski_of_key(issuer)
    aki = ext(issuer, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(anchor, x509.SubjectKeyIdentifier).value.digest
    assert issuer.issuer == anchor.subject
    assert issuer.subject != anchor.subject
    issuer.verify_directly_issued_by(anchor)
    _check_serial(issuer)
    assert issuer.serial_number != anchor.serial_number


def test_issuer_lifetime(pki: Pki) -> None:
    assert pki.issuer_certificate.not_valid_before_utc == NOW - SKEW
    assert pki.issuer_certificate.not_valid_after_utc == NOW + timedelta(days=365)
    assert pki.issuer.not_after == NOW + timedelta(days=365)


def test_issuer_never_outlives_its_anchor() -> None:
    ca = TestCA("example.org", now=NOW, anchor_lifetime=timedelta(days=30))
    assert ca.issuer_certificate.not_valid_after_utc == ca.anchor.not_valid_after_utc


# -- leaf


def _sign(issuer: meshca.Issuer, *, now: datetime = NOW, key_type: KeyType = KeyType.EC_P256, **kw: object):  # type: ignore[no-untyped-def]
    key = meshca.generate_key(key_type)
    return key, issuer.sign(key.public_key(), WEB, now=now, **kw)  # type: ignore[arg-type]


def test_leaf_profile(pki: Pki) -> None:
    key, svid = _sign(pki.issuer)
    leaf = svid.leaf
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False
    assert bc.value.path_length is None
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical
    assert _ku_bits(leaf) == {"digital_signature"}
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert len(list(eku)) == 2
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert len(list(san.value)) == 1
    assert leaf.subject == x509.Name([])
    assert san.critical, "RFC 5280: SAN is critical when the subject is empty"
    assert ext(leaf, x509.SubjectKeyIdentifier).value.digest == _ski_of_key(leaf)
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(pki.issuer_certificate, x509.SubjectKeyIdentifier).value.digest
    assert leaf.issuer == pki.issuer_certificate.subject
    leaf.verify_directly_issued_by(pki.issuer_certificate)
    assert leaf.public_key() == key.public_key()
    _check_serial(leaf)
    assert svid.spiffe_id == WEB
    assert svid.intermediates == (pki.issuer_certificate,)
    assert svid.serial == leaf.serial_number
    assert svid.not_after == leaf.not_valid_after_utc


def test_leaf_serials_are_random(pki: Pki) -> None:
    serials = {_sign(pki.issuer)[1].serial for _ in range(8)}
    assert len(serials) == 8
    assert all(s > 0 and s.bit_length() >= 64 for s in serials)


def test_leaf_with_dns_names_has_a_subject_and_non_critical_san(pki: Pki) -> None:
    _, svid = _sign(pki.issuer, dns_names=["web.default.svc", "web"])
    leaf = svid.leaf
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web.default.svc"
    san = ext(leaf, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert san.value.get_values_for_type(x509.DNSName) == ["web.default.svc", "web"]


def test_leaf_is_backdated_and_gets_its_ttl(pki: Pki) -> None:
    later = NOW + timedelta(hours=5)
    _, svid = _sign(pki.issuer, now=later)
    assert svid.leaf.not_valid_before_utc == later - SKEW
    assert svid.leaf.not_valid_after_utc == later + timedelta(hours=24)
    _, short = _sign(pki.issuer, now=later, ttl=timedelta(minutes=5))
    assert short.leaf.not_valid_after_utc == later + timedelta(minutes=5)


def test_leaf_is_never_backdated_before_the_issuer(pki: Pki) -> None:
    _, svid = _sign(pki.issuer, now=NOW - SKEW)
    assert svid.leaf.not_valid_before_utc == pki.issuer_certificate.not_valid_before_utc


def test_leaf_not_after_is_clamped_to_the_issuer() -> None:
    ca = TestCA("example.org", now=NOW, issuer_lifetime=timedelta(hours=2))
    _, svid = _sign(ca.issuer, now=NOW + timedelta(hours=1), ttl=timedelta(hours=24))
    assert svid.leaf.not_valid_after_utc == ca.issuer_certificate.not_valid_after_utc == NOW + timedelta(hours=2)


def test_leaf_not_after_is_clamped_to_the_anchor_even_if_the_issuer_outlives_it() -> None:
    """An issuer certificate made elsewhere may outlive its anchor; the leaf still may not."""
    ca = TestCA("example.org", now=NOW, anchor_lifetime=timedelta(hours=3))
    issuer_key = meshca.generate_key()
    long_issuer = build(
        public_key=issuer_key.public_key(),
        signer_name=ca.anchor.subject,
        signer_key=ca.anchor_key,
        not_before=NOW - SKEW,
        not_after=NOW + timedelta(days=365),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "long issuer")]),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (key_usage("key_cert_sign", "crl_sign"), True),
            (x509.SubjectKeyIdentifier.from_public_key(issuer_key.public_key()), False),
        ],
    )
    issuer = meshca.Issuer([long_issuer], issuer_key, ca.bundle)
    assert issuer.not_after == ca.anchor.not_valid_after_utc
    _, svid = _sign(issuer, now=NOW + timedelta(hours=2), ttl=timedelta(hours=24))
    assert svid.leaf.not_valid_after_utc == ca.anchor.not_valid_after_utc


@pytest.mark.parametrize("key_type", [KeyType.RSA_2048, KeyType.EC_P384], ids=str)
def test_leaf_key_usage_by_key_type(pki: Pki, key_type: KeyType) -> None:
    _, svid = _sign(pki.issuer, key_type=key_type)
    expected = {"digital_signature", "key_encipherment"} if key_type.is_rsa else {"digital_signature"}
    assert _ku_bits(svid.leaf) == expected
    assert ext(svid.leaf, x509.KeyUsage).critical


def test_rsa_4096_leaf(ca: TestCA, rsa4096_key: meshca.PrivateKey) -> None:
    svid = ca.issuer.sign(rsa4096_key.public_key(), WEB, now=NOW)
    assert _ku_bits(svid.leaf) == {"digital_signature", "key_encipherment"}
    assert meshca.key_type_of(svid.leaf.public_key()) is KeyType.RSA_4096


def test_p384_ca_signs_with_sha384() -> None:
    ca = TestCA("example.org", now=NOW, key_type=KeyType.EC_P384)
    assert isinstance(ca.anchor.signature_hash_algorithm, hashes.SHA384)
    assert isinstance(ca.issuer_certificate.signature_hash_algorithm, hashes.SHA384)
    _, svid = _sign(ca.issuer)
    assert isinstance(svid.leaf.signature_hash_algorithm, hashes.SHA384)
    assert meshca.key_type_of(ca.anchor.public_key()) is KeyType.EC_P384


def test_trust_dir_layout(tmp_path: Path) -> None:
    tdir = TrustDir.at(tmp_path / "ca")
    assert not tdir.is_initialized()
    tdir.init(TD, now=NOW)
    assert tdir.is_initialized()
    for path in (tdir.anchor_key, tdir.issuer_key):
        assert path.stat().st_mode & 0o777 == 0o600
    loaded = tdir.load_issuer()
    assert loaded.certificate == x509.load_pem_x509_certificate(tdir.issuer_cert.read_bytes())
    with pytest.raises(FileExistsError):
        tdir.init(TD, now=NOW)
    before = tdir.issuer_key.read_bytes()
    tdir.init(TD, now=NOW, force=True)
    assert tdir.issuer_key.read_bytes() != before
