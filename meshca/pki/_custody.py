"""Key custody: one way to sign with a CA key, wherever the key is held.

A `Signer` signs bytes with a hash and tells its public key and key type.
`MemoryKey` is a cryptography private key (a PKCS#8 file); `TokenKey`
(`pki/_pkcs11.py`) is a key on a PKCS#11 token that never leaves it. The
issuer, the leaf template and the anchor and issuer profiles sign through
this interface; `sign_certificate` signs a cryptography certificate builder
with either kind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from meshca.pki._der import certificate_der, children
from meshca.pki._errors import KeyCustodyError
from meshca.pki._keys import KeyType, PrivateKey, PublicKey, generate_key, key_type_of, load_private_key, signature_hash

__all__ = [
    "Hash",
    "MemoryKey",
    "Signer",
    "SigningKey",
    "as_signer",
    "checked_signature",
    "is_key_uri",
    "load_signing_key",
    "sign_certificate",
    "verify_signature",
]

Hash: TypeAlias = hashes.SHA256 | hashes.SHA384


class Signer(Protocol):
    """Signs for one CA key: X.509 signatures (DER ECDSA, PKCS#1 v1.5 RSA)."""

    @property
    def key_type(self) -> KeyType: ...

    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes, algorithm: Hash) -> bytes: ...


SigningKey: TypeAlias = PrivateKey | Signer
"""What every signing function accepts: a cryptography private key or any `Signer`."""


@dataclass(frozen=True, slots=True, repr=False)
class MemoryKey:
    """A key in this process's memory."""

    private_key: PrivateKey

    @property
    def key_type(self) -> KeyType:
        return key_type_of(self.private_key)

    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    def sign(self, data: bytes, algorithm: Hash) -> bytes:
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.sign(data, padding.PKCS1v15(), algorithm)
        return self.private_key.sign(data, ec.ECDSA(algorithm))

    def __repr__(self) -> str:
        return f"MemoryKey({self.key_type})"


def as_signer(key: SigningKey) -> Signer:
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return MemoryKey(key)
    return key


def verify_signature(public_key: PublicKey, signature: bytes, data: bytes, algorithm: Hash) -> bool:
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
        else:
            public_key.verify(signature, data, ec.ECDSA(algorithm))
    except InvalidSignature:
        return False
    return True


def checked_signature(signer: Signer, data: bytes, algorithm: Hash) -> bytes:
    """``signer``'s signature of ``data``, verified with its public key before anyone sees it.

    For keys outside this process: a token that returns a faulty signature
    (an RSA-CRT fault leaks the key) or signs with another key fails here.
    """
    signature = signer.sign(data, algorithm)
    if not verify_signature(signer.public_key(), signature, data, algorithm):
        raise KeyCustodyError(f"the signature of {signer!r} does not verify with its public key")
    return signature


@functools.cache
def _draft_key(rsa_key: bool) -> PrivateKey:
    # Only gets cryptography's builder to write the TBSCertificate and the
    # algorithm identifier (the same for every curve, or every RSA size);
    # its signature is thrown away, so one key per process serves.
    return generate_key(KeyType.RSA_2048 if rsa_key else KeyType.EC_P256)


def sign_certificate(builder: x509.CertificateBuilder, key: SigningKey) -> x509.Certificate:
    """``builder`` signed by ``key`` with the hash its type calls for (`signature_hash`).

    cryptography's builder signs only with its own key objects: for another
    `Signer`, the builder signs with a draft key, the signer signs the draft's
    TBSCertificate, and the certificate is assembled from the two and checked.
    """
    signer = as_signer(key)
    public_key = signer.public_key()
    algorithm = signature_hash(public_key)
    if isinstance(signer, MemoryKey):
        return builder.sign(signer.private_key, algorithm)
    draft = builder.sign(_draft_key(signer.key_type.is_rsa), algorithm)
    tbs = draft.tbs_certificate_bytes
    signature_algorithm = children(draft.public_bytes(serialization.Encoding.DER))[1]
    signature = checked_signature(signer, tbs, algorithm)
    certificate = x509.load_der_x509_certificate(certificate_der(tbs, signature_algorithm, signature))
    # Read back by cryptography: the assembled certificate carries exactly the TBS and signature checked above.
    if certificate.tbs_certificate_bytes != tbs or certificate.signature != signature:
        raise KeyCustodyError("the certificate assembled from the token's signature does not read back")
    return certificate


def is_key_uri(data: bytes | str) -> bool:
    """A PKCS#11 URI (what `DIR/issuer.key.uri` holds) rather than a key file."""
    prefix = b"pkcs11:" if isinstance(data, bytes) else "pkcs11:"
    return data.lstrip()[:7].lower() == prefix


def load_signing_key(data: bytes, passphrase: bytes | None = None) -> SigningKey:
    """A PEM/DER private key, or the key a PKCS#11 URI names (the token is opened now)."""
    if is_key_uri(data):
        from meshca.pki._pkcs11 import Pkcs11Uri, TokenKey

        return TokenKey.open(Pkcs11Uri.parse(data.decode("utf-8", "replace").strip()))
    return load_private_key(data, passphrase)
