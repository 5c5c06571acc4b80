"""The issuers and bundle the server signs with, in one of two modes behind one interface.

`IssuerState` is what the pipeline, the wire adapters and the server's own
SVID read: the active issuer, the served bundle (its sequence and change
event), usability, and the expiry metrics. Which issuer is active comes from
a *source*, one per mode, both polled from the server's reload loop
(`IdentityServer._reload_loop`, every ``reload_interval``):

- `FileIssuers` (file mode, the default): the issuer is ``DIR/issuer.crt``
  and its key, delivered by an operator or cert-manager; the anchor key stays
  offline. Files are polled (stat of the resolved paths, so a Kubernetes
  ``..data`` symlink swap is seen like an in-place replace). A changed set
  is loaded, validated (the issuer matches its key, chains to the new
  bundle, is valid now, and a probe leaf it signs verifies) and only then
  swapped in; a bad replacement is refused, logged and counted, and the last
  good issuer keeps serving. Files that other users could replace are
  refused like a bad set (`TrustDir.check_private`). A set written ahead of
  its NotBefore (cert-manager stages the next issuer before the current one
  expires) is validated as of that NotBefore, kept, and swapped in at the
  first poll once it is valid. An issuer close to its NotAfter is logged as
  ``issuer.expiring`` (`meshca.pki._check.issuer_warning`).
- `ManagedIssuers` (``serve --manage-issuers``): the service holds the
  active anchor (``DIR/trust-anchor.crt`` and its key or key URI) and mints
  its own issuers with `IssuerSlots` (meshca/pki/_lifecycle.py); issuer
  keys live in memory only. Each is recorded in the store before it signs.
  When the anchor files name another anchor (``meshca anchor activate``), a
  new issuer is minted from it at once; a key caught mid-swap, not matching
  its certificate, is retried at the next poll. ``DIR/bundle.pem`` is the
  served bundle; a change of it alone changes only what is served.

The server's own SVID (``spiffe://TD/meshca/identity``) renews by the same
rotation policy as the clients, follows the active issuer, and is recorded
in the issuance log (api ``self``, principal ``meshca``) before it is used.
The probe leaf is never handed to anyone and is not recorded.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import fingerprint, load_certificates
from meshca.pki._check import issuer_warning
from meshca.pki._custody import SigningKey, as_signer, load_signing_key
from meshca.pki._errors import IssuerUnavailable, KeyCustodyError, MeshcaError, StoreError
from meshca.pki._files import check_private
from meshca.pki._issuer import Issuer
from meshca.pki._keys import generate_key, private_key_pem
from meshca.pki._lifecycle import IssuerSlots, Rotation, mint_issuer
from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy, renewal_time
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir
from meshca.pki._verify import verify_chain
from meshca.server._metrics import Labelled, Metrics
from meshca.server._store import IssuanceRecord, IssuerCertRecord, Store

__all__ = ["FileIssuers", "IssuerState", "ManagedIssuers", "ServingSvid", "check_anchor", "load_anchor", "replica_name"]

log = structlog.get_logger("meshca.server")

SELF_API = "self"
SELF_PRINCIPAL = "meshca"
_RECORD_TIMEOUT = 30.0  # seconds; a store slower than this fails the renewal, the current SVID stays
EXPIRING_REPEAT = timedelta(hours=1)  # issuer.expiring again this often while the issuer stays close to expiry
MINT_FAILED_REPEAT = 60.0  # seconds between issuer.mint_failed lines while minting fails the same way

_Stamp = tuple[tuple[str, int, int, int, int], ...]
_DER = serialization.Encoding.DER


@dataclass(frozen=True, slots=True)
class ServingSvid:
    """The server's own TLS identity."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    renew_at: float  # Unix time
    issuer_fingerprint: str


def file_stamp(paths: tuple[os.PathLike[str], ...]) -> _Stamp:
    out = []
    for p in paths:
        try:
            real = os.path.realpath(p)
            st = os.stat(real)
            # the mode too: `chmod go-w` on a refused file is a change worth a reload
            out.append((real, st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode))
        except OSError:
            out.append((str(p), -1, -1, -1, -1))
    return tuple(out)


