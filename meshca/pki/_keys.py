"""Key types, generation, and PKCS#8 PEM load/save."""

from __future__ import annotations

import enum
import os
from typing import TypeAlias

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshca.pki._errors import KeyPolicyError
from meshca.pki._files import atomic_write

__all__ = [
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "generate_key",
    "key_type_of",
    "load_private_key",
    "private_key_pem",
    "signature_hash",
    "write_private_key",
]

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyType(enum.Enum):
    """The key types meshca makes and accepts. ``ec-p256`` is the default everywhere."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(k.value for k in cls)
            raise KeyPolicyError(f"unknown key type {text!r}; use one of {allowed}") from None

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa")

    def __str__(self) -> str:
        return self.value


_CURVES: dict[str, KeyType] = {"secp256r1": KeyType.EC_P256, "secp384r1": KeyType.EC_P384}
_RSA_SIZES: dict[int, KeyType] = {2048: KeyType.RSA_2048, 3072: KeyType.RSA_3072, 4096: KeyType.RSA_4096}


def generate_key(key_type: KeyType = KeyType.EC_P256) -> PrivateKey:
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type.value.split("-")[1]))


def key_type_of(key: object) -> KeyType:
    """The `KeyType` of a public or private key; `KeyPolicyError` for anything else."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        found = _CURVES.get(key.curve.name)
        if found is None:
            raise KeyPolicyError(f"unsupported elliptic curve {key.curve.name}")
        return found
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        found = _RSA_SIZES.get(key.key_size)
        if found is None:
            raise KeyPolicyError(f"unsupported RSA key size {key.key_size} (allowed: 2048, 3072, 4096)")
        public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
        if public.public_numbers().e != 65537:
            raise KeyPolicyError("RSA public exponent must be 65537")
        return found
    raise KeyPolicyError(f"unsupported key algorithm {type(key).__name__}")


def signature_hash(key: PrivateKey | PublicKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for P-384, SHA-256 otherwise, as the WebPKI and SPIFFE peers expect."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def load_private_key(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    """Loads a PEM or DER private key of a supported type."""
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(data, passphrase)
        else:
            key = serialization.load_der_private_key(data, passphrase)
    except TypeError as exc:  # passphrase given for a plain key, or missing for an encrypted one
        raise KeyPolicyError(f"cannot load private key: {exc}") from exc
    except ValueError as exc:
        raise KeyPolicyError("cannot load private key: not a valid key, or wrong passphrase") from exc
    key_type_of(key)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key


def write_private_key(
    path: str | os.PathLike[str], key: PrivateKey, *, passphrase: bytes | None = None, overwrite: bool = False
) -> None:
    """Writes a PKCS#8 PEM key, mode 0600, atomically; refuses to replace a key unless ``overwrite``."""
    atomic_write(path, private_key_pem(key, passphrase), mode=0o600, overwrite=overwrite)
