"""kill -9 in the middle of issuance: every certificate a client received is in the log after a restart."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from meshca._proto import meshca_identity_pb2_grpc
from meshca.server import SqliteStore, hash_token
from meshca.testing import TestCA

from .harness import WEB, add_token, cert, native_request, serial_hex, spiffe_csr, workload_records
from .procs import ServeProcess, run_meshca

pytestmark = pytest.mark.slow

CLIENTS = 4


def _issue_until_error(
    port: int, bundle_pem: bytes, token: str, received: list[str], errors: list[grpc.RpcError], stop: threading.Event
) -> None:
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(bundle_pem)) as channel:
        stub = meshca_identity_pb2_grpc.IdentityStub(channel)
        while not stop.is_set():
            try:
                response = stub.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=token), timeout=5)
            except grpc.RpcError as exc:
                errors.append(exc)
                return
            received.append(serial_hex(cert(response.leaf)))


def test_sigkill_during_issuance_loses_no_issued_certificate(d: Path, server_ca: TestCA) -> None:
    server_ca.write(d)
    store = SqliteStore(d / "meshca.db")
    tokens = [add_token(store, WEB, uses=1_000_000, ttl=timedelta(hours=1)) for _ in range(CLIENTS)]
    store.close()

    received: list[list[str]] = [[] for _ in range(CLIENTS)]
    errors: list[grpc.RpcError] = []
    stop = threading.Event()
    with ServeProcess(d) as server:
        port = server.wait_started()
        threads = [
            threading.Thread(
                target=_issue_until_error, args=(port, server_ca.bundle.to_pem(), tokens[n], received[n], errors, stop)
            )
            for n in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 15
        while sum(map(len, received)) < 100 and time.monotonic() < deadline:
            assert not errors, errors[0]
            time.sleep(0.02)
        server.kill()  # SIGKILL, while the clients are still sending
        killed_at = sum(map(len, received))
        stop.set()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        assert killed_at >= 100, "the clients were too slow to issue before the kill"

    with ServeProcess(d) as restarted:
        restarted.wait_started()
        listed = run_meshca("log", "--dir", d, "--json")
        assert listed.returncode == 0, listed.stderr
        logged = {row["serial"] for row in json.loads(listed.stdout)}
        got = {s for r in received for s in r}
        assert len(got) == sum(map(len, received))  # serials are unique
        missing = got - logged
        assert not missing, f"{len(missing)} issued certificates are not in the log"
        # the restarted server issues, and the tokens' spent uses survived the crash
        with grpc.secure_channel(
            f"localhost:{restarted.port}", grpc.ssl_channel_credentials(server_ca.bundle.to_pem())
        ) as channel:
            stub = meshca_identity_pb2_grpc.IdentityStub(channel)
            response = stub.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=tokens[0]), timeout=5)
        assert restarted.terminate() == 0
    for output in ("\n".join(server.lines), "\n".join(restarted.lines)):
        assert "BEGIN" not in output
        assert not any(token in output for token in tokens)
    reopened = SqliteStore(d / "meshca.db")
    try:
        records = workload_records(reopened.issuances())
        assert serial_hex(cert(response.leaf)) in {r.serial for r in records}
        spent = sum(1_000_000 - reopened.get_token(hash_token(t)).uses_left for t in tokens)
        assert spent == len(records)
    finally:
        reopened.close()
    # serve made the log key it was missing; the killed writer's last records are chained but
    # unsigned (counted as unchecked), which is not tampering: the log verifies, as two writers.
    assert (d / "log-signing.key").exists()
    verified = run_meshca("log", "verify", "--dir", d, "--json")
    assert verified.returncode == 0, verified
    report = json.loads(verified.stdout)
    assert report["findings"] == [] and report["writers"] == 2