def validate(issuer: Issuer, now_clock: Clock) -> None:
    """Fails unless ``issuer`` is valid now and a leaf it signs verifies against its bundle."""
    now = now_clock()
    issuer.check(now)
    probe_key = generate_key()
    probe = issuer.sign(
        probe_key.public_key(), issuer.trust_domain.spiffe_id("/meshca/probe"), now=now, ttl=timedelta(minutes=1)
    )
    verify_chain([probe.leaf, *probe.intermediates], issuer.bundle, at=now)


def replica_name() -> str:
    """Who wrote an issuer record: this host and process (each worker of `serve --workers N` is a replica)."""
    return f"{socket.gethostname()}/{os.getpid()}"


def short(cert: x509.Certificate) -> str:
    """The fingerprint prefix in log lines and metric labels."""
    return fingerprint(cert)[:23]


def issuer_record(issuer: Issuer, writer: str, now: datetime) -> IssuerCertRecord:
    return IssuerCertRecord(
        fingerprint(issuer.certificate),
        writer,
        fingerprint(issuer.anchor),
        issuer.certificate.not_valid_before_utc,
        issuer.certificate.not_valid_after_utc,
        issuer.certificate.public_bytes(_DER),
        now,
    )


class IssuerSource(Protocol):
    """One mode: the issuer that signs now, the bundle served, what else is in use, the next step."""

    @property
    def active(self) -> Issuer: ...
    @property
    def bundle(self) -> TrustBundle: ...
    def poll(self, now: datetime) -> None: ...
    def in_use(self) -> list[tuple[str, Issuer]]: ...
    def next_step(self) -> datetime | None: ...


# -- file mode


