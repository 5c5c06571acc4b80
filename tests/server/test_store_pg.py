"""PostgreSQL-only store behaviour: where the password may come from and where it never goes; outages."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from support import pg
from support.poll import eventually_sync

from meshca import StoreError, generate_key
from meshca.server._audit import verify_log
from meshca.server._metrics import StoreMetrics
from meshca.server._store import open_store
from meshca.server._store_pg import _MIGRATIONS, PG_SCHEMA_VERSION, PostgresStore

from .test_store_contract import NOW, rec


def without_password(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    assert parts.password and parts.hostname
    netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc).geturl(), parts.password


def test_a_wrong_password_is_not_in_the_error(pg_database: str, tmp_path: Path) -> None:
    bare, right = without_password(pg_database)
    wrong = "Wr0ng-" + right[::-1]
    url = bare.replace("@", f":{wrong}@", 1)
    with pytest.raises(StoreError) as caught:
        open_store(url, tmp_path)
    message = str(caught.value)
    assert "password authentication failed" in message
    assert "\n" not in message
    assert wrong not in message and right not in message
    assert wrong not in repr(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://meshca:s3cr3t-pw@[::1/meshca",  # libpq quotes a URL it cannot parse
        "postgresql://meshca:s3cr3t-pw@127.0.0.1/meshca?bogus=1",
        "postgres://meshca:s3cr3t-pw@127.0.0.1:notaport/meshca",
        "postgresql://meshca:s3cr3t-pw@127.0.0.1:1/meshca",  # nothing listens
    ],
)
def test_a_bad_url_is_refused_without_its_password(url: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"^(invalid PostgreSQL URL|cannot open store)") as caught:
        open_store(url, tmp_path)
    assert "s3cr3t" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_password_may_come_from_pgpassword_or_a_passfile(
    pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare, password = without_password(pg_database)
    monkeypatch.setenv("PGPASSWORD", password)
    store = open_store(bare, tmp_path)
    assert password not in repr(store)
    store.check()  # type: ignore[attr-defined]
    store.close()
    monkeypatch.delenv("PGPASSWORD")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:*:{password}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    store = open_store(bare, tmp_path)
    store.check()  # type: ignore[attr-defined]
    store.close()


def test_outage_fails_fast_and_the_same_store_recovers(pg_cluster: pg.Cluster) -> None:
    registry = CollectorRegistry()
    store = PostgresStore(pg_cluster.url, metrics=StoreMetrics(registry), timeout=2)
    try:
        before = rec()
        store.record(before).result(timeout=30)
        assert (registry.get_sample_value("meshca_store_pool_connections", {"state": "open"}) or 0) >= 1

        pg_cluster.stop()
        lost = rec()
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot record issuance"):
            store.record(lost).result(timeout=30)
        with pytest.raises(StoreError):
            store.check()
        with pytest.raises(StoreError, match="cannot read join token"):
            store.get_token("0" * 64)
        assert time.monotonic() - started < 20  # bounded by the pool timeout, never hanging
        unavailable = {"op": "commit", "kind": "unavailable"}
        assert (registry.get_sample_value("meshca_store_errors_total", unavailable) or 0) >= 1

        pg_cluster.start()

        def reachable() -> bool:
            try:
                store.check()
            except StoreError:
                return False
            return True

        eventually_sync(reachable, 60, "the store to reach the restarted server", interval=0.5)
        after = rec()
        store.record(after).result(timeout=30)
        assert [r.serial for r in store.issuances()] == [before.serial, after.serial]  # the lost one is not logged
        # The failed transaction took no link: the chain goes on from what the database holds.
        first, second = store.log_records()
        assert (second.link.seq, second.link.prev) == (2, first.link.hash)
    finally:
        store.close()


def test_migrations_racing_on_open_connections_take_turns(pg_database: str) -> None:
    """The tightest race of replicas starting together: connected already, all migrating at once."""
    conns = [psycopg.connect(pg_database, autocommit=True) for _ in range(8)]
    barrier = threading.Barrier(len(conns))

    def migrate(conn: psycopg.Connection[Any]) -> None:
        barrier.wait()
        PostgresStore._migrate(conn)

    try:
        with concurrent.futures.ThreadPoolExecutor(len(conns)) as pool:
            list(pool.map(migrate, conns))
        assert conns[0].execute("SELECT version FROM meshca_schema").fetchall() == [(PG_SCHEMA_VERSION,)]
    finally:
        for conn in conns:
            conn.close()


def test_a_version_1_database_is_chained_as_legacy_and_sealed(pg_database: str) -> None:
    old = [rec(at=NOW + timedelta(seconds=i)) for i in range(3)]
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE meshca_schema (version integer NOT NULL)")
        for statement in _MIGRATIONS[0]:
            assert isinstance(statement, str)
            conn.execute(statement)
        conn.execute("INSERT INTO meshca_schema VALUES (1)")
        for r in old:
            conn.execute(
                "INSERT INTO issuances (serial, spiffe_id, not_after, principal, api, issued_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (r.serial, r.spiffe_id, r.not_after, r.principal, r.api, r.issued_at),
            )
    key = generate_key()
    store = PostgresStore(pg_database, log_key=key)  # migrates, then seals the legacy chain with the key
    new = rec(at=NOW + timedelta(seconds=9))
    store.record(new).result(timeout=30)
    store.close()
    reader = PostgresStore(pg_database, writer=False)
    try:
        report = verify_log(reader.log_records(), reader.log_checkpoints(), key.public_key())
        assert report.ok, report.findings
        assert (report.records, report.writers, report.legacy, report.unchecked) == (4, 2, 3, 0)
        assert [r.serial for r in reader.issuances()] == [*(r.serial for r in old), new.serial]
    finally:
        reader.close()


def test_ci_never_skips_postgresql() -> None:
    if os.environ.get("CI") == "true":
        assert os.environ.get("MESHCA_TEST_POSTGRES_URL"), pg.NO_SERVER
