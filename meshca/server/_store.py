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

Every store object that writes chains its records (`IssuanceChain`, a chain
of its own, so replicas need no global lock) and, given the log key, signs
checkpoints of its chain (docs/architecture.md, Issuance log).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from meshca.pki._errors import DuplicateSerial, StoreError, TokenUsedUp
from meshca.pki._keys import PrivateKey
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock, system_clock
from meshca.server._audit import (
    GENESIS,
    LEGACY,
    ChainLink,
    ChainWriter,
    Checkpoint,
    LoggedRecord,
    legacy_links,
    sign_checkpoint,
)
from meshca.server._entries import RegistrationEntry
from meshca.server._metrics import StoreMetrics

__all__ = [
    "AGENT_TOKEN_PREFIX",
    "CHECKPOINT_INTERVAL",
    "IssuanceChain",
    "IssuanceRecord",
    "IssuerCertRecord",
    "JoinToken",
    "JwtPublicKey",
    "SqliteStore",
    "Store",
    "hash_token",
    "new_token",
    "open_store",
    "sqlite_path",
]

log = structlog.get_logger("meshca.server")

TOKEN_PREFIX = "mtok_"  # noqa: S105 - a prefix that marks join tokens, not a secret
AGENT_TOKEN_PREFIX = "mtok_agent_"  # noqa: S105 - a node agent's join token (`meshca token create --agent`)


def new_token(*, agent: bool = False) -> str:
    """A random join token: 32 bytes, URL-safe, with a recognisable prefix.

    ``agent``: a node agent's token, the only kind that can grant an agent ID
    (``spiffe://TD/meshca/agent/NAME``). The prefix is part of what is hashed,
    so a stored workload token can never pass for one.
    """
    if agent:
        return AGENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
    while (token := TOKEN_PREFIX + secrets.token_urlsafe(32)).startswith(AGENT_TOKEN_PREFIX):
        pass  # one in 2**36: a workload token never looks like an agent's
    return token


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


@dataclass(frozen=True, slots=True)
class JwtPublicKey:
    """A published JWT-SVID signing key: its public JWK (JSON, with ``kid`` and ``use``), until ``not_after``."""

    kid: str
    writer: str  # the keyring (one per serving process) that holds the private half
    jwk: str
    not_after: datetime
    recorded_at: datetime


# -- issuer certificates (managed issuers): the record type


@dataclass(frozen=True, slots=True)
class IssuerCertRecord:
    """An issuer certificate a replica minted (managed mode) or loaded (file mode); ``writer`` names the replica."""

    fingerprint: str  # SHA-256 of the DER, colon-separated hex (`meshca.pki._certs.fingerprint`)
    writer: str
    anchor_fingerprint: str
    not_before: datetime
    not_after: datetime
    der: bytes = field(repr=False)
    recorded_at: datetime


class Store(Protocol):
    """What the issuance pipeline needs of a store (docs/architecture.md, Store contract)."""

    def add_token(self, token: JoinToken) -> None: ...
    def get_token(self, token_hash: str) -> JoinToken | None: ...
    def record(self, record: IssuanceRecord, *, token_hash: str | None = None) -> concurrent.futures.Future[None]: ...
    def issuances(
        self, spiffe_id: str | None = None, limit: int | None = None, *, newest_first: bool = False
    ) -> list[IssuanceRecord]: ...
    def log_records(self) -> list[LoggedRecord]: ...
    def log_checkpoints(self) -> list[Checkpoint]: ...
    def add_entry(self, entry: RegistrationEntry) -> None: ...
    def entries(self, parent: SpiffeId | None = None) -> list[RegistrationEntry]: ...
    def get_entry(self, entry_id: str) -> RegistrationEntry | None: ...
    def delete_entry(self, entry_id: str) -> bool: ...
    def publish_jwt_key(self, key: JwtPublicKey) -> None: ...
    def jwt_keys(self, now: datetime) -> list[JwtPublicKey]: ...
    # issuer certificates: recorded once per fingerprint (the first writer stays), read oldest NotBefore first
    def record_issuer(self, record: IssuerCertRecord) -> None: ...
    def issuer_certs(self) -> list[IssuerCertRecord]: ...
    def check(self) -> None: ...
    def close(self) -> None: ...


