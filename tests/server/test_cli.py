"""The service's CLI: `meshca token create`, `meshca log`, and `meshca serve` as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

import meshca
from meshca._proto import meshca_identity_pb2_grpc
from meshca.server import hash_token
from meshca.testing import TestCA

from .harness import API, WEB, K8sIssuer, cert, code_of, native_request, serial_hex, serving, spiffe_csr
from .kubeapi import FakeApiServer, review_token
from .procs import ServeProcess, run_meshca

C = grpc.StatusCode


async def meshca_cli(*args: str | Path) -> str:
    """Runs the console script off the event loop (the in-process server shares it); returns stdout."""
    result = await asyncio.to_thread(run_meshca, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_token_create_is_single_use_by_default(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        token = (await meshca_cli("token", "create", "--dir", d, "--spiffe-id", str(WEB))).strip()
        assert token.startswith("mtok_")
        codes = [
            await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=token))) for _ in range(2)
        ]
        assert codes == [C.OK, C.UNAUTHENTICATED]
        assert h.events("auth.failed")[0]["reason"] == "token_used_up"

        # stored hashed: neither the database nor its WAL holds the token itself
        files = sorted(d.glob("meshca.db*"))
        assert files
        stored = b"".join(f.read_bytes() for f in files)
        assert token.encode() not in stored
        assert token.removeprefix("mtok_").encode() not in stored
        assert hash_token(token).encode() in stored


async def test_token_create_with_uses_and_json(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        out = json.loads(
            await meshca_cli("token", "create", "--dir", d, "--spiffe-id", str(API), "--uses", "3", "--json")
        )
        assert (out["spiffe_id"], out["uses"]) == (str(API), 3)
        expires = datetime.fromisoformat(out["expires_at"])
        assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
        codes = [
            await code_of(h.native.IssueSVID(native_request(spiffe_csr(API)[1], join_token=out["token"])))
            for _ in range(4)
        ]
        assert codes == [C.OK, C.OK, C.OK, C.UNAUTHENTICATED]
        # a token grants its SPIFFE ID only, and a refused request does not spend a use
        token = (await meshca_cli("token", "create", "--dir", d, "--spiffe-id", str(API))).strip()
        wrong = await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=token)))
        assert wrong == C.PERMISSION_DENIED
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr(API)[1], join_token=token))) == C.OK


def test_token_create_refuses_another_trust_domain(d: Path, server_ca: TestCA) -> None:
    server_ca.write(d)
    result = run_meshca("token", "create", "--dir", d, "--spiffe-id", "spiffe://other.org/web")
    assert result.returncode != 0
    assert "trust domain" in result.stderr
    assert result.stdout == ""


async def test_log_lists_and_filters(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        issued = {}
        for sid in (WEB, API, WEB):
            response = await h.native.IssueSVID(native_request(spiffe_csr(sid)[1], join_token=h.token(sid)))
            issued[serial_hex(cert(response.leaf))] = (sid, cert(response.leaf))

        rows = json.loads(await meshca_cli("log", "--dir", d, "--json"))
        assert {r["serial"] for r in rows} == set(issued)
        for row in rows:
            assert set(row) >= {"serial", "spiffe_id", "not_after", "principal", "api", "issued_at"}
            sid, leaf = issued[row["serial"]]
            assert row["spiffe_id"] == str(sid)
            assert datetime.fromisoformat(row["not_after"]) == leaf.not_valid_after_utc
            assert row["api"] == "native"
            assert row["principal"].startswith("join-token:")
            assert abs(datetime.fromisoformat(row["issued_at"]) - h.clock()) < timedelta(minutes=1)

        web_rows = json.loads(await meshca_cli("log", "--dir", d, "--json", "--spiffe-id", str(WEB)))
        assert [r["spiffe_id"] for r in web_rows] == [str(WEB), str(WEB)]
        text = await meshca_cli("log", "--dir", d, "--spiffe-id", str(API))
        [line] = text.splitlines()
        assert str(API) in line
        assert "api=native" in line


def test_log_without_a_store_is_an_error(d: Path) -> None:
    result = run_meshca("log", "--dir", d, "--json")
    assert result.returncode != 0
    assert "no issuance log" in result.stderr


@pytest.mark.slow
def test_serve_initializes_an_empty_dir_and_drains_on_sigterm(
    tmp_path: Path, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    d = tmp_path / "fresh"
    d.mkdir()
    api_server.delay = 1.0  # keeps one issuance in flight while the server is told to stop
    flags = ["--k8s-api", api_server.url, "--k8s-api-ca", str(api_server.ca_file)]
    flags += ["--k8s-api-token-file", str(api_server.token_file), "--trust-domain", "example.org"]
    with ServeProcess(d, *flags) as server:
        port = server.wait_started()
        banner = "\n".join(line for line in server.lines if not line.startswith("{"))
        assert "DEVELOPMENT trust domain example.org" in banner
        assert meshca.TrustDir.at(d).is_initialized()
        bundle = meshca.TrustDir.at(d).load_bundle()

        token = review_token(api_server, k8s, "web", ["meshca"])
        outcome: list[object] = []

        def issue() -> None:
            with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(bundle.to_pem())) as channel:
                stub = meshca_identity_pb2_grpc.IdentityStub(channel)
                try:
                    outcome.append(stub.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token), timeout=10))
                except grpc.RpcError as exc:
                    outcome.append(exc)

        thread = threading.Thread(target=issue)
        thread.start()
        deadline = time.monotonic() + 10
        while api_server.in_flight == 0:
            assert time.monotonic() < deadline, "the issuance never reached the API server"
            time.sleep(0.01)
        started = time.monotonic()
        assert server.terminate() == 0
        thread.join(10)
        [response] = outcome
        assert not isinstance(response, Exception), response
        assert meshca.verify_chain([response.leaf, *response.intermediates], bundle, at=datetime.now(UTC)) == WEB
        assert time.monotonic() - started < 8

        # (with several worker processes, each drains and stops: the issuing one stops after it issued)
        names = [e["event"] for e in server.events]
        last_stopped = len(names) - 1 - names[::-1].index("server.stopped")
        assert names.index("server.draining") < names.index("svid.issued") < last_stopped
        output = "\n".join(server.lines)
        assert "BEGIN" not in output
        assert token not in output
