"""Credential kinds: each turns what a request carries into a principal (docs/architecture.md, Server)."""

from meshca.server.credentials._agent import AgentEntryCredential
from meshca.server.credentials._base import (
    Bearer,
    Credential,
    JoinTokenField,
    Presented,
    Principal,
    ServedEntry,
    SvidPossession,
    grant,
    refuse_reserved,
)
from meshca.server.credentials._join_token import JoinTokenCredential
from meshca.server.credentials._k8s_jwt import K8sJwtCredential, service_account_id
from meshca.server.credentials._svid_proof import SvidProofCredential
from meshca.server.credentials._token_review import TokenReviewCredential

__all__ = [
    "AgentEntryCredential",
    "Bearer",
    "Credential",
    "JoinTokenCredential",
    "JoinTokenField",
    "K8sJwtCredential",
    "Presented",
    "Principal",
    "ServedEntry",
    "SvidPossession",
    "SvidProofCredential",
    "TokenReviewCredential",
    "grant",
    "refuse_reserved",
    "service_account_id",
]