class FileIssuers:
    """The issuer in DIR's files (file mode): hot reload, staged sets, the last good issuer."""

    def __init__(
        self,
        tdir: TrustDir,
        clock: Clock,
        metrics: Metrics,
        passphrase: bytes | None = None,
        *,
        last_good: Issuer | None = None,
        warn: timedelta | None = None,
    ) -> None:
        """Starts from the files in ``tdir``; if they are bad and ``last_good`` is given, from that issuer
        (a restarted worker of `serve --workers N` serving what the others serve)."""
        self._tdir = tdir
        self._clock = clock
        self._metrics = metrics
        self._passphrase = passphrase
        self._warn = warn
        self._paths = (tdir.issuer_cert, tdir.issuer_key_source, tdir.bundle)
        self._stamp = file_stamp(self._paths)
        try:
            tdir.check_private()
            issuer = tdir.load_issuer(passphrase=passphrase)
            validate(issuer, clock)
        except (MeshcaError, ValueError, OSError) as exc:
            if last_good is None:
                raise
            validate(last_good, clock)
            metrics.reloads.labels("failure").inc()
            log.warning("issuer.reload_failed", reason=str(exc), serving=short(last_good.certificate))
            issuer = last_good
        self.active: Issuer = issuer
        self._staged: Issuer | None = None  # valid, waiting for its NotBefore
        self._warned_at: datetime | None = None
        self._warn_expiring(clock())

    @property
    def bundle(self) -> TrustBundle:
        return self.active.bundle

    def in_use(self) -> list[tuple[str, Issuer]]:
        staged = [("staged", self._staged)] if self._staged is not None else []
        return [("active", self.active), *staged]

    def next_step(self) -> datetime | None:
        return None  # nothing is scheduled: the files change when an operator or cert-manager says

    def poll(self, now: datetime) -> None:
        """Reloads if the files changed, or takes over a staged issuer now valid."""
        stamp = file_stamp(self._paths)
        if stamp != self._stamp:
            self._stamp = stamp
            self._staged = None  # the files it came from are gone
            self._reload()
        elif self._staged is not None and now >= self._staged.not_before:
            staged, self._staged = self._staged, None
            self._adopt(staged)
        self._warn_expiring(now)

    def _reload(self) -> None:
        try:
            self._tdir.check_private()
            issuer = self._tdir.load_issuer(passphrase=self._passphrase)
            if self._clock() < issuer.not_before:
                validate(issuer, lambda: issuer.not_before)  # everything else must hold when it takes over
                self._staged = issuer
                self._metrics.reloads.labels("staged").inc()
                log.info(
                    "issuer.staged",
                    issuer=short(issuer.certificate),
                    takes_over=issuer.not_before.isoformat(),
                    serving=short(self.active.certificate),
                )
                return
        except (MeshcaError, ValueError, OSError) as exc:
            self._refuse(exc)
            return
        self._adopt(issuer)

    def _refuse(self, exc: Exception) -> None:
        self._metrics.reloads.labels("failure").inc()
        self._metrics.rotations.labels("issuer", "failure").inc()
        log.warning("issuer.reload_failed", reason=str(exc), serving=short(self.active.certificate))

    def _adopt(self, issuer: Issuer) -> None:
        """Validates ``issuer`` now and swaps it in."""
        try:
            validate(issuer, self._clock)
        except (MeshcaError, ValueError, OSError) as exc:
            self._refuse(exc)
            return
        self.active = issuer
        self._warned_at = None  # a new issuer: its own warning, if it needs one
        self._metrics.reloads.labels("success").inc()
        self._metrics.rotations.labels("issuer", "success").inc()
        log.info(
            "issuer.reloaded",
            issuer=short(issuer.certificate),
            not_after=issuer.not_after.isoformat(),
            anchors=len(issuer.bundle.anchors),
        )

    def _warn_expiring(self, now: datetime) -> None:
        """``issuer.expiring`` once the issuer is within its warning time, then every `EXPIRING_REPEAT`."""
        issuer = self.active
        warn = issuer_warning(issuer.certificate.not_valid_before_utc, issuer.not_after, self._warn)
        if now < issuer.not_after - warn:
            self._warned_at = None
            return
        if self._warned_at is not None and now < self._warned_at + EXPIRING_REPEAT:
            return
        self._warned_at = now
        log.warning(
            "issuer.expiring",
            issuer=short(issuer.certificate),
            not_after=issuer.not_after.isoformat(),
            left=max(issuer.not_after - now, timedelta()).total_seconds(),
            staged=short(self._staged.certificate) if self._staged is not None else None,
        )


# -- managed mode


@dataclass(frozen=True, slots=True)
class _Anchor:
    certificate: x509.Certificate
    key: SigningKey = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)


def load_anchor(tdir: TrustDir, passphrase: bytes | None) -> _Anchor:
    """The active anchor: DIR/trust-anchor.crt and its key (file or URI), which must match."""
    try:
        certificate = load_certificates(tdir.anchor_cert.read_bytes())[0]
    except OSError as exc:
        raise IssuerUnavailable(f"cannot read {tdir.anchor_cert}: {exc.strerror}") from exc
    except ValueError as exc:
        raise IssuerUnavailable(f"{tdir.anchor_cert}: {exc}") from exc
    uri = tdir.anchor_key_uri.exists()
    source = tdir.anchor_key_uri if uri else tdir.anchor_key
    if uri and tdir.anchor_key.exists():
        raise IssuerUnavailable(f"both {tdir.anchor_key} and {tdir.anchor_key_uri} exist: remove one")
    try:
        check_private(source)  # a key others could replace would let them choose the issuers' anchor
        key = load_signing_key(source.read_bytes(), passphrase)
    except OSError as exc:
        raise IssuerUnavailable(f"cannot read {source}: {exc.strerror}") from exc
    except ValueError as exc:
        raise IssuerUnavailable(f"{source}: {exc}") from exc
    if as_signer(key).public_key() != certificate.public_key():
        raise IssuerUnavailable(f"{source} is not the key of {tdir.anchor_cert}")
    return _Anchor(certificate, key)


