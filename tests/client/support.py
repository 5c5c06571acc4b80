"""What the client tests share: an identity server on a thread, a TLS echo peer, a fake identity service.

The SVID sources under test are threaded, so the identity server runs on an
event loop of its own in a background thread, and TLS peers are plain
sockets on threads. Everything binds 127.0.0.1 and stops within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

import meshca
from meshca._proto import meshca_identity_pb2 as pb
from meshca._proto import meshca_identity_pb2_grpc as pb_grpc
from meshca.client import AsyncSvidSource, SvidSource
from meshca.pki._bundle import TrustBundle
from meshca.pki._files import atomic_write
from meshca.pki._trustdir import TrustDir
from meshca.pki._verify import leaf_spiffe_id
from meshca.server import IdentityServer, JoinToken, ServerConfig, SqliteStore, hash_token, new_token, store_path
from meshca.testing import TestCA

TD = "example.org"
WEB = meshca.SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/web")
API = meshca.SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/api")
OTHER = meshca.SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/other")
SERVER_ID = meshca.SpiffeId.parse(f"spiffe://{TD}/meshca/identity")

SERVER_NAME = "localhost"  # the DNS name in the identity server's certificate; sources dial 127.0.0.1

REFRESHES = "meshca_client_svid_refreshes_total"


class Pinned(random.Random):
    """A random source stuck at one point of every range: ``at`` 0.0 is the low end, 1.0 the high end."""

    def __init__(self, at: float) -> None:
        super().__init__(0)
        self.at = at

    def random(self) -> float:
        return self.at

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.at


def free_port() -> int:
    """A port nothing listens on right now (for a server that starts later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refreshes(source: SvidSource | AsyncSvidSource, result: str) -> float:
    """The source's own count of SVID fetches with ``result`` ("success" or "failure")."""
    value = source.metrics_registry.get_sample_value(REFRESHES, {"spiffe_id": str(source.spiffe_id), "result": result})
    return value or 0.0


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def eventually(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def run(coro: Any, timeout: float = 60) -> Any:
    """Runs an ``async`` test body in a fresh event loop, under a hard timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def write_bundle(directory: Path, *anchors: x509.Certificate) -> None:
    """Replaces DIR/bundle.pem, as an operator rotating anchors would (atomically)."""
    atomic_write(directory / "bundle.pem", TrustBundle(meshca.TrustDomain.parse(TD), anchors).to_pem())


def add_token(directory: Path, spiffe_id: meshca.SpiffeId, *, uses: int = 1) -> str:
    """A join token for ``spiffe_id`` in the store of the server for ``directory`` (running or not)."""
    token = new_token()
    store = SqliteStore(store_path(TrustDir.at(directory)))
    try:
        store.add_token(JoinToken(hash_token(token), spiffe_id, datetime.now(UTC) + timedelta(hours=1), uses))
    finally:
        store.close()
    return token


def serial(svid: meshca.client.X509Svid) -> int:
    return int(svid.leaf.serial_number)


def within_validity(svid: meshca.client.X509Svid, at: datetime | None = None) -> bool:
    at = at or datetime.now(UTC)
    return svid.not_before <= at < svid.not_after


# -- the identity server


SERVER_DEFAULTS: dict[str, Any] = {
    "metrics_listen": None,
    "reload_interval": timedelta(milliseconds=200),
    "leaf_ttl": timedelta(seconds=10),
    "drain_grace": timedelta(milliseconds=200),
}


@contextlib.asynccontextmanager
async def serving(directory: Path, port: int = 0, **config: Any) -> AsyncIterator[IdentityServer]:
    """An `IdentityServer` on the running loop (for asyncio tests), stopped on exit."""
    server = IdentityServer(ServerConfig(dir=directory, listen=f"127.0.0.1:{port}", **{**SERVER_DEFAULTS, **config}))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class ServerThread:
    """An `IdentityServer` on its own event loop in a background thread; start, stop, start again."""

    def __init__(self, directory: Path, **config: Any) -> None:
        self.directory = directory
        self.config: dict[str, Any] = {**SERVER_DEFAULTS, **config}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="identity-server-loop", daemon=True)
        self._thread.start()
        self.server: IdentityServer | None = None
        self.port: int | None = None

    def _run(self, coro: Any, timeout: float = 15) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, port: int = 0) -> int:
        assert self.server is None, "already running"
        config = ServerConfig(dir=self.directory, listen=f"127.0.0.1:{port or self.port or 0}", **self.config)

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


# -- a TLS peer


def peer_id(tls: ssl.SSLSocket) -> tuple[meshca.SpiffeId, int]:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    return leaf_spiffe_id(leaf), int(leaf.serial_number)


@dataclass
class Accepted:
    peer: meshca.SpiffeId
    serial: int
    data: bytes


class TlsEcho:
    """A TLS server on 127.0.0.1 that answers ``echo:<data>``; it records whom it served and what failed."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self.accepted: list[Accepted] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tls-echo", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        peer, peer_serial = peer_id(tls)
                        data = tls.recv(1024)
                        tls.sendall(b"echo:" + data)
                        self.accepted.append(Accepted(peer, peer_serial, data))
                        # Say goodbye properly (close_notify), though clients may leave without theirs.
                        with contextlib.suppress(OSError):
                            tls.unwrap()
                except (OSError, ssl.SSLError, meshca.MeshcaError) as exc:
                    self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> TlsEcho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Reply:
    peer: meshca.SpiffeId
    serial: int
    data: bytes


def handshake(
    context: ssl.SSLContext, port: int, payload: bytes = b"ping", *, until: bytes | None = None, timeout: float = 5
) -> Reply:
    """Connects to 127.0.0.1:``port`` and sends ``payload``; the server's SPIFFE ID, leaf serial and reply.

    The reply is read to the end of the stream, or until it contains ``until``.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, context.wrap_socket(raw) as tls:
        peer, peer_serial = peer_id(tls)
        tls.sendall(payload)
        data = b""
        while (until is None or until not in data) and (chunk := tls.recv(1024)):
            data += chunk
    return Reply(peer, peer_serial, data)


def refused(context: ssl.SSLContext, port: int, payload: bytes = b"ping") -> bool:
    """True if a handshake and exchange with a server that should refuse us got no echo back.

    A client refused by the server may see its handshake fail, the connection
    closed or reset, or (TLS 1.3: the client finishes first) an empty reply.
    """
    try:
        reply = handshake(context, port, payload)
    except (ssl.SSLError, ConnectionError):
        return True
    return not reply.data.startswith(b"echo:")


# -- a fake identity service

REFUSALS = {
    "unauthenticated": (grpc.StatusCode.UNAUTHENTICATED, "unknown join token"),
    "denied": (grpc.StatusCode.PERMISSION_DENIED, f"credential grants {OTHER}, not {WEB}"),
}


@dataclass
class FakeIdentity:
    """A native-API identity service that answers as ``mode`` says, for tests of what the client accepts.

    Modes: ``good`` (a leaf for the requested ID and key from ``ca``), ``good-dns``
    (the same with DNS SAN localhost), ``wrong-id``, ``wrong-ca``, ``wrong-key``,
    and the refusals in `REFUSALS` (``unauthenticated``, ``denied``).
    It serves TLS with a certificate from ``ca`` naming localhost.
    """

    ca: TestCA
    rogue: TestCA
    ttl: timedelta = timedelta(seconds=4)
    mode: str = "good"
    requests: list[str] = field(default_factory=list)
    port: int = 0
    _server: grpc.Server | None = None

    def start(self) -> FakeIdentity:
        outer = self

        class Servicer(pb_grpc.IdentityServicer):
            def IssueSVID(self, request: pb.IssueSVIDRequest, context: Any) -> pb.IssueSVIDResponse:
                if outer.mode in REFUSALS:
                    outer.requests.append(outer.mode)
                    context.abort(*REFUSALS[outer.mode])
                return outer.issue(request)

            def WatchBundle(self, request: pb.WatchBundleRequest, context: Any) -> Iterator[pb.Bundle]:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "no bundle watch here")
                yield pb.Bundle()  # pragma: no cover - abort raises

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_IdentityServicer_to_server(Servicer(), server)
        tls = self.ca.issue_svid(SERVER_ID, dns_names=["localhost"], now=datetime.now(UTC))
        self.port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(tls.key_pem, tls.chain_pem)]))
        server.start()
        self._server = server
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def issue(self, request: pb.IssueSVIDRequest) -> pb.IssueSVIDResponse:
        mode = self.mode
        self.requests.append(mode)
        wanted = meshca.SpiffeId.parse(request.spiffe_id)
        public_key = x509.load_der_x509_csr(request.csr).public_key()
        ca, sid, dns = self.ca, wanted, ()
        if mode == "good-dns":
            dns = ("localhost",)
        elif mode == "wrong-id":
            sid = OTHER
        elif mode == "wrong-ca":
            ca = self.rogue
        elif mode == "wrong-key":
            public_key = meshca.generate_key().public_key()
        else:
            assert mode == "good", mode
        issued = ca.issuer.sign(public_key, sid, now=datetime.now(UTC), ttl=self.ttl, dns_names=dns)  # type: ignore[arg-type]
        return pb.IssueSVIDResponse(spiffe_id=str(sid), leaf=issued.leaf_der(), intermediates=issued.intermediates_der)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(5)
            self._server = None


class HandshakeLoop:
    """Handshakes with ``context`` against 127.0.0.1:``port`` every ``interval`` seconds, on a thread.

    Every handshake must complete and get its own payload echoed; anything
    else is recorded in ``failures`` with the time it happened.
    """

    def __init__(self, context: ssl.SSLContext, port: int, interval: float = 0.15) -> None:
        self.context = context
        self.port = port
        self.interval = interval
        self.replies: list[Reply] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="handshake-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            payload = b"ping %d" % n
            try:
                reply = handshake(self.context, self.port, payload)
            except Exception as exc:
                self.failures.append(f"{datetime.now(UTC).isoformat()} handshake {n}: {exc!r}")
                continue
            if reply.data != b"echo:" + payload:
                self.failures.append(f"{datetime.now(UTC).isoformat()} handshake {n}: reply {reply.data!r}")
            self.replies.append(reply)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> HandshakeLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
