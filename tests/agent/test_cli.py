"""`meshca agent` as a process against `meshca serve` as one; py-spiffe finds it by SPIFFE_ENDPOINT_SOCKET."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import JwtSource, JwtSvid, WorkloadApiClient
from spiffe import TrustDomain as SpiffeTrustDomain
from support.agents import Agent
from support.ids import TD, WEB
from support.metrics import http_get
from support.poll import eventually_sync
from support.procs import ServeProcess, meshca_exe, run_meshca
from support.serving import free_port
from support.tokens import add_token

import meshca
from meshca._proto import meshca_agent_pb2 as apb
from meshca._proto import meshca_agent_pb2_grpc
from meshca.server import SqliteStore

AGENT = meshca.TrustDomain(TD).agent_id("node-1")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """The socket's directory: 0755 under /tmp (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="meshca-agent-cli-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def _entry(d: Path) -> None:
    store = meshca.server.SqliteStore(meshca.server.store_path(meshca.TrustDir.at(d)))
    try:
        entry = meshca.server._entries.new_entry(
            meshca.TrustDomain(TD), WEB, [f"unix:uid:{os.getuid()}"], now=meshca.system_clock(),
            max_x509_ttl=timedelta(days=1),
        )  # fmt: skip
        store.add_entry(entry)
    finally:
        store.close()