# -- registration entries and JWT keys: rows both stores share (docs/architecture.md, Agent API)

_SELECT_ENTRIES = (
    "SELECT id, spiffe_id, selectors, parent, x509_ttl, jwt_ttl, dns_names, created_at FROM registration_entries"
)


def entry_from_row(
    row: Sequence[Any], when: Callable[[Any], datetime], seconds: Callable[[Any], float]
) -> RegistrationEntry:
    """A row of `_SELECT_ENTRIES`; selectors and dns_names are JSON arrays (text in SQLite, jsonb in PostgreSQL)."""
    selectors, dns_names = (json.loads(v) if isinstance(v, str) else v for v in (row[2], row[6]))
    return RegistrationEntry(
        id=row[0],
        spiffe_id=SpiffeId.parse(row[1]),
        selectors=tuple(selectors),
        parent=SpiffeId.parse(row[3]) if row[3] else None,
        x509_ttl=timedelta(seconds=seconds(row[4])),
        jwt_ttl=timedelta(seconds=seconds(row[5])),
        dns_names=tuple(dns_names),
        created_at=when(row[7]),
    )


def parent_column(parent: SpiffeId | None) -> str:
    """The parent as stored: '' for "every agent"."""
    return str(parent) if parent is not None else ""


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


def open_store(
    url: str | None,
    directory: Path,
    *,
    writer: bool = True,
    metrics: StoreMetrics | None = None,
    log_key: PrivateKey | None = None,
    clock: Clock = system_clock,
    checkpoint_interval: timedelta | None = None,
) -> Store:
    """The store ``--store URL`` (or ``MESHCA_STORE``) names; None: SQLite at ``DIR/meshca.db``.

    ``postgresql://`` and ``postgres://`` URLs are libpq's (the password may
    also come from PGPASSWORD or a passfile); ``sqlite:///ABSOLUTE/PATH`` names
    a SQLite file. The URL is never echoed in an error: it may hold a password.
    ``log_key`` signs the checkpoints of what this store object writes.
    """
    path = sqlite_path(url, directory)
    if path is not None:
        return SqliteStore(
            path, writer=writer, metrics=metrics, log_key=log_key, clock=clock, checkpoint_interval=checkpoint_interval
        )
    from meshca.server._store_pg import PostgresStore  # psycopg is loaded only for PostgreSQL

    assert url is not None
    return PostgresStore(
        url, writer=writer, metrics=metrics, log_key=log_key, clock=clock, checkpoint_interval=checkpoint_interval
    )


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


def chain_legacy(rows: Sequence[Sequence[Any]], when: Callable[[Any], datetime]) -> list[tuple[Any, ...]]:
    """Migration to version 2: (writer, seq, prev, hash, serial) for the records of a version 1 log, in log order."""
    records = [IssuanceRecord(r[0], r[1], when(r[2]), r[3], r[4], when(r[5])) for r in rows]
    links = legacy_links(records)
    return [(ln.writer, ln.seq, ln.prev, ln.hash, r.serial) for r, ln in zip(records, links, strict=True)]


def _chain_legacy_sqlite(conn: sqlite3.Connection) -> None:
    rows = conn.execute(
        "SELECT serial, spiffe_id, not_after, principal, api, issued_at FROM issuances ORDER BY issued_at, rowid"
    ).fetchall()
    conn.executemany(
        "UPDATE issuances SET writer = ?, seq = ?, prev = ?, hash = ? WHERE serial = ?", chain_legacy(rows, _dt)
    )


