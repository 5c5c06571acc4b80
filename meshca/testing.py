"""A whole SPIFFE test CA in a few lines, in the spirit of trustme.

    ca = meshca.testing.TestCA("example.org")
    svid = ca.issue_svid("spiffe://example.org/web")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    svid.configure_cert(server_ctx)
    ca.configure_trust(server_ctx)

Certificates are minted at test time against a clock you control, so
expiry cases need no stored, expired files.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import certificates_pem
from meshca.pki._issuer import Issuer
from meshca.pki._keys import KeyType, PrivateKey, generate_key, private_key_pem
from meshca.pki._profiles import ANCHOR_LIFETIME, ISSUER_LIFETIME, LEAF_TTL, new_trust_domain
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._time import system_clock
from meshca.pki._trustdir import TrustDir

__all__ = ["FrozenClock", "TestCA", "TestSvid"]


@dataclass
class FrozenClock:
    """A clock that stands still until told to move."""

    now: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


@dataclass(frozen=True)
class TestSvid:
    """An issued SVID with its key, ready to load into TLS contexts."""

    __test__ = False  # not a pytest test class

    spiffe_id: SpiffeId
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def chain_pem(self) -> bytes:
        return certificates_pem(self.chain)

    @property
    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    def configure_cert(self, context: ssl.SSLContext) -> None:
        """Loads this SVID (chain and key) into ``context``."""
        with tempfile.TemporaryDirectory() as tmp:
            cert_path = os.path.join(tmp, "svid.pem")
            key_path = os.path.join(tmp, "svid.key")
            with open(cert_path, "wb") as f:
                f.write(self.chain_pem)
            with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(self.key_pem)
            context.load_cert_chain(cert_path, key_path)


class TestCA:
    """An anchor and an issuer for one trust domain, all in memory."""

    __test__ = False

    def __init__(
        self,
        trust_domain: str | TrustDomain = "example.org",
        *,
        now: datetime | None = None,
        key_type: KeyType = KeyType.EC_P256,
        anchor_lifetime: timedelta = ANCHOR_LIFETIME,
        issuer_lifetime: timedelta = ISSUER_LIFETIME,
    ) -> None:
        self.trust_domain = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        self.now = now or system_clock()
        self.anchor_key = generate_key(key_type)
        self.issuer_key = generate_key(key_type)
        self._made = new_trust_domain(
            self.trust_domain,
            now=self.now,
            anchor_key=self.anchor_key,
            issuer_key=self.issuer_key,
            anchor_lifetime=anchor_lifetime,
            issuer_lifetime=issuer_lifetime,
        )
        self.anchor = self._made.anchor
        self.issuer_certificate = self._made.issuer
        self.bundle = TrustBundle(self.trust_domain, (self.anchor,))
        self.issuer = Issuer([self.issuer_certificate], self.issuer_key, self.bundle)

    def issue_svid(
        self,
        spiffe_id: str | SpiffeId,
        *,
        ttl: timedelta = LEAF_TTL,
        dns_names: Sequence[str] = (),
        key_type: KeyType = KeyType.EC_P256,
        now: datetime | None = None,
    ) -> TestSvid:
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        key = generate_key(key_type)
        issued = self.issuer.sign(key.public_key(), sid, now=now or self.now, ttl=ttl, dns_names=dns_names)
        return TestSvid(sid, key, (issued.leaf, *issued.intermediates))

    def configure_trust(self, context: ssl.SSLContext) -> None:
        """Makes ``context`` trust this CA's anchor."""
        context.load_verify_locations(cadata=self.bundle.to_pem().decode())

    def write(self, directory: str | os.PathLike[str]) -> TrustDir:
        """Writes the layout `meshca init` makes, for tests of the CLI and the server."""
        tdir = TrustDir.at(directory)
        tdir.write(self._made, self.trust_domain, overwrite=True)
        return tdir
