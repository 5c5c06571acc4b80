"""Replicas: several `meshca serve` processes sharing one PostgreSQL store behave as one CA.

Real processes, a real PostgreSQL server, 127.0.0.1 only. The outage test
stops and starts a PostgreSQL cluster of its own.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import pg
from support.certs import serial_hex
from support.ids import WEB
from support.metrics import http_get, sample_value
from support.poll import eventually_sync
from support.procs import ServeProcess, run_meshca

import meshca

from .test_workers import _issue_response, _started

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Replica:
    """One `meshca serve` on its own copy of the trust directory, as on its own host."""

    def __init__(self, source: Path, directory: Path, url: str, workers: int = 1) -> None:
        shutil.copytree(source, directory)
        self.directory = directory
        self.bundle = (directory / "bundle.pem").read_bytes()
        self.proc = ServeProcess(directory, "--store", url, "--workers", str(workers))
        self.port, self.metrics_port = _started(self.proc, workers)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.proc.events if e.get("event") == name]

    def issue(self, token: str) -> str:
        """The serial of a certificate this replica issued for ``token`` (raises grpc.RpcError if refused)."""
        return serial_hex(x509.load_der_x509_certificate(_issue_response(self.port, self.bundle, token).leaf))

    def health(self) -> int:
        with grpc.secure_channel(f"localhost:{self.port}", grpc.ssl_channel_credentials(self.bundle)) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            return int(response.status)

    def metric(self, name: str) -> float | None:
        status, text = http_get(self.metrics_port, "/metrics")
        assert status == 200
        return sample_value(text, name)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    eventually_sync(predicate, timeout, what, interval=0.2)


def password_of(url: str) -> str:
    password = urlsplit(url).password
    assert password
    return password


@pytest.fixture
def trust(tmp_path: Path) -> Path:
    """The trust files every replica is started with (each gets a copy)."""
    path = tmp_path / "trust"
    meshca.TrustDir.at(path).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    return path


@pytest.fixture
def replicas(trust: Path, pg_database: str, tmp_path: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for i in range(3):  # the last one with workers, each opening the store itself
            started.append(Replica(trust, tmp_path / f"host{i}", pg_database, workers=2 if i == 2 else 1))
        yield started
    finally:
        for replica in started:
            replica.proc.kill()
    for replica in started:
        assert not [line for line in replica.proc.lines if password_of(pg_database) in line]


def token_create(trust: Path, url: str, uses: int) -> str:
    made = run_meshca(
        "token", "create", "--dir", trust, "--store", url, "--spiffe-id", str(WEB), "--uses", str(uses), "--json"
    )
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["token"])


def logged_serials(url: str) -> list[str]:
    """The workload serials `meshca log --store URL` shows (the replicas' own SVIDs left out)."""
    shown = run_meshca("log", "--store", url, "--json")
    assert shown.returncode == 0, shown.stderr
    return [row["serial"] for row in json.loads(shown.stdout) if row["api"] != "self"]


def test_a_token_with_n_uses_issues_exactly_n_certificates_across_replicas(
    trust: Path, pg_database: str, replicas: list[Replica]
) -> None:
    uses = 12
    token = token_create(trust, pg_database, uses)
    acknowledged: list[str] = []
    refused: list[grpc.StatusCode] = []

    def attempt(i: int) -> None:
        try:
            acknowledged.append(replicas[i % len(replicas)].issue(token))
        except grpc.RpcError as exc:
            refused.append(exc.code())

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        list(pool.map(attempt, range(60)))
    assert len(acknowledged) == uses
    assert set(refused) == {grpc.StatusCode.UNAUTHENTICATED}
    # One certificate from each replica too, so the log must hold records of all three.
    each = token_create(trust, pg_database, len(replicas))
    acknowledged += [replica.issue(each) for replica in replicas]

    logged = logged_serials(pg_database)
    assert sorted(logged) == sorted(acknowledged)  # every acknowledged serial, exactly once
    assert len(set(logged)) == len(logged)
    assert all(replica.events("svid.issued") for replica in replicas)
    for replica in replicas:  # store metrics, summed over the workers of the last one
        assert (replica.metric("meshca_store_duration_seconds_count") or 0) >= 1
        assert (replica.metric("meshca_store_pool_connections") or 0) >= 1
        assert replica.metric("meshca_store_up") == 1


def test_kill_9_of_one_replica_under_load_loses_no_acknowledged_record(
    trust: Path, pg_database: str, replicas: list[Replica]
) -> None:
    token = token_create(trust, pg_database, 100_000)
    acknowledged: list[tuple[int, float, str]] = []  # replica, when, serial
    stop = threading.Event()

    def load(i: int) -> None:
        replica = replicas[i % len(replicas)]
        while not stop.is_set():
            try:
                acknowledged.append((i % len(replicas), time.monotonic(), replica.issue(token)))
            except grpc.RpcError as exc:
                assert replica is replicas[0], exc  # only the killed replica may fail
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        running = [pool.submit(load, i) for i in range(9)]
        time.sleep(2)
        replicas[0].proc.kill()  # SIGKILL, mid-stream
        killed_at = time.monotonic()
        time.sleep(2)
        stop.set()
        for future in running:
            future.result(timeout=60)

    assert any(r == 0 for r, _, _ in acknowledged)
    for survivor in (1, 2):  # the others kept serving
        assert any(r == survivor and at > killed_at + 0.5 for r, at, _ in acknowledged)
    logged = set(logged_serials(pg_database))
    missing = {serial for _, _, serial in acknowledged} - logged
    assert not missing, f"acknowledged but not logged: {sorted(missing)[:5]}"


def test_an_outage_unreadies_the_replica_and_it_recovers_by_itself(
    trust: Path, pg_cluster: pg.Cluster, tmp_path: Path
) -> None:
    replica = Replica(trust, tmp_path / "host", pg_cluster.url)
    with replica.proc:
        token = token_create(trust, pg_cluster.url, 10)
        replica.issue(token)
        assert http_get(replica.metrics_port, "/readyz") == (200, "ok\n")
        assert replica.health() == SERVING
        assert replica.metric("meshca_store_up") == 1

        pg_cluster.stop()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            replica.issue(token)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 15  # bounded by the store's timeouts
        wait_until(lambda: http_get(replica.metrics_port, "/readyz")[0] == 503, "/readyz 503")
        wait_until(lambda: replica.health() == NOT_SERVING, "health NOT_SERVING")
        assert replica.metric("meshca_store_up") == 0
        assert (replica.metric("meshca_store_errors_total") or 0) >= 1
        [down] = replica.events("store.down")
        assert down["level"] == "error" and "cannot" in down["reason"], down

        pg_cluster.start()
        wait_until(lambda: replica.health() == SERVING, "health SERVING again", timeout=45)
        replica.issue(token)
        assert http_get(replica.metrics_port, "/readyz") == (200, "ok\n")
        assert replica.metric("meshca_store_up") == 1
        assert replica.events("store.up")
        assert replica.proc.proc.poll() is None  # the same process, never restarted
        assert replica.proc.terminate() == 0
    assert not [line for line in replica.proc.lines if password_of(pg_cluster.url) in line]
