"""Trust bundles: PEM and SPIFFE JSON formats, sequence numbers, immutability."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import Store
from support.certbuild import NOW, build, intermediate, key_usage

import meshca
from meshca import BundleError, TrustBundle, TrustDomain
from meshca.testing import TestCA

TD = TrustDomain("example.org")


def _der_b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


@pytest.fixture(scope="module")
def two_anchor_bundle(ca: TestCA, rogue_ca: TestCA) -> TrustBundle:
    return TrustBundle(TD, (ca.anchor, rogue_ca.anchor), sequence=7, refresh_hint=timedelta(minutes=5))


# -- PEM


def test_pem_round_trip(two_anchor_bundle: TrustBundle) -> None:
    pem = two_anchor_bundle.to_pem()
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    back = TrustBundle.from_pem(pem)
    assert back.trust_domain == TD
    assert back.anchors == two_anchor_bundle.anchors
    assert TrustBundle.from_pem(pem.decode()).anchors == two_anchor_bundle.anchors


def test_pem_trust_domain_is_inferred_from_the_anchor_uri_san(foreign_ca: TestCA) -> None:
    bundle = TrustBundle.from_pem(foreign_ca.bundle.to_pem())
    assert bundle.trust_domain == TrustDomain("other.test")


def test_pem_with_explicit_trust_domain(ca: TestCA) -> None:
    assert TrustBundle.from_pem(ca.bundle.to_pem(), TD).trust_domain == TD
    with pytest.raises(BundleError, match=r"names trust domain example\.org, not other\.test"):
        TrustBundle.from_pem(ca.bundle.to_pem(), TrustDomain("other.test"))


def test_pem_naming_several_trust_domains_is_refused(ca: TestCA, foreign_ca: TestCA) -> None:
    pem = ca.bundle.to_pem() + foreign_ca.bundle.to_pem()
    with pytest.raises(BundleError, match="names several trust domains"):
        TrustBundle.from_pem(pem)


def test_pem_naming_no_trust_domain_needs_one(ca: TestCA) -> None:
    anchor_key = meshca.generate_key()
    anonymous = build(
        public_key=anchor_key.public_key(),
        signer_name=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "anon")]),
        signer_key=anchor_key,
        not_before=NOW,
        not_after=NOW + timedelta(days=1),
        subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "anon")]),
        extensions=[(x509.BasicConstraints(ca=True, path_length=None), True), (key_usage("key_cert_sign"), True)],
    )
    pem = anonymous.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(BundleError, match="names no trust domain"):
        TrustBundle.from_pem(pem)
    assert TrustBundle.from_pem(pem, TD).anchors == (anonymous,)


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_pem_garbage(data: bytes) -> None:
    with pytest.raises(BundleError, match="cannot read trust bundle"):
        TrustBundle.from_pem(data, TD)


def test_non_ca_certificates_are_refused(ca: TestCA) -> None:
    leaf = ca.issue_svid("spiffe://example.org/web", now=NOW).leaf
    with pytest.raises(BundleError, match="is not a CA"):
        TrustBundle(TD, (leaf,))
    with pytest.raises(BundleError, match="is not a CA"):
        TrustBundle.from_pem(leaf.public_bytes(serialization.Encoding.PEM), TD)
    with pytest.raises(BundleError, match="is not a CA"):
        ca.bundle.with_anchor(leaf)
    no_cert_sign, _ = intermediate(ca, now=NOW, ku=key_usage("digital_signature", "crl_sign"))
    with pytest.raises(BundleError, match="keyCertSign"):
        TrustBundle(TD, (no_cert_sign,))


def test_an_empty_bundle_is_refused() -> None:
    with pytest.raises(BundleError, match="no anchors"):
        TrustBundle(TD, ())


def test_duplicate_anchors_collapse(ca: TestCA) -> None:
    assert TrustBundle(TD, (ca.anchor, ca.anchor)).anchors == (ca.anchor,)


def test_bundle_errors_are_value_errors() -> None:
    assert issubclass(BundleError, ValueError)
    assert issubclass(BundleError, meshca.MeshcaError)


# -- SPIFFE bundle JSON


def test_spiffe_json_round_trip(two_anchor_bundle: TrustBundle) -> None:
    data = two_anchor_bundle.to_spiffe_json()
    back = TrustBundle.from_spiffe_json(data, TD)
    assert back == two_anchor_bundle
    assert back.anchors == two_anchor_bundle.anchors
    assert back.sequence == 7
    assert back.refresh_hint == timedelta(minutes=5)
    assert TrustBundle.from_spiffe_json(data.decode(), TD) == two_anchor_bundle


def test_spiffe_json_shape(two_anchor_bundle: TrustBundle) -> None:
    doc = json.loads(two_anchor_bundle.to_spiffe_json())
    assert set(doc) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300
    assert len(doc["keys"]) == 2
    for entry, anchor in zip(doc["keys"], two_anchor_bundle.anchors, strict=True):
        assert entry["use"] == "x509-svid"
        assert "kid" not in entry
        assert isinstance(entry["x5c"], list)
        assert len(entry["x5c"]) == 1
        assert entry["x5c"][0] == _der_b64(anchor)
        assert entry["kty"] == "EC"
        assert entry["crv"] == "P-256"
        numbers = anchor.public_key().public_numbers()  # type: ignore[union-attr]
        x = base64.urlsafe_b64decode(entry["x"] + "==")
        assert len(x) == 32
        assert int.from_bytes(x, "big") == numbers.x
        assert "=" not in entry["x"] + entry["y"], "base64url without padding"


def test_spiffe_json_without_refresh_hint(ca: TestCA) -> None:
    doc = json.loads(ca.bundle.to_spiffe_json())
    assert doc["spiffe_sequence"] == 0
    assert "spiffe_refresh_hint" not in doc
    assert TrustBundle.from_spiffe_json(ca.bundle.to_spiffe_json(), TD).refresh_hint is None


JWT_KEY = {"kty": "EC", "crv": "P-256", "x": "eA", "y": "eQ", "kid": "k1", "use": "jwt-svid"}


def test_spiffe_json_carries_jwt_svid_keys_after_the_x509_ones(ca: TestCA) -> None:
    doc = json.loads(ca.bundle.to_spiffe_json([JWT_KEY]))
    assert [k["use"] for k in doc["keys"]] == ["x509-svid", "jwt-svid"]
    assert doc["keys"][1] == JWT_KEY
    assert TrustBundle.from_spiffe_json(json.dumps(doc), TD) == ca.bundle  # readers of anchors skip them


@pytest.mark.parametrize("change", [{"use": "sig"}, {"kid": ""}, {"kid": None}])
def test_spiffe_json_refuses_a_jwt_key_without_its_use_and_kid(ca: TestCA, change: dict[str, object]) -> None:
    with pytest.raises(BundleError, match="a jwt-svid key needs"):
        ca.bundle.to_spiffe_json([{**JWT_KEY, **change}])


def test_spiffe_json_rsa_anchor() -> None:
    ca = TestCA("example.org", now=NOW, key_type=meshca.KeyType.RSA_2048)
    doc = json.loads(ca.bundle.to_spiffe_json())
    (entry,) = doc["keys"]
    assert entry["kty"] == "RSA"
    assert entry["e"] == "AQAB"
    assert TrustBundle.from_spiffe_json(json.dumps(doc), TD).anchors == (ca.anchor,)


def _doc(bundle: TrustBundle) -> dict[str, Any]:
    return json.loads(bundle.to_spiffe_json())  # type: ignore[no-any-return]


def test_jwt_svid_entries_are_skipped(ca: TestCA) -> None:
    doc = _doc(ca.bundle)
    doc["keys"].append({"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AAAA", "y": "AAAA"})
    doc["keys"].insert(0, {"use": "jwt-svid", "kty": "RSA", "kid": "k2", "n": "AQAB", "e": "AQAB"})
    bundle = TrustBundle.from_spiffe_json(json.dumps(doc), TD)
    assert bundle.anchors == (ca.anchor,)


def test_bundle_of_only_jwt_keys_has_no_anchors() -> None:
    doc = {"keys": [{"use": "jwt-svid", "kty": "EC", "kid": "k1"}], "spiffe_sequence": 1}
    with pytest.raises(BundleError, match="no anchors"):
        TrustBundle.from_spiffe_json(json.dumps(doc), TD)


def test_x5c_with_two_certificates_is_refused(ca: TestCA) -> None:
    doc = _doc(ca.bundle)
    doc["keys"][0]["x5c"].append(_der_b64(ca.issuer_certificate))
    with pytest.raises(BundleError, match="exactly one certificate"):
        TrustBundle.from_spiffe_json(json.dumps(doc), TD)


@pytest.mark.parametrize("x5c", [None, [], "abc", [1]], ids=["missing", "empty", "string", "not-str"])
def test_x5c_of_other_shapes_is_refused(ca: TestCA, x5c: object) -> None:
    doc = _doc(ca.bundle)
    if x5c is None:
        del doc["keys"][0]["x5c"]
    else:
        doc["keys"][0]["x5c"] = x5c
    with pytest.raises(BundleError, match="exactly one certificate"):
        TrustBundle.from_spiffe_json(json.dumps(doc), TD)


def test_x5c_that_is_not_der_is_refused(ca: TestCA) -> None:
    doc = _doc(ca.bundle)
    doc["keys"][0]["x5c"] = [base64.b64encode(b"not a certificate").decode()]
    with pytest.raises(BundleError, match="not a base64 DER certificate"):
        TrustBundle.from_spiffe_json(json.dumps(doc), TD)
    doc["keys"][0]["x5c"] = ["!!!not base64!!!"]
    with pytest.raises(BundleError, match="not a base64 DER certificate"):
        TrustBundle.from_spiffe_json(json.dumps(doc), TD)


def test_mismatched_jwk_parameters_are_refused(ca: TestCA, rogue_ca: TestCA) -> None:
    doc = _doc(ca.bundle)
    other = _doc(rogue_ca.bundle)["keys"][0]
    bad = copy.deepcopy(doc)
    bad["keys"][0]["x"], bad["keys"][0]["y"] = other["x"], other["y"]
    with pytest.raises(BundleError, match="do not match the certificate"):
        TrustBundle.from_spiffe_json(json.dumps(bad), TD)
    off_curve = copy.deepcopy(doc)
    off_curve["keys"][0]["y"] = other["y"]
    with pytest.raises(BundleError):
        TrustBundle.from_spiffe_json(json.dumps(off_curve), TD)
    wrong_curve = copy.deepcopy(doc)
    wrong_curve["keys"][0]["crv"] = "P-999"
    with pytest.raises(BundleError, match="malformed EC parameters"):
        TrustBundle.from_spiffe_json(json.dumps(wrong_curve), TD)


def test_mismatched_rsa_jwk_is_refused(ca: TestCA) -> None:
    rsa_ca = TestCA("example.org", now=NOW, key_type=meshca.KeyType.RSA_2048)
    doc = _doc(rsa_ca.bundle)
    doc["keys"][0]["e"] = "Aw"  # 3
    with pytest.raises(BundleError, match="do not match"):
        TrustBundle.from_spiffe_json(json.dumps(doc), TD)
    doc = _doc(rsa_ca.bundle)
    doc["keys"][0]["kty"] = "EC"
    doc["keys"][0].update(_doc(ca.bundle)["keys"][0] | {"x5c": doc["keys"][0]["x5c"]})
    with pytest.raises(BundleError, match="do not match"):
        TrustBundle.from_spiffe_json(json.dumps(doc), TD)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON"),
        ("[]", "JSON object with a 'keys' array"),
        ('{"spiffe_sequence": 1}', "'keys' array"),
        ('{"keys": {}}', "'keys' array"),
    ],
)
def test_spiffe_json_garbage(text: str, reason: str) -> None:
    with pytest.raises(BundleError, match=reason):
        TrustBundle.from_spiffe_json(text, TD)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("spiffe_sequence", "1", "spiffe_sequence must be an integer"),
        ("spiffe_sequence", True, "spiffe_sequence must be an integer"),
        ("spiffe_sequence", -1, "must not be negative"),
        ("spiffe_refresh_hint", "60", "spiffe_refresh_hint must be a non-negative integer"),
        ("spiffe_refresh_hint", -5, "spiffe_refresh_hint must be a non-negative integer"),
    ],
)
def test_spiffe_json_bad_fields(ca: TestCA, field: str, value: object, reason: str) -> None:
    doc = _doc(ca.bundle)
    doc[field] = value
    with pytest.raises(BundleError, match=reason):
        TrustBundle.from_spiffe_json(json.dumps(doc), TD)


def test_spiffe_json_anchor_of_another_trust_domain_is_refused(foreign_ca: TestCA) -> None:
    with pytest.raises(BundleError, match=r"names trust domain other\.test"):
        TrustBundle.from_spiffe_json(foreign_ca.bundle.to_spiffe_json(), TD)


# -- changes


def test_with_anchor_bumps_the_sequence_and_leaves_the_original(ca: TestCA, rogue_ca: TestCA) -> None:
    original = TrustBundle(TD, (ca.anchor,), sequence=3, refresh_hint=timedelta(seconds=30))
    grown = original.with_anchor(rogue_ca.anchor)
    assert grown.sequence == 4
    assert grown.anchors == (ca.anchor, rogue_ca.anchor)
    assert grown.refresh_hint == timedelta(seconds=30)
    assert rogue_ca.anchor in grown
    assert original.anchors == (ca.anchor,)
    assert original.sequence == 3
    assert rogue_ca.anchor not in original
    shrunk = grown.without_anchor(ca.anchor)
    assert shrunk.sequence == 5
    assert shrunk.anchors == (rogue_ca.anchor,)
    assert grown.anchors == (ca.anchor, rogue_ca.anchor)


def test_without_anchor_that_is_absent_or_last(ca: TestCA, rogue_ca: TestCA) -> None:
    with pytest.raises(BundleError, match="not in the bundle"):
        ca.bundle.without_anchor(rogue_ca.anchor)
    with pytest.raises(BundleError, match="no anchors"):
        ca.bundle.without_anchor(ca.anchor)


def test_with_anchor_of_another_trust_domain_is_refused(ca: TestCA, foreign_ca: TestCA) -> None:
    with pytest.raises(BundleError, match=r"names trust domain other\.test"):
        ca.bundle.with_anchor(foreign_ca.anchor)


def test_immutable(ca: TestCA, rogue_ca: TestCA) -> None:
    bundle = TrustBundle(TD, (ca.anchor,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.sequence = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.anchors = (rogue_ca.anchor,)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.trust_domain = TrustDomain("evil.org")  # type: ignore[misc]
    assert isinstance(bundle.anchors, tuple)
    assert bundle.sequence == 0


def test_list_of_anchors_is_frozen_into_a_tuple(ca: TestCA, rogue_ca: TestCA) -> None:
    anchors = [ca.anchor]
    bundle = TrustBundle(TD, anchors)  # type: ignore[arg-type]
    anchors.append(rogue_ca.anchor)
    assert bundle.anchors == (ca.anchor,)
    assert isinstance(bundle.anchors, tuple)


def test_equality(ca: TestCA) -> None:
    assert TrustBundle(TD, (ca.anchor,)) == TrustBundle(TD, (ca.anchor,))
    assert TrustBundle(TD, (ca.anchor,)) != TrustBundle(TD, (ca.anchor,), sequence=1)
    assert TrustBundle(TD, (ca.anchor,)) != ca.bundle.to_pem()


def test_store_is_usable(ca: TestCA) -> None:
    assert isinstance(ca.bundle.store, Store)


def test_trust_domain_must_be_a_trust_domain(ca: TestCA) -> None:
    with pytest.raises(BundleError, match="must be a TrustDomain"):
        TrustBundle("example.org", (ca.anchor,))  # type: ignore[arg-type]
