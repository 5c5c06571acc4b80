"""A node agent serving a registration entry: the entry's SPIFFE ID, on the agent's authority."""

from __future__ import annotations

from meshca.server.credentials._base import Presented, Principal, ServedEntry, grant

__all__ = ["AgentEntryCredential"]


class AgentEntryCredential:
    """Claims `ServedEntry`: the agent (already proven) gets the entry's ID; the log names the agent as principal."""

    async def principal(self, presented: Presented) -> Principal | None:
        if not isinstance(presented, ServedEntry):
            return None
        return grant("agent", str(presented.agent), presented.spiffe_id)
