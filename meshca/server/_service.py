"""The gRPC services: native, Linkerd-compatible and Istio-compatible issuance, and bundle watch.

All three adapt their wire format to one issuance pipeline:
authenticate -> authorize the identity -> check the CSR -> sign -> record
durably -> respond. Errors become gRPC status codes in one place
(`_status_for`), with Linkerd's own code for a name mismatch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.timestamp_pb2 import Timestamp

from meshca._proto import (
    istio_ca_pb2,
    istio_ca_pb2_grpc,
    linkerd_identity_pb2,
    linkerd_identity_pb2_grpc,
    meshca_identity_pb2,
    meshca_identity_pb2_grpc,
)
from meshca.pki._bundle import TrustBundle
from meshca.pki._csr import check_csr, load_csr
from meshca.pki._errors import (
    AuthenticationError,
    CsrNameMismatch,
    InvalidRequest,
    IssuanceError,
    IssuerUnavailable,
    MeshcaError,
    PermissionDenied,
    RateLimited,
    StoreError,
)
from meshca.pki._issuer import IssuedSvid
from meshca.pki._proof import SvidProof
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._time import Clock
from meshca.server._auth import Authenticators, CredentialCheckUnavailable, Principal
from meshca.server._config import ServerConfig
from meshca.server._metrics import Metrics
from meshca.server._state import IssuerState
from meshca.server._store import IssuanceRecord, Store, TokenUsedUp

__all__ = ["IssuanceCore", "IstioService", "LinkerdService", "NativeService", "linkerd_identity_to_spiffe_id"]

log = structlog.get_logger("meshca.server")

T = TypeVar("T")
_PEM = serialization.Encoding.PEM

NATIVE_AUDIENCE = "meshca"
LINKERD_AUDIENCE = "identity.l5d.io"
ISTIO_AUDIENCE = "istio-ca"


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


class _RateLimiter:
    """A token bucket per principal."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> None:
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            raise RateLimited(f"rate limit of {self._rate:g}/s exceeded for {key}")
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > 100_000:
            self._buckets.clear()


