"""Other stacks accept what meshca issues: OpenSSL, GnuTLS, py-spiffe, and a real TLS 1.3 handshake.

The tools are required: CI installs them, so a missing one fails rather than skips.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from support.certbuild import NOW

import meshca
from meshca import SpiffeId, authorize_id, authorize_member_of
from meshca.testing import TestCA, TestSvid

WEB = "spiffe://example.org/ns/default/sa/web"
DB = "spiffe://example.org/ns/default/sa/db"
TIMEOUT = 10.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; CI installs it (apt-get install openssl gnutls-bin)")
    return path


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30, check=False)


@dataclass
class Files:
    bundle: Path
    issuer: Path
    leaf: Path
    chain: Path


def _write(tmp: Path, ca: TestCA, svid: TestSvid, tag: str = "") -> Files:
    files = Files(tmp / f"bundle{tag}.pem", tmp / f"issuer{tag}.pem", tmp / f"leaf{tag}.pem", tmp / f"chain{tag}.pem")
    files.bundle.write_bytes(ca.bundle.to_pem())
    files.issuer.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain[1:]))
    files.leaf.write_bytes(svid.leaf.public_bytes(serialization.Encoding.PEM))
    files.chain.write_bytes(svid.chain_pem)
    return files


VARIANTS: dict[str, dict[str, object]] = {
    "ec-p256": {},
    "ec-p384": {"key_type": meshca.KeyType.EC_P384},
    "rsa-2048": {"key_type": meshca.KeyType.RSA_2048},
    "dns-names": {"dns_names": ["web.default.svc.cluster.local"]},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def live_files(request: pytest.FixtureRequest, live_ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Files:
    svid = live_ca.issue_svid(WEB, **VARIANTS[request.param])  # type: ignore[arg-type]
    return _write(tmp_path_factory.mktemp(request.param), live_ca, svid)


# -- OpenSSL


@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_openssl_verify(live_files: Files, purpose: str) -> None:
    result = _run(
        _tool("openssl"), "verify", "-purpose", purpose, "-CAfile", live_files.bundle,
        "-untrusted", live_files.issuer, live_files.leaf,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{live_files.leaf}: OK"


@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_openssl_rejects_another_cas_bundle(
    live_files: Files, live_foreign_ca: TestCA, tmp_path: Path, purpose: str
) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(live_foreign_ca.bundle.to_pem())
    result = _run(
        _tool("openssl"), "verify", "-purpose", purpose, "-CAfile", other, "-untrusted", live_files.issuer,
        live_files.leaf,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unable to get" in result.stdout + result.stderr


def test_openssl_at_the_frozen_time(ca: TestCA, tmp_path: Path) -> None:
    """OpenSSL agrees with meshca about the validity window of a leaf minted at a frozen time."""
    files = _write(tmp_path, ca, ca.issue_svid(WEB, now=NOW, ttl=timedelta(hours=1)))
    base = [_tool("openssl"), "verify", "-purpose", "sslclient", "-CAfile", files.bundle, "-untrusted", files.issuer]
    inside = int((NOW + timedelta(minutes=30)).timestamp())
    after = int((NOW + timedelta(hours=1, minutes=1)).timestamp())
    assert _run(*base, "-attime", str(inside), files.leaf).returncode == 0
    expired = _run(*base, "-attime", str(after), files.leaf)
    assert expired.returncode != 0
    assert "expired" in expired.stdout + expired.stderr
    with pytest.raises(meshca.VerificationError, match="expired"):
        meshca.verify_chain(files.chain.read_bytes(), ca.bundle, at=NOW + timedelta(hours=1, minutes=1))


# -- GnuTLS


def test_certtool_verify(live_files: Files) -> None:
    result = _run(
        _tool("certtool"), "--verify", "--load-ca-certificate", live_files.bundle, "--infile", live_files.chain
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Chain verification output: Verified" in result.stdout


def test_certtool_rejects_another_cas_bundle(live_files: Files, live_foreign_ca: TestCA, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(live_foreign_ca.bundle.to_pem())
    result = _run(_tool("certtool"), "--verify", "--load-ca-certificate", other, "--infile", live_files.chain)
    assert result.returncode != 0
    assert "Chain verification output: Verified" not in result.stdout


# -- py-spiffe


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_py_spiffe_parses_the_svid(ca: TestCA, variant: str) -> None:
    svid = ca.issue_svid(WEB, now=NOW, **VARIANTS[variant])  # type: ignore[arg-type]
    parsed = spiffe.X509Svid.parse(svid.chain_pem, svid.key_pem)
    assert str(parsed.spiffe_id) == WEB
    assert parsed.leaf == svid.leaf
    assert list(parsed.cert_chain) == list(svid.chain)


def test_py_spiffe_reads_the_bundle(ca: TestCA) -> None:
    bundle = spiffe.X509Bundle.parse(spiffe.TrustDomain("example.org"), ca.bundle.to_pem())
    assert set(bundle.x509_authorities) == {ca.anchor}


@settings(max_examples=50)
@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=30),
    st.lists(
        st.text(
            alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_", min_size=1, max_size=10
        ).filter(lambda s: s not in (".", "..")),
        max_size=5,
    ),
)
def test_py_spiffe_agrees_on_valid_ids(td: str, segments: list[str]) -> None:
    text = f"spiffe://{td}" + "".join("/" + s for s in segments)
    ours = SpiffeId.parse(text)
    theirs = spiffe.SpiffeId(text)
    assert str(theirs) == str(ours) == text
    assert str(theirs.trust_domain) == str(ours.trust_domain)


# -- a real TLS 1.3 handshake with SVIDs on both sides


def _context(purpose: ssl.Purpose, svid: TestSvid | None, ca: TestCA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE authorizes by URI SAN, not by host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    if svid is not None:
        svid.configure_cert(ctx)
    ca.configure_trust(ctx)
    return ctx


def _peer(tls: ssl.SSLSocket, ca: TestCA, authorizer: meshca.Authorizer, role: str) -> SpiffeId:
    """The peer's SPIFFE ID, after the SPIFFE rules and the authorizer.

    stdlib ssl (3.11) hands over only the leaf; OpenSSL has already validated
    the path, and the local issuer chain lets meshca re-verify it at the real time.
    """
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    sid = meshca.leaf_spiffe_id(leaf)
    verified = meshca.verify_chain(
        [der, *ca.issuer.intermediates],
        ca.bundle,
        at=meshca.system_clock(),
        authorizer=authorizer,
        role=role,  # type: ignore[arg-type]
    )
    assert verified == sid
    return sid


@dataclass
class ServerOutcome:
    peer: SpiffeId | None = None
    error: BaseException | None = None
    received: bytes = b""
    cipher: tuple[str, str, int] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def _serve_once(
    listener: socket.socket, ctx: ssl.SSLContext, ca: TestCA, authorizer: meshca.Authorizer
) -> ServerOutcome:
    outcome = ServerOutcome()

    def run() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    outcome.cipher = tls.cipher()
                    try:
                        outcome.peer = _peer(tls, ca, authorizer, "client")
                    except meshca.VerificationError as exc:
                        outcome.error = exc
                        return  # closing the connection is the refusal
                    outcome.received = tls.recv(1024)
                    tls.sendall(b"hello " + str(outcome.peer).encode())
        except (OSError, ssl.SSLError) as exc:
            outcome.error = exc
        finally:
            outcome.done.set()

    outcome.thread = threading.Thread(target=run, daemon=True)
    outcome.thread.start()
    return outcome


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        sock.settimeout(TIMEOUT)
        yield sock


def _connect(listener: socket.socket, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    try:
        return ctx.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise


def _finish(outcome: ServerOutcome) -> None:
    assert outcome.done.wait(TIMEOUT), "server thread did not finish"
    assert outcome.thread is not None
    outcome.thread.join(TIMEOUT)
    assert not outcome.thread.is_alive()


def test_mtls_handshake_with_svids_on_both_sides(live_ca: TestCA, listener: socket.socket) -> None:
    server_svid = live_ca.issue_svid(DB)
    client_svid = live_ca.issue_svid(WEB)
    outcome = _serve_once(
        listener, _context(ssl.Purpose.CLIENT_AUTH, server_svid, live_ca), live_ca, authorize_id(SpiffeId.parse(WEB))
    )
    with _connect(listener, _context(ssl.Purpose.SERVER_AUTH, client_svid, live_ca)) as tls:
        assert tls.version() == "TLSv1.3"
        server_id = _peer(tls, live_ca, authorize_id(SpiffeId.parse(DB)), "server")
        assert server_id == SpiffeId.parse(DB)
        tls.sendall(b"ping")
        reply = b""
        for _ in range(10):  # bounded: the reply is short
            chunk = tls.recv(1024)
            if not chunk:
                break
            reply += chunk
            if reply.endswith(WEB.encode()):
                break
    _finish(outcome)
    assert outcome.error is None, outcome.error
    assert outcome.peer == SpiffeId.parse(WEB)
    assert outcome.received == b"ping"
    assert reply == b"hello " + WEB.encode()
    assert outcome.cipher is not None and outcome.cipher[1] == "TLSv1.3"


def test_server_refuses_an_unauthorized_client(live_ca: TestCA, listener: socket.socket) -> None:
    intruder = live_ca.issue_svid("spiffe://example.org/ns/default/sa/intruder")
    outcome = _serve_once(
        listener,
        _context(ssl.Purpose.CLIENT_AUTH, live_ca.issue_svid(DB), live_ca),
        live_ca,
        authorize_id(SpiffeId.parse(WEB)),
    )
    reply = b"not read"
    with _connect(listener, _context(ssl.Purpose.SERVER_AUTH, intruder, live_ca)) as tls:
        _peer(tls, live_ca, authorize_member_of(live_ca.trust_domain), "server")
        try:
            tls.sendall(b"ping")
            reply = tls.recv(1024)
        except (ssl.SSLError, ConnectionError):
            reply = b""
    _finish(outcome)
    assert isinstance(outcome.error, meshca.AuthorizationError), outcome.error
    assert "spiffe://example.org/ns/default/sa/intruder is not authorized" in str(outcome.error)
    assert outcome.peer is None
    assert reply == b"", "the server closed without answering"


def test_server_refuses_a_client_of_another_ca(
    live_ca: TestCA, live_foreign_ca: TestCA, listener: socket.socket
) -> None:
    outsider = live_foreign_ca.issue_svid(WEB)
    outcome = _serve_once(
        listener,
        _context(ssl.Purpose.CLIENT_AUTH, live_ca.issue_svid(DB), live_ca),
        live_ca,
        authorize_id(SpiffeId.parse(WEB)),
    )
    with _connect(listener, _context(ssl.Purpose.SERVER_AUTH, outsider, live_ca)) as tls:
        try:
            tls.sendall(b"ping")
            reply = tls.recv(1024)
        except (ssl.SSLError, ConnectionError):
            reply = b""
    _finish(outcome)
    assert isinstance(outcome.error, ssl.SSLError), outcome.error
    assert outcome.peer is None
    assert reply == b""


def test_server_requires_a_client_certificate(live_ca: TestCA, listener: socket.socket) -> None:
    outcome = _serve_once(
        listener,
        _context(ssl.Purpose.CLIENT_AUTH, live_ca.issue_svid(DB), live_ca),
        live_ca,
        authorize_id(SpiffeId.parse(WEB)),
    )
    with _connect(listener, _context(ssl.Purpose.SERVER_AUTH, None, live_ca)) as tls:
        try:
            tls.sendall(b"ping")
            reply = tls.recv(1024)
        except (ssl.SSLError, ConnectionError):
            reply = b""
    _finish(outcome)
    assert isinstance(outcome.error, ssl.SSLError), outcome.error
    assert outcome.peer is None
    assert reply == b""


def test_client_refuses_a_server_with_the_wrong_id(live_ca: TestCA, listener: socket.socket) -> None:
    outcome = _serve_once(
        listener,
        _context(ssl.Purpose.CLIENT_AUTH, live_ca.issue_svid(DB), live_ca),
        live_ca,
        authorize_id(SpiffeId.parse(WEB)),
    )
    with _connect(listener, _context(ssl.Purpose.SERVER_AUTH, live_ca.issue_svid(WEB), live_ca)) as tls:
        with pytest.raises(meshca.AuthorizationError, match=r"expected spiffe://example\.org/ns/default/sa/api"):
            _peer(tls, live_ca, authorize_id(SpiffeId.parse("spiffe://example.org/ns/default/sa/api")), "server")
        tls.sendall(b"bye")
    _finish(outcome)
    assert outcome.peer == SpiffeId.parse(WEB)
