"""stdlib `ssl` contexts that speak SPIFFE: present the current SVID, trust the current bundle,
and authorize the peer's SPIFFE ID before the connection is used.

Python's `ssl` has no verification callback, so OpenSSL first validates the
path against the anchors loaded into the context, and meshca then, as the
last step of the handshake, verifies the peer's chain again against the
*current* bundle with the SPIFFE rules and the authorizer. A peer that
fails is refused with `ssl.SSLCertVerificationError` and the connection is
closed: a server refuses before it reads a byte, a client before it sends one.

Contexts made here are updated in place when the SVID or bundle rotates
(`load_cert_chain` again; new anchors added), so new connections get the new
material without a restart. Anchors cannot be removed from a live context,
which is why the post-handshake check uses the current bundle.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.client._core import Snapshot, X509Svid
from meshca.pki._errors import VerificationError
from meshca.pki._time import Clock
from meshca.pki._verify import Authorizer, check_leaf_rules, leaf_spiffe_id, verify_chain

__all__ = ["SpiffeSSLContext", "make_context"]

_SHA256 = hashes.SHA256()
log = structlog.get_logger("meshca.client")

PeerCheck = Callable[[bytes | None, list[bytes] | None], None]


def _verified_chain(sslobj: ssl.SSLObject | ssl.SSLSocket) -> list[bytes] | None:
    """The chain OpenSSL verified, leaf first (public in 3.13; a private method of `_ssl` since 3.10)."""
    public = getattr(sslobj, "get_verified_chain", None)
    if public is not None:
        return list(public())
    inner = getattr(sslobj, "_sslobj", None)
    private = getattr(inner, "get_verified_chain", None)
    if private is None:
        return None
    return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in private()]  # type: ignore[attr-defined]


def _after_handshake(sslobj: ssl.SSLObject | ssl.SSLSocket) -> None:
    check: PeerCheck | None = getattr(sslobj.context, "meshca_peer_check", None)
    if check is None:
        return
    try:
        check(sslobj.getpeercert(binary_form=True), _verified_chain(sslobj))
    except VerificationError as exc:
        # asyncio reports failed server-side handshakes only in debug mode, so say it here.
        log.warning("tls.peer_refused", side="server" if sslobj.server_side else "client", reason=str(exc))
        raise ssl.SSLCertVerificationError(f"SPIFFE peer check failed: {exc}") from exc


class _SpiffeSSLObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _after_handshake(self)


class _SpiffeSSLSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _after_handshake(self)


class SpiffeSSLContext(ssl.SSLContext):
    """An `ssl.SSLContext` whose handshakes end with a SPIFFE check of the peer."""

    sslobject_class = _SpiffeSSLObject
    sslsocket_class = _SpiffeSSLSocket
    meshca_peer_check: PeerCheck | None = None
    meshca_anchors: set[bytes]
    meshca_svid: X509Svid | None = None

    def __init__(self, protocol: int | None = None, *args: Any, **kwargs: Any) -> None:
        # OpenSSL must not see the context change while it makes a connection from it: an SSL
        # made half-way through load_cert_chain gets the new certificate without its key (the
        # handshake fails), and the unsynchronized access can corrupt memory. `refresh` holds
        # this lock while it loads; making a connection (SSL_new, which copies the certificate
        # and key) holds it too. The handshake itself runs outside it.
        self.meshca_lock = threading.Lock()

    def _wrap_socket(self, *args: Any, **kwargs: Any) -> Any:
        with self.meshca_lock:
            return super()._wrap_socket(*args, **kwargs)  # type: ignore[misc]

    def _wrap_bio(self, *args: Any, **kwargs: Any) -> Any:
        with self.meshca_lock:
            return super()._wrap_bio(*args, **kwargs)  # type: ignore[misc]


@contextlib.contextmanager
def _in_memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read that never touches the disk where memfd exists (Linux)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("meshca", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="meshca-") as tmp:  # created 0700
        path = os.path.join(tmp, "material.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        yield path


def refresh(ctx: SpiffeSSLContext, snapshot: Snapshot) -> None:
    """Loads a new SVID and any new anchors into a live context."""
    svid = snapshot.svid
    if svid is not None and svid is not ctx.meshca_svid:
        with (
            _in_memory_file(svid.chain_pem) as cert_path,
            _in_memory_file(svid.key_pem()) as key_path,
            ctx.meshca_lock,
        ):
            ctx.load_cert_chain(cert_path, key_path)
        ctx.meshca_svid = svid
    new = [a for a in snapshot.bundle.anchors if a.fingerprint(_SHA256) not in ctx.meshca_anchors]
    if new:
        with ctx.meshca_lock:
            ctx.load_verify_locations(cadata="".join(a.public_bytes(Encoding.PEM).decode() for a in new))
        ctx.meshca_anchors.update(a.fingerprint(_SHA256) for a in new)


def make_context(
    side: Literal["server", "client"],
    current: Callable[[], Snapshot],
    authorizer: Authorizer,
    clock: Clock,
) -> SpiffeSSLContext:
    """A context for one side, loaded from ``current()`` and checking peers against its bundle."""
    snapshot = current()
    if snapshot.svid is None:
        raise RuntimeError("the source has no SVID yet; call wait_ready() first")
    ctx = SpiffeSSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    if side == "client":
        ctx.check_hostname = False  # the peer is named by its SPIFFE ID, which the check enforces
    else:
        # No session resumption: a resumed handshake carries no verified chain, and every
        # connection should be checked against the bundle as it is now.
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    ctx.meshca_anchors = set()
    refresh(ctx, snapshot)
    peer_role: Literal["client", "server"] = "client" if side == "server" else "server"

    def check(leaf: bytes | None, chain: list[bytes] | None) -> None:
        if leaf is None:
            raise VerificationError("peer presented no certificate")
        if chain:
            verify_chain(chain, current().bundle, at=clock(), authorizer=authorizer, role=peer_role)
            return
        # No verified chain on this Python: OpenSSL validated the path; apply the leaf rules here.
        cert = x509.load_der_x509_certificate(leaf)
        sid = leaf_spiffe_id(cert)
        check_leaf_rules(cert, peer_role)
        authorizer(sid)

    ctx.meshca_peer_check = check
    return ctx
