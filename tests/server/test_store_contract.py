"""The store contract (docs/architecture.md, Store contract), the same tests on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from meshca import SpiffeId, StoreError, generate_key
from meshca.server._audit import GENESIS, record_hash, verify_log
from meshca.server._metrics import StoreMetrics
from meshca.server._store import (
    SQLITE_SCHEMA_VERSION,
    IssuanceRecord,
    IssuerCertRecord,
    JoinToken,
    Store,
    TokenUsedUp,
    hash_token,
    new_token,
    open_store,
)
from meshca.server._store_pg import PG_SCHEMA_VERSION

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
WORKLOAD = "spiffe://example.org/ns/default/sa/web"


def rec(spiffe_id: str = WORKLOAD, at: datetime = NOW, serial: str | None = None) -> IssuanceRecord:
    serial = serial or secrets.token_hex(16)
    return IssuanceRecord(serial, spiffe_id, at + timedelta(hours=24), "principal", "native", at)


def token(uses: int = 1, expires_at: datetime = NOW + timedelta(hours=1)) -> JoinToken:
    return JoinToken(hash_token(new_token()), SpiffeId.parse(WORKLOAD), expires_at, uses)


class Backend:
    """One kind of store: opens store objects on one database and reaches under them for the tests."""

    known: int
    url: str

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.opened: list[Store] = []

    def open(self, **kwargs: Any) -> Store:
        store = open_store(self.url, self.tmp, **kwargs)
        self.opened.append(store)
        return store

    def set_schema_version(self, version: int) -> None:
        raise NotImplementedError

    def block_writes(self) -> contextlib.AbstractContextManager[None]:
        """While open, a commit of the issuance log waits (another connection holds a lock)."""
        raise NotImplementedError


class SqliteBackend(Backend):
    known = SQLITE_SCHEMA_VERSION

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.path = tmp / "meshca.db"
        self.url = f"sqlite://{self.path}"

    def set_schema_version(self, version: int) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            conn.execute(f"PRAGMA user_version = {version}")

    def schema_version(self) -> int:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    @contextlib.contextmanager
    def block_writes(self) -> Iterator[None]:
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("ROLLBACK")


class PostgresBackend(Backend):
    known = PG_SCHEMA_VERSION

    def __init__(self, tmp: Path, url: str) -> None:
        super().__init__(tmp)
        self.url = url

    def set_schema_version(self, version: int) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("UPDATE meshca_schema SET version = %s", (version,))

    def schema_version(self) -> int:
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("SELECT version FROM meshca_schema").fetchall()
        assert len(row) == 1
        return int(row[0][0])

    @contextlib.contextmanager
    def block_writes(self) -> Iterator[None]:
        with psycopg.connect(self.url) as conn:
            conn.execute("LOCK TABLE issuances IN EXCLUSIVE MODE")
            yield
            conn.rollback()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    chosen: Backend
    if request.param == "sqlite":
        chosen = SqliteBackend(tmp_path)
    else:
        chosen = PostgresBackend(tmp_path, request.getfixturevalue("pg_database"))
    yield chosen
    for store in chosen.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()


def outcome(future: concurrent.futures.Future[None]) -> str:
    try:
        future.result(timeout=60)
    except TokenUsedUp:
        return "used_up"
    except StoreError:
        return "error"
    return "ok"


def test_token_round_trip(store: Store) -> None:
    t = token(uses=3)
    store.add_token(t)
    assert store.get_token(t.token_hash) == t
    assert store.get_token(hash_token(new_token())) is None
    with pytest.raises(StoreError, match="cannot store join token"):
        store.add_token(t)


def test_records_read_back_in_log_order(store: Store) -> None:
    other = "spiffe://example.org/ns/default/sa/db"
    records = [rec(at=NOW), rec(other, at=NOW + timedelta(seconds=1)), rec(at=NOW + timedelta(seconds=2))]
    for future in [store.record(r) for r in records]:
        future.result(timeout=60)
    assert store.issuances() == records
    assert store.issuances(WORKLOAD) == [records[0], records[2]]
    assert store.issuances(limit=2) == records[:2]
    assert store.issuances(newest_first=True) == records[::-1]
    assert store.issuances(limit=1, newest_first=True) == records[-1:]
    assert store.issuances("spiffe://example.org/nobody") == []


def test_token_with_n_uses_pays_for_exactly_n_issuances_across_replicas(backend: Backend) -> None:
    uses, attempts = 5, 40
    replicas = [backend.open(), backend.open()]
    t = token(uses=uses)
    replicas[0].add_token(t)
    barrier = threading.Barrier(8)

    def race(worker: int) -> list[str]:
        barrier.wait()
        replica = replicas[worker % 2]
        futures = [replica.record(rec(), token_hash=t.token_hash) for _ in range(attempts // 8)]
        return [outcome(f) for f in futures]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(race, range(8)) for r in rs]
    assert sorted(set(results)) == ["ok", "used_up"]
    assert results.count("ok") == uses
    assert len(replicas[1].issuances()) == uses
    left = replicas[1].get_token(t.token_hash)
    assert left is not None and left.uses_left == 0


def test_every_acknowledged_record_is_in_the_shared_log_once(backend: Backend) -> None:
    replicas = [backend.open(), backend.open()]
    records = [rec() for _ in range(200)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = list(pool.map(lambda i: replicas[i % 2].record(records[i]), range(len(records))))
    assert [outcome(f) for f in futures] == ["ok"] * len(records)
    again = replicas[1].record(records[0])  # logged through the other replica: refused here too
    assert outcome(again) == "error"
    logged = [r.serial for r in replicas[1].issuances()]
    assert sorted(logged) == sorted(r.serial for r in records)


def test_expired_token_pays_for_nothing(store: Store) -> None:
    t = token(uses=5, expires_at=NOW)
    store.add_token(t)
    assert outcome(store.record(rec(at=NOW), token_hash=t.token_hash)) == "used_up"
    assert outcome(store.record(rec(at=NOW - timedelta(seconds=1)), token_hash=t.token_hash)) == "ok"
    assert len(store.issuances()) == 1


def test_duplicate_serial_is_refused_alone_and_its_token_use_given_back(store: Store) -> None:
    first = rec()
    store.record(first).result(timeout=60)
    t = token(uses=2)
    store.add_token(t)
    again = rec(serial=first.serial, at=NOW + timedelta(seconds=5))
    with pytest.raises(StoreError, match=f"serial {first.serial} is already in the issuance log") as caught:
        store.record(again, token_hash=t.token_hash).result(timeout=60)
    assert not isinstance(caught.value, TokenUsedUp)
    # In one batch (one transaction): the duplicate fails, its neighbours commit.
    ok1, ok2 = rec(), rec()
    outcomes = store.commit_now([(ok1, t.token_hash), (again, t.token_hash), (ok2, None)])  # type: ignore[attr-defined]
    assert [o is None for o in outcomes] == [True, False, True]
    assert {r.serial for r in store.issuances()} == {first.serial, ok1.serial, ok2.serial}
    left = store.get_token(t.token_hash)
    assert left is not None and left.uses_left == 1


def test_group_commit_puts_many_records_in_one_transaction(backend: Backend) -> None:
    registry = CollectorRegistry()
    store = backend.open(metrics=StoreMetrics(registry))
    with backend.block_writes():
        # The writer takes a first batch and waits on the lock; the rest queue behind it.
        futures = [store.record(rec()) for _ in range(100)]
    assert [outcome(f) for f in futures] == ["ok"] * 100
    transactions = registry.get_sample_value("meshca_store_batch_records_count")
    assert registry.get_sample_value("meshca_store_batch_records_sum") == 100
    assert transactions is not None and transactions <= 2
    assert len(store.issuances()) == 100


def test_close_commits_what_is_queued(backend: Backend) -> None:
    store = backend.open()
    with backend.block_writes():
        futures = [store.record(rec()) for _ in range(50)]
        closer = threading.Thread(target=store.close)
        closer.start()
    closer.join(timeout=60)
    assert not closer.is_alive()
    assert [outcome(f) for f in futures] == ["ok"] * 50
    assert len(backend.open(writer=False).issuances()) == 50


def test_chained_records_read_back_with_their_links(backend: Backend) -> None:
    key = generate_key()
    store = backend.open(log_key=key)
    t = token(uses=1)
    store.add_token(t)
    first = rec()
    store.record(first).result(timeout=60)
    # One transaction: a token used up and a serial logged already are refused, and take no link.
    batch = [(rec(), None), (rec(), t.token_hash), (rec(), t.token_hash), (rec(serial=first.serial), None)]
    batch.append((rec(), None))
    outcomes = store.commit_now(batch)  # type: ignore[attr-defined]
    assert [o is None for o in outcomes] == [True, True, False, False, True]
    store.close()
    reader = backend.open(writer=False)
    logged = reader.log_records()
    assert [item.record for item in logged] == [first, batch[0][0], batch[1][0], batch[4][0]]
    writer = logged[0].link.writer
    prev = GENESIS
    for seq, item in enumerate(logged, start=1):
        assert (item.link.writer, item.link.seq, item.link.prev) == (writer, seq, prev)
        assert item.link.hash == record_hash(item.record, writer, prev)
        prev = item.link.hash
    checkpoints = reader.log_checkpoints()
    assert sorted((c.writer, c.seq, c.head) for c in checkpoints) == [(writer, 0, GENESIS), (writer, 4, prev)]
    report = verify_log(logged, checkpoints, key.public_key())
    assert report.ok and (report.records, report.unchecked) == (4, 0)


def test_replicas_keep_chains_of_their_own(backend: Backend) -> None:
    key = generate_key()
    replicas = [backend.open(log_key=key), backend.open(log_key=key)]
    for i in range(6):
        replicas[i % 2].record(rec()).result(timeout=60)
    for replica in replicas:
        replica.close()
    logged = backend.open(writer=False).log_records()
    writers = {item.link.writer for item in logged}
    assert len(writers) == 2
    assert sorted(item.link.seq for item in logged) == [1, 1, 2, 2, 3, 3]
    report = verify_log(logged, backend.open(writer=False).log_checkpoints(), key.public_key())
    assert report.ok and report.writers == 2


def test_a_moved_head_is_signed_within_the_interval_and_logged(backend: Backend) -> None:
    key = generate_key()
    with capture_logs() as logs:
        store = backend.open(log_key=key, checkpoint_interval=timedelta(milliseconds=100))
        store.record(rec()).result(timeout=60)
        deadline = time.monotonic() + 20
        while max(c.seq for c in store.log_checkpoints()) < 1:
            assert time.monotonic() < deadline, "no checkpoint of the moved head"
            time.sleep(0.05)
        time.sleep(0.3)  # a head that stays is not signed again, not even at close
        store.close()
    assert sorted(c.seq for c in backend.open(writer=False).log_checkpoints()) == [0, 1]
    logged = [e for e in logs if e["event"] == "log.checkpoint"]
    assert [e["seq"] for e in logged] == [0, 1]
    assert logged[1]["head"] == backend.open(writer=False).log_records()[0].link.hash


def test_schema_version_is_recorded_and_a_newer_one_refused(backend: Backend) -> None:
    backend.open().close()
    assert backend.schema_version() == backend.known  # type: ignore[attr-defined]
    backend.set_schema_version(backend.known + 1)
    with pytest.raises(StoreError) as caught:
        backend.open()
    newer, known = backend.known + 1, backend.known
    assert (
        str(caught.value) == f"store schema version {newer} is newer than this meshca (knows {known}): upgrade meshca"
    )


def test_replicas_starting_together_all_come_up(backend: Backend) -> None:
    barrier = threading.Barrier(8)

    def start(_: int) -> Store:
        barrier.wait()
        return backend.open()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        stores = list(pool.map(start, range(8)))
    assert backend.schema_version() == backend.known  # type: ignore[attr-defined]
    stores[3].record(rec()).result(timeout=60)
    assert len(stores[5].issuances()) == 1


def test_check_answers_while_the_store_is_up(store: Store) -> None:
    store.check()  # type: ignore[attr-defined]


def test_a_reader_cannot_record(backend: Backend) -> None:
    with pytest.raises(StoreError, match="reading only"):
        backend.open(writer=False).record(rec())


# -- issuer certificates (managed issuers, file-mode issuers)


def issuer_rec(writer: str, not_before: datetime, der: bytes | None = None) -> IssuerCertRecord:
    der = der or secrets.token_bytes(64)
    fp = hashlib.sha256(der).hexdigest()
    return IssuerCertRecord(fp, writer, "aa" * 32, not_before, not_before + timedelta(days=7), der, NOW)


def test_issuer_certificates_from_every_replica_read_back_oldest_first(backend: Backend) -> None:
    one, two = backend.open(), backend.open(writer=False)  # a reading store object records issuers too
    later = issuer_rec("replica-b", NOW + timedelta(hours=1))
    earlier = issuer_rec("replica-a", NOW)
    two.record_issuer(later)
    one.record_issuer(earlier)
    assert one.issuer_certs() == [earlier, later]
    assert two.issuer_certs() == [earlier, later]


def test_an_issuer_recorded_twice_keeps_its_first_record(store: Store) -> None:
    first = issuer_rec("replica-a", NOW)
    store.record_issuer(first)
    store.record_issuer(dataclasses.replace(first, writer="replica-b", recorded_at=NOW + timedelta(hours=1)))
    assert store.issuer_certs() == [first]


def test_sqlite_store_from_before_schema_versions_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "meshca.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "CREATE TABLE issuances (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_after REAL NOT NULL,"
            " principal TEXT NOT NULL, api TEXT NOT NULL, issued_at REAL NOT NULL)"
        )
        conn.execute("INSERT INTO issuances VALUES ('ab', ?, 1.0, 'p', 'native', 0.0)", (WORKLOAD,))
        conn.commit()
    store = open_store(None, tmp_path)
    try:
        assert [r.serial for r in store.issuances()] == ["ab"]
        store.add_token(token())
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA_VERSION


@pytest.mark.parametrize(
    "url",
    ["mysql://meshca:hunter2secret@db/meshca", "hunter2secret", "sqlite://relative/hunter2secret.db", "postgresql:x"],
)
def test_unknown_store_urls_are_refused_without_echo(url: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError) as caught:
        open_store(url, tmp_path)
    assert "hunter2secret" not in str(caught.value)
    assert "postgresql://, postgres:// or sqlite:///" in str(caught.value)
