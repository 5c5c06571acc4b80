"""Key types, generation, and PKCS#8 PEM files written 0600, atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import meshca
from meshca import KeyPolicyError, KeyType, generate_key, key_type_of, load_private_key, private_key_pem

FAST_TYPES = [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.RSA_3072]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("key_type", FAST_TYPES, ids=str)
def test_every_key_type_generates_and_round_trips(key_type: KeyType) -> None:
    key = generate_key(key_type)
    assert key_type_of(key) is key_type
    assert key_type_of(key.public_key()) is key_type
    loaded = load_private_key(private_key_pem(key))
    assert key_type_of(loaded) is key_type
    assert loaded.public_key() == key.public_key()


def test_rsa_4096(rsa4096_key: meshca.PrivateKey) -> None:
    assert isinstance(rsa4096_key, rsa.RSAPrivateKey)
    assert rsa4096_key.key_size == 4096
    assert key_type_of(rsa4096_key) is KeyType.RSA_4096
    assert key_type_of(rsa4096_key.public_key()) is KeyType.RSA_4096


def test_every_key_type_is_covered() -> None:
    assert {*FAST_TYPES, KeyType.RSA_4096} == set(KeyType)


def test_default_is_p256() -> None:
    key = generate_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_key_type_parse(key_type: KeyType) -> None:
    assert KeyType.parse(key_type.value) is key_type
    assert str(key_type) == key_type.value
    assert key_type.is_rsa == key_type.value.startswith("rsa")


@pytest.mark.parametrize("text", ["EC-P256", "ec-p521", "rsa-1024", "ed25519", ""])
def test_key_type_parse_rejects_unknown(text: str) -> None:
    with pytest.raises(KeyPolicyError, match="unknown key type"):
        KeyType.parse(text)


def test_pem_is_pkcs8() -> None:
    pem = private_key_pem(generate_key())
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    encrypted = private_key_pem(generate_key(), b"secret")
    assert encrypted.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")


def test_der_keys_load() -> None:
    key = generate_key()
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert load_private_key(der).public_key() == key.public_key()


# -- unsupported keys


def test_p521_is_rejected() -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(KeyPolicyError, match="unsupported elliptic curve secp521r1"):
        key_type_of(key)
    with pytest.raises(KeyPolicyError, match="secp521r1"):
        key_type_of(key.public_key())
    with pytest.raises(KeyPolicyError, match="secp521r1"):
        load_private_key(private_key_pem(key))  # type: ignore[arg-type]


def test_rsa_1024_is_rejected() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyPolicyError, match="unsupported RSA key size 1024"):
        key_type_of(key)
    with pytest.raises(KeyPolicyError, match="1024"):
        key_type_of(key.public_key())
    with pytest.raises(KeyPolicyError, match="1024"):
        load_private_key(private_key_pem(key))


def test_rsa_with_a_small_exponent_is_rejected() -> None:
    key = rsa.generate_private_key(public_exponent=3, key_size=2048)
    with pytest.raises(KeyPolicyError, match="65537"):
        key_type_of(key)


def test_other_algorithms_are_rejected() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(KeyPolicyError, match="unsupported key algorithm"):
        key_type_of(key)
    with pytest.raises(KeyPolicyError, match="unsupported key algorithm"):
        key_type_of("not a key")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(KeyPolicyError):
        load_private_key(pem)


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(KeyPolicyError, match="cannot load private key"):
        load_private_key(data)


# -- files


def test_write_private_key_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    key = generate_key()
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        meshca.write_private_key(path, key)
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600
    assert load_private_key(path.read_bytes()).public_key() == key.public_key()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"], "no temp file is left behind"


def test_write_private_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    original = generate_key()
    meshca.write_private_key(path, original)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        meshca.write_private_key(path, generate_key())
    assert path.read_bytes() == before
    assert load_private_key(path.read_bytes()).public_key() == original.public_key()
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"], "no temp file is left behind"


def test_write_private_key_overwrites_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    replacement = generate_key()
    meshca.write_private_key(path, replacement, overwrite=True)
    assert load_private_key(path.read_bytes()).public_key() == replacement.public_key()
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]


def test_write_private_key_replaces_atomically(tmp_path: Path) -> None:
    """The path is swapped by rename: a reader holding the old file keeps the old contents."""
    path = tmp_path / "key.pem"
    meshca.write_private_key(path, generate_key())
    with path.open("rb") as held:
        old_inode = os.fstat(held.fileno()).st_ino
        meshca.write_private_key(path, generate_key(), overwrite=True)
        assert os.stat(path).st_ino != old_inode
        assert held.read().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_passphrase_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    key = generate_key(KeyType.EC_P384)
    meshca.write_private_key(path, key, passphrase=b"correct horse")
    data = path.read_bytes()
    assert b"ENCRYPTED" in data
    assert _mode(path) == 0o600
    loaded = load_private_key(data, b"correct horse")
    assert loaded.public_key() == key.public_key()


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    meshca.write_private_key(path, generate_key(), passphrase=b"correct horse")
    with pytest.raises(KeyPolicyError, match="wrong passphrase"):
        load_private_key(path.read_bytes(), b"battery staple")
    with pytest.raises(KeyPolicyError):
        load_private_key(path.read_bytes())
    plain = private_key_pem(generate_key())
    with pytest.raises(KeyPolicyError):
        load_private_key(plain, b"unexpected")
