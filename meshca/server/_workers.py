"""`meshca serve --workers N`: several serving processes on one port, one store writer.

Python runs one thread of Python at a time per process, so meshca scales
issuance across cores with processes. The supervisor (the process the
operator started):

- claims the gRPC and metrics addresses first (a taken one fails the start
  in one line, see _ports) and holds the gRPC port for its whole life; each
  worker binds it with SO_REUSEPORT and the kernel spreads connections
  across them;
- owns a SQLite store: workers send their issuance records (and join
  token uses) over a pipe in batches, the supervisor commits them, many
  per transaction, and answers; a worker sends a response only after its
  record's batch committed. One writer means no cross-process lock
  contention (SQLite's busy waits), and the token-use check stays atomic.
  The supervisor also keeps the store's health (failed commits, checks)
  and shares it with the workers in one shared byte. With PostgreSQL each
  worker opens its own store, as a replica does, and there is no pipe;
- serves /metrics (Prometheus multiprocess mode, summed over workers),
  /livez and /readyz (from the workers' issuer and store gauges, and the
  supervisor's own view of a SQLite store);
- restarts a worker that dies (from the last good issuer when the files on
  disk are bad), forwards SIGTERM so every worker drains,
  and closes the store last. Workers die with the supervisor (PDEATHSIG
  and a parent watchdog), so a kill -9 leaves no orphan serving old keys.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import signal
import tempfile
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from meshca.pki._bundle import TrustBundle
from meshca.pki._errors import DuplicateSerial, MeshcaError, StoreError, TokenUsedUp
from meshca.pki._issuer import Issuer
from meshca.pki._keys import PrivateKey
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock, system_clock
from meshca.pki._trustdir import TrustDir
from meshca.server._audit import Checkpoint, LoggedRecord
from meshca.server._config import ServerConfig
from meshca.server._entries import RegistrationEntry
from meshca.server._health import StoreHealth
from meshca.server._metrics import MetricsServer
from meshca.server._ports import claim, release
from meshca.server._state import file_stamp, validate
from meshca.server._store import (
    IssuanceRecord,
    IssuerCertRecord,
    JoinToken,
    JwtPublicKey,
    SqliteStore,
    next_batch,
    sqlite_path,
)

__all__ = ["PipeStore", "run_supervisor"]

log = structlog.get_logger("meshca.server")

_Wire = tuple[str, str, float, str, str, float, str | None]  # an IssuanceRecord and a token hash
_Outcome = tuple[str, str] | None  # None: committed; else (kind, message), kind: used_up, duplicate, error
_ERRORS: dict[str, type[StoreError]] = {"used_up": TokenUsedUp, "duplicate": DuplicateSerial, "error": StoreError}


def _to_outcome(error: StoreError | None) -> _Outcome:
    if error is None:
        return None
    kind = next((k for k, cls in _ERRORS.items() if isinstance(error, cls)), "error")
    return kind, str(error)


def _to_wire(record: IssuanceRecord, token_hash: str | None) -> _Wire:
    return (
        record.serial,
        record.spiffe_id,
        record.not_after.timestamp(),
        record.principal,
        record.api,
        record.issued_at.timestamp(),
        token_hash,
    )


def _from_wire(item: _Wire) -> tuple[IssuanceRecord, str | None]:
    serial, sid, not_after, principal, api, issued_at, token_hash = item
    record = IssuanceRecord(
        serial,
        sid,
        datetime.fromtimestamp(not_after, UTC),
        principal,
        api,
        datetime.fromtimestamp(issued_at, UTC),
    )
    return record, token_hash


class PipeStore:
    """A worker's view of the store: reads from SQLite directly, writes through the supervisor.

    Batches are pipelined: the sender does not wait for one batch's commit
    before sending the next, and the supervisor answers them in order.
    ``writable`` is the supervisor's view of the store (a shared byte), which
    `check` reports.
    """

    def __init__(self, path: Path, conn: multiprocessing.connection.Connection, writable: Any) -> None:
        self._conn = conn
        self._writable = writable
        self._reader = SqliteStore.reader(path)
        self._queue: queue.SimpleQueue[tuple[_Wire, concurrent.futures.Future[None]] | None] = queue.SimpleQueue()
        self._pending: queue.SimpleQueue[list[concurrent.futures.Future[None]] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="meshca-store-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="meshca-store-receive", daemon=True)
        self._sender.start()
        self._receiver.start()

    def add_token(self, token: JoinToken) -> None:
        raise StoreError("join tokens are created with 'meshca token create', not by a serving worker")

    def get_token(self, token_hash: str) -> JoinToken | None:
        return self._reader.get_token(token_hash)

    def add_entry(self, entry: RegistrationEntry) -> None:
        raise StoreError("registration entries are created with 'meshca entry create', not by a serving worker")

    def entries(self, parent: SpiffeId | None = None) -> list[RegistrationEntry]:
        return self._reader.entries(parent)

    def get_entry(self, entry_id: str) -> RegistrationEntry | None:
        return self._reader.get_entry(entry_id)

    def delete_entry(self, entry_id: str) -> bool:
        raise StoreError("registration entries are deleted with 'meshca entry delete', not by a serving worker")

    def publish_jwt_key(self, key: JwtPublicKey) -> None:
        # Each worker holds its own JWT key; SQLite serializes the publishing processes.
        self._reader.publish_jwt_key(key)

    def jwt_keys(self, now: datetime) -> list[JwtPublicKey]:
        return self._reader.jwt_keys(now)

    def issuances(
        self, spiffe_id: str | None = None, limit: int | None = None, *, newest_first: bool = False
    ) -> list[IssuanceRecord]:
        return self._reader.issuances(spiffe_id, limit, newest_first=newest_first)

    def log_records(self) -> list[LoggedRecord]:
        return self._reader.log_records()

    def log_checkpoints(self) -> list[Checkpoint]:
        return self._reader.log_checkpoints()

    def record_issuer(self, record: IssuerCertRecord) -> None:
        self._reader.record_issuer(record)  # rare: straight to SQLite, which serialises writers itself

    def issuer_certs(self) -> list[IssuerCertRecord]:
        return self._reader.issuer_certs()

    def record(self, record: IssuanceRecord, *, token_hash: str | None = None) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((_to_wire(record, token_hash), future))
        return future

    def check(self) -> None:
        if not self._writable.value:
            raise StoreError("the supervisor cannot write the store (its store.down log line says why)")

    def _send_loop(self) -> None:
        while (batch := next_batch(self._queue)) is not None:
            futures = [future for _, future in batch]
            try:
                self._conn.send([wire for wire, _ in batch])
            except (OSError, EOFError) as exc:
                _fail(futures, StoreError(f"store writer is gone: {exc}"))
                continue
            self._pending.put(futures)
        self._pending.put(None)

    def _receive_loop(self) -> None:
        while True:
            futures = self._pending.get()
            if futures is None:
                return
            try:
                outcomes: list[_Outcome] = self._conn.recv()
            except (OSError, EOFError) as exc:
                _fail(futures, StoreError(f"store writer is gone: {exc}"))
                continue
            if len(outcomes) != len(futures):
                _fail(futures, StoreError("store writer answered out of step"))
                continue
            for future, outcome in zip(futures, outcomes, strict=True):
                if outcome is None:
                    future.set_result(None)
                else:
                    future.set_exception(_ERRORS[outcome[0]](outcome[1]))

    def close(self) -> None:
        self._queue.put(None)
        self._sender.join(timeout=10)
        self._receiver.join(timeout=10)
        self._reader.close()


def _fail(futures: list[concurrent.futures.Future[None]], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


def _serve_pipe(
    store: SqliteStore, health: StoreHealth, conn: multiprocessing.connection.Connection, name: str
) -> None:
    """Supervisor side of one worker's pipe: commit each batch in one transaction, answer in order."""
    while True:
        try:
            batch: list[_Wire] = conn.recv()
        except (EOFError, OSError):
            return
        try:
            outcomes: list[StoreError | None] = store.commit_now([_from_wire(item) for item in batch])
        except Exception as exc:  # noqa: BLE001 - answer this batch, keep serving the next
            outcomes = [StoreError(f"cannot record issuance: {exc}")] * len(batch)
        for outcome in outcomes:
            health.outcome(outcome)  # before the answer: a worker that sees a failure finds the store down
        answer = [_to_outcome(outcome) for outcome in outcomes]
        try:
            conn.send(answer)
        except OSError:
            log.warning("worker.pipe_closed", worker=name)
            return


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


