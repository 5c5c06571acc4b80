"""Proof of possession of a current SVID, bound to what it authorizes.

One construction, two uses. The holder signs
``context || SHA-256(body) || signed_at`` (8-byte big-endian Unix seconds)
with its current SVID key and sends the signature with its current chain;
the verifier checks the chain against the bundle, the signature with the
leaf's key, and that ``signed_at`` is within `PROOF_MAX_AGE` of now.

- **SVID renewal** (``meshca.identity.v1.Identity/IssueSVID``): context
  ``"meshca-svid-proof-v1\\0"``, body the new CSR (DER). A replayed proof can
  only get a certificate for the key in that CSR, which the replayer lacks.
- **Node agent calls** (``meshca.agent.v1.Agent``): context
  ``"meshca-agent-proof-v1\\0" || method || "\\0"`` (the full method name),
  body the request serialized deterministically with ``proof`` unset
  (`agent_proof_body`). A replayed proof only repeats that exact call within
  the proof's age.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from meshca.pki._certs import load_certificates
from meshca.pki._errors import AuthenticationError, VerificationError
from meshca.pki._keys import PrivateKey, signature_hash
from meshca.pki._spiffe import SpiffeId
from meshca.pki._verify import MAX_CHAIN, BundleSource, verify_chain

__all__ = [
    "PROOF_MAX_AGE",
    "SvidProof",
    "agent_proof_body",
    "sign_agent_proof",
    "sign_svid_proof",
    "verify_agent_proof",
    "verify_svid_proof",
]

PROOF_MAX_AGE = timedelta(minutes=5)
_SVID_CONTEXT = b"meshca-svid-proof-v1\x00"
_AGENT_CONTEXT = b"meshca-agent-proof-v1\x00"


@dataclass(frozen=True, slots=True)
class SvidProof:
    chain: tuple[bytes, ...]  # DER, leaf first
    signature: bytes
    signed_at: datetime


class _ProtoMessage(Protocol):
    def ClearField(self, field_name: str, /) -> None: ...
    def CopyFrom(self, other_msg: object, /) -> None: ...
    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


def agent_proof_body(request: _ProtoMessage) -> bytes:
    """What an agent proof signs of a request: the request with ``proof`` unset, serialized deterministically."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("proof")
    return copy.SerializeToString(deterministic=True)


def _agent_context(method: str) -> bytes:
    return _AGENT_CONTEXT + method.encode() + b"\x00"


def _message(context: bytes, body: bytes, signed_at: datetime) -> bytes:
    return context + hashlib.sha256(body).digest() + int(signed_at.timestamp()).to_bytes(8, "big")


def _sign(context: bytes, chain_der: tuple[bytes, ...], key: PrivateKey, body: bytes, now: datetime) -> SvidProof:
    signed_at = datetime.fromtimestamp(int(now.timestamp()), UTC)
    message = _message(context, body, signed_at)
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(message, padding.PKCS1v15(), signature_hash(key))
    else:
        signature = key.sign(message, ec.ECDSA(signature_hash(key)))
    return SvidProof(tuple(chain_der), signature, signed_at)


def _verify(
    context: bytes, what: str, reason: str, proof: SvidProof, body: bytes, bundles: BundleSource, now: datetime
) -> SpiffeId:
    if not proof.chain:
        raise AuthenticationError(f"{what} carries no certificate chain", reason)
    if len(proof.chain) > MAX_CHAIN:
        raise AuthenticationError(f"{what} chain has {len(proof.chain)} certificates, at most {MAX_CHAIN}", reason)
    if abs(now - proof.signed_at) > PROOF_MAX_AGE:
        minutes = int(PROOF_MAX_AGE.total_seconds() // 60)
        raise AuthenticationError(
            f"{what} is stale or from the future (signed_at off by more than {minutes} minutes)", reason
        )
    try:
        # Read whole once (load_certificates refuses what cryptography cannot read): the verifier
        # and the signature check below use the same objects.
        chain = load_certificates(list(proof.chain))
    except ValueError as exc:
        raise AuthenticationError(f"{what} chain cannot be parsed: {exc}", reason) from None
    key = chain[0].public_key()
    try:
        sid = verify_chain(chain, bundles, at=now, role="client")
    except VerificationError as exc:
        raise AuthenticationError(f"{what} chain does not verify: {exc}", reason) from exc
    message = _message(context, body, proof.signed_at)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(proof.signature, message, padding.PKCS1v15(), signature_hash(key))
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(proof.signature, message, ec.ECDSA(signature_hash(key)))
        else:
            raise AuthenticationError(f"{what} leaf has an unsupported key type", reason)
    except InvalidSignature:
        raise AuthenticationError(f"{what} signature does not verify with the leaf's key", reason) from None
    return sid


def sign_svid_proof(chain_der: tuple[bytes, ...], key: PrivateKey, csr_der: bytes, now: datetime) -> SvidProof:
    return _sign(_SVID_CONTEXT, chain_der, key, csr_der, now)


def verify_svid_proof(proof: SvidProof, csr_der: bytes, bundles: BundleSource, *, now: datetime) -> SpiffeId:
    """The SPIFFE ID the proof is for; `AuthenticationError` if anything about it is wrong."""
    return _verify(_SVID_CONTEXT, "SVID proof", "svid_proof", proof, csr_der, bundles, now)


def sign_agent_proof(
    chain_der: tuple[bytes, ...], key: PrivateKey, method: str, body: bytes, now: datetime
) -> SvidProof:
    """The proof for one agent call: ``method`` the full method name, ``body`` from `agent_proof_body`."""
    return _sign(_agent_context(method), chain_der, key, body, now)


def verify_agent_proof(proof: SvidProof, method: str, body: bytes, bundles: BundleSource, *, now: datetime) -> SpiffeId:
    """The SPIFFE ID of the SVID that made the proof; `AuthenticationError` if anything about it is wrong.

    Whether that ID is an agent's is the caller's question.
    """
    return _verify(_agent_context(method), "agent proof", "agent_proof", proof, body, bundles, now)