_Migration = str | Callable[[sqlite3.Connection], None]
_SQLITE_MIGRATIONS: tuple[tuple[_Migration, ...], ...] = (
    tuple(s.strip() for s in _SCHEMA.split(";") if s.strip()),
    (
        "ALTER TABLE issuances ADD COLUMN writer TEXT",
        "ALTER TABLE issuances ADD COLUMN seq INTEGER",
        "ALTER TABLE issuances ADD COLUMN prev TEXT",
        "ALTER TABLE issuances ADD COLUMN hash TEXT",
        _chain_legacy_sqlite,
        "CREATE UNIQUE INDEX issuances_chain ON issuances (writer, seq)",
        """CREATE TABLE log_checkpoints (
            writer TEXT NOT NULL,
            seq INTEGER NOT NULL,
            head TEXT NOT NULL,
            at REAL NOT NULL,
            signature BLOB NOT NULL,
            PRIMARY KEY (writer, seq)
        )""",
    ),
    (
        # Version 3: what managed issuers and the node agent share between replicas.
        # Every issuer certificate a replica minted or loaded (writer: the replica).
        """CREATE TABLE issuer_certs (
            fingerprint TEXT PRIMARY KEY,
            writer TEXT NOT NULL,
            anchor_fingerprint TEXT NOT NULL,
            not_before REAL NOT NULL,
            not_after REAL NOT NULL,
            der BLOB NOT NULL,
            recorded_at REAL NOT NULL
        )""",
        # Registration entries: selectors and dns_names are JSON arrays (selectors sorted); parent '' is any agent.
        """CREATE TABLE registration_entries (
            id TEXT PRIMARY KEY,
            spiffe_id TEXT NOT NULL,
            selectors TEXT NOT NULL,
            parent TEXT NOT NULL,
            x509_ttl REAL NOT NULL,
            jwt_ttl REAL NOT NULL,
            dns_names TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX registration_entries_by_parent ON registration_entries (parent)",
        # Public JWT-SVID signing keys (JWK JSON), published until not_after.
        """CREATE TABLE jwt_keys (
            kid TEXT PRIMARY KEY,
            writer TEXT NOT NULL,
            jwk TEXT NOT NULL,
            not_after REAL NOT NULL,
            recorded_at REAL NOT NULL
        )""",
    ),
)
SQLITE_SCHEMA_VERSION = len(_SQLITE_MIGRATIONS)

# The head of an unsigned legacy chain (writer LEGACY): the first store object with the key seals it.
UNSIGNED_LEGACY_QUERY = (
    "SELECT seq, hash FROM issuances WHERE writer = 'legacy'"
    " AND NOT EXISTS (SELECT 1 FROM log_checkpoints WHERE writer = 'legacy') ORDER BY seq DESC LIMIT 1"
)


def logged_record(row: Sequence[Any], when: Callable[[Any], datetime]) -> LoggedRecord:
    """A row of (serial, spiffe_id, not_after, principal, api, issued_at, writer, seq, prev, hash).

    Chain fields are NULL only in a row written by hand: it reads as writer "", which never signed.
    """
    record = IssuanceRecord(row[0], row[1], when(row[2]), row[3], row[4], when(row[5]))
    return LoggedRecord(record, ChainLink(row[6] or "", row[7] or 0, row[8] or "", row[9] or ""))


def logged_checkpoint(row: Sequence[Any], when: Callable[[Any], datetime]) -> Checkpoint:
    return Checkpoint(row[0], row[1], row[2], when(row[3]), bytes(row[4]))


CHECKPOINT_INTERVAL = timedelta(seconds=10)


class IssuanceChain:
    """A writing store object's own chain in the issuance log, and the checkpoints it signs.

    A transaction that appends holds ``lock`` from its first link to its
    commit, so links follow commit order. With the log key, a first
    checkpoint (seq 0) is signed at once, then one every ``interval`` while
    the head moved, and one at `close`; ``save`` writes a checkpoint row, and
    each is logged as ``log.checkpoint``: the copy outside the store
    (docs/architecture.md, Issuance log).
    """

    def __init__(
        self,
        key: PrivateKey | None,
        save: Callable[[Checkpoint], None],
        *,
        clock: Clock,
        interval: timedelta | None,
        legacy_head: tuple[int, str] | None = None,
    ) -> None:
        self.writer = ChainWriter()
        self.lock = threading.Lock()
        self.stale = False  # a transaction failed: its outcome may be unknown, so the head is read back
        self._key = key
        self._save = save
        self._clock = clock
        self._signed = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if key is None:
            return
        if legacy_head is not None:
            self._sign(LEGACY, *legacy_head)
        self.checkpoint()
        seconds = (interval or CHECKPOINT_INTERVAL).total_seconds()
        self._thread = threading.Thread(target=self._loop, args=(seconds,), name="meshca-log-checkpoints", daemon=True)
        self._thread.start()

    def begin(self, newest: Callable[[str], tuple[int, str] | None]) -> None:
        """Inside a transaction, before the first link: after a failed one, the head is read back."""
        if self.stale:
            self.writer.resume(*(newest(self.writer.writer) or (0, GENESIS)))
            self.stale = False

    def checkpoint(self) -> None:
        """Signs and saves the head if it moved since the last checkpoint."""
        if self._key is None:
            return
        with self.lock:
            if self.stale or self.writer.seq == self._signed:
                return
            self._sign(self.writer.writer, self.writer.seq, self.writer.head)
            self._signed = self.writer.seq

    def _sign(self, writer: str, seq: int, head: str) -> None:
        assert self._key is not None
        checkpoint = sign_checkpoint(self._key, writer, seq, head, self._clock())
        self._save(checkpoint)
        # The opening checkpoint (seq 0, the genesis head) protects no record: it need not reach the
        # operator's log, and a start that fails right after opening the store stays one line.
        (log.debug if seq == 0 else log.info)(
            "log.checkpoint",
            writer=writer,
            seq=seq,
            head=head,
            at=checkpoint.at.isoformat(),
            signature=checkpoint.signature.hex(),
        )

    def _loop(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self._checkpoint_logged()

    def _checkpoint_logged(self) -> None:
        try:
            self.checkpoint()
        except StoreError as exc:  # the next one covers these records too
            log.warning("log.checkpoint_failed", writer=self.writer.writer, reason=str(exc))

    def close(self) -> None:
        """Stops the timer and signs the final head; call it after the store's last commit."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._checkpoint_logged()


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


def duplicate_serial(record: IssuanceRecord) -> StoreError:
    return DuplicateSerial(f"serial {record.serial} is already in the issuance log")


def _create_private(path: Path) -> None:
    """Creates the database file 0600 whatever the umask (it holds token hashes); -wal and -shm get its mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class WritingStore:
    """What both stores share: records go to their group-commit writer (None: opened for reading only)."""

    _writer: GroupCommitter | None = None

    def record(self, record: IssuanceRecord, *, token_hash: str | None = None) -> concurrent.futures.Future[None]:
        """Queues ``record`` (and one use of the token) for the next group commit.

        The future resolves once the record is durable, or fails with
        `TokenUsedUp` or `StoreError`.
        """
        if self._writer is None:
            raise StoreError("this store was opened for reading only")
        return self._writer.record(record, token_hash)


class SqliteStore(WritingStore):
    """SQLite in WAL mode, synchronous=FULL; safe to share between processes on one machine.

    ``log_key`` signs checkpoints of the records this object writes (see `IssuanceChain`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        writer: bool = True,
        metrics: StoreMetrics | None = None,
        log_key: PrivateKey | None = None,
        clock: Clock = system_clock,
        checkpoint_interval: timedelta | None = None,
    ) -> None:
        self.path = Path(path)
        self._metrics = metrics or StoreMetrics()
        try:
            _create_private(self.path)
            self._read = self._connect()
            self._migrate(self._read)
            legacy = self._read.execute(UNSIGNED_LEGACY_QUERY).fetchone() if log_key is not None else None
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._read_lock = threading.Lock()
        try:
            self._chain = IssuanceChain(
                log_key, self._save_checkpoint, clock=clock, interval=checkpoint_interval, legacy_head=legacy
            )
        except StoreError:
            self._read.close()
            raise
        self._direct: sqlite3.Connection | None = None
        self._direct_lock = threading.Lock()
        self._writer = None
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
                    if callable(statement):
                        statement(conn)
                    else:
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

    # -- registration entries and JWT keys

    def _execute(self, op: str, what: str, sql: str, params: Sequence[object] = ()) -> list[Any]:
        with self._read_lock, self._metrics.timed(op):
            try:
                cur = self._read.execute(sql, params)
                return cur.fetchall() if cur.description is not None else [cur.rowcount]
            except sqlite3.Error as exc:
                self._metrics.error(op, exc)
                raise StoreError(f"cannot {what}: {exc}") from exc

    def add_entry(self, entry: RegistrationEntry) -> None:
        self._execute(
            "add_entry",
            "store the registration entry",
            "INSERT INTO registration_entries (id, spiffe_id, selectors, parent, x509_ttl, jwt_ttl, dns_names,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.id,
                str(entry.spiffe_id),
                json.dumps(list(entry.selectors)),
                parent_column(entry.parent),
                entry.x509_ttl.total_seconds(),
                entry.jwt_ttl.total_seconds(),
                json.dumps(list(entry.dns_names)),
                _ts(entry.created_at),
            ),
        )

    def entries(self, parent: SpiffeId | None = None) -> list[RegistrationEntry]:
        """Every entry (oldest first); with ``parent``, those that agent may serve (its own and those of no parent)."""
        sql = _SELECT_ENTRIES + " WHERE ? IS NULL OR parent = ? OR parent = '' ORDER BY created_at, id"
        who = str(parent) if parent is not None else None
        rows = self._execute("entries", "read registration entries", sql, (who, who))
        return [entry_from_row(r, _dt, float) for r in rows]

    def get_entry(self, entry_id: str) -> RegistrationEntry | None:
        sql = _SELECT_ENTRIES + " WHERE id = ?"
        rows = self._execute("get_entry", "read the registration entry", sql, (entry_id,))
        return entry_from_row(rows[0], _dt, float) if rows else None

    def delete_entry(self, entry_id: str) -> bool:
        """True when the entry existed."""
        sql = "DELETE FROM registration_entries WHERE id = ?"
        return bool(self._execute("delete_entry", "delete the registration entry", sql, (entry_id,))[0])

    def publish_jwt_key(self, key: JwtPublicKey) -> None:
        """Records (or extends) a public key; keys whose not_after passed are dropped on the way."""
        with self._read_lock, self._metrics.timed("publish_jwt_key"):
            try:
                self._read.execute("BEGIN IMMEDIATE")
                self._read.execute("DELETE FROM jwt_keys WHERE not_after <= ?", (_ts(key.recorded_at),))
                self._read.execute(
                    "INSERT INTO jwt_keys (kid, writer, jwk, not_after, recorded_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (kid) DO UPDATE SET not_after = excluded.not_after",
                    (key.kid, key.writer, key.jwk, _ts(key.not_after), _ts(key.recorded_at)),
                )
                self._read.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._read.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._read.execute("ROLLBACK")
                self._metrics.error("publish_jwt_key", exc)
                raise StoreError(f"cannot publish a JWT signing key: {exc}") from exc

    def jwt_keys(self, now: datetime) -> list[JwtPublicKey]:
        """Every key published and not past its not_after at ``now``, oldest first."""
        sql = "SELECT kid, writer, jwk, not_after, recorded_at FROM jwt_keys WHERE not_after > ? ORDER BY recorded_at"
        rows = self._execute("jwt_keys", "read JWT signing keys", sql, (_ts(now),))
        return [JwtPublicKey(r[0], r[1], r[2], _dt(r[3]), _dt(r[4])) for r in rows]

    # -- issuance log

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

    def log_records(self) -> list[LoggedRecord]:
        """Every record with its chain fields, for `meshca log verify`."""
        rows = self._read_all(
            "log_records",
            "SELECT serial, spiffe_id, not_after, principal, api, issued_at, writer, seq, prev, hash"
            " FROM issuances ORDER BY rowid",
        )
        return [logged_record(row, _dt) for row in rows]

    def log_checkpoints(self) -> list[Checkpoint]:
        rows = self._read_all("log_checkpoints", "SELECT writer, seq, head, at, signature FROM log_checkpoints")
        return [logged_checkpoint(row, _dt) for row in rows]

    def _read_all(self, op: str, sql: str) -> list[Any]:
        with self._read_lock, self._metrics.timed(op):
            try:
                return self._read.execute(sql).fetchall()
            except sqlite3.Error as exc:
                self._metrics.error(op, exc)
                raise StoreError(f"cannot read the issuance log: {exc}") from exc

    # -- issuer certificates

    def record_issuer(self, record: IssuerCertRecord) -> None:
        """Records an issuer certificate (a second record of the same one changes nothing).

        Rare and small: written on the reading connection, not through the group commit.
        """
        with self._read_lock, self._metrics.timed("record_issuer"):
            try:
                self._read.execute(
                    "INSERT INTO issuer_certs VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO NOTHING",
                    (
                        record.fingerprint,
                        record.writer,
                        record.anchor_fingerprint,
                        _ts(record.not_before),
                        _ts(record.not_after),
                        record.der,
                        _ts(record.recorded_at),
                    ),
                )
            except sqlite3.Error as exc:
                self._metrics.error("record_issuer", exc)
                raise StoreError(f"cannot record issuer certificate: {exc}") from exc

    def issuer_certs(self) -> list[IssuerCertRecord]:
        rows = self._read_all(
            "issuer_certs",
            "SELECT fingerprint, writer, anchor_fingerprint, not_before, not_after, der, recorded_at"
            " FROM issuer_certs ORDER BY not_before, fingerprint",
        )
        return [IssuerCertRecord(r[0], r[1], r[2], _dt(r[3]), _dt(r[4]), bytes(r[5]), _dt(r[6])) for r in rows]

    def _save_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._read_lock, self._metrics.timed("checkpoint"):
            try:
                self._read.execute(
                    "INSERT INTO log_checkpoints VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (checkpoint.writer, checkpoint.seq, checkpoint.head, _ts(checkpoint.at), checkpoint.signature),
                )
            except sqlite3.Error as exc:
                self._metrics.error("checkpoint", exc)
                raise StoreError(f"cannot store a log checkpoint: {exc}") from exc

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
        with self._chain.lock:
            return self._apply_chained(conn, items)

    def _apply_chained(
        self, conn: sqlite3.Connection, items: Sequence[tuple[IssuanceRecord, str | None]]
    ) -> list[StoreError | None]:
        outcomes: list[StoreError | None] = []
        chain = self._chain
        last: ChainLink | None = None  # the link of the last record kept: a refused record takes none
        try:
            conn.execute("BEGIN IMMEDIATE")
            chain.begin(
                lambda writer: conn.execute(
                    "SELECT seq, hash FROM issuances WHERE writer = ? ORDER BY seq DESC LIMIT 1", (writer,)
                ).fetchone()
            )
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
                link = chain.writer.link(record, last)
                inserted = conn.execute(
                    "INSERT INTO issuances (serial, spiffe_id, not_after, principal, api, issued_at,"
                    " writer, seq, prev, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (serial) DO NOTHING",
                    (
                        record.serial,
                        record.spiffe_id,
                        _ts(record.not_after),
                        record.principal,
                        record.api,
                        _ts(record.issued_at),
                        link.writer,
                        link.seq,
                        link.prev,
                        link.hash,
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
                last = link
                outcomes.append(None)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            chain.stale = True
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._metrics.error("commit", exc)
            return [StoreError(f"cannot record issuance: {exc}")] * len(items)
        if last is not None:
            chain.writer.commit(last)
        return outcomes

    def close(self) -> None:
        """Commits what is queued, then stops the writer."""
        if self._writer is not None:
            self._writer.close()
        self._chain.close()
        if self._writer is not None:
            self._writer_conn.close()
        with self._read_lock:
            self._read.close()
        with self._direct_lock:
            if self._direct is not None:
                self._direct.close()
