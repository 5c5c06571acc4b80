"""The agent's calls to the identity service: its own first SVID, and the Agent API with a proof on each call.

The proof (proto/meshca_agent.proto, AgentProof) binds the call to its method
and body; its construction is pki/_proof (`sign_agent_proof`), shared with the service.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

import grpc
from cryptography import x509
from google.protobuf.message import Message

from meshca._proto import meshca_agent_pb2 as apb
from meshca._proto import meshca_agent_pb2_grpc as apb_grpc
from meshca._proto import meshca_identity_pb2 as pb
from meshca._proto import meshca_identity_pb2_grpc as pb_grpc
from meshca.client._core import X509Svid
from meshca.pki._bundle import TrustBundle
from meshca.pki._csr import build_csr
from meshca.pki._errors import VerificationError
from meshca.pki._keys import PrivateKey, generate_key
from meshca.pki._proof import agent_proof_body, sign_agent_proof
from meshca.pki._spiffe import SpiffeId
from meshca.pki._verify import authorize_if, verify_chain

__all__ = ["Upstream", "bootstrap", "is_agent_id"]

_M = TypeVar("_M", bound=Message)


def is_agent_id(sid: SpiffeId) -> bool:
    return sid.is_agent


def _proof(method: str, request: Message, svid: X509Svid, now: datetime) -> apb.AgentProof:
    body = agent_proof_body(request)  # type: ignore[arg-type]  # protobuf's stubs type CopyFrom narrower
    proof = sign_agent_proof(svid.chain_der, svid.key, method, body, now)
    message = apb.AgentProof(chain=list(proof.chain), signature=proof.signature)
    message.signed_at.FromDatetime(proof.signed_at)
    return message


def _chain(leaf: bytes, intermediates: list[bytes] | tuple[bytes, ...]) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_der_x509_certificate(der) for der in (leaf, *intermediates))
    except ValueError as exc:
        raise VerificationError("the service answered with a certificate that cannot be parsed") from exc


def verified_svid(
    key: PrivateKey,
    chain: tuple[x509.Certificate, ...],
    bundle: TrustBundle,
    *,
    now: datetime,
    expected: SpiffeId | None = None,
) -> X509Svid:
    """An SVID from the service, only if it chains to ``bundle`` now, holds ``key`` and (if given) is ``expected``."""
    accept = authorize_if(lambda sid: expected is None or sid == expected, str(expected) if expected else "any ID")
    sid = verify_chain(list(chain), bundle, at=now, authorizer=accept)
    if chain[0].public_key() != key.public_key():
        raise VerificationError("the leaf is not for the key this agent generated")
    return X509Svid(sid, chain, key)


async def bootstrap(channel: grpc.aio.Channel, token: str, bundle: TrustBundle, *, now: datetime) -> X509Svid:
    """The agent's first SVID, for a join token: the service names the agent (the CSR carries no ID)."""
    key = generate_key()
    request = pb.IssueSVIDRequest(csr=build_csr(key))
    request.credential.join_token = token
    response = await pb_grpc.IdentityStub(channel).IssueSVID(request, timeout=10)
    svid = verified_svid(key, _chain(response.leaf, response.intermediates), bundle, now=now)
    if not is_agent_id(svid.spiffe_id):
        raise VerificationError(
            f"the join token is for {svid.spiffe_id}, not a node agent ID (spiffe://TD/meshca/agent/NAME)"
        )
    return svid


class Upstream:
    """The Agent API over one channel, each call signed with the agent's current SVID."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 10.0) -> None:
        self.channel = channel
        self._stub = apb_grpc.AgentStub(channel)
        self._timeout = timeout

    async def _call(self, name: str, request: _M, svid: X509Svid, now: datetime) -> Message:
        request.proof.CopyFrom(_proof(f"/meshca.agent.v1.Agent/{name}", request, svid, now))  # type: ignore[attr-defined]
        response: Message = await getattr(self._stub, name)(request, timeout=self._timeout)
        return response

    async def sync(self, svid: X509Svid, now: datetime) -> apb.SyncResponse:
        response = await self._call("Sync", apb.SyncRequest(), svid, now)
        assert isinstance(response, apb.SyncResponse)
        return response

    async def sign(
        self, requests: list[apb.X509SVIDRequest], svid: X509Svid, now: datetime
    ) -> apb.BatchNewX509SVIDResponse:
        response = await self._call("BatchNewX509SVID", apb.BatchNewX509SVIDRequest(requests=requests), svid, now)
        assert isinstance(response, apb.BatchNewX509SVIDResponse)
        return response

    async def jwt(self, entry_id: str, audience: list[str], svid: X509Svid, now: datetime) -> apb.NewJWTSVIDResponse:
        request = apb.NewJWTSVIDRequest(entry_id=entry_id, audience=audience)
        response = await self._call("NewJWTSVID", request, svid, now)
        assert isinstance(response, apb.NewJWTSVIDResponse)
        return response


def chain_of(result: apb.X509SVIDResult) -> tuple[x509.Certificate, ...]:
    return _chain(result.leaf, list(result.intermediates))
