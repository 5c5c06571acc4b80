"""`SvidSource` (threads) and `AsyncSvidSource` (asyncio): an identity that keeps itself fresh.

Both are short drivers of the same `SourceMachine` flows (``_state.py``):
each runs the renewal flow and the bundle-watch flow, doing the step each
yields (sleep, reconnect, fetch, read the stream, publish, give up) and
sending back the result. Every decision is the machine's; see
docs/architecture.md, Client.
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
from typing import Any, Literal

import grpc
import structlog
from prometheus_client import CollectorRegistry

from meshca._proto import meshca_identity_pb2 as pb
from meshca._proto import meshca_identity_pb2_grpc as pb_grpc
from meshca.client._core import Credentials, Snapshot, X509Svid, load_bundle
from meshca.client._failures import classify
from meshca.client._grpc import channel_credentials, server_credentials
from meshca.client._hooks import ClientMetrics, TlsContexts, log_event
from meshca.client._state import (
    Failure,
    Fetch,
    Flow,
    GiveUp,
    NextBundle,
    Publish,
    Reconnect,
    RenewNow,
    Reply,
    Sleep,
    SourceConfig,
    SourceMachine,
    Step,
)
from meshca.client._tls import SpiffeSSLContext, make_context
from meshca.pki._bundle import TrustBundle
from meshca.pki._keys import KeyType
from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock, system_clock
from meshca.pki._verify import Authorizer

__all__ = ["AsyncSvidSource", "SvidSource"]

log = structlog.get_logger("meshca.client")

_WATCH = pb.WatchBundleRequest()


class _SourceBase:
    """What both drivers offer on top of the machine."""

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
        metrics: ClientMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``server_name``: the DNS name to expect in the server's certificate when it is not the host
        in ``server`` (dialling an IP address, say). ``metrics``: where to count; a new registry of
        this source's own by default. ``rng``: the random source of the renewal jitter and backoff.
        """
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        credentials = Credentials(join_token, Path(jwt_file) if jwt_file is not None else None)
        config = SourceConfig(server, sid, credentials, key_type, ttl, renewal, server_name)
        self._metrics = metrics if metrics is not None else ClientMetrics()
        self._contexts = TlsContexts()
        self._core = SourceMachine(
            config,
            load_bundle(bundle),
            clock=clock,
            rng=rng if rng is not None else random.Random(),  # noqa: S311 - jitter, not secrets
            hooks=[self._contexts, self._metrics, log_event],
        )
        self._clock = clock
        self._setup()

    def _setup(self) -> None:
        """Driver-specific state; runs at the end of ``__init__``."""

    @property
    def snapshot(self) -> Snapshot:
        """The current SVID and bundle, as one immutable value."""
        return self._core.snapshot

    @property
    def svid(self) -> X509Svid:
        svid = self._core.snapshot.svid
        if svid is None:
            raise RuntimeError("no SVID yet; wait_ready() first")
        return svid

    @property
    def bundle(self) -> TrustBundle:
        return self._core.snapshot.bundle

    @property
    def spiffe_id(self) -> SpiffeId:
        return self._core.config.spiffe_id

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self._metrics.registry

    def server_ssl_context(self, authorizer: Authorizer) -> SpiffeSSLContext:
        """A server context: presents the SVID, requires a client SVID the authorizer accepts."""
        return self._ssl_context("server", authorizer)

    def client_ssl_context(self, authorizer: Authorizer) -> SpiffeSSLContext:
        """A client context: presents the SVID, requires a server SVID the authorizer accepts."""
        return self._ssl_context("client", authorizer)

    def _ssl_context(self, side: Literal["server", "client"], authorizer: Authorizer) -> SpiffeSSLContext:
        core = self._core
        return self._contexts.track(make_context(side, lambda: core.snapshot, authorizer, self._clock))

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        core = self._core
        return server_credentials(lambda: core.snapshot)

    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self._core.snapshot)

    # -- for the drivers

    def _channel_args(self, bundle: TrustBundle) -> tuple[str, grpc.ChannelCredentials, list[tuple[str, str]]]:
        config = self._core.config
        options = [("grpc.ssl_target_name_override", config.server_name)] if config.server_name else []
        return config.server, grpc.ssl_channel_credentials(bundle.to_pem()), options

    def _call_timeout(self) -> float:
        return self._core.config.call_timeout.total_seconds()

    def _failure(self, exc: BaseException) -> Failure:
        return classify(exc, self._core.config, self._core.snapshot.bundle)

    def _outcome(self) -> Snapshot:
        """After the wait: the snapshot, or the refusal that ended the renewal flow."""
        refusal = self._core.refusal
        if refusal is not None:
            raise refusal.with_traceback(None)
        return self._core.snapshot