_Files = tuple[bytes, bytes, bytes]  # issuer.crt, issuer.key, bundle.pem


def _issuer_from(files: _Files, passphrase: bytes | None) -> Issuer:
    chain_pem, key_pem, bundle_pem = files
    return Issuer.from_pem(chain_pem, key_pem, TrustBundle.from_pem(bundle_pem), passphrase)


class _LastGood:
    """The issuer files as last validated: what a replacement worker starts from when the disk is bad.

    The supervisor checks the files as every worker does (same validation,
    reloaded only when they change), so this is the issuer the workers serve.
    The bytes stay in memory and reach a worker over its spawn pipe.
    """

    def __init__(self, tdir: TrustDir, passphrase: bytes | None, clock: Clock) -> None:
        self._paths = (tdir.issuer_cert, tdir.issuer_key_source, tdir.bundle)
        self._passphrase = passphrase
        self._clock = clock
        self._stamp: object = None
        self.files: _Files | None = None
        self.poll()

    def poll(self) -> None:
        stamp = file_stamp(self._paths)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            cert, key, bundle = (path.read_bytes() for path in self._paths)
            validate(_issuer_from((cert, key, bundle), self._passphrase), self._clock)
        except (MeshcaError, ValueError, OSError):
            return  # the workers refuse these files too and keep the last good issuer
        self.files = (cert, key, bundle)


