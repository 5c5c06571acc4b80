"""The SPIFFE Workload API on a Unix socket, served with grpclib.

Why grpclib and not grpcio: attestation needs the connecting process's
credentials (SO_PEERCRED) for each call, and grpcio's server never shows the
connection's socket (``context.peer()`` of a Unix connection is just
``unix:``). grpclib is an asyncio gRPC server whose connection is an asyncio
transport, and the transport holds the accepted socket. See docs/architecture.md.

Bundles are keyed by the trust domain's SPIFFE ID (``spiffe://example.org``), as the spec says and SPIRE
does. Every call: metadata ``workload.spiffe.io: true`` (else INVALID_ARGUMENT), then
the caller's selectors from its connection, then the entries they match (none:
PERMISSION_DENIED). ValidateJWTSVID needs the metadata only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import stat
import struct
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError, Message
from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Server, Stream

from meshca._proto import workload_pb2 as wpb
from meshca.pki._errors import MeshcaError, PortTaken, UnsafePermissions
from meshca.pki._files import check_private, make_dirs
from meshca.pki._profiles import CLOCK_SKEW
from meshca.pki._spiffe import SpiffeId

from ._attest import peer_credentials, selectors_of
from ._state import Entry

if TYPE_CHECKING:
    from ._agent import NodeAgent

__all__ = ["WorkloadApi", "prepare_socket_dir"]

log = structlog.get_logger("meshca.agent")

_DER = serialization.Encoding.DER
_PKCS8 = serialization.PrivateFormat.PKCS8
# The service's refusals of a NewJWTSVID that are about the caller's request, told to the caller as they are.
_PASSED_ON = {
    grpc.StatusCode.INVALID_ARGUMENT: Status.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED: Status.PERMISSION_DENIED,
}
MAX_REQUEST_BYTES = 64 * 1024  # an audience list and at most one token
_M = TypeVar("_M", bound=Message)
_JWT_ALGORITHMS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


class _Server(Server):
    """grpclib's server, keeping its accepted connections: grpclib's close stops the listener and the calls,
    and Python 3.11's asyncio server leaves accepted connections open, so `WorkloadApi.stop` closes these.
    """

    def __init__(self, handlers: list[Any]) -> None:
        super().__init__(handlers)
        self.transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()

    def _protocol_factory(self) -> Any:
        protocol = super()._protocol_factory()
        made = protocol.connection_made

        def connection_made(transport: asyncio.BaseTransport) -> None:
            self.transports.add(transport)
            made(transport)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        return protocol


def _entries_or_denied(agent: NodeAgent, selectors: frozenset[str]) -> list[Entry]:
    """The caller's entries; PERMISSION_DENIED if none, UNAVAILABLE while the agent has never synced (a restart
    during an outage): it does not know the entries yet, and "not entitled" would be false."""
    if not agent.state.synced:
        raise GRPCError(Status.UNAVAILABLE, "the agent has not reached the identity service yet")
    entries = agent.state.matching(selectors)
    if not entries:
        raise GRPCError(Status.PERMISSION_DENIED, "no identity issued for this caller")
    return entries


class WorkloadApi:
    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent
        self._server: _Server | None = None
        self._path: Path | None = None
        self._lock_fd: int | None = None

    def __mapping__(self) -> dict[str, Handler]:
        calls: list[tuple[str, Callable[[Stream[Any, Any]], Awaitable[None]], Cardinality, Any, Any]] = [
            ("FetchX509SVID", self._x509_svid, Cardinality.UNARY_STREAM, wpb.X509SVIDRequest, wpb.X509SVIDResponse),
            (
                "FetchX509Bundles",
                self._x509_bundles,
                Cardinality.UNARY_STREAM,
                wpb.X509BundlesRequest,
                wpb.X509BundlesResponse,
            ),
            ("FetchJWTSVID", self._jwt_svid, Cardinality.UNARY_UNARY, wpb.JWTSVIDRequest, wpb.JWTSVIDResponse),
            (
                "FetchJWTBundles",
                self._jwt_bundles,
                Cardinality.UNARY_STREAM,
                wpb.JWTBundlesRequest,
                wpb.JWTBundlesResponse,
            ),
            (
                "ValidateJWTSVID",
                self._validate_jwt,
                Cardinality.UNARY_UNARY,
                wpb.ValidateJWTSVIDRequest,
                wpb.ValidateJWTSVIDResponse,
            ),
        ]
        return {
            f"/SpiffeWorkloadAPI/{name}": Handler(self._counted(name, f), c, req, rep) for name, f, c, req, rep in calls
        }

    # -- the socket

    async def start(self, path: Path) -> None:
        """Listens on ``path``: its directory must not be writable by others; the socket is 0777 (see SECURITY.md)."""
        prepare_socket_dir(path)
        self._lock(path.with_name(path.name + ".lock"))
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise UnsafePermissions(f"{path} exists and is not a socket: remove it or choose another --socket")
            os.unlink(path)  # a socket left by an agent that did not stop cleanly (the lock is free)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o777)  # noqa: S103 - any local process may ask; attestation decides what it gets
        except OSError:
            sock.close()
            raise
        self._server = _Server([self])
        await self._server.start(sock=sock)
        self._path = path

    def _lock(self, lock_path: Path) -> None:
        """Holds ``PATH.lock`` while serving, so a second agent on the same socket is refused, not let to replace it.

        The file stays: unlinking a lock file races with a process about to take it.
        """
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PortTaken(f"{lock_path.with_suffix('')} is served by another agent (it holds {lock_path})") from None
        self._lock_fd = fd

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
            for transport in list(self._server.transports):
                transport.close()
            await asyncio.sleep(0)  # the transports' close callbacks run
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it
            self._lock_fd = None

    # -- per call

    def _counted(
        self, method: str, handler: Callable[[Stream[Any, Any]], Awaitable[None]]
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        requests = self._agent.metrics.requests

        async def call(stream: Stream[Any, Any]) -> None:
            try:
                if dict(stream.metadata or {}).get("workload.spiffe.io") != "true":
                    raise GRPCError(Status.INVALID_ARGUMENT, "security header missing from request")
                await handler(stream)
            except GRPCError as exc:
                requests.labels(method, exc.status.name).inc()
                raise
            except asyncio.CancelledError:
                requests.labels(method, "CANCELLED").inc()
                raise
            requests.labels(method, "OK").inc()

        return call

    def _transport(self, stream: Stream[Any, Any]) -> asyncio.Transport:
        # grpclib's Peer keeps the connection's asyncio transport; the transport keeps the accepted socket.
        transport: asyncio.Transport = stream.peer._transport  # the one way to the socket; see the module docstring
        return transport

    async def _selectors(self, stream: Stream[Any, Any]) -> frozenset[str]:
        sock = self._transport(stream).get_extra_info("socket")
        if sock is None:
            raise GRPCError(Status.INTERNAL, "the connection's socket is not available")
        peer = peer_credentials(sock)  # syscalls on the connection, at once
        # user and group names come from NSS, which may be LDAP or sssd: resolved off the event loop, so a
        # slow name service delays this caller and not every Workload API call
        return await asyncio.to_thread(selectors_of, peer)

    async def _follow(
        self,
        stream: Stream[Any, Any],
        request_type: type[Message],
        message_for: Callable[[list[Entry]], Message | None],
    ) -> None:
        """A Workload API stream: the caller's message at once, then a full one at every change of it;
        PERMISSION_DENIED when the caller has no entry (left). ``message_for`` None: nothing to send yet."""
        await _request(stream, request_type)
        selectors = await self._selectors(stream)
        state = self._agent.state
        _entries_or_denied(self._agent, selectors)
        seen, last = state.version, None
        while not state.closed:
            message = message_for(_entries_or_denied(self._agent, selectors))
            if message is not None and message != last:
                await stream.send_message(message)
                last = message
            seen = await state.wait(seen)

    async def _x509_svid(self, stream: Stream[wpb.X509SVIDRequest, wpb.X509SVIDResponse]) -> None:
        await self._follow(stream, wpb.X509SVIDRequest, self._x509_message)

    def _x509_message(self, entries: list[Entry]) -> wpb.X509SVIDResponse | None:
        """The caller's SVIDs, or None while the agent holds none of them yet."""
        state = self._agent.state
        bundle = b"".join(a.public_bytes(_DER) for a in state.bundle.anchors)
        svids = []
        for entry in entries:
            held = state.held.get(entry.id)
            if held is None:
                continue
            svids.append(
                wpb.X509SVID(
                    spiffe_id=str(held.svid.spiffe_id),
                    x509_svid=b"".join(held.svid.chain_der),
                    x509_svid_key=held.svid.key.private_bytes(_DER, _PKCS8, serialization.NoEncryption()),
                    bundle=bundle,
                )
            )
        return wpb.X509SVIDResponse(svids=svids) if svids else None

    async def _x509_bundles(self, stream: Stream[wpb.X509BundlesRequest, wpb.X509BundlesResponse]) -> None:
        state, domain = self._agent.state, str(self._agent.trust_domain.id)

        def message_for(_: list[Entry]) -> wpb.X509BundlesResponse:
            bundle = b"".join(a.public_bytes(_DER) for a in state.bundle.anchors)
            return wpb.X509BundlesResponse(bundles={domain: bundle})

        await self._follow(stream, wpb.X509BundlesRequest, message_for)

    async def _jwt_bundles(self, stream: Stream[wpb.JWTBundlesRequest, wpb.JWTBundlesResponse]) -> None:
        state, domain = self._agent.state, str(self._agent.trust_domain.id)

        def message_for(_: list[Entry]) -> wpb.JWTBundlesResponse | None:
            return wpb.JWTBundlesResponse(bundles={domain: state.jwt_keys}) if state.jwt_keys else None

        await self._follow(stream, wpb.JWTBundlesRequest, message_for)

    async def _jwt_svid(self, stream: Stream[wpb.JWTSVIDRequest, wpb.JWTSVIDResponse]) -> None:
        request = await _request(stream, wpb.JWTSVIDRequest)
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        entries = _entries_or_denied(self._agent, await self._selectors(stream))
        if request.spiffe_id:
            entries = [e for e in entries if str(e.spiffe_id) == request.spiffe_id]
            if not entries:
                raise GRPCError(Status.PERMISSION_DENIED, f"no identity {request.spiffe_id} for this caller")
        svids = []
        for entry in entries:
            try:
                token = await self._agent.jwt_svid(entry, list(request.audience))
            except grpc.aio.AioRpcError as exc:
                log.warning("agent.jwt_failed", entry_id=entry.id, code=exc.code().name, error=exc.details())
                if exc.code() in _PASSED_ON:  # the caller's request (an audience too long), or an entry gone
                    raise GRPCError(_PASSED_ON[exc.code()], exc.details()) from None
                raise GRPCError(Status.UNAVAILABLE, "could not get a JWT-SVID from the identity service") from None
            except Exception as exc:  # noqa: BLE001 - the service's answer unusable: reported as unavailable
                log.warning("agent.jwt_failed", entry_id=entry.id, error=str(exc))
                raise GRPCError(Status.UNAVAILABLE, "could not get a JWT-SVID from the identity service") from None
            svids.append(wpb.JWTSVID(spiffe_id=str(entry.spiffe_id), svid=token))
        await stream.send_message(wpb.JWTSVIDResponse(svids=svids))

    async def _validate_jwt(self, stream: Stream[wpb.ValidateJWTSVIDRequest, wpb.ValidateJWTSVIDResponse]) -> None:
        request = await _request(stream, wpb.ValidateJWTSVIDRequest)
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            raise GRPCError(Status.INVALID_ARGUMENT, "svid must be specified")
        if _unknown_kid(request.svid, self._agent.state.jwt_key_set()):
            await self._agent.refresh_jwt_keys()  # a key published since the last sync
        try:
            sid, claims = validate_jwt_svid(
                request.svid,
                request.audience,
                self._agent.state.jwt_key_set(),
                str(self._agent.trust_domain),
                now=self._agent.clock(),
            )
        except (jwt.PyJWTError, MeshcaError, ValueError) as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid JWT-SVID: {exc}") from None
        response = wpb.ValidateJWTSVIDResponse(spiffe_id=str(sid))
        response.claims.update(claims)
        await stream.send_message(response)


