"""The values of the client, and the pure functions on them: snapshots, requests, response checks, credentials.

No I/O here except reading a JWT file (`Credentials.jwt_file`, read again for every request).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from meshca._proto import meshca_identity_pb2 as pb
from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import certificates_pem
from meshca.pki._csr import build_csr
from meshca.pki._errors import AuthenticationError, VerificationError
from meshca.pki._keys import PrivateKey, private_key_pem
from meshca.pki._proof import sign_svid_proof
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._verify import authorize_id, verify_chain

__all__ = [
    "Credentials",
    "Snapshot",
    "X509Svid",
    "bundle_from_message",
    "load_bundle",
    "make_request",
    "svid_from_response",
]

_DER = serialization.Encoding.DER


@dataclass(frozen=True, slots=True)
class X509Svid:
    """An X.509-SVID and its private key. ``repr`` shows no key material."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey = field(repr=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def chain_pem(self) -> bytes:
        return certificates_pem(self.chain)

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(_DER) for c in self.chain)

    def key_pem(self) -> bytes:
        """The private key as PKCS#8 PEM (a method, so it is never printed by accident)."""
        return private_key_pem(self.key)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a TLS handshake needs, swapped as one value so readers never see a torn update."""

    svid: X509Svid | None
    bundle: TrustBundle

    @property
    def ready(self) -> bool:
        return self.svid is not None


@dataclass(frozen=True, slots=True)
class Credentials:
    """How the source proves who it is on first issuance. Renewals use the current SVID.

    Neither (``renewal_only``): the source starts from an SVID it was given, and renews by proof only.
    """

    join_token: str | None = field(default=None, repr=False)
    jwt_file: Path | None = None
    renewal_only: bool = False

    def __post_init__(self) -> None:
        given = (self.join_token is not None) + (self.jwt_file is not None)
        if given > 1 or (given == 0 and not self.renewal_only):
            raise ValueError("give exactly one of join_token and jwt_file, or neither with an initial SVID")


def make_request(
    key: PrivateKey,
    spiffe_id: SpiffeId,
    credentials: Credentials,
    current: X509Svid | None,
    *,
    now: datetime,
    ttl: timedelta | None = None,
) -> pb.IssueSVIDRequest:
    """An IssueSVID request: a fresh CSR, and a credential (the current SVID when it is still valid)."""
    csr = build_csr(key, spiffe_id)
    request = pb.IssueSVIDRequest(csr=csr, spiffe_id=str(spiffe_id))
    if ttl is not None:
        request.ttl.CopyFrom(Duration(seconds=int(ttl.total_seconds())))
    if current is not None and current.not_before <= now < current.not_after:
        proof = sign_svid_proof(current.chain_der, current.key, csr, now)
        signed_at = Timestamp()
        signed_at.FromDatetime(proof.signed_at)
        request.credential.svid.CopyFrom(
            pb.SvidProof(chain=proof.chain, signature=proof.signature, signed_at=signed_at)
        )
    elif credentials.join_token is not None:
        request.credential.join_token = credentials.join_token
    elif credentials.jwt_file is not None:
        # Projected service-account tokens rotate on disk: read it on every attempt.
        request.credential.jwt = Path(credentials.jwt_file).read_text().strip()
    else:
        raise AuthenticationError("the current SVID is not valid now and no other credential is configured", "expired")
    return request


def svid_from_response(
    response: pb.IssueSVIDResponse, key: PrivateKey, expected: SpiffeId, bundle: TrustBundle, *, now: datetime
) -> X509Svid:
    """The SVID in a response, only if it verifies against ``bundle`` now, is for ``expected`` and holds ``key``."""
    try:
        chain = tuple(x509.load_der_x509_certificate(der) for der in (response.leaf, *response.intermediates))
    except ValueError as exc:
        raise VerificationError("response holds a certificate that cannot be parsed") from exc
    verify_chain(list(chain), bundle, at=now, authorizer=authorize_id(expected))
    if chain[0].public_key() != key.public_key():
        raise VerificationError("response leaf is not for the key this client generated")
    return X509Svid(expected, chain, key)


def bundle_from_message(message: pb.Bundle) -> TrustBundle:
    anchors = tuple(x509.load_der_x509_certificate(der) for der in message.anchors)
    return TrustBundle(TrustDomain.parse(message.trust_domain), anchors, message.sequence)


def load_bundle(source: TrustBundle | str | Path | bytes) -> TrustBundle:
    """A bundle given as a value, PEM bytes, or a PEM file path."""
    if isinstance(source, TrustBundle):
        return source
    if isinstance(source, bytes):
        return TrustBundle.from_pem(source)
    return TrustBundle.from_pem(Path(source).read_bytes())
