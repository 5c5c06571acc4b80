"""A whole identity service for the fuzz targets: raw request bytes through each API's real handler.

The server is built as `meshca serve` builds it (a throwaway CA in a temporary
directory, a SQLite store, a join token, Kubernetes JWTs checked against a
JWKS), on a frozen clock, but never listens: each input goes through the
handler gRPC would call (body parsing, the adapter, the pipeline, the error
table), with a stand-in for the call context. A refusal is fine; INTERNAL,
or any exception that escapes the handler, is a finding.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from jwt.algorithms import ECAlgorithm

from meshca.pki._proof import agent_proof_body, sign_agent_proof
from meshca.server import IdentityServer, JoinToken, K8sJwtConfig, ServerConfig, hash_token
from meshca.server._entries import RegistrationEntry
from meshca.server._interceptor import Boundary
from meshca.testing import FrozenClock, TestCA

JOIN_TOKEN = "mtok_fuzz-join-token-for-seeds-0000000000000"  # noqa: S105 - a fixture of the fuzz service
JWT_ISSUER = "https://kubernetes.default.svc"
ENTRY_ID = "fuzz-entry"  # a registration entry every agent may serve (no parent)
# A fixed key, so the JWT seeds checked into the corpus stay valid in every fuzz process.
JWT_KEY = ec.derive_private_key(0x6D657368_63615F66_757A7A, ec.SECP256R1())


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _Context:
    """What the handlers use of grpc.aio's ServicerContext."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)


class _Handlers:
    """Collects what the APIs register, as a grpc.aio server would."""

    def __init__(self) -> None:
        self.methods: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler


def service_account_jwt(namespace: str, name: str, audience: str, clock: FrozenClock) -> str:
    now = clock()
    claims = {
        "iss": JWT_ISSUER,
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "aud": [audience],
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(days=3650)).timestamp()),
    }
    return jwt.encode(claims, JWT_KEY, algorithm="ES256", headers={"kid": "fuzz"})


class FuzzService:
    def __init__(self, clock: FrozenClock) -> None:
        self.clock = clock
        self._tmp = tempfile.TemporaryDirectory(prefix="meshca-fuzz-")
        root = Path(self._tmp.name)
        self.ca = TestCA("example.org", now=clock() - timedelta(days=1))
        self.ca.write(root / "td")
        jwk = ECAlgorithm.to_jwk(JWT_KEY.public_key(), as_dict=True) | {"kid": "fuzz", "alg": "ES256", "use": "sig"}
        (root / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        config = ServerConfig(
            root / "td",
            metrics_listen=None,
            k8s_jwt=K8sJwtConfig(root / "jwks.json", JWT_ISSUER),
        )
        self.server = IdentityServer(config, clock=clock)
        self.server.store.add_token(
            JoinToken(
                hash_token(JOIN_TOKEN),
                self.ca.trust_domain.spiffe_id("/ns/default/sa/web"),
                clock() + timedelta(days=3650),
                10**12,
            )
        )
        td = self.ca.trust_domain
        self.server.store.add_entry(
            RegistrationEntry(
                ENTRY_ID, td.spiffe_id("/ns/default/sa/web"), ("unix:uid:1000",), None,
                timedelta(), timedelta(), ("web.default.svc",), clock(),
            )
        )  # fmt: skip
        self.agent = self.ca.issue_svid(td.agent_id("fuzz"), now=clock() - timedelta(hours=1))
        handlers = _Handlers()
        boundary = Boundary(config, self.server.metrics)
        for api in self.server.apis:
            api.register(handlers, boundary)  # type: ignore[arg-type]
        self.methods = handlers.methods
        self.loop = asyncio.new_event_loop()

    def prove_agent(self, method: str, body: bytes) -> bytes:
        """``body`` (an Agent API request) with its proof replaced by a valid one of the fuzz agent, now."""
        handler = self.methods[f"/meshca.agent.v1.Agent/{method}"]
        request = handler.request_deserializer(body)
        if isinstance(request, Exception):  # the boundary's stand-in for a body that does not parse
            return body
        request.ClearField("proof")
        proof = sign_agent_proof(
            tuple(c.public_bytes(Encoding.DER) for c in self.agent.chain),
            self.agent.key,
            f"/meshca.agent.v1.Agent/{method}",
            agent_proof_body(request),
            self.clock(),
        )
        request.proof.chain[:] = proof.chain
        request.proof.signature = proof.signature
        request.proof.signed_at.FromDatetime(proof.signed_at)
        return bytes(request.SerializeToString())

    def call(self, method: str, body: bytes, metadata: Sequence[tuple[str, str]] = ()) -> Any:
        """Runs one request through ``method``'s handler; returns the response or raises `Aborted`."""
        handler = self.methods[method]
        message = handler.request_deserializer(body)
        return self.loop.run_until_complete(handler.unary_unary(message, _Context(metadata)))