def _worker_main(
    config: ServerConfig,
    conn: multiprocessing.connection.Connection | None,
    parent: int,
    index: int,
    started: Any,  # a multiprocessing Event
    last_good: _Files | None,
    writable: Any,  # the supervisor's view of a SQLite store (a shared byte)
) -> None:
    """Entry point of one serving process (started with the 'spawn' method).

    ``conn`` is the pipe to the supervisor's SQLite store; None: the worker opens ``config.store`` itself.
    """
    _die_with_parent(parent)
    from meshca.server._app import IdentityServer
    from meshca.server._logging import configure_logging

    configure_logging()
    structlog.contextvars.bind_contextvars(worker=index)

    async def serve() -> None:
        path = sqlite_path(config.store, config.dir)
        store = PipeStore(path, conn, writable) if conn is not None and path is not None else None
        try:
            fallback = _issuer_from(last_good, config.passphrase) if last_good is not None else None
            # A worker that opens its own store (PostgreSQL) keeps its own chain of the log, signed with the
            # log key the CLI made before the workers started (keys do not cross the process boundary).
            log_key = TrustDir.at(config.dir).ensure_log_key(config.passphrase) if store is None else None
            server = IdentityServer(config, store=store, last_good=fallback, multiprocess_metrics=True, log_key=log_key)

            async def watch_parent() -> None:
                while os.getppid() == parent:
                    await asyncio.sleep(1)
                os._exit(1)

            watchdog = asyncio.create_task(watch_parent())
            try:
                await server.serve_until_signal(on_started=started.set)
            finally:
                watchdog.cancel()
        finally:
            if store is not None:
                store.close()

    try:
        asyncio.run(serve())
    except (MeshcaError, OSError, ValueError) as exc:
        log.error("worker.failed", reason=str(exc))
        raise SystemExit(1) from None


_MAX_RESTART_DELAY = 30.0


