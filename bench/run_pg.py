"""Issuance benchmark on PostgreSQL: meshca replicas sharing one database against cfssl serve with its
PostgreSQL certdb, the same work on both sides (see bench/README.md, "PostgreSQL").

    python bench/run_pg.py                  # 3 rounds of 20,000 requests per server
    python bench/run_pg.py --quick          # 2 rounds of 5,000
    python bench/run_pg.py --smoke          # 1 round of 300: checks the harness, measures nothing
    python bench/run_pg.py --postgres-url postgresql://USER:PASSWORD@HOST:PORT/DB   # an existing server

Without --postgres-url it starts a throwaway cluster (scripts/pg-cluster.sh, fsync on) and stops it at the
end. In the server it creates one database per server under test (dropped at the end), then alternates:

- meshca xR: R `meshca serve --workers 1` processes (--replicas, default 2) on their own ports, one trust
  directory, one `--store postgresql://...`;
- meshca x1: one `meshca serve --workers N` (--workers, default cores) on the same kind of store;
- cfssl: `cfssl serve` with TLS, authsign with an HMAC key and `-db-config` for PostgreSQL, as run.py's
  same-work mode does with SQLite.

Every server is driven by the same load: R h2load processes at once, 32 connections in all (for meshca xR
one h2load per replica). Issuances are counted in each database (SELECT count(*)) before and after a run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from run import (
    CONNECTIONS,
    HERE,
    Cfssl,
    Meshca,
    Run,
    add_run_options,
    crypto_limit,
    free_port,
    measure,
    median,
    rounds,
    run_sizes,
    save,
    table,
)

# cfssl's PostgreSQL certdb: certdb/pg/migrations/001_CreateCertificates.sql of cfssl at the time of 1.2.0
# (before created_at was added). cfssl does not create it. cfssl 1.2.0's sign endpoint inserts
# (serial_number, authority_key_identifier, ca_label, status, reason, expiry, revoked_at, pem).
CFSSL_PG_SCHEMA = """
CREATE TABLE certificates (
  serial_number            bytea NOT NULL,
  authority_key_identifier bytea NOT NULL,
  ca_label                 bytea,
  status                   bytea NOT NULL,
  reason                   int,
  expiry                   timestamptz,
  revoked_at               timestamptz,
  pem                      bytea NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
CREATE TABLE ocsp_responses (
  serial_number            bytea NOT NULL,
  authority_key_identifier bytea NOT NULL,
  body                     bytea NOT NULL,
  expiry                   timestamptz,
  PRIMARY KEY(serial_number, authority_key_identifier),
  FOREIGN KEY(serial_number, authority_key_identifier) REFERENCES certificates(serial_number, authority_key_identifier)
);
"""


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def count(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0])


class PgCertdb:
    """cfssl's certdb in a PostgreSQL database; lib/pq wants sslmode spelled out (it defaults to require)."""

    def __init__(self, url: str) -> None:
        self.url = url
        with psycopg.connect(url) as conn:
            conn.execute(CFSSL_PG_SCHEMA)
        parts = urlsplit(url)
        query = parts.query if "sslmode=" in parts.query else "&".join(filter(None, [parts.query, "sslmode=disable"]))
        self.config = {"driver": "postgres", "data_source": urlunsplit(parts._replace(query=query))}

    def issued(self) -> int:
        return count(self.url, "certificates")


class MeshcaPg(Meshca):
    """meshca serve with ``--store URL``; the password goes in PGPASSWORD, not on the command line."""

    def __init__(self, work: Path, workers: int, *, replicas: int, url: str, name: str) -> None:
        self.store_url = url
        parts = urlsplit(url)
        env = dict(os.environ)
        if parts.password is not None:
            env["PGPASSWORD"] = unquote(parts.password)
            user, _, host = parts.netloc.rpartition("@")
            parts = parts._replace(netloc=f"{user.partition(':')[0]}@{host}")
        super().__init__(work, workers, replicas=replicas, store=urlunsplit(parts), env=env, name=name)

    def issued(self) -> int:
        return count(self.store_url, "issuances")


def durable(url: str) -> None:
    """The same work means durable commits: refuse a server that would acknowledge before the WAL is on disk."""
    with psycopg.connect(url) as conn:
        for setting in ("fsync", "synchronous_commit"):
            value = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(setting))).fetchone()[0]
            print(f"postgresql {setting} = {value}")
            if value == "off":
                raise SystemExit(f"{setting} is off in this PostgreSQL server: commits would not be durable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres-url", help="a role that may create databases (default: a throwaway cluster)")
    parser.add_argument("--replicas", type=int, default=2, help="meshca serve processes sharing the database")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="--workers of the single replica")
    add_run_options(parser)
    args = parser.parse_args()
    warmup = run_sizes(args)
    if not 1 <= args.replicas <= CONNECTIONS:
        raise SystemExit(f"--replicas must be 1 to {CONNECTIONS}")

    cluster = None
    url = args.postgres_url
    if url is None:
        # pg-cluster.sh hands the folder to the server's user, so it is not inside the (private) work folder.
        cluster = tempfile.mkdtemp(prefix="meshca-bench-pg-")
        url = subprocess.run(["bash", str(HERE.parent / "scripts" / "pg-cluster.sh"), "start", cluster,
                              str(free_port())], check=True, capture_output=True, text=True,
                             env={**os.environ, "PG_CLUSTER_FSYNC": "on"}).stdout.strip()
    names = [f"bench_{server}_{secrets.token_hex(4)}" for server in ("meshca_r", "meshca_1", "cfssl")]
    created: list[str] = []
    servers: list[Meshca | Cfssl] = []
    try:
        durable(url)
        with psycopg.connect(url, autocommit=True) as conn:
            for name in names:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                created.append(name)
        urls = [with_database(url, name) for name in names]
        with tempfile.TemporaryDirectory(prefix="meshca-bench-") as tmp:
            work = Path(tmp)
            servers.append(MeshcaPg(work, 1, replicas=args.replicas, url=urls[0], name=f"meshca x{args.replicas}"))
            servers.append(MeshcaPg(work, args.workers, replicas=1, url=urls[1], name="meshca x1"))
            servers.append(Cfssl(work, same_work=True, certdb=PgCertdb(urls[2])))
            print(f"warm-up; then {args.rounds} rounds of {args.requests} requests, {CONNECTIONS} connections from "
                  f"{args.replicas} h2load, order rotating; meshca x{args.replicas} --workers 1 each, "
                  f"meshca x1 --workers {args.workers}", flush=True)
            runs, speed = rounds(servers, count=args.rounds, requests=args.requests, warmup=warmup,
                                 speed_seconds=1 if args.smoke else 3, clients=args.replicas)
            for server in servers:
                runs.append(measure(server, "sequential (1 client)", max(300, args.requests // 10), 1))
    finally:
        for server in servers:
            server.stop()
        if created:
            with psycopg.connect(url, autocommit=True) as conn:
                for name in created:
                    conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
        if cluster is not None:
            subprocess.run(["bash", str(HERE.parent / "scripts" / "pg-cluster.sh"), "stop", cluster], check=True)
            shutil.rmtree(cluster)
    summary(runs, speed, args.replicas, args.workers)
    save(args.out, {"postgres": True, "replicas": args.replicas, "workers": args.workers,
                    "cpus": os.cpu_count() or 1, "openssl_speed": speed}, runs)
    return 0


def summary(runs: list[Run], speed: list[tuple[float, float]], replicas: int, workers: int) -> None:
    names = (f"meshca x{replicas}", "meshca x1", "cfssl")
    table(runs, names, [f"meshca x{replicas} (--workers 1 each)", f"meshca x1 (--workers {workers})", "cfssl",
                        f"x{replicas}/cfssl", "x1/cfssl"], [(0, 2), (1, 2)])
    best = max(median(runs, n, "round", "rps") for n in names[:2]) / median(runs, "cfssl", "round", "rps")
    print(f"\nmeshca/cfssl on the same work: {best:.2f} (best meshca layout); target >= 2.0: "
          f"{'met' if best >= 2 else f'missed by {2 / best:.1f}x'}")
    signs, verifies, limit = crypto_limit(speed)
    print(f"crypto limit: openssl speed ecdsap256 {signs:,.0f} signs/s, {verifies:,.0f} verifies/s per core "
          f"-> {limit:,.0f} issuances/s on {os.cpu_count() or 1} cores")


if __name__ == "__main__":
    sys.exit(main())
