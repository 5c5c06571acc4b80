"""Directories of an exact mode whatever the umask, and the check that nobody else can replace a file."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshca.pki._errors import UnsafePermissions
from meshca.pki._files import check_private, make_dirs


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o000, 0o077], ids=["umask-000", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("want", [0o700, 0o755])
def test_make_dirs_gives_the_mode_and_private_parents_whatever_the_umask(tmp_path: Path, umask: int, want: int) -> None:
    target = tmp_path / "a" / "b" / "out"
    make_dirs(target, want)
    assert mode(target) == want
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700


def test_make_dirs_leaves_an_existing_directory_as_it_is(tmp_path: Path) -> None:
    existing = tmp_path / "mine"
    existing.mkdir()
    os.chmod(existing, 0o750)
    make_dirs(existing)
    assert mode(existing) == 0o750
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        make_dirs(tmp_path / "file")


@pytest.mark.parametrize("file_mode", [0o600, 0o644, 0o400])
def test_check_private_accepts_what_only_we_can_write(tmp_path: Path, file_mode: int) -> None:
    path = tmp_path / "issuer.key"
    path.write_text("x")
    os.chmod(path, file_mode)
    check_private(path)


@pytest.mark.parametrize(("where", "bad_mode"), [("file", 0o664), ("file", 0o646), ("dir", 0o777), ("dir", 0o775)])
def test_check_private_refuses_what_others_can_write(tmp_path: Path, where: str, bad_mode: int) -> None:
    directory = tmp_path / "td"
    directory.mkdir(mode=0o700)
    path = directory / "issuer.key"
    path.write_text("x")
    os.chmod(path, 0o600)
    unsafe = path if where == "file" else directory
    os.chmod(unsafe, bad_mode)
    with pytest.raises(UnsafePermissions) as refused:
        check_private(path)
    assert str(refused.value) == (
        f"{unsafe.resolve()} is writable by other users (mode {bad_mode:04o}): chmod go-w {unsafe.resolve()}"
    )


def test_a_sticky_directory_above_is_fine(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: others cannot rename or remove what they do not own
    (shared / "td").mkdir(mode=0o700)
    check_private(shared / "td")
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafePermissions):
        check_private(shared / "td")


def test_a_symlink_is_checked_where_it_leads(tmp_path: Path) -> None:
    target = tmp_path / "open"
    target.mkdir()
    os.chmod(target, 0o777)
    (target / "bundle.pem").write_text("x")
    os.chmod(target / "bundle.pem", 0o644)
    (tmp_path / "bundle.pem").symlink_to(target / "bundle.pem")
    with pytest.raises(UnsafePermissions, match="open is writable by other users"):
        check_private(tmp_path / "bundle.pem")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_check_private_refuses_a_file_of_another_user(tmp_path: Path) -> None:
    path = tmp_path / "issuer.crt"
    path.write_text("x")
    os.chown(path, 4242, -1)
    with pytest.raises(UnsafePermissions, match="is owned by uid 4242, not by this user or root"):
        check_private(path)
