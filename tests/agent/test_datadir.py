"""The agent's data directory: its key file is private, or it is not used."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from meshca import SpiffeId, UnsafePermissions
from meshca.agent._datadir import DataDir
from meshca.client._core import X509Svid
from meshca.testing import TestCA

AGENT = SpiffeId.parse("spiffe://example.org/meshca/agent/node-1")


def test_a_saved_key_others_can_read_is_refused_as_ssh_does(tmp_path: Path) -> None:
    """A key restored from a backup or copied with cp -p 0644: anyone on the node could act as the agent."""
    ca = TestCA("example.org")
    issued = ca.issue_svid(AGENT)
    data = DataDir(tmp_path / "data")
    data.prepare()
    data.save(X509Svid(issued.spiffe_id, issued.chain, issued.key))
    now = ca.now + timedelta(minutes=1)
    assert data.load(ca.bundle, now=now) is not None
    data.svid_path.chmod(0o644)
    with pytest.raises(UnsafePermissions, match="readable by other users"):
        data.load(ca.bundle, now=now)
    data.svid_path.chmod(0o640)
    with pytest.raises(UnsafePermissions, match=r"chmod 600 .*agent-svid.pem"):
        data.load(ca.bundle, now=now)
