"""Workload attestation: who is at the other end of a Unix socket connection, as selectors.

The kernel's SO_PEERCRED gives the peer's pid, uid and gid as they were at
connect(). uid and gid are the kernel's record and need nothing else; the
executable path is read from /proc/PID/exe, which names whatever process has
that pid *now*. The guard against pid reuse: a pidfd for the peer (SO_PEERPIDFD,
Linux 6.5+, which names the connecting process itself; else pidfd_open(pid) at
attestation) is held while /proc is read, and the process must still be alive
afterwards. A live process keeps its pid, so the path read belongs to it.
The path is as the peer's mount namespace sees it, so it is kept only for a
peer in the agent's own mount namespace: anyone allowed a user namespace can
bind-mount their own program over ``/usr/bin/foo`` in a namespace of their own.
See SECURITY.md, Node agent.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import socket
import struct
from dataclasses import dataclass

__all__ = ["PeerCredentials", "peer_credentials", "selectors_of"]

_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    exe: str | None  # None: the peer's pid is not visible here (another pid namespace) or /proc refused


def _pidfd(sock: socket.socket, pid: int) -> int | None:
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError:
        fd = -1
    if fd >= 0:
        return fd
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but not ours to signal: alive
        return True
    return True


def _mount_namespace(pid: int | str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The peer of a connected Unix socket; the path only if the process stayed alive while it was read, and is
    in the agent's mount namespace (read after the path: leaving a namespace it entered takes privileges)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    exe = None
    if pid > 0 and (pidfd := _pidfd(sock, pid)) is not None:
        try:
            try:
                path = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                path = None
            own = _mount_namespace("self")
            if path is not None and own is not None and _mount_namespace(pid) == own and _alive(pidfd):
                exe = path
        finally:
            os.close(pidfd)
    return PeerCredentials(pid, uid, gid, exe)


def selectors_of(peer: PeerCredentials) -> frozenset[str]:
    """``unix:uid:N``, ``unix:gid:N``, ``unix:user:NAME``, ``unix:group:NAME`` (resolved here), ``unix:path:EXE``."""
    found = {f"unix:uid:{peer.uid}", f"unix:gid:{peer.gid}"}
    with contextlib.suppress(KeyError):  # no such user here: no name selector
        found.add(f"unix:user:{pwd.getpwuid(peer.uid).pw_name}")
    with contextlib.suppress(KeyError):
        found.add(f"unix:group:{grp.getgrgid(peer.gid).gr_name}")
    if peer.exe is not None and not peer.exe.endswith(" (deleted)"):
        found.add(f"unix:path:{peer.exe}")
    return frozenset(found)
