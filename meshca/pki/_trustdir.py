"""The on-disk layout of a trust domain directory, as `meshca init` writes it.

DIR/trust-anchor.crt   self-signed anchor (absent when the anchor is held elsewhere)
DIR/trust-anchor.key   its key, 0600
DIR/issuer.crt         the issuer, then any intermediates up to the anchor
DIR/issuer.key         its key, 0600
DIR/bundle.pem         every anchor clients should trust
DIR/DEVELOPMENT        present when `meshca serve` made this directory as a development CA
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import certificates_pem
from meshca.pki._errors import BundleError, IssuerUnavailable
from meshca.pki._files import atomic_write, check_private, make_dirs
from meshca.pki._issuer import Issuer
from meshca.pki._keys import KeyType, write_private_key
from meshca.pki._profiles import ANCHOR_LIFETIME, ISSUER_LIFETIME, NewTrustDomain, new_trust_domain
from meshca.pki._spiffe import TrustDomain

__all__ = ["TrustDir"]


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
    def issuer_cert(self) -> Path:
        return self.path / "issuer.crt"

    @property
    def issuer_key(self) -> Path:
        return self.path / "issuer.key"

    @property
    def bundle(self) -> Path:
        return self.path / "bundle.pem"

    @property
    def dev_marker(self) -> Path:
        return self.path / "DEVELOPMENT"

    def mark_development(self) -> None:
        """Marks a development CA (anchor key beside the issuer): `meshca serve` says so at every start."""
        atomic_write(
            self.dev_marker,
            b"meshca serve made this development CA; its trust anchor key is in this directory.\n"
            b"Not for production: run 'meshca init' and keep the anchor key offline.\n",
        )

    def is_initialized(self) -> bool:
        return self.issuer_cert.exists() and self.issuer_key.exists() and self.bundle.exists()

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
    ) -> Issuer:
        """Creates an anchor, an issuer signed by it, and the bundle. Keys are written first, 0600, atomically."""
        if not force:
            for existing in (self.anchor_key, self.issuer_key):
                if existing.exists():
                    raise FileExistsError(f"{existing} exists; pass --force to replace it")
        made = new_trust_domain(
            trust_domain,
            now=now,
            key_type=key_type,
            anchor_lifetime=anchor_lifetime,
            issuer_lifetime=issuer_lifetime,
        )
        bundle = self.write(made, trust_domain, passphrase=passphrase, overwrite=force)
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
        write_private_key(self.anchor_key, made.anchor_key, passphrase=passphrase, overwrite=overwrite)
        write_private_key(self.issuer_key, made.issuer_key, passphrase=passphrase, overwrite=overwrite)
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
        for path in (self.path, self.issuer_cert, self.issuer_key, self.bundle):
            if path.exists():  # a missing file is the loader's error to report
                check_private(path)

    def load_bundle(self) -> TrustBundle:
        try:
            data = self.bundle.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read {self.bundle}: {exc.strerror}") from exc
        return TrustBundle.from_pem(data)

    def load_issuer(self, bundle: TrustBundle | None = None, passphrase: bytes | None = None) -> Issuer:
        """The issuer in this directory, checked against ``bundle`` (default: DIR/bundle.pem)."""
        if bundle is None:
            bundle = self.load_bundle()
        try:
            chain_pem = self.issuer_cert.read_bytes()
            key_pem = self.issuer_key.read_bytes()
        except OSError as exc:
            raise IssuerUnavailable(f"cannot read {exc.filename}: {exc.strerror}") from exc
        return Issuer.from_pem(chain_pem, key_pem, bundle, passphrase)