def prepare_socket_dir(path: Path) -> None:
    """Makes the socket's directory (0755), or refuses one others can write, even with the sticky bit.

    Whoever can create an entry there can bind their own socket at the path while the agent is not serving
    (before it starts, after it stops: the agent removes its socket) and answer workloads with a bundle and
    SVIDs of their own; the sticky bit only stops them removing the agent's socket. Directories above it
    may be sticky (``/tmp``), as `check_private` allows.
    """
    directory = path.parent
    make_dirs(directory, 0o755)
    check_private(directory)
    mode = os.stat(directory).st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePermissions(
            f"{directory} is writable by other users (mode {stat.S_IMODE(mode):04o}), who could take the socket's "
            f"path: give --socket a directory of its own (chmod go-w {directory})"
        )


async def _request(stream: Stream[Any, Any], message_type: type[_M]) -> _M:
    """The call's one request message, read with a bound and refused cleanly when malformed.

    grpclib's own `recv_message` reads a message of whatever length the caller announces into
    memory, and meets a missing, truncated, compressed or undecodable message with an exception
    that becomes UNKNOWN and a traceback in the log. Any local process may call.
    """
    h2 = stream._stream  # grpclib's HTTP/2 stream: private, as the transport is (see the module docstring)
    try:
        head = await h2.recv_data(5)
        if len(head) != 5:
            raise GRPCError(Status.INVALID_ARGUMENT, "the call carries no request message")
        compressed, length = struct.unpack(">?I", head)
        if compressed:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed requests are not supported")
        if length > MAX_REQUEST_BYTES:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, f"a request is at most {MAX_REQUEST_BYTES} bytes")
        body = await h2.recv_data(length)
    except AssertionError:  # grpclib's Buffer: the stream ended inside a message
        raise GRPCError(Status.INVALID_ARGUMENT, "the request message is truncated") from None
    try:
        return message_type.FromString(body)
    except DecodeError:
        raise GRPCError(Status.INVALID_ARGUMENT, f"the request is not a {message_type.DESCRIPTOR.name}") from None


