"""`SvidSource` (threads) and `AsyncSvidSource` (asyncio): an identity that keeps itself fresh.

Both are thin loops over `SourceState`: fetch an SVID (join token or JWT at
first, then proof of the current SVID), sleep until the renewal moment,
back off on failure, and follow the bundle watch stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Literal

import grpc
import structlog
from prometheus_client import CollectorRegistry

from meshca._proto import meshca_identity_pb2 as pb
from meshca._proto import meshca_identity_pb2_grpc as pb_grpc
from meshca.client._core import Credentials, Snapshot, X509Svid, load_bundle
from meshca.client._grpc import channel_credentials, server_credentials
from meshca.client._state import SourceConfig, SourceState
from meshca.client._tls import SpiffeSSLContext, make_context
from meshca.pki._bundle import TrustBundle
from meshca.pki._keys import KeyType
from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy, retry_delay
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock, system_clock
from meshca.pki._verify import Authorizer

__all__ = ["AsyncSvidSource", "SvidSource"]

log = structlog.get_logger("meshca.client")


def _unreachable(exc: BaseException) -> bool:
    """True for a call that failed with UNAVAILABLE: the next attempt should use a new channel.

    A channel that failed to connect waits out gRPC's own reconnect backoff
    (growing to two minutes) and fails every call until then, however close
    the SVID is to expiry; a new channel connects when the renewal policy
    says to retry.
    """
    code = getattr(exc, "code", None)
    return callable(code) and code() == grpc.StatusCode.UNAVAILABLE


class _SourceBase:
    """What both twins offer on top of the current snapshot."""

    _state: SourceState

    def __init__(
        self,
        server: str,
        bundle: TrustBundle | str | Path | bytes,
        spiffe_id: SpiffeId | str,
        *,
        join_token: str | None = None,
        jwt_file: str | Path | None = None,
        key_type: KeyType = KeyType.EC_P256,
        ttl: timedelta | None = None,
        renewal: RenewalPolicy = DEFAULT_POLICY,
        server_name: str | None = None,
        clock: Clock = system_clock,
        registry: CollectorRegistry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        credentials = Credentials(join_token, Path(jwt_file) if jwt_file is not None else None)
        config = SourceConfig(server, sid, credentials, key_type, ttl, renewal, server_name)
        self._state = SourceState(config, load_bundle(bundle), clock, registry, rng)
        self._clock = clock
        self._setup()

    def _setup(self) -> None:
        """Twin-specific state; runs at the end of ``__init__``."""

    @property
    def snapshot(self) -> Snapshot:
        """The current SVID and bundle, as one immutable value."""
        return self._state.snapshot

    @property
    def svid(self) -> X509Svid:
        svid = self._state.snapshot.svid
        if svid is None:
            raise RuntimeError("no SVID yet; wait_ready() first")
        return svid

    @property
    def bundle(self) -> TrustBundle:
        return self._state.snapshot.bundle

    @property
    def spiffe_id(self) -> SpiffeId:
        return self._state.config.spiffe_id

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self._state.registry

    def server_ssl_context(self, authorizer: Authorizer) -> SpiffeSSLContext:
        """A server context: presents the SVID, requires a client SVID the authorizer accepts."""
        return self._ssl_context("server", authorizer)

    def client_ssl_context(self, authorizer: Authorizer) -> SpiffeSSLContext:
        """A client context: presents the SVID, requires a server SVID the authorizer accepts."""
        return self._ssl_context("client", authorizer)

    def _ssl_context(self, side: Literal["server", "client"], authorizer: Authorizer) -> SpiffeSSLContext:
        state = self._state
        return state.track(make_context(side, lambda: state.snapshot, authorizer, self._clock))

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        state = self._state
        return server_credentials(lambda: state.snapshot)

    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self._state.snapshot)

    def _channel_options(self) -> list[tuple[str, str]]:
        name = self._state.config.server_name
        return [("grpc.ssl_target_name_override", name)] if name else []

    def _call_timeout(self) -> float:
        return self._state.config.call_timeout.total_seconds()


class SvidSource(_SourceBase):
    """An SVID kept fresh by two background threads (renewal and bundle watch).

    with SvidSource("ca.example:8443", "bundle.pem", "spiffe://example.org/web", join_token=token) as source:
        source.wait_ready(30)
        ctx = source.server_ssl_context(meshca.authorize_member_of(source.spiffe_id.trust_domain))
    """

    def _setup(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._channel_lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._channel_bundle: TrustBundle | None = None
        self._watch_call: grpc.Future | None = None  # type: ignore[type-arg]
        self._threads = [
            threading.Thread(target=self._renew_loop, name="meshca-svid-renewal", daemon=True),
            threading.Thread(target=self._watch_loop, name="meshca-bundle-watch", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def subscribe(self, callback: Callable[[Snapshot], None]) -> Callable[[], None]:
        """Calls ``callback(snapshot)`` (on a source thread) after every change; returns an unsubscribe function."""
        return self._state.subscribe(callback)

    def wait_ready(self, timeout: float | None = None) -> Snapshot:
        """Blocks until the first SVID arrives; `TimeoutError` after ``timeout`` seconds."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"no SVID for {self.spiffe_id} within {timeout} s")
        return self.snapshot

    def _stub(self, *, fresh: bool = False) -> pb_grpc.IdentityStub:
        with self._channel_lock:
            bundle = self._state.snapshot.bundle
            # Once closed, never open a channel again (close() would not see it); calls on the
            # closed one fail and the loops end.
            stale = fresh or self._channel is None or self._channel_bundle is not bundle
            if stale and not self._stop.is_set():
                if self._channel is not None:
                    self._channel.close()
                creds = grpc.ssl_channel_credentials(bundle.to_pem())
                self._channel = grpc.secure_channel(self._state.config.server, creds, self._channel_options())
                self._channel_bundle = bundle
            return pb_grpc.IdentityStub(self._channel)

    def _renew_loop(self) -> None:
        state = self._state
        reconnect = False
        while not self._stop.is_set():
            delay = state.next_delay()
            if delay > timedelta() and self._stop.wait(delay.total_seconds()):
                return
            try:
                key, request = state.new_request()
                stub, reconnect = self._stub(fresh=reconnect), False
                response = stub.IssueSVID(request, timeout=self._call_timeout())
                state.accept(key, response)
                self._ready.set()
            except Exception as exc:  # noqa: BLE001 - any failure is retried with backoff, and logged
                if self._stop.is_set():
                    return
                reconnect = _unreachable(exc)
                self._stop.wait(state.failed(exc).total_seconds())

    def _watch_loop(self) -> None:
        attempt = 0
        policy = self._state.config.renewal
        rng = random.Random()  # noqa: S311
        while not self._stop.is_set():
            try:
                call = self._stub().WatchBundle(pb.WatchBundleRequest())
                self._watch_call = call
                if self._stop.is_set():
                    call.cancel()
                    return
                for message in call:
                    attempt = 0
                    self._state.bundle_update(message)
            except grpc.RpcError:
                pass
            except Exception:
                log.exception("bundle.watch_failed")
            attempt += 1
            if self._stop.wait(retry_delay(attempt, self._clock(), None, policy, rng).total_seconds()):
                return

    def close(self) -> None:
        self._stop.set()
        call = self._watch_call
        if call is not None:
            call.cancel()
        with self._channel_lock:
            if self._channel is not None:
                self._channel.close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> SvidSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _closing() -> bool:
    """True when this task itself is being cancelled (the source is closing).

    grpc.aio also raises `asyncio.CancelledError` in a call whose channel was
    closed, which `_stub()` does when the bundle changes; that ends one call,
    not the loop running it.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class AsyncSvidSource(_SourceBase):
    """The asyncio twin of `SvidSource`; start it with ``async with`` or `start()`.

    async with AsyncSvidSource(server, bundle, spiffe_id, join_token=token) as source:
        await source.wait_ready(30)
        async for snapshot in source.updates():
            ...
    """

    def _setup(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: asyncio.Event | None = None
        self._channel: grpc.aio.Channel | None = None
        self._channel_bundle: TrustBundle | None = None
        self._queues: set[asyncio.Queue[Snapshot | None]] = set()  # None: the source closed

    async def start(self) -> None:
        if self._ready is not None:
            raise RuntimeError("this source is already started")
        self._ready = asyncio.Event()
        loop = asyncio.get_running_loop()

        def fan_out(snapshot: Snapshot) -> None:
            for queue in list(self._queues):
                queue.put_nowait(snapshot)

        # State changes happen on this loop, so listeners run here too.
        def on_change(snapshot: Snapshot) -> None:
            loop.call_soon_threadsafe(fan_out, snapshot)

        self._state.subscribe(on_change)
        self._tasks = [asyncio.create_task(self._renew_loop()), asyncio.create_task(self._watch_loop())]

    async def wait_ready(self, timeout: float | None = None) -> Snapshot:
        if self._ready is None:
            raise RuntimeError("start() the source first (or use 'async with')")
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            raise TimeoutError(f"no SVID for {self.spiffe_id} within {timeout} s") from None
        return self.snapshot

    async def updates(self) -> AsyncIterator[Snapshot]:
        """Yields every new snapshot (SVID renewed or bundle changed) until the source closes."""
        queue: asyncio.Queue[Snapshot | None] = asyncio.Queue()
        self._queues.add(queue)
        try:
            while (snapshot := await queue.get()) is not None:
                yield snapshot
        finally:
            self._queues.discard(queue)

    async def _stub(self, *, fresh: bool = False) -> pb_grpc.IdentityStub:
        bundle = self._state.snapshot.bundle
        if fresh or self._channel is None or self._channel_bundle is not bundle:
            # Swap first, close after: the other loop, resuming during the close, finds the new channel.
            old = self._channel
            creds = grpc.ssl_channel_credentials(bundle.to_pem())
            self._channel = grpc.aio.secure_channel(self._state.config.server, creds, self._channel_options())
            self._channel_bundle = bundle
            if old is not None:
                await old.close(None)
        assert self._channel is not None
        return pb_grpc.IdentityStub(self._channel)

    async def _renew_loop(self) -> None:
        state = self._state
        assert self._ready is not None
        reconnect = False
        while True:
            delay = state.next_delay()
            if delay > timedelta():
                await asyncio.sleep(delay.total_seconds())
            try:
                key, request = state.new_request()
                stub, reconnect = await self._stub(fresh=reconnect), False
                response = await stub.IssueSVID(request, timeout=self._call_timeout())
                state.accept(key, response)
                self._ready.set()
            except asyncio.CancelledError as exc:
                if _closing():
                    raise
                await asyncio.sleep(state.failed(exc).total_seconds())
            except Exception as exc:  # noqa: BLE001 - any failure is retried with backoff, and logged
                reconnect = _unreachable(exc)
                await asyncio.sleep(state.failed(exc).total_seconds())

    async def _watch_loop(self) -> None:
        attempt = 0
        policy = self._state.config.renewal
        rng = random.Random()  # noqa: S311
        while True:
            try:
                stub = await self._stub()
                async for message in stub.WatchBundle(pb.WatchBundleRequest()):
                    attempt = 0
                    self._state.bundle_update(message)
            except asyncio.CancelledError:
                if _closing():
                    raise
            except grpc.RpcError:
                pass
            except Exception:
                log.exception("bundle.watch_failed")
            attempt += 1
            await asyncio.sleep(retry_delay(attempt, self._clock(), None, policy, rng).total_seconds())

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
        for queue in list(self._queues):
            queue.put_nowait(None)  # ends every updates() iterator

    async def __aenter__(self) -> AsyncSvidSource:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
