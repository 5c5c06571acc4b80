"""The one wrapper around every RPC: request size, deadline, metrics, and errors mapped to status codes.

Wire adapters declare their methods; `Boundary` turns each into a gRPC method
handler. Server-streaming methods (WatchBundle) hold a slot of `StreamSlots`
while open: a stream costs memory for as long as the client keeps it, so the
open ones are capped per peer IP address and in total. An error becomes a status through a table from exception class to
code, looked up along the class hierarchy; a service may override entries
(Linkerd's FAILED_PRECONDITION for a name mismatch). An exception the table
does not know is INTERNAL: logged at error level with its traceback, the
caller gets only a request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.message import DecodeError, Message

from meshca.pki import _errors as errors
from meshca.server._config import ServerConfig
from meshca.server._metrics import Children, Metrics

__all__ = ["STATUS", "Boundary", "StatusTable", "StreamSlots", "peer_address", "status_for"]

log = structlog.get_logger("meshca.server")

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]
StatusTable = Mapping[type[BaseException], grpc.StatusCode]

C = grpc.StatusCode
STATUS: StatusTable = {
    errors.InvalidRequest: C.INVALID_ARGUMENT,
    errors.InvalidCsr: C.INVALID_ARGUMENT,
    errors.KeyPolicyError: C.INVALID_ARGUMENT,
    errors.InvalidSpiffeId: C.INVALID_ARGUMENT,
    errors.BundleError: C.INVALID_ARGUMENT,
    errors.AuthenticationError: C.UNAUTHENTICATED,
    errors.CredentialCheckUnavailable: C.UNAVAILABLE,  # retry, not refuse
    errors.TokenUsedUp: C.UNAUTHENTICATED,  # the token ran out between the check and the record
    errors.PermissionDenied: C.PERMISSION_DENIED,
    errors.CsrNameMismatch: C.PERMISSION_DENIED,
    errors.IssuanceError: C.FAILED_PRECONDITION,
    errors.IssuerUnavailable: C.UNAVAILABLE,
    errors.KeyCustodyError: C.UNAVAILABLE,  # the issuer's token is missing, locked or failing: retry
    errors.StoreError: C.UNAVAILABLE,
    errors.RateLimited: C.RESOURCE_EXHAUSTED,
    errors.RequestTooLarge: C.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException, table: StatusTable = STATUS) -> grpc.StatusCode | None:
    """The code of the nearest class of ``exc`` in ``table``; None for an exception nobody expected."""
    for cls in type(exc).__mro__:
        code = table.get(cls)
        if code is not None:
            return code
    return None


def peer_address(peer: str) -> str:
    """The IP address in a gRPC peer (``ipv4:10.0.0.1:5000``, ``ipv6:[::1]:5000``, maybe %-encoded); else the peer."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]")
    return peer


class StreamSlots:
    """Open streams by peer IP address and in total; one past either cap is `RateLimited` (RESOURCE_EXHAUSTED).

    Counted per serving process, on its event loop (no lock needed).
    """

    def __init__(self, total: int, per_peer: int, metrics: Metrics) -> None:
        self._total = total
        self._per_peer = per_peer
        self._by_peer: dict[str, int] = {}
        self._open = 0
        self._gauge = metrics.watch_streams
        self._refused = metrics.watch_refused

    @property
    def open(self) -> int:
        return self._open

    @contextlib.contextmanager
    def hold(self, peer: str) -> Iterator[None]:
        address = peer_address(peer)
        held = self._by_peer.get(address, 0)
        if held >= self._per_peer:
            self._refused.labels("peer").inc()
            raise errors.RateLimited(f"{address} has {held} open streams, the limit per peer")
        if self._open >= self._total:
            self._refused.labels("total").inc()
            raise errors.RateLimited(f"the server has {self._open} open streams, its limit")
        self._by_peer[address] = held + 1
        self._open += 1
        self._gauge.inc()
        try:
            yield
        finally:
            self._open -= 1
            self._gauge.dec()
            left = self._by_peer.pop(address) - 1
            if left:
                self._by_peer[address] = left


