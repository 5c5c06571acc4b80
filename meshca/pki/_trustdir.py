"""The on-disk layout of a trust domain directory, as `meshca init` writes it.

DIR/trust-anchor.crt   self-signed anchor (absent when the anchor is held elsewhere)
DIR/trust-anchor.key   its key, 0600 (or trust-anchor.key.uri: the PKCS#11 URI of a key on a token)
DIR/issuer.crt         the issuer, then any intermediates up to the anchor
DIR/issuer.key         its key, 0600 (or issuer.key.uri: the PKCS#11 URI of a key on a token)
DIR/bundle.pem         every anchor clients should trust
DIR/DEVELOPMENT        present when `meshca serve` made this directory as a development CA
DIR/log-signing.key    the issuance log's checkpoint key (EC P-256), 0600
DIR/log-signing.pub    its public key, which `meshca log verify` checks checkpoints with

A staged anchor rotation (`meshca anchor prepare|activate|retire`, rules in `_anchors.py`) adds:

DIR/trust-anchor.next.crt   the prepared anchor: in the bundle, signs nothing yet
DIR/trust-anchor.next.key   its key, 0600 (or .next.key.uri)
DIR/trust-anchor.old.crt    the retiring anchor: in the bundle until `retire`, signs nothing
DIR/trust-anchor.old.key    its key, 0600 (or .old.key.uri), kept until `retire` deletes it
DIR/anchors.json            0600: when each anchor (by SHA-256 fingerprint) was prepared and activated

DIR/trust-anchor.crt and its key are always the active anchor: `activate`
writes the key first, then the certificate (each atomically), so a reader
that meets a mismatched pair reads again at its next poll. DIR/bundle.pem
always holds every anchor clients should trust (prepared, active, retiring).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.pki._anchors import AnchorState
from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import certificates_pem, fingerprint, load_certificates
from meshca.pki._custody import MemoryKey, SigningKey, as_signer, load_signing_key
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
from meshca.pki._profiles import (
    ANCHOR_LIFETIME,
    CLOCK_SKEW,
    ISSUER_LIFETIME,
    NewTrustDomain,
    build_anchor,
    build_issuer,
    new_trust_domain,
)
from meshca.pki._spiffe import TrustDomain

__all__ = ["AnchorSlot", "TrustDir", "write_key"]

_ANCHOR_FILES = {
    AnchorState.PREPARED: ("trust-anchor.next.crt", "trust-anchor.next.key"),
    AnchorState.ACTIVE: ("trust-anchor.crt", "trust-anchor.key"),
    AnchorState.RETIRING: ("trust-anchor.old.crt", "trust-anchor.old.key"),
}


@dataclass(frozen=True, slots=True)
class AnchorSlot:
    """An anchor of the directory: its state, certificate, and when it was prepared and activated (if recorded)."""

    state: AnchorState
    certificate: x509.Certificate
    prepared_at: datetime | None
    activated_at: datetime | None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    def to_json(self) -> dict[str, str | None]:
        return {
            "fingerprint": self.fingerprint,
            "state": self.state.value,
            "not_after": self.certificate.not_valid_after_utc.isoformat(),
            "prepared_at": self.prepared_at.isoformat() if self.prepared_at else None,
            "activated_at": self.activated_at.isoformat() if self.activated_at else None,
        }


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

    # -- staged anchor rotation (rules: pki/_anchors.py)

    def anchor_cert_for(self, state: AnchorState) -> Path:
        return self.path / _ANCHOR_FILES[state][0]

    def anchor_key_for(self, state: AnchorState) -> Path:
        """The key file of the anchor in ``state``; a key on a token is recorded in this path + ``.uri``."""
        return self.path / _ANCHOR_FILES[state][1]

    @property
    def anchor_times_file(self) -> Path:
        return self.path / "anchors.json"

    def anchors(self) -> list[AnchorSlot]:
        """The anchors of the rotation whose certificate is present: prepared, active, retiring, in that order."""
        times = self._anchor_times()
        slots = []
        for state in (AnchorState.PREPARED, AnchorState.ACTIVE, AnchorState.RETIRING):
            path = self.anchor_cert_for(state)
            if not path.exists():
                continue
            cert = self._anchor_certificate(path)
            recorded = times.get(fingerprint(cert), {})
            slots.append(AnchorSlot(state, cert, recorded.get("prepared_at"), recorded.get("activated_at")))
        return slots

    def prepare_anchor(
        self, key: SigningKey, *, now: datetime, lifetime: timedelta = ANCHOR_LIFETIME, passphrase: bytes | None = None
    ) -> x509.Certificate:
        """A new anchor with ``key`` joins the bundle as the prepared one: key first, then certificate, then bundle."""
        bundle = self.load_bundle()
        cert = build_anchor(key, bundle.trust_domain, now=now, lifetime=lifetime)
        write_key(self.anchor_key_for(AnchorState.PREPARED), key, passphrase=passphrase)
        atomic_write(self.anchor_cert_for(AnchorState.PREPARED), certificates_pem([cert]))
        atomic_write(self.bundle, bundle.with_anchor(cert).to_pem())
        self._record_anchor_time(cert, "prepared_at", now)
        return cert

    def activate_anchor(
        self,
        *,
        now: datetime,
        issuer_lifetime: timedelta | None = None,
        passphrase: bytes | None = None,
    ) -> x509.Certificate | None:
        """The prepared anchor becomes active, the active one retiring; in file mode the issuer is re-issued.

        Everything is signed before anything is written. Then: the retiring
        copies, the new active key, then its certificate; then a new issuer key
        (0600; a key on a token is kept and certified again), then the issuer
        certificate, signed by the new anchor for ``issuer_lifetime`` (default:
        the current issuer's). Returns the new issuer certificate, or None when
        DIR holds no issuer (managed mode: the service mints its own). Run again after an
        interruption, it finishes the same activation.
        """
        prepared_key_path = self.anchor_key_for(AnchorState.PREPARED)
        new_anchor = self._anchor_certificate(self.anchor_cert_for(AnchorState.PREPARED))
        new_key_data = _read(_key_source(prepared_key_path), KeyPolicyError)
        new_key = load_signing_key(new_key_data, passphrase)
        if as_signer(new_key).public_key() != new_anchor.public_key():
            raise KeyPolicyError(f"{_key_source(prepared_key_path)} is not the key of the prepared anchor")
        issuer_cert: x509.Certificate | None = None
        issuer_key: SigningKey | None = None
        if self.issuer_cert.exists():
            current = load_certificates(_read(self.issuer_cert, IssuerUnavailable))[0]
            if self.issuer_key_uri.exists():
                issuer_key = load_signing_key(_read(self.issuer_key_uri, IssuerUnavailable))
            else:
                issuer_key = generate_key(key_type_of(current.public_key()))
            if issuer_lifetime is None:
                issuer_lifetime = current.not_valid_after_utc - current.not_valid_before_utc - CLOCK_SKEW
            issuer_cert = build_issuer(
                as_signer(issuer_key).public_key(),
                signer_certificate=new_anchor,
                signer_key=new_key,
                trust_domain=self.load_bundle().trust_domain,
                now=now,
                lifetime=issuer_lifetime,
            )
        # The active anchor becomes the retiring one (copies first: the active files are replaced next).
        # A retiring certificate already there is an activation that was interrupted after the copies:
        # the active key may be the new one by now, so the copies are not made again.
        if not self.anchor_cert_for(AnchorState.RETIRING).exists():
            _copy_key(self.anchor_key, self.anchor_key_for(AnchorState.RETIRING))
            atomic_write(self.anchor_cert_for(AnchorState.RETIRING), _read(self.anchor_cert, BundleError))
        _copy_key(prepared_key_path, self.anchor_key)
        atomic_write(self.anchor_cert, certificates_pem([new_anchor]))
        if issuer_cert is not None:
            assert issuer_key is not None
            if not self.issuer_key_uri.exists():
                write_key(self.issuer_key, issuer_key, passphrase=passphrase, overwrite=True)
            atomic_write(self.issuer_cert, certificates_pem([issuer_cert]))
        self._record_anchor_time(new_anchor, "activated_at", now)
        _remove_key(prepared_key_path)
        self.anchor_cert_for(AnchorState.PREPARED).unlink()
        return issuer_cert

    def retire_anchor(self) -> x509.Certificate:
        """The retiring anchor leaves the bundle; its certificate, key file and record are deleted."""
        old_path = self.anchor_cert_for(AnchorState.RETIRING)
        old = self._anchor_certificate(old_path)
        bundle = self.load_bundle()
        if old in bundle:
            atomic_write(self.bundle, bundle.without_anchor(old).to_pem())
        _remove_key(self.anchor_key_for(AnchorState.RETIRING))
        old_path.unlink()
        times = self._anchor_times()
        times.pop(fingerprint(old), None)
        self._save_anchor_times(times)
        return old

    def _anchor_certificate(self, path: Path) -> x509.Certificate:
        try:
            return load_certificates(_read(path, BundleError))[0]
        except ValueError as exc:
            raise BundleError(f"{path}: {exc}") from exc

    def _anchor_times(self) -> dict[str, dict[str, datetime | None]]:
        """anchors.json: fingerprint -> {"prepared_at": ..., "activated_at": ...}; empty when absent."""
        if not self.anchor_times_file.exists():
            return {}
        try:
            doc = json.loads(_read(self.anchor_times_file, BundleError))
            return {
                fp: {name: _aware(datetime.fromisoformat(v)) if v else None for name, v in entry.items()}
                for fp, entry in doc["anchors"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"{self.anchor_times_file} is not an anchor record meshca wrote: {exc}") from None

    def _save_anchor_times(self, times: dict[str, dict[str, datetime | None]]) -> None:
        doc = {
            "version": 1,
            "anchors": {
                fp: {name: v.isoformat() if v else None for name, v in entry.items()} for fp, entry in times.items()
            },
        }
        atomic_write(self.anchor_times_file, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n", mode=0o600)

    def _record_anchor_time(self, cert: x509.Certificate, name: str, at: datetime) -> None:
        times = self._anchor_times()
        times.setdefault(fingerprint(cert), {"prepared_at": None, "activated_at": None})[name] = at
        self._save_anchor_times(times)

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


def _aware(value: datetime) -> datetime:
    """A recorded time; one without a UTC offset was not written by meshca and cannot be compared."""
    if value.tzinfo is None:
        raise ValueError(f"{value.isoformat()} has no UTC offset")
    return value


def _read(path: Path, error: type[MeshcaError]) -> bytes:
    """A file of the layout; a missing or unreadable one is ``error`` naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from exc


def _key_source(path: Path) -> Path:
    """The key file ``path``, or its ``.uri`` beside it when the key is on a token."""
    uri = path.with_name(path.name + ".uri")
    return uri if uri.exists() else path


def _copy_key(source: Path, target: Path) -> None:
    """Copies a key file (or its .uri) as it is, encrypted or not, 0600; the other kind at ``target`` is removed."""
    source_uri = source.with_name(source.name + ".uri")
    target_uri = target.with_name(target.name + ".uri")
    for src, dst, other in ((source, target, target_uri), (source_uri, target_uri, target)):
        if src.exists():
            atomic_write(dst, _read(src, KeyPolicyError), mode=0o600)
            other.unlink(missing_ok=True)


def _remove_key(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".uri").unlink(missing_ok=True)


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
