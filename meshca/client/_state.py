"""The I/O-free heart of an SVID source: two flows of steps that the threaded and asyncio drivers run.

`SourceMachine.renewal()` and `SourceMachine.watch()` are generators. Each
yields the next `Step` and is sent its result: a `Fetch` gets the
`IssueSVIDResponse` or a `Failure`, a `NextBundle` the next `Bundle` message
or a `Failure`, every other step ``None``. The drivers only move bytes over
gRPC, sleep, and wake whoever waits (as httpx drives one auth flow from its
sync and async clients). Every clock read and random draw comes from the
injected ``clock`` and ``rng``, so a test runs whole renewal, backoff and
reconnect sequences on a frozen clock without sleeping.

What the machine decides, it reports as `Event`s to its hooks: TLS contexts,
metrics and logs live there (see ``_hooks.py``), not here. See
docs/architecture.md, Client.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import timedelta

from meshca._proto import meshca_identity_pb2 as pb
from meshca.client._core import (
    Credentials,
    Snapshot,
    X509Svid,
    bundle_from_message,
    make_request,
    svid_from_response,
)
from meshca.pki._bundle import TrustBundle
from meshca.pki._errors import AuthenticationError, MeshcaError, VerificationError
from meshca.pki._keys import KeyType, generate_key
from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy, renewal_time, retry_delay
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock
from meshca.pki._verify import verify_chain

__all__ = [
    "BundleIgnored",
    "ChainUntrusted",
    "Event",
    "Failure",
    "Fetch",
    "FetchFailed",
    "Flow",
    "GiveUp",
    "Hook",
    "NextBundle",
    "Publish",
    "Published",
    "Reconnect",
    "RenewNow",
    "Reply",
    "Sleep",
    "SourceConfig",
    "SourceMachine",
    "Step",
    "WatchFailed",
]


@dataclass(frozen=True, slots=True)
class SourceConfig:
    server: str
    spiffe_id: SpiffeId
    credentials: Credentials
    key_type: KeyType = KeyType.EC_P256
    ttl: timedelta | None = None
    renewal: RenewalPolicy = DEFAULT_POLICY
    server_name: str | None = None
    call_timeout: timedelta = timedelta(seconds=10)


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed call, as the machine needs it: why (for people), and what the next try should do."""

    reason: str
    refusal: MeshcaError | None = None  # set when retrying cannot help; raised by wait_ready before the first SVID
    reconnect: bool = False  # the next call should go over a new channel


# -- steps: what a driver does next


@dataclass(frozen=True, slots=True)
class Sleep:
    delay: timedelta


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Close the channel and open a new one that trusts ``bundle``. Calls in flight on the old one fail."""

    bundle: TrustBundle


@dataclass(frozen=True, slots=True)
class Fetch:
    """Send IssueSVID; reply with the response or a `Failure`."""

    request: pb.IssueSVIDRequest


@dataclass(frozen=True, slots=True)
class NextBundle:
    """Read the next message of the WatchBundle stream, opening one if none is open; reply with it or a `Failure`."""


@dataclass(frozen=True, slots=True)
class Publish:
    """``snapshot`` is now current (the hooks have run): wake whoever waits for it."""

    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class RenewNow:
    """Wake the renewal flow if it sleeps: the current SVID no longer verifies against the bundle."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No SVID is coming: the server refused for good before the first one. The flow ends after this."""

    error: MeshcaError


Step = Sleep | Reconnect | Fetch | NextBundle | Publish | RenewNow | GiveUp
Reply = pb.IssueSVIDResponse | pb.Bundle | Failure | None
Flow = Generator[Step, Reply, None]


# -- events: what the hooks hear


@dataclass(frozen=True, slots=True)
class Published:
    """Sent under the publication lock, before the snapshot becomes current: hooks see snapshots in order."""

    snapshot: Snapshot
    previous: Snapshot


@dataclass(frozen=True, slots=True)
class FetchFailed:
    spiffe_id: SpiffeId
    failure: Failure
    attempt: int
    retry_in: timedelta | None  # None: given up


@dataclass(frozen=True, slots=True)
class WatchFailed:
    failure: Failure
    attempt: int
    retry_in: timedelta


@dataclass(frozen=True, slots=True)
class BundleIgnored:
    reason: str


