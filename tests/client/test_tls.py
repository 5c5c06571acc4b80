"""ssl contexts from a source: mutual TLS between two workloads, and peers refused in either direction."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable

import pytest
from support.certs import serial
from support.ids import API, OTHER, TD, WEB
from support.poll import eventually_sync
from support.serving import Pair, Trust, free_port
from support.tls import TlsEcho, handshake, refused

import meshca
from meshca.client import SpiffeSSLContext, SvidSource
from meshca.testing import TestCA


def test_mutual_tls_between_two_sources(pair: Pair) -> None:
    server_ctx = pair.web.server_ssl_context(meshca.authorize_id(API))
    client_ctx = pair.api.client_ssl_context(meshca.authorize_id(WEB))
    assert isinstance(server_ctx, SpiffeSSLContext) and isinstance(client_ctx, ssl.SSLContext)
    with TlsEcho(server_ctx) as echo:
        reply = handshake(client_ctx, echo.port, b"hello")
    assert reply.peer == WEB
    assert reply.serial == serial(pair.web.svid)
    assert reply.data == b"echo:hello"
    assert [(a.peer, a.serial, a.data) for a in echo.accepted] == [(API, serial(pair.api.svid), b"hello")]
    assert echo.errors == []


def test_client_refuses_a_server_with_another_id(pair: Pair) -> None:
    with TlsEcho(pair.web.server_ssl_context(meshca.authorize_id(API))) as echo:
        client_ctx = pair.api.client_ssl_context(meshca.authorize_id(OTHER))
        with pytest.raises(ssl.SSLCertVerificationError, match=f"{WEB} is not authorized"):
            handshake(client_ctx, echo.port)
        # The client sent nothing: the server never got a request to answer.
        assert echo.accepted == []


def test_server_refuses_a_client_with_another_id(pair: Pair) -> None:
    with TlsEcho(pair.web.server_ssl_context(meshca.authorize_id(OTHER))) as echo:
        client_ctx = pair.api.client_ssl_context(meshca.authorize_id(WEB))
        # In TLS 1.3 the client finishes its handshake first; it then finds the connection closed.
        assert refused(client_ctx, echo.port, b"secret")
        assert echo.accepted == []
    assert len(echo.errors) == 1
    assert isinstance(echo.errors[0], ssl.SSLCertVerificationError)
    assert f"{API} is not authorized" in str(echo.errors[0])


def test_authorizers_other_than_one_id(pair: Pair) -> None:
    client_ctx = pair.api.client_ssl_context(meshca.authorize_member_of(meshca.TrustDomain.parse(TD)))
    for authorizer in (
        meshca.authorize_one_of(API, OTHER),
        meshca.authorize_any(),
        meshca.authorize_if(lambda sid: sid.path.endswith("/api")),
    ):
        with TlsEcho(pair.web.server_ssl_context(authorizer)) as echo:
            assert handshake(client_ctx, echo.port).data == b"echo:ping"
    with TlsEcho(pair.web.server_ssl_context(meshca.authorize_if(lambda sid: False, "nobody"))) as echo:
        assert refused(client_ctx, echo.port)
        # TLS 1.3: the client may be done before the server has recorded its refusal.
        eventually_sync(lambda: echo.errors, 5, "the server's refusal")
        assert echo.accepted == []
    # read after the server thread is joined: the client may see the refusal before the server records it
    assert "expected nobody" in str(echo.errors[0])


def test_peers_from_another_ca_are_refused_by_openssl_itself(pair: Pair, trust: Trust) -> None:
    rogue = TestCA(TD)
    impostor = rogue.issue_svid(API)  # the right ID, the wrong CA
    plain_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain_client.check_hostname = False
    trust.ca.configure_trust(plain_client)
    impostor.configure_cert(plain_client)
    with TlsEcho(pair.web.server_ssl_context(meshca.authorize_id(API))) as echo:
        assert refused(plain_client, echo.port)
        assert echo.accepted == []
    assert echo.errors and isinstance(echo.errors[0], ssl.SSLError)

    plain_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    rogue.issue_svid(WEB).configure_cert(plain_server)
    with TlsEcho(plain_server) as echo, pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(pair.api.client_ssl_context(meshca.authorize_id(WEB)), echo.port)


def test_a_peer_without_a_certificate_is_refused(pair: Pair, trust: Trust) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    trust.ca.configure_trust(anonymous)
    with TlsEcho(pair.web.server_ssl_context(meshca.authorize_any())) as echo:
        assert refused(anonymous, echo.port)
        assert echo.accepted == []
    assert echo.errors


def test_no_context_before_the_source_is_ready(trust: Trust, sources: Callable[..., SvidSource]) -> None:
    source = sources(f"127.0.0.1:{free_port()}", trust.ca.bundle, WEB, join_token="t")
    for make in (source.server_ssl_context, source.client_ssl_context):
        with pytest.raises(RuntimeError, match="wait_ready"):
            make(meshca.authorize_any())
    with pytest.raises(RuntimeError, match="wait_ready"):
        source.grpc_server_credentials()
    with pytest.raises(RuntimeError, match="wait_ready"):
        source.grpc_channel_credentials()


def test_a_client_context_does_not_care_for_host_names(pair: Pair) -> None:
    # A workload is named by its SPIFFE ID; the address it is reached at does not matter.
    client_ctx = pair.api.client_ssl_context(meshca.authorize_id(WEB))
    with (
        TlsEcho(pair.web.server_ssl_context(meshca.authorize_id(API))) as echo,
        socket.create_connection(("127.0.0.1", echo.port), timeout=5) as raw,
        client_ctx.wrap_socket(raw, server_hostname="not-the-name.example") as tls,
    ):
        tls.sendall(b"x")
        assert tls.recv(16) == b"echo:x"


_RELOAD_STRESS = """
import json, socket, ssl, sys, threading
from datetime import UTC, datetime
import meshca
from meshca.client._core import Snapshot, X509Svid
from meshca.client._tls import make_context, refresh
from meshca.testing import TestCA

