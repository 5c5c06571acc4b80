"""Atomic file writes: temp file in the same directory, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


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
