"""PostgreSQL for the store tests: the shared test server, fresh databases, a cluster a test controls.

Without a server a test skips with the reason; in CI (CI=true) it fails instead:
CI always has PostgreSQL (scripts/test.sh starts it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pg-cluster.sh"
NO_SERVER = "no PostgreSQL server: set MESHCA_TEST_POSTGRES_URL (scripts/test.sh starts one when run as root)"


def need(reason: str) -> NoReturn:
    """Skips a test that cannot run on this machine; fails it in CI, which must run every test."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: never skipped)")
    pytest.skip(reason)


def server_url() -> str:
    url = os.environ.get("MESHCA_TEST_POSTGRES_URL")
    if not url:
        need(NO_SERVER)
    return url


def with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path="/" + name).geturl()


def create_database(url: str) -> str:
    """A new empty database on ``url``'s server; its URL."""
    name = f"meshca_test_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(url, name)


def drop_database(url: str, database_url: str) -> None:
    name = urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Cluster:
    """A throwaway PostgreSQL server of one test's own (scripts/pg-cluster.sh), to stop and start."""

    def __init__(self) -> None:
        found = subprocess.run(["bash", str(SCRIPT), "bin"], capture_output=True, text=True, check=False)
        if found.returncode != 0:
            need(found.stderr.strip() or "PostgreSQL server programs not found")
        self.directory = tempfile.mkdtemp(prefix="meshca-pg-")  # under /tmp: the postgres user can reach it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.running = False
        self.url = self.start()

    def start(self) -> str:
        out = subprocess.run(
            ["bash", str(SCRIPT), "start", self.directory, str(self.port)],
            capture_output=True,
            text=True,
            check=True,
            timeout=180,
        )
        self.running = True
        return out.stdout.strip()

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop", self.directory], capture_output=True, check=True, timeout=120)
        self.running = False

    def remove(self) -> None:
        if self.running:
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
