"""`meshca log verify` against real stores edited behind meshca's back (docs/architecture.md, Issuance log).

Records are written by the real stores with the log key; the database is then
edited with its own command-line tool (`sqlite3`, `psql`), as someone holding
the database but not the key would, and the real CLI must name the first
damaged record and exit 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sqlite3
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from support import pg
from support.procs import run_meshca

import meshca
from meshca.server._audit import LEGACY, LoggedRecord, record_hash
from meshca.server._store import IssuanceRecord, open_store

from .test_store_contract import NOW, rec


class Db:
    """One database holding a log: the store URL ``meshca log verify --store`` takes, and an editor."""

    url: str | None  # None: the default, DIR/meshca.db

    def sql(self, statement: str) -> None:
        raise NotImplementedError

    def time(self, value: datetime) -> str:
        raise NotImplementedError


class SqliteDb(Db):
    def __init__(self, directory: Path) -> None:
        self.url = None
        self.path = directory / "meshca.db"

    def sql(self, statement: str) -> None:
        if shutil.which("sqlite3") is None:
            pg.need("the sqlite3 command is not installed (Debian's sqlite3; scripts/test.sh installs it)")
        subprocess.run(["sqlite3", "-bail", str(self.path), statement], check=True, capture_output=True, timeout=30)

    def time(self, value: datetime) -> str:
        return repr(value.timestamp())


class PostgresDb(Db):
    def __init__(self, url: str) -> None:
        self.url = url

    def sql(self, statement: str) -> None:
        if shutil.which("psql") is None:
            pg.need("the psql command is not installed (Debian's postgresql-client; scripts/test.sh installs it)")
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.url, "-c", statement],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def time(self, value: datetime) -> str:
        return f"'{value.isoformat()}'::timestamptz"


@pytest.fixture
def trust(d: Path) -> meshca.TrustDir:
    tdir = meshca.TrustDir.at(d)
    tdir.init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    return tdir


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, d: Path) -> Db:
    if request.param == "sqlite":
        return SqliteDb(d)
    return PostgresDb(request.getfixturevalue("pg_database"))


def write_log(trust: meshca.TrustDir, db: Db, n: int = 10) -> list[LoggedRecord]:
    """``n`` records, one transaction each (so record i is seq i), through a store with the log key."""
    store = open_store(db.url, trust.path, log_key=trust.ensure_log_key())
    try:
        for i in range(n):
            store.record(rec(at=NOW + timedelta(seconds=i))).result(timeout=60)
    finally:
        store.close()  # signs the final checkpoint
    return read_log(trust, db)


def read_log(trust: meshca.TrustDir, db: Db) -> list[LoggedRecord]:
    store = open_store(db.url, trust.path, writer=False)
    try:
        return sorted(store.log_records(), key=lambda r: (r.link.writer, r.link.seq))
    finally:
        store.close()


def verify(trust: meshca.TrustDir, db: Db, *extra: str) -> subprocess.CompletedProcess[str]:
    store = ("--store", db.url) if db.url else ()
    return run_meshca("log", "verify", "--dir", trust.path, *store, *extra)


def first_finding(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    return result.stdout.splitlines()[0]


def _insert(db: Db, record: IssuanceRecord, writer: str, seq: int, prev: str) -> None:
    db.sql(
        "INSERT INTO issuances (serial, spiffe_id, not_after, principal, api, issued_at, writer, seq, prev, hash)"
        f" VALUES ('{record.serial}', '{record.spiffe_id}', {db.time(record.not_after)}, '{record.principal}',"
        f" '{record.api}', {db.time(record.issued_at)}, '{writer}', {seq}, '{prev}',"
        f" '{record_hash(record, writer, prev)}')"
    )


def _renumber(db: Db, writer: str, moves: list[tuple[int, int]]) -> None:
    """Sets seq old -> new one row at a time (the chain's (writer, seq) is unique)."""
    for old, new in moves:
        db.sql(f"UPDATE issuances SET seq = {new} WHERE writer = '{writer}' AND seq = {old}")


def test_an_untouched_log_verifies(trust: meshca.TrustDir, db: Db) -> None:
    log = write_log(trust, db)
    result = verify(trust, db)
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == ["records=10 writers=1 checkpoints=2 unchecked=0 legacy=0: intact"]
    report = json.loads(verify(trust, db, "--json").stdout)
    assert report == {
        "ok": True,
        "records": 10,
        "writers": 1,
        "checkpoints": 2,  # the writer's first (seq 0) and the one close() signed
        "unchecked": 0,
        "legacy": 0,
        "findings": [],
    }
    assert [r.link.seq for r in log] == list(range(1, 11))


def test_an_edited_record_is_named(trust: meshca.TrustDir, db: Db) -> None:
    log = write_log(trust, db)
    fourth = log[3]
    db.sql(f"UPDATE issuances SET spiffe_id = 'spiffe://example.org/admin' WHERE serial = '{fourth.record.serial}'")
    result = verify(trust, db)
    line = first_finding(result)
    assert line.startswith(f"edited: writer {fourth.link.writer} record 4 (serial {fourth.record.serial})"), line
    assert result.stdout.splitlines()[-1].endswith(": TAMPERED, 1 finding(s), the first above")


def test_an_edited_and_rehashed_record_is_named(trust: meshca.TrustDir, db: Db) -> None:
    log = write_log(trust, db)
    fourth = log[3]
    changed = dataclasses.replace(fourth.record, spiffe_id="spiffe://example.org/admin")
    rehashed = record_hash(changed, fourth.link.writer, fourth.link.prev)
    db.sql(
        f"UPDATE issuances SET spiffe_id = '{changed.spiffe_id}', hash = '{rehashed}'"
        f" WHERE serial = '{fourth.record.serial}'"
    )
    line = first_finding(verify(trust, db))
    assert line.startswith(f"edited: writer {fourth.link.writer} record 4 (serial {fourth.record.serial})"), line


def test_a_deleted_record_is_named(trust: meshca.TrustDir, db: Db) -> None:
    log = write_log(trust, db)
    db.sql(f"DELETE FROM issuances WHERE serial = '{log[3].record.serial}'")
    line = first_finding(verify(trust, db))
    assert line.startswith(f"deleted: writer {log[3].link.writer} record 4: "), line


def test_an_inserted_record_is_named(trust: meshca.TrustDir, db: Db) -> None:
    log = write_log(trust, db)
    writer = log[0].link.writer
    # A forged record between 4 and 5, hashed onto 4; the records after it renumbered to make room.
    _renumber(db, writer, [(seq, seq + 1) for seq in range(10, 4, -1)])
    forged = rec("spiffe://example.org/intruder", at=log[3].record.issued_at)
    _insert(db, forged, writer, 5, log[3].link.hash)
    line = first_finding(verify(trust, db))
    assert line.startswith(f"inserted: writer {writer} record 5 (serial {forged.serial})"), line


def test_a_reordered_record_is_named(trust: meshca.TrustDir, db: Db) -> None:
    log = write_log(trust, db)
    writer = log[0].link.writer
    _renumber(db, writer, [(4, 100), (6, 4), (100, 6)])  # records 4 and 6 swap places
    line = first_finding(verify(trust, db))
    # The record the signed chain puts 4th is stored as 6th.
    assert line.startswith(f"reordered: writer {writer} record 6 (serial {log[3].record.serial})"), line


def test_a_forged_checkpoint_is_named(trust: meshca.TrustDir, db: Db) -> None:
    log = write_log(trust, db)
    writer = log[0].link.writer
    # The signed head moved back to record 4 (to truncate the chain after it): the signature no longer fits.
    db.sql(f"UPDATE log_checkpoints SET seq = 4, head = '{log[3].link.hash}' WHERE writer = '{writer}' AND seq = 10")
    db.sql(f"DELETE FROM issuances WHERE writer = '{writer}' AND seq > 4")
    result = verify(trust, db)
    assert first_finding(result) == f"checkpoint: writer {writer} record 4: checkpoint signature does not verify"
    assert json.loads(verify(trust, db, "--json").stdout)["findings"][0]["kind"] == "checkpoint"


def test_a_chain_made_without_the_key_is_named(trust: meshca.TrustDir, db: Db) -> None:
    write_log(trust, db, 2)
    forged = rec("spiffe://example.org/intruder")
    _insert(db, forged, "f0f0f0f0f0f0f0f0", 1, "0" * 64)  # a whole chain of its own: hashes need no key
    line = first_finding(verify(trust, db))
    assert line == (
        f"inserted: writer f0f0f0f0f0f0f0f0 record 1 (serial {forged.serial}): its writer never signed a checkpoint"
    )


def test_a_row_written_without_chain_fields_is_named(trust: meshca.TrustDir, db: Db) -> None:
    write_log(trust, db, 2)
    forged = rec("spiffe://example.org/intruder")
    db.sql(
        "INSERT INTO issuances (serial, spiffe_id, not_after, principal, api, issued_at)"
        f" VALUES ('{forged.serial}', '{forged.spiffe_id}', {db.time(forged.not_after)}, 'p', 'native',"
        f" {db.time(forged.issued_at)})"
    )
    line = first_finding(verify(trust, db))
    assert line.startswith(f"inserted: writer (none) record 0 (serial {forged.serial})"), line


def test_two_replicas_on_one_database_verify_as_two_chains(trust: meshca.TrustDir, pg_database: str) -> None:
    db = PostgresDb(pg_database)
    key = trust.ensure_log_key()
    replicas = [open_store(db.url, trust.path, log_key=key) for _ in range(2)]
    try:
        futures = [replicas[i % 2].record(rec(at=NOW + timedelta(seconds=i))) for i in range(30)]
        for future in futures:
            future.result(timeout=60)
    finally:
        for replica in replicas:
            replica.close()
    result = verify(trust, db, "--json")
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert (report["records"], report["writers"], report["unchecked"], report["findings"]) == (30, 2, 0, [])
    # Damage to one replica's chain names that replica's record, not the other's.
    log = read_log(trust, db)
    victim = next(r for r in log if r.link.seq == 3)
    db.sql(f"UPDATE issuances SET principal = 'nobody' WHERE serial = '{victim.record.serial}'")
    findings = json.loads(verify(trust, db, "--json").stdout)["findings"]
    assert [(f["kind"], f["writer"], f["seq"]) for f in findings] == [("edited", victim.link.writer, 3)]


def test_a_log_from_before_the_chain_is_sealed_and_counted(trust: meshca.TrustDir) -> None:
    """A version 1 SQLite log: its records become the legacy chain, sealed by the first store with the key."""
    path = trust.path / "meshca.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(
            "CREATE TABLE issuances (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_after REAL NOT NULL,"
            " principal TEXT NOT NULL, api TEXT NOT NULL, issued_at REAL NOT NULL);"
            "CREATE TABLE join_tokens (token_hash TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL,"
            " expires_at REAL NOT NULL, uses_left INTEGER NOT NULL);"
            "PRAGMA user_version = 1;"
        )
        for i in range(3):
            r = rec(at=NOW + timedelta(seconds=i))
            conn.execute(
                "INSERT INTO issuances VALUES (?, ?, ?, ?, ?, ?)",
                (r.serial, r.spiffe_id, r.not_after.timestamp(), r.principal, r.api, r.issued_at.timestamp()),
            )
        conn.commit()
    db = SqliteDb(trust.path)
    write_log(trust, db, 2)
    report = json.loads(verify(trust, db, "--json").stdout)
    assert (report["ok"], report["records"], report["writers"], report["legacy"]) == (True, 5, 2, 3)
    # Sealed: a record added to the legacy chain afterwards is forged.
    legacy = [r for r in read_log(trust, db) if r.link.writer == LEGACY]
    forged = rec("spiffe://example.org/intruder", at=NOW)
    _insert(db, forged, LEGACY, 4, legacy[-1].link.hash)
    assert first_finding(verify(trust, db)).startswith(f"inserted: writer {LEGACY} record 4 (serial {forged.serial})")


