"""`meshca serve --workers N`: several serving processes on one port, one store writer.

Python runs one thread of Python at a time per process, so meshca scales
issuance across cores with processes. The supervisor (the process the
operator started):

- claims the gRPC and metrics addresses first (a taken one fails the start
  in one line, see _ports) and holds the gRPC port for its whole life; each
  worker binds it with SO_REUSEPORT and the kernel spreads connections
  across them;
- owns the SQLite store: workers send their issuance records (and join
  token uses) over a pipe in batches, the supervisor commits them, many
  per transaction, and answers; a worker sends a response only after its
  record's batch committed. One writer means no cross-process lock
  contention (SQLite's busy waits), and the token-use check stays atomic;
- serves /metrics (Prometheus multiprocess mode, summed over workers),
  /livez and /readyz (from the workers' own issuer gauge);
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
from meshca.pki._errors import MeshcaError, StoreError, TokenUsedUp
from meshca.pki._issuer import Issuer
from meshca.pki._keys import PrivateKey
from meshca.pki._time import Clock, system_clock
from meshca.pki._trustdir import TrustDir
from meshca.server._audit import Checkpoint, LoggedRecord
from meshca.server._config import ServerConfig
from meshca.server._metrics import MetricsServer
from meshca.server._ports import claim, release
from meshca.server._state import file_stamp, validate
from meshca.server._store import IssuanceRecord, JoinToken, SqliteStore, next_batch

__all__ = ["PipeStore", "run_supervisor"]

log = structlog.get_logger("meshca.server")

_Wire = tuple[str, str, float, str, str, float, str | None]  # an IssuanceRecord and a token hash


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
    """

    def __init__(self, path: Path, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn
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

    def issuances(
        self, spiffe_id: str | None = None, limit: int | None = None, *, newest_first: bool = False
    ) -> list[IssuanceRecord]:
        return self._reader.issuances(spiffe_id, limit, newest_first=newest_first)

    def log_records(self) -> list[LoggedRecord]:
        return self._reader.log_records()

    def log_checkpoints(self) -> list[Checkpoint]:
        return self._reader.log_checkpoints()

    def record(self, record: IssuanceRecord, *, token_hash: str | None = None) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((_to_wire(record, token_hash), future))
        return future

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
                outcomes: list[str | None] = self._conn.recv()
            except (OSError, EOFError) as exc:
                _fail(futures, StoreError(f"store writer is gone: {exc}"))
                continue
            if len(outcomes) != len(futures):
                _fail(futures, StoreError("store writer answered out of step"))
                continue
            for future, outcome in zip(futures, outcomes, strict=True):
                if outcome is None:
                    future.set_result(None)
                elif outcome == "used_up":
                    future.set_exception(TokenUsedUp("join token has no use left"))
                else:
                    future.set_exception(StoreError(outcome))

    def close(self) -> None:
        self._queue.put(None)
        self._sender.join(timeout=10)
        self._receiver.join(timeout=10)
        self._reader.close()


def _fail(futures: list[concurrent.futures.Future[None]], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


def _serve_pipe(store: SqliteStore, conn: multiprocessing.connection.Connection, name: str) -> None:
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
        answer = [
            None if outcome is None else "used_up" if isinstance(outcome, TokenUsedUp) else str(outcome)
            for outcome in outcomes
        ]
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
    conn: multiprocessing.connection.Connection,
    parent: int,
    index: int,
    started: Any,  # a multiprocessing Event
    last_good: _Files | None,
) -> None:
    """Entry point of one serving process (started with the 'spawn' method)."""
    _die_with_parent(parent)
    from meshca.server._app import IdentityServer, store_path
    from meshca.server._logging import configure_logging

    configure_logging()
    structlog.contextvars.bind_contextvars(worker=index)

    async def serve() -> None:
        store = PipeStore(Path(store_path(TrustDir.at(config.dir))), conn)
        try:
            fallback = _issuer_from(last_good, config.passphrase) if last_good is not None else None
            server = IdentityServer(config, store=store, last_good=fallback, multiprocess_metrics=True)

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
    from meshca.server._app import _split_hostport, store_path

    host, port = _split_hostport(config.listen)
    port, held = claim(host, port, what="gRPC", hold=True)
    metrics_dir = ""
    metrics_server = None
    store = None
    procs: dict[int, tuple[multiprocessing.process.BaseProcess, Any]] = {}
    try:
        last_good = _LastGood(TrustDir.at(config.dir), config.passphrase, clock)
        metrics_dir = tempfile.mkdtemp(prefix="meshca-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        metrics_server = _metrics_server(config, metrics_dir, procs)
        # commit_now only: the supervisor batches its workers' records itself
        store = SqliteStore(
            store_path(TrustDir.at(config.dir)), writer=False, log_key=log_key, clock=clock
        )  # commit_now
        listen = f"{config.listen.rpartition(':')[0]}:{port}"
        return _supervise(
            config,
            replace(config, listen=listen, metrics_listen=None, reuse_port=True),
            workers,
            store,
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
    store: SqliteStore,
    last_good: _LastGood,
    metrics_dir: str,
    metrics_server: MetricsServer | None,
    procs: dict[int, tuple[multiprocessing.process.BaseProcess, Any]],
) -> int:
    from prometheus_client import multiprocess

    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    restarts: dict[int, float] = {}

    def start(index: int) -> None:
        parent_end, child_end = ctx.Pipe()
        started = ctx.Event()
        proc = ctx.Process(
            target=_worker_main,
            args=(worker_config, child_end, os.getpid(), index, started, last_good.files),
            name=f"meshca-worker-{index}",
        )
        proc.start()
        child_end.close()
        threading.Thread(target=_serve_pipe, args=(store, parent_end, f"{index}"), daemon=True).start()
        procs[index] = (proc, started)

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(workers):
        start(index)
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
    config: ServerConfig, metrics_dir: str, procs: dict[int, tuple[multiprocessing.process.BaseProcess, Any]]
) -> MetricsServer | None:
    if not config.metrics_listen:
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from meshca.server._app import _split_hostport

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]

    def ready() -> bool:
        # Ready while a worker serves and every live one holds a usable issuer: the
        # meshca_issuer_usable gauge each worker keeps, least over live workers.
        if not any(proc.is_alive() and started.is_set() for proc, started in list(procs.values())):
            return False
        usable = [s.value for m in registry.collect() if m.name == "meshca_issuer_usable" for s in m.samples]
        return bool(usable) and min(usable) == 1

    host, port = _split_hostport(config.metrics_listen)
    server = MetricsServer(registry, host, port, ready)
    server.start()
    return server
