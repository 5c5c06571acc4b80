"""Attestation from a real Unix socket connection: SO_PEERCRED, /proc/PID/exe and the pid-reuse guard."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import sys
from pathlib import Path

from meshca.agent import PeerCredentials, _attest, peer_credentials, selectors_of


def test_a_live_peer_is_attested_with_its_executable() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        peer = peer_credentials(left)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert peer.exe == os.path.realpath(sys.executable)
    assert selectors_of(peer) == {
        f"unix:uid:{os.getuid()}",
        f"unix:gid:{os.getgid()}",
        f"unix:user:{pwd.getpwuid(os.getuid()).pw_name}",
        f"unix:group:{grp.getgrgid(os.getgid()).gr_name}",
        f"unix:path:{os.path.realpath(sys.executable)}",
    }


def test_a_peer_that_exited_gets_no_path_selector(tmp_path: Path) -> None:
    """Its pid may belong to another process by now: uid and gid (the kernel's record of connect()) remain."""
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child connects and leaves at once
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
            os._exit(0)
        conn, _ = server.accept()
        with conn:
            os.waitpid(child, 0)  # gone and reaped: its pid is free for reuse
            peer = peer_credentials(conn)
            # The guard: the pidfd names the connecting process itself (SO_PEERPIDFD), which is dead,
            # whatever process holds its pid number now.
            pidfd = _attest._pidfd(conn, child)
            assert pidfd is not None
            try:
                assert not _attest._alive(pidfd)
            finally:
                os.close(pidfd)
    assert peer.pid == child
    assert peer.exe is None
    assert {s for s in selectors_of(peer) if s.startswith("unix:path:")} == set()
    assert f"unix:uid:{os.getuid()}" in selectors_of(peer)


def test_unknown_ids_and_deleted_executables_give_no_name_selectors() -> None:
    peer = PeerCredentials(pid=1, uid=987654, gid=987654, exe="/usr/bin/gone (deleted)")
    assert selectors_of(peer) == {"unix:uid:987654", "unix:gid:987654"}