def test_the_log_key_must_be_ec_p256(trust: meshca.TrustDir, tmp_path: Path) -> None:
    trust.log_key.unlink()
    meshca.write_private_key(trust.log_key, meshca.generate_key(meshca.KeyType.RSA_2048))
    result = run_meshca(
        "issue", "--dir", trust.path, "--spiffe-id", "spiffe://example.org/web",
        "--cert-out", tmp_path / "w.pem", "--key-out", tmp_path / "w.key",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == f"meshca: error: {trust.log_key} must be an EC P-256 key"
    assert not (tmp_path / "w.pem").exists()


def test_verify_needs_the_public_key_and_the_log(trust: meshca.TrustDir, tmp_path: Path) -> None:
    missing = run_meshca("log", "verify", "--dir", trust.path)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"meshca: error: no issuance log at {trust.path / 'meshca.db'}"
    trust.log_public_key.unlink()
    write_log(trust, SqliteDb(trust.path), 1)  # a writer puts the public key back beside the private one
    assert trust.log_public_key.exists()
    trust.log_public_key.unlink()
    no_key = run_meshca("log", "verify", "--dir", trust.path)
    assert no_key.returncode == 1
    assert no_key.stderr.strip().startswith(f"meshca: error: cannot read {trust.log_public_key}")
