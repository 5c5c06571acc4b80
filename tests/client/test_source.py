"""`SvidSource` against a real identity server: first issuance, renewal, and the server going away."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from support.certs import serial, within_validity, write_bundle
from support.clocks import Pinned
from support.ids import API, TD, WEB
from support.metrics import REFRESHES, refreshes
from support.poll import eventually_sync
from support.serving import ServerThread, Trust, free_port
from support.tokens import add_token

from meshca.client import ClientMetrics, SvidSource
from meshca.client._state import Event, FetchFailed
from meshca.testing import TestCA


def test_source_gets_an_svid_and_renews_it_with_its_own_proof(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    server = servers(trust.dir, leaf_ttl=timedelta(seconds=4))
    server.start()
    token = add_token(trust.dir, WEB, uses=1)  # renewals use the SVID proof: one use is enough
    # The plain form: dial the name in the server certificate, no server_name override.
    source = sources(f"localhost:{server.port}", trust.dir / "bundle.pem", str(WEB), join_token=token, server_name=None)
    with pytest.raises(RuntimeError, match="wait_ready"):
        _ = source.svid
    broken = source.subscribe(lambda s: 1 / 0)  # a broken listener does not stop the others
    with capture_logs() as logs:
        first = source.wait_ready(10)
    assert first.svid is not None and first.svid.spiffe_id == WEB
    assert source.svid is first.svid
    assert source.bundle.anchors == (trust.ca.anchor,)
    assert within_validity(first.svid)
    assert first.svid.not_after - datetime.now(UTC) <= timedelta(seconds=4)
    seen: list[int] = []
    unsubscribe = source.subscribe(lambda s: seen.append(serial(s.svid)) if s.svid else None)
    with capture_logs() as later_logs:
        eventually_sync(lambda: len(seen) >= 2, 8, "two renewals")
    unsubscribe()
    broken()
    assert len(set(seen)) == len(seen) and serial(first.svid) not in seen
    # The first SVID is logged as issued, the next ones as renewed (the server's own lines carry a principal).
    client_lines = [e for e in logs + later_logs if e["event"].startswith("svid.") and "principal" not in e]
    assert [e["event"] for e in client_lines[:3]] == ["svid.issued", "svid.renewed", "svid.renewed"]
    assert client_lines[0]["serial"] == format(serial(first.svid), "x")
    assert any(e["event"] == "source.listener_failed" for e in logs + later_logs)
    unsubscribed_at = len(seen)
    renewed = source.svid
    eventually_sync(lambda: source.svid is not renewed, 8, "a renewal after unsubscribing")
    assert len(seen) == unsubscribed_at
    assert refreshes(source, "success") >= 3
    assert refreshes(source, "failure") == 0


def test_source_honours_its_own_ttl(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    server = servers(trust.dir, leaf_ttl=timedelta(hours=1))
    server.start()
    source = sources(
        server.address, trust.ca.bundle, WEB, join_token=add_token(trust.dir, WEB), ttl=timedelta(seconds=30)
    )
    svid = source.wait_ready(10).svid
    assert svid is not None
    assert timedelta(seconds=25) < svid.not_after - datetime.now(UTC) <= timedelta(seconds=30)


def test_server_down_at_start_then_up(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    port = free_port()
    token = add_token(trust.dir, WEB)
    # The middle of every jitter range: retries at 0.25, 0.75, 1.75, 3.75 s, ... (a random draw near the top
    # of the range could put the next try after the 10 s this test waits for the server that came up).
    source = sources(f"127.0.0.1:{port}", trust.ca.bundle, WEB, join_token=token, rng=Pinned(0.5))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"no SVID for {WEB} within 1.5 s; the last attempt failed: UNAVAILABLE: "):
        source.wait_ready(1.5)
    assert time.monotonic() - started >= 1.5
    assert not source.snapshot.ready
    down_failures = refreshes(source, "failure")
    assert down_failures >= 2
    assert down_failures < 15  # backoff, not a hot loop
    server = servers(trust.dir)
    assert server.start(port) == port
    snapshot = source.wait_ready(10)
    assert snapshot.svid is not None and within_validity(snapshot.svid)
    assert refreshes(source, "success") == 1


@pytest.mark.slow
def test_server_down_at_renewal_keeps_the_old_svid_and_recovers_before_it_expires(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    server = servers(trust.dir, leaf_ttl=timedelta(seconds=10))
    port = server.start()
    source = sources(server.address, trust.ca.bundle, WEB, join_token=add_token(trust.dir, WEB))
    first = source.wait_ready(10)
    assert first.svid is not None
    old = first.svid
    server.stop()
    # When each failure is recorded, taken on the renewal thread itself (exact, whatever the load).
    failed_at: list[float] = []

    def record(event: Event) -> None:
        if isinstance(event, FetchFailed):
            failed_at.append(time.monotonic())

    source._core.hooks.append(record)
    with capture_logs() as logs:
        # Renewal is due at about 5 s (4 to 6 with jitter); stay down until 2.5 s before expiry.
        while datetime.now(UTC) < old.not_after - timedelta(seconds=2.5):
            assert source.snapshot is first  # the old SVID stays, untouched
            assert within_validity(old)
            time.sleep(0.01)
    failures = refreshes(source, "failure")  # the renewal thread may be one failure ahead or behind the logs
    assert failures >= 4
    assert abs(len(failed_at) - failures) <= 1
    gaps = [b - a for a, b in itertools.pairwise(failed_at)]
    assert min(gaps) >= 0.095, gaps  # min_backoff is 100 ms: spaced retries, not a hot loop
    fetch_failed = [e for e in logs if e["event"] == "svid.fetch_failed"]
    assert abs(len(fetch_failed) - failures) <= 1
    # Backoff capped by a tenth of the time left (4 to 6 s at the first failure).
    assert all(0.1 <= e["retry_in"] <= 0.6 for e in fetch_failed), [e["retry_in"] for e in fetch_failed]
    assert all("UNAVAILABLE" in e["reason"] for e in fetch_failed)

    server.start(port)
    restarted = time.monotonic()
    eventually_sync(lambda: source.snapshot.svid is not old, 5, "a renewal after the restart")
    # Near expiry the source retries at least every few hundred ms; the first retry after the
    # restart gets through (gRPC's own reconnect backoff, up to minutes, must not hold it back).
    assert time.monotonic() - restarted < 1.0
    new = source.svid
    assert datetime.now(UTC) < old.not_after
    assert serial(new) != serial(old)
    assert within_validity(new)
    assert new.not_after > old.not_after


@pytest.mark.parametrize("server_up", [True, False], ids=["server-up", "server-down"])
def test_close_stops_the_threads_promptly(
    server_up: bool, trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    if server_up:
        server = servers(trust.dir)
        server.start()
        address = server.address
    else:
        address = f"127.0.0.1:{free_port()}"
    source = sources(address, trust.ca.bundle, WEB, join_token=add_token(trust.dir, WEB))
    if server_up:
        source.wait_ready(10)
    else:
        eventually_sync(lambda: refreshes(source, "failure") >= 2, 5, "failed attempts")
    threads = list(source._threads)
    assert all(t.is_alive() for t in threads)
    started = time.monotonic()
    with source:  # __exit__ closes
        pass
    assert time.monotonic() - started < 2
    assert not any(t.is_alive() for t in threads)
    # Nothing runs any more: the flows ran on those threads only, and they are gone.
    successes, failures = refreshes(source, "success"), refreshes(source, "failure")
    source.close()  # closing twice is harmless
    assert (refreshes(source, "success"), refreshes(source, "failure")) == (successes, failures)


def test_a_bundle_change_before_the_first_svid_does_not_make_the_source_ready(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource], tmp_path: Path
) -> None:
    write_bundle(trust.dir, trust.ca.anchor, TestCA(TD).anchor)  # the server publishes two anchors
    server = servers(trust.dir)
    server.start()
    jwt = tmp_path / "token"  # not there yet: every attempt fails, and is retried
    source = sources(server.address, trust.ca.bundle, WEB, jwt_file=jwt)
    eventually_sync(lambda: len(source.bundle.anchors) == 2, 5, "the second anchor from the watch stream")
    with pytest.raises(TimeoutError, match=f"the last attempt failed: cannot read {jwt}"):
        source.wait_ready(0.5)
    assert not source.snapshot.ready


def test_sources_export_to_one_registry_through_one_metrics_object(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    server = servers(trust.dir)
    server.start()
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    made = [
        sources(server.address, trust.ca.bundle, sid, join_token=add_token(trust.dir, sid), metrics=metrics)
        for sid in (WEB, API)
    ]
    for source in made:
        source.wait_ready(10)
        assert source.metrics_registry is registry
        assert refreshes(source, "success") == 1
    # Without metrics=, each source counts in a registry of its own.
    alone = sources(server.address, trust.ca.bundle, WEB, join_token=add_token(trust.dir, WEB))
    alone.wait_ready(10)
    assert alone.metrics_registry is not registry
    assert refreshes(alone, "success") == 1
    assert registry.get_sample_value(REFRESHES, {"spiffe_id": str(WEB), "result": "success"}) == 1
