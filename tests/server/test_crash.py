"""kill -9 in the middle of issuance: every certificate a client received is in the log after a restart."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from support.calls import native_request
from support.certs import cert, serial_hex, spiffe_csr
from support.ids import WEB
from support.poll import eventually_sync
from support.procs import ServeProcess, run_meshca
from support.tokens import add_token, workload_records

from meshca._proto import meshca_identity_pb2_grpc
from meshca.server import SqliteStore, hash_token
from meshca.testing import TestCA

pytestmark = pytest.mark.slow

CLIENTS = 4


def _issue_until_error(
    port: int, bundle_pem: bytes, token: str, received: list[str], errors: list[tuple[float, grpc.RpcError]]
) -> None:
    """Issues until a call fails; records the failed call with the time it started."""
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(bundle_pem)) as channel:
        stub = meshca_identity_pb2_grpc.IdentityStub(channel)
        while True:
            request = native_request(spiffe_csr(WEB)[1], join_token=token)
            started = time.monotonic()
            try:
                response = stub.IssueSVID(request, timeout=5)
            except grpc.RpcError as exc:
                errors.append((started, exc))
                return
            received.append(serial_hex(cert(response.leaf)))


def test_sigkill_during_issuance_loses_no_issued_certificate(d: Path, server_ca: TestCA) -> None:
    server_ca.write(d)
    store = SqliteStore(d / "meshca.db")
    tokens = [add_token(store, WEB, uses=1_000_000, ttl=timedelta(hours=1)) for _ in range(CLIENTS)]
    store.close()

    received: list[list[str]] = [[] for _ in range(CLIENTS)]
    errors: list[tuple[float, grpc.RpcError]] = []
    with ServeProcess(d) as server:
        port = server.wait_started()
        threads = [
            threading.Thread(
                target=_issue_until_error, args=(port, server_ca.bundle.to_pem(), tokens[n], received[n], errors)
            )
            for n in range(CLIENTS)
        ]
        for t in threads:
            t.start()

        def issued_100() -> bool:
            assert not errors, errors[0]
            return sum(map(len, received)) >= 100

        eventually_sync(issued_100, 15, "100 issuances before the kill")
        kill_started = time.monotonic()
        server.kill()  # SIGKILL, while the clients are still sending
        for t in threads:  # each ends at its first failed call
            t.join(10)
            assert not t.is_alive()
        assert len(errors) == CLIENTS
        assert any(started < kill_started for started, _ in errors), "no call was in flight at the kill"

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
