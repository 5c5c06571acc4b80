"""The state store on PostgreSQL, shared by replicas (see docs/architecture.md, Store contract).

Same contract as `SqliteStore`: a writer thread commits many records per
transaction (group commit); a join token's use is a conditional UPDATE in the
issuance's own transaction, so a token with N uses pays for exactly N
certificates however replicas race; the serial is the primary key, so two
replicas can never log one serial twice.

Connections come from a psycopg pool that reconnects by itself: while the
database is away every operation fails with `StoreError` within the pool
timeout, and the same store works again once it is back. The password in the
URL (or from PGPASSWORD, or a passfile, as libpq allows) never appears in an
error message or a repr.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg
import psycopg.conninfo
from psycopg_pool import ConnectionPool

from meshca.pki._errors import StoreError, TokenUsedUp
from meshca.pki._keys import PrivateKey
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock, system_clock
from meshca.server._audit import ChainLink, Checkpoint, LoggedRecord
from meshca.server._entries import RegistrationEntry
from meshca.server._metrics import StoreMetrics
from meshca.server._store import (
    UNSIGNED_LEGACY_QUERY,
    GroupCommitter,
    IssuanceChain,
    IssuanceRecord,
    IssuerCertRecord,
    JoinToken,
    JwtPublicKey,
    WritingStore,
    chain_legacy,
    duplicate_serial,
    entry_from_row,
    logged_checkpoint,
    logged_record,
    parent_column,
    schema_too_new,
)

__all__ = ["PG_SCHEMA_VERSION", "PostgresStore"]


def _chain_legacy(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        "SELECT serial, spiffe_id, not_after, principal, api, issued_at FROM issuances ORDER BY issued_at, row_id"
    ).fetchall()
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE issuances SET writer = %s, seq = %s, prev = %s, hash = %s WHERE serial = %s",
            chain_legacy(rows, _utc),
        )


# _MIGRATIONS[n] takes a database from schema version n to n + 1; the version is in meshca_schema.
_MIGRATIONS: tuple[tuple[LiteralString | Callable[[psycopg.Connection[Any]], None], ...], ...] = (
    (
        """CREATE TABLE join_tokens (
            token_hash text PRIMARY KEY,
            spiffe_id text NOT NULL,
            expires_at timestamptz NOT NULL,
            uses_left integer NOT NULL CHECK (uses_left >= 0)
        )""",
        """CREATE TABLE issuances (
            serial text PRIMARY KEY,
            spiffe_id text NOT NULL,
            not_after timestamptz NOT NULL,
            principal text NOT NULL,
            api text NOT NULL,
            issued_at timestamptz NOT NULL,
            seq bigint GENERATED ALWAYS AS IDENTITY
        )""",
        "CREATE INDEX issuances_by_id ON issuances (spiffe_id, issued_at)",
    ),
    (
        # Version 2, the chained log: the insertion counter makes way for the chain's own seq.
        "ALTER TABLE issuances RENAME COLUMN seq TO row_id",
        "ALTER TABLE issuances ADD COLUMN writer text, ADD COLUMN seq bigint, ADD COLUMN prev text,"
        " ADD COLUMN hash text",
        _chain_legacy,
        "CREATE UNIQUE INDEX issuances_chain ON issuances (writer, seq)",
        """CREATE TABLE log_checkpoints (
            writer text NOT NULL,
            seq bigint NOT NULL,
            head text NOT NULL,
            at timestamptz NOT NULL,
            signature bytea NOT NULL,
            PRIMARY KEY (writer, seq)
        )""",
    ),
    (
        # Version 3: what managed issuers and the node agent share between replicas (see _store.py).
        """CREATE TABLE issuer_certs (
            fingerprint text PRIMARY KEY,
            writer text NOT NULL,
            anchor_fingerprint text NOT NULL,
            not_before timestamptz NOT NULL,
            not_after timestamptz NOT NULL,
            der bytea NOT NULL,
            recorded_at timestamptz NOT NULL
        )""",
        """CREATE TABLE registration_entries (
            id text PRIMARY KEY,
            spiffe_id text NOT NULL,
            selectors jsonb NOT NULL,
            parent text NOT NULL,
            x509_ttl interval NOT NULL,
            jwt_ttl interval NOT NULL,
            dns_names jsonb NOT NULL,
            created_at timestamptz NOT NULL
        )""",
        "CREATE INDEX registration_entries_by_parent ON registration_entries (parent)",
        """CREATE TABLE jwt_keys (
            kid text PRIMARY KEY,
            writer text NOT NULL,
            jwk jsonb NOT NULL,
            not_after timestamptz NOT NULL,
            recorded_at timestamptz NOT NULL
        )""",
    ),
)
PG_SCHEMA_VERSION = len(_MIGRATIONS)
_MIGRATION_LOCK = 0x6D657368_63610001  # pg_advisory_xact_lock key: "meshca" and 1

_TAKE_USE: LiteralString = (
    "UPDATE join_tokens SET uses_left = uses_left - 1"
    " WHERE token_hash = %s AND uses_left > 0 AND expires_at > %s RETURNING uses_left"
)
_INSERT: LiteralString = (
    "INSERT INTO issuances (serial, spiffe_id, not_after, principal, api, issued_at, writer, seq, prev, hash)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (serial) DO NOTHING RETURNING serial"
)
_RELINK: LiteralString = "UPDATE issuances SET seq = %s, prev = %s, hash = %s WHERE serial = %s"
_GIVE_BACK: LiteralString = "UPDATE join_tokens SET uses_left = uses_left + 1 WHERE token_hash = %s"


def _secrets(url: str) -> list[str]:
    """What must never be echoed: the URL itself and its password, as parsed and as written.

    Found by hand as well, since libpq quotes the whole URL when it cannot parse it.
    """
    found = [url]
    with contextlib.suppress(psycopg.Error):
        found.append(str(psycopg.conninfo.conninfo_to_dict(url).get("password") or ""))
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    userinfo, at, _ = authority.rpartition("@")
    if at:
        found.append(userinfo.partition(":")[2])
    return sorted((f for f in found if f), key=len, reverse=True)


def describe(url: str) -> str:
    """``user@host:port/dbname`` for messages: the URL without its password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(unparsable URL)"
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{params.get('host', '')}{port}/{params.get('dbname', '')}"


