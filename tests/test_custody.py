"""Signing through the `Signer` interface: certificates assembled from a signature made outside cryptography."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pytest

import meshca
from meshca.pki._custody import Hash, MemoryKey
from meshca.pki._errors import KeyCustodyError
from meshca.pki._keys import KeyType, PublicKey
from meshca.pki._profiles import build_anchor, build_issuer
from meshca.testing import TestCA


@dataclass
class OutsideKey:
    """A Signer that is not a cryptography key object, as a token key is not; ``wrong`` signs with another key."""

    inner: MemoryKey
    wrong: MemoryKey | None = None

    @property
    def key_type(self) -> KeyType:
        return self.inner.key_type

    def public_key(self) -> PublicKey:
        return self.inner.public_key()

    def sign(self, data: bytes, algorithm: Hash) -> bytes:
        return (self.wrong or self.inner).sign(data, algorithm)


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_anchor_issuer_and_leaves_signed_outside_verify(key_type: KeyType, now: datetime) -> None:
    td = meshca.TrustDomain("example.org")
    anchor_key = OutsideKey(MemoryKey(meshca.generate_key(key_type)))
    anchor = build_anchor(anchor_key, td, now=now)
    anchor.verify_directly_issued_by(anchor)
    issuer_key = OutsideKey(MemoryKey(meshca.generate_key(key_type)))
    issuer_cert = build_issuer(issuer_key.public_key(), signer_certificate=anchor, signer_key=anchor_key,
                               trust_domain=td, now=now)  # fmt: skip
    issuer_cert.verify_directly_issued_by(anchor)
    issuer = meshca.Issuer([issuer_cert], issuer_key, meshca.TrustBundle(td, (anchor,)))
    svid = issuer.sign(meshca.generate_key().public_key(), td.spiffe_id("/web"), now=now)
    meshca.verify_chain([svid.leaf, *svid.intermediates], issuer.bundle, at=now)


def test_a_signature_from_another_key_is_caught_before_use(now: datetime) -> None:
    td = meshca.TrustDomain("example.org")
    faulty = OutsideKey(MemoryKey(meshca.generate_key()), wrong=MemoryKey(meshca.generate_key()))
    with pytest.raises(KeyCustodyError, match="does not verify"):
        build_anchor(faulty, td, now=now)
    ca = TestCA("example.org", now=now)
    good = OutsideKey(MemoryKey(ca.issuer_key))
    issuer = meshca.Issuer([ca.issuer_certificate], good, ca.bundle)
    good.wrong = MemoryKey(meshca.generate_key())
    with pytest.raises(KeyCustodyError, match="does not verify"):
        issuer.sign(meshca.generate_key().public_key(), td.spiffe_id("/web"), now=now)
