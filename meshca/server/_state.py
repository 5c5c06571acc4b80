"""The issuer and bundle the server signs with, reloaded from disk without a restart.

Files are polled (stat of the resolved paths, so a Kubernetes ``..data``
symlink swap is seen like an in-place replace). A changed set is loaded,
validated (the issuer matches its key, chains to the new bundle, is valid
now, and a probe leaf it signs verifies) and only then swapped in; a bad
replacement is refused, logged and counted, and the last good issuer keeps
serving. Files that other users could replace are refused like a bad set
(`TrustDir.check_private`).

A set written ahead of its NotBefore (cert-manager stages the next issuer
before the current one expires) is validated as of that NotBefore, kept, and
swapped in at the first poll once it is valid: the files do not change
again, so waiting for a change would let the current issuer expire.

The server's own SVID (``spiffe://TD/meshca/identity``) renews by the same
rotation policy as the clients, and is recorded in the issuance log (api
``self``, principal ``meshca``) before it is used. The probe leaf is never
handed to anyone and is not recorded.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import structlog

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import fingerprint
from meshca.pki._errors import KeyCustodyError, MeshcaError, StoreError
from meshca.pki._issuer import Issuer
from meshca.pki._keys import generate_key, private_key_pem
from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy, renewal_time
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir
from meshca.pki._verify import verify_chain
from meshca.server._metrics import Metrics
from meshca.server._store import IssuanceRecord, Store

__all__ = ["IssuerState", "ServingSvid"]

log = structlog.get_logger("meshca.server")

SELF_API = "self"
SELF_PRINCIPAL = "meshca"
_RECORD_TIMEOUT = 30.0  # seconds; a store slower than this fails the renewal, the current SVID stays

_Stamp = tuple[tuple[str, int, int, int, int], ...]


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


class IssuerState:
    def __init__(
        self,
        tdir: TrustDir,
        clock: Clock,
        metrics: Metrics,
        store: Store,
        passphrase: bytes | None = None,
        *,
        last_good: Issuer | None = None,
        renewal: RenewalPolicy = DEFAULT_POLICY,
        rng: random.Random | None = None,
    ) -> None:
        """Starts from the files in ``tdir``; if they are bad and ``last_good`` is given, from that issuer
        (a restarted worker of `serve --workers N` serving what the others serve)."""
        self._tdir = tdir
        self._clock = clock
        self._metrics = metrics
        self._store = store
        self._passphrase = passphrase
        self._renewal = renewal
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
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
            log.warning("issuer.reload_failed", reason=str(exc), serving=fingerprint(last_good.certificate)[:23])
            issuer = last_good
        self._sequence = 1
        self.issuer: Issuer = issuer
        self._staged: Issuer | None = None  # valid, waiting for its NotBefore
        self.bundle: TrustBundle = issuer.bundle
        self._changed = asyncio.Event()
        self._usable = True
        self._key_failure: KeyCustodyError | None = None
        self._serving: ServingSvid | None = None
        self._serving_lock = threading.Lock()
        self._metrics.serving.set(1)
        self._export_expiry()

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

    # -- reload

    def poll(self) -> bool:
        """Reloads if the files changed, or takes over a staged issuer now valid; refreshes usability.

        Returns True when a new issuer was swapped in.
        """
        stamp = file_stamp(self._paths)
        swapped = False
        if stamp != self._stamp:
            self._stamp = stamp
            self._staged = None  # the files it came from are gone
            swapped = self._reload()
        elif self._staged is not None and self._clock() >= self._staged.not_before:
            staged, self._staged = self._staged, None
            swapped = self._adopt(staged)
        self._refresh_usable()
        return swapped

    def _reload(self) -> bool:
        try:
            self._tdir.check_private()
            issuer = self._tdir.load_issuer(passphrase=self._passphrase)
            if self._clock() < issuer.not_before:
                validate(issuer, lambda: issuer.not_before)  # everything else must hold when it takes over
                self._staged = issuer
                self._metrics.reloads.labels("staged").inc()
                log.info(
                    "issuer.staged",
                    issuer=fingerprint(issuer.certificate)[:23],
                    takes_over=issuer.not_before.isoformat(),
                    serving=fingerprint(self.issuer.certificate)[:23],
                )
                return False
        except (MeshcaError, ValueError, OSError) as exc:
            self._refuse(exc)
            return False
        return self._adopt(issuer)

    def _refuse(self, exc: Exception) -> None:
        self._metrics.reloads.labels("failure").inc()
        log.warning("issuer.reload_failed", reason=str(exc), serving=fingerprint(self.issuer.certificate)[:23])

    def _adopt(self, issuer: Issuer) -> bool:
        """Validates ``issuer`` now and swaps it in; the server SVID follows at its next use."""
        try:
            validate(issuer, self._clock)
        except (MeshcaError, ValueError, OSError) as exc:
            self._refuse(exc)
            return False
        old_bundle = self.bundle
        self.issuer = issuer
        self._metrics.reloads.labels("success").inc()
        log.info(
            "issuer.reloaded",
            issuer=fingerprint(issuer.certificate)[:23],
            not_after=issuer.not_after.isoformat(),
            anchors=len(issuer.bundle.anchors),
        )
        if set(issuer.bundle.anchors) != set(old_bundle.anchors):
            self._sequence += 1
            self.bundle = TrustBundle(issuer.trust_domain, issuer.bundle.anchors, self._sequence)
            log.info("bundle.changed", sequence=self._sequence, anchors=len(self.bundle.anchors))
            self._changed.set()
            self._changed = asyncio.Event()
        self._export_expiry()
        return True

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
                log.info("issuer.key_recovered", issuer=fingerprint(self.issuer.certificate)[:23])
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

    def _export_expiry(self) -> None:
        self._metrics.issuer_expiry.set(self.issuer.not_after.timestamp())
        if not self._metrics.multiprocess:  # multiprocess mode cannot clear; stale labels stay
            self._metrics.anchor_expiry.clear()
        for anchor in self.bundle.anchors:
            self._metrics.anchor_expiry.labels(fingerprint(anchor)[:23]).set(anchor.not_valid_after_utc.timestamp())

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
        issuer_fingerprint = fingerprint(issuer.certificate)
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
            raise StoreError("the issuance log did not record the server SVID in time") from exc
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
