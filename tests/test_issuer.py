"""The issuer signs only while it is valid, matches its key, and chains to the bundle."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.certbuild import NOW, build, ext, intermediate, key_usage

import meshca
from meshca import IssuanceError, Issuer, IssuerUnavailable, SpiffeId
from meshca.testing import TestCA

WEB = SpiffeId.parse("spiffe://example.org/web")


def _public_key() -> meshca.PublicKey:
    return meshca.generate_key().public_key()


def test_signs_and_the_chain_verifies(ca: TestCA) -> None:
    svid = ca.issuer.sign(_public_key(), WEB, now=NOW)
    assert meshca.verify_chain(svid.chain_der(), ca.bundle, at=NOW) == WEB
    assert meshca.verify_chain(svid.chain_pem(), ca.bundle, at=NOW) == WEB
    assert svid.chain_der()[0] == svid.leaf_der() == svid.leaf.public_bytes(serialization.Encoding.DER)
    assert svid.chain_der()[1:] == [ca.issuer_certificate.public_bytes(serialization.Encoding.DER)]
    assert x509.load_pem_x509_certificates(svid.chain_pem()) == [svid.leaf, ca.issuer_certificate]


def test_issuer_properties(ca: TestCA) -> None:
    assert ca.issuer.trust_domain == ca.trust_domain
    assert ca.issuer.certificate == ca.issuer_certificate
    assert ca.issuer.not_before == ca.issuer_certificate.not_valid_before_utc
    assert ca.issuer.not_after == ca.issuer_certificate.not_valid_after_utc
    text = repr(ca.issuer)
    assert "example.org" in text
    assert "PRIVATE" not in text


# -- time window


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (timedelta(days=365), "expired"),
        (timedelta(days=365, seconds=1), "expired"),
        (timedelta(days=4000), "expired"),
        (timedelta(seconds=-61), "not valid before"),
        (timedelta(days=-1), "not valid before"),
    ],
)
def test_refuses_to_sign_outside_its_validity(ca: TestCA, offset: timedelta, reason: str) -> None:
    with pytest.raises(IssuerUnavailable, match=reason):
        ca.issuer.sign(_public_key(), WEB, now=NOW + offset)
    with pytest.raises(IssuerUnavailable, match=reason):
        ca.issuer.check(NOW + offset)


def test_signs_at_the_edges_of_its_validity(ca: TestCA) -> None:
    ca.issuer.check(NOW - timedelta(seconds=60))
    last = NOW + timedelta(days=365) - timedelta(seconds=1)
    svid = ca.issuer.sign(_public_key(), WEB, now=last)
    assert svid.leaf.not_valid_after_utc == NOW + timedelta(days=365)


def test_refuses_when_the_anchor_has_expired_even_if_the_issuer_has_not() -> None:
    ca = TestCA("example.org", now=NOW, anchor_lifetime=timedelta(hours=3))
    issuer_key = meshca.generate_key()
    long_issuer = build(
        public_key=issuer_key.public_key(),
        signer_name=ca.anchor.subject,
        signer_key=ca.anchor_key,
        not_before=NOW,
        not_after=NOW + timedelta(days=365),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (key_usage("key_cert_sign", "crl_sign"), True),
            (x509.SubjectKeyIdentifier.from_public_key(issuer_key.public_key()), False),
        ],
        subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "long")]),
    )
    issuer = Issuer([long_issuer], issuer_key, ca.bundle)
    with pytest.raises(IssuerUnavailable, match="expired"):
        issuer.sign(_public_key(), WEB, now=NOW + timedelta(hours=4))


# -- construction: fails closed


def test_refuses_a_key_that_does_not_match(ca: TestCA) -> None:
    with pytest.raises(IssuerUnavailable, match="key does not match"):
        Issuer([ca.issuer_certificate], meshca.generate_key(), ca.bundle)
    with pytest.raises(IssuerUnavailable, match="key does not match"):
        Issuer([ca.issuer_certificate], ca.anchor_key, ca.bundle)


def test_refuses_a_chain_that_does_not_reach_the_bundle(ca: TestCA, rogue_ca: TestCA, foreign_ca: TestCA) -> None:
    with pytest.raises(IssuerUnavailable, match=r"does not chain to any anchor of example\.org"):
        Issuer([ca.issuer_certificate], ca.issuer_key, rogue_ca.bundle)
    with pytest.raises(IssuerUnavailable, match="does not chain"):
        Issuer([ca.issuer_certificate], ca.issuer_key, foreign_ca.bundle)


def test_refuses_an_empty_chain(ca: TestCA) -> None:
    with pytest.raises(IssuerUnavailable, match="empty"):
        Issuer([], ca.issuer_key, ca.bundle)


def test_refuses_a_chain_with_a_non_ca(ca: TestCA) -> None:
    not_ca, key = intermediate(ca, now=NOW, ca_flag=False)
    with pytest.raises(IssuerUnavailable, match="not a CA"):
        Issuer([not_ca], key, ca.bundle)
    no_cert_sign, key2 = intermediate(ca, now=NOW, ku=key_usage("digital_signature"))
    with pytest.raises(IssuerUnavailable, match="not a CA"):
        Issuer([no_cert_sign], key2, ca.bundle)


def test_refuses_a_chain_out_of_order(ca: TestCA, rogue_ca: TestCA) -> None:
    with pytest.raises(IssuerUnavailable, match="out of order"):
        Issuer([ca.issuer_certificate, rogue_ca.issuer_certificate], ca.issuer_key, ca.bundle)


def test_refuses_a_key_of_an_unsupported_type(ca: TestCA) -> None:
    with pytest.raises(meshca.KeyPolicyError):
        Issuer([ca.issuer_certificate], ec.generate_private_key(ec.SECP521R1()), ca.bundle)  # type: ignore[arg-type]


def test_issuer_errors_are_issuance_errors() -> None:
    assert issubclass(IssuerUnavailable, IssuanceError)
    assert issubclass(IssuanceError, meshca.MeshcaError)


def test_from_pem(ca: TestCA) -> None:
    chain_pem = ca.issuer_certificate.public_bytes(serialization.Encoding.PEM)
    issuer = Issuer.from_pem(chain_pem, meshca.private_key_pem(ca.issuer_key), ca.bundle)
    assert issuer.certificate == ca.issuer_certificate
    encrypted = meshca.private_key_pem(ca.issuer_key, b"pw")
    assert Issuer.from_pem(chain_pem, encrypted, ca.bundle, b"pw").certificate == ca.issuer_certificate
    with pytest.raises(IssuerUnavailable, match="issuer key"):
        Issuer.from_pem(chain_pem, encrypted, ca.bundle, b"wrong")
    with pytest.raises(IssuerUnavailable, match="issuer key"):
        Issuer.from_pem(chain_pem, b"garbage", ca.bundle)
    with pytest.raises(IssuerUnavailable, match="issuer certificate cannot be read"):
        Issuer.from_pem(b"garbage", meshca.private_key_pem(ca.issuer_key), ca.bundle)


# -- what it signs


def test_wrong_trust_domain_is_an_issuance_error(ca: TestCA) -> None:
    with pytest.raises(IssuanceError, match=r"not in this issuer's trust domain example\.org") as info:
        ca.issuer.sign(_public_key(), SpiffeId.parse("spiffe://other.test/web"), now=NOW)
    assert not isinstance(info.value, IssuerUnavailable), "the issuer is fine; the request is not"


def test_id_without_path_is_refused(ca: TestCA) -> None:
    with pytest.raises(IssuanceError, match="needs a SPIFFE ID with a path"):
        ca.issuer.sign(_public_key(), SpiffeId.parse("spiffe://example.org"), now=NOW)


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1)])
def test_non_positive_ttl_is_refused(ca: TestCA, ttl: timedelta) -> None:
    with pytest.raises(IssuanceError, match="ttl must be positive"):
        ca.issuer.sign(_public_key(), WEB, now=NOW, ttl=ttl)


def test_aki_links_leaf_to_issuer(ca: TestCA) -> None:
    svid = ca.issuer.sign(_public_key(), WEB, now=NOW)
    aki = ext(svid.leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca.issuer_certificate, x509.SubjectKeyIdentifier).value.digest


def test_issuer_from_trust_dir_matches(tmp_path: Path, ca: TestCA) -> None:
    tdir = ca.write(tmp_path / "ca")
    issuer = tdir.load_issuer()
    assert issuer.certificate == ca.issuer_certificate
    svid = issuer.sign(_public_key(), WEB, now=NOW)
    assert meshca.verify_chain(svid.chain_der(), ca.bundle, at=NOW) == WEB
    tdir.bundle.write_bytes(TestCA("example.org", now=NOW).bundle.to_pem())
    with pytest.raises(IssuerUnavailable, match="does not chain"):
        tdir.load_issuer()
    tdir.issuer_key.unlink()
    with pytest.raises(IssuerUnavailable, match="cannot read"):
        tdir.load_issuer(ca.bundle)


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        lambda: ec.generate_private_key(ec.SECP521R1()),
    ],
    ids=["rsa-1024", "ec-p521"],
)
def test_refuses_to_sign_a_leaf_key_meshca_does_not_support(ca: TestCA, make_key: Callable[[], object]) -> None:
    """The leaf profile allows ec-p256, ec-p384 and rsa >= 2048, whoever calls sign()."""
    key = make_key()
    with pytest.raises(meshca.KeyPolicyError):
        ca.issuer.sign(key.public_key(), WEB, now=NOW)  # type: ignore[attr-defined]
