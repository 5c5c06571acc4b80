"""Writes a source's snapshot to files, for proxies that read PEM from disk (nginx, HAProxy, Envoy).

    DIR/bundle.pem   trust anchors
    DIR/svid.key     PKCS#8 private key, 0600
    DIR/svid.pem     leaf then intermediates

DIR (and any missing parent) is created 0700 whatever the umask. Each file
is replaced atomically. The bundle goes first (a new anchor must be
trusted before anything chains to it), then the key, then the certificate.
"""

from __future__ import annotations

import os
from pathlib import Path

from meshca.client._core import Snapshot
from meshca.pki._files import atomic_write, make_dirs

__all__ = ["FileSink"]


class FileSink:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._written: dict[str, bytes] = {}

    @property
    def bundle_path(self) -> Path:
        return self.directory / "bundle.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "svid.key"

    @property
    def cert_path(self) -> Path:
        return self.directory / "svid.pem"

    def write(self, snapshot: Snapshot) -> list[Path]:
        """Writes what changed since the last call; returns the paths written."""
        if snapshot.svid is None:
            return []
        make_dirs(self.directory)  # 0700 whatever the umask: it holds the key, and a proxy trusts bundle.pem
        files = [
            (self.bundle_path, snapshot.bundle.to_pem(), 0o644),
            (self.key_path, snapshot.svid.key_pem(), 0o600),
            (self.cert_path, snapshot.svid.chain_pem, 0o644),
        ]
        written = []
        for path, data, mode in files:
            if self._written.get(path.name) == data:
                continue
            atomic_write(path, data, mode=mode)
            self._written[path.name] = data
            written.append(path)
        return written
