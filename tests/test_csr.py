"""CSRs: built by workloads, checked by the service before it signs."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from support import malformed
from support.certbuild import NOW

import meshca
from meshca import CsrNameMismatch, InvalidCsr, KeyPolicy, KeyPolicyError, KeyType, SpiffeId, build_csr, check_csr
from meshca.testing import TestCA

WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
LINKERD = "web.default.serviceaccount.identity.linkerd.cluster.local"


def _csr(
    key: meshca.PrivateKey | None = None,
    *,
    names: list[x509.GeneralName] | None = None,
    cn: str | None = None,
) -> bytes:
    key = key or meshca.generate_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_good_csr_passes() -> None:
    key = meshca.generate_key()
    checked = check_csr(build_csr(key, WEB), WEB)
    assert checked.public_key == key.public_key()
    assert checked.key_type is KeyType.EC_P256
    assert checked.dns_names == ()


def test_build_csr_contents() -> None:
    key = meshca.generate_key()
    csr = meshca.load_csr(build_csr(key, WEB, dns_names=[LINKERD]))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert san.get_values_for_type(x509.DNSName) == [LINKERD]
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == LINKERD
    bare = meshca.load_csr(build_csr(key, WEB))
    assert bare.subject == x509.Name([])


def test_pem_and_der_are_both_accepted() -> None:
    key = meshca.generate_key()
    der = build_csr(key, WEB)
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    for data in (der, pem, pem.decode(), x509.load_der_x509_csr(der)):
        assert check_csr(data, WEB).public_key == key.public_key()
    assert meshca.load_csr(pem) == meshca.load_csr(der)


def test_dns_names_that_are_granted_pass() -> None:
    checked = check_csr(
        build_csr(meshca.generate_key(), WEB, dns_names=[LINKERD, "web"]), WEB, allowed_dns={LINKERD, "web"}
    )
    assert checked.dns_names == (LINKERD, "web")


def test_linkerd_style_csr_without_uri_passes() -> None:
    """Linkerd proxies send CN = DNS SAN = identity, and no URI."""
    checked = check_csr(build_csr(meshca.generate_key(), None, dns_names=[LINKERD]), WEB, allowed_dns=[LINKERD])
    assert checked.dns_names == (LINKERD,)


def test_csr_without_names_passes() -> None:
    assert check_csr(_csr(), WEB).dns_names == ()


def test_cn_equal_to_the_spiffe_id_passes() -> None:
    check_csr(_csr(cn=str(WEB)), WEB)


# -- unreadable or forged


def _tamper(der: bytes) -> bytes:
    """Flips a bit in the last byte, which is inside the signature value."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def test_tampered_signature_is_invalid() -> None:
    der = build_csr(meshca.generate_key(), WEB)
    tampered = _tamper(der)
    x509.load_der_x509_csr(tampered)  # still parses
    with pytest.raises(InvalidCsr, match="signature is invalid"):
        check_csr(tampered, WEB)


def test_csr_signed_by_another_key_is_invalid() -> None:
    """The SPIFFE ID and key of one CSR with the signature of another."""
    key = meshca.generate_key()
    csr = x509.load_der_x509_csr(build_csr(key, WEB))
    other = x509.load_der_x509_csr(build_csr(meshca.generate_key(), WEB))
    forged = csr.tbs_certrequest_bytes
    assert forged != other.tbs_certrequest_bytes
    # ECDSA signatures vary in length, so the outer SEQUENCE is rebuilt by hand.
    sig_alg = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    sig = b"\x03" + _der_len(len(other.signature) + 1) + b"\x00" + other.signature
    body = forged + sig_alg + sig
    spliced = b"\x30" + _der_len(len(body)) + body
    assert x509.load_der_x509_csr(spliced).public_key() == key.public_key()
    assert other.public_bytes(serialization.Encoding.DER) != spliced
    with pytest.raises(InvalidCsr, match="signature is invalid"):
        check_csr(spliced, WEB)


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"garbage", "not a valid PEM or DER"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a valid PEM or DER"),
        (b"\x30\x03\x02\x01\x01", "not a valid PEM or DER"),
        (b"\x30" * 20000, "larger than"),
        ("", "empty"),
    ],
    ids=["empty", "garbage", "bad-pem", "bad-der", "too-large", "empty-str"],
)
def test_garbage_is_invalid(data: bytes | str, reason: str) -> None:
    with pytest.raises(InvalidCsr, match=reason):
        check_csr(data, WEB)
    with pytest.raises(InvalidCsr):
        meshca.load_csr(data)


def test_a_certificate_is_not_a_csr(ca: TestCA) -> None:
    cert_pem = ca.anchor.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCsr):
        check_csr(cert_pem, WEB)


def test_invalid_csr_is_a_value_error() -> None:
    assert issubclass(InvalidCsr, ValueError)
    assert issubclass(InvalidCsr, meshca.MeshcaError)


# -- key policy


def test_key_type_outside_the_policy() -> None:
    policy = KeyPolicy(frozenset({KeyType.EC_P256}))
    with pytest.raises(KeyPolicyError, match="key type ec-p384 is not allowed; allowed: ec-p256"):
        check_csr(build_csr(meshca.generate_key(KeyType.EC_P384), WEB), WEB, policy=policy)
    with pytest.raises(KeyPolicyError, match="rsa-2048 is not allowed"):
        check_csr(build_csr(meshca.generate_key(KeyType.RSA_2048), WEB), WEB, policy=policy)
    assert check_csr(build_csr(meshca.generate_key(), WEB), WEB, policy=policy).key_type is KeyType.EC_P256


