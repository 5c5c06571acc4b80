"""`meshca serve --workers N`: several serving processes on one port, one store writer.

Python runs one thread of Python at a time per process, so meshca scales
issuance across cores with processes. The supervisor (the process the
operator started):

- binds nothing itself; each worker binds the gRPC port with SO_REUSEPORT
  and the kernel spreads connections across them;
- owns the SQLite store: workers send their issuance records (and join
  token uses) over a pipe in batches, the supervisor commits them, many
  per transaction, and answers; a worker sends a response only after its
  record's batch committed. One writer means no cross-process lock
  contention (SQLite's busy waits), and the token-use check stays atomic;
- serves /metrics (Prometheus multiprocess mode, summed over workers),
  /livez and /readyz;
- restarts a worker that dies, forwards SIGTERM so every worker drains,
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
import socket
import tempfile
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from meshca.pki._errors import StoreError, TokenUsedUp
from meshca.pki._time import Clock, system_clock
from meshca.pki._trustdir import TrustDir
from meshca.server._config import ServerConfig
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


def _worker_main(
    config: ServerConfig,
    conn: multiprocessing.connection.Connection,
    parent: int,
    index: int,
    started: Any,  # a multiprocessing Event
) -> None:
    """Entry point of one serving process (started with the 'spawn' method)."""
    _die_with_parent(parent)
    from meshca.pki._errors import MeshcaError
    from meshca.server._app import IdentityServer, store_path
    from meshca.server._logging import configure_logging

    configure_logging()
    structlog.contextvars.bind_contextvars(worker=index)

    async def serve() -> None:
        store = PipeStore(Path(store_path(TrustDir.at(config.dir))), conn)
        try:
            server = IdentityServer(config, store=store, multiprocess_metrics=True)

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


def _reserve_port(listen: str) -> tuple[str, socket.socket | None]:
    """For port 0, picks a port now (held with SO_REUSEPORT until the workers bind it)."""
    host, _, port = listen.rpartition(":")
    if port != "0":
        return listen, None
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((bare or "0.0.0.0", 0))
    return f"{host}:{sock.getsockname()[1]}", sock


_MAX_RESTART_DELAY = 30.0


def run_supervisor(config: ServerConfig, workers: int, *, clock: Clock = system_clock) -> int:
    """Runs ``workers`` serving processes until SIGTERM or SIGINT; returns the exit code.

    A worker that dies before it serves makes the whole server exit 1 (its
    reason is in its log line): a broken configuration fails once, loudly.
    A worker that dies later is restarted, with backoff.
    """
    from prometheus_client import multiprocess

    from meshca.server._app import store_path

    tdir = TrustDir.at(config.dir)
    metrics_dir = tempfile.mkdtemp(prefix="meshca-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    listen, held = _reserve_port(config.listen)
    worker_config = replace(config, listen=listen, metrics_listen=None, reuse_port=True)
    store = SqliteStore(store_path(tdir), writer=False)  # commit_now only
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    procs: dict[int, tuple[multiprocessing.process.BaseProcess, Any]] = {}
    restarts: dict[int, float] = {}

    def start(index: int) -> None:
        parent_end, child_end = ctx.Pipe()
        started = ctx.Event()
        proc = ctx.Process(
            target=_worker_main,
            args=(worker_config, child_end, os.getpid(), index, started),
            name=f"meshca-worker-{index}",
        )
        proc.start()
        child_end.close()
        threading.Thread(target=_serve_pipe, args=(store, parent_end, f"{index}"), daemon=True).start()
        procs[index] = (proc, started)

    for index in range(workers):
        start(index)
    metrics_server = _start_metrics(config, tdir, metrics_dir, clock)

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "supervisor.started",
        workers=workers,
        listen=listen,
        metrics_port=metrics_server.port if metrics_server is not None else None,
    )
    code = 0
    try:
        while not stopping.wait(0.5):
            if held is not None and all(started.is_set() for _, started in procs.values()):
                held.close()
                held = None
            for index, (proc, started) in list(procs.items()):
                if proc.is_alive() or stopping.is_set():
                    continue
                if proc.pid is not None:
                    multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
                if not started.is_set():
                    log.error("supervisor.failed", worker=index, exitcode=proc.exitcode)
                    code = 1
                    stopping.set()
                    break
                delay = min(_MAX_RESTART_DELAY, restarts.get(index, 0.5) * 2)
                restarts[index] = delay
                log.error("worker.died", worker=index, exitcode=proc.exitcode, restart_in=delay)
                if stopping.wait(delay):
                    break
                start(index)
    finally:
        if held is not None:
            held.close()
        for proc, _ in procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc, _ in procs.values():
            proc.join(timeout=config.drain_grace.total_seconds() + 5)
            if proc.is_alive():
                proc.kill()
        if metrics_server is not None:
            metrics_server.stop()
        store.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("supervisor.stopped")
    return code


def _start_metrics(config: ServerConfig, tdir: TrustDir, metrics_dir: str, clock: Clock) -> Any:
    if not config.metrics_listen:
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from meshca.server._app import _split_hostport
    from meshca.server._metrics import MetricsServer
    from meshca.server._state import file_stamp

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    paths = (tdir.issuer_cert, tdir.issuer_key, tdir.bundle)
    loaded: dict[object, Any] = {}  # the issuers of the last two versions of the files

    def ready() -> bool:
        # Ready while the issuer on disk can sign now (what every worker checks too), or, while
        # it is staged ahead of its NotBefore, the one before it (which the workers keep serving);
        # the issuer is loaded again only when its files change.
        try:
            stamp = file_stamp(paths)
            if stamp not in loaded:
                issuer = tdir.load_issuer(passphrase=config.passphrase)
                for old in list(loaded)[:-1]:
                    del loaded[old]
                loaded[stamp] = issuer
            now = clock()
            issuer = loaded[stamp]
            if now < issuer.not_before and len(loaded) == 2:
                issuer = next(iter(loaded.values()))
            issuer.check(now)
        except Exception:  # noqa: BLE001 - anything wrong means not ready
            return False
        return True

    ready()  # loads the issuer the workers start with, to fall back on while a next one is staged
    host, port = _split_hostport(config.metrics_listen)
    server = MetricsServer(registry, host, port, ready)
    server.start()
    return server
