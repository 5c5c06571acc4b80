"""The node agent: its own SVID, the sync loop, workload SVIDs signed in batches, and the Workload API.

    agent = NodeAgent(AgentConfig(server=..., bundle=..., socket=..., join_token=...))
    await agent.start()      # own SVID (saved one, or the join token), first sync, socket open
    ...
    await agent.stop()       # socket removed

Everything runs on one event loop. The sync loop wakes every ``sync_interval``
and earlier when a workload SVID reaches its renewal moment (half its
lifetime, with jitter: pki/_rotation). A failed call changes nothing the agent
holds: it keeps serving, and tries again after a backoff (pki/_rotation
`retry_delay`, never past ``sync_interval``), not at once: an SVID past its
renewal moment during an outage must not turn the loop into a busy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import structlog
from cryptography import x509

from meshca._proto import meshca_agent_pb2 as apb
from meshca.client._core import Snapshot, X509Svid
from meshca.client._source import AsyncSvidSource
from meshca.pki._bundle import TrustBundle
from meshca.pki._csr import build_csr
from meshca.pki._errors import MeshcaError
from meshca.pki._keys import generate_key
from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy, renewal_time, retry_delay
from meshca.pki._spiffe import TrustDomain
from meshca.pki._time import Clock, system_clock

from ._datadir import DataDir
from ._metrics import AgentMetrics
from ._state import AgentState, Entry, Held, jwt_svid_keys
from ._upstream import Upstream, bootstrap, chain_of, verified_svid
from ._workload import WorkloadApi, prepare_socket_dir

__all__ = ["AgentConfig", "NodeAgent"]

log = structlog.get_logger("meshca.agent")

MAX_BATCH = 64  # the service's cap on CSRs a batch (server/api/_agent.py)
JWT_CACHE_SIZE = 1024  # JWT-SVIDs kept for reuse: a caller may ask for any number of audiences
KEY_REFRESH_EVERY = timedelta(seconds=5)  # the most often a JWT key id the agent does not know makes it sync


@dataclass(frozen=True, slots=True)
class AgentConfig:
    server: str
    bundle: TrustBundle
    socket: Path
    data_dir: Path
    join_token: str | None = field(default=None, repr=False)
    sync_interval: timedelta = timedelta(seconds=5)
    renewal: RenewalPolicy = DEFAULT_POLICY
    server_name: str | None = None
    call_timeout: timedelta = timedelta(seconds=10)


class NodeAgent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock = system_clock,
        metrics: AgentMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics or AgentMetrics()
        self.state = AgentState(config.bundle)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._data = DataDir(config.data_dir)
        self._source: AsyncSvidSource | None = None
        self._channel: grpc.aio.Channel | None = None
        self._channel_anchors: frozenset[x509.Certificate] = frozenset()
        self._upstream: Upstream | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._ticking = asyncio.Lock()  # one sync-and-sign at a time (the loop's, or one a caller asked for)
        self._failures = 0  # ticks in a row that failed
        self._retry_at: datetime | None = None  # no renewal-driven tick before this, after a failure
        self._key_refresh_at: datetime | None = None  # no sync for an unknown JWT key id before this
        self._jwt_cache: dict[tuple[str, tuple[str, ...]], tuple[str, datetime]] = {}
        self.api = WorkloadApi(self)

    # -- lifecycle

    @property
    def own(self) -> X509Svid:
        assert self._source is not None
        return self._source.svid

    @property
    def trust_domain(self) -> TrustDomain:
        return self.config.bundle.trust_domain

    async def start(self) -> None:
        """Gets the agent's SVID (saved, else by join token), syncs once if the service answers, opens the socket."""
        self._data.prepare()
        prepare_socket_dir(self.config.socket)  # both before a join spends the token
        bundle = self._data.load_bundle(self.config.bundle)  # until the first sync replaces it
        self.state.bundle = bundle
        self._open_channel(bundle)
        own = self._data.load(bundle, now=self.clock())
        if own is None:
            if self.config.join_token is None:
                raise MeshcaError(
                    f"no agent SVID in {self.config.data_dir} and no join token: give --join-token or --token-file"
                )
            assert self._channel is not None
            own = await bootstrap(self._channel, self.config.join_token, bundle, now=self.clock())
            self._data.save(own)
            log.info("agent.joined", spiffe_id=str(own.spiffe_id))
        else:
            log.info("agent.recovered", spiffe_id=str(own.spiffe_id), not_after=own.not_after.isoformat())
        self._source = AsyncSvidSource(
            self.config.server,
            bundle,
            own.spiffe_id,
            initial=own,
            renewal=self.config.renewal,
            server_name=self.config.server_name,
            clock=self.clock,
            rng=self._rng,
        )
        await self._source.start()
        await self._tick()
        await self.api.start(self.config.socket)
        self._tasks = [
            asyncio.create_task(self._persist_own(self._source)),
            asyncio.create_task(self._loop()),
        ]

    async def stop(self) -> None:
        await self.state.close()
        await self.api.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._source is not None:
            await self._source.aclose()
        if self._channel is not None:
            await self._channel.close(None)
        for closing in list(self._closing):
            await closing

    # -- the agent's own SVID

    async def _persist_own(self, source: AsyncSvidSource) -> None:
        last = source.svid
        async for snapshot in source.updates():
            if snapshot.svid is not None and snapshot.svid is not last:
                last = snapshot.svid
                try:
                    await asyncio.to_thread(self._data.save, last)
                except (OSError, MeshcaError) as exc:  # the SVID in use is fine; the next renewal saves again
                    log.error("agent.save_failed", path=str(self._data.svid_path), error=f"{type(exc).__name__}: {exc}")
                    continue
                log.info("agent.renewed", not_after=last.not_after.isoformat())

    # -- the service

    def _open_channel(self, bundle: TrustBundle) -> None:
        old = self._channel
        options = [("grpc.ssl_target_name_override", self.config.server_name)] if self.config.server_name else []
        self._channel = grpc.aio.secure_channel(
            self.config.server, grpc.ssl_channel_credentials(bundle.to_pem()), options
        )
        self._channel_anchors = frozenset(bundle.anchors)
        self._upstream = Upstream(self._channel, self.config.call_timeout.total_seconds())
        if old is not None:  # calls in flight on it may finish; held until closed (a task must be referenced)
            closing = asyncio.get_running_loop().create_task(old.close(grace=1.0))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _loop(self) -> None:
        while True:
            wait = self.config.sync_interval
            if self.state.held:
                due = min(h.renew_at for h in self.state.held.values())
                if self._retry_at is not None:
                    due = max(due, self._retry_at)
                wait = max(min(wait, due - self.clock()), timedelta(milliseconds=50))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait.total_seconds()):
                    await self._wake.wait()
            self._wake.clear()
            await self._tick()

    async def refresh_jwt_keys(self) -> None:
        """Syncs now, for a JWT key id the agent does not know: the service may have just published it.

        At most once per ``min(sync_interval, KEY_REFRESH_EVERY)``: any local caller may send ValidateJWTSVID
        a token with a made-up key id, and must not be able to make the agent hammer the service.
        """
        now = self.clock()
        if self._key_refresh_at is not None and now < self._key_refresh_at:
            return
        self._key_refresh_at = now + min(self.config.sync_interval, KEY_REFRESH_EVERY)
        await self._tick()

    async def _tick(self) -> None:
        async with self._ticking:
            ok = await self._sync_and_sign()
            now = self.clock()
            if ok:
                self._failures, self._retry_at = 0, None
                return
            self._failures += 1
            # The cap shrinks as the soonest expiry nears; an SVID already expired does not make it shrink to nothing.
            soonest = min((h.svid.not_after for h in self.state.held.values() if h.svid.not_after > now), default=None)
            self._retry_at = now + retry_delay(self._failures, now, soonest, self.config.renewal, self._rng)

    async def _sync_and_sign(self) -> bool:
        """One sync and the signing it calls for; False if anything failed (logged and counted; what is held stays)."""
        try:
            await self._sync()
        except (grpc.aio.AioRpcError, MeshcaError, ValueError) as exc:
            self.metrics.syncs.labels(_outcome(exc)).inc()
            log.warning("agent.sync_failed", error=_reason(exc))
            return False
        self.metrics.syncs.labels("ok").inc()
        try:
            return await self._sign_due()
        except (grpc.aio.AioRpcError, MeshcaError, ValueError) as exc:
            log.warning("agent.sign_failed", error=_reason(exc))
            return False

    async def _sync(self) -> None:
        assert self._upstream is not None
        response = await self._upstream.sync(self.own, self.clock())
        anchors = tuple(x509.load_der_x509_certificate(der) for der in response.x509_anchors)
        if not anchors or response.trust_domain != str(self.trust_domain):
            raise MeshcaError(f"Sync answered for trust domain {response.trust_domain!r} with {len(anchors)} anchors")
        state = self.state
        entries = {e.id: Entry.from_message(e) for e in response.entries}
        jwt_keys = jwt_svid_keys(response.jwt_keys)
        changed = entries != state.entries or jwt_keys != state.jwt_keys
        if set(anchors) != set(state.bundle.anchors):
            state.bundle = TrustBundle(self.trust_domain, anchors, response.x509_sequence)
            self._open_channel(state.bundle)
            changed = True
            try:  # for a restart after a rotation; the agent goes on without it
                await asyncio.to_thread(self._data.save_bundle, state.bundle)
            except OSError as exc:
                log.error("agent.save_failed", path=str(self._data.path), error=f"{type(exc).__name__}: {exc}")
        for entry_id in set(state.held) - set(entries):
            del state.held[entry_id]
        state.entries, state.jwt_keys = entries, jwt_keys
        state.synced = True
        if changed:
            self._jwt_cache.clear()
            await state.changed()

    async def _sign_due(self) -> bool:
        """Signs every entry without a current SVID; False if the service refused one or answered one badly."""
        ok = True
        now = self.clock()
        state = self.state
        due = [
            e
            for e in state.entries.values()
            if (held := state.held.get(e.id)) is None or held.entry != e or held.renew_at <= now
        ]
        for start in range(0, len(due), MAX_BATCH):
            batch = due[start : start + MAX_BATCH]
            keys = {e.id: generate_key() for e in batch}
            requests = [
                apb.X509SVIDRequest(entry_id=e.id, csr=build_csr(keys[e.id], e.spiffe_id, e.dns_names)) for e in batch
            ]
            assert self._upstream is not None
            response = await self._upstream.sign(requests, self.own, self.clock())
            by_id = {e.id: e for e in batch}
            for result in response.results:
                entry = by_id.get(result.entry_id)
                if entry is None:
                    continue
                if result.error_code:
                    ok = False
                    self.metrics.signed.labels("refused").inc()
                    log.warning("agent.svid_refused", entry_id=entry.id, code=result.error_code, error=result.error)
                    continue
                try:
                    svid = verified_svid(
                        keys[entry.id], chain_of(result), state.bundle, now=self.clock(), expected=entry.spiffe_id
                    )
                except MeshcaError as exc:
                    ok = False
                    self.metrics.signed.labels("invalid").inc()
                    log.warning("agent.svid_invalid", entry_id=entry.id, error=str(exc))
                    continue
                received = self.clock()
                state.held[entry.id] = Held(
                    entry, svid, renewal_time(received, svid.not_after, self.config.renewal, self._rng)
                )
                self.metrics.signed.labels("ok").inc()
            self.metrics.held.set(len(state.held))
            await state.changed()
        return ok

    # -- JWT-SVIDs, for the Workload API

    async def jwt_svid(self, entry: Entry, audience: list[str]) -> str:
        """A JWT-SVID for ``entry``; one from the cache (at most `JWT_CACHE_SIZE`) while it has more than half of
        its lifetime left."""
        key = (entry.id, tuple(sorted(audience)))
        now = self.clock()
        cached = self._jwt_cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        assert self._upstream is not None
        response = await self._upstream.jwt(entry.id, audience, self.own, now)
        expires = response.expires_at.ToDatetime(tzinfo=now.tzinfo)
        cache = self._jwt_cache
        cache.pop(key, None)
        if len(cache) >= JWT_CACHE_SIZE:  # the stale go first, then the oldest (insertion order)
            for stale in [k for k, (_, reuse_until) in cache.items() if reuse_until <= now]:
                del cache[stale]
            while len(cache) >= JWT_CACHE_SIZE:
                del cache[next(iter(cache))]
        cache[key] = (response.token, now + (expires - now) / 2)
        return response.token

    def snapshot(self) -> Snapshot | None:
        return self._source.snapshot if self._source is not None else None


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return (
            "unavailable"
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            else "refused"
        )
    return "invalid"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
