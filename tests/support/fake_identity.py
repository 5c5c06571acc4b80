"""A native-API identity service that answers as a test says, for tests of what the client accepts."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from cryptography import x509

import meshca
from meshca._proto import meshca_identity_pb2 as pb
from meshca._proto import meshca_identity_pb2_grpc as pb_grpc
from meshca.testing import TestCA

from .ids import OTHER, SERVER_ID, WEB

REFUSALS = {
    "unauthenticated": (grpc.StatusCode.UNAUTHENTICATED, "unknown join token"),
    "denied": (grpc.StatusCode.PERMISSION_DENIED, f"credential grants {OTHER}, not {WEB}"),
}


@dataclass
class FakeIdentity:
    """A native-API identity service that answers as ``mode`` says, for tests of what the client accepts.

    Modes: ``good`` (a leaf for the requested ID and key from ``ca``), ``good-dns``
    (the same with DNS SAN localhost), ``wrong-id``, ``wrong-ca``, ``wrong-key``,
    and the refusals in `REFUSALS` (``unauthenticated``, ``denied``).
    It serves TLS with a certificate from ``ca`` naming localhost.
    """

    ca: TestCA
    rogue: TestCA
    ttl: timedelta = timedelta(seconds=4)
    mode: str = "good"
    requests: list[str] = field(default_factory=list)
    port: int = 0
    _server: grpc.Server | None = None

    def start(self) -> FakeIdentity:
        outer = self

        class Servicer(pb_grpc.IdentityServicer):
            def IssueSVID(self, request: pb.IssueSVIDRequest, context: Any) -> pb.IssueSVIDResponse:
                if outer.mode in REFUSALS:
                    outer.requests.append(outer.mode)
                    context.abort(*REFUSALS[outer.mode])
                return outer.issue(request)

            def WatchBundle(self, request: pb.WatchBundleRequest, context: Any) -> Iterator[pb.Bundle]:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "no bundle watch here")
                yield pb.Bundle()  # pragma: no cover - abort raises

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_IdentityServicer_to_server(Servicer(), server)
        tls = self.ca.issue_svid(SERVER_ID, dns_names=["localhost"], now=datetime.now(UTC))
        self.port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(tls.key_pem, tls.chain_pem)]))
        server.start()
        self._server = server
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def issue(self, request: pb.IssueSVIDRequest) -> pb.IssueSVIDResponse:
        mode = self.mode
        self.requests.append(mode)
        wanted = meshca.SpiffeId.parse(request.spiffe_id)
        public_key = x509.load_der_x509_csr(request.csr).public_key()
        ca, sid, dns = self.ca, wanted, ()
        if mode == "good-dns":
            dns = ("localhost",)
        elif mode == "wrong-id":
            sid = OTHER
        elif mode == "wrong-ca":
            ca = self.rogue
        elif mode == "wrong-key":
            public_key = meshca.generate_key().public_key()
        else:
            assert mode == "good", mode
        issued = ca.issuer.sign(public_key, sid, now=datetime.now(UTC), ttl=self.ttl, dns_names=dns)  # type: ignore[arg-type]
        return pb.IssueSVIDResponse(spiffe_id=str(sid), leaf=issued.leaf_der(), intermediates=issued.intermediates_der)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(5)
            self._server = None