def check_anchor(tdir: TrustDir, passphrase: bytes | None) -> None:
    """Raises unless DIR holds an anchor a managed service can mint from (for a one-line start failure)."""
    load_anchor(tdir, passphrase)


class ManagedIssuers:
    """Issuers this replica mints from the active anchor (managed mode), scheduled by `IssuerSlots`.

    ``record`` stores an issuer certificate and raises `StoreError` when it
    cannot: a minted issuer that is not recorded is not used (tried again at
    the next poll; the active one keeps signing).
    """

    def __init__(
        self,
        tdir: TrustDir,
        clock: Clock,
        metrics: Metrics,
        record: Callable[[Issuer], None],
        *,
        issuer_ttl: timedelta,
        max_leaf_ttl: timedelta,
        passphrase: bytes | None = None,
    ) -> None:
        self._tdir = tdir
        self._metrics = metrics
        self._record = record
        self._ttl = issuer_ttl
        self._passphrase = passphrase
        # both key forms are watched: `anchor activate` may replace a key file by a URI or back
        self._anchor_paths = (tdir.anchor_cert, tdir.anchor_key, tdir.anchor_key_uri)
        self._bundle_paths = (tdir.bundle,)
        self._anchor_stamp = file_stamp(self._anchor_paths)
        self._bundle_stamp = file_stamp(self._bundle_paths)
        self._refused: dict[str, object] = {}  # what was refused, by stamp: logged once each
        self._mint_failure: tuple[str, float] = ("", -math.inf)  # the last logged reason, when (monotonic)
        self._anchor = self._load_anchor()
        self._bundle = self._load_bundle(self._anchor)
        self._slots = IssuerSlots(max_leaf_ttl)
        done = self._slots.advance(clock(), self._mint)
        self._report(done)
        if self._slots.active is None:
            reason = next((step.reason for step in done if not step.ok), "")
            raise IssuerUnavailable(f"no issuer could be minted from {tdir.anchor_cert}: {reason}")

    @property
    def active(self) -> Issuer:
        assert self._slots.active is not None  # minted in __init__, never unset by IssuerSlots
        return self._slots.active

    @property
    def bundle(self) -> TrustBundle:
        return self._bundle

    def in_use(self) -> list[tuple[str, Issuer]]:
        slots = self._slots
        prepared = [("prepared", slots.prepared)] if slots.prepared is not None else []
        return [("active", self.active), *prepared, *(("old", o.issuer) for o in slots.old)]

    def next_step(self) -> datetime | None:
        return self._slots.next_step()

    def poll(self, now: datetime) -> None:
        self._poll_anchor()
        self._poll_bundle()
        if fingerprint(self.active.anchor) != self._anchor.fingerprint:
            self._switch_anchor(now)
        else:
            self._report(self._slots.advance(now, self._mint))

    # the anchor files

    def _load_anchor(self) -> _Anchor:
        return load_anchor(self._tdir, self._passphrase)

    def _load_bundle(self, anchor: _Anchor) -> TrustBundle:
        bundle = self._tdir.load_bundle()
        if anchor.certificate not in bundle:
            raise IssuerUnavailable(f"{self._tdir.bundle} does not hold the active anchor {short(anchor.certificate)}")
        return bundle

    def _poll_anchor(self) -> None:
        stamp = file_stamp(self._anchor_paths)
        if stamp == self._anchor_stamp:
            return
        try:
            anchor = self._load_anchor()
        except (MeshcaError, ValueError, OSError) as exc:
            # mid-swap (`anchor activate` writes the key, then the certificate): tried again at the next poll
            self._refuse("anchor", stamp, exc)
            return
        self._anchor_stamp = stamp
        if anchor.fingerprint != self._anchor.fingerprint and anchor.certificate not in self._bundle:
            self._bundle_stamp = ()  # read bundle.pem again: the new anchor must be in it before it is used
        self._anchor = anchor

    def _poll_bundle(self) -> None:
        stamp = file_stamp(self._bundle_paths)
        if stamp == self._bundle_stamp:
            return
        try:
            bundle = self._load_bundle(self._anchor)
        except (MeshcaError, ValueError, OSError) as exc:
            self._refuse("bundle", stamp, exc)
            return
        self._bundle_stamp = stamp
        self._bundle = bundle

    def _refuse(self, what: str, stamp: object, exc: Exception) -> None:
        if self._refused.get(what) != stamp:
            self._refused[what] = stamp
            log.warning(f"{what}.reload_failed", reason=str(exc), serving=short(self.active.certificate))

    def _switch_anchor(self, now: datetime) -> None:
        """A new issuer from the new anchor at once; on failure the current one keeps signing, and this
        is tried again at the next poll."""
        previous = self.active.anchor
        done = self._slots.replace(now, self._mint)
        self._report(done)
        ok = fingerprint(self.active.anchor) == self._anchor.fingerprint
        self._metrics.rotations.labels("anchor", "success" if ok else "failure").inc()
        if ok:
            log.info(
                "anchor.activated",
                anchor=short(self._anchor.certificate),
                previous=short(previous),
                not_after=self._anchor.certificate.not_valid_after_utc.isoformat(),
                issuer=short(self.active.certificate),
                at=now.isoformat(),
            )

    # issuers

    def _mint(self, now: datetime) -> Issuer:
        anchor = self._anchor
        issuer = mint_issuer(anchor.certificate, anchor.key, self._bundle, now=now, ttl=self._ttl)
        validate(issuer, lambda: now)
        self._record(issuer)  # before it signs anything
        return issuer

    def _report(self, done: list[Rotation]) -> None:
        for step in done:
            self._metrics.rotations.labels("issuer", "success" if step.ok else "failure").inc()
            if not step.ok:
                # tried at every poll: logged when the reason changes, else once a minute (the counter has them all)
                now = time.monotonic()
                last_reason, last_at = self._mint_failure
                if step.reason != last_reason or now - last_at >= MINT_FAILED_REPEAT:
                    self._mint_failure = (step.reason, now)
                    log.error("issuer.mint_failed", reason=step.reason, serving=_short_or_none(self._slots.active))
                continue
            self._mint_failure = ("", -math.inf)
            assert step.issuer is not None
            cert = step.issuer.certificate
            fields = {
                "issuer": short(cert),
                "anchor": short(step.issuer.anchor),
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": step.issuer.not_after.isoformat(),
            }
            event = {"prepare": "issuer.prepared", "activate": "issuer.activated", "retire": "issuer.retired"}
            log.info(event[step.step], **fields)


