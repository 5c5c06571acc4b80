"""The on-disk layout of a trust domain directory, as `meshca init` writes it.

DIR/trust-anchor.crt   self-signed anchor (absent when the anchor is held elsewhere)
DIR/trust-anchor.key   its key, 0600 (or trust-anchor.key.uri: the PKCS#11 URI of a key on a token)
DIR/issuer.crt         the issuer, then any intermediates up to the anchor
DIR/issuer.key         its key, 0600 (or issuer.key.uri: the PKCS#11 URI of a key on a token)
DIR/bundle.pem         every anchor clients should trust
DIR/DEVELOPMENT        present when `meshca serve` made this directory as a development CA
DIR/log-signing.key    the issuance log's checkpoint key (EC P-256), 0600
DIR/log-signing.pub    its public key, which `meshca log verify` checks checkpoints with
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import certificates_pem
from meshca.pki._custody import MemoryKey, SigningKey, as_signer
from meshca.pki._errors import BundleError, IssuerUnavailable, KeyPolicyError, MeshcaError
from meshca.pki._files import atomic_write, check_private, make_dirs
from meshca.pki._issuer import Issuer
from meshca.pki._keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    generate_key,
    key_type_of,
    load_private_key,
    write_private_key,
)
from meshca.pki._pkcs11 import Pkcs11Uri, TokenKey
from meshca.pki._profiles import ANCHOR_LIFETIME, ISSUER_LIFETIME, NewTrustDomain, new_trust_domain
from meshca.pki._spiffe import TrustDomain

__all__ = ["TrustDir", "write_key"]


@dataclass(frozen=True, slots=True)
class TrustDir:
    path: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> TrustDir:
        return cls(Path(path))

    @property
    def anchor_cert(self) -> Path:
        return self.path / "trust-anchor.crt"

    @property
    def anchor_key(self) -> Path:
        return self.path / "trust-anchor.key"

    @property
    def anchor_key_uri(self) -> Path:
        return self.path / "trust-anchor.key.uri"

    @property
    def issuer_cert(self) -> Path:
        return self.path / "issuer.crt"

    @property
    def issuer_key(self) -> Path:
        return self.path / "issuer.key"

    @property
    def issuer_key_uri(self) -> Path:
        return self.path / "issuer.key.uri"

    @property
    def issuer_key_source(self) -> Path:
        """Where the issuer key is: the URI file when there is one, else the key file."""
        return self.issuer_key_uri if self.issuer_key_uri.exists() else self.issuer_key

    @property
    def bundle(self) -> Path:
        return self.path / "bundle.pem"

    @property
    def dev_marker(self) -> Path:
        return self.path / "DEVELOPMENT"

    @property
    def log_key(self) -> Path:
        return self.path / "log-signing.key"

    @property
    def log_public_key(self) -> Path:
        return self.path / "log-signing.pub"

    def ensure_log_key(self, passphrase: bytes | None = None) -> PrivateKey:
        """The issuance log's checkpoint key, made when missing (EC P-256, 0600, its public key beside it).

        An existing key is kept, even by ``init --force``: the log's checkpoints
        were signed with it. ``passphrase`` encrypts a new key and opens an
        encrypted one (a key written without one opens without it).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # made before, or by a process starting beside this one
            write_private_key(self.log_key, generate_key(), passphrase=passphrase)
        data = _read(self.log_key, KeyPolicyError)
        key = load_private_key(data, passphrase if b"ENCRYPTED" in data else None)
        if key_type_of(key) is not KeyType.EC_P256:
            raise KeyPolicyError(f"{self.log_key} must be an EC P-256 key")
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if not self.log_public_key.exists() or self.log_public_key.read_bytes() != public:
            atomic_write(self.log_public_key, public)
        return key

    def load_log_public_key(self) -> PublicKey:
        """The public key that `meshca log verify` checks checkpoints with."""
        data = _read(self.log_public_key, KeyPolicyError)
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise KeyPolicyError(f"{self.log_public_key} is not a PEM public key") from None
        if not isinstance(key, PublicKey):
            raise KeyPolicyError(f"{self.log_public_key} is not an EC or RSA public key")
        return key

    def mark_development(self) -> None:
        """Marks a development CA (anchor key beside the issuer): `meshca serve` says so at every start."""
        atomic_write(
            self.dev_marker,
            b"meshca serve made this development CA; its trust anchor key is in this directory.\n"
            b"Not for production: run 'meshca init' and keep the anchor key offline.\n",
        )

    def is_initialized(self) -> bool:
        return self.issuer_cert.exists() and self.issuer_key_source.exists() and self.bundle.exists()

    def init(
        self,
        trust_domain: TrustDomain,
        *,
        now: datetime,
        key_type: KeyType = KeyType.EC_P256,
        anchor_lifetime: timedelta = ANCHOR_LIFETIME,
        issuer_lifetime: timedelta = ISSUER_LIFETIME,
        force: bool = False,
        passphrase: bytes | None = None,
        anchor_key_uri: Pkcs11Uri | None = None,
        issuer_key_uri: Pkcs11Uri | None = None,
    ) -> Issuer:
        """Creates an anchor, an issuer signed by it, and the bundle. Keys are written first, 0600, atomically.

        A key given a URI is generated on its PKCS#11 token instead, and the URI is recorded.
        """
        if not force:
            for existing in (self.anchor_key, self.anchor_key_uri, self.issuer_key, self.issuer_key_uri):
                if existing.exists():
                    raise FileExistsError(f"{existing} exists; pass --force to replace it")
        made = new_trust_domain(
            trust_domain,
            now=now,
            key_type=key_type,
            anchor_lifetime=anchor_lifetime,
            issuer_lifetime=issuer_lifetime,
            anchor_key=TokenKey.generate(anchor_key_uri, key_type) if anchor_key_uri else None,
            issuer_key=TokenKey.generate(issuer_key_uri, key_type) if issuer_key_uri else None,
        )
        bundle = self.write(made, trust_domain, passphrase=passphrase, overwrite=force)
        self.ensure_log_key(passphrase)
        return Issuer([made.issuer], made.issuer_key, bundle)

    def write(
        self,
        made: NewTrustDomain,
        trust_domain: TrustDomain,
        *,
        passphrase: bytes | None = None,
        overwrite: bool = False,
    ) -> TrustBundle:
        """Writes the layout for ``made``: keys first (0600, atomically), then certificates and bundle."""
        make_dirs(self.path)  # 0700: nobody else may add or rename files in it
        write_key(self.anchor_key, made.anchor_key, passphrase=passphrase, overwrite=overwrite)
        write_key(self.issuer_key, made.issuer_key, passphrase=passphrase, overwrite=overwrite)
        atomic_write(self.anchor_cert, certificates_pem([made.anchor]))
        atomic_write(self.issuer_cert, certificates_pem([made.issuer]))
        bundle = TrustBundle(trust_domain, (made.anchor,))
        atomic_write(self.bundle, bundle.to_pem())
        return bundle

    def check_private(self) -> None:
        """Raises `UnsafePermissions` when another user could replace DIR, the issuer or the bundle.

        `meshca serve` checks this at start and before every reload: it would
        otherwise sign with an attacker's issuer and hand out their anchor.
        """
        for path in (self.path, self.issuer_cert, self.issuer_key, self.issuer_key_uri, self.bundle):
            if path.exists():  # a missing file is the loader's error to report
                check_private(path)

    def load_bundle(self) -> TrustBundle:
        return TrustBundle.from_pem(_read(self.bundle, BundleError))

    def load_issuer(self, bundle: TrustBundle | None = None, passphrase: bytes | None = None) -> Issuer:
        """The issuer in this directory, checked against ``bundle`` (default: DIR/bundle.pem)."""
        if bundle is None:
            bundle = self.load_bundle()
        if self.issuer_key.exists() and self.issuer_key_uri.exists():
            raise IssuerUnavailable(f"both {self.issuer_key} and {self.issuer_key_uri} exist: remove one")
        chain_pem = _read(self.issuer_cert, IssuerUnavailable)
        key_pem = _read(self.issuer_key_source, IssuerUnavailable)
        return Issuer.from_pem(chain_pem, key_pem, bundle, passphrase)


def _read(path: Path, error: type[MeshcaError]) -> bytes:
    """A file of the layout; a missing or unreadable one is ``error`` naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from exc


def write_key(path: Path, key: SigningKey, *, passphrase: bytes | None = None, overwrite: bool = False) -> Path:
    """Writes a key file (0600), or for a key on a token its URI to ``path``.uri; removes the other
    kind on ``overwrite``, so the directory names one key. Returns the file written."""
    uri_path = path.with_name(path.name + ".uri")
    signer = as_signer(key)
    if isinstance(signer, TokenKey):
        written, other = uri_path, path
        atomic_write(uri_path, f"{signer.uri}\n".encode(), mode=0o600, overwrite=overwrite)
    else:
        assert isinstance(signer, MemoryKey), f"cannot record {signer!r}"
        written, other = path, uri_path
        write_private_key(path, signer.private_key, passphrase=passphrase, overwrite=overwrite)
    if overwrite:
        other.unlink(missing_ok=True)
    return written
