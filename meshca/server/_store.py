"""State store: join tokens and the issuance log.

One small interface (`Store`) with SQLite behind it by default. Writes go
through a single writer thread that commits many requests per transaction
(group commit): a request's response is sent only after the transaction
holding its record has committed, so no issued certificate is ever missing
from the log, and a burst of requests costs one fsync instead of one each.

A join token's use is consumed in the same transaction as the issuance it
pays for: if another replica used the last use first, the issuance is not
recorded and its certificate is never returned.

`open_store` picks the store from ``--store URL``: SQLite here, PostgreSQL in
`_store_pg`. Both record their schema version and migrate at open (see
docs/architecture.md, Store contract).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

from meshca.pki._errors import StoreError, TokenUsedUp
from meshca.pki._spiffe import SpiffeId
from meshca.server._metrics import StoreMetrics

__all__ = [
    "DuplicateSerial",
    "IssuanceRecord",
    "JoinToken",
    "SqliteStore",
    "Store",
    "hash_token",
    "new_token",
    "open_store",
    "sqlite_path",
]

TOKEN_PREFIX = "mtok_"  # noqa: S105 - a prefix that marks join tokens, not a secret


def new_token() -> str:
    """A random join token: 32 bytes, URL-safe, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The only form in which a token is stored or logged (logs show a prefix of it)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class JoinToken:
    token_hash: str
    spiffe_id: SpiffeId
    expires_at: datetime
    uses_left: int


@dataclass(frozen=True, slots=True)
class IssuanceRecord:
    serial: str  # hex
    spiffe_id: str
    not_after: datetime
    principal: str
    api: str
    issued_at: datetime


class Store(Protocol):
    """What the issuance pipeline needs of a store (docs/architecture.md, Store contract)."""

    def add_token(self, token: JoinToken) -> None: ...
    def get_token(self, token_hash: str) -> JoinToken | None: ...
    def record(self, record: IssuanceRecord, *, token_hash: str | None = None) -> concurrent.futures.Future[None]: ...
    def issuances(
        self, spiffe_id: str | None = None, limit: int | None = None, *, newest_first: bool = False
    ) -> list[IssuanceRecord]: ...
    def check(self) -> None: ...
    def close(self) -> None: ...


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def schema_too_new(found: int, known: int) -> StoreError:
    return StoreError(f"store schema version {found} is newer than this meshca (knows {known}): upgrade meshca")


def sqlite_path(url: str | None, directory: Path) -> Path | None:
    """The SQLite file ``url`` names (None: ``DIR/meshca.db``); None for a PostgreSQL URL.

    The URL is never echoed in an error: it may hold a password.
    """
    if not url:
        return Path(directory) / "meshca.db"
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("postgresql", "postgres"):
        return None
    if sep and scheme.lower() == "sqlite" and rest.startswith("/"):
        return Path(rest)
    raise StoreError("store URL must start with postgresql://, postgres:// or sqlite:/// (an absolute path)")


def open_store(url: str | None, directory: Path, *, writer: bool = True, metrics: StoreMetrics | None = None) -> Store:
    """The store ``--store URL`` (or ``MESHCA_STORE``) names; None: SQLite at ``DIR/meshca.db``.

    ``postgresql://`` and ``postgres://`` URLs are libpq's (the password may
    also come from PGPASSWORD or a passfile); ``sqlite:///ABSOLUTE/PATH`` names
    a SQLite file.
    """
    path = sqlite_path(url, directory)
    if path is not None:
        return SqliteStore(path, writer=writer, metrics=metrics)
    from meshca.server._store_pg import PostgresStore  # psycopg is loaded only for PostgreSQL

    assert url is not None
    return PostgresStore(url, writer=writer, metrics=metrics)


