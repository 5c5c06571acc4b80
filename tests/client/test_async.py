"""`AsyncSvidSource` against an identity server on the same event loop."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.certs import serial, within_validity, write_bundle
from support.clocks import Pinned
from support.ids import SERVER_NAME, TD, WEB
from support.metrics import refreshes
from support.poll import eventually
from support.serving import Trust, serving
from support.tokens import K8sIssuer, add_token, k8s_config

import meshca
from meshca.client import AsyncSvidSource, Snapshot
from meshca.testing import TestCA


async def test_async_source_gets_ready_yields_renewals_and_closes_cleanly(trust: Trust) -> None:
    async with serving(trust.dir, trust.ca, write=False, leaf_ttl=timedelta(seconds=4)) as h:
        source = AsyncSvidSource(
            h.address,
            trust.ca.bundle,
            WEB,
            join_token=add_token(trust.dir, WEB),
            server_name=SERVER_NAME,
        )
        with pytest.raises(RuntimeError, match="start"):
            await source.wait_ready(1)
        got: list[Snapshot] = []

        async def consume() -> None:
            async for snapshot in source.updates():
                got.append(snapshot)

        async with source:
            first = await source.wait_ready(10)
            assert first.svid is not None and within_validity(first.svid)
            consumer = asyncio.create_task(consume())
            await eventually(lambda: len(got) >= 2, 10, "two renewals from updates()")
            serials = [serial(s.svid) for s in got if s.svid is not None]
            assert len(set(serials)) == len(serials) >= 2
            assert serial(first.svid) not in serials
            assert got[-1] is source.snapshot or len(got) > 2
            tasks = list(source._tasks)
        # aclose() stopped the loops, closed the channel and ended every updates() iterator.
        assert all(t.done() for t in tasks)
        assert source._channel is None
        await asyncio.wait_for(consumer, 2)
        # Nothing runs any more: both flows are finished tasks, and the source holds no others.
        assert source._tasks == []


async def test_async_source_follows_bundle_changes_after_renewals(trust: Trust) -> None:
    """A renewal after a bundle change swaps the channel under the watch stream; the watch must carry on."""
    other = TestCA(TD)
    async with (
        serving(trust.dir, trust.ca, write=False, leaf_ttl=timedelta(seconds=3)) as h,
        AsyncSvidSource(
            h.address, trust.ca.bundle, WEB, join_token=add_token(trust.dir, WEB), server_name=SERVER_NAME
        ) as source,
    ):
        await source.wait_ready(10)
        write_bundle(trust.dir, trust.ca.anchor, other.anchor)
        await eventually(lambda: len(source.bundle.anchors) == 2, 5, "the added anchor")
        before = source.svid
        await eventually(lambda: source.svid is not before, 5, "a renewal on the new channel")
        write_bundle(trust.dir, trust.ca.anchor)
        await eventually(lambda: source.bundle.anchors == (trust.ca.anchor,), 5, "the removed anchor")
        before = source.svid
        await eventually(lambda: source.svid is not before, 5, "another renewal")
        assert within_validity(source.svid)
        assert all(not t.done() for t in source._tasks)


async def test_async_source_renews_at_once_when_its_anchor_leaves_the_bundle(trust: Trust) -> None:
    """A forced anchor retirement: the SVID under A verifies no more, so it is renewed now, not at half its hour."""
    tdir = meshca.TrustDir.at(trust.dir)
    async with (
        serving(trust.dir, trust.ca, write=False, leaf_ttl=timedelta(hours=1)) as h,
        AsyncSvidSource(
            h.address, trust.ca.bundle, WEB, join_token=add_token(trust.dir, WEB, uses=2), server_name=SERVER_NAME
        ) as source,
    ):
        await source.wait_ready(10)
        first = source.svid
        now = meshca.system_clock()
        b = tdir.prepare_anchor(meshca.generate_key(), now=now)
        tdir.activate_anchor(now=now)
        tdir.retire_anchor()
        await eventually(lambda: source.bundle.anchors == (b,), 5, "the bundle without A")
        await eventually(lambda: source.svid.chain[1].issuer == b.subject, 5, "an SVID under B")
        assert source.svid is not first
        assert all(not t.done() for t in source._tasks)


# -- Kubernetes service-account JWT from a file


async def test_jwt_file_is_read_again_for_every_attempt(trust: Trust, tmp_path: Path) -> None:
    k8s = K8sIssuer.make()
    token_file = tmp_path / "token"
    # Expired ten minutes ago: well past the server's leeway.
    token_file.write_text(k8s.token(now=datetime.now(UTC) - timedelta(hours=1), lifetime=timedelta(minutes=50)))
    config = k8s_config(k8s, tmp_path, ("meshca",))
    async with (
        serving(trust.dir, trust.ca, write=False, k8s_jwt=config) as h,
        # Retries every 100 ms (no jitter): the rewritten file is read well within the wait below.
        AsyncSvidSource(
            h.address, trust.ca.bundle, WEB, jwt_file=token_file, server_name=SERVER_NAME, rng=Pinned(0.0)
        ) as source,
    ):
        with pytest.raises(TimeoutError):
            await source.wait_ready(1.5)
        assert refreshes(source, "failure") >= 2
        # The kubelet rotates the projected token on disk.
        token_file.write_text(k8s.token() + "\n")
        snapshot = await source.wait_ready(5)
        assert snapshot.svid is not None and snapshot.svid.spiffe_id == WEB
        assert refreshes(source, "success") == 1
    reasons = {e.get("reason") for e in h.logs if e["event"] == "auth.failed"}
    assert reasons == {"jwt_expired"}
    issued = [e for e in h.events("svid.issued") if "principal" in e]  # the server's line
    assert issued and issued[0]["principal"] == "k8s:default:web"


async def test_async_source_raises_a_refusal_at_once(trust: Trust) -> None:
    async with serving(trust.dir, trust.ca, write=False) as h:
        token = add_token(trust.dir, WEB)
        bad = AsyncSvidSource(h.address, trust.ca.bundle, WEB, join_token="mtok_nope", server_name=SERVER_NAME)
        async with bad:
            with pytest.raises(meshca.RequestRefused, match="UNAUTHENTICATED: unknown join token"):
                await bad.wait_ready(30)
        # No server_name: the name check fails, and says which name the certificate carries.
        unnamed = AsyncSvidSource(h.address, trust.ca.bundle, WEB, join_token=token)
        async with unnamed:
            mismatch = re.escape("does not name 127.0.0.1 (it names localhost)")
            with pytest.raises(meshca.VerificationError, match=mismatch):
                await unnamed.wait_ready(30)
            assert refreshes(unnamed, "failure") == 1
