"""What the agent holds: the entries it may serve, the trust bundles, and one SVID per entry.

One `AgentState` per agent, changed only on the agent's event loop. Every
change bumps `version` and wakes the Workload API streams, which each rebuild
their caller's message and send it if it differs from the last one sent.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from meshca._proto import meshca_agent_pb2 as apb
from meshca.client._core import X509Svid
from meshca.pki._bundle import TrustBundle
from meshca.pki._spiffe import SpiffeId

__all__ = ["JWT_SVID_USE", "AgentState", "Entry", "Held", "jwt_svid_keys"]

JWT_SVID_USE = "jwt-svid"


def jwt_svid_keys(raw: bytes) -> bytes:
    """The JWK set of Sync with only its JWT-SVID keys (``use: jwt-svid``), as the JWT-SVID spec has a consumer
    extract them before validating, and the Workload API forbids others in a JWT bundle. `ValueError` if not JSON.
    """
    if not raw:
        return b""
    parsed = json.loads(raw)
    keys = parsed.get("keys") if isinstance(parsed, dict) else None
    if not isinstance(keys, list):
        raise ValueError("the service's JWT keys are not a JWK set")
    kept = [k for k in keys if isinstance(k, dict) and k.get("use") == JWT_SVID_USE]
    return json.dumps({"keys": kept}, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    spiffe_id: SpiffeId
    selectors: frozenset[str]
    x509_ttl: timedelta | None
    jwt_ttl: timedelta | None
    dns_names: tuple[str, ...]

    @classmethod
    def from_message(cls, message: apb.Entry) -> Entry:
        x509_ttl = message.x509_ttl.ToTimedelta() if message.HasField("x509_ttl") else timedelta()
        jwt_ttl = message.jwt_ttl.ToTimedelta() if message.HasField("jwt_ttl") else timedelta()
        return cls(
            message.id,
            SpiffeId.parse(message.spiffe_id),
            frozenset(message.selectors),
            x509_ttl or None,
            jwt_ttl or None,
            tuple(message.dns_names),
        )

    def matches(self, selectors: frozenset[str]) -> bool:
        """True when every selector of the entry is among the caller's (an entry with none matches nobody)."""
        return bool(self.selectors) and self.selectors <= selectors


@dataclass(frozen=True, slots=True)
class Held:
    """A workload SVID the agent holds, for the entry as it was when the SVID was signed."""

    entry: Entry
    svid: X509Svid
    renew_at: datetime


class AgentState:
    def __init__(self, bundle: TrustBundle) -> None:
        self.bundle = bundle
        self.entries: dict[str, Entry] = {}
        self.jwt_keys: bytes = b""
        self.held: dict[str, Held] = {}
        self.synced = False  # a Sync has answered since start
        self.version = 0
        self.closed = False
        self._changed = asyncio.Condition()

    def matching(self, selectors: frozenset[str]) -> list[Entry]:
        """The entries a caller with ``selectors`` gets, in a stable order."""
        return sorted(
            (e for e in self.entries.values() if e.matches(selectors)), key=lambda e: (str(e.spiffe_id), e.id)
        )

    def jwt_key_set(self) -> dict[str, object]:
        if not self.jwt_keys:
            return {"keys": []}
        parsed: dict[str, object] = json.loads(self.jwt_keys)
        return parsed

    async def changed(self) -> None:
        """Wakes every stream waiting in `wait`."""
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def wait(self, seen: int) -> int:
        """Waits until `version` moves past ``seen`` (or the agent closes); returns the new version."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen or self.closed)
            return self.version

    async def close(self) -> None:
        async with self._changed:
            self.closed = True
            self._changed.notify_all()
