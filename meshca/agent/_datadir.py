"""The agent's data directory: its own SVID and key, so a restarted agent needs no new join token.

``DATA/agent-svid.pem`` (the key, then the chain), 0600, written
atomically: a crash leaves the old pair or the new one, never a key beside a
certificate it does not fit. ``DATA/bundle.pem``: the anchors the service last
sent, when they differ from ``--bundle``, so an agent restarted after an anchor
rotation still trusts the service and its own SVID. The directory is 0700.
Workload keys are never written: they live in the agent's memory only, and a
restarted agent makes new ones.
"""

from __future__ import annotations

import stat
from datetime import datetime
from pathlib import Path

from cryptography import x509

from meshca.client._core import X509Svid
from meshca.pki._bundle import TrustBundle
from meshca.pki._errors import MeshcaError, UnsafePermissions
from meshca.pki._files import atomic_write, check_private, make_dirs
from meshca.pki._keys import load_private_key

from ._upstream import is_agent_id, verified_svid

__all__ = ["DataDir"]

_NAME = "agent-svid.pem"
_BUNDLE = "bundle.pem"


class DataDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def svid_path(self) -> Path:
        return self.path / _NAME

    def prepare(self) -> None:
        """Makes the directory (0700) or refuses one that others can write: before a join spends its token."""
        make_dirs(self.path, 0o700)
        check_private(self.path)

    def save(self, svid: X509Svid) -> None:
        make_dirs(self.path, 0o700)
        atomic_write(self.svid_path, svid.key_pem() + svid.chain_pem, mode=0o600)

    def save_bundle(self, bundle: TrustBundle) -> None:
        make_dirs(self.path, 0o700)
        atomic_write(self.path / _BUNDLE, bundle.to_pem(), mode=0o644)

    def load_bundle(self, given: TrustBundle) -> TrustBundle:
        """``given`` (``--bundle``) with the anchors saved from the service added, if any were saved."""
        path = self.path / _BUNDLE
        if not path.exists():
            return given
        check_private(path)
        try:
            saved = TrustBundle.from_pem(path.read_bytes(), given.trust_domain)
        except (ValueError, MeshcaError) as exc:
            raise MeshcaError(f"{path} cannot be read: {exc}") from None
        return TrustBundle(given.trust_domain, (*given.anchors, *saved.anchors), given.sequence)

    def load(self, bundle: TrustBundle, *, now: datetime) -> X509Svid | None:
        """The saved SVID if there is one that still verifies now; None if none was saved.

        A saved SVID that expired or no longer chains to the bundle raises: the agent then needs a new
        join token, and says so rather than quietly trying one that was already used.
        """
        if not self.svid_path.exists():
            return None
        check_private(self.svid_path)
        mode = stat.S_IMODE(self.svid_path.stat().st_mode)
        if mode & 0o077:  # as ssh refuses a private key others can read: whoever read it is the agent now
            raise UnsafePermissions(
                f"{self.svid_path} is readable by other users (mode {mode:04o}): chmod 600 {self.svid_path} "
                "(if anyone else may have read it, delete it and join with a new token)"
            )
        data = self.svid_path.read_bytes()
        try:
            key = load_private_key(data)
            chain = tuple(x509.load_pem_x509_certificates(data))
        except ValueError as exc:
            raise MeshcaError(f"{self.svid_path} cannot be read: {exc}") from None
        try:
            svid = verified_svid(key, chain, bundle, now=now)
        except MeshcaError as exc:
            raise MeshcaError(
                f"the agent SVID saved in {self.svid_path} is no longer usable ({exc}): give a new join token"
            ) from None
        if not is_agent_id(svid.spiffe_id):
            raise MeshcaError(f"{self.svid_path} holds {svid.spiffe_id}, not a node agent ID")
        return svid