def _agent(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [meshca_exe(), "agent", *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@contextmanager
def _joining(
    d: Path, port: int, tmp_path: Path, run_dir: Path, *args: str
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """An entry for this uid, an agent token in a file, and `meshca agent` started with it (and killed on exit
    if it still runs); its socket path."""
    _entry(d)
    token_file = tmp_path / "token"
    token_file.write_text(add_token(d, AGENT, agent=True) + "\n")
    sock = run_dir / "api.sock"
    proc = _agent(
        "--server", f"localhost:{port}", "--bundle", d / "bundle.pem", "--token-file", token_file,
        "--socket", sock, "--data-dir", tmp_path / "data", "--sync-interval", "1s", *args,
    )  # fmt: skip
    try:
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def _wait_serving(proc: subprocess.Popen[str]) -> str:
    """The agent's startup line (it comes after its JSON log lines of joining)."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("meshca agent: serving"):
            return line
    raise AssertionError(f"meshca agent exited {proc.wait(10)}:\n{''.join(seen)}")


def test_agent_serves_py_spiffe_through_the_endpoint_variable_and_stops_cleanly(
    tmp_path: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "ca"
    meshca.TrustDir.at(d).init(meshca.TrustDomain(TD), now=meshca.system_clock())
    with ServeProcess(d, "--workers", "1") as server:
        server.wait_started()
        with _joining(d, server.port, tmp_path, run_dir, "--metrics-listen", "127.0.0.1:0") as (proc, sock):
            line = _wait_serving(proc)
            assert f"as {AGENT}" in line
            assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o777
            monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{sock}")

            def fetched() -> str:
                with WorkloadApiClient() as client:
                    return str(client.fetch_x509_svid(timeout=5).spiffe_id)

            eventually_sync(lambda: fetched() == str(WEB), 15, "py-spiffe getting its SVID")
            match = re.search(r"metrics on 127\.0\.0\.1:(\d+)", line)
            assert match is not None
            code, text = http_get(int(match.group(1)), "/metrics")
            assert code == 200
            # py-spiffe reads one message of the stream and cancels it
            assert re.search(
                r'meshca_agent_workload_requests_total\{code="(OK|CANCELLED)",method="FetchX509SVID"\} [1-9]', text
            )
            assert 'meshca_agent_syncs_total{outcome="ok"}' in text
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            assert not sock.exists()


def test_jwt_svids_of_either_worker_validate_at_the_agent_and_in_py_spiffe(tmp_path: Path, run_dir: Path) -> None:
    """`serve --workers 2`: each worker signs with a JWT key of its own; the agent and a JwtSource take both."""
    d = tmp_path / "ca"
    meshca.TrustDir.at(d).init(meshca.TrustDomain(TD), now=meshca.system_clock())
    with ServeProcess(d, "--workers", "2") as server:
        port, _ = server.wait_workers(2, 30)
        store = SqliteStore.reader(d / "meshca.db")
        try:
            eventually_sync(lambda: len(store.jwt_keys(meshca.system_clock())) == 2, 15, "a key from each worker")
        finally:
            store.close()
        with _joining(d, port, tmp_path, run_dir) as (proc, sock):
            _wait_serving(proc)
            endpoint = f"unix://{sock}"
            with WorkloadApiClient(socket_path=endpoint) as client:
                eventually_sync(lambda: bool(client.fetch_x509_svids(timeout=5)), 15, "the workload's SVID")
            tokens = _a_token_from_each_worker(d, port, tmp_path / "data" / "agent-svid.pem")
            with WorkloadApiClient(socket_path=endpoint) as client:
                assert {str(client.validate_jwt_svid(t, "db").spiffe_id) for t in tokens} == {str(WEB)}
            with JwtSource(socket_path=endpoint, timeout_in_seconds=10) as source:
                bundle = source.get_bundle_for_trust_domain(SpiffeTrustDomain(TD))
                assert bundle is not None
                assert {str(JwtSvid.parse_and_validate(t, bundle, {"db"}).spiffe_id) for t in tokens} == {str(WEB)}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0


def _a_token_from_each_worker(d: Path, port: int, saved: Path) -> list[str]:
    """JWT-SVIDs for the one entry asked of new connections until two workers (two key ids) answered."""
    data = saved.read_bytes()
    chain = tuple(c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(data))
    agent = Agent(AGENT, chain, meshca.load_private_key(data))
    store = SqliteStore.reader(d / "meshca.db")
    try:
        (entry,) = store.entries()
    finally:
        store.close()
    by_kid: dict[str, str] = {}
    bundle = (d / "bundle.pem").read_bytes()
    for _ in range(64):  # the kernel spreads new connections over the workers (SO_REUSEPORT)
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(bundle)) as channel:
            asked = agent.prove(
                apb.NewJWTSVIDRequest(entry_id=entry.id, audience=["db"]), "NewJWTSVID", datetime.now(UTC)
            )
            token = meshca_agent_pb2_grpc.AgentStub(channel).NewJWTSVID(asked, timeout=20).token
        by_kid[jwt.get_unverified_header(token)["kid"]] = token
        if len(by_kid) == 2:
            return list(by_kid.values())
    raise AssertionError("64 connections all reached one worker")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bundle", "b.pem", "--socket", "/tmp/x.sock"], "the following arguments are required: --server"),
        (["--server", "h:1", "--bundle", "b.pem", "--socket", "rel.sock"], "--socket must be an absolute path"),
        (
            [
                "--server",
                "h:1",
                "--bundle",
                "b.pem",
                "--socket",
                "/tmp/x.sock",
                "--join-token",
                "a",
                "--token-file",
                "f",
            ],
            "not allowed with argument",
        ),
        (["--server", "h:1", "--bundle", "missing.pem", "--socket", "/tmp/x.sock"], "missing.pem"),
    ],
    ids=["no-server", "relative-socket", "two-tokens", "no-bundle"],
)
def test_bad_flags_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_meshca("agent", *args, cwd=tmp_path)
    assert result.returncode in (1, 2)
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("meshca: error: ")


def test_an_unreachable_service_is_one_line(tmp_path: Path, run_dir: Path) -> None:
    d = tmp_path / "ca"
    meshca.TrustDir.at(d).init(meshca.TrustDomain(TD), now=meshca.system_clock())
    result = run_meshca(
        "agent", "--server", f"localhost:{free_port()}", "--bundle", d / "bundle.pem", "--join-token", "mtok_agent_x",
        "--socket", run_dir / "api.sock", "--data-dir", tmp_path / "data", timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("meshca: error: cannot join through localhost:") and "UNAVAILABLE" in last
    assert "Traceback" not in result.stderr
    assert not (run_dir / "api.sock").exists()


def test_without_a_token_or_a_saved_svid_the_agent_says_what_it_needs(tmp_path: Path, run_dir: Path) -> None:
    d = tmp_path / "ca"
    meshca.TrustDir.at(d).init(meshca.TrustDomain(TD), now=meshca.system_clock())
    result = run_meshca(
        "agent", "--server", f"localhost:{free_port()}", "--bundle", d / "bundle.pem",
        "--socket", run_dir / "api.sock", "--data-dir", tmp_path / "data",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("give --join-token or --token-file")
