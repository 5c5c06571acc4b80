"""Proof of possession of a current SVID, bound to a new CSR (renewal credential).

The workload signs ``"meshca-svid-proof-v1\\0" || SHA-256(csr) || signed_at``
(8-byte big-endian Unix seconds) with its current SVID key and sends the
signature with its current chain. The identity service verifies the chain
against the bundle, the signature with the leaf's key, and that
``signed_at`` is recent. Because the CSR is bound in, a replayed proof can
only get a certificate for the key in that CSR, which the replayer lacks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from meshca.pki._certs import load_certificates
from meshca.pki._errors import AuthenticationError, VerificationError
from meshca.pki._keys import PrivateKey, signature_hash
from meshca.pki._spiffe import SpiffeId
from meshca.pki._verify import BundleSource, verify_chain

__all__ = ["PROOF_MAX_AGE", "SvidProof", "sign_svid_proof", "verify_svid_proof"]

PROOF_MAX_AGE = timedelta(minutes=5)
_CONTEXT = b"meshca-svid-proof-v1\x00"


@dataclass(frozen=True, slots=True)
class SvidProof:
    chain: tuple[bytes, ...]  # DER, leaf first
    signature: bytes
    signed_at: datetime


def _message(csr_der: bytes, signed_at: datetime) -> bytes:
    return _CONTEXT + hashlib.sha256(csr_der).digest() + int(signed_at.timestamp()).to_bytes(8, "big")


def sign_svid_proof(chain_der: tuple[bytes, ...], key: PrivateKey, csr_der: bytes, now: datetime) -> SvidProof:
    signed_at = datetime.fromtimestamp(int(now.timestamp()), UTC)
    message = _message(csr_der, signed_at)
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(message, padding.PKCS1v15(), signature_hash(key))
    else:
        signature = key.sign(message, ec.ECDSA(signature_hash(key)))
    return SvidProof(chain_der, signature, signed_at)


def verify_svid_proof(proof: SvidProof, csr_der: bytes, bundles: BundleSource, *, now: datetime) -> SpiffeId:
    """The SPIFFE ID the proof is for; `AuthenticationError` if anything about it is wrong."""
    if not proof.chain:
        raise AuthenticationError("SVID proof carries no certificate chain", "svid_proof")
    if abs(now - proof.signed_at) > PROOF_MAX_AGE:
        raise AuthenticationError(
            "SVID proof is stale or from the future (signed_at off by more than 5 minutes)", "svid_proof"
        )
    try:
        # Read whole once (load_certificates refuses what cryptography cannot read): the verifier
        # and the signature check below use the same objects.
        chain = load_certificates(list(proof.chain))
    except ValueError as exc:
        raise AuthenticationError(f"SVID proof chain cannot be parsed: {exc}", "svid_proof") from None
    key = chain[0].public_key()
    try:
        sid = verify_chain(chain, bundles, at=now, role="client")
    except VerificationError as exc:
        raise AuthenticationError(f"SVID proof chain does not verify: {exc}", "svid_proof") from exc
    message = _message(csr_der, proof.signed_at)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(proof.signature, message, padding.PKCS1v15(), signature_hash(key))
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(proof.signature, message, ec.ECDSA(signature_hash(key)))
        else:
            raise AuthenticationError("SVID proof leaf has an unsupported key type", "svid_proof")
    except InvalidSignature:
        raise AuthenticationError("SVID proof signature does not verify with the leaf's key", "svid_proof") from None
    return sid
