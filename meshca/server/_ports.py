"""Port ownership: only the workers of one `meshca serve` may share its port.

Linux lets a socket bind a port another socket holds only when both set
SO_REUSEPORT (and run as the same user); the kernel then splits connections
between them. So a server first binds its addresses *without* SO_REUSEPORT:
that fails when anything else holds the port, and meshca stops with one line
naming the address. The supervisor of `serve --workers N` then holds the
port for its whole life with a bound (never listening, so it is given no
connections) SO_REUSEPORT socket that only its own workers, which set
SO_REUSEPORT too, can join. See SECURITY.md, "Port ownership".
"""

from __future__ import annotations

import contextlib
import errno
import socket

from meshca.pki._errors import PortTaken

__all__ = ["bind_error", "claim", "release"]


def bind_error(exc: OSError, host: str, port: int, what: str) -> PortTaken:
    """One line naming the address and what it was for."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
    return PortTaken(f"cannot listen on {where} ({what}): {reason}")


def _bind(family: int, address: str, port: int, *options: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for option in options:
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def claim(host: str, port: int, *, what: str, hold: bool = False) -> tuple[int, list[socket.socket]]:
    """Checks that nothing holds ``host:port``; returns the port (picked when 0) and the held sockets.

    Every address ``host`` resolves to is bound without SO_REUSEPORT, which
    fails if any socket listens there or is bound there without
    SO_REUSEADDR. (The probe sets SO_REUSEADDR, as gRPC does, only so that
    connections of a previous server still in TIME_WAIT do not count.) With
    ``hold``, the probes are then replaced by SO_REUSEPORT sockets kept bound,
    which only SO_REUSEPORT sockets of this user can join; otherwise none are
    kept.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise bind_error(exc, host, port, what) from None
    addresses = list(dict.fromkeys((info[0], str(info[4][0])) for info in infos))
    held: list[socket.socket] = []
    try:
        for family, address in addresses:
            held.append(_bind(family, address, port, socket.SO_REUSEADDR))
            port = held[-1].getsockname()[1]  # the next address takes the port picked for port 0
        release(held)
        if not hold:
            return port, []
        # Between the close above and the bind below another process can take the port:
        # a window of microseconds at start, documented in SECURITY.md.
        held = []
        for family, address in addresses:
            try:
                held.append(_bind(family, address, port, socket.SO_REUSEPORT))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                # TIME_WAIT connections of a previous server that did not set SO_REUSEPORT:
                # only SO_REUSEADDR gets past them (see SECURITY.md for what that allows).
                held.append(_bind(family, address, port, socket.SO_REUSEPORT, socket.SO_REUSEADDR))
    except OSError as exc:
        release(held)
        raise bind_error(exc, host, port, what) from None
    return port, held


def release(held: list[socket.socket]) -> None:
    for sock in held:
        with contextlib.suppress(OSError):
            sock.close()
