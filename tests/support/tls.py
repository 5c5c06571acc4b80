"""TLS peers on threads: an echo server that records whom it served, one-shot and looping handshakes."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

import meshca
from meshca.pki._verify import leaf_spiffe_id


def peer_id(tls: ssl.SSLSocket) -> tuple[meshca.SpiffeId, int]:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    return leaf_spiffe_id(leaf), int(leaf.serial_number)


@dataclass
class Accepted:
    peer: meshca.SpiffeId
    serial: int
    data: bytes


class TlsEcho:
    """A TLS server on 127.0.0.1 that answers ``echo:<data>``; it records whom it served and what failed."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self.accepted: list[Accepted] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tls-echo", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        peer, peer_serial = peer_id(tls)
                        data = tls.recv(1024)
                        tls.sendall(b"echo:" + data)
                        self.accepted.append(Accepted(peer, peer_serial, data))
                        # Say goodbye properly (close_notify), though clients may leave without theirs.
                        with contextlib.suppress(OSError):
                            tls.unwrap()
                except (OSError, ssl.SSLError, meshca.MeshcaError) as exc:
                    self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> TlsEcho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Reply:
    peer: meshca.SpiffeId
    serial: int
    data: bytes


def handshake(
    context: ssl.SSLContext, port: int, payload: bytes = b"ping", *, until: bytes | None = None, timeout: float = 5
) -> Reply:
    """Connects to 127.0.0.1:``port`` and sends ``payload``; the server's SPIFFE ID, leaf serial and reply.

    The reply is read to the end of the stream, or until it contains ``until``.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, context.wrap_socket(raw) as tls:
        peer, peer_serial = peer_id(tls)
        tls.sendall(payload)
        data = b""
        while (until is None or until not in data) and (chunk := tls.recv(1024)):
            data += chunk
    return Reply(peer, peer_serial, data)


def refused(context: ssl.SSLContext, port: int, payload: bytes = b"ping") -> bool:
    """True if a handshake and exchange with a server that should refuse us got no echo back.

    A client refused by the server may see its handshake fail, the connection
    closed or reset, or (TLS 1.3: the client finishes first) an empty reply.
    """
    try:
        reply = handshake(context, port, payload)
    except (ssl.SSLError, ConnectionError):
        return True
    return not reply.data.startswith(b"echo:")


class HandshakeLoop:
    """Handshakes with ``context`` against 127.0.0.1:``port`` every ``interval`` seconds, on a thread.

    Every handshake must complete and get its own payload echoed; anything
    else is recorded in ``failures`` with the time it happened.
    """

    def __init__(self, context: ssl.SSLContext, port: int, interval: float = 0.15) -> None:
        self.context = context
        self.port = port
        self.interval = interval
        self.replies: list[Reply] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="handshake-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            payload = b"ping %d" % n
            try:
                reply = handshake(self.context, self.port, payload)
            except Exception as exc:
                self.failures.append(f"{datetime.now(UTC).isoformat()} handshake {n}: {exc!r}")
                continue
            if reply.data != b"echo:" + payload:
                self.failures.append(f"{datetime.now(UTC).isoformat()} handshake {n}: reply {reply.data!r}")
            self.replies.append(reply)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> HandshakeLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