def test_default_policy_allows_every_key_type() -> None:
    for key_type in (KeyType.EC_P384, KeyType.RSA_2048):
        assert check_csr(build_csr(meshca.generate_key(key_type), WEB), WEB).key_type is key_type


def test_unsupported_keys_are_refused_whatever_the_policy() -> None:
    p521 = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(KeyPolicyError, match="secp521r1"):
        check_csr(_csr(p521), WEB)  # type: ignore[arg-type]
    rsa1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyPolicyError, match="1024"):
        check_csr(_csr(rsa1024), WEB)


# -- names


@pytest.mark.parametrize(
    ("csr", "allowed_dns", "reason"),
    [
        (
            lambda: build_csr(meshca.generate_key(), SpiffeId.parse("spiffe://example.org/ns/default/sa/admin")),
            (),
            "CSR asks for URI 'spiffe://example.org/ns/default/sa/admin'",
        ),
        (
            lambda: build_csr(meshca.generate_key(), SpiffeId.parse("spiffe://other.test/ns/default/sa/web")),
            (),
            "asks for URI",
        ),
        (
            lambda: _csr(
                names=[
                    x509.UniformResourceIdentifier(str(WEB)),
                    x509.UniformResourceIdentifier("spiffe://example.org/x"),
                ]
            ),
            (),
            "asks for URI 'spiffe://example.org/x'",
        ),
        (
            lambda: _csr(names=[x509.UniformResourceIdentifier("https://example.org/web")]),
            (),
            "asks for URI 'https://example.org/web'",
        ),
        (
            lambda: build_csr(meshca.generate_key(), WEB, dns_names=["evil.example.org"]),
            (),
            "DNS name 'evil.example.org'",
        ),
        (
            lambda: build_csr(meshca.generate_key(), WEB, dns_names=["web", "evil"]),
            ("web",),
            "DNS name 'evil', which is not granted",
        ),
        (
            lambda: _csr(names=[x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
            (),
            "IPAddress",
        ),
        (lambda: _csr(names=[x509.RFC822Name("web@example.org")]), (), "RFC822Name"),
        (lambda: _csr(cn="admin"), (), "common name 'admin'"),
        (lambda: _csr(cn="spiffe://example.org/ns/default/sa/admin"), (), "common name"),
        (lambda: _csr(cn="evil", names=[x509.DNSName("web")]), ("web",), "common name 'evil'"),
    ],
    ids=[
        "uri-other-id",
        "uri-other-td",
        "uri-two",
        "uri-not-spiffe",
        "dns-not-granted",
        "dns-one-not-granted",
        "ip-san",
        "email-san",
        "cn",
        "cn-other-id",
        "cn-not-dns",
    ],
)
def test_names_not_granted_are_refused(csr: Callable[[], bytes], allowed_dns: tuple[str, ...], reason: str) -> None:
    with pytest.raises(CsrNameMismatch) as info:
        check_csr(csr(), WEB, allowed_dns=allowed_dns)
    assert reason in str(info.value)
    assert isinstance(info.value, meshca.MeshcaError)


def test_checked_csr_signs_into_a_verifiable_svid(ca: TestCA) -> None:
    key = meshca.generate_key()
    checked = check_csr(build_csr(key, WEB, dns_names=[LINKERD]), WEB, allowed_dns=[LINKERD])
    svid = ca.issuer.sign(checked.public_key, WEB, now=NOW, dns_names=checked.dns_names)
    assert svid.leaf.public_key() == key.public_key()
    assert meshca.verify_chain(svid.chain_der(), ca.bundle, at=NOW) == WEB


@pytest.mark.parametrize(
    ("csr", "reason"),
    [
        (lambda: malformed.csr_version(str(WEB), 5), "not a valid PEM or DER"),
        (lambda: malformed.csr_with_san_tag(str(WEB), 0xA3), "extensions cannot be parsed"),
        (lambda: malformed.csr_with_san_tag(str(WEB), 0xA5), "extensions cannot be parsed"),
        (lambda: malformed.csr_with_key(str(WEB), malformed.unknown_key_algorithm()), "public key cannot be read"),
        (lambda: malformed.csr_with_key(str(WEB), malformed.explicit_p256_parameters()), "canonical encoding"),
    ],
    ids=["version-5", "x400-address-san", "edi-party-name-san", "unknown-key-algorithm", "explicit-ec-parameters"],
)
def test_malformed_requests_are_invalid_csrs(csr: Callable[[], bytes], reason: str) -> None:
    """Each is validly signed: the parse or the key rule refuses it, with `InvalidCsr`, never another error."""
    with pytest.raises(InvalidCsr) as info:
        check_csr(csr(), WEB)
    assert reason in str(info.value)


def test_the_der_editing_keeps_a_correct_request_correct() -> None:
    """The helpers above only change what they are asked to: unedited, the request passes."""
    algorithm = malformed.tlv(0x30, malformed.EC_PUBLIC_KEY_OID + malformed.P256_OID)
    assert check_csr(malformed.csr_with_key(str(WEB), algorithm), WEB).key_type == KeyType.EC_P256
    assert check_csr(malformed.csr_version(str(WEB), 0), WEB).key_type == KeyType.EC_P256
