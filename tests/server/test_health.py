"""grpc.health.v1 and /readyz follow the issuer: NOT_SERVING, 503 and UNAVAILABLE once it expires."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc
from support.calls import code_of, hpb, native_request
from support.certs import spiffe_csr
from support.metrics import http_get
from support.poll import eventually
from support.serving import serving

from meshca.server._app import SERVICES
from meshca.testing import TestCA

SERVING = hpb.HealthCheckResponse.SERVING
NOT_SERVING = hpb.HealthCheckResponse.NOT_SERVING


async def test_serving_for_the_server_and_each_service(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        for name in ("", *SERVICES):
            response = await h.health.Check(hpb.HealthCheckRequest(service=name))
            assert response.status == SERVING, name
        unknown = h.health.Check(hpb.HealthCheckRequest(service="no.such.Service"))
        assert await code_of(unknown) == grpc.StatusCode.NOT_FOUND


async def test_expired_issuer_means_not_serving_and_unavailable(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca, metrics_listen="127.0.0.1:0") as h:
        token = h.token(uses=5, ttl=timedelta(days=3650))
        _, csr = spiffe_csr()
        await h.native.IssueSVID(native_request(csr, join_token=token))
        assert (await asyncio.to_thread(http_get, h.server.metrics_port, "/readyz"))[0] == 200

        h.clock.advance(server_ca.issuer_certificate.not_valid_after_utc - h.clock() + timedelta(seconds=1))
        await eventually(lambda: not h.server.state.usable, what="the reload poll to see the expiry")

        async def not_serving() -> bool:  # health is set right after the poll, on the same loop
            return (await h.health.Check(hpb.HealthCheckRequest(service=""))).status == NOT_SERVING

        await eventually(not_serving, what="health to follow")
        for name in ("", *SERVICES):
            response = await h.health.Check(hpb.HealthCheckRequest(service=name))
            assert response.status == NOT_SERVING, name
        # a client that connects only now still reaches the health service
        fresh = health_pb2_grpc.HealthStub(h.new_channel())
        assert (await fresh.Check(hpb.HealthCheckRequest(service=""), timeout=5)).status == NOT_SERVING

        assert await code_of(h.native.IssueSVID(native_request(csr, join_token=token))) == (grpc.StatusCode.UNAVAILABLE)
        code, body = await asyncio.to_thread(http_get, h.server.metrics_port, "/readyz")
        assert code == 503, body
        assert (await asyncio.to_thread(http_get, h.server.metrics_port, "/livez"))[0] == 200
        assert h.events("issuer.unusable")
        assert len(h.issued()) == 1
