"""Port ownership: only the workers of one `meshca serve` share its port; anything else holding it fails the start.

Every failed start exits 1 with exactly one line on stderr that names the
address, prints no traceback and leaves nothing in the temp directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from support.procs import ServeProcess, meshca_exe

import meshca
from meshca.server._ports import claim, release

from .test_workers import _started

WORKERS = ["1", "2"]


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> dict[str, str]:
    """A private TMPDIR, so a test sees whatever a failed start leaves behind."""
    private = tmp_path / "tmp"
    private.mkdir()
    return {**os.environ, "TMPDIR": str(private)}


def _trust_dir(path: Path) -> Path:
    """A serving directory as production keeps it: the anchor key is offline (else serve warns about it)."""
    path.mkdir(exist_ok=True)
    tdir = meshca.TrustDir.at(path)
    tdir.init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    tdir.anchor_key.unlink()
    return path


def _fails_to_start(directory: Path, env: dict[str, str], listen: str, metrics: str, workers: str) -> str:
    """Runs a second `meshca serve`; returns its one stderr line after checking it exited 1 and left nothing."""
    args = [meshca_exe(), "serve", "--dir", str(directory), "--listen", listen, "--metrics-listen", metrics]
    proc = subprocess.Popen([*args, "--workers", workers], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail("a second meshca serve started on a taken port:\n" + err.decode(errors="replace"))
    lines = err.decode().splitlines()
    assert proc.returncode == 1, lines
    assert len(lines) == 1, lines
    assert list(Path(env["TMPDIR"]).iterdir()) == []
    return lines[0]


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("reuse_port", [True, False])
def test_a_port_held_by_another_program(
    tmp_path: Path, tmpdir_env: dict[str, str], workers: str, reuse_port: bool
) -> None:
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1 if reuse_port else 0)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        d = _trust_dir(tmp_path / "trust")
        line = _fails_to_start(d, tmpdir_env, f"127.0.0.1:{port}", "127.0.0.1:0", workers)
        assert line == f"meshca: error: cannot listen on 127.0.0.1:{port} (gRPC): address already in use"
        line = _fails_to_start(d, tmpdir_env, "127.0.0.1:0", f"127.0.0.1:{port}", workers)
        assert line == f"meshca: error: cannot listen on 127.0.0.1:{port} (metrics): address already in use"


@pytest.mark.parametrize("first", WORKERS)
def test_a_port_held_by_a_running_meshca_serve(tmp_path: Path, tmpdir_env: dict[str, str], first: str) -> None:
    """The first-hour incident: a second trust domain started beside a running one on the same port."""
    with ServeProcess(_trust_dir(tmp_path / "one"), "--workers", first) as running:
        port, metrics_port = _started(running, int(first))
        other = _trust_dir(tmp_path / "other")
        for workers in WORKERS:
            line = _fails_to_start(other, tmpdir_env, f"127.0.0.1:{port}", "127.0.0.1:0", workers)
            assert line == f"meshca: error: cannot listen on 127.0.0.1:{port} (gRPC): address already in use"
            line = _fails_to_start(other, tmpdir_env, "127.0.0.1:0", f"127.0.0.1:{metrics_port}", workers)
            assert line == f"meshca: error: cannot listen on 127.0.0.1:{metrics_port} (metrics): address already in use"
        assert running.proc.poll() is None
        assert running.terminate() == 0


@pytest.mark.parametrize("hold", [False, True])
def test_connections_of_a_stopped_server_in_time_wait_do_not_hold_the_port(hold: bool) -> None:
    """A restart on the same port works (gRPC's own bind sets SO_REUSEADDR for the same reason)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first: its end stays in TIME_WAIT
            client.recv(1)
    claimed, held = claim("127.0.0.1", port, what="gRPC", hold=hold)
    release(held)
    assert claimed == port
    assert len(held) == (1 if hold else 0)
