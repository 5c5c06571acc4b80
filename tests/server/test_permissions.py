"""Under any umask, meshca makes its directories private; it serves only from files nobody else can replace."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support.ids import WEB
from support.procs import ServeProcess, run_meshca
from support.tokens import add_token

import meshca


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_under_umask_000_makes_private_directories(tmp_path: Path) -> None:
    d = tmp_path / "new" / "td"
    result = run_meshca("init", "--trust-domain", "example.org", "--dir", d, umask=0)
    assert result.returncode == 0, result.stderr
    assert mode(tmp_path / "new") == mode(d) == 0o700
    assert (mode(d / "issuer.key"), mode(d / "trust-anchor.key")) == (0o600, 0o600)
    assert (mode(d / "issuer.crt"), mode(d / "bundle.pem")) == (0o644, 0o644)


def test_dev_serve_and_fetch_under_umask_000(tmp_path: Path) -> None:
    d = tmp_path / "dev" / "td"
    with ServeProcess(d, "--create", "--trust-domain", "example.org", "--workers", "1", umask=0) as server:
        port = server.wait_started()
        assert mode(tmp_path / "dev") == mode(d) == 0o700
        store = meshca.server.SqliteStore(d / "meshca.db")
        token = add_token(store, WEB)
        store.close()
        # the store holds token hashes: the database and its WAL and shared-memory files are the owner's
        assert {name: mode(d / name) for name in ("meshca.db", "meshca.db-wal", "meshca.db-shm")} == dict.fromkeys(
            ("meshca.db", "meshca.db-wal", "meshca.db-shm"), 0o600
        )
        out = tmp_path / "fetched" / "out"
        result = run_meshca(
            "fetch", "--server", f"localhost:{port}", "--bundle", d / "bundle.pem", "--token", token,
            "--spiffe-id", str(WEB), "--out-dir", out, timeout=60, umask=0,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        server.terminate()
    assert mode(tmp_path / "fetched") == mode(out) == 0o700
    assert (mode(out / "svid.key"), mode(out / "svid.pem"), mode(out / "bundle.pem")) == (0o600, 0o644, 0o644)


@pytest.mark.parametrize(
    ("name", "unsafe_mode"),
    [("", 0o777), ("", 0o770), ("issuer.key", 0o660), ("bundle.pem", 0o666)],
    ids=["dir-0777", "dir-0770", "issuer.key-0660", "bundle.pem-0666"],
)
def test_serve_refuses_a_dir_or_file_other_users_can_write(d: Path, name: str, unsafe_mode: int) -> None:
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    unsafe = (d / name).resolve()
    os.chmod(unsafe, unsafe_mode)
    for workers in ("1", "2"):
        result = run_meshca("serve", "--dir", d, "--listen", "127.0.0.1:0", "--metrics-listen", "",
                            "--workers", workers)  # fmt: skip
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"meshca: error: {unsafe} is writable by other users (mode {unsafe_mode:04o}): chmod go-w {unsafe}"
        ]
    assert not (d / "meshca.db").exists()  # refused before anything was opened


def test_serve_writes_no_development_ca_into_a_dir_others_can_write(d: Path) -> None:
    os.chmod(d, 0o777)
    result = run_meshca("serve", "--dir", d, "--listen", "127.0.0.1:0", "--metrics-listen", "", "--workers", "1")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"meshca: error: {d.resolve()} is writable by other users (mode 0777): chmod go-w {d.resolve()}"
    ]
    assert list(d.iterdir()) == []