_LOG_QUERY = (
    "SELECT serial, spiffe_id, not_after, principal, api, issued_at FROM issuances"
    " WHERE %(sid)s::text IS NULL OR spiffe_id = %(sid)s::text ORDER BY {} LIMIT %(limit)s"
)
_OLDEST_FIRST = _LOG_QUERY.format("issued_at, row_id")
_NEWEST_FIRST = _LOG_QUERY.format("issued_at DESC, row_id DESC")


class PostgresStore(WritingStore):
    """PostgreSQL through a psycopg connection pool; several replicas may share one database.

    ``timeout`` bounds how long an operation waits for a connection (and a
    connection attempt) before it fails with `StoreError`. ``log_key`` signs
    checkpoints of the records this object writes (see `IssuanceChain`).
    """

    def __init__(
        self,
        url: str,
        *,
        writer: bool = True,
        metrics: StoreMetrics | None = None,
        timeout: float = 5.0,
        pool_size: int = 4,
        log_key: PrivateKey | None = None,
        clock: Clock = system_clock,
        checkpoint_interval: timedelta | None = None,
    ) -> None:
        self.target = describe(url)
        self._secrets = _secrets(url)
        self._metrics = metrics or StoreMetrics()
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreError(f"invalid PostgreSQL URL: {self._scrub(exc)}") from None
        # Bounds on waiting for a database that is gone: connecting (libpq takes whole
        # seconds, 2 at least), and a query whose packets go unacknowledged (a partition,
        # not a slow answer). Values in the URL win.
        defaults = {
            "connect_timeout": max(2, math.ceil(timeout)),
            "tcp_user_timeout": math.ceil(max(10, 2 * timeout) * 1000),
        }
        kwargs: dict[str, Any] = {"autocommit": True} | {k: v for k, v in defaults.items() if k not in params}
        try:
            with psycopg.connect(url, **kwargs) as conn:
                self._migrate(conn)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open store {self.target}: {self._scrub(exc)}") from None
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            url,
            kwargs=kwargs,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=timeout,
            check=ConnectionPool.check_connection,  # a connection broken by a restart is replaced, not used
            name="meshca-store",
            reconnect_timeout=max(30.0, timeout),  # then a new attempt at the next request: backoff stays short
        )
        self._pool.open(wait=False)
        try:
            legacy = self._query("open", "read the issuance log", UNSIGNED_LEGACY_QUERY) if log_key else []
            self._chain = IssuanceChain(
                log_key,
                self._save_checkpoint,
                clock=clock,
                interval=checkpoint_interval,
                legacy_head=(legacy[0][0], legacy[0][1]) if legacy else None,
            )
        except StoreError:
            self._pool.close()
            raise
        self._writer = GroupCommitter(self.commit_now) if writer else None

    def __repr__(self) -> str:
        return f"PostgresStore({self.target!r})"

    def _scrub(self, exc: BaseException) -> str:
        """The first line of a database error, with the URL and password cut out should libpq echo them."""
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message

    @staticmethod
    def _migrate(conn: psycopg.Connection[Any]) -> None:
        """Brings the schema to this meshca's version; replicas starting together take turns on the lock."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            found = 0
            if _one(conn, "SELECT to_regclass('meshca_schema') IS NOT NULL"):
                found = _one(conn, "SELECT coalesce(max(version), 0) FROM meshca_schema")
            else:
                conn.execute("CREATE TABLE meshca_schema (version integer NOT NULL)")
            if found > PG_SCHEMA_VERSION:
                raise schema_too_new(found, PG_SCHEMA_VERSION)
            if found == PG_SCHEMA_VERSION:
                return
            for step in _MIGRATIONS[found:]:
                for statement in step:
                    if callable(statement):
                        statement(conn)
                    else:
                        conn.execute(statement)
            conn.execute("DELETE FROM meshca_schema")
            conn.execute("INSERT INTO meshca_schema (version) VALUES (%s)", (PG_SCHEMA_VERSION,))

    def _query(
        self, op: str, what: str, sql: LiteralString, params: Sequence[object] | Mapping[str, object] = ()
    ) -> list[tuple[Any, ...]]:
        """One statement on a pooled connection (autocommit); `StoreError` for any failure."""
        with self._metrics.timed(op):
            try:
                with self._pool.connection() as conn:
                    cur = conn.execute(sql, params)
                    return cur.fetchall() if cur.description is not None else []
            except psycopg.Error as exc:
                self._metrics.error(op, exc)
                raise StoreError(f"cannot {what} in {self.target}: {self._scrub(exc)}") from exc
            finally:
                self._pool_gauges()

    def _pool_gauges(self) -> None:
        stats = self._pool.get_stats()
        self._metrics.pool.labels("open").set(stats.get("pool_size", 0))
        self._metrics.pool.labels("idle").set(stats.get("pool_available", 0))
        self._metrics.pool.labels("waiting").set(stats.get("requests_waiting", 0))

    def check(self) -> None:
        """Raises `StoreError` unless the database answers now (one round trip; for readiness)."""
        self._query("check", "reach the store", "SELECT 1")

    # -- tokens

    def add_token(self, token: JoinToken) -> None:
        self._query(
            "add_token",
            "store join token",
            "INSERT INTO join_tokens VALUES (%s, %s, %s, %s)",
            (token.token_hash, str(token.spiffe_id), token.expires_at, token.uses_left),
        )

    def get_token(self, token_hash: str) -> JoinToken | None:
        rows = self._query(
            "get_token",
            "read join token",
            "SELECT spiffe_id, expires_at, uses_left FROM join_tokens WHERE token_hash = %s",
            (token_hash,),
        )
        if not rows:
            return None
        sid, expires_at, uses_left = rows[0]
        return JoinToken(token_hash, SpiffeId.parse(sid), _utc(expires_at), uses_left)

    # -- registration entries and JWT keys

    def add_entry(self, entry: RegistrationEntry) -> None:
        self._query(
            "add_entry",
            "store the registration entry",
            "INSERT INTO registration_entries (id, spiffe_id, selectors, parent, x509_ttl, jwt_ttl, dns_names,"
            " created_at) VALUES (%s, %s, %s::jsonb, %s, %s, %s, %s::jsonb, %s)",
            (
                entry.id,
                str(entry.spiffe_id),
                json.dumps(list(entry.selectors)),
                parent_column(entry.parent),
                entry.x509_ttl,
                entry.jwt_ttl,
                json.dumps(list(entry.dns_names)),
                entry.created_at,
            ),
        )

    def entries(self, parent: SpiffeId | None = None) -> list[RegistrationEntry]:
        """Every entry (oldest first); with ``parent``, those that agent may serve (its own and those of no parent)."""
        rows = self._query(
            "entries",
            "read registration entries",
            "SELECT id, spiffe_id, selectors, parent, x509_ttl, jwt_ttl, dns_names, created_at"
            " FROM registration_entries WHERE %(parent)s::text IS NULL OR parent = %(parent)s OR parent = ''"
            " ORDER BY created_at, id",
            {"parent": str(parent) if parent is not None else None},
        )
        return [entry_from_row(r, _utc, _seconds) for r in rows]

    def get_entry(self, entry_id: str) -> RegistrationEntry | None:
        rows = self._query(
            "get_entry",
            "read the registration entry",
            "SELECT id, spiffe_id, selectors, parent, x509_ttl, jwt_ttl, dns_names, created_at"
            " FROM registration_entries WHERE id = %s",
            (entry_id,),
        )
        return entry_from_row(rows[0], _utc, _seconds) if rows else None

    def delete_entry(self, entry_id: str) -> bool:
        """True when the entry existed."""
        sql: LiteralString = "DELETE FROM registration_entries WHERE id = %s RETURNING id"
        return bool(self._query("delete_entry", "delete the registration entry", sql, (entry_id,)))

    def publish_jwt_key(self, key: JwtPublicKey) -> None:
        """Records (or extends) a public key; keys whose not_after passed are dropped in the same statement."""
        self._query(
            "publish_jwt_key",
            "publish a JWT signing key",
            "WITH gone AS (DELETE FROM jwt_keys WHERE not_after <= %(now)s AND kid <> %(kid)s)"
            " INSERT INTO jwt_keys (kid, writer, jwk, not_after, recorded_at)"
            " VALUES (%(kid)s, %(writer)s, %(jwk)s::jsonb, %(not_after)s, %(now)s)"
            " ON CONFLICT (kid) DO UPDATE SET not_after = excluded.not_after",
            {"kid": key.kid, "writer": key.writer, "jwk": key.jwk, "not_after": key.not_after, "now": key.recorded_at},
        )

    def jwt_keys(self, now: datetime) -> list[JwtPublicKey]:
        """Every key published and not past its not_after at ``now``, oldest first."""
        rows = self._query(
            "jwt_keys",
            "read JWT signing keys",
            "SELECT kid, writer, jwk::text, not_after, recorded_at FROM jwt_keys WHERE not_after > %s"
            " ORDER BY recorded_at, kid",
            (now,),
        )
        return [JwtPublicKey(r[0], r[1], r[2], _utc(r[3]), _utc(r[4])) for r in rows]

    # -- issuance log

    def issuances(
        self, spiffe_id: str | None = None, limit: int | None = None, *, newest_first: bool = False
    ) -> list[IssuanceRecord]:
        rows = self._query(
            "issuances",
            "read the issuance log",
            _NEWEST_FIRST if newest_first else _OLDEST_FIRST,
            {"sid": spiffe_id, "limit": limit},
        )
        return [IssuanceRecord(r[0], r[1], _utc(r[2]), r[3], r[4], _utc(r[5])) for r in rows]

    def log_records(self) -> list[LoggedRecord]:
        """Every record with its chain fields, for `meshca log verify`."""
        sql: LiteralString = (
            "SELECT serial, spiffe_id, not_after, principal, api, issued_at, writer, seq, prev, hash"
            " FROM issuances ORDER BY row_id"
        )
        return [logged_record(row, _utc) for row in self._query("log_records", "read the issuance log", sql)]

    def log_checkpoints(self) -> list[Checkpoint]:
        sql: LiteralString = "SELECT writer, seq, head, at, signature FROM log_checkpoints"
        return [logged_checkpoint(row, _utc) for row in self._query("log_checkpoints", "read the issuance log", sql)]

    # -- issuer certificates

    def record_issuer(self, record: IssuerCertRecord) -> None:
        """Records an issuer certificate (a second record of the same one changes nothing)."""
        self._query(
            "record_issuer",
            "record issuer certificate",
            "INSERT INTO issuer_certs VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (fingerprint) DO NOTHING",
            (
                record.fingerprint,
                record.writer,
                record.anchor_fingerprint,
                record.not_before,
                record.not_after,
                record.der,
                record.recorded_at,
            ),
        )

    def issuer_certs(self) -> list[IssuerCertRecord]:
        sql: LiteralString = (
            "SELECT fingerprint, writer, anchor_fingerprint, not_before, not_after, der, recorded_at"
            " FROM issuer_certs ORDER BY not_before, fingerprint"
        )
        rows = self._query("issuer_certs", "read issuer certificates", sql)
        return [IssuerCertRecord(r[0], r[1], r[2], _utc(r[3]), _utc(r[4]), bytes(r[5]), _utc(r[6])) for r in rows]

    def _save_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._query(
            "checkpoint",
            "store a log checkpoint",
            "INSERT INTO log_checkpoints (writer, seq, head, at, signature) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (checkpoint.writer, checkpoint.seq, checkpoint.head, checkpoint.at, checkpoint.signature),
        )

    def commit_now(self, items: Sequence[tuple[IssuanceRecord, str | None]]) -> list[StoreError | None]:
        """Commits ``items`` in one transaction on the calling thread; one outcome per item.

        The store's chain is held from the first link to the commit, so its
        transactions run one at a time (a chain has one order).
        """
        self._metrics.batch.observe(len(items))
        with self._metrics.timed("commit"), self._chain.lock:
            try:
                with self._pool.connection() as conn:
                    outcomes, last = self._apply(conn, items)
            except psycopg.Error as exc:
                self._chain.stale = True
                self._metrics.error("commit", exc)
                return [StoreError(f"cannot record issuance in {self.target}: {self._scrub(exc)}")] * len(items)
            finally:
                self._pool_gauges()
            if last is not None:
                self._chain.writer.commit(last)
            return outcomes

    def _apply(
        self, conn: psycopg.Connection[Any], items: Sequence[tuple[IssuanceRecord, str | None]]
    ) -> tuple[list[StoreError | None], ChainLink | None]:
        outcomes: list[StoreError | None] = [None] * len(items)
        chain = self._chain
        with conn.transaction(), conn.cursor() as cur:
            chain.begin(
                lambda writer: conn.execute(
                    "SELECT seq, hash FROM issuances WHERE writer = %s ORDER BY seq DESC LIMIT 1", (writer,)
                ).fetchone()
            )
            # Token uses first, in token order: every replica locks token rows in the
            # same order, so two batches never deadlock. One pipelined round trip.
            uses = sorted(
                (i for i, (_, token) in enumerate(items) if token is not None), key=lambda i: items[i][1] or ""
            )
            for i, used in zip(
                uses, _each(cur, _TAKE_USE, [(items[i][1], items[i][0].issued_at) for i in uses]), strict=True
            ):
                if not used:
                    outcomes[i] = TokenUsedUp("join token has no use left")
            paid = [i for i, outcome in enumerate(outcomes) if outcome is None]
            links = self._links([items[i][0] for i in paid])
            rows = [
                (r.serial, r.spiffe_id, r.not_after, r.principal, r.api, r.issued_at, *astuple(ln))
                for (r, _), ln in zip((items[i] for i in paid), links, strict=True)
            ]
            refunds = []
            for i, inserted in zip(paid, _each(cur, _INSERT, rows), strict=True):
                if not inserted:  # refused alone; the token use it took is given back
                    record, token = items[i]
                    outcomes[i] = duplicate_serial(record)
                    self._metrics.errors.labels("commit", "constraint").inc()
                    if token is not None:
                        refunds.append((token,))
            if refunds:
                cur.executemany(_GIVE_BACK, refunds)
            kept = [i for i in paid if outcomes[i] is None]
            if len(kept) < len(paid):  # a refused record takes no link: the ones after it are linked again
                first = dict(zip(paid, links, strict=True))
                links = self._links([items[i][0] for i in kept])
                cur.executemany(
                    _RELINK,
                    [
                        (ln.seq, ln.prev, ln.hash, items[i][0].serial)
                        for i, ln in zip(kept, links, strict=True)
                        if ln != first[i]
                    ],
                )
        return outcomes, links[-1] if links else None

    def _links(self, records: Sequence[IssuanceRecord]) -> list[ChainLink]:
        """Links ``records`` one after another from the head (which stays until the commit)."""
        links: list[ChainLink] = []
        for record in records:
            links.append(self._chain.writer.link(record, links[-1] if links else None))
        return links

    def close(self) -> None:
        """Commits what is queued, then stops the writer and closes the pool."""
        if self._writer is not None:
            self._writer.close()
        self._chain.close()
        self._pool.close()


def _one(conn: psycopg.Connection[Any], sql: LiteralString) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def _each(cur: psycopg.Cursor[Any], sql: LiteralString, params: list[tuple[Any, ...]]) -> list[bool]:
    """Runs ``sql`` once per parameter tuple in one pipeline; whether each returned a row."""
    if not params:
        return []
    cur.executemany(sql, params, returning=True)
    found = []
    while True:
        found.append(cur.fetchone() is not None)
        if not cur.nextset():
            return found


def _seconds(value: timedelta) -> float:
    return value.total_seconds()


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)
