"""Files meshca writes and trusts: atomic writes, directories of an exact mode, and the ssh-like ownership check."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from meshca.pki._errors import UnsafePermissions

__all__ = ["atomic_write", "check_private", "make_dirs"]


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, overwrite: bool = True) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the whole new one.

    The temp file is created with ``mode`` from the start, so a private key is
    never readable by others, not even briefly. With ``overwrite=False`` an
    existing file makes this raise ``FileExistsError`` and nothing is written.
    """
    target = Path(path)
    directory = target.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such directory", str(target)) from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            # link() fails if the target exists: no check-then-write race.
            os.link(tmp, target)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_dirs(path: str | os.PathLike[str], mode: int = 0o700) -> None:
    """Creates the directory ``path`` with exactly ``mode``, and its missing parents 0700, whatever the umask.

    An existing directory keeps its mode: it is the owner's choice.
    """
    target = Path(path)
    missing = []
    for directory in (target, *target.parents):
        if directory.exists():
            break
        missing.append(directory)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)  # the umask can only take bits away from 0700
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to chmod
        if directory == target and mode != 0o700:
            os.chmod(directory, mode)
    if not target.is_dir():
        raise NotADirectoryError(20, "not a directory", str(target))


def check_private(path: str | os.PathLike[str]) -> None:
    """Raises `UnsafePermissions` unless ``path`` (resolved) and every directory above it is owned by
    this user or root and not writable by group or others, as ssh checks its keys.

    Whoever can write there can rename their own file over one meshca trusts. A
    directory with the sticky bit (``/tmp``, a Kubernetes secret volume) may be
    writable by others: they cannot rename or remove entries they do not own,
    and those entries are checked in turn.
    """
    real = Path(os.path.realpath(path))
    uid = os.geteuid()
    for current in (real, *real.parents):
        st = os.stat(current)
        if st.st_uid not in (0, uid):
            raise UnsafePermissions(
                f"{current} is owned by uid {st.st_uid}, not by this user or root: chown {uid} {current}"
            )
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
            raise UnsafePermissions(
                f"{current} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}): chmod go-w {current}"
            )
