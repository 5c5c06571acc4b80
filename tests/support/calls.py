"""gRPC requests as clients build them, and the status a call ends with."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from meshca._proto import istio_ca_pb2, linkerd_identity_pb2, meshca_identity_pb2
from meshca.pki._proof import SvidProof

pb = meshca_identity_pb2
lpb = linkerd_identity_pb2
ipb = istio_ca_pb2
hpb = health_pb2


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    """The status a call ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def native_request(
    csr: bytes,
    *,
    join_token: str | None = None,
    jwt_token: str | None = None,
    proof: meshca_identity_pb2.SvidProof | None = None,
    spiffe_id: str = "",
    ttl: timedelta | None = None,
) -> meshca_identity_pb2.IssueSVIDRequest:
    credential = pb.Credential()
    if join_token is not None:
        credential.join_token = join_token
    elif jwt_token is not None:
        credential.jwt = jwt_token
    elif proof is not None:
        credential.svid.CopyFrom(proof)
    request = pb.IssueSVIDRequest(csr=csr, credential=credential, spiffe_id=spiffe_id)
    if ttl is not None:
        request.ttl.FromTimedelta(ttl)
    return request


def proof_message(p: SvidProof) -> meshca_identity_pb2.SvidProof:
    msg = pb.SvidProof(chain=list(p.chain), signature=p.signature)
    msg.signed_at.FromDatetime(p.signed_at)
    return msg


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
