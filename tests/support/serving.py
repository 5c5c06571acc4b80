"""The identity service in-process: on the test's own loop (`serving`) or on a thread (`ServerThread`).

An async test runs a server with ``async with serving(tmp_path) as h:`` and
talks to it through ``h.native``, ``h.linkerd``, ``h.istio`` and ``h.health``,
the stubs generated from proto/. Threaded client tests (SVID sources run on
threads) use `ServerThread`, which can stop and start again on one port.
Everything binds 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from structlog.testing import capture_logs

import meshca
import meshca.server
from meshca._proto import istio_ca_pb2_grpc, linkerd_identity_pb2_grpc, meshca_identity_pb2_grpc
from meshca.client import SvidSource
from meshca.server import IdentityServer, ServerConfig, Store
from meshca.testing import TestCA

from .clocks import MovableClock
from .ids import API, TD, WEB
from .metrics import http_get
from .tokens import add_token, workload_records

SERVER_DEFAULTS: dict[str, Any] = {
    "metrics_listen": None,
    "reload_interval": timedelta(milliseconds=200),
    "drain_grace": timedelta(milliseconds=200),
}


def server_config(directory: Path, port: int = 0, **config: Any) -> ServerConfig:
    """A test server's configuration: `SERVER_DEFAULTS` and ``config``, listening on 127.0.0.1:``port``."""
    return ServerConfig(dir=directory, listen=f"127.0.0.1:{port}", **{**SERVER_DEFAULTS, **config})


def free_port() -> int:
    """A port nothing listens on right now (for a server that starts later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Harness:
    ca: TestCA
    server: IdentityServer
    clock: MovableClock
    directory: Path
    logs: list[dict[str, Any]]
    channel: grpc.aio.Channel
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server.port
        return self.server.port

    @property
    def address(self) -> str:
        """What sources dial, with ``server_name="localhost"`` (the name in the server's certificate)."""
        return f"127.0.0.1:{self.port}"

    @property
    def bundle_pem(self) -> bytes:
        return self.ca.bundle.to_pem()

    @property
    def native(self) -> meshca_identity_pb2_grpc.IdentityStub:
        return meshca_identity_pb2_grpc.IdentityStub(self.channel)

    @property
    def linkerd(self) -> linkerd_identity_pb2_grpc.IdentityStub:
        return linkerd_identity_pb2_grpc.IdentityStub(self.channel)

    @property
    def istio(self) -> istio_ca_pb2_grpc.IstioCertificateServiceStub:
        return istio_ca_pb2_grpc.IstioCertificateServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    def new_channel(self) -> grpc.aio.Channel:
        """Another connection (closed with the harness): new connections see the server's current certificate."""
        channel = grpc.aio.secure_channel(f"localhost:{self.port}", grpc.ssl_channel_credentials(self.bundle_pem))
        self._channels.append(channel)
        return channel

    def issued(self) -> list[meshca.server.IssuanceRecord]:
        """The issuance log without the server's own SVIDs (api "self"), which every start adds."""
        return workload_records(self.server.store.issuances())

    def token(
        self,
        spiffe_id: meshca.SpiffeId = WEB,
        *,
        uses: int = 1,
        ttl: timedelta = timedelta(hours=1),
        agent: bool = False,
    ) -> str:
        """A join token in the server's store (``agent``: one made as ``meshca token create --agent`` makes it)."""
        return add_token(self.server.store, spiffe_id, uses=uses, ttl=ttl, now=self.clock(), agent=agent)

    async def scrape(self) -> str:
        assert self.server.metrics_port, "start the server with metrics_listen"
        code, text = await asyncio.to_thread(http_get, self.server.metrics_port, "/metrics")
        assert code == 200
        return text

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]


@contextlib.asynccontextmanager
async def serving(
    directory: Path,
    ca: TestCA | None = None,
    *,
    clock: MovableClock | None = None,
    write: bool = True,
    store: Store | None = None,
    **config: Any,
) -> AsyncIterator[Harness]:
    """Writes ``ca`` into ``directory`` (a fresh CA when None), starts a server on it, and stops it on exit.

    ``write=False`` serves a directory that already holds ``ca``; ``store`` replaces the server's own
    SQLite store (the server closes it). Every log event of the run is in ``h.logs``.
    """
    ca = ca or TestCA(TD)
    if write:
        ca.write(directory)
    clock = clock or MovableClock()
    with capture_logs() as logs:
        server = IdentityServer(server_config(directory, **config), clock=clock, store=store)
        await server.start()
        channel = grpc.aio.secure_channel(f"localhost:{server.port}", grpc.ssl_channel_credentials(ca.bundle.to_pem()))
        h = Harness(ca, server, clock, directory, logs, channel)
        try:
            yield h
        finally:
            for ch in (channel, *h._channels):
                await ch.close()
            await server.stop()


class ServerThread:
    """An `IdentityServer` on its own event loop in a background thread; start, stop, start again.

    Leaves last 10 s unless ``leaf_ttl`` says otherwise, so sources renew within a test.
    """

    def __init__(self, directory: Path, **config: Any) -> None:
        self.directory = directory
        self.config: dict[str, Any] = {"leaf_ttl": timedelta(seconds=10), **config}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="identity-server-loop", daemon=True)
        self._thread.start()
        self.server: IdentityServer | None = None
        self.port: int | None = None

    def _run(self, coro: Any, timeout: float = 15) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, port: int = 0) -> int:
        assert self.server is None, "already running"
        config = server_config(self.directory, port or self.port or 0, **self.config)

        async def start() -> IdentityServer:
            server = IdentityServer(config)
            await server.start()
            return server

        self.server = self._run(start())
        self.port = self.server.port
        assert self.port
        return self.port

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            self._run(server.stop())

    @property
    def address(self) -> str:
        """What sources dial, with ``server_name="localhost"`` (the name in the server's certificate)."""
        assert self.port
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


@dataclass(frozen=True)
class Trust:
    """A trust directory as `meshca init` writes it, and the CA in it."""

    ca: TestCA
    dir: Path


@dataclass(frozen=True)
class Pair:
    """An identity server and two ready sources: ``web`` (a TLS server here) and ``api`` (its client)."""

    server: ServerThread
    web: SvidSource
    api: SvidSource


def start_pair(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource], **config: Any
) -> Pair:
    server = servers(trust.dir, **config)
    server.start()
    web = sources(server.address, trust.ca.bundle, WEB, join_token=add_token(trust.dir, WEB))
    api = sources(server.address, trust.ca.bundle, API, join_token=add_token(trust.dir, API))
    web.wait_ready(10)
    api.wait_ready(10)
    return Pair(server, web, api)
