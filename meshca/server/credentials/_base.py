"""The credential interface: what a request carries becomes a principal, or "not mine".

A wire adapter wraps the credential it found in a value (`Bearer`,
`JoinTokenField`, `SvidPossession`); the pipeline offers that value to each
configured `Credential` in turn, and the first that claims it decides. The
pipeline does not know which kinds exist (docs/architecture.md, Server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from meshca.pki._errors import AuthenticationError, PermissionDenied
from meshca.pki._proof import SvidProof
from meshca.pki._spiffe import SpiffeId

__all__ = [
    "Bearer",
    "Credential",
    "JoinTokenField",
    "Presented",
    "Principal",
    "ServedEntry",
    "SvidPossession",
    "grant",
    "refuse_reserved",
]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``name`` is safe to log; it never holds a secret."""

    kind: str
    name: str
    spiffe_id: SpiffeId
    token_hash: str | None = None  # a join token to consume with the issuance
    agent: bool = False  # a node agent's own credential: may hold its agent ID (see `grant`)


@dataclass(frozen=True, slots=True)
class Bearer:
    """A bearer token (a join token or a JWT, told apart by the credentials), for the API's audiences."""

    token: str = field(repr=False)
    audiences: tuple[str, ...]

    def unclaimed(self) -> AuthenticationError:
        token = self.token.strip()
        if not token:
            return AuthenticationError("no credential", "missing")
        if token.count(".") == 2:
            return AuthenticationError("JWT credentials are not enabled on this server", "jwt_disabled")
        return AuthenticationError("credential is neither a join token nor a JWT", "malformed")


@dataclass(frozen=True, slots=True)
class JoinTokenField:
    """A token sent in the native API's ``join_token`` field: a join token whatever its form."""

    token: str = field(repr=False)

    def unclaimed(self) -> AuthenticationError:
        return AuthenticationError("join tokens are not enabled on this server", "join_token_disabled")


@dataclass(frozen=True, slots=True)
class SvidPossession:
    """A proof of possession of a current SVID, bound to the request's CSR (as sent, DER)."""

    proof: SvidProof
    csr_der: bytes

    def unclaimed(self) -> AuthenticationError:
        return AuthenticationError("SVID renewal is not enabled on this server", "svid_proof_disabled")


@dataclass(frozen=True, slots=True)
class ServedEntry:
    """A node agent asking for an SVID of a registration entry it may serve.

    Made only by the Agent API adapter, after the agent's proof verified and
    the entry was found among those the agent may serve (docs/architecture.md,
    Agent API); no wire message becomes one directly.
    """

    agent: SpiffeId
    spiffe_id: SpiffeId  # the entry's

    def unclaimed(self) -> AuthenticationError:
        return AuthenticationError("the node agent API is not enabled on this server", "agent_disabled")


Presented = Bearer | JoinTokenField | SvidPossession | ServedEntry


class Credential(Protocol):
    """One credential kind. `principal` returns None for a credential that is not of its kind."""

    async def principal(self, presented: Presented) -> Principal | None: ...


def refuse_reserved(spiffe_id: SpiffeId, *, agent: bool = False) -> None:
    """IDs under ``spiffe://TD/meshca/`` belong to meshca's own components; no workload credential grants one.

    ``agent``: the credential is a node agent's own (a join token made with
    ``meshca token create --agent``, or a proof made with an agent SVID); it
    may grant an agent ID (``spiffe://TD/meshca/agent/NAME``), and no other
    reserved ID.
    """
    if spiffe_id.reserved and not (agent and spiffe_id.is_agent):
        raise PermissionDenied(f"{spiffe_id} is reserved for meshca's own components")


def grant(
    kind: str, name: str, spiffe_id: SpiffeId, token_hash: str | None = None, *, agent: bool = False
) -> Principal:
    """The principal a credential maps to; never one holding a reserved ID, but for an agent's own credential."""
    refuse_reserved(spiffe_id, agent=agent)
    return Principal(kind, name, spiffe_id, token_hash, agent=agent and spiffe_id.is_agent)