class SvidSource(_SourceBase):
    """An SVID kept fresh by two background threads (renewal and bundle watch).

    with SvidSource("ca.example:8443", "bundle.pem", "spiffe://example.org/web", join_token=token) as source:
        source.wait_ready(30)
        ctx = source.server_ssl_context(meshca.authorize_member_of(source.spiffe_id.trust_domain))
    """

    def _setup(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()  # RenewNow: ends the renewal thread's sleep (close() sets it too)
        self._settled = threading.Event()  # an SVID arrived, or the server refused for good
        self._lock = threading.Lock()  # the channel, the watch call, the listeners
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._channel: grpc.Channel | None = None
        self._watch_call: Any = None  # gRPC's rendezvous: an iterator of messages and a future to cancel
        self._open(self._core.snapshot.bundle)
        self._threads = [
            threading.Thread(
                target=self._drive, args=(self._core.renewal(), self._wake), name="meshca-svid-renewal", daemon=True
            ),
            threading.Thread(
                target=self._drive, args=(self._core.watch(), self._stop), name="meshca-bundle-watch", daemon=True
            ),
        ]
        for t in self._threads:
            t.start()

    def subscribe(self, callback: Callable[[Snapshot], None]) -> Callable[[], None]:
        """Calls ``callback(snapshot)`` (on a source thread) after every change; returns an unsubscribe function."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def wait_ready(self, timeout: float | None = None) -> Snapshot:
        """Blocks until the first SVID arrives.

        Raises `TimeoutError` (with the last failure's reason) after ``timeout``
        seconds, or at once the server's refusal (`meshca.RequestRefused`, or
        `meshca.VerificationError` for a certificate that does not name the server).
        """
        if not self._settled.wait(timeout):
            raise self._core.timeout_error(timeout)
        return self._outcome()

    def _drive(self, flow: Flow, sleeper: threading.Event) -> None:
        """Runs ``flow``; its sleeps end early when ``sleeper`` is set (the stop event, or the renewal's wake)."""
        reply: Reply = None
        while not self._stop.is_set():
            try:
                step = flow.send(reply)
            except StopIteration:
                return
            reply = self._run(step, sleeper)

    def _run(self, step: Step, sleeper: threading.Event) -> Reply:
        match step:
            case Sleep(delay):
                sleeper.wait(delay.total_seconds())
                if sleeper is self._wake:
                    self._wake.clear()  # the machine decides again whether to sleep on
            case RenewNow():
                self._wake.set()
            case Reconnect(bundle):
                self._open(bundle)
            case Fetch(request):
                try:
                    return self._stub().IssueSVID(request, timeout=self._call_timeout())  # type: ignore[no-any-return]
                except Exception as exc:  # noqa: BLE001 - classified, retried or reported
                    return self._failure(exc)
            case NextBundle():
                try:
                    return self._next_bundle()
                except Exception as exc:  # noqa: BLE001 - classified; the stream is opened again
                    self._watch_call = None
                    return self._failure(exc)
            case Publish(snapshot):
                if snapshot.ready:  # not for a bundle that changed before the first SVID
                    self._settled.set()
                with self._lock:
                    listeners = list(self._listeners)
                for listener in listeners:
                    try:
                        listener(snapshot)
                    except Exception:
                        log.exception("source.listener_failed")
            case GiveUp():
                self._settled.set()
        return None

    def _open(self, bundle: TrustBundle) -> None:
        with self._lock:
            # Once closed, never open a channel again (close() would not see it).
            if self._stop.is_set():
                return
            if self._channel is not None:
                self._channel.close()  # ends the watch stream on it too
            self._channel = grpc.secure_channel(*self._channel_args(bundle))
            self._watch_call = None

    def _stub(self) -> pb_grpc.IdentityStub:
        with self._lock:
            return pb_grpc.IdentityStub(self._channel)

    def _next_bundle(self) -> pb.Bundle:
        with self._lock:
            if self._watch_call is None and not self._stop.is_set():
                self._watch_call = pb_grpc.IdentityStub(self._channel).WatchBundle(_WATCH)
            call = self._watch_call
        if call is None:
            raise EOFError("the source is closing")
        message: pb.Bundle | None = next(call, None)
        if message is None:
            raise EOFError("the bundle stream ended")
        return message

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            if self._watch_call is not None:
                self._watch_call.cancel()
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
    closed, which a `Reconnect` does; that ends one call, not the flow.
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
        self._settled: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None  # RenewNow: ends the renewal task's sleep
        self._channel: grpc.aio.Channel | None = None
        self._watch_call: AsyncIterator[pb.Bundle] | None = None
        self._queues: set[asyncio.Queue[Snapshot | None]] = set()  # None: the source closed

    async def start(self) -> None:
        if self._settled is not None:
            raise RuntimeError("this source is already started")
        self._settled = asyncio.Event()
        self._wake = asyncio.Event()
        await self._open(self._core.snapshot.bundle)
        self._tasks = [
            asyncio.create_task(self._drive(self._core.renewal(), wakes=True)),
            asyncio.create_task(self._drive(self._core.watch(), wakes=False)),
        ]

    async def wait_ready(self, timeout: float | None = None) -> Snapshot:
        """Waits for the first SVID; raises as `SvidSource.wait_ready` does."""
        if self._settled is None:
            raise RuntimeError("start() the source first (or use 'async with')")
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        except TimeoutError:
            raise self._core.timeout_error(timeout) from None
        return self._outcome()

    async def updates(self) -> AsyncIterator[Snapshot]:
        """Yields every new snapshot (SVID renewed or bundle changed) until the source closes."""
        queue: asyncio.Queue[Snapshot | None] = asyncio.Queue()
        self._queues.add(queue)
        try:
            while (snapshot := await queue.get()) is not None:
                yield snapshot
        finally:
            self._queues.discard(queue)

    async def _drive(self, flow: Flow, *, wakes: bool) -> None:
        """Runs ``flow``; with ``wakes`` (the renewal flow) a `RenewNow` ends its sleeps early."""
        reply: Reply = None
        while True:
            try:
                step = flow.send(reply)
            except StopIteration:
                return
            reply = await self._run(step, wakes)

    async def _run(self, step: Step, wakes: bool = False) -> Reply:
        assert self._settled is not None and self._channel is not None and self._wake is not None
        match step:
            case Sleep(delay) if wakes:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay.total_seconds())
                self._wake.clear()  # the machine decides again whether to sleep on
            case Sleep(delay):
                await asyncio.sleep(delay.total_seconds())
            case RenewNow():
                self._wake.set()
            case Reconnect(bundle):
                await self._open(bundle)
            case Fetch(request):
                try:
                    stub = pb_grpc.IdentityStub(self._channel)
                    return await stub.IssueSVID(request, timeout=self._call_timeout())  # type: ignore[no-any-return]
                except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - classified, retried or reported
                    return await self._failed(exc)
            case NextBundle():
                try:
                    return await self._next_bundle()
                except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - classified; opened again
                    self._watch_call = None
                    return await self._failed(exc)
            case Publish(snapshot):
                if snapshot.ready:
                    self._settled.set()
                for queue in list(self._queues):
                    queue.put_nowait(snapshot)
            case GiveUp():
                self._settled.set()
        return None

    async def _failed(self, exc: BaseException) -> Failure:
        if isinstance(exc, asyncio.CancelledError) and _closing():
            raise exc
        # Off the loop: classifying a name mismatch connects to the server once more.
        return await asyncio.to_thread(self._failure, exc)

    async def _open(self, bundle: TrustBundle) -> None:
        # Swap first, close after: the other flow, resuming during the close, finds the new channel.
        old = self._channel
        self._channel = grpc.aio.secure_channel(*self._channel_args(bundle))
        self._watch_call = None
        if old is not None:
            await old.close(None)

    async def _next_bundle(self) -> pb.Bundle:
        if self._watch_call is None:
            self._watch_call = aiter(pb_grpc.IdentityStub(self._channel).WatchBundle(_WATCH))
        message: pb.Bundle | None = await anext(self._watch_call, None)
        if message is None:
            raise EOFError("the bundle stream ended")
        return message

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