def _unknown_kid(token: str, jwks: dict[str, Any]) -> bool:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return False  # refused below, with the reason
    keys = jwks.get("keys")
    return bool(kid) and not any(isinstance(k, dict) and k.get("kid") == kid for k in keys or [])


def validate_jwt_svid(
    token: str, audience: str, jwks: dict[str, Any], trust_domain: str, *, now: datetime
) -> tuple[SpiffeId, dict[str, Any]]:
    """The SPIFFE ID and claims of ``token`` if a key of ``jwks`` signed it, it is unexpired at ``now`` and for
    ``audience``.

    The algorithm is the one of the key the ``kid`` names (a token cannot choose another, nor ``none``).
    PyJWT checks signature, audience and claim types; time is checked here, on the agent's clock only:
    ``exp`` strictly, ``nbf`` with `CLOCK_SKEW`, ``iat`` not at all (the JWT-SVID spec does not ask it, and
    PyJWT's check on the system clock refused tokens from a service whose clock ran a second ahead).
    """
    header = jwt.get_unverified_header(token)
    if header.get("typ", "JWT") not in ("JWT", "JOSE"):
        raise ValueError(f"the token's type {header['typ']!r} is not JWT or JOSE")
    kid = header.get("kid")
    if not kid:
        raise ValueError("the token has no key id")
    keys = [k for k in jwt.PyJWKSet.from_dict(jwks).keys if k.key_id == kid]
    if not keys:
        raise ValueError(f"no JWT key with id {kid!r} in the {trust_domain} bundle")
    key = keys[0]
    if key.algorithm_name not in _JWT_ALGORITHMS:
        raise ValueError(f"the JWT key {kid!r} is for {key.algorithm_name}, not a JWT-SVID algorithm")
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=[key.algorithm_name],
        audience=audience,
        options={"require": ["sub", "exp", "aud"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    if not isinstance(claims["exp"], int | float) or claims["exp"] <= now.timestamp():
        raise ValueError("the token has expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not isinstance(nbf, int | float) or nbf > (now + CLOCK_SKEW).timestamp()):
        raise ValueError("the token is not valid yet (nbf)")
    sid = SpiffeId.parse(claims["sub"])
    if str(sid.trust_domain) != trust_domain:
        raise ValueError(f"the token's subject {sid} is not in {trust_domain}")
    return sid, claims
