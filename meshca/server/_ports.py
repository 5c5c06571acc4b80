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

__all__ = ["PortTaken", "bind_error", "claim", "release"]


class PortTaken(OSError):
    """The address is held by another process; the message names it."""


def bind_error(exc: OSError, host: str, port: int, what: str) -> PortTaken:
    """One line naming the address and what it was for."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
    return PortTaken(exc.errno, f"cannot listen on {where} ({what}): {reason}")


def claim(host: str, port: int, *, what: str, hold: bool = False) -> tuple[int, list[socket.socket]]:
    """Checks that nothing holds ``host:port``; returns the port (picked when 0) and the held sockets.

    Every address ``host`` resolves to is bound without SO_REUSEPORT, which
    fails if any socket holds it. With ``hold``, those sockets are then
    replaced by SO_REUSEPORT ones kept bound, which only SO_REUSEPORT
    sockets of this user can join; otherwise none are kept.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise bind_error(exc, host, port, what) from None
    addresses = list(dict.fromkeys((info[0], info[4][0]) for info in infos))
    probes: list[socket.socket] = []
    try:
        for family, address in addresses:
            probe = socket.socket(family, socket.SOCK_STREAM)
            probes.append(probe)
            try:
                probe.bind((address, port))
            except OSError as exc:
                raise bind_error(exc, host, port, what) from None
            port = probe.getsockname()[1]  # the next address takes the port picked for port 0
    finally:
        for probe in probes:
            probe.close()
    if not hold:
        return port, []
    # Between the close above and the bind below another process can take the port:
    # a window of microseconds at start, documented in SECURITY.md.
    held: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address, port))
    except OSError as exc:
        for sock in held:
            sock.close()
        raise bind_error(exc, host, port, what) from None
    return port, held


def release(held: list[socket.socket]) -> None:
    for sock in held:
        with contextlib.suppress(OSError):
            sock.close()