def _short_or_none(issuer: Issuer | None) -> str | None:
    return short(issuer.certificate) if issuer is not None else None


# -- what the pipeline reads


class IssuerState:
    """The active issuer and the served bundle, from one `IssuerSource`, polled; expiry metrics; the server SVID.

    Build it with `from_files` (file mode) or `managed`.
    """

    def __init__(
        self,
        source: IssuerSource,
        clock: Clock,
        metrics: Metrics,
        store: Store,
        *,
        renewal: RenewalPolicy = DEFAULT_POLICY,
        rng: random.Random | None = None,
        replica: str | None = None,
    ) -> None:
        self._source = source
        self._clock = clock
        self._metrics = metrics
        self._store = store
        self._renewal = renewal
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._replica = replica or replica_name()
        self._sequence = 1
        self.issuer: Issuer = source.active
        self.bundle: TrustBundle = source.bundle
        self._changed = asyncio.Event()
        self._usable = True
        self._key_failure: KeyCustodyError | None = None
        self._serving: ServingSvid | None = None
        self._serving_lock = threading.Lock()
        self._issuer_series = Labelled(metrics.issuer_expiry, metrics.multiprocess)
        self._anchor_series = Labelled(metrics.anchor_expiry, metrics.multiprocess)
        self._unrecorded: dict[str, Issuer] = {}  # file mode: loaded issuers the store has not taken yet
        self._metrics.serving.set(1)
        self._note_issuer()
        self._record_pending()
        self._export()

    @classmethod
    def from_files(
        cls,
        tdir: TrustDir,
        clock: Clock,
        metrics: Metrics,
        store: Store,
        passphrase: bytes | None = None,
        *,
        last_good: Issuer | None = None,
        warn: timedelta | None = None,
        renewal: RenewalPolicy = DEFAULT_POLICY,
        rng: random.Random | None = None,
    ) -> IssuerState:
        """File mode: the issuer in ``tdir``'s files (``last_good`` when they are bad at start)."""
        source = FileIssuers(tdir, clock, metrics, passphrase, last_good=last_good, warn=warn)
        return cls(source, clock, metrics, store, renewal=renewal, rng=rng)

    @classmethod
    def managed(
        cls,
        tdir: TrustDir,
        clock: Clock,
        metrics: Metrics,
        store: Store,
        passphrase: bytes | None = None,
        *,
        issuer_ttl: timedelta,
        max_leaf_ttl: timedelta,
        renewal: RenewalPolicy = DEFAULT_POLICY,
        rng: random.Random | None = None,
        replica: str | None = None,
    ) -> IssuerState:
        """Managed mode: issuers minted from ``tdir``'s anchor, each recorded in ``store`` before use."""
        writer = replica or replica_name()

        def record(issuer: Issuer) -> None:
            store.record_issuer(issuer_record(issuer, writer, clock()))

        source = ManagedIssuers(
            tdir,
            clock,
            metrics,
            record,
            issuer_ttl=issuer_ttl,
            max_leaf_ttl=max_leaf_ttl,
            passphrase=passphrase,
        )
        return cls(source, clock, metrics, store, renewal=renewal, rng=rng, replica=writer)

    # -- reads

    @property
    def usable(self) -> bool:
        return self._usable

    @property
    def sequence(self) -> int:
        return self._sequence

    def change_event(self) -> asyncio.Event:
        """An event set at the next bundle change.

        Take it before reading the bundle: a change that lands in between
        (while a watcher is suspended sending) then still wakes the watcher.
        """
        return self._changed

    def in_use(self) -> list[tuple[str, Issuer]]:
        """Every issuer in use, with its state (active, prepared, old; staged in file mode)."""
        return self._source.in_use()

    # -- reload

    def poll(self) -> bool:
        """`refresh`, then `apply`: for a caller without an event loop to keep free (tests, tools)."""
        self.refresh()
        return self.apply()

    def refresh(self) -> None:
        """The part of a poll that may wait (files, the anchor's token, the store): the source polls (reloads,
        takes its due steps, mints) and loaded issuers are recorded. The server runs it off the event loop."""
        self._source.poll(self._clock())
        self._record_pending()

    def apply(self) -> bool:
        """Takes the source's issuer and bundle (a new bundle wakes the watchers), exports the metrics,
        refreshes usability. On the event loop, after `refresh`. Returns True when another issuer became active."""
        swapped = self._source.active is not self.issuer
        if swapped:
            self.issuer = self._source.active
            self._note_issuer()
        self._take_bundle(self._source.bundle)
        self._export()
        self._refresh_usable()
        return swapped

    def _take_bundle(self, bundle: TrustBundle) -> None:
        if set(bundle.anchors) == set(self.bundle.anchors):
            return
        self._sequence += 1
        self.bundle = TrustBundle(bundle.trust_domain, bundle.anchors, self._sequence)
        log.info("bundle.changed", sequence=self._sequence, anchors=len(self.bundle.anchors))
        self._changed.set()
        self._changed = asyncio.Event()

    def _note_issuer(self) -> None:
        """File mode records each loaded issuer too, at the next `refresh` (managed issuers are recorded
        before they are used)."""
        if isinstance(self._source, FileIssuers):
            self._unrecorded[fingerprint(self.issuer.certificate)] = self.issuer

    def _record_pending(self) -> None:
        for fp, issuer in list(self._unrecorded.items()):
            try:
                self._store.record_issuer(issuer_record(issuer, self._replica, self._clock()))
            except StoreError as exc:  # the store is down: tried again at the next poll
                log.warning("issuer.record_failed", issuer=fp[:23], reason=str(exc))
                return
            del self._unrecorded[fp]

    def key_failed(self, exc: KeyCustodyError) -> None:
        """A signature through the issuer's PKCS#11 token failed: unusable until a probe signs again (`poll`)."""
        if self._key_failure is None:
            log.error("issuer.key_failed", reason=str(exc), pkcs11_error=exc.pkcs11_error)
        self._key_failure = exc
        self._usable = False
        self._metrics.serving.set(0)

    def check_key(self) -> None:
        """Raises while the issuer's token is failing, so requests do not queue up on it."""
        failure = self._key_failure
        if failure is not None:
            raise KeyCustodyError(str(failure), failure.pkcs11_error)

    def _refresh_usable(self) -> None:
        try:
            self.issuer.check(self._clock())
            if self._key_failure is not None:
                validate(self.issuer, self._clock)  # a probe signature through the token
                log.info("issuer.key_recovered", issuer=short(self.issuer.certificate))
                self._key_failure = None
            usable = True
        except MeshcaError as exc:
            usable = False
            if isinstance(exc, KeyCustodyError):
                self._key_failure = exc
            if self._usable:
                log.error("issuer.unusable", reason=str(exc))
        self._usable = usable
        self._metrics.serving.set(1 if usable else 0)

    def _export(self) -> None:
        self._issuer_series.update(
            {(short(i.certificate), state): i.not_after.timestamp() for state, i in self._source.in_use()}
        )
        self._anchor_series.update({(short(a),): a.not_valid_after_utc.timestamp() for a in self.bundle.anchors})
        due = self._source.next_step()
        if due is not None and self._metrics.next_rotation is not None:
            self._metrics.next_rotation.set(due.timestamp())

    # -- the server's own SVID

    def serving_svid(self, server_names: tuple[str, ...], ttl: timedelta) -> ServingSvid:
        """The current server SVID, issued anew when the rotation policy says or after an issuer change.

        Raises `StoreError` when a new one cannot be recorded: it is then not used.
        """
        with self._serving_lock:  # gRPC calls this from its own threads
            return self._serving_svid(server_names, ttl)

    def _serving_svid(self, server_names: tuple[str, ...], ttl: timedelta) -> ServingSvid:
        now = self._clock()
        current = self._serving
        issuer = self.issuer
        issuer_fingerprint = fingerprint(issuer.certificate)  # a new active issuer: a new server SVID
        if (
            current is not None
            and now.timestamp() < current.renew_at
            and current.issuer_fingerprint == issuer_fingerprint  # a reloaded issuer signs a new one
        ):
            return current
        key = generate_key()
        issued = issuer.sign(
            key.public_key(),
            issuer.trust_domain.spiffe_id("/meshca/identity"),
            now=now,
            ttl=ttl,
            dns_names=server_names,
        )
        serial = format(issued.serial, "x")
        record = IssuanceRecord(serial, str(issued.spiffe_id), issued.not_after, SELF_PRINCIPAL, SELF_API, now)
        try:
            self._store.record(record).result(timeout=_RECORD_TIMEOUT)
        except TimeoutError as exc:
            self._metrics.rotations.labels("server_svid", "failure").inc()
            raise StoreError("the issuance log did not record the server SVID in time") from exc
        except StoreError:
            self._metrics.rotations.labels("server_svid", "failure").inc()
            raise
        self._metrics.rotations.labels("server_svid", "success").inc()
        renew_at = renewal_time(now, issued.not_after, self._renewal, self._rng)
        self._serving = ServingSvid(issued.chain_pem(), private_key_pem(key), renew_at.timestamp(), issuer_fingerprint)
        log.info(
            "server.svid_issued",
            spiffe_id=str(issued.spiffe_id),
            serial=serial,
            not_after=issued.not_after.isoformat(),
            renew_at=renew_at.isoformat(),
        )
        return self._serving