# SQLite keeps its schema version in PRAGMA user_version (0: a store from before
# versions were recorded, whose tables _SCHEMA creates if missing).
# _SQLITE_MIGRATIONS[n] takes a store from version n to n + 1.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS join_tokens (
    token_hash TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    uses_left INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS issuances (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    not_after REAL NOT NULL,
    principal TEXT NOT NULL,
    api TEXT NOT NULL,
    issued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS issuances_by_id ON issuances (spiffe_id, issued_at);
"""
_SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (tuple(s.strip() for s in _SCHEMA.split(";") if s.strip()),)
SQLITE_SCHEMA_VERSION = len(_SQLITE_MIGRATIONS)

_Item = tuple[IssuanceRecord, str | None, concurrent.futures.Future[None]]
Batch = Sequence[tuple[IssuanceRecord, str | None]]  # records to commit in one transaction, with token hashes
_MAX_BATCH = 512
T = TypeVar("T")


def next_batch(source: queue.SimpleQueue[T | None], limit: int = _MAX_BATCH) -> list[T] | None:
    """Blocks for one item, then takes whatever else is queued, up to ``limit``: one group commit's worth.

    None in the queue means "stop": it ends the stream (after the items before it,
    which come back as the last batch).
    """
    first = source.get()
    if first is None:
        return None
    batch = [first]
    while len(batch) < limit:
        try:
            item = source.get_nowait()
        except queue.Empty:
            break
        if item is None:
            source.put(None)  # seen again by the next call, which ends the stream
            break
        batch.append(item)
    return batch


class GroupCommitter:
    """A store's writer thread: commits whatever is queued, up to `_MAX_BATCH` records, in one transaction.

    ``commit`` takes a batch and returns one outcome per record (None: committed).
    """

    def __init__(self, commit: Callable[[Batch], list[StoreError | None]]) -> None:
        self._commit = commit
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="meshca-store-writer", daemon=True)
        self._thread.start()

    def record(self, record: IssuanceRecord, token_hash: str | None) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((record, token_hash, future))
        return future

    def _loop(self) -> None:
        while (batch := next_batch(self._queue)) is not None:
            try:
                outcomes = self._commit([(record, token_hash) for record, token_hash, _ in batch])
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one batch
                outcomes = [StoreError(f"cannot record issuance: {exc}")] * len(batch)
            for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                if outcome is None:
                    future.set_result(None)
                else:
                    future.set_exception(outcome)

    def close(self) -> None:
        """Commits what is queued, then stops."""
        self._queue.put(None)
        self._thread.join()


class DuplicateSerial(StoreError):
    """A record refused because its serial is already logged: the store itself is fine."""


def duplicate_serial(record: IssuanceRecord) -> StoreError:
    return DuplicateSerial(f"serial {record.serial} is already in the issuance log")


class SqliteStore:
    """SQLite in WAL mode, synchronous=FULL; safe to share between processes on one machine."""

    def __init__(self, path: str | Path, *, writer: bool = True, metrics: StoreMetrics | None = None) -> None:
        self.path = Path(path)
        self._metrics = metrics or StoreMetrics()
        try:
            self._read = self._connect()
            self._migrate(self._read)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._read_lock = threading.Lock()
        self._direct: sqlite3.Connection | None = None
        self._direct_lock = threading.Lock()
        self._writer: GroupCommitter | None = None
        if writer:
            conn = self._connect()
            self._writer_conn = conn
            self._writer = GroupCommitter(lambda items: self._apply(conn, items))

    @classmethod
    def reader(cls, path: str | Path) -> SqliteStore:
        """A store for reads only (token lookups, the log); `record` is not available."""
        return cls(path, writer=False)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Brings the schema to this meshca's version, under SQLite's write lock (other processes wait)."""
        if conn.execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SQLITE_SCHEMA_VERSION:
                raise schema_too_new(found, SQLITE_SCHEMA_VERSION)
            for step in _SQLITE_MIGRATIONS[found:]:
                for statement in step:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SQLITE_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def check(self) -> None:
        """Raises `StoreError` unless the store can write now (for readiness).

        A query is not enough: a full disk still answers reads. This rewrites the
        schema version with its own value, a one-page commit that changes nothing.
        """
        with self._read_lock, self._metrics.timed("check"):
            conn = self._read
            try:
                conn.execute("BEGIN IMMEDIATE")
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                self._metrics.error("check", exc)
                raise StoreError(f"store {self.path} cannot write: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    # -- tokens

    def add_token(self, token: JoinToken) -> None:
        with self._read_lock, self._metrics.timed("add_token"):
            try:
                self._read.execute(
                    "INSERT INTO join_tokens VALUES (?, ?, ?, ?)",
                    (token.token_hash, str(token.spiffe_id), _ts(token.expires_at), token.uses_left),
                )
            except sqlite3.Error as exc:
                self._metrics.error("add_token", exc)
                raise StoreError(f"cannot store join token: {exc}") from exc

    def get_token(self, token_hash: str) -> JoinToken | None:
        with self._read_lock, self._metrics.timed("get_token"):
            try:
                row = self._read.execute(
                    "SELECT spiffe_id, expires_at, uses_left FROM join_tokens WHERE token_hash = ?", (token_hash,)
                ).fetchone()
            except sqlite3.Error as exc:
                self._metrics.error("get_token", exc)
                raise StoreError(f"cannot read join token: {exc}") from exc
        if row is None:
            return None
        return JoinToken(token_hash, SpiffeId.parse(row[0]), _dt(row[1]), row[2])

    # -- issuance log

    def record(self, record: IssuanceRecord, *, token_hash: str | None = None) -> concurrent.futures.Future[None]:
        """Queues ``record`` (and one use of the token) for the next group commit.

        The future resolves once the record is durable, or fails with
        `TokenUsedUp` or `StoreError`.
        """
        if self._writer is None:
            raise StoreError("this store was opened for reading only")
        return self._writer.record(record, token_hash)

    def issuances(
        self, spiffe_id: str | None = None, limit: int | None = None, *, newest_first: bool = False
    ) -> list[IssuanceRecord]:
        """The log in issuance order (``newest_first``: reversed); ``limit`` keeps the first records of that order."""
        sql = "SELECT serial, spiffe_id, not_after, principal, api, issued_at FROM issuances"
        params: list[object] = []
        if spiffe_id is not None:
            sql += " WHERE spiffe_id = ?"
            params.append(spiffe_id)
        sql += " ORDER BY issued_at DESC, rowid DESC" if newest_first else " ORDER BY issued_at, rowid"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._read_lock, self._metrics.timed("issuances"):
            try:
                rows = self._read.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                self._metrics.error("issuances", exc)
                raise StoreError(f"cannot read the issuance log: {exc}") from exc
        return [IssuanceRecord(r[0], r[1], _dt(r[2]), r[3], r[4], _dt(r[5])) for r in rows]

    def commit_now(self, items: Sequence[tuple[IssuanceRecord, str | None]]) -> list[StoreError | None]:
        """Commits ``items`` in one transaction on the calling thread; one outcome per item.

        For a caller that already groups records (the supervisor of several
        workers): no writer-thread hop, no future per record.
        """
        with self._direct_lock:
            if self._direct is None:
                self._direct = self._connect()
            return self._apply(self._direct, items)

    def _apply(
        self, conn: sqlite3.Connection, items: Sequence[tuple[IssuanceRecord, str | None]]
    ) -> list[StoreError | None]:
        self._metrics.batch.observe(len(items))
        with self._metrics.timed("commit"):
            return self._apply_timed(conn, items)

    def _apply_timed(
        self, conn: sqlite3.Connection, items: Sequence[tuple[IssuanceRecord, str | None]]
    ) -> list[StoreError | None]:
        outcomes: list[StoreError | None] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for record, token_hash in items:
                if token_hash is not None:
                    used = conn.execute(
                        "UPDATE join_tokens SET uses_left = uses_left - 1 "
                        "WHERE token_hash = ? AND uses_left > 0 AND expires_at > ?",
                        (token_hash, _ts(record.issued_at)),
                    ).rowcount
                    if used == 0:
                        outcomes.append(TokenUsedUp("join token has no use left"))
                        continue
                inserted = conn.execute(
                    "INSERT INTO issuances VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (serial) DO NOTHING",
                    (
                        record.serial,
                        record.spiffe_id,
                        _ts(record.not_after),
                        record.principal,
                        record.api,
                        _ts(record.issued_at),
                    ),
                ).rowcount
                if inserted == 0:  # refused alone, and the token use it took is given back
                    if token_hash is not None:
                        conn.execute(
                            "UPDATE join_tokens SET uses_left = uses_left + 1 WHERE token_hash = ?", (token_hash,)
                        )
                    self._metrics.errors.labels("commit", "constraint").inc()
                    outcomes.append(duplicate_serial(record))
                    continue
                outcomes.append(None)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._metrics.error("commit", exc)
            return [StoreError(f"cannot record issuance: {exc}")] * len(items)
        return outcomes

    def close(self) -> None:
        """Commits what is queued, then stops the writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer_conn.close()
        with self._read_lock:
            self._read.close()
        with self._direct_lock:
            if self._direct is not None:
                self._direct.close()
