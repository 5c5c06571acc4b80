"""Join tokens from the store: in the native ``join_token`` field, or as a bearer token with the token prefix."""

from __future__ import annotations

import asyncio

from meshca.pki._errors import AuthenticationError
from meshca.pki._time import Clock
from meshca.server._store import AGENT_TOKEN_PREFIX, TOKEN_PREFIX, JoinToken, Store, hash_token
from meshca.server.credentials._base import Bearer, JoinTokenField, Presented, Principal, grant

__all__ = ["JoinTokenCredential"]


class JoinTokenCredential:
    """Join tokens, looked up by hash.

    A token row is cached for a second, so a burst from one multi-use token
    reads the database once; a miss reads it in a thread, never blocking the
    event loop (a remote store may take its timeout to answer). The cache can only be stale in one direction
    (uses left): the use is consumed in the issuance transaction, which fails
    when none is left, so a stale entry never yields a certificate.
    """

    CACHE_SECONDS = 1.0

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[str, tuple[float, JoinToken]] = {}

    async def principal(self, presented: Presented) -> Principal | None:
        if isinstance(presented, JoinTokenField):
            token = presented.token.strip()  # the one whitespace rule, as for bearer tokens
        elif isinstance(presented, Bearer) and presented.token.strip().startswith(TOKEN_PREFIX):
            token = presented.token.strip()
        else:
            return None
        token_hash = hash_token(token)
        found = await self._lookup(token_hash)
        if found is None:
            raise AuthenticationError("unknown join token", "unknown_token")
        if found.expires_at <= self._clock():
            raise AuthenticationError("join token expired", "token_expired")
        if found.uses_left <= 0:
            raise AuthenticationError("join token has no use left", "token_used_up")
        # An agent ID only for a token made as an agent's (`new_token(agent=True)`): its form is bound by the hash.
        agent = token.startswith(AGENT_TOKEN_PREFIX)
        return grant("join-token", f"join-token:{token_hash[:12]}", found.spiffe_id, token_hash, agent=agent)

    async def _lookup(self, token_hash: str) -> JoinToken | None:
        now = self._clock().timestamp()
        cached = self._cache.get(token_hash)
        if cached is not None and now < cached[0]:
            return cached[1]
        found = await asyncio.get_running_loop().run_in_executor(None, self._store.get_token, token_hash)
        if found is not None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[token_hash] = (now + self.CACHE_SECONDS, found)
        return found