class Boundary:
    """Builds the method handlers of the wire adapters; holds what every request shares."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self._limit = config.max_message_bytes
        self._timeout = config.request_timeout.total_seconds()
        self._metrics = metrics
        self._requests = Children(metrics.requests)
        self.streams = StreamSlots(config.max_watch_streams, config.max_watch_streams_per_peer, metrics)

    def deserializer(self, message: type[Req]) -> Callable[[bytes], Req | errors.MeshcaError]:
        """Parses a request body; a body too large or malformed becomes the error its handler raises.

        gRPC parses before the handler runs and answers UNKNOWN (naming a
        Python class) when parsing raises, so the failure is handed on instead.
        """
        limit = self._limit
        name = message.DESCRIPTOR.full_name

        def parse(raw: bytes) -> Req | errors.MeshcaError:
            if len(raw) > limit:
                return errors.RequestTooLarge(f"request of {len(raw)} bytes is above the limit of {limit}")
            try:
                return message.FromString(raw)
            except DecodeError:
                return errors.InvalidRequest(f"request body is not a valid {name} message")

        return parse

    def unary(
        self,
        service: str,
        method: str,
        call: Callable[[Req, Context], Awaitable[Resp]],
        request: type[Req],
        response: type[Resp],
        *,
        status: StatusTable = STATUS,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        latency = self._metrics.latency.labels(service, method)
        requests = self._requests
        timeout = self._timeout

        async def handle(message: Req | errors.MeshcaError, context: Context) -> Resp:
            start = time.perf_counter()
            code = C.OK
            try:
                if isinstance(message, errors.MeshcaError):
                    raise message
                async with asyncio.timeout(timeout):
                    return await call(message, context)
            except TimeoutError:
                code = C.DEADLINE_EXCEEDED
                log.warning("request.timeout", service=service, method=method)
                await context.abort(code, "request took too long")
            except Exception as exc:  # noqa: BLE001 - every error becomes a status here, the unexpected as INTERNAL
                code = status_for(exc, status) or C.INTERNAL
                await self._refuse(exc, code, context, service, method)
            finally:
                requests(service, method, code.name).inc()
                latency.observe(time.perf_counter() - start)
            raise AssertionError("unreachable")  # context.abort always raises

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=self.deserializer(request),
            response_serializer=response.SerializeToString,
        )

    def stream(
        self,
        service: str,
        method: str,
        call: Callable[[Req, Context], AsyncIterator[Resp]],
        request: type[Req],
        response: type[Resp],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A server-streaming method: no deadline (a watch lasts), a slot of `streams` while open.

        A malformed request, a stream past a cap and a meshca error while
        streaming map to their status like a unary call's.
        """
        streams = self.streams

        async def handle(message: Req | errors.MeshcaError, context: Context) -> AsyncIterator[Resp]:
            try:
                if isinstance(message, errors.MeshcaError):
                    raise message
                with streams.hold(context.peer()):
                    async for item in call(message, context):
                        yield item
            except errors.MeshcaError as exc:
                code = status_for(exc) or C.INTERNAL
                log.warning("request.refused", service=service, method=method, code=code.name, reason=str(exc))
                await context.abort(code, str(exc))

        return grpc.unary_stream_rpc_method_handler(
            handle,
            request_deserializer=self.deserializer(request),
            response_serializer=response.SerializeToString,
        )

    async def _refuse(self, exc: Exception, code: grpc.StatusCode, context: Context, service: str, method: str) -> None:
        if code == C.INTERNAL:
            request_id = uuid.uuid4().hex[:16]
            log.exception("request.failed", service=service, method=method, request_id=request_id)
            await context.abort(code, f"internal error (request id {request_id})")
        if isinstance(exc, errors.AuthenticationError | errors.TokenUsedUp):
            reason = getattr(exc, "reason", None) or "token_used_up"
            self._metrics.auth_failures.labels(reason).inc()
            log.warning("auth.failed", service=service, method=method, reason=reason, detail=str(exc))
        else:
            log.warning("request.refused", service=service, method=method, code=code.name, reason=str(exc))
        await context.abort(code, str(exc))
