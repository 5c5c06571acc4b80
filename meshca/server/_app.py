"""`meshca serve`: wires the store, state, credentials, pipeline and wire adapters into a grpc.aio server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
from collections.abc import Callable
from datetime import timedelta

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from meshca.pki._errors import MeshcaError
from meshca.pki._issuer import Issuer
from meshca.pki._keys import PrivateKey
from meshca.pki._time import Clock, system_clock
from meshca.pki._trustdir import TrustDir
from meshca.server import api
from meshca.server._config import ServerConfig
from meshca.server._health import StoreHealth
from meshca.server._interceptor import Boundary
from meshca.server._jwt_keys import JwtKeyring
from meshca.server._metrics import Metrics, MetricsServer, StoreMetrics
from meshca.server._pipeline import Pipeline
from meshca.server._ports import claim
from meshca.server._state import IssuerState
from meshca.server._store import Store, open_store
from meshca.server.credentials import (
    AgentEntryCredential,
    Credential,
    JoinTokenCredential,
    K8sJwtCredential,
    SvidProofCredential,
    TokenReviewCredential,
)

__all__ = ["IdentityServer", "store_path"]

log = structlog.get_logger("meshca.server")

SERVICES = api.SERVICES


def store_path(tdir: TrustDir) -> str:
    return str(tdir.path / "meshca.db")


def _split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {value!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


class IdentityServer:
    """One serving process. `start()` binds; `wait()` returns after `stop()` or a signal.

    ``multiprocess_metrics`` is set by the workers of `serve --workers N`
    (Prometheus multiprocess mode), never read from the environment.
    Without ``store`` the server opens the one ``config.store`` names.
    Ready (gRPC health SERVING, /readyz 200) while the issuer is usable and
    the store can write (`StoreHealth`).
    ``log_key`` signs the issuance log's checkpoints of the store it opens.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        clock: Clock = system_clock,
        store: Store | None = None,
        multiprocess_metrics: bool = False,
        last_good: Issuer | None = None,
        log_key: PrivateKey | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.tdir = TrustDir.at(config.dir)
        self.metrics = Metrics(multiprocess=multiprocess_metrics, managed=config.issuer_ttl is not None)
        self.store: Store = (
            store
            if store is not None
            else open_store(
                config.store,
                self.tdir.path,
                metrics=StoreMetrics(self.metrics.registry),
                log_key=log_key,
                clock=clock,
            )
        )
        try:
            self.state = self._issuer_state(last_good)
            td = self.state.issuer.trust_domain
            # Asked in this order; the first kind that claims a credential decides (JWKS before TokenReview).
            credentials: list[Credential] = [JoinTokenCredential(self.store, clock)]
            if config.k8s_jwt:
                credentials.append(K8sJwtCredential(config.k8s_jwt, td, clock))
            if config.token_review:
                credentials.append(TokenReviewCredential(config.token_review, td, clock))
            credentials.append(SvidProofCredential(lambda: self.state.bundle, clock))
            credentials.append(AgentEntryCredential())  # what the Agent API makes of an entry an agent may serve
        except (MeshcaError, ValueError, OSError):
            if store is None:
                self.store.close()  # ours: no writer thread outlives a server that never started
            raise
        self.store_health = StoreHealth(self.store.check, lambda up: self.metrics.store_up.set(1 if up else 0))
        self.pipeline = Pipeline(config, self.state, self.store, credentials, self.metrics, clock, self.store_health)
        self.jwt_keys = JwtKeyring(self.store, clock)
        self.apis = (
            api.NativeApi(config, self.pipeline, self.state),
            api.LinkerdApi(config, self.pipeline),
            api.IstioApi(config, self.pipeline),
            api.AgentApi(config, self.pipeline, self.state, self.store, self.jwt_keys, self.metrics, clock),
        )
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._health_ready: bool | None = None  # what gRPC health says now
        # Store checks wait up to the store's timeouts: a thread of their own, joined before the store closes.
        self._checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meshca-store-check")

    def _issuer_state(self, last_good: Issuer | None) -> IssuerState:
        cfg = self.config
        if cfg.issuer_ttl is not None:
            return IssuerState.managed(
                self.tdir,
                self.clock,
                self.metrics,
                self.store,
                cfg.passphrase,
                issuer_ttl=cfg.issuer_ttl,
                max_leaf_ttl=cfg.max_leaf_ttl,
            )
        return IssuerState.from_files(
            self.tdir, self.clock, self.metrics, self.store, cfg.passphrase, last_good=last_good, warn=cfg.issuer_warn
        )

    @property
    def ready(self) -> bool:
        """Whether this server can issue: a usable issuer and a store that can write."""
        return self.state.usable and self.store_health.writable

    def _credentials(self) -> grpc.ServerCredentials:
        ttl = self.config.leaf_ttl

        def current() -> grpc.ServerCertificateConfiguration:
            svid = self.state.serving_svid(self.config.server_names, ttl)
            return grpc.ssl_server_certificate_configuration([(svid.key_pem, svid.chain_pem)])

        last = [self.state.serving_svid(self.config.server_names, ttl)]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC for new connections; None keeps the current one.
            try:
                svid = self.state.serving_svid(self.config.server_names, ttl)
            except MeshcaError as exc:  # not recorded, so not used: keep serving the current one
                log.error("server.svid_failed", reason=str(exc))
                return None
            if svid is last[0]:
                return None
            last[0] = svid
            return grpc.ssl_server_certificate_configuration([(svid.key_pem, svid.chain_pem)])

        # grpc's stub says the fetcher never returns None; grpc documents None as "no change".
        return grpc.dynamic_ssl_server_credentials(
            current(),
            fetch,  # type: ignore[arg-type]
            require_client_authentication=False,
        )

    async def start(self) -> None:
        cfg = self.config
        if not cfg.reuse_port:
            # Fail with one line naming the address before gRPC's own bind (and its log lines) runs.
            with contextlib.suppress(ValueError):  # not HOST:PORT (a unix: address): gRPC reports it
                host, port = _split_hostport(cfg.listen)
                if port:
                    claim(host, port, what="gRPC")
        if cfg.metrics_listen:
            host, port = _split_hostport(cfg.metrics_listen)
            self._metrics_server = MetricsServer(self.metrics.registry, host, port, lambda: self.ready)
        try:
            await self._start_grpc()
        except BaseException:
            if self._metrics_server is not None:
                self._metrics_server.stop()
            raise
        if self._metrics_server is not None:
            self._metrics_server.start()
            self.metrics_port = self._metrics_server.port
        await self._maintain_jwt_keys()
        self._tasks.append(asyncio.create_task(self._reload_loop()))
        self._tasks.append(asyncio.create_task(self._store_loop()))
        log.info(
            "server.started",
            listen=cfg.listen,
            port=self.port,
            tls=not cfg.insecure_plaintext,
            trust_domain=str(self.state.issuer.trust_domain),
            metrics=cfg.metrics_listen,
            metrics_port=self.metrics_port,
        )

    async def _start_grpc(self) -> None:
        cfg = self.config
        options = [
            # gRPC's limit guards memory; meshca's own, lower one is checked (and logged) per request.
            ("grpc.max_receive_message_length", 16 * cfg.max_message_bytes),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            # Only workers share a port; a lone server must fail to bind a port that is taken.
            ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        server = grpc.aio.server(options=options)
        boundary = Boundary(cfg, self.metrics)
        for adapter in self.apis:
            adapter.register(server, boundary)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            if cfg.insecure_plaintext:
                self.port = server.add_insecure_port(cfg.listen)
            else:
                self.port = server.add_secure_port(cfg.listen, self._credentials())
        except RuntimeError as exc:  # grpc reports a failed bind this way
            raise OSError(f"cannot listen on {cfg.listen}: {exc}") from None
        if not self.port:
            raise OSError(f"cannot listen on {cfg.listen}")
        await server.start()
        self._server = server
        await self._set_health()

    async def _set_health(self) -> None:
        """Sets gRPC health from `ready` when it changed."""
        ready = self.ready
        if ready == self._health_ready:
            return
        self._health_ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def _reload_loop(self) -> None:
        interval = self.config.reload_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.state.refresh)  # may wait for the store or a token
                self.state.apply()
            except Exception:
                log.exception("issuer.poll_failed")
            if not self.config.insecure_plaintext and self.state.usable:
                # Renewed here, ahead of the next handshake, so it follows a new active issuer even while
                # no client connects (in a thread: recording it waits for the store).
                try:
                    await asyncio.to_thread(self.state.serving_svid, self.config.server_names, self.config.leaf_ttl)
                except MeshcaError as exc:
                    log.error("server.svid_failed", reason=str(exc))
            await self._set_health()

    async def _store_loop(self) -> None:
        """Checks the store when due (in a thread: a check may wait for the store's timeouts), then health."""
        interval = self.config.reload_interval.total_seconds()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            if self.store_health.due():
                await loop.run_in_executor(self._checker, self.store_health.probe)
            await self._set_health()
            await self._maintain_jwt_keys()

    async def _maintain_jwt_keys(self) -> None:
        """Publishes this process's JWT key, or its successor when due (docs/architecture.md, JWT keys)."""
        try:
            await asyncio.to_thread(self.jwt_keys.maintain)
        except MeshcaError as exc:  # the store is away: JWT-SVIDs wait for it, X.509 issuance goes on
            log.warning("jwt_key.publish_failed", reason=str(exc))

    async def stop(self, grace: timedelta | None = None) -> None:
        """Stops taking new calls, lets in-flight ones finish within the grace period, closes the store."""
        if self._server is None:
            return
        server, self._server = self._server, None
        for task in self._tasks:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        await server.stop((grace or self.config.drain_grace).total_seconds())
        if self._metrics_server is not None:
            self._metrics_server.stop()
        await asyncio.to_thread(self._checker.shutdown)
        self.store.close()
        log.info("server.stopped")
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def serve_until_signal(self, on_started: Callable[[], None] | None = None) -> None:
        await self.start()
        if on_started is not None:
            on_started()
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await stop_requested.wait()
        log.info("server.draining")
        await self.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
