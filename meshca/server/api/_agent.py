"""The node agent's API (meshca.agent.v1.Agent): Sync, BatchNewX509SVID, NewJWTSVID.

Every call carries an `AgentProof` made with the agent's current SVID key,
bound to the method and the request (`meshca.pki._proof`). A proof that does
not verify is UNAUTHENTICATED; a verified SVID whose ID is not an agent's
(``spiffe://TD/meshca/agent/NAME``) is PERMISSION_DENIED. An agent may serve
the entries whose parent is its ID and those with no parent. X.509-SVIDs go
through the one issuance pipeline (api ``agent``, principal the agent ID);
JWT-SVIDs are signed with this process's JWT key (`JwtKeyring`).
See docs/architecture.md, Agent API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, timedelta
from typing import Any

import grpc
import structlog
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.duration_pb2 import Duration

from meshca._proto import meshca_agent_pb2 as apb
from meshca.pki._csr import load_csr
from meshca.pki._errors import (
    AuthenticationError,
    InvalidRequest,
    MeshcaError,
    PermissionDenied,
    RequestTooLarge,
)
from meshca.pki._proof import SvidProof, agent_proof_body, verify_agent_proof
from meshca.pki._spiffe import SpiffeId
from meshca.pki._time import Clock
from meshca.server._config import ServerConfig
from meshca.server._entries import JWT_TTL, MAX_JWT_TTL, RegistrationEntry
from meshca.server._interceptor import STATUS, Boundary, status_for
from meshca.server._jwt_keys import JwtKeyring, jwks
from meshca.server._metrics import Metrics
from meshca.server._pipeline import IssuanceRequest, Pipeline
from meshca.server._state import IssuerState
from meshca.server._store import Store
from meshca.server.api._common import register, timestamp
from meshca.server.credentials import ServedEntry, refuse_reserved

__all__ = ["MAX_AUDIENCES", "MAX_BATCH", "SERVICE", "AgentApi", "entry_message"]

log = structlog.get_logger("meshca.server")

SERVICE = "meshca.agent.v1.Agent"
MAX_BATCH = 64  # CSRs in one BatchNewX509SVID (and the whole request stays under --max-message-bytes)
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 256
_MAX_DURATION_SECONDS = 315_576_000_000  # google.protobuf.Duration's range (10000 years); beyond, no timedelta holds it


def _duration(value: timedelta) -> Duration:
    return Duration(seconds=int(value.total_seconds()))


def entry_message(entry: RegistrationEntry) -> apb.Entry:
    return apb.Entry(
        id=entry.id,
        spiffe_id=str(entry.spiffe_id),
        selectors=entry.selectors,
        parent=str(entry.parent) if entry.parent else "",
        x509_ttl=_duration(entry.x509_ttl),
        jwt_ttl=_duration(entry.jwt_ttl),
        dns_names=entry.dns_names,
    )


def _proof(request: Any) -> SvidProof:
    if not request.HasField("proof"):
        raise AuthenticationError("no agent proof", "missing")
    proof = request.proof
    try:
        signed_at = proof.signed_at.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise AuthenticationError("agent proof signed_at is out of range", "agent_proof") from None
    return SvidProof(tuple(proof.chain), proof.signature, signed_at)


class AgentApi:
    def __init__(
        self,
        config: ServerConfig,
        pipeline: Pipeline,
        state: IssuerState,
        store: Store,
        keyring: JwtKeyring,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._config = config
        self._pipeline = pipeline
        self._state = state
        self._store = store
        self._keyring = keyring
        self._metrics = metrics
        self._clock = clock

    def register(self, server: grpc.aio.Server, boundary: Boundary) -> None:
        register(
            server,
            SERVICE,
            {
                "Sync": boundary.unary(SERVICE, "Sync", self.Sync, apb.SyncRequest, apb.SyncResponse),
                "BatchNewX509SVID": boundary.unary(
                    SERVICE,
                    "BatchNewX509SVID",
                    self.BatchNewX509SVID,
                    apb.BatchNewX509SVIDRequest,
                    apb.BatchNewX509SVIDResponse,
                ),
                "NewJWTSVID": boundary.unary(
                    SERVICE, "NewJWTSVID", self.NewJWTSVID, apb.NewJWTSVIDRequest, apb.NewJWTSVIDResponse
                ),
            },
        )

    def _agent(self, method: str, request: Any) -> SpiffeId:
        """The agent ID the request's proof was made with; refused unless it is one."""
        sid = verify_agent_proof(
            _proof(request), f"/{SERVICE}/{method}", agent_proof_body(request), self._state.bundle, now=self._clock()
        )
        if not sid.is_agent:
            raise PermissionDenied(f"{sid} is not a node agent ID (spiffe://TD/meshca/agent/NAME)")
        return sid

    async def _entries(self, agent: SpiffeId) -> dict[str, RegistrationEntry]:
        return {e.id: e for e in await asyncio.to_thread(self._store.entries, agent)}

    async def Sync(self, request: apb.SyncRequest, context: Any) -> apb.SyncResponse:
        agent = self._agent("Sync", request)
        entries = await asyncio.to_thread(self._store.entries, agent)
        keys = await asyncio.to_thread(self._keyring.published)
        bundle, sequence = self._state.bundle, self._state.sequence
        return apb.SyncResponse(
            entries=[entry_message(e) for e in entries],
            trust_domain=bundle.trust_domain.name,
            x509_anchors=[a.public_bytes(Encoding.DER) for a in bundle.anchors],
            x509_sequence=sequence,
            jwt_keys=json.dumps(jwks(keys)).encode(),
        )

    async def BatchNewX509SVID(
        self, request: apb.BatchNewX509SVIDRequest, context: Any
    ) -> apb.BatchNewX509SVIDResponse:
        if len(request.requests) > MAX_BATCH:
            raise RequestTooLarge(f"batch of {len(request.requests)} CSRs is above the limit of {MAX_BATCH}")
        agent = self._agent("BatchNewX509SVID", request)
        entries = await self._entries(agent)
        # Issued together, so their records share a group commit; each outcome stands alone.
        outcomes = await asyncio.gather(
            *(self._issue(agent, entries, item) for item in request.requests), return_exceptions=True
        )
        results = []
        for item, outcome in zip(request.requests, outcomes, strict=True):
            if isinstance(outcome, MeshcaError):
                code = status_for(outcome, STATUS) or grpc.StatusCode.INTERNAL
                log.info(
                    "agent.svid_refused", agent=str(agent), entry_id=item.entry_id, code=code.name, reason=str(outcome)
                )
                outcome = apb.X509SVIDResult(entry_id=item.entry_id, error_code=code.value[0], error=str(outcome))
            elif isinstance(outcome, BaseException):
                raise outcome  # nobody expected it: INTERNAL for the call, as anywhere else
            results.append(outcome)
        return apb.BatchNewX509SVIDResponse(results=results)

    async def _issue(
        self, agent: SpiffeId, entries: dict[str, RegistrationEntry], item: apb.X509SVIDRequest
    ) -> apb.X509SVIDResult:
        entry = entries.get(item.entry_id)
        if entry is None:
            raise PermissionDenied(f"entry {item.entry_id!r} is not one this agent may serve")
        if not item.csr:
            raise InvalidRequest("csr is required")
        csr = load_csr(item.csr)
        ttl = min(entry.x509_ttl, self._config.max_leaf_ttl).total_seconds() if entry.x509_ttl else None
        issued = await self._pipeline.issue(
            IssuanceRequest(
                "agent",
                csr,
                ServedEntry(agent, entry.spiffe_id),
                spiffe_id=entry.spiffe_id,
                ttl_seconds=ttl,
                dns_names=entry.dns_names,
            )
        )
        svid = issued.svid
        return apb.X509SVIDResult(
            entry_id=entry.id,
            leaf=svid.leaf_der(),
            intermediates=svid.intermediates_der,
            valid_until=timestamp(svid.not_after),
        )

    async def NewJWTSVID(self, request: apb.NewJWTSVIDRequest, context: Any) -> apb.NewJWTSVIDResponse:
        agent = self._agent("NewJWTSVID", request)
        audience = _audience(request.audience)
        entry = await asyncio.to_thread(self._store.get_entry, request.entry_id)
        if entry is None or not entry.served_by(agent):
            raise PermissionDenied(f"entry {request.entry_id!r} is not one this agent may serve")
        # As the issuance pipeline does for X.509-SVIDs, whatever the store holds (entries are checked when made).
        refuse_reserved(entry.spiffe_id)
        if not entry.spiffe_id.member_of(agent.trust_domain):
            raise PermissionDenied(f"entry {entry.id!r} names {entry.spiffe_id}, outside {agent.trust_domain}")
        ttl = entry.jwt_ttl or JWT_TTL
        if request.HasField("ttl") and (request.ttl.seconds or request.ttl.nanos):
            if request.ttl.seconds < 0 or request.ttl.nanos < 0:
                raise InvalidRequest("requested lifetime must be positive")
            if request.ttl.seconds > _MAX_DURATION_SECONDS or request.ttl.nanos > 999_999_999:
                raise InvalidRequest("requested lifetime is not a valid duration")
            ttl = request.ttl.ToTimedelta()
        ttl = min(ttl, MAX_JWT_TTL)
        if ttl < timedelta(seconds=1):
            raise InvalidRequest("requested lifetime must be at least one second")
        token, expires_at = await asyncio.to_thread(self._keyring.sign, entry.spiffe_id, audience, ttl)
        self._metrics.jwt_issued.labels(entry.spiffe_id.trust_domain.name).inc()
        log.info(
            "jwt_svid.issued",
            spiffe_id=str(entry.spiffe_id),
            audience=list(audience),
            expires_at=expires_at.isoformat(),
            principal=str(agent),
        )
        return apb.NewJWTSVIDResponse(token=token, expires_at=timestamp(expires_at))


def _audience(values: Sequence[str]) -> tuple[str, ...]:
    if not values:
        raise InvalidRequest("a JWT-SVID needs at least one audience")
    if len(values) > MAX_AUDIENCES:
        raise InvalidRequest(f"a JWT-SVID has at most {MAX_AUDIENCES} audiences")
    for value in values:
        if not value or value != value.strip() or len(value) > MAX_AUDIENCE_LENGTH:
            raise InvalidRequest(f"audience {value[:40]!r} must be 1 to {MAX_AUDIENCE_LENGTH} characters, unpadded")
    return tuple(dict.fromkeys(values))