class _Completions:
    """Moves finished store futures onto the event loop with one wake-up per burst.

    A group commit finishes many records at once; `asyncio.wrap_future` would
    wake the loop once per record (a syscall each), this wakes it once.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: list[tuple[concurrent.futures.Future[None], asyncio.Future[None]]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def watch(self, future: concurrent.futures.Future[None]) -> asyncio.Future[None]:
        loop = self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        future.add_done_callback(lambda f: self._finished(f, waiter))
        return waiter

    def _finished(self, future: concurrent.futures.Future[None], waiter: asyncio.Future[None]) -> None:
        with self._lock:  # any thread
            self._done.append((future, waiter))
            if self._scheduled:
                return
            self._scheduled = True
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            done, self._done, self._scheduled = self._done, [], False
        for future, waiter in done:
            if waiter.cancelled():
                continue
            error = future.exception()
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


@dataclass(frozen=True, slots=True)
class Issued:
    svid: IssuedSvid
    bundle: TrustBundle


class RequestTooLarge(MeshcaError):
    """A request above the configured size (gRPC's own limit is higher, so this one is logged)."""


def _status_for(exc: BaseException, name_mismatch: grpc.StatusCode) -> grpc.StatusCode | None:
    if isinstance(exc, CredentialCheckUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, AuthenticationError | TokenUsedUp):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, CsrNameMismatch):
        return name_mismatch
    if isinstance(exc, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, IssuerUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, RateLimited | RequestTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, StoreError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, IssuanceError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, MeshcaError | ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return None


class IssuanceCore:
    """The pipeline shared by the three issuance APIs."""

    def __init__(
        self,
        config: ServerConfig,
        state: IssuerState,
        store: Store,
        authenticators: Authenticators,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.auth = authenticators
        self.metrics = metrics
        self.clock = clock
        self._limiter = _RateLimiter(config.rate_limit, config.rate_burst) if config.rate_limit else None
        self._audiences: dict[str, tuple[str, ...]] = {}
        # Metric children and the encoded bundle are looked up once, not per request.
        self._request_counters: dict[tuple[str, str, grpc.StatusCode], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}
        self._issued: dict[tuple[str, str], Any] = {}
        self._completions = _Completions()
        self._bundle_message: tuple[TrustBundle, int, meshca_identity_pb2.Bundle] | None = None
        configured = config.k8s_jwt.audiences if config.k8s_jwt else ()
        if config.token_review:
            configured += config.token_review.audiences
        for api, default in (("native", NATIVE_AUDIENCE), ("linkerd", LINKERD_AUDIENCE), ("istio", ISTIO_AUDIENCE)):
            self._audiences[api] = tuple(dict.fromkeys((default, *configured)))

    def check_lifetime_seconds(self, seconds: int) -> None:
        """Refuses a requested lifetime above the maximum before it becomes a (possibly overflowing) timedelta."""
        limit = int(self.config.max_leaf_ttl.total_seconds())
        if seconds > limit:
            raise InvalidRequest(f"requested lifetime {seconds}s is above the maximum {limit}s")

    def audiences(self, api: str) -> Collection[str]:
        return self._audiences[api]

    @property
    def trust_domain(self) -> TrustDomain:
        return self.state.issuer.trust_domain

    async def run(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        service: str,
        method: str,
        work: Callable[[], Awaitable[T]],
        *,
        size: int,
        name_mismatch: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED,
    ) -> T:
        """Runs one request: deadline, metrics, and the translation of errors into status codes."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if size > self.config.max_message_bytes:
                raise RequestTooLarge(f"request of {size} bytes is above the limit of {self.config.max_message_bytes}")
            async with asyncio.timeout(self.config.request_timeout.total_seconds()):
                return await work()
        except TimeoutError:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            log.warning("request.timeout", service=service, method=method)
            await context.abort(code, "request took too long")
        except Exception as exc:
            mapped = _status_for(exc, name_mismatch)
            if mapped is None:
                code = grpc.StatusCode.INTERNAL
                request_id = uuid.uuid4().hex[:16]
                log.exception("request.failed", service=service, method=method, request_id=request_id)
                await context.abort(code, f"internal error (request id {request_id})")
            code = mapped
            reason = getattr(exc, "reason", None)
            if isinstance(exc, AuthenticationError | TokenUsedUp):
                reason = reason or "token_used_up"
                self.metrics.auth_failures.labels(reason).inc()
                log.warning("auth.failed", service=service, method=method, reason=reason, detail=str(exc))
            else:
                log.warning("request.refused", service=service, method=method, code=code.name, reason=str(exc))
            await context.abort(code, str(exc))
        finally:
            key = (service, method, code)
            counter = self._request_counters.get(key)
            if counter is None:
                counter = self._request_counters[key] = self.metrics.requests.labels(service, method, code.name)
            counter.inc()
            latency = self._latencies.get(key[:2])
            if latency is None:
                latency = self._latencies[key[:2]] = self.metrics.latency.labels(service, method)
            latency.observe(time.perf_counter() - start)
        raise AssertionError("unreachable")  # context.abort always raises

    async def issue(
        self,
        principal: Principal,
        csr: x509.CertificateSigningRequest,
        *,
        api: str,
        ttl: timedelta | None,
        dns_names: Collection[str] = (),
    ) -> Issued:
        if self._limiter is not None:
            self._limiter.take(principal.name)
        if ttl is None:
            ttl = self.config.leaf_ttl
        elif ttl <= timedelta():
            raise InvalidRequest("requested lifetime must be positive")
        elif ttl > self.config.max_leaf_ttl:
            raise InvalidRequest(
                f"requested lifetime {int(ttl.total_seconds())}s is above the maximum "
                f"{int(self.config.max_leaf_ttl.total_seconds())}s"
            )
        checked = check_csr(csr, principal.spiffe_id, allowed_dns=dns_names, policy=self.config.key_policy)
        issuer = self.state.issuer
        bundle = self.state.bundle
        now = self.clock()
        svid = issuer.sign(checked.public_key, principal.spiffe_id, now=now, ttl=ttl, dns_names=checked.dns_names)
        serial = format(svid.serial, "x")
        record = IssuanceRecord(serial, str(principal.spiffe_id), svid.not_after, principal.name, api, now)
        await self._completions.watch(self.store.record(record, token_hash=principal.token_hash))
        issued_key = (principal.spiffe_id.trust_domain.name, api)
        issued_counter = self._issued.get(issued_key)
        if issued_counter is None:
            issued_counter = self._issued[issued_key] = self.metrics.issued.labels(*issued_key)
        issued_counter.inc()
        log.info(
            "svid.issued",
            spiffe_id=str(principal.spiffe_id),
            serial=serial,
            not_after=svid.not_after.isoformat(),
            principal=principal.name,
            api=api,
        )
        return Issued(svid, bundle)

    def bundle_message(self, bundle: TrustBundle) -> meshca_identity_pb2.Bundle:
        cached = self._bundle_message
        if cached is not None and cached[0] is bundle and cached[1] == self.state.sequence:
            return cached[2]
        message = meshca_identity_pb2.Bundle(
            trust_domain=bundle.trust_domain.name,
            anchors=[a.public_bytes(serialization.Encoding.DER) for a in bundle.anchors],
            sequence=self.state.sequence,
        )
        self._bundle_message = (bundle, self.state.sequence, message)
        return message


class NativeService(meshca_identity_pb2_grpc.IdentityServicer):
    def __init__(self, core: IssuanceCore) -> None:
        self._core = core

    async def IssueSVID(
        self, request: meshca_identity_pb2.IssueSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> meshca_identity_pb2.IssueSVIDResponse:
        return await self._core.run(
            context, "meshca.identity.v1.Identity", "IssueSVID", lambda: self._issue(request), size=request.ByteSize()
        )

    async def _issue(self, request: meshca_identity_pb2.IssueSVIDRequest) -> meshca_identity_pb2.IssueSVIDResponse:
        core = self._core
        if not request.csr:
            raise InvalidRequest("csr is required")
        csr = load_csr(request.csr)
        principal = await self._authenticate(request)
        if request.spiffe_id:
            wanted = SpiffeId.parse(request.spiffe_id)
            if wanted != principal.spiffe_id:
                raise PermissionDenied(f"credential grants {principal.spiffe_id}, not {wanted}")
        ttl = None
        if request.HasField("ttl") and (request.ttl.seconds or request.ttl.nanos):
            core.check_lifetime_seconds(request.ttl.seconds)
            ttl = request.ttl.ToTimedelta()
        issued = await core.issue(principal, csr, api="native", ttl=ttl)
        svid = issued.svid
        return meshca_identity_pb2.IssueSVIDResponse(
            spiffe_id=str(svid.spiffe_id),
            leaf=svid.leaf_der(),
            intermediates=svid.intermediates_der,
            bundle=core.bundle_message(issued.bundle),
            valid_until=_timestamp(svid.not_after),
        )

    async def _authenticate(self, request: meshca_identity_pb2.IssueSVIDRequest) -> Principal:
        auth = self._core.auth
        cred = request.credential
        kind = cred.WhichOneof("kind")
        if kind == "join_token":
            return auth.join_tokens.authenticate(cred.join_token)
        if kind == "jwt":
            return await auth.bearer(cred.jwt, self._core.audiences("native"))
        if kind == "svid":
            proof = SvidProof(tuple(cred.svid.chain), cred.svid.signature, cred.svid.signed_at.ToDatetime(tzinfo=UTC))
            return auth.svid(proof, request.csr, self._core.state.bundle)
        raise AuthenticationError("no credential", "missing")

    async def WatchBundle(
        self, request: meshca_identity_pb2.WatchBundleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[meshca_identity_pb2.Bundle]:
        state = self._core.state
        while True:
            changed = state.change_event()
            yield self._core.bundle_message(state.bundle)
            await changed.wait()


class LinkerdService(linkerd_identity_pb2_grpc.IdentityServicer):
    def __init__(self, core: IssuanceCore) -> None:
        self._core = core

    async def Certify(
        self, request: linkerd_identity_pb2.CertifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> linkerd_identity_pb2.CertifyResponse:
        return await self._core.run(
            context,
            "io.linkerd.proxy.identity.Identity",
            "Certify",
            lambda: self._certify(request),
            size=request.ByteSize(),
            name_mismatch=grpc.StatusCode.FAILED_PRECONDITION,
        )

    async def _certify(self, request: linkerd_identity_pb2.CertifyRequest) -> linkerd_identity_pb2.CertifyResponse:
        core = self._core
        if not request.identity:
            raise InvalidRequest("identity is required")
        if not request.certificate_signing_request:
            raise InvalidRequest("certificate_signing_request is required")
        csr = load_csr(request.certificate_signing_request)
        wanted = linkerd_identity_to_spiffe_id(request.identity, core.config.linkerd_namespace, core.trust_domain)
        try:
            token = request.token.decode()
        except UnicodeDecodeError:
            raise AuthenticationError("token is not text", "malformed") from None
        principal = await core.auth.bearer(token, core.audiences("linkerd"))
        if principal.spiffe_id != wanted:
            raise CsrNameMismatch(f"token grants {principal.spiffe_id}, identity {request.identity!r} is {wanted}")
        issued = await core.issue(principal, csr, api="linkerd", ttl=None, dns_names=(request.identity,))
        svid = issued.svid
        return linkerd_identity_pb2.CertifyResponse(
            leaf_certificate=svid.leaf_der(),
            intermediate_certificates=svid.intermediates_der,
            valid_until=_timestamp(svid.not_after),
        )


class IstioService(istio_ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self, core: IssuanceCore) -> None:
        self._core = core

    async def CreateCertificate(
        self, request: istio_ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> istio_ca_pb2.IstioCertificateResponse:
        metadata = context.invocation_metadata() or ()
        return await self._core.run(
            context,
            "istio.v1.auth.IstioCertificateService",
            "CreateCertificate",
            lambda: self._create(request, metadata),
            size=request.ByteSize(),
        )

    async def _create(
        self, request: istio_ca_pb2.IstioCertificateRequest, metadata: Any
    ) -> istio_ca_pb2.IstioCertificateResponse:
        core = self._core
        if not request.csr:
            raise InvalidRequest("csr is required")
        csr = load_csr(request.csr)
        token = ""
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                token = value[7:]
        if not token:
            raise AuthenticationError("missing 'authorization: Bearer' metadata", "missing")
        principal = await core.auth.bearer(token, core.audiences("istio"))
        core.check_lifetime_seconds(request.validity_duration)
        ttl = timedelta(seconds=request.validity_duration) if request.validity_duration else None
        issued = await core.issue(principal, csr, api="istio", ttl=ttl)
        svid = issued.svid
        anchor = _anchor_for(svid, issued.bundle)
        chain = [c.public_bytes(_PEM).decode() for c in (svid.leaf, *svid.intermediates, anchor)]
        return istio_ca_pb2.IstioCertificateResponse(cert_chain=chain)


def _anchor_for(svid: IssuedSvid, bundle: TrustBundle) -> Any:
    last = svid.intermediates[-1]
    for anchor in bundle.anchors:
        if anchor.subject == last.issuer:
            return anchor
    return bundle.anchors[0]
