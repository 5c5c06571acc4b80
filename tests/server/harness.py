"""The identity service in-process, real gRPC clients, and the credentials and CSRs tests send it.

A test runs a server with ``async with serving(tmp_path) as h:`` and talks to
it through ``h.native``, ``h.linkerd``, ``h.istio`` and ``h.health``, the stubs
generated from proto/. Server clocks are real time plus an offset the test
moves: the TLS peers (gRPC's C core, openssl) check the server certificate
against the real clock, so a frozen clock in the past would break handshakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

import meshca
import meshca.server
from meshca._proto import (
    istio_ca_pb2,
    istio_ca_pb2_grpc,
    linkerd_identity_pb2,
    linkerd_identity_pb2_grpc,
    meshca_identity_pb2,
    meshca_identity_pb2_grpc,
)
from meshca.pki._proof import SvidProof
from meshca.server import IdentityServer, JoinToken, ServerConfig, SqliteStore, hash_token, new_token, store_path
from meshca.testing import TestCA

pb = meshca_identity_pb2
lpb = linkerd_identity_pb2
ipb = istio_ca_pb2
hpb = health_pb2

TD = "example.org"
WEB = meshca.SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/web")
API = meshca.SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/api")
LINKERD_WEB = f"web.default.serviceaccount.identity.linkerd.{TD}"
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"


class MovableClock:
    """Real time plus an offset that only moves forward when a test says so."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, by: timedelta) -> None:
        self.offset += by


# -- keys and CSRs