@dataclass(frozen=True, slots=True)
class ChainUntrusted:
    """A new bundle no longer verifies the current SVID's chain (its anchor was retired): renewing now."""

    spiffe_id: SpiffeId
    reason: str


Event = Published | FetchFailed | WatchFailed | BundleIgnored | ChainUntrusted
Hook = Callable[[Event], None]


class SourceMachine:
    """The current snapshot, and the renewal and bundle-watch flows that change it.

    Thread-safe: the threaded driver runs the two flows on two threads, and
    each changes half of the snapshot under one lock.
    """

    def __init__(
        self,
        config: SourceConfig,
        bundle: TrustBundle,
        *,
        clock: Clock,
        rng: random.Random,
        hooks: Sequence[Hook] = (),
        initial: X509Svid | None = None,
    ) -> None:
        if bundle.trust_domain != config.spiffe_id.trust_domain:
            raise ValueError(
                f"bundle is for {bundle.trust_domain}, the SPIFFE ID is in {config.spiffe_id.trust_domain}"
            )
        self.config = config
        self.clock = clock
        self.hooks = list(hooks)
        self._rng = rng
        self._lock = threading.Lock()
        if initial is not None and initial.spiffe_id != config.spiffe_id:
            raise ValueError(f"the initial SVID is for {initial.spiffe_id}, not {config.spiffe_id}")
        self._snapshot = Snapshot(initial, bundle)
        # Drivers open their first channel on the initial bundle; a changed bundle, or a failure
        # that asks for it, makes the next call go over a new one.
        self._channel_bundle = bundle
        self._reconnect = False
        self.refusal: MeshcaError | None = None
        self.last_failure: Failure | None = None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def timeout_error(self, timeout: float | None) -> TimeoutError:
        """What ``wait_ready`` raises when no SVID came in time: with the last failure's reason."""
        message = f"no SVID for {self.config.spiffe_id} within {timeout} s"
        if self.last_failure is not None:
            message += f"; the last attempt failed: {self.last_failure.reason}"
        return TimeoutError(message)

    # -- the flows

    def renewal(self) -> Flow:
        """Fetch at once, then at the renewal moment; back off on failure; give up only on a first refusal.

        The renewal moment comes early when the current SVID stops verifying
        against the bundle (the driver wakes this flow's sleep on `RenewNow`).
        """
        policy = self.config.renewal
        attempt = 0
        # An SVID held from before: when it was received is unknown (NotBefore is backdated), so the
        # renewal moment counts from now, over what is left of its life.
        initial = self._snapshot.svid
        renew_at = renewal_time(self.clock(), initial.not_after, policy, self._rng) if initial else None
        while True:
            # Sleeps may end early (a RenewNow, or a stale wake-up): each one is decided again.
            while (
                renew_at is not None
                and (wait := renew_at - self.clock()) > timedelta()
                and self._untrusted(self._snapshot) is None
            ):
                yield Sleep(wait)
            if (reconnect := self._reconnect_step()) is not None:
                yield reconnect
            outcome = yield from self._fetch()
            if isinstance(outcome, Snapshot):
                attempt = 0
                assert outcome.svid is not None
                renew_at = renewal_time(self.clock(), outcome.svid.not_after, policy, self._rng)
                yield Publish(outcome)
                continue
            attempt += 1
            self.last_failure = outcome
            svid = self._snapshot.svid
            if outcome.refusal is not None and svid is None:
                self.refusal = outcome.refusal
                self._emit(FetchFailed(self.config.spiffe_id, outcome, attempt, None))
                yield GiveUp(outcome.refusal)
                return
            # After the first SVID every failure is retried: the current SVID stays in use, and an
            # operator may fix the credential or the server in the meantime.
            delay = retry_delay(attempt, self.clock(), svid.not_after if svid else None, policy, self._rng)
            self._emit(FetchFailed(self.config.spiffe_id, outcome, attempt, delay))
            yield Sleep(delay)

    def watch(self) -> Flow:
        """Follow the bundle stream; apply changed anchors; back off and reopen when it fails or ends."""
        attempt = 0
        while True:
            reply = yield NextBundle()
            if isinstance(reply, pb.Bundle):
                attempt = 0
                snapshot = self._bundle_update(reply)
                if snapshot is not None:
                    yield Publish(snapshot)
                    if (reason := self._untrusted(snapshot)) is not None:
                        assert snapshot.svid is not None
                        self._emit(ChainUntrusted(snapshot.svid.spiffe_id, reason))
                        yield RenewNow()
                continue
            assert isinstance(reply, Failure)
            if reply.reconnect:
                self._reconnect = True
            attempt += 1
            delay = retry_delay(attempt, self.clock(), None, self.config.renewal, self._rng)
            self._emit(WatchFailed(reply, attempt, delay))
            yield Sleep(delay)
            if (reconnect := self._reconnect_step()) is not None:
                yield reconnect

    # -- the parts

    def _untrusted(self, snapshot: Snapshot) -> str | None:
        """Why the snapshot's SVID does not verify against its bundle (None: it does, or there is no SVID)."""
        if snapshot.svid is None:
            return None
        try:
            verify_chain(snapshot.svid.chain, snapshot.bundle, at=self.clock())
        except VerificationError as exc:
            return str(exc)
        return None

    def _fetch(self) -> Generator[Step, Reply, Snapshot | Failure]:
        key = generate_key(self.config.key_type)
        config = self.config
        snapshot = self._snapshot
        # An SVID the bundle no longer vouches for is no credential either (the server checks its proof
        # against the same anchors): renew with the bootstrap credential instead.
        untrusted = self._untrusted(snapshot)
        current = snapshot.svid if untrusted is None else None
        try:
            request = make_request(key, config.spiffe_id, config.credentials, current, now=self.clock(), ttl=config.ttl)
        except OSError as exc:  # the JWT file is missing or unreadable: it may appear
            return Failure(f"cannot read {exc.filename}: {exc.strerror}")
        except AuthenticationError as exc:  # the SVID expired or lost its anchor, and nothing else can prove who we are
            if untrusted is not None:  # say why: a valid SVID whose anchor left the bundle is no "expired" one
                exc = AuthenticationError(
                    f"the current SVID does not verify against the bundle ({untrusted}) "
                    "and no other credential is configured",
                    exc.reason,
                )
            return Failure(str(exc), refusal=exc)
        reply = yield Fetch(request)
        if isinstance(reply, Failure):
            if reply.reconnect:
                self._reconnect = True
            return reply
        assert isinstance(reply, pb.IssueSVIDResponse)
        try:
            svid = svid_from_response(reply, key, config.spiffe_id, self._snapshot.bundle, now=self.clock())
        except MeshcaError as exc:
            return Failure(f"{type(exc).__name__}: {exc}")
        return self._commit(lambda current: Snapshot(svid, current.bundle))

    def _bundle_update(self, message: pb.Bundle) -> Snapshot | None:
        """The new snapshot if the message changes the anchors; None if it changes nothing or is refused."""
        try:
            bundle = bundle_from_message(message)
        except (ValueError, MeshcaError) as exc:
            self._emit(BundleIgnored(f"unreadable bundle: {exc}"))
            return None
        if bundle.trust_domain != self._snapshot.bundle.trust_domain:
            self._emit(BundleIgnored(f"bundle for another trust domain: {bundle.trust_domain}"))
            return None
        if set(bundle.anchors) == set(self._snapshot.bundle.anchors):
            return None
        return self._commit(lambda latest: Snapshot(latest.svid, bundle))

    def _reconnect_step(self) -> Reconnect | None:
        with self._lock:
            bundle = self._snapshot.bundle
            if not self._reconnect and bundle is self._channel_bundle:
                return None
            self._reconnect, self._channel_bundle = False, bundle
            return Reconnect(bundle)

    def _commit(self, change: Callable[[Snapshot], Snapshot]) -> Snapshot:
        # The two flows each change half of the snapshot: build the new one from the latest under
        # the lock, so neither undoes the other's change. The hooks run under it too, so they see
        # snapshots in publication order (a TLS context never goes back to an older SVID), and
        # before the snapshot becomes current (whoever sees it finds every context already on it).
        with self._lock:
            previous = self._snapshot
            snapshot = change(previous)
            self._emit(Published(snapshot, previous))
            self._snapshot = snapshot
        return snapshot

    def _emit(self, event: Event) -> None:
        for hook in self.hooks:
            hook(event)
