"""`meshca serve --workers N`: processes sharing the port, one store writer, metrics summed."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

import meshca
from meshca._proto import meshca_identity_pb2_grpc
from meshca.server import SqliteStore, store_path

from .harness import WEB, add_token, http_get, native_request, sample_value, serial_hex, spiffe_csr
from .procs import ServeProcess, run_meshca


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


def _issue(port: int, bundle: bytes, token: str) -> str:
    """One issuance over a fresh channel (a fresh connection, so the kernel may pick another worker)."""
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(bundle)) as channel:
        stub = meshca_identity_pb2_grpc.IdentityStub(channel)
        _, csr = spiffe_csr()
        response = stub.IssueSVID(native_request(csr, join_token=token), timeout=20)
    from cryptography import x509

    return serial_hex(x509.load_der_x509_certificate(response.leaf))


def _started(proc: ServeProcess, workers: int, timeout: float = 30) -> tuple[int, int]:
    return proc.wait_workers(workers, timeout)


@pytest.fixture
def two_workers(d: Path) -> ServeProcess:
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    return ServeProcess(d, "--workers", "2")


def test_workers_share_the_port_and_the_log(d: Path, two_workers: ServeProcess) -> None:
    with two_workers as proc:
        port, metrics_port = _started(proc, 2)
        store = SqliteStore(store_path(meshca.TrustDir.at(d)))
        token = add_token(store, WEB, uses=40)
        store.close()
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


def test_a_single_use_token_pays_for_one_certificate_across_workers(d: Path, two_workers: ServeProcess) -> None:
    with two_workers as proc:
        port, _ = _started(proc, 2)
        store = SqliteStore(store_path(meshca.TrustDir.at(d)))
        token = add_token(store, WEB, uses=1)
        store.close()
        bundle = (d / "bundle.pem").read_bytes()

        def attempt(_: int) -> bool:
            try:
                _issue(port, bundle, token)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(16)))
        assert results.count(True) == 1


def test_sigterm_drains_every_worker_and_exits_0(two_workers: ServeProcess) -> None:
    with two_workers as proc:
        _started(proc, 2)
        workers = _children(proc.proc.pid)
        assert len(workers) >= 2
        assert proc.terminate() == 0
        assert [e for e in proc.events if e.get("event") == "server.stopped"]
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)


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
