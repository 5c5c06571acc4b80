"""The Istio-compatible API (istio.v1.auth.IstioCertificateService/CreateCertificate).

The credential is gRPC metadata ``authorization: Bearer <token>``; the CSR is
PEM; the answer is a PEM chain, leaf first, ending with the trust anchor.
"""

from __future__ import annotations

from typing import Any

import grpc
from cryptography.hazmat.primitives.serialization import Encoding

from meshca._proto import istio_ca_pb2 as ipb
from meshca.pki._csr import load_csr
from meshca.pki._errors import AuthenticationError, InvalidRequest
from meshca.server._config import ServerConfig
from meshca.server._interceptor import Boundary
from meshca.server._pipeline import IssuanceRequest, Pipeline
from meshca.server.api._common import audiences_for, register
from meshca.server.credentials import Bearer

__all__ = ["AUDIENCE", "SERVICE", "IstioApi"]

SERVICE = "istio.v1.auth.IstioCertificateService"
AUDIENCE = "istio-ca"


def _bearer_token(metadata: Any) -> str:
    token = ""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            token = value[7:]
    if not token:
        raise AuthenticationError("missing 'authorization: Bearer' metadata", "missing")
    return token


class IstioApi:
    def __init__(self, config: ServerConfig, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._audiences = audiences_for(config, AUDIENCE)

    def register(self, server: grpc.aio.Server, boundary: Boundary) -> None:
        create = boundary.unary(
            SERVICE,
            "CreateCertificate",
            self.CreateCertificate,
            ipb.IstioCertificateRequest,
            ipb.IstioCertificateResponse,
        )
        register(server, SERVICE, {"CreateCertificate": create})

    async def CreateCertificate(
        self, request: ipb.IstioCertificateRequest, context: Any
    ) -> ipb.IstioCertificateResponse:
        if not request.csr:
            raise InvalidRequest("csr is required")
        csr = load_csr(request.csr)
        token = _bearer_token(context.invocation_metadata())
        issued = await self._pipeline.issue(
            IssuanceRequest(
                "istio",
                csr,
                Bearer(token, self._audiences),
                ttl_seconds=request.validity_duration or None,
            )
        )
        svid = issued.svid
        chain = (svid.leaf, *svid.intermediates, issued.anchor)
        return ipb.IstioCertificateResponse(cert_chain=[c.public_bytes(Encoding.PEM).decode() for c in chain])
