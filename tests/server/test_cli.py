"""The service's CLI: `meshca token create`, `meshca log`, and `meshca serve` as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from support.calls import code_of, native_request
from support.certs import cert, serial_hex, spiffe_csr
from support.ids import API, WEB
from support.kubeapi import FakeApiServer, review_token
from support.poll import eventually_sync
from support.procs import Result, ServeProcess, meshca_exe, run_meshca
from support.serving import serving
from support.tokens import K8sIssuer, add_token

import meshca
from meshca._proto import meshca_identity_pb2_grpc
from meshca.cli import build_parser
from meshca.server import ServerConfig, hash_token
from meshca.testing import TestCA

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

        everything = json.loads(await meshca_cli("log", "--dir", d, "--json"))
        own = [r for r in everything if r["api"] == "self"]
        assert len(own) == 1 and own[0]["principal"] == "meshca"  # the service's own TLS SVID is logged too
        assert own[0]["spiffe_id"] == f"spiffe://{server_ca.trust_domain.name}/meshca/identity"
        rows = [r for r in everything if r["api"] != "self"]
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
        eventually_sync(lambda: api_server.in_flight > 0, 10, "the issuance to reach the API server", interval=0.01)
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


# -- serve: where its directory comes from, and what it says about it


def _banner(server: ServeProcess) -> str:
    return "\n".join(line for line in server.lines if not line.startswith("{"))


def test_serve_refuses_a_missing_dir_without_create(tmp_path: Path) -> None:
    typo = tmp_path / "meshca-dta"
    result = run_meshca("serve", "--dir", typo, "--listen", "127.0.0.1:0", "--metrics-listen", "")
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "does not exist" in result.stderr and "--create" in result.stderr
    assert not typo.exists()


@pytest.mark.slow
def test_serve_dev_banner_on_every_start(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    with ServeProcess(d, "--create", "--workers", "1", "--trust-domain", "example.org") as server:
        server.wait_started()
        first = _banner(server)
        server.terminate()
    assert meshca.TrustDir.at(d).is_initialized()
    assert f"{d.resolve()} did not exist: created a DEVELOPMENT trust domain example.org" in first
    assert "was empty" not in first
    with ServeProcess(d, "--workers", "1") as server:
        server.wait_started()
        again = _banner(server)
        server.terminate()
    assert f"serving from {d.resolve()} a DEVELOPMENT trust domain example.org" in again
    for banner in (first, again):
        assert f"clients trust {d.resolve() / 'bundle.pem'}" in banner
        assert "server name localhost" in banner
        assert f"next: meshca token create --dir {d.resolve()} --spiffe-id spiffe://example.org/" in banner
        assert "keep dev/ out of version control" in banner


def test_serve_defaults_come_from_server_config() -> None:
    args = build_parser().parse_args(["serve"])
    defaults = ServerConfig(dir=Path("meshca-data"))
    assert args.dir is None  # the zero-config default: ./meshca-data, created when absent
    assert (args.listen, args.metrics_listen) == (defaults.listen, defaults.metrics_listen)
    assert args.listen.startswith("127.0.0.1:")
    assert (args.leaf_ttl, args.max_leaf_ttl) == (defaults.leaf_ttl, defaults.max_leaf_ttl)
    assert args.linkerd_namespace == defaults.linkerd_namespace
    assert (args.max_watch_streams, args.max_watch_streams_per_peer) == (
        defaults.max_watch_streams,
        defaults.max_watch_streams_per_peer,
    )


@pytest.mark.parametrize("anchor_key", [True, False], ids=["anchor-key-online", "anchor-key-offline"])
def test_serve_warns_about_an_anchor_key_beside_the_issuer(d: Path, anchor_key: bool) -> None:
    tdir = meshca.TrustDir.at(d)
    tdir.init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    if not anchor_key:
        tdir.anchor_key.unlink()
    with ServeProcess(d, "--workers", "1") as server:
        server.wait_started()
        banner = _banner(server)
        server.terminate()
    assert ("private key" in banner and str(tdir.anchor_key.resolve()) in banner) is anchor_key
    assert "DEVELOPMENT" not in banner


# -- check --server: the running service, as a client sees it


def test_check_server_reports_identity_health_and_issuer(d: Path, meshca_cmd: Callable[..., Result]) -> None:
    tdir = meshca.TrustDir.at(d)
    tdir.init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    issuer = meshca.pki._certs.load_certificates(tdir.issuer_cert.read_bytes())[0]
    with ServeProcess(d, "--workers", "1") as server:
        port = server.wait_started()
        remote = meshca_cmd("check", "--server", f"127.0.0.1:{port}", "--bundle", tdir.bundle,
                            "--server-name", "localhost", "--json")  # fmt: skip
        both = meshca_cmd("check", "--server", f"localhost:{port}", "--dir", d)
        wrong_name = meshca_cmd("check", "--server", f"127.0.0.1:{port}", "--bundle", tdir.bundle)
        other = d.parent / "other.pem"
        other.write_bytes(TestCA("example.org").bundle.to_pem())
        untrusted = meshca_cmd("check", "--server", f"localhost:{port}", "--bundle", other)
    assert remote.code == 0, remote
    findings = {f["check"]: f for f in json.loads(remote.stdout)}
    assert findings["server reachable"]["level"] == "ok"
    assert findings["server identity"]["message"].startswith("server presents spiffe://example.org/meshca/identity")
    served = findings[f"served issuer {meshca.pki._certs.fingerprint(issuer)[:11]} validity"]
    assert served["level"] == "ok" and "valid for" in served["message"]
    assert findings["server health"] == {
        "check": "server health", "level": "ok", "message": "grpc.health.v1 reports SERVING"
    }  # fmt: skip
    assert both.code == 0, both
    assert "[WARN]" not in both.stdout and "[FAIL]" not in both.stdout
    assert "server presents spiffe://example.org/meshca/identity" in both.stdout
    for failed in (wrong_name, untrusted):
        assert failed.code == 1, failed
        assert "[FAIL] cannot reach" in failed.stdout
        assert "Traceback" not in failed.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout


def test_check_server_that_is_not_there(tmp_path: Path, meshca_cmd: Callable[..., Result]) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(TestCA("example.org").bundle.to_pem())
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = meshca_cmd("check", "--server", f"127.0.0.1:{port}", "--bundle", bundle)
    assert result.code == 1, result
    assert f"[FAIL] cannot reach 127.0.0.1:{port}" in result.stdout
    nothing = meshca_cmd("check")
    assert nothing.code == 2 and nothing.stderr.startswith("meshca: error: give --dir, --server")


# -- fetch: the credential off argv, --exec through sh


def _fetch_args(d: Path, port: int, out: Path, *extra: str) -> list[str]:
    return ["fetch", "--server", f"localhost:{port}", "--bundle", str(d / "bundle.pem"),
            "--spiffe-id", str(WEB), "--out-dir", str(out), "--timeout", "20s", *extra]  # fmt: skip


def _add_token(d: Path) -> str:
    store = meshca.server.SqliteStore(meshca.server.store_path(meshca.TrustDir.at(d)))
    try:
        return add_token(store, WEB)
    finally:
        store.close()


def test_fetch_takes_the_token_from_the_environment_and_runs_exec_in_sh(d: Path, tmp_path: Path) -> None:
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    marker = tmp_path / "reloaded"
    with ServeProcess(d, "--workers", "1") as server:
        port = server.wait_started()
        token = _add_token(d)
        env = {**os.environ, "MESHCA_JOIN_TOKEN": token}
        exec_command = f"echo $(echo shell) | tr a-z A-Z >> {marker}"
        proc = subprocess.run(
            [meshca_exe(), *_fetch_args(d, port, tmp_path / "out", "--exec", exec_command)],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert marker.read_text() == "SHELL\n", "--exec runs through sh: $(...), pipes and >> work"
        assert token not in proc.stderr
        env.pop("MESHCA_JOIN_TOKEN")
        missing = subprocess.run(
            [meshca_exe(), *_fetch_args(d, port, tmp_path / "out2")],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "meshca: error: give --token-file, --jwt-file or --token, or set MESHCA_JOIN_TOKEN"
    )
    assert not (tmp_path / "out2").exists()


def test_serve_plaintext_warning_says_what_crosses_the_network(tmp_path: Path, server_ca: TestCA) -> None:
    server_ca.write(tmp_path / "td")
    with ServeProcess(tmp_path / "td", "--workers", "1", "--insecure-plaintext") as server:
        server.wait_started()
        server.terminate()
    [warning] = [line for line in _banner(server).splitlines() if "--insecure-plaintext" in line]
    assert "CSRs, certificates and credentials" in warning
    assert "keys" not in warning  # private keys never leave the workload, plaintext or not


# -- --store URL: the flag or MESHCA_STORE; its password never shown

STORE_COMMANDS = (("serve",), ("token", "create"), ("log",), ("issue",))


def test_store_help_never_shows_the_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCA_STORE", "postgresql://meshca:hunter2-pw@db.internal/meshca")
    for command in STORE_COMMANDS:
        shown = run_meshca(*command, "--help")
        assert shown.returncode == 0, shown.stderr
        assert "--store URL" in shown.stdout and "MESHCA_STORE" in shown.stdout
        assert "hunter2" not in shown.stdout + shown.stderr, command


def test_log_reads_the_store_meshca_store_names(d: Path, server_ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    server_ca.write(d)
    elsewhere = d.parent / "elsewhere.db"
    made = run_meshca("token", "create", "--dir", d, "--store", f"sqlite://{elsewhere}", "--spiffe-id", str(WEB))
    assert made.returncode == 0, made.stderr
    assert not (d / "meshca.db").exists()  # the token went to the named store
    issued = run_meshca(
        "issue", "--dir", d, "--store", f"sqlite://{elsewhere}", "--spiffe-id", str(WEB),
        "--cert-out", d.parent / "c.pem", "--key-out", d.parent / "k.pem", "--json",
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    monkeypatch.setenv("MESHCA_STORE", f"sqlite://{elsewhere}")
    shown = run_meshca("log", "--json")  # no --dir: the store is named
    assert shown.returncode == 0, shown.stderr
    assert [row["serial"] for row in json.loads(shown.stdout)] == [json.loads(issued.stdout)["serial"]]
    monkeypatch.delenv("MESHCA_STORE")
    assert run_meshca("log", "--json").returncode == 2  # neither --dir nor a store


@pytest.mark.parametrize("command", STORE_COMMANDS)
def test_an_unreachable_store_is_one_line_without_the_password(command: tuple[str, ...], d: Path) -> None:
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    url = "postgresql://meshca:s3cr3t-pw@127.0.0.1:1/meshca"  # nothing listens on port 1
    extra = {
        "serve": ["--listen", "127.0.0.1:0", "--metrics-listen", "", "--workers", "1"],
        "token": ["--spiffe-id", str(WEB)],
        "issue": ["--spiffe-id", str(WEB), "--cert-out", d / "c.pem", "--key-out", d / "k.pem"],
    }.get(command[0], [])
    result = run_meshca(*command, "--dir", d, "--store", url, *extra)
    assert result.returncode == 1
    [error] = [line for line in result.stderr.splitlines() if "error" in line]  # serve also warns of the anchor key
    assert error.startswith("meshca: error: cannot open store postgresql://meshca@127.0.0.1:1/meshca"), error
    assert "s3cr3t" not in result.stdout + result.stderr


def test_a_wrong_password_is_one_line_without_it(pg_database: str, d: Path) -> None:
    parts = urlsplit(pg_database)
    wrong = f"Wr0ng-{parts.password}-x"
    url = parts._replace(netloc=f"{parts.username}:{wrong}@{parts.hostname}:{parts.port}").geturl()
    result = run_meshca("log", "--store", url)
    assert result.returncode == 1
    assert "password authentication failed" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert wrong not in result.stderr and str(parts.password) not in result.stderr


def test_workers_that_cannot_reach_the_store_say_so_without_the_password(d: Path) -> None:
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    url = "postgresql://meshca:s3cr3t-pw@127.0.0.1:1/meshca"
    result = run_meshca(
        "serve", "--dir", d, "--store", url, "--listen", "127.0.0.1:0", "--metrics-listen", "", "--workers", "2"
    )
    assert result.returncode == 1
    failed = [json.loads(line) for line in result.stderr.splitlines() if '"worker.failed"' in line]
    assert failed and failed[0]["reason"].startswith("cannot open store postgresql://meshca@127.0.0.1:1/meshca")
    assert "s3cr3t" not in result.stdout + result.stderr