def p256() -> meshca.PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_der(
    key: Any,
    *,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    cn: str | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    """A PKCS#10 request with exactly the names given; any key type cryptography can sign with."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=cn is None)
    return builder.sign(key, algorithm or hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def spiffe_csr(spiffe_id: meshca.SpiffeId | str = WEB, key: Any = None) -> tuple[Any, bytes]:
    key = key or p256()
    return key, csr_der(key, uris=[str(spiffe_id)])


def linkerd_csr(identity: str = LINKERD_WEB, key: Any = None) -> tuple[Any, bytes]:
    """What linkerd2-proxy sends: CN = identity and one DNS SAN = identity."""
    key = key or p256()
    return key, csr_der(key, dns=[identity], cn=identity)


def to_pem(der: bytes) -> str:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


def flip_last_byte(der: bytes) -> bytes:
    """The last byte of a CSR is in its signature: the request still parses, the signature fails."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def cert(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def uris(c: x509.Certificate) -> list[str]:
    return c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


def dns_names(c: x509.Certificate) -> list[str]:
    return c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def serial_hex(c: x509.Certificate) -> str:
    return format(c.serial_number, "x")


def signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except Exception:
        return False
    return True


# -- join tokens and the issuance log


def workload_records(records: list[meshca.server.IssuanceRecord]) -> list[meshca.server.IssuanceRecord]:
    """The records of workload certificates: the server's own (api "self") left out."""
    return [r for r in records if r.api != "self"]


def add_token(
    store: SqliteStore,
    spiffe_id: meshca.SpiffeId = WEB,
    *,
    uses: int = 1,
    ttl: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> str:
    token = new_token()
    expires = (now or datetime.now(UTC)) + ttl
    store.add_token(JoinToken(hash_token(token), spiffe_id, expires, uses))
    return token


def dir_token(d: Path, uses: int) -> str:
    """A join token for WEB in the store of trust directory ``d`` (what `meshca token create` does)."""
    store = SqliteStore(store_path(meshca.TrustDir.at(d)))
    try:
        return add_token(store, WEB, uses=uses)
    finally:
        store.close()


# -- Kubernetes service-account JWTs


@dataclass
class K8sIssuer:
    """A cluster's service-account token signer and the JWKS file meshca verifies against."""

    key: Any
    kid: str = "k1"
    issuer: str = K8S_ISSUER

    @classmethod
    def make(cls, kind: str = "ec") -> K8sIssuer:
        key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
        return cls(key)

    @property
    def alg(self) -> str:
        return "RS256" if isinstance(self.key, rsa.RSAPrivateKey) else "ES256"

    def jwks(self) -> dict[str, Any]:
        public = self.key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(
        self,
        ns: str = "default",
        sa: str = "web",
        *,
        aud: str | Sequence[str] = "meshca",
        iss: str | None = None,
        now: datetime | None = None,
        lifetime: timedelta = timedelta(minutes=10),
        key: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = now or datetime.now(UTC)
        claims = {
            "iss": iss or self.issuer,
            "sub": f"system:serviceaccount:{ns}:{sa}",
            "aud": aud if isinstance(aud, str) else list(aud),
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int((now + lifetime).timestamp()),
            **(extra or {}),
        }
        return jwt.encode(claims, key or self.key, algorithm=self.alg, headers={"kid": self.kid})


def unsigned_jwt(claims: dict[str, Any]) -> str:
    """An ``alg: none`` token, which no verifier may accept."""
    return jwt.encode(claims, None, algorithm="none")


def k8s_config(issuer: K8sIssuer, directory: Path, audiences: tuple[str, ...] = ()) -> meshca.server.K8sJwtConfig:
    return meshca.server.K8sJwtConfig(issuer.write_jwks(directory / "jwks.json"), issuer.issuer, audiences)


# -- calls


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


# -- metrics endpoint


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples named ``name`` whose labels include ``labels``; None if there is none."""
    found = [v for n, ls, v in samples(text) if n == name and all(ls.get(k) == x for k, x in labels.items())]
    return sum(found) if found else None


# -- the server


@dataclass
class Harness:
    ca: TestCA
    server: IdentityServer
    clock: MovableClock
    directory: Path
    logs: list[dict[str, Any]]
    channel: grpc.aio.Channel
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server.port
        return self.server.port

    @property
    def bundle_pem(self) -> bytes:
        return self.ca.bundle.to_pem()

    @property
    def native(self) -> meshca_identity_pb2_grpc.IdentityStub:
        return meshca_identity_pb2_grpc.IdentityStub(self.channel)

    @property
    def linkerd(self) -> linkerd_identity_pb2_grpc.IdentityStub:
        return linkerd_identity_pb2_grpc.IdentityStub(self.channel)

    @property
    def istio(self) -> istio_ca_pb2_grpc.IstioCertificateServiceStub:
        return istio_ca_pb2_grpc.IstioCertificateServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    def new_channel(self) -> grpc.aio.Channel:
        """Another connection (closed with the harness): new connections see the server's current certificate."""
        channel = grpc.aio.secure_channel(f"localhost:{self.port}", grpc.ssl_channel_credentials(self.bundle_pem))
        self._channels.append(channel)
        return channel

    def issued(self) -> list[meshca.server.IssuanceRecord]:
        """The issuance log without the server's own SVIDs (api "self"), which every start adds."""
        return workload_records(self.server.store.issuances())

    def token(self, spiffe_id: meshca.SpiffeId = WEB, *, uses: int = 1, ttl: timedelta = timedelta(hours=1)) -> str:
        return add_token(self.server.store, spiffe_id, uses=uses, ttl=ttl, now=self.clock())

    async def scrape(self) -> str:
        assert self.server.metrics_port, "start the server with metrics_listen"
        code, text = await asyncio.to_thread(http_get, self.server.metrics_port, "/metrics")
        assert code == 200
        return text

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]

    async def wait_for(self, predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.02)


SERVER_DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "metrics_listen": None,
    "reload_interval": timedelta(milliseconds=200),
    "drain_grace": timedelta(seconds=2),
}


@contextlib.asynccontextmanager
async def serving(
    directory: Path,
    ca: TestCA | None = None,
    *,
    clock: MovableClock | None = None,
    write: bool = True,
    **config: Any,
) -> AsyncIterator[Harness]:
    """Writes ``ca`` into ``directory`` (a fresh CA when None), starts a server on it, and stops it on exit.

    Every log event of the run is in ``h.logs``.
    """
    ca = ca or TestCA(TD)
    if write:
        ca.write(directory)
    clock = clock or MovableClock()
    with capture_logs() as logs:
        server = IdentityServer(ServerConfig(dir=directory, **{**SERVER_DEFAULTS, **config}), clock=clock)
        await server.start()
        channel = grpc.aio.secure_channel(f"localhost:{server.port}", grpc.ssl_channel_credentials(ca.bundle.to_pem()))
        h = Harness(ca, server, clock, directory, logs, channel)
        try:
            yield h
        finally:
            for ch in (channel, *h._channels):
                await ch.close()
            await server.stop()
