"""Interop with the openssl command: its s_server and s_client against a source's ssl contexts.

The openssl side gets the SVID and bundle as files, written from a source's
snapshot the way a sidecar would hand them to a proxy.
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.ids import API, OTHER, WEB
from support.poll import eventually_sync
from support.serving import Pair, Trust, free_port
from support.tls import TlsEcho, handshake, refused

import meshca
from meshca.client import SvidSource, X509Svid
from meshca.testing import TestSvid

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


class OpenSSL:
    """One openssl process; its stdout and stderr are collected on a thread."""

    def __init__(self, *args: str | Path) -> None:
        assert OPENSSL is not None
        self.proc = subprocess.Popen(
            [OPENSSL, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):
            self._output += chunk

    @property
    def output(self) -> str:
        return self._output.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 10) -> None:
        def printed() -> bool:
            if text in self.output:
                return True
            assert self.proc.poll() is None, f"openssl exited without printing {text!r}:\n{self.output}"
            return False

        eventually_sync(printed, timeout, f"openssl to print {text!r}")

    def send(self, data: bytes) -> None:
        """Writes to openssl's stdin; an openssl that already exited (a refused handshake) reads nothing."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def end_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 10) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):  # unread input of an openssl that exited
                    pipe.close()


@pytest.fixture
def openssl() -> Iterator[Callable[..., OpenSSL]]:
    """Starts openssl processes; kills whatever still runs at teardown."""
    started: list[OpenSSL] = []

    def start(*args: str | Path) -> OpenSSL:
        started.append(OpenSSL(*args))
        return started[-1]

    yield start
    for process in started:
        process.close()


def write_svid(directory: Path, name: str, svid: X509Svid | TestSvid) -> list[str]:
    """Writes the leaf, the rest of the chain and the key (0600); the openssl arguments that load them."""
    key_pem = svid.key_pem() if isinstance(svid, X509Svid) else svid.key_pem
    leaf, *rest = svid.chain
    cert, chain, key = directory / f"{name}.pem", directory / f"{name}-chain.pem", directory / f"{name}.key"
    cert.write_bytes(meshca.pki._certs.certificates_pem([leaf]))
    chain.write_bytes(meshca.pki._certs.certificates_pem(rest))
    key.touch(0o600)
    key.write_bytes(key_pem)
    return ["-cert", str(cert), "-cert_chain", str(chain), "-key", str(key)]


def write_bundle_file(directory: Path, source: SvidSource) -> Path:
    path = directory / "bundle.pem"
    path.write_bytes(source.snapshot.bundle.to_pem())
    return path


def s_server(openssl: Callable[..., OpenSSL], port: int, svid_args: list[str], bundle: Path) -> OpenSSL:
    server = openssl(
        "s_server",
        "-accept",
        f"127.0.0.1:{port}",
        *svid_args,
        "-CAfile",
        bundle,
        "-Verify",
        "1",
        "-verify_return_error",
        "-rev",
    )
    server.wait_for("ACCEPT")
    return server


def s_client(openssl: Callable[..., OpenSSL], port: int, svid_args: list[str], bundle: Path) -> OpenSSL:
    return openssl(
        "s_client", "-connect", f"127.0.0.1:{port}", *svid_args, "-CAfile", bundle, "-verify_return_error", "-brief"
    )


# -- openssl s_server, Python client


def test_python_client_against_openssl_s_server(pair: Pair, tmp_path: Path, openssl: Callable[..., OpenSSL]) -> None:
    port = free_port()
    server = s_server(openssl, port, write_svid(tmp_path, "web", pair.web.svid), write_bundle_file(tmp_path, pair.web))
    client_ctx = pair.api.client_ssl_context(meshca.authorize_id(WEB))
    reply = handshake(client_ctx, port, b"hello meshca\n", until=b"\n")
    assert reply.peer == WEB
    assert reply.data == b"achsem olleh\n"  # -rev: the line reversed
    server.wait_for("Verification: OK")  # and s_server verified our SVID chain against the bundle


def test_python_client_refuses_an_openssl_server_with_another_id(
    pair: Pair, trust: Trust, tmp_path: Path, openssl: Callable[..., OpenSSL]
) -> None:
    port = free_port()
    impostor = trust.ca.issue_svid(OTHER)  # a valid SVID of this trust domain, for the wrong workload
    s_server(openssl, port, write_svid(tmp_path, "other", impostor), write_bundle_file(tmp_path, pair.web))
    client_ctx = pair.api.client_ssl_context(meshca.authorize_id(WEB))
    with pytest.raises(ssl.SSLCertVerificationError, match=f"{OTHER} is not authorized"):
        handshake(client_ctx, port, b"secret\n", until=b"\n")


def test_openssl_s_server_refuses_a_client_without_an_svid(
    pair: Pair, tmp_path: Path, openssl: Callable[..., OpenSSL]
) -> None:
    port = free_port()
    server = s_server(openssl, port, write_svid(tmp_path, "web", pair.web.svid), write_bundle_file(tmp_path, pair.web))
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=pair.web.bundle.to_pem().decode())
    assert refused(anonymous, port, b"hello\n")
    server.wait_for("peer did not return a certificate")


# -- Python server, openssl s_client


def test_openssl_s_client_against_python_server(pair: Pair, tmp_path: Path, openssl: Callable[..., OpenSSL]) -> None:
    bundle = write_bundle_file(tmp_path, pair.api)
    with TlsEcho(pair.web.server_ssl_context(meshca.authorize_id(API))) as echo:
        client = s_client(openssl, echo.port, write_svid(tmp_path, "api", pair.api.svid), bundle)
        client.wait_for("Verification: OK")  # s_client verified the Python server's SVID chain
        client.send(b"hello\n")
        client.wait_for("echo:hello")
        client.end_input()
        code = client.wait()
        assert code == 0
    assert [(a.peer, a.data) for a in echo.accepted] == [(API, b"hello\n")]
    assert echo.errors == []


def test_python_server_refuses_an_unauthorized_openssl_client(
    pair: Pair, trust: Trust, tmp_path: Path, openssl: Callable[..., OpenSSL]
) -> None:
    bundle = write_bundle_file(tmp_path, pair.api)
    impostor = trust.ca.issue_svid(OTHER)
    with TlsEcho(pair.web.server_ssl_context(meshca.authorize_id(API))) as echo:
        client = s_client(openssl, echo.port, write_svid(tmp_path, "other", impostor), bundle)
        client.send(b"secret\n")
        client.wait(10)  # the server closes the connection; s_client ends by itself
    assert "echo:" not in client.output
    assert echo.accepted == []
    assert len(echo.errors) == 1
    assert isinstance(echo.errors[0], ssl.SSLCertVerificationError)
    assert f"{OTHER} is not authorized" in str(echo.errors[0])


def test_python_server_refuses_an_openssl_client_without_a_certificate(
    pair: Pair, tmp_path: Path, openssl: Callable[..., OpenSSL]
) -> None:
    bundle = write_bundle_file(tmp_path, pair.api)
    with TlsEcho(pair.web.server_ssl_context(meshca.authorize_any())) as echo:
        client = s_client(openssl, echo.port, [], bundle)
        client.send(b"secret\n")
        client.wait(10)
    assert "echo:" not in client.output
    assert echo.accepted == []
    assert echo.errors and "certificate" in str(echo.errors[0]).lower()
