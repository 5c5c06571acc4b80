"""The leaf template encodes exactly what cryptography's builder encodes for the same profile fields."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.certbuild import NOW

import meshca
from meshca import KeyType, SpiffeId
from meshca.pki import _template
from meshca.pki._profiles import leaf_builder, leaf_fields
from meshca.pki._template import LeafTemplate
from meshca.testing import TestCA

# Key generation is the slow part: one issuer per key type, a few leaf keys per type.
ISSUERS = {
    kt: TestCA("example.org", now=NOW, key_type=kt) for kt in (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048)
}
LEAF_KEYS = [
    meshca.generate_key(kt).public_key()
    for kt in (KeyType.EC_P256, KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.RSA_3072)
]

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
dns_names = st.lists(
    st.lists(_label, min_size=1, max_size=4).map(".".join).filter(lambda n: len(n) <= 64),
    max_size=3,
    unique=True,
)
paths = st.lists(st.from_regex(r"[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,29}", fullmatch=True), min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)


def _template_of(ca: TestCA) -> LeafTemplate:
    template = ca.issuer._template
    assert template is not None
    return template


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    issuer_type=st.sampled_from(sorted(ISSUERS, key=str)),
    public_key=st.sampled_from(LEAF_KEYS),
    path=paths,
    names=dns_names,
    ttl=st.integers(min_value=1, max_value=400 * 86400).map(lambda s: timedelta(seconds=s)),
    offset=st.integers(min_value=0, max_value=300 * 86400).map(lambda s: timedelta(seconds=s, microseconds=s % 7)),
    serial=st.integers(min_value=1, max_value=2**159 - 1),
)
def test_tbs_is_byte_identical_to_the_builders(
    issuer_type: KeyType,
    public_key: meshca.PublicKey,
    path: str,
    names: list[str],
    ttl: timedelta,
    offset: timedelta,
    serial: int,
) -> None:
    ca = ISSUERS[issuer_type]
    now = NOW + offset
    fields = leaf_fields(
        public_key,
        ca.trust_domain.spiffe_id(path),
        names,
        ca.issuer._aki,
        now=now,
        not_after=now + ttl,
        not_before_floor=ca.issuer.not_before,
    )
    fields = dataclasses.replace(fields, serial=serial)
    expected = leaf_builder(ca.issuer.certificate.subject, public_key, fields).sign(ca.issuer_key, ca.issuer._hash)
    template = _template_of(ca)
    assert template.tbs(fields, public_key) == expected.tbs_certificate_bytes
    made = x509.load_der_x509_certificate(template.sign(fields, public_key))
    assert made.tbs_certificate_bytes == expected.tbs_certificate_bytes
    assert made.signature_algorithm_oid == expected.signature_algorithm_oid
    made.verify_directly_issued_by(ca.issuer_certificate)  # the signature is the issuer's, over these bytes


@pytest.mark.parametrize(
    "when",
    [
        datetime(1950, 1, 1, tzinfo=UTC),
        datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2050, 1, 1, tzinfo=UTC),  # GeneralizedTime from here on
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2030, 6, 1, 12, 0, 0, 999999),  # naive: read as UTC, microseconds dropped
    ],
)
def test_time_encoding_matches_at_the_boundaries(when: datetime) -> None:
    ca = ISSUERS[KeyType.EC_P256]
    public_key = LEAF_KEYS[0]
    fields = leaf_fields(
        public_key,
        SpiffeId.parse("spiffe://example.org/web"),
        ["web.example.org"],
        ca.issuer._aki,
        now=NOW,
        not_after=when,
        not_before_floor=NOW,
    )
    fields = dataclasses.replace(fields, not_before=when)
    expected = leaf_builder(ca.issuer.certificate.subject, public_key, fields).sign(ca.issuer_key, ca.issuer._hash)
    assert _template_of(ca).tbs(fields, public_key) == expected.tbs_certificate_bytes


def test_issuer_sign_uses_the_template_and_returns_its_der() -> None:
    ca = ISSUERS[KeyType.EC_P256]
    svid = ca.issuer.sign(LEAF_KEYS[0], SpiffeId.parse("spiffe://example.org/web"), now=NOW, dns_names=["a.example"])
    assert svid.leaf_der() == svid.leaf.public_bytes(serialization.Encoding.DER)
    assert meshca.verify_chain(svid.chain_der(), ca.bundle, at=NOW) == svid.spiffe_id


def test_dates_before_1950_are_generalized_time() -> None:
    # cryptography's builder cannot make these (it panics), so there is nothing to compare with.
    ca = ISSUERS[KeyType.EC_P256]
    fields = leaf_fields(
        LEAF_KEYS[0],
        SpiffeId.parse("spiffe://example.org/web"),
        [],
        ca.issuer._aki,
        now=NOW,
        not_after=NOW,
        not_before_floor=NOW,
    )
    old = dataclasses.replace(fields, not_before=datetime(1949, 12, 31, 23, 59, 59, tzinfo=UTC))
    leaf = x509.load_der_x509_certificate(_template_of(ca).sign(old, LEAF_KEYS[0]))
    assert leaf.not_valid_before_utc == old.not_before
    assert b"\x18\x0f19491231235959Z" in leaf.tbs_certificate_bytes


def test_a_template_that_disagrees_with_the_builder_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if cryptography changed an encoding: the self-check at construction catches it.
    monkeypatch.setattr(_template, "_UTC_TIME_YEARS", range(0))
    ca = TestCA("example.org", now=NOW)
    assert ca.issuer._template is None
    svid = ca.issuer.sign(LEAF_KEYS[0], SpiffeId.parse("spiffe://example.org/web"), now=NOW)
    assert svid.leaf_der() == svid.leaf.public_bytes(serialization.Encoding.DER)
    assert meshca.verify_chain(svid.chain_der(), ca.bundle, at=NOW) == svid.spiffe_id
