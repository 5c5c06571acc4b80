"""The pure heart of an SVID source, shared by the threaded and asyncio twins.

It holds the current snapshot and decides what to do next; the twins only
move bytes over gRPC and sleep for the times it returns.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from weakref import WeakKeyDictionary, WeakSet

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshca._proto import meshca_identity_pb2 as pb
from meshca.client._core import (
    Credentials,
    Snapshot,
    X509Svid,
    bundle_from_message,
    describe_failure,
    make_request,
    svid_from_response,
)
from meshca.client._tls import SpiffeSSLContext, refresh
from meshca.pki._bundle import TrustBundle
from meshca.pki._keys import KeyType, PrivateKey, generate_key
from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy, renewal_time, retry_delay
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock

__all__ = ["SourceConfig", "SourceState"]

log = structlog.get_logger("meshca.client")


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


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.expiry = Gauge(
            "meshca_client_svid_expiry_timestamp_seconds",
            "NotAfter of the current SVID",
            ["spiffe_id"],
            registry=registry,
        )
        self.refreshes = Counter(
            "meshca_client_svid_refreshes", "SVID fetches by result", ["spiffe_id", "result"], registry=registry
        )


_metrics_by_registry: WeakKeyDictionary[CollectorRegistry, _Metrics] = WeakKeyDictionary()
_metrics_lock = threading.Lock()


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    with _metrics_lock:
        found = _metrics_by_registry.get(registry)
        if found is None:
            found = _metrics_by_registry[registry] = _Metrics(registry)
        return found


class SourceState:
    """Snapshot, listeners, renewal schedule. Thread-safe: the snapshot is swapped under a lock."""

    def __init__(
        self,
        config: SourceConfig,
        bundle: TrustBundle,
        clock: Clock,
        registry: CollectorRegistry | None,
        rng: random.Random | None,
    ) -> None:
        if bundle.trust_domain != config.spiffe_id.trust_domain:
            raise ValueError(
                f"bundle is for {bundle.trust_domain}, the SPIFFE ID is in {config.spiffe_id.trust_domain}"
            )
        self.config = config
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self._metrics = _metrics_for(self.registry)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._lock = threading.Lock()
        self._snapshot = Snapshot(None, bundle)
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._contexts: WeakSet[SpiffeSSLContext] = WeakSet()
        self._failures = 0
        self._renew_at: datetime | None = None
        self._pending_key: PrivateKey | None = None

    # -- reading

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, listener: Callable[[Snapshot], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def track(self, ctx: SpiffeSSLContext) -> SpiffeSSLContext:
        """Keeps ``ctx`` loaded with the current SVID and anchors from now on."""
        with self._lock:
            self._contexts.add(ctx)
            # Catch up with a change published while the context was being built.
            refresh(ctx, self._snapshot)
        return ctx

    # -- deciding

    def new_request(self) -> tuple[PrivateKey, pb.IssueSVIDRequest]:
        key = generate_key(self.config.key_type)
        request = make_request(
            key,
            self.config.spiffe_id,
            self.config.credentials,
            self._snapshot.svid,
            now=self.clock(),
            ttl=self.config.ttl,
        )
        return key, request

    def accept(self, key: PrivateKey, response: pb.IssueSVIDResponse) -> X509Svid:
        """Swaps in the SVID from ``response`` if it verifies; raises (keeping the old one) otherwise."""
        now = self.clock()
        svid = svid_from_response(response, key, self.config.spiffe_id, self._snapshot.bundle, now=now)
        self._failures = 0
        self._renew_at = renewal_time(now, svid.not_after, self.config.renewal, self._rng)
        self._metrics.refreshes.labels(str(self.config.spiffe_id), "success").inc()
        self._metrics.expiry.labels(str(self.config.spiffe_id)).set(svid.not_after.timestamp())
        log.info(
            "svid.renewed",
            spiffe_id=str(svid.spiffe_id),
            not_after=svid.not_after.isoformat(),
            serial=format(svid.leaf.serial_number, "x"),
        )
        self._publish(lambda current: Snapshot(svid, current.bundle))
        return svid

    def failed(self, exc: BaseException) -> timedelta:
        """Records a failed fetch and returns how long to wait before the next try."""
        self._failures += 1
        self._metrics.refreshes.labels(str(self.config.spiffe_id), "failure").inc()
        svid = self._snapshot.svid
        delay = retry_delay(
            self._failures, self.clock(), svid.not_after if svid else None, self.config.renewal, self._rng
        )
        log.warning(
            "svid.fetch_failed",
            spiffe_id=str(self.config.spiffe_id),
            reason=describe_failure(exc),
            attempt=self._failures,
            retry_in=delay.total_seconds(),
        )
        return delay

    def next_delay(self) -> timedelta:
        """Time until the next fetch: zero with no SVID, else until the renewal moment."""
        if self._snapshot.svid is None or self._renew_at is None:
            return timedelta()
        return max(timedelta(), self._renew_at - self.clock())

    def bundle_update(self, message: pb.Bundle) -> bool:
        """Applies a bundle from the watch stream; True if the anchors changed."""
        bundle = bundle_from_message(message)
        current = self._snapshot
        if bundle.trust_domain != current.bundle.trust_domain:
            log.warning("bundle.wrong_trust_domain", got=str(bundle.trust_domain))
            return False
        if set(bundle.anchors) == set(current.bundle.anchors):
            return False
        log.info(
            "bundle.updated",
            trust_domain=str(bundle.trust_domain),
            anchors=len(bundle.anchors),
            sequence=bundle.sequence,
        )
        self._publish(lambda latest: Snapshot(latest.svid, bundle))
        return True

    def _publish(self, change: Callable[[Snapshot], Snapshot]) -> None:
        # The renewal and watch threads each change half of the snapshot: build the new one from the
        # latest under the lock, so neither undoes the other's change.
        with self._lock:
            snapshot = change(self._snapshot)
            listeners = list(self._listeners)
            # Under the lock too: refreshes run in publication order, so a context never goes back
            # to an older SVID when a refresh for an earlier snapshot runs late. Contexts first,
            # then the snapshot: whoever sees the new snapshot finds every context already on it.
            for ctx in list(self._contexts):
                refresh(ctx, snapshot)
            self._snapshot = snapshot
        for listener in listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("source.listener_failed")
