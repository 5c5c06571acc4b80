"""WatchBundle: the bundle at once, then again on every change."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.serialization import Encoding
from support.calls import pb
from support.ids import TD
from support.poll import eventually
from support.serving import serving

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
