"""What a source does with the events of its machine: keep TLS contexts loaded, count, and log.

Each hook is a callable taking one `Event`. They run on the thread (or event
loop) of the flow that made the event; `Published` under the machine's
publication lock, so they see snapshots in order and must not block.
"""

from __future__ import annotations

import threading
from weakref import WeakSet

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshca.client._state import BundleIgnored, ChainUntrusted, Event, FetchFailed, Published, WatchFailed
from meshca.client._tls import SpiffeSSLContext, refresh

__all__ = ["ClientMetrics", "TlsContexts", "log_event"]

log = structlog.get_logger("meshca.client")


class ClientMetrics:
    """A source's Prometheus metrics, registered once on ``registry`` (a new one by default).

    Sources that export to one registry share one `ClientMetrics`: pass the
    same object as ``metrics=`` to each; their series differ by ``spiffe_id``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.expiry = Gauge(
            "meshca_client_svid_expiry_timestamp_seconds",
            "NotAfter of the current SVID",
            ["spiffe_id"],
            registry=self.registry,
        )
        self.refreshes = Counter(
            "meshca_client_svid_refreshes", "SVID fetches by result", ["spiffe_id", "result"], registry=self.registry
        )

    def __call__(self, event: Event) -> None:
        if isinstance(event, Published):
            svid = event.snapshot.svid
            if svid is not None and svid is not event.previous.svid:
                self.refreshes.labels(str(svid.spiffe_id), "success").inc()
                self.expiry.labels(str(svid.spiffe_id)).set(svid.not_after.timestamp())
        elif isinstance(event, FetchFailed):
            self.refreshes.labels(str(event.spiffe_id), "failure").inc()


class TlsContexts:
    """The live `SpiffeSSLContext`s of a source, reloaded with every published snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._contexts: WeakSet[SpiffeSSLContext] = WeakSet()
        self._latest: Published | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Published):
            with self._lock:
                self._latest = event
                for ctx in list(self._contexts):
                    refresh(ctx, event.snapshot)

    def track(self, ctx: SpiffeSSLContext) -> SpiffeSSLContext:
        """Keeps ``ctx`` loaded with the current SVID and anchors from now on."""
        with self._lock:
            self._contexts.add(ctx)
            # Catch up with a change published while the context was being built.
            if self._latest is not None:
                refresh(ctx, self._latest.snapshot)
        return ctx


def log_event(event: Event) -> None:
    """One log line per event: dotted names, bound fields, never key material or credentials."""
    if isinstance(event, Published):
        svid, previous = event.snapshot.svid, event.previous
        if svid is not None and svid is not previous.svid:
            log.info(
                "svid.issued" if previous.svid is None else "svid.renewed",
                spiffe_id=str(svid.spiffe_id),
                not_after=svid.not_after.isoformat(),
                serial=format(svid.leaf.serial_number, "x"),
            )
        bundle = event.snapshot.bundle
        if bundle is not previous.bundle:
            log.info(
                "bundle.updated",
                trust_domain=str(bundle.trust_domain),
                anchors=len(bundle.anchors),
                sequence=bundle.sequence,
            )
    elif isinstance(event, FetchFailed):
        fields = {"spiffe_id": str(event.spiffe_id), "reason": event.failure.reason, "attempt": event.attempt}
        if event.retry_in is None:
            log.error("svid.refused", **fields)
        else:
            permanent = event.failure.refusal is not None
            log.warning("svid.fetch_failed", **fields, permanent=permanent, retry_in=event.retry_in.total_seconds())
    elif isinstance(event, WatchFailed):
        # Debug: the stream also ends on every reconnect, and a server that is down shows in svid.fetch_failed.
        log.debug(
            "bundle.watch_failed",
            reason=event.failure.reason,
            attempt=event.attempt,
            retry_in=event.retry_in.total_seconds(),
        )
    elif isinstance(event, BundleIgnored):
        log.warning("bundle.ignored", reason=event.reason)
    elif isinstance(event, ChainUntrusted):
        log.warning("svid.untrusted", spiffe_id=str(event.spiffe_id), reason=event.reason, action="renewing now")
