"""The issuance pipeline every wire API shares, read top to bottom.

credential -> principal -> the identity the request names, if any -> the
reserved-ID rule -> the rate limit -> the lifetime rule -> the CSR check ->
the service's own DNS names -> sign -> record durably -> count and log. Wire adapters (``server/api/``)
build an `IssuanceRequest` and encode the `Issued` it returns; errors are
mapped to status codes by ``server/_interceptor.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import structlog
from cryptography import x509

from meshca.pki._bundle import TrustBundle
from meshca.pki._csr import check_csr
from meshca.pki._errors import (
    IdentityMismatch,
    InvalidRequest,
    KeyCustodyError,
    PermissionDenied,
    RateLimited,
    StoreError,
)
from meshca.pki._issuer import IssuedSvid
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock
from meshca.server._config import ServerConfig
from meshca.server._health import StoreHealth
from meshca.server._metrics import Children, Metrics
from meshca.server._state import IssuerState
from meshca.server._store import IssuanceRecord, Store
from meshca.server.credentials import Credential, Presented, Principal, refuse_reserved

__all__ = ["IssuanceRequest", "Issued", "Pipeline", "refuse_service_names"]

log = structlog.get_logger("meshca.server")


@dataclass(frozen=True, slots=True)
class IssuanceRequest:
    """One request for an X.509-SVID, whatever API it came in on."""

    api: str  # "native", "linkerd", "istio": the issuance log's api column and a metric label
    csr: x509.CertificateSigningRequest
    credential: Presented
    spiffe_id: SpiffeId | None = None  # the identity the request names; the credential must grant exactly it
    ttl_seconds: float | None = None  # None: the configured default
    dns_names: tuple[str, ...] = ()  # DNS names the API grants with the SPIFFE ID (Linkerd's identity)


@dataclass(frozen=True, slots=True)
class Issued:
    svid: IssuedSvid
    bundle: TrustBundle
    anchor: x509.Certificate  # the anchor the issuer chains to


def _covers(name: str, other: str) -> bool:
    """True when a certificate for DNS name ``name`` is accepted for host ``other``, or the other way round
    (a wildcard stands for exactly one left-most label, as in RFC 6125)."""
    name, other = name.lower().rstrip("."), other.lower().rstrip(".")  # "host." is "host", fully qualified
    if name == other:
        return True
    for pattern, host in ((name, other), (other, name)):
        if pattern.startswith("*.") and host.partition(".")[2] == pattern[2:] and host.partition(".")[0]:
            return True
    return False


def refuse_service_names(dns_names: Sequence[str], server_names: Sequence[str]) -> None:
    """No SVID but the service's own carries a DNS name the service answers to.

    Clients and node agents authenticate the service by that name (gRPC's host name check on a chain to
    the bundle): a workload holding it could pose as the service to them, and hand out its own bundle.
    """
    for name in dns_names:
        taken = next((s for s in server_names if _covers(name, s)), None)
        if taken is not None:
            raise PermissionDenied(
                f"DNS name {name} covers {taken}, the identity service's own (--server-name): no other SVID holds it"
            )


class RateLimiter:
    """A token bucket per principal, on the injected clock."""

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> None:
        now = self._clock().timestamp()
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(now - last, 0.0) * self._rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            raise RateLimited(f"rate limit of {self._rate:g}/s exceeded for {key}")
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > 100_000:
            self._buckets.clear()


class _Completions:
    """Moves finished store futures onto the event loop with one wake-up per burst.

    A group commit finishes many records at once; `asyncio.wrap_future` would
    wake the loop once per record (a syscall each), this wakes it once.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: list[tuple[concurrent.futures.Future[None], asyncio.Future[None]]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def watch(self, future: concurrent.futures.Future[None]) -> asyncio.Future[None]:
        loop = self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        future.add_done_callback(lambda f: self._finished(f, waiter))
        return waiter

    def _finished(self, future: concurrent.futures.Future[None], waiter: asyncio.Future[None]) -> None:
        with self._lock:  # any thread
            self._done.append((future, waiter))
            if self._scheduled:
                return
            self._scheduled = True
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            done, self._done, self._scheduled = self._done, [], False
        for future, waiter in done:
            if waiter.cancelled():
                continue
            error = future.exception()
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


class Pipeline:
    """Turns an `IssuanceRequest` into an `Issued` certificate, or raises a `MeshcaError` saying why not."""

    def __init__(
        self,
        config: ServerConfig,
        state: IssuerState,
        store: Store,
        credentials: Sequence[Credential],
        metrics: Metrics,
        clock: Clock,
        store_health: StoreHealth | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.credentials = tuple(credentials)
        self.clock = clock
        self._limiter = RateLimiter(config.rate_limit, config.rate_burst, clock) if config.rate_limit else None
        self._max_ttl = config.max_leaf_ttl.total_seconds()
        self._issued = Children(metrics.issued)
        self._completions = _Completions()
        self._store_health = store_health

    async def authenticate(self, presented: Presented) -> Principal:
        """The principal of the first credential kind that claims ``presented``."""
        for credential in self.credentials:
            principal = await credential.principal(presented)
            if principal is not None:
                return principal
        raise presented.unclaimed()

    def lifetime(self, seconds: float | None) -> timedelta:
        """The leaf lifetime for a requested one, checked before it becomes a (possibly overflowing) timedelta."""
        if seconds is None:
            return self.config.leaf_ttl
        if seconds <= 0:
            raise InvalidRequest("requested lifetime must be positive")
        if seconds > self._max_ttl:
            raise InvalidRequest(f"requested lifetime {int(seconds)}s is above the maximum {int(self._max_ttl)}s")
        return timedelta(seconds=seconds)

    async def issue(self, request: IssuanceRequest) -> Issued:
        try:
            issued = await self._issue(request)
        except StoreError as exc:  # the store failed a read or the record: tell the health
            if self._store_health is not None:
                self._store_health.outcome(exc)
            raise
        if self._store_health is not None:
            self._store_health.outcome(None)
        return issued

    async def _issue(self, request: IssuanceRequest) -> Issued:
        principal = await self.authenticate(request.credential)
        spiffe_id = principal.spiffe_id
        if request.spiffe_id is not None and request.spiffe_id != spiffe_id:
            raise IdentityMismatch(f"credential grants {spiffe_id}, the request names {request.spiffe_id}")
        refuse_reserved(spiffe_id, agent=principal.agent)  # also here: a credential kind to come cannot forget it
        if self._limiter is not None:
            self._limiter.take(principal.name)
        ttl = self.lifetime(request.ttl_seconds)
        checked = check_csr(request.csr, spiffe_id, allowed_dns=request.dns_names, policy=self.config.key_policy)
        refuse_service_names(checked.dns_names, self.config.server_names)
        state = self.state
        issuer, bundle = state.issuer, state.bundle
        anchor = issuer.anchor
        now = self.clock()
        state.check_key()
        try:
            svid = issuer.sign(checked.public_key, spiffe_id, now=now, ttl=ttl, dns_names=checked.dns_names)
        except KeyCustodyError as exc:
            state.key_failed(exc)
            raise
        serial = format(svid.serial, "x")
        record = IssuanceRecord(serial, str(spiffe_id), svid.not_after, principal.name, request.api, now)
        await self._completions.watch(self.store.record(record, token_hash=principal.token_hash))
        self._issued(spiffe_id.trust_domain.name, request.api).inc()
        log.info(
            "svid.issued",
            spiffe_id=str(spiffe_id),
            serial=serial,
            not_after=svid.not_after.isoformat(),
            principal=principal.name,
            api=request.api,
        )
        return Issued(svid, bundle, anchor)
