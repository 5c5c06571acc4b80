"""Wire adapters: one module per API, each wire message -> `IssuanceRequest` -> pipeline -> wire message."""

from meshca.server.api import _agent, _istio, _linkerd, _native
from meshca.server.api._agent import AgentApi
from meshca.server.api._common import audiences_for
from meshca.server.api._istio import IstioApi
from meshca.server.api._linkerd import LinkerdApi, linkerd_identity_to_spiffe_id
from meshca.server.api._native import NativeApi

__all__ = [
    "SERVICES",
    "AgentApi",
    "IstioApi",
    "LinkerdApi",
    "NativeApi",
    "audiences_for",
    "linkerd_identity_to_spiffe_id",
]

SERVICES = (_native.SERVICE, _linkerd.SERVICE, _istio.SERVICE, _agent.SERVICE)
"""The gRPC service names, as the health service reports them."""
