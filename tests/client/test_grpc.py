"""gRPC credentials from a source, and the interceptors that authorize callers by SPIFFE ID.

gRPC's channel credentials check the server's certificate against the
target host name and never look at URI SANs, so a gRPC client can only
reach a workload whose SVID also carries a DNS name. The workloads here get
their SVIDs (with DNS SAN localhost) from a fake identity service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from support.calls import code_of
from support.fake_identity import FakeIdentity
from support.ids import API, OTHER, SERVER_NAME, TD, WEB
from support.serving import Pair

import meshca
from meshca._proto import meshca_identity_pb2 as pb
from meshca._proto import meshca_identity_pb2_grpc as pb_grpc
from meshca.client import AsyncSpiffeAuthzInterceptor, SpiffeAuthzInterceptor, SvidSource
from meshca.testing import TestCA

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
CHECK = health_pb2.HealthCheckRequest()


@dataclass
class Workloads:
    web: SvidSource
    api: SvidSource
    other: SvidSource


@pytest.fixture
def workloads(sources: Callable[..., SvidSource]) -> Iterator[Workloads]:
    fake = FakeIdentity(TestCA(TD), TestCA(TD), ttl=timedelta(minutes=5), mode="good-dns").start()
    try:
        made = [sources(fake.address, fake.ca.bundle, sid, join_token="t") for sid in (WEB, API, OTHER)]
        for source in made:
            source.wait_ready(10)
        yield Workloads(*made)
    finally:
        fake.close()


class BundleEcho(pb_grpc.IdentityServicer):
    """A response-streaming method written as an async generator (health's Watch uses context.write)."""

    async def WatchBundle(self, request: pb.WatchBundleRequest, context: Any) -> AsyncIterator[pb.Bundle]:
        for sequence in (1, 2):
            yield pb.Bundle(trust_domain=TD, sequence=sequence)


async def _three_calls(port: int, creds: grpc.ChannelCredentials) -> list[grpc.StatusCode]:
    """Unary (Check), coroutine-style streaming (health Watch), async-generator streaming (WatchBundle)."""
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def first_of_watch() -> None:
            watch = stub.Watch(CHECK, timeout=5)
            message = await watch.read()
            watch.cancel()
            assert message.status == health_pb2.HealthCheckResponse.SERVING

        async def bundles() -> None:
            call = pb_grpc.IdentityStub(channel).WatchBundle(pb.WatchBundleRequest(), timeout=5)
            assert [m.sequence async for m in call] == [1, 2]

        return [await code_of(stub.Check(CHECK, timeout=5)), await code_of(first_of_watch()), await code_of(bundles())]


async def test_async_interceptor_lets_the_authorized_id_in_and_no_other(workloads: Workloads) -> None:
    server = grpc.aio.server(interceptors=[AsyncSpiffeAuthzInterceptor(meshca.authorize_id(API))])
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    pb_grpc.add_IdentityServicer_to_server(BundleEcho(), server)
    port = server.add_secure_port("127.0.0.1:0", workloads.web.grpc_server_credentials())
    await server.start()
    try:
        codes = {
            "api": await _three_calls(port, workloads.api.grpc_channel_credentials()),
            "other": await _three_calls(port, workloads.other.grpc_channel_credentials()),
        }
    finally:
        await server.stop(None)
    assert codes == {"api": [OK, OK, OK], "other": [DENIED, DENIED, DENIED]}


def test_sync_interceptor_lets_the_authorized_id_in_and_no_other(workloads: Workloads) -> None:
    pool = futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(pool, interceptors=[SpiffeAuthzInterceptor(meshca.authorize_id(API))])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", workloads.web.grpc_server_credentials())
    server.start()
    try:
        codes = {}
        options = [("grpc.ssl_target_name_override", SERVER_NAME)]
        for name, source in (("api", workloads.api), ("other", workloads.other)):
            with grpc.secure_channel(f"127.0.0.1:{port}", source.grpc_channel_credentials(), options) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    stub.Check(CHECK, timeout=5)
                    codes[name] = OK
                except grpc.RpcError as exc:
                    codes[name] = exc.code()  # type: ignore[attr-defined]
        assert codes == {"api": OK, "other": DENIED}
    finally:
        server.stop(None).wait(5)
        pool.shutdown()


async def test_grpc_server_requires_a_client_certificate(workloads: Workloads) -> None:
    server = grpc.aio.server(interceptors=[AsyncSpiffeAuthzInterceptor(meshca.authorize_any())])
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", workloads.web.grpc_server_credentials())
    await server.start()
    try:
        creds = grpc.ssl_channel_credentials(workloads.web.bundle.to_pem())  # trusts the server, no client cert
        options = [("grpc.ssl_target_name_override", SERVER_NAME)]
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
            code = await code_of(health_pb2_grpc.HealthStub(channel).Check(CHECK, timeout=5))
    finally:
        await server.stop(None)
    assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.xfail(
    reason="gRPC's channel credentials match the target name against DNS SANs and the CN only, never the "
    "URI SAN, and Python exposes no way to verify a SPIFFE ID instead: a gRPC client cannot reach a "
    "workload whose SVID has no DNS name (all SVIDs of the native API)",
    strict=True,
)
async def test_grpc_channel_to_a_workload_with_a_uri_only_svid(pair: Pair) -> None:
    server = grpc.aio.server(interceptors=[AsyncSpiffeAuthzInterceptor(meshca.authorize_id(API))])
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", pair.web.grpc_server_credentials())
    await server.start()
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", pair.api.grpc_channel_credentials()) as channel:
            code = await code_of(health_pb2_grpc.HealthStub(channel).Check(CHECK, timeout=5))
    finally:
        await server.stop(None)
    assert code == OK
