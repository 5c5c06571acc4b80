"""The Linkerd-compatible API (io.linkerd.proxy.identity.Identity/Certify).

Linkerd proxies send a DNS-like identity, a service-account token and a CSR
naming that identity. The leaf carries the SPIFFE ID the token grants plus
the identity as a DNS SAN. Linkerd's controller answers FAILED_PRECONDITION
when the names disagree, and its proxies expect that: the status override
below says so, for this API only.
"""

from __future__ import annotations

from typing import Any

import grpc

from meshca._proto import linkerd_identity_pb2 as lpb
from meshca.pki._csr import load_csr
from meshca.pki._errors import AuthenticationError, CsrNameMismatch, IdentityMismatch, InvalidRequest, PermissionDenied
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.server._config import ServerConfig
from meshca.server._interceptor import STATUS, Boundary
from meshca.server._pipeline import IssuanceRequest, Pipeline
from meshca.server.api._common import audiences_for, register, timestamp
from meshca.server.credentials import Bearer

__all__ = ["AUDIENCE", "SERVICE", "LinkerdApi", "linkerd_identity_to_spiffe_id"]

SERVICE = "io.linkerd.proxy.identity.Identity"
AUDIENCE = "identity.l5d.io"
# A token for another identity, or a CSR naming another: Linkerd's own code.
LINKERD_STATUS = {
    **STATUS,
    IdentityMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    CsrNameMismatch: grpc.StatusCode.FAILED_PRECONDITION,
}


def linkerd_identity_to_spiffe_id(identity: str, control_namespace: str, trust_domain: TrustDomain) -> SpiffeId:
    """``<sa>.<ns>.serviceaccount.identity.<control-ns>.<td>`` -> ``spiffe://<td>/ns/<ns>/sa/<sa>``."""
    suffix = f".serviceaccount.identity.{control_namespace}.{trust_domain.name}"
    if not identity.endswith(suffix):
        raise PermissionDenied(
            f"identity {identity!r} is not of the form <sa>.<ns>{suffix} for this trust domain and control namespace"
        )
    # A namespace is a DNS label (no dots); a service account name is a DNS subdomain and may hold dots.
    sa, dot, ns = identity[: -len(suffix)].rpartition(".")
    if not dot or not sa or not ns or "." in ns:
        raise PermissionDenied(f"identity {identity!r} does not name one service account and namespace")
    return trust_domain.spiffe_id(f"/ns/{ns}/sa/{sa}")


class LinkerdApi:
    def __init__(self, config: ServerConfig, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._namespace = config.linkerd_namespace
        self._audiences = audiences_for(config, AUDIENCE)

    def register(self, server: grpc.aio.Server, boundary: Boundary) -> None:
        certify = boundary.unary(
            SERVICE, "Certify", self.Certify, lpb.CertifyRequest, lpb.CertifyResponse, status=LINKERD_STATUS
        )
        register(server, SERVICE, {"Certify": certify})

    async def Certify(self, request: lpb.CertifyRequest, context: Any) -> lpb.CertifyResponse:
        if not request.identity:
            raise InvalidRequest("identity is required")
        if not request.certificate_signing_request:
            raise InvalidRequest("certificate_signing_request is required")
        csr = load_csr(request.certificate_signing_request)
        trust_domain = self._pipeline.state.issuer.trust_domain
        wanted = linkerd_identity_to_spiffe_id(request.identity, self._namespace, trust_domain)
        try:
            token = request.token.decode()
        except UnicodeDecodeError:
            raise AuthenticationError("token is not text", "malformed") from None
        issued = await self._pipeline.issue(
            IssuanceRequest(
                "linkerd",
                csr,
                Bearer(token, self._audiences),
                spiffe_id=wanted,
                dns_names=(request.identity,),
            )
        )
        svid = issued.svid
        return lpb.CertifyResponse(
            leaf_certificate=svid.leaf_der(),
            intermediate_certificates=svid.intermediates_der,
            valid_until=timestamp(svid.not_after),
        )
