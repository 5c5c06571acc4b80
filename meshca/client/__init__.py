"""The client library for proxies: an SVID that keeps itself fresh, and mTLS authorized by SPIFFE ID."""

from meshca.client._core import Snapshot, X509Svid
from meshca.client._grpc import AsyncSpiffeAuthzInterceptor, SpiffeAuthzInterceptor
from meshca.client._hooks import ClientMetrics
from meshca.client._source import AsyncSvidSource, SvidSource
from meshca.client._tls import SpiffeSSLContext
from meshca.pki._rotation import RenewalPolicy

__all__ = [
    "AsyncSpiffeAuthzInterceptor",
    "AsyncSvidSource",
    "ClientMetrics",
    "RenewalPolicy",
    "Snapshot",
    "SpiffeAuthzInterceptor",
    "SpiffeSSLContext",
    "SvidSource",
    "X509Svid",
]
