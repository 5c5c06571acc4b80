"""gRPC credentials from an SVID source, and server interceptors that authorize the peer's SPIFFE ID.

Server credentials rotate: gRPC asks the fetcher for new material on new
connections. Channel credentials are fixed once made, so a client rotates
by opening a new channel (`SvidSource.grpc_channel_credentials()` again).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from cryptography import x509

from meshca.client._core import Snapshot
from meshca.pki._errors import VerificationError
from meshca.pki._verify import Authorizer, check_leaf_rules, leaf_spiffe_id

__all__ = ["AsyncSpiffeAuthzInterceptor", "SpiffeAuthzInterceptor", "channel_credentials", "server_credentials"]


def _config(snapshot: Snapshot) -> grpc.ServerCertificateConfiguration:
    assert snapshot.svid is not None
    return grpc.ssl_server_certificate_configuration(
        [(snapshot.svid.key_pem(), snapshot.svid.chain_pem)], root_certificates=snapshot.bundle.to_pem()
    )


def server_credentials(current: Callable[[], Snapshot]) -> grpc.ServerCredentials:
    """mTLS server credentials that require a client certificate and follow SVID and bundle rotation."""
    first = current()
    if first.svid is None:
        raise RuntimeError("the source has no SVID yet; call wait_ready() first")
    last = [first]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        snapshot = current()
        if snapshot is last[0]:
            return None  # unchanged
        last[0] = snapshot
        return _config(snapshot)

    return grpc.dynamic_ssl_server_credentials(
        _config(first),
        fetch,  # type: ignore[arg-type]  # the stub omits None ("no change")
        require_client_authentication=True,
    )


def channel_credentials(snapshot: Snapshot) -> grpc.ChannelCredentials:
    """mTLS channel credentials for the current SVID and bundle."""
    if snapshot.svid is None:
        raise RuntimeError("the source has no SVID yet; call wait_ready() first")
    return grpc.ssl_channel_credentials(
        root_certificates=snapshot.bundle.to_pem(),
        private_key=snapshot.svid.key_pem(),
        certificate_chain=snapshot.svid.chain_pem,
    )


def _peer_problem(context: Any, authorizer: Authorizer) -> tuple[grpc.StatusCode, str] | None:
    # gRPC already validated the peer's chain against the bundle's roots.
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return grpc.StatusCode.UNAUTHENTICATED, "no client certificate"
    try:
        leaf = x509.load_pem_x509_certificate(pems[0])
        sid = leaf_spiffe_id(leaf)
        check_leaf_rules(leaf, "client")
        authorizer(sid)
    except (VerificationError, ValueError) as exc:
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    return None


def _handler_with(
    handler: grpc.RpcMethodHandler[Any, Any], wrap: Callable[[Any], Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            factory = getattr(grpc, f"{kind}_rpc_method_handler")
            return factory(  # type: ignore[no-any-return]
                wrap(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class SpiffeAuthzInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """For `grpc.server`: refuses calls whose client SPIFFE ID the authorizer does not accept."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        authorizer = self._authorizer

        def wrap(behavior: Any) -> Any:
            def checked(request: Any, context: Any) -> Any:
                problem = _peer_problem(context, authorizer)
                if problem is not None:
                    context.abort(*problem)
                return behavior(request, context)

            return checked

        return _handler_with(handler, wrap)


class AsyncSpiffeAuthzInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """For `grpc.aio.server`: refuses calls whose client SPIFFE ID the authorizer does not accept."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        authorizer = self._authorizer

        def wrap(behavior: Any) -> Any:
            # grpc.aio takes response-streaming handlers in two shapes: async generators, and
            # coroutines that call context.write() (grpc_health's Watch is one). Keep the shape.
            if inspect.isasyncgenfunction(behavior):

                async def checked_stream(request: Any, context: Any) -> Any:
                    problem = _peer_problem(context, authorizer)
                    if problem is not None:
                        await context.abort(*problem)
                    async for item in behavior(request, context):
                        yield item

                return checked_stream

            async def checked(request: Any, context: Any) -> Any:
                problem = _peer_problem(context, authorizer)
                if problem is not None:
                    await context.abort(*problem)
                return await behavior(request, context)

            return checked

        return _handler_with(handler, wrap)
