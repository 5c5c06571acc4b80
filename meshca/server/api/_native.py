"""The native API (meshca.identity.v1.Identity): IssueSVID and WatchBundle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import grpc
from cryptography.hazmat.primitives.serialization import Encoding

from meshca._proto import meshca_identity_pb2 as pb
from meshca.pki._bundle import TrustBundle
from meshca.pki._csr import load_csr
from meshca.pki._errors import AuthenticationError, InvalidRequest
from meshca.pki._proof import SvidProof
from meshca.pki._spiffe import SpiffeId
from meshca.server._config import ServerConfig
from meshca.server._interceptor import Boundary
from meshca.server._pipeline import IssuanceRequest, Pipeline
from meshca.server._state import IssuerState
from meshca.server.api._common import audiences_for, register, timestamp
from meshca.server.credentials import Bearer, JoinTokenField, Presented, SvidPossession

__all__ = ["AUDIENCE", "SERVICE", "NativeApi"]

SERVICE = "meshca.identity.v1.Identity"
AUDIENCE = "meshca"


class NativeApi:
    def __init__(self, config: ServerConfig, pipeline: Pipeline, state: IssuerState) -> None:
        self._pipeline = pipeline
        self._state = state
        self._audiences = audiences_for(config, AUDIENCE)
        self._bundle_message: tuple[TrustBundle, int, pb.Bundle] | None = None

    def register(self, server: grpc.aio.Server, boundary: Boundary) -> None:
        register(
            server,
            SERVICE,
            {
                "IssueSVID": boundary.unary(
                    SERVICE, "IssueSVID", self.IssueSVID, pb.IssueSVIDRequest, pb.IssueSVIDResponse
                ),
                "WatchBundle": boundary.stream(
                    SERVICE, "WatchBundle", self.WatchBundle, pb.WatchBundleRequest, pb.Bundle
                ),
            },
        )

    async def IssueSVID(self, request: pb.IssueSVIDRequest, context: Any) -> pb.IssueSVIDResponse:
        if not request.csr:
            raise InvalidRequest("csr is required")
        csr = load_csr(request.csr)
        ttl = None
        if request.HasField("ttl") and (request.ttl.seconds or request.ttl.nanos):
            ttl = request.ttl.seconds + request.ttl.nanos / 1e9
        issued = await self._pipeline.issue(
            IssuanceRequest(
                "native",
                csr,
                self._credential(request),
                spiffe_id=SpiffeId.parse(request.spiffe_id) if request.spiffe_id else None,
                ttl_seconds=ttl,
            )
        )
        svid = issued.svid
        return pb.IssueSVIDResponse(
            spiffe_id=str(svid.spiffe_id),
            leaf=svid.leaf_der(),
            intermediates=svid.intermediates_der,
            bundle=self.bundle_message(issued.bundle),
            valid_until=timestamp(svid.not_after),
        )

    def _credential(self, request: pb.IssueSVIDRequest) -> Presented:
        cred = request.credential
        kind = cred.WhichOneof("kind")
        if kind == "join_token":
            return JoinTokenField(cred.join_token)
        if kind == "jwt":
            return Bearer(cred.jwt, self._audiences)
        if kind == "svid":
            try:
                signed_at = cred.svid.signed_at.ToDatetime(tzinfo=UTC)
            except (ValueError, OverflowError):
                raise AuthenticationError("SVID proof signed_at is out of range", "svid_proof") from None
            return SvidPossession(SvidProof(tuple(cred.svid.chain), cred.svid.signature, signed_at), request.csr)
        raise AuthenticationError("no credential", "missing")

    async def WatchBundle(self, request: pb.WatchBundleRequest, context: Any) -> AsyncIterator[pb.Bundle]:
        state = self._state
        while True:
            changed = state.change_event()
            yield self.bundle_message(state.bundle)
            await changed.wait()

    def bundle_message(self, bundle: TrustBundle) -> pb.Bundle:
        """The encoded bundle, built once per bundle change."""
        sequence = self._state.sequence
        cached = self._bundle_message
        if cached is not None and cached[0] is bundle and cached[1] == sequence:
            return cached[2]
        message = pb.Bundle(
            trust_domain=bundle.trust_domain.name,
            anchors=[a.public_bytes(Encoding.DER) for a in bundle.anchors],
            sequence=sequence,
        )
        self._bundle_message = (bundle, sequence, message)
        return message
