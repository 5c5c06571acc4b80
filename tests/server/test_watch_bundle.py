"""WatchBundle: the bundle at once, then again on every change."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from support.calls import hpb, pb
from support.ids import TD
from support.metrics import sample_value
from support.poll import eventually
from support.serving import Harness, serving

from meshca._proto import meshca_identity_pb2_grpc
from meshca.pki._errors import RateLimited
from meshca.server._interceptor import StreamSlots, peer_address
from meshca.server._metrics import Metrics
from meshca.server.api import NativeApi
from meshca.testing import TestCA


async def test_first_message_at_once_then_one_per_change(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        call = h.native.WatchBundle(pb.WatchBundleRequest())
        stream = call.__aiter__()
        started = time.monotonic()
        first = await asyncio.wait_for(stream.__anext__(), 2)
        assert time.monotonic() - started < 1
        assert first.trust_domain == TD
        assert list(first.anchors) == [server_ca.anchor.public_bytes(Encoding.DER)]

        extra = TestCA(TD).anchor
        (d / "bundle.pem").write_bytes(server_ca.bundle.to_pem() + extra.public_bytes(Encoding.PEM))
        second = await asyncio.wait_for(stream.__anext__(), 5)
        assert second.sequence > first.sequence
        assert set(second.anchors) == {server_ca.anchor.public_bytes(Encoding.DER), extra.public_bytes(Encoding.DER)}

        # Back to one anchor: another push, and the sequence keeps growing.
        (d / "bundle.pem").write_bytes(server_ca.bundle.to_pem())
        third = await asyncio.wait_for(stream.__anext__(), 5)
        assert third.sequence > second.sequence
        assert list(third.anchors) == [server_ca.anchor.public_bytes(Encoding.DER)]
        call.cancel()

        # A watcher that connects now starts at the current bundle.
        late = h.native.WatchBundle(pb.WatchBundleRequest())
        assert (await asyncio.wait_for(late.__aiter__().__anext__(), 2)).sequence == third.sequence
        late.cancel()


async def test_several_watchers_all_get_the_change(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        calls = [h.native.WatchBundle(pb.WatchBundleRequest()) for _ in range(3)]
        streams = [c.__aiter__() for c in calls]
        firsts = await asyncio.gather(*(asyncio.wait_for(s.__anext__(), 2) for s in streams))
        (d / "bundle.pem").write_bytes(server_ca.bundle.to_pem() + TestCA(TD).bundle.to_pem())
        seconds = await asyncio.gather(*(asyncio.wait_for(s.__anext__(), 5) for s in streams))
        assert all(b.sequence == firsts[0].sequence + 1 for b in seconds)
        for call in calls:
            call.cancel()


class _Context:
    """Enough of a ServicerContext for a streaming handler driven by hand."""

    def invocation_metadata(self) -> Any:
        return ()


async def test_a_change_while_a_message_is_being_sent_is_not_missed(d: Path, server_ca: TestCA) -> None:
    """gRPC suspends the handler at each ``yield`` while it sends; a rotation then must still be pushed."""
    async with serving(d, server_ca) as h:
        native = h.server.apis[0]
        assert isinstance(native, NativeApi)
        watch = native.WatchBundle(pb.WatchBundleRequest(), _Context())
        first = await watch.__anext__()  # the handler is now suspended at its yield, as during a send
        (d / "bundle.pem").write_bytes(server_ca.bundle.to_pem() + TestCA(TD).bundle.to_pem())
        await eventually(lambda: h.server.state.sequence > first.sequence, what="the reload")
        try:
            second = await asyncio.wait_for(watch.__anext__(), 2)
        except TimeoutError:
            raise AssertionError("the bundle change made during a send was never pushed") from None
        finally:
            await watch.aclose()
        assert second.sequence == first.sequence + 1


async def test_watch_ends_cleanly_when_the_client_goes(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        call = h.native.WatchBundle(pb.WatchBundleRequest())
        await asyncio.wait_for(call.__aiter__().__anext__(), 2)
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        # the server still serves other calls
        again = h.native.WatchBundle(pb.WatchBundleRequest())
        assert (await asyncio.wait_for(again.__aiter__().__anext__(), 2)).trust_domain == TD
        again.cancel()


# -- the cap on open streams


def open_streams(h: Harness) -> float | None:
    return h.server.metrics.registry.get_sample_value("meshca_watch_streams")


async def _open_watch(channel: grpc.aio.Channel) -> Any:
    """A WatchBundle stream that has had its first message, so the server holds it open."""
    call = meshca_identity_pb2_grpc.IdentityStub(channel).WatchBundle(pb.WatchBundleRequest())
    assert (await asyncio.wait_for(call.read(), 5)).trust_domain == TD
    return call


async def _refusal(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    call = meshca_identity_pb2_grpc.IdentityStub(channel).WatchBundle(pb.WatchBundleRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(call.read(), 5)
    return refused.value


async def test_open_streams_are_capped_per_peer_address(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca, metrics_listen="127.0.0.1:0", max_watch_streams_per_peer=3) as h:
        # three connections, so three client ports: the cap counts the address
        calls = [await _open_watch(h.new_channel()) for _ in range(3)]
        refused = await _refusal(h.new_channel())
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.details() == "127.0.0.1 has 3 open streams, the limit per peer"
        text = await h.scrape()
        assert sample_value(text, "meshca_watch_streams") == 3
        assert sample_value(text, "meshca_watch_streams_refused_total", limit="peer") == 1
        # a closed stream frees its slot
        calls.pop().cancel()
        await eventually(lambda: open_streams(h) == 2, what="the slot back")
        calls.append(await _open_watch(h.channel))
        assert sample_value(await h.scrape(), "meshca_watch_streams") == 3
        # other calls are not limited
        health = await h.health.Check(hpb.HealthCheckRequest(service=""))
        assert health.status == hpb.HealthCheckResponse.SERVING
        for call in calls:
            call.cancel()
        await eventually(lambda: open_streams(h) == 0, what="every slot back")


async def test_open_streams_are_capped_in_total(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca, metrics_listen="127.0.0.1:0", max_watch_streams=2) as h:
        calls = [await _open_watch(h.channel) for _ in range(2)]
        refused = await _refusal(h.channel)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.details() == "the server has 2 open streams, its limit"
        assert sample_value(await h.scrape(), "meshca_watch_streams_refused_total", limit="total") == 1
        for call in calls:
            call.cancel()


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.1.2.3:50000", "10.1.2.3"),
        ("ipv6:[::1]:50000", "::1"),
        ("ipv6:%5B::1%5D:50000", "::1"),
        ("ipv6:%5B%3A%3A1%5D:50000", "::1"),
        ("unix:/run/meshca.sock", "unix:/run/meshca.sock"),
    ],
)
def test_peer_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_slots_count_by_address_not_port() -> None:
    slots = StreamSlots(total=3, per_peer=2, metrics=Metrics())
    with slots.hold("ipv4:10.0.0.1:1"), slots.hold("ipv4:10.0.0.1:2"):
        with pytest.raises(RateLimited, match=r"^10\.0\.0\.1 has 2 open streams"), slots.hold("ipv4:10.0.0.1:3"):
            pass
        with slots.hold("ipv4:10.0.0.2:1"):
            assert slots.open == 3
            with pytest.raises(RateLimited, match="the server has 3 open streams"), slots.hold("ipv4:10.0.0.3:1"):
                pass
    assert slots.open == 0
    with slots.hold("ipv4:10.0.0.1:4"):  # the address's slots came back too
        assert slots.open == 1
