"""Attestation from a real Unix socket connection: SO_PEERCRED, /proc/PID/exe and the pid-reuse guard."""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


def _can_unshare_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-Urm", "true"], check=False, capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason="unprivileged user and mount namespaces are not available")
def test_a_peer_in_another_mount_namespace_gets_no_path_selector(tmp_path: Path) -> None:
    """/proc/PID/exe names the binary as the peer's own mount namespace sees it.

    Any local user who may create a user namespace (Debian's default) can bind-mount a program of
    their own over ``/usr/bin/true`` there and exec it: the path read is ``/usr/bin/true``, so an entry
    for that path would go to the impostor. Outside the agent's mount namespace no path is trusted.
    """
    fake = tmp_path / "impostor"
    shutil.copy(os.path.realpath(sys.executable), fake)
    path = str(tmp_path / "s.sock")
    target = "/usr/bin/true"
    client = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); s.recv(1)"
    script = f"mount --bind {fake} {target} && exec {target} -c {shlex.quote(client)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        # The copy finds its standard library through PYTHONHOME, wherever it is mounted.
        env = {**os.environ, "PYTHONHOME": sys.base_prefix}
        child = subprocess.Popen(["unshare", "-Urm", "sh", "-c", script], env=env)
        try:
            server.settimeout(30)
            conn, _ = server.accept()
            with conn:
                peer = peer_credentials(conn)
                conn.send(b"x")
        finally:
            child.wait(timeout=30)
    assert peer.uid == os.getuid()  # the kernel maps the namespace's root back to the real uid
    assert os.readlink(f"/proc/{os.getpid()}/exe") != target
    assert peer.exe is None
    assert not any(s.startswith("unix:path:") for s in selectors_of(peer))