def run_supervisor(
    config: ServerConfig, workers: int, *, clock: Clock = system_clock, log_key: PrivateKey | None = None
) -> int:
    """Runs ``workers`` serving processes until SIGTERM or SIGINT; returns the exit code.

    The gRPC and metrics addresses are claimed first (see _ports): a taken
    one raises ``PortTaken`` naming it, before anything is started or
    written. A worker of the first generation that dies before it serves
    makes the whole server exit 1 (its reason is in its log line): a broken
    configuration fails once, loudly. A worker that dies later is restarted,
    with backoff, from the last good issuer.
    The supervisor is the one writer of the issuance log: ``log_key`` signs its checkpoints.
    """
    from meshca.server._app import _split_hostport

    path = sqlite_path(config.store, config.dir)  # None: PostgreSQL, which each worker opens itself
    host, port = _split_hostport(config.listen)
    port, held = claim(host, port, what="gRPC", hold=True)
    metrics_dir = ""
    metrics_server = None
    store = None
    procs: dict[int, tuple[multiprocessing.process.BaseProcess, Any]] = {}
    try:
        last_good = _LastGood(TrustDir.at(config.dir), config.passphrase, clock)
        if path is not None:
            # commit_now only: the supervisor batches its workers' records itself, one chain for all
            store = SqliteStore(path, writer=False, log_key=log_key, clock=clock)
        writable = multiprocessing.get_context("spawn").RawValue("b", 1)
        health = None if store is None else StoreHealth(store.check, lambda up: setattr(writable, "value", up))
        metrics_dir = tempfile.mkdtemp(prefix="meshca-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        metrics_server = _metrics_server(config, metrics_dir, procs, health)
        listen = f"{config.listen.rpartition(':')[0]}:{port}"
        return _supervise(
            config,
            replace(config, listen=listen, metrics_listen=None, reuse_port=True),
            workers,
            (store, health, writable),
            last_good,
            metrics_dir,
            metrics_server,
            procs,
        )
    finally:
        for proc, _ in procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc, _ in procs.values():
            proc.join(timeout=config.drain_grace.total_seconds() + 5)
            if proc.is_alive():
                proc.kill()
        release(held)
        if metrics_server is not None:
            metrics_server.stop()
        if store is not None:
            store.close()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if procs:
            log.info("supervisor.stopped")


def _supervise(
    config: ServerConfig,
    worker_config: ServerConfig,
    workers: int,
    sqlite: tuple[SqliteStore | None, StoreHealth | None, Any],
    last_good: _LastGood,
    metrics_dir: str,
    metrics_server: MetricsServer | None,
    procs: dict[int, tuple[multiprocessing.process.BaseProcess, Any]],
) -> int:
    from prometheus_client import multiprocess

    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    restarts: dict[int, float] = {}
    store, health, writable = sqlite

    def start(index: int) -> None:
        parent_end, child_end = ctx.Pipe() if store is not None else (None, None)
        started = ctx.Event()
        proc = ctx.Process(
            target=_worker_main,
            args=(worker_config, child_end, os.getpid(), index, started, last_good.files, writable),
            name=f"meshca-worker-{index}",
        )
        proc.start()
        if child_end is not None:
            child_end.close()
            threading.Thread(target=_serve_pipe, args=(store, health, parent_end, f"{index}"), daemon=True).start()
        procs[index] = (proc, started)

    def check_store(health: StoreHealth) -> None:
        interval = config.reload_interval.total_seconds()
        while not stopping.wait(interval):
            if health.due():
                health.probe()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(workers):
        start(index)
    if health is not None:
        threading.Thread(target=check_store, args=(health,), name="meshca-store-check", daemon=True).start()
    log.info(
        "supervisor.started",
        workers=workers,
        listen=worker_config.listen,
        metrics_port=metrics_server.port if metrics_server is not None else None,
    )
    while not stopping.wait(0.5):
        last_good.poll()
        for index, (proc, started) in list(procs.items()):
            if proc.is_alive() or stopping.is_set():
                continue
            if proc.pid is not None:
                multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
            if not started.is_set() and index not in restarts:
                log.error("supervisor.failed", worker=index, exitcode=proc.exitcode)
                return 1
            delay = min(_MAX_RESTART_DELAY, restarts.get(index, 0.5) * 2)
            restarts[index] = delay
            log.error("worker.died", worker=index, exitcode=proc.exitcode, restart_in=delay)
            if stopping.wait(delay):
                break
            start(index)
    return 0


def _metrics_server(
    config: ServerConfig,
    metrics_dir: str,
    procs: dict[int, tuple[multiprocessing.process.BaseProcess, Any]],
    health: StoreHealth | None,
) -> MetricsServer | None:
    if not config.metrics_listen:
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from meshca.server._app import _split_hostport

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]

    def ready() -> bool:
        # Ready while a worker serves, every live one holds a usable issuer and a store
        # that can write (the gauges each worker keeps, least over live workers), and
        # the supervisor can write a SQLite store it owns.
        if not any(proc.is_alive() and started.is_set() for proc, started in list(procs.values())):
            return False
        if health is not None and not health.writable:
            return False
        gauges: dict[str, list[float]] = {"meshca_issuer_usable": [], "meshca_store_up": []}
        for metric in registry.collect():
            if metric.name in gauges:
                gauges[metric.name].extend(s.value for s in metric.samples)
        return all(values and min(values) == 1 for values in gauges.values())

    host, port = _split_hostport(config.metrics_listen)
    server = MetricsServer(registry, host, port, ready)
    server.start()
    return server
