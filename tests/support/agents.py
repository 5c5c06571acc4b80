"""A node agent's side of the Agent API, for tests: enrolment with an agent join token, proofs, entries.

``agent = await enroll(h, "node-1")`` gets ``spiffe://example.org/meshca/agent/node-1`` from the
running server as `meshca agent` does (a join token made as `meshca token create --agent`, then
IssueSVID); ``agent.prove(request, "Sync", h.clock())`` fills in the request's proof, and
``add_entry(h, "/web", ...)`` stores a registration entry as `meshca entry create` does.
For a `NodeAgent` in the test: ``agent_config(h, tmp, sock, agent_token(h))``, a ``socket_dir()``
other uids can reach, and ``await wait_held(agent, n)`` until it holds n workload SVIDs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from meshca import PrivateKey, SpiffeId, TrustDomain
from meshca._proto import meshca_agent_pb2 as apb
from meshca._proto import meshca_agent_pb2_grpc
from meshca.agent import AgentConfig, NodeAgent
from meshca.pki._proof import SvidProof, agent_proof_body, sign_agent_proof
from meshca.server._entries import RegistrationEntry, new_entry

from .calls import native_request
from .certs import spiffe_csr
from .ids import TD
from .poll import eventually
from .serving import Harness

SERVICE = "meshca.agent.v1.Agent"
NODE_AGENT = TrustDomain(TD).agent_id("node1")  # the agent a test's NodeAgent joins as
R = TypeVar("R")


def agent_stub(h: Harness) -> meshca_agent_pb2_grpc.AgentStub:
    return meshca_agent_pb2_grpc.AgentStub(h.channel)


def proof_message(p: SvidProof) -> apb.AgentProof:
    msg = apb.AgentProof(chain=list(p.chain), signature=p.signature)
    msg.signed_at.FromDatetime(p.signed_at)
    return msg


@dataclass
class Agent:
    spiffe_id: SpiffeId
    chain: tuple[bytes, ...]  # DER, leaf first
    key: PrivateKey

    def prove(self, request: R, method: str, now: datetime, *, key: PrivateKey | None = None) -> R:
        """``request`` with a proof of this agent's SVID for ``method`` (short name: "Sync")."""
        body = agent_proof_body(request)  # type: ignore[arg-type]
        proof = sign_agent_proof(self.chain, key or self.key, f"/{SERVICE}/{method}", body, now)
        request.proof.CopyFrom(proof_message(proof))  # type: ignore[attr-defined]
        return request


async def enroll(h: Harness, name: str = "node-1") -> Agent:
    """An agent SVID from the running server, through an agent join token and IssueSVID."""
    sid = TrustDomain(TD).agent_id(name)
    token = h.token(sid, agent=True)
    key, csr = spiffe_csr(sid)
    answer = await h.native.IssueSVID(native_request(csr, join_token=token))
    return Agent(sid, (answer.leaf, *answer.intermediates), key)


def add_entry(
    h: Harness,
    path: str,
    selectors: Sequence[str] = ("unix:uid:1000",),
    *,
    parent: SpiffeId | None = None,
    **kwargs: Any,
) -> RegistrationEntry:
    """A registration entry for ``spiffe://example.org{path}``, stored in the server's store."""
    entry = new_entry(
        TrustDomain(TD),
        TrustDomain(TD).spiffe_id(path),
        selectors,
        now=h.clock(),
        parent=parent,
        max_x509_ttl=h.server.config.max_leaf_ttl,
        **kwargs,
    )
    h.server.store.add_entry(entry)
    return entry


def agent_token(h: Harness) -> str:
    """A one-time agent join token for ``NODE_AGENT``."""
    return h.token(NODE_AGENT, agent=True)


def socket_dir() -> Path:
    """A directory other uids can reach (pytest's tmp_path sits under a 0700 one), removed by the caller."""
    path = Path(tempfile.mkdtemp(prefix="meshca-agent-"))
    path.chmod(0o755)
    return path


def agent_config(h: Harness, tmp: Path, sock: Path, token: str | None) -> AgentConfig:
    """A `NodeAgent` of the served server on ``sock``, its data under ``tmp``, syncing every 200 ms."""
    return AgentConfig(
        server=f"localhost:{h.port}",
        bundle=h.ca.bundle,
        socket=sock,
        data_dir=tmp / "agent-data",
        join_token=token,
        sync_interval=timedelta(milliseconds=200),
    )


async def wait_held(agent: NodeAgent, count: int) -> None:
    await eventually(lambda: len(agent.state.held) >= count, 10, f"{count} workload SVIDs held")
