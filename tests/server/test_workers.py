"""`meshca serve --workers N`: processes sharing the port, one store writer, metrics summed."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from support.calls import native_request
from support.certs import serial_hex, spiffe_csr
from support.ids import WEB
from support.metrics import http_get, sample_value
from support.poll import eventually_sync
from support.procs import ServeProcess, run_meshca
from support.tokens import add_token

import meshca
from meshca._proto import meshca_identity_pb2_grpc


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.update(int(c) for c in (task / "children").read_text().split())
    return out


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def _issue_response(port: int, bundle: bytes, token: str) -> Any:
    """One issuance over a fresh channel (a fresh connection, so the kernel may pick another worker)."""
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(bundle)) as channel:
        stub = meshca_identity_pb2_grpc.IdentityStub(channel)
        _, csr = spiffe_csr()
        return stub.IssueSVID(native_request(csr, join_token=token), timeout=20)


def _issue(port: int, bundle: bytes, token: str) -> str:
    return serial_hex(x509.load_der_x509_certificate(_issue_response(port, bundle, token).leaf))


def _started(proc: ServeProcess, workers: int, timeout: float = 30) -> tuple[int, int]:
    return proc.wait_workers(workers, timeout)


@pytest.fixture
def two_workers(d: Path) -> ServeProcess:
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    return ServeProcess(d, "--workers", "2")


def test_workers_share_the_port_and_the_log(d: Path, two_workers: ServeProcess) -> None:
    with two_workers as proc:
        port, metrics_port = _started(proc, 2)
        token = add_token(d, WEB, uses=40)
        bundle = (d / "bundle.pem").read_bytes()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            serials = list(pool.map(lambda _: _issue(port, bundle, token), range(40)))
        assert len(set(serials)) == 40
        # Every issuance was committed by the supervisor before its response was sent.
        log = json.loads(run_meshca("log", "--dir", d, "--json").stdout)
        assert {row["serial"] for row in log} >= set(serials)
        # Both processes served (connections are spread by SO_REUSEPORT hashing).
        workers = {e.get("worker") for e in proc.events if e.get("event") == "svid.issued"}
        assert workers == {0, 1}
        # The supervisor sums the workers' metrics.
        status, text = http_get(metrics_port, "/metrics")
        assert status == 200
        assert sample_value(text, "meshca_svids_issued_total") == 40
        assert http_get(metrics_port, "/readyz")[0] == 200
        # The token is used up across workers: the 41st use is refused wherever it lands.
        with pytest.raises(grpc.RpcError) as refused:
            _issue(port, bundle, token)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert proc.terminate() == 0
    # The supervisor chained every record and signed its head at exit: the untouched log verifies.
    verified = run_meshca("log", "verify", "--dir", d, "--json")
    assert verified.returncode == 0, verified
    report = json.loads(verified.stdout)
    assert report["ok"] and report["findings"] == []
    assert report["records"] >= 42  # 40 workloads and each worker's own serving SVID
    assert (report["writers"], report["unchecked"], report["legacy"]) == (1, 0, 0)
    # Each checkpoint is also a log line: the copy outside the database.
    logged = [e for e in proc.events if e.get("event") == "log.checkpoint"]
    assert logged and logged[-1]["seq"] == report["records"]


def test_a_single_use_token_pays_for_one_certificate_across_workers(d: Path, two_workers: ServeProcess) -> None:
    with two_workers as proc:
        port, _ = _started(proc, 2)
        token = add_token(d, WEB, uses=1)
        bundle = (d / "bundle.pem").read_bytes()

        start = threading.Barrier(8)

        def attempt(_: int) -> tuple[bool, float, float]:
            """Whether the attempt got a certificate, and when it was in flight."""
            start.wait(10)  # eight at a time go at once
            began = time.monotonic()
            try:
                _issue(port, bundle, token)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return False, began, time.monotonic()
            return True, began, time.monotonic()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(16)))
        [(_, won_from, won_to)] = [r for r in results if r[0]]
        # The race was run: refused attempts were in flight while the winning one was.
        assert any(began < won_to and ended > won_from for ok, began, ended in results if not ok)
        # ... on both workers (the token is spent in the supervisor's store, whichever worker asked).
        refused_by = {e.get("worker") for e in proc.events if e.get("event") == "auth.failed"}
        issued_by = {e.get("worker") for e in proc.events if e.get("event") == "svid.issued"}
        assert refused_by | issued_by == {0, 1}


def test_sigterm_drains_every_worker_and_exits_0(two_workers: ServeProcess) -> None:
    with two_workers as proc:
        _started(proc, 2)
        workers = _children(proc.proc.pid)
        assert len(workers) >= 2
        assert proc.terminate() == 0
        assert [e for e in proc.events if e.get("event") == "server.stopped"]
        eventually_sync(lambda: not any(_alive(w) for w in workers), 10, "every worker to exit", interval=0.1)


def test_workers_die_with_a_killed_supervisor(two_workers: ServeProcess) -> None:
    with two_workers as proc:
        _started(proc, 2)
        workers = _children(proc.proc.pid)
        assert len(workers) >= 2
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "orphaned workers keep serving after the supervisor died"


def _worker_pids(supervisor: int) -> list[int]:
    """The serving processes (not multiprocessing's resource tracker)."""
    return [pid for pid in _children(supervisor) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _wait_events(proc: ServeProcess, event: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len([e for e in proc.events if e.get("event") == event]) < count:
        if time.monotonic() > deadline or proc.proc.poll() is not None:
            raise AssertionError(f"no {count} {event} events:\n" + "\n".join(proc.lines))
        time.sleep(0.1)


def test_a_bad_issuer_on_disk_neither_unreadies_nor_stops_the_workers(d: Path, two_workers: ServeProcess) -> None:
    """The workers keep the last good issuer; so do /readyz and a worker restarted after a crash."""
    with two_workers as proc:
        port, metrics_port = _started(proc, 2)
        token = add_token(d, WEB, uses=10)
        bundle = (d / "bundle.pem").read_bytes()
        # A new good issuer first, so "last good" is not simply the one the workers started with.
        tdir, staged = meshca.TrustDir.at(d), d.parent / "staged"
        made = run_meshca(
            "issuer", "create", "--anchor-cert", tdir.anchor_cert, "--anchor-key", tdir.anchor_key, "--dir", staged
        )
        assert made.returncode == 0, made.stderr
        for name in ("issuer.key", "issuer.crt"):
            os.replace(staged / name, d / name)
        _wait_events(proc, "issuer.reloaded", 2)
        time.sleep(1.5)  # the supervisor checks the files every 0.5 s
        good_issuer = tdir.load_issuer().certificate
        refused = len([e for e in proc.events if e.get("event") == "issuer.reload_failed"])
        (d / "issuer.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        _wait_events(proc, "issuer.reload_failed", refused + 2)
        assert http_get(metrics_port, "/readyz") == (200, "ok\n")

        os.kill(_worker_pids(proc.proc.pid)[0], signal.SIGKILL)
        _wait_events(proc, "worker.died", 1)
        _wait_events(proc, "server.started", 3)  # the replacement serves
        assert proc.proc.poll() is None
        for _ in range(10):  # fresh connections, spread over both workers
            response = _issue_response(port, bundle, token)
            assert x509.load_der_x509_certificate(response.intermediates[0]) == good_issuer
        assert http_get(metrics_port, "/readyz") == (200, "ok\n")
        assert proc.terminate() == 0
