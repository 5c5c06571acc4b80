"""The identity service: gRPC issuance (native, Linkerd, Istio, node agents), bundle watch, health, metrics."""

from meshca.server._app import IdentityServer, store_path
from meshca.server._config import K8sJwtConfig, ServerConfig, TokenReviewConfig
from meshca.server._entries import RegistrationEntry, new_entry, parse_selector
from meshca.server._metrics import StoreMetrics
from meshca.server._store import (
    IssuanceRecord,
    IssuerCertRecord,
    JoinToken,
    JwtPublicKey,
    SqliteStore,
    Store,
    hash_token,
    new_token,
    open_store,
)
from meshca.server._workers import run_supervisor
from meshca.server.api import linkerd_identity_to_spiffe_id
from meshca.server.credentials import Principal, service_account_id

__all__ = [
    "IdentityServer",
    "IssuanceRecord",
    "IssuerCertRecord",
    "JoinToken",
    "JwtPublicKey",
    "K8sJwtConfig",
    "Principal",
    "RegistrationEntry",
    "ServerConfig",
    "SqliteStore",
    "Store",
    "StoreMetrics",
    "TokenReviewConfig",
    "hash_token",
    "linkerd_identity_to_spiffe_id",
    "new_entry",
    "new_token",
    "open_store",
    "parse_selector",
    "run_supervisor",
    "service_account_id",
    "store_path",
]