ca = TestCA("example.org")
def svid(path):
    t = ca.issue_svid("spiffe://example.org/" + path, now=datetime.now(UTC))
    return X509Svid(t.spiffe_id, t.chain, t.key)
clock = lambda: datetime.now(UTC)
web = [Snapshot(svid("web"), ca.bundle) for _ in range(4)]
current = [web[0]]
server_ctx = make_context("server", lambda: current[0], meshca.authorize_any(), clock)
api = Snapshot(svid("api"), ca.bundle)
client_ctx = make_context("client", lambda: api, meshca.authorize_any(), clock)
stop = threading.Event()
reloads = [0]

def reload_forever():
    n = 0
    while not stop.is_set():
        n += 1
        current[0] = web[n % 4]
        refresh(server_ctx, current[0])
        reloads[0] = n

listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
server_errors = []

def serve():
    while not stop.is_set():
        conn, _ = listener.accept()
        with conn:
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(16))
            except (OSError, ssl.SSLError) as exc:
                server_errors.append(repr(exc))

threading.Thread(target=reload_forever, daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
failures = 0
overlapped = 0  # connections during which the server context was reloaded
served_by = set()
for n in range(int(sys.argv[1])):
    before = reloads[0]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, client_ctx.wrap_socket(raw) as tls:
            served_by.add(tls.getpeercert(binary_form=True))
            tls.sendall(b"x")
            assert tls.recv(16) == b"x"
    except (OSError, ssl.SSLError, AssertionError):
        failures += 1
    overlapped += reloads[0] > before
stop.set()
print(json.dumps({"failures": failures, "server_errors": sorted(set(server_errors)), "overlapped": overlapped,
                  "certificates": len(served_by)}))
"""


def test_reloading_a_live_context_while_other_threads_handshake() -> None:
    """The renewal thread reloads contexts that other threads are making connections from.

    Run in a child process: an unsynchronized reload can corrupt OpenSSL's
    memory and crash the process, not only fail handshakes.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_STRESS, "200"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert (result["failures"], result["server_errors"]) == (0, [])
    # The race ran: reloads landed during connections, which met more than one of the server's SVIDs.
    assert result["overlapped"] > 0
    assert result["certificates"] > 1


def test_server_contexts_issue_no_session_tickets(pair: Pair) -> None:
    """Every connection is checked against the bundle as it is now: no resumption to skip that."""
    ctx = pair.api.server_ssl_context(meshca.authorize_any())
    assert ctx.num_tickets == 0
    assert ctx.options & ssl.OP_NO_TICKET
    with TlsEcho(ctx) as echo:
        client = pair.web.client_ssl_context(meshca.authorize_id(API))
        with (
            socket.create_connection(("127.0.0.1", echo.port), timeout=10) as raw,
            client.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"ping")
            tls.recv(4)
            assert tls.session is None or not tls.session.has_ticket
