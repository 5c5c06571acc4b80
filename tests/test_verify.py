"""Chain verification: path validation at a frozen time, the SPIFFE leaf rules, and authorizers.

Every bad certificate is minted here, at test time, with a frozen clock.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from support.certbuild import NOW, build, ext, intermediate, key_usage, leaf
from support.certs import looping_chain

import meshca
from meshca import (
    AuthorizationError,
    SpiffeId,
    TrustDomain,
    VerificationError,
    authorize_any,
    authorize_id,
    authorize_if,
    authorize_member_of,
    authorize_one_of,
    leaf_spiffe_id,
    verify_chain,
)
from meshca.pki._verify import MAX_CHAIN
from meshca.testing import FrozenClock, TestCA

WEB = SpiffeId.parse("spiffe://example.org/web")
DB = SpiffeId.parse("spiffe://example.org/db")
TD = TrustDomain("example.org")
OTHER_TD = TrustDomain("other.test")


@dataclass(frozen=True)
class Cas:
    ca: TestCA
    rogue: TestCA
    foreign: TestCA


@dataclass(frozen=True)
class Case:
    """A chain to verify, what to verify it against, and the rule that must be named."""

    chain: Any
    reason: str
    bundles: Any = None  # default: the main CA's bundle
    role: str | None = None
    at: datetime = NOW


def _with_issuer(cas: Cas, cert: x509.Certificate) -> list[x509.Certificate]:
    return [cert, cas.ca.issuer_certificate]


def _under(cas: Cas, signer: tuple[x509.Certificate, meshca.PrivateKey], **leaf_kw: Any) -> list[x509.Certificate]:
    return [leaf(cas.ca, now=NOW, signer=signer, **leaf_kw), signer[0]]


def _expired_intermediate(cas: Cas) -> Case:
    inter = intermediate(cas.ca, now=NOW, not_before=NOW - timedelta(days=10), not_after=NOW - timedelta(hours=1))
    short = inter[0].fingerprint(hashes.SHA256()).hex(":")[:23]
    return Case(_under(cas, inter), f"intermediate 1 ({short}) expired at")


def _not_yet_valid_intermediate(cas: Cas) -> Case:
    inter = intermediate(cas.ca, now=NOW, not_before=NOW + timedelta(hours=1))
    short = inter[0].fingerprint(hashes.SHA256()).hex(":")[:23]
    return Case(_under(cas, inter), f"intermediate 1 ({short}) is not valid before")


def _below_the_issuer(cas: Cas) -> Case:
    """The issuer has pathlen 0: a CA it signs must not be usable."""
    sub_key = meshca.generate_key()
    sub = build(
        public_key=sub_key.public_key(),
        signer_name=cas.ca.issuer_certificate.subject,
        signer_key=cas.ca.issuer_key,
        not_before=NOW - timedelta(minutes=1),
        not_after=NOW + timedelta(days=1),
        subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "sub-CA below the issuer")]),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (key_usage("key_cert_sign", "crl_sign"), True),
            (x509.SubjectKeyIdentifier.from_public_key(sub_key.public_key()), False),
            (
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    ext(cas.ca.issuer_certificate, x509.SubjectKeyIdentifier).value
                ),
                False,
            ),
        ],
    )
    chain = [*_under(cas, (sub, sub_key)), cas.ca.issuer_certificate]
    return Case(chain, "does not lead to an anchor of example.org")


BAD_CHAINS: dict[str, Callable[[Cas], Case]] = {
    "zero-uri-sans": lambda c: Case(_with_issuer(c, leaf(c.ca, now=NOW, uris=())), "exactly one URI SAN, has 0"),
    "two-uri-sans": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, uris=(str(WEB), str(DB)))), "exactly one URI SAN, has 2"
    ),
    "non-spiffe-uri": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, uris=("https://example.org/web",))), "URI SAN is not a SPIFFE ID"
    ),
    "malformed-spiffe-uri": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, uris=("spiffe://example.org/web/",))), "trailing slash"
    ),
    "spiffe-id-without-path": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, uris=("spiffe://example.org",))), "has no path"
    ),
    "leaf-ca-true": lambda c: Case(_with_issuer(c, leaf(c.ca, now=NOW, ca_flag=True)), "leaf is a CA certificate"),
    "leaf-without-key-usage": lambda c: Case(_with_issuer(c, leaf(c.ca, now=NOW, ku=None)), "no keyUsage"),
    "key-usage-without-digital-signature": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, ku=key_usage("key_encipherment"))), "lacks digitalSignature"
    ),
    "leaf-with-key-cert-sign": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, ku=key_usage("digital_signature", "key_cert_sign"))),
        "keyCertSign or cRLSign",
    ),
    "leaf-with-crl-sign": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, ku=key_usage("digital_signature", "crl_sign"))),
        "keyCertSign or cRLSign",
    ),
    "eku-without-client-auth": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]))),
        "lacks clientAuth",
        role="client",
    ),
    "eku-without-server-auth": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))),
        "lacks serverAuth",
        role="server",
    ),
    "eku-code-signing-only": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]))),
        "lacks clientAuth",
        role="client",
    ),
    "intermediate-not-ca": lambda c: Case(
        _under(c, intermediate(c.ca, now=NOW, ca_flag=False)), "is not a CA (basicConstraints CA false)"
    ),
    "intermediate-without-key-cert-sign": lambda c: Case(
        _under(c, intermediate(c.ca, now=NOW, ku=key_usage("digital_signature", "crl_sign"))),
        "keyUsage lacks keyCertSign",
    ),
    "intermediate-without-key-usage": lambda c: Case(
        _under(c, intermediate(c.ca, now=NOW, ku=None)), "has no keyUsage, so it may not sign"
    ),
    "wrong-trust-domain": lambda c: Case(
        [c.foreign.issue_svid("spiffe://other.test/web", now=NOW).leaf, c.foreign.issuer_certificate],
        "leaf is in trust domain other.test, the bundle is for example.org",
    ),
    "federation-without-that-trust-domain": lambda c: Case(
        [c.foreign.issue_svid("spiffe://other.test/web", now=NOW).leaf, c.foreign.issuer_certificate],
        "no trust bundle for trust domain other.test",
        bundles=types.MappingProxyType({TD: c.ca.bundle}),
    ),
    "federation-leaf-claims-other-trust-domain": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, uris=("spiffe://other.test/web",))),
        "does not lead to an anchor of other.test",
        bundles={TD: c.ca.bundle, OTHER_TD: c.foreign.bundle},
    ),
    "expired-leaf": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, not_before=NOW - timedelta(hours=2), not_after=NOW - timedelta(seconds=1))),
        "leaf expired at",
    ),
    "not-yet-valid-leaf": lambda c: Case(
        _with_issuer(c, leaf(c.ca, now=NOW, not_before=NOW + timedelta(seconds=1))), "leaf is not valid before"
    ),
    "issued-leaf-verified-after-its-ttl": lambda c: Case(
        c.ca.issue_svid(WEB, now=NOW).chain, "leaf expired at", at=NOW + timedelta(hours=24, seconds=1)
    ),
    "issued-leaf-verified-before-its-start": lambda c: Case(
        c.ca.issue_svid(WEB, now=NOW + timedelta(hours=1)).chain, "leaf is not valid before"
    ),
    "expired-intermediate": _expired_intermediate,
    "not-yet-valid-intermediate": _not_yet_valid_intermediate,
    "unknown-anchor-same-trust-domain": lambda c: Case(
        c.rogue.issue_svid(WEB, now=NOW).chain, "does not lead to an anchor of example.org"
    ),
    "leaf-signed-with-the-wrong-key": lambda c: Case(
        _under(c, (c.ca.issuer_certificate, c.rogue.issuer_key)), "does not lead to an anchor"
    ),
    "leaf-without-its-intermediate": lambda c: Case([c.ca.issue_svid(WEB, now=NOW).leaf], "does not lead to an anchor"),
    "path-length-of-the-issuer-exceeded": _below_the_issuer,
    "garbage-bytes": lambda c: Case(b"garbage", "cannot read the chain"),
    "garbage-pem": lambda c: Case(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "cannot read the chain"
    ),
    "garbage-der-list": lambda c: Case([b"\x30\x00"], "cannot read the chain"),
    "empty-list": lambda c: Case([], "cannot read the chain: no certificates"),
    "empty-bytes": lambda c: Case(b"", "cannot read the chain"),
}


@pytest.fixture(scope="module")
def cas(ca: TestCA, rogue_ca: TestCA, foreign_ca: TestCA) -> Cas:
    return Cas(ca, rogue_ca, foreign_ca)


@pytest.mark.parametrize("name", list(BAD_CHAINS))
def test_bad_chain_is_refused_naming_the_rule(cas: Cas, clock: FrozenClock, name: str) -> None:
    case = BAD_CHAINS[name](cas)
    clock.now = case.at
    bundles = case.bundles if case.bundles is not None else cas.ca.bundle
    with pytest.raises(VerificationError) as info:
        verify_chain(case.chain, bundles, at=clock(), role=case.role)  # type: ignore[arg-type]
    assert case.reason in str(info.value)
    assert not isinstance(info.value, AuthorizationError), "a broken chain is not an authorization decision"
    assert isinstance(info.value, meshca.MeshcaError)


@pytest.mark.parametrize("form", ["pem-bytes", "pem-str", "der-list", "objects", "tuple-of-objects"])
def test_good_chain_in_every_form(ca: TestCA, form: str) -> None:
    svid = ca.issuer.sign(meshca.generate_key().public_key(), WEB, now=NOW)
    chain: Any = {
        "pem-bytes": svid.chain_pem(),
        "pem-str": svid.chain_pem().decode(),
        "der-list": svid.chain_der(),
        "objects": [svid.leaf, *svid.intermediates],
        "tuple-of-objects": (svid.leaf, *svid.intermediates),
    }[form]
    assert verify_chain(chain, ca.bundle, at=NOW) == WEB


@pytest.mark.parametrize("role", [None, "client", "server"])
def test_good_chain_for_each_role(ca: TestCA, role: str | None) -> None:
    svid = ca.issue_svid(WEB, now=NOW)
    assert verify_chain(svid.chain, ca.bundle, at=NOW, role=role) == WEB  # type: ignore[arg-type]


@pytest.mark.parametrize("role", ["client", "server"])
def test_leaf_without_eku_is_accepted_in_any_role(ca: TestCA, role: str) -> None:
    cert = leaf(ca, now=NOW, eku=None)
    assert verify_chain([cert, ca.issuer_certificate], ca.bundle, at=NOW, role=role) == WEB  # type: ignore[arg-type]


def test_hand_built_leaf_with_the_correct_profile_passes(ca: TestCA) -> None:
    """The negative table bends one field of this leaf at a time; unbent, it must verify."""
    cert = leaf(ca, now=NOW)
    assert verify_chain([cert, ca.issuer_certificate], ca.bundle, at=NOW, role="client") == WEB
    inter = intermediate(ca, now=NOW)
    assert verify_chain(_under(Cas(ca, ca, ca), inter), ca.bundle, at=NOW, role="server") == WEB


def test_validity_follows_the_frozen_clock(ca: TestCA, clock: FrozenClock) -> None:
    svid = ca.issue_svid(WEB, now=clock(), ttl=timedelta(hours=1))
    assert verify_chain(svid.chain, ca.bundle, at=clock()) == WEB
    clock.advance(timedelta(minutes=59))
    assert verify_chain(svid.chain, ca.bundle, at=clock()) == WEB
    clock.advance(timedelta(minutes=2))
    with pytest.raises(VerificationError, match="leaf expired"):
        verify_chain(svid.chain, ca.bundle, at=clock())


def test_federation_with_a_mapping(ca: TestCA, foreign_ca: TestCA) -> None:
    bundles = {TD: ca.bundle, OTHER_TD: foreign_ca.bundle}
    ours = ca.issue_svid(WEB, now=NOW)
    theirs = foreign_ca.issue_svid("spiffe://other.test/api", now=NOW)
    assert verify_chain(ours.chain, bundles, at=NOW) == WEB
    assert verify_chain(theirs.chain, bundles, at=NOW) == SpiffeId.parse("spiffe://other.test/api")
    assert verify_chain(theirs.chain, types.MappingProxyType(bundles), at=NOW).trust_domain == OTHER_TD
    with pytest.raises(VerificationError, match=r"no trust bundle for trust domain other\.test"):
        verify_chain(theirs.chain, {TD: ca.bundle}, at=NOW)


def test_bundle_with_several_anchors(ca: TestCA, rogue_ca: TestCA) -> None:
    """During anchor rotation both the old and the new anchor verify."""
    both = ca.bundle.with_anchor(rogue_ca.anchor)
    assert verify_chain(ca.issue_svid(WEB, now=NOW).chain, both, at=NOW) == WEB
    assert verify_chain(rogue_ca.issue_svid(WEB, now=NOW).chain, both, at=NOW) == WEB
    after = both.without_anchor(ca.anchor)
    with pytest.raises(VerificationError, match="does not lead to an anchor"):
        verify_chain(ca.issue_svid(WEB, now=NOW).chain, after, at=NOW)


# -- leaf_spiffe_id


def test_leaf_spiffe_id(ca: TestCA) -> None:
    assert leaf_spiffe_id(ca.issue_svid(WEB, now=NOW).leaf) == WEB
    with pytest.raises(VerificationError, match="exactly one URI SAN, has 0"):
        leaf_spiffe_id(leaf(ca, now=NOW, uris=()))
    with pytest.raises(VerificationError, match="has no path"):
        leaf_spiffe_id(ca.anchor)


# -- authorizers

AUTHORIZERS: list[tuple[str, meshca.Authorizer, list[str], list[str], str]] = [
    ("id", authorize_id(WEB), [str(WEB)], [str(DB), "spiffe://other.test/web", "spiffe://example.org/web/x"], str(WEB)),
    (
        "one-of",
        authorize_one_of(WEB, DB),
        [str(WEB), str(DB)],
        ["spiffe://example.org/api", "spiffe://other.test/db"],
        "one of spiffe://example.org/db, spiffe://example.org/web",
    ),
    (
        "member-of",
        authorize_member_of(TD),
        [str(WEB), "spiffe://example.org/anything/else"],
        ["spiffe://other.test/web", "spiffe://example.org.evil/web", "spiffe://sub.example.org/web"],
        "a member of example.org",
    ),
    (
        "if",
        authorize_if(lambda sid: sid.path.startswith("/ns/prod/"), "a workload in ns prod"),
        ["spiffe://example.org/ns/prod/sa/web"],
        ["spiffe://example.org/ns/dev/sa/web", str(WEB)],
        "a workload in ns prod",
    ),
    ("any", authorize_any(), [str(WEB), "spiffe://other.test/x"], [], "any SPIFFE ID"),
]


@pytest.mark.parametrize(
    ("authorizer", "allowed", "refused", "description"), [a[1:] for a in AUTHORIZERS], ids=[a[0] for a in AUTHORIZERS]
)
def test_authorizers(authorizer: meshca.Authorizer, allowed: list[str], refused: list[str], description: str) -> None:
    for text in allowed:
        authorizer(SpiffeId.parse(text))
        assert authorizer.allows(SpiffeId.parse(text))
    for text in refused:
        with pytest.raises(AuthorizationError) as info:
            authorizer(SpiffeId.parse(text))
        assert f"peer {text} is not authorized" in str(info.value)
        assert description in str(info.value)
        assert isinstance(info.value, VerificationError)
    assert authorizer.description == description


def test_verify_chain_applies_the_authorizer(ca: TestCA) -> None:
    chain = ca.issue_svid(WEB, now=NOW).chain
    assert verify_chain(chain, ca.bundle, at=NOW, authorizer=authorize_id(WEB)) == WEB
    assert verify_chain(chain, ca.bundle, at=NOW, authorizer=authorize_member_of(TD)) == WEB
    with pytest.raises(AuthorizationError, match=r"expected spiffe://example\.org/db"):
        verify_chain(chain, ca.bundle, at=NOW, authorizer=authorize_id(DB))
    with pytest.raises(AuthorizationError):
        verify_chain(chain, ca.bundle, at=NOW, authorizer=authorize_one_of(DB))
    with pytest.raises(AuthorizationError):
        verify_chain(chain, ca.bundle, at=NOW, authorizer=authorize_if(lambda _: False))


def test_authorizer_is_asked_only_after_the_chain_verifies(rogue_ca: TestCA, ca: TestCA) -> None:
    asked: list[SpiffeId] = []

    def spy(sid: SpiffeId) -> bool:
        asked.append(sid)
        return True

    with pytest.raises(VerificationError) as info:
        verify_chain(rogue_ca.issue_svid(WEB, now=NOW).chain, ca.bundle, at=NOW, authorizer=authorize_if(spy))
    assert not isinstance(info.value, AuthorizationError)
    assert asked == []
    verify_chain(ca.issue_svid(WEB, now=NOW).chain, ca.bundle, at=NOW, authorizer=authorize_if(spy))
    assert asked == [WEB]


def test_a_looping_chain_is_refused_before_any_path_is_searched() -> None:
    """Every caller of verify_chain (a TLS peer's chain too, not only a proof's) is spared the path search
    over copies of one key: four took cryptography's verifier 50 s."""
    ca = TestCA("example.org")
    now = ca.now + timedelta(minutes=1)
    chain, _ = looping_chain("spiffe://example.org/w", 4, now)
    with pytest.raises(VerificationError, match="the same public key in two certificates"):
        verify_chain(chain, ca.bundle, at=now)
    long_chain, _ = looping_chain("spiffe://example.org/w", MAX_CHAIN, now, distinct_keys=True)
    with pytest.raises(VerificationError, match=f"{MAX_CHAIN + 1} certificates, at most {MAX_CHAIN}"):
        verify_chain(long_chain, ca.bundle, at=now)
