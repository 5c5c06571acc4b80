"""What the wire adapters share: bearer audiences, timestamps, handler registration."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from meshca.server._config import ServerConfig

__all__ = ["audiences_for", "register", "timestamp"]


def audiences_for(config: ServerConfig, default: str) -> tuple[str, ...]:
    """The JWT audiences one API accepts: its own default, then the configured ones."""
    configured = config.k8s_jwt.audiences if config.k8s_jwt else ()
    if config.token_review:
        configured += config.token_review.audiences
    return tuple(dict.fromkeys((default, *configured)))


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def register(server: grpc.aio.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
    """Adds one service's handlers as the generated ``add_*_to_server`` functions do."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    # Registered handlers are found without the generic lookup; grpc's stubs do not know the method yet.
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]
