"""The pure parts of the client: requests, response checks, and the source machine's flows (frozen clock).

The flows are driven here by hand, step by step, as the drivers do: every
delay is exact (a pinned random source) and nothing sleeps.
"""

from __future__ import annotations

import ast
import random
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from support.clocks import Pinned
from support.ids import OTHER, WEB
from support.metrics import REFRESHES
from support.poll import eventually_sync

import meshca
from meshca._proto import meshca_identity_pb2 as pb
from meshca.client import Snapshot, X509Svid
from meshca.client._core import Credentials, bundle_from_message, make_request, svid_from_response
from meshca.client._hooks import ClientMetrics, TlsContexts, log_event
from meshca.client._state import (
    BundleIgnored,
    ChainUntrusted,
    Event,
    Failure,
    Fetch,
    FetchFailed,
    Flow,
    GiveUp,
    NextBundle,
    Publish,
    Published,
    Reconnect,
    RenewNow,
    Sleep,
    SourceConfig,
    SourceMachine,
    WatchFailed,
)
from meshca.pki._proof import SvidProof, verify_svid_proof
from meshca.pki._rotation import RenewalPolicy
from meshca.testing import FrozenClock, TestCA

S = timedelta(seconds=1)
MS = timedelta(milliseconds=1)


def response(
    ca: TestCA, key: meshca.PrivateKey, sid: meshca.SpiffeId, now: datetime, ttl: timedelta = 10 * S
) -> pb.IssueSVIDResponse:
    issued = ca.issuer.sign(key.public_key(), sid, now=now, ttl=ttl)
    return pb.IssueSVIDResponse(spiffe_id=str(sid), leaf=issued.leaf_der(), intermediates=issued.intermediates_der)


def svid_of(ca: TestCA, sid: meshca.SpiffeId, now: datetime, ttl: timedelta = 10 * S) -> X509Svid:
    key = meshca.generate_key()
    return svid_from_response(response(ca, key, sid, now, ttl), key, sid, ca.bundle, now=now)


# -- values


def test_x509_svid_repr_and_pem_show_no_key_until_asked(ca: TestCA, now: datetime) -> None:
    svid = svid_of(ca, WEB, now)
    text = repr(svid) + str(svid)
    assert "PRIVATE KEY" not in text
    assert svid.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert svid.spiffe_id == WEB
    assert svid.chain_pem.count(b"BEGIN CERTIFICATE") == 2
    assert [x509.load_der_x509_certificate(d) for d in svid.chain_der] == list(svid.chain)
    assert svid.not_before < now < svid.not_after == now + 10 * S


def test_snapshot_ready_only_with_an_svid(ca: TestCA, now: datetime) -> None:
    assert not Snapshot(None, ca.bundle).ready
    assert Snapshot(svid_of(ca, WEB, now), ca.bundle).ready


def test_credentials_take_exactly_one_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Credentials()
    with pytest.raises(ValueError, match="exactly one"):
        Credentials("token", tmp_path / "jwt")
    assert "s3cret" not in repr(Credentials("s3cret"))


# -- requests


def test_first_request_carries_the_join_token_and_a_csr_for_a_new_key(now: datetime) -> None:
    key = meshca.generate_key()
    request = make_request(key, WEB, Credentials("tok"), None, now=now, ttl=10 * S)
    assert request.credential.WhichOneof("kind") == "join_token"
    assert request.credential.join_token == "tok"
    assert request.spiffe_id == str(WEB)
    assert request.ttl.seconds == 10
    csr = x509.load_der_x509_csr(request.csr)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    assert not make_request(key, WEB, Credentials("tok"), None, now=now).HasField("ttl")


def test_renewal_request_proves_the_current_svid_bound_to_the_new_csr(ca: TestCA, now: datetime) -> None:
    current = svid_of(ca, WEB, now)
    request = make_request(meshca.generate_key(), WEB, Credentials("tok"), current, now=now + S)
    assert request.credential.WhichOneof("kind") == "svid"
    proof = request.credential.svid
    assert list(proof.chain) == list(current.chain_der)
    sid = verify_svid_proof(
        SvidProof(tuple(proof.chain), proof.signature, proof.signed_at.ToDatetime(tzinfo=now.tzinfo)),
        request.csr,
        ca.bundle,
        now=now + S,
    )
    assert sid == WEB


def test_an_expired_svid_is_not_used_as_credential(ca: TestCA, now: datetime) -> None:
    current = svid_of(ca, WEB, now)
    request = make_request(meshca.generate_key(), WEB, Credentials("tok"), current, now=current.not_after)
    assert request.credential.WhichOneof("kind") == "join_token"


def test_the_jwt_file_is_read_on_every_attempt(tmp_path: Path, now: datetime) -> None:
    path = tmp_path / "token"
    creds = Credentials(jwt_file=path)
    path.write_text("first.jwt.value\n")
    assert make_request(meshca.generate_key(), WEB, creds, None, now=now).credential.jwt == "first.jwt.value"
    path.write_text("second.jwt.value")
    assert make_request(meshca.generate_key(), WEB, creds, None, now=now).credential.jwt == "second.jwt.value"


# -- responses


def test_a_good_response_is_accepted(ca: TestCA, now: datetime) -> None:
    key = meshca.generate_key()
    svid = svid_from_response(response(ca, key, WEB, now), key, WEB, ca.bundle, now=now)
    assert svid.spiffe_id == WEB
    assert svid.key is key
    assert svid.leaf.public_key() == key.public_key()


def test_a_response_for_another_spiffe_id_is_refused(ca: TestCA, now: datetime) -> None:
    key = meshca.generate_key()
    with pytest.raises(meshca.AuthorizationError, match=str(OTHER)):
        svid_from_response(response(ca, key, OTHER, now), key, WEB, ca.bundle, now=now)


def test_a_response_that_does_not_chain_to_the_bundle_is_refused(ca: TestCA, rogue_ca: TestCA, now: datetime) -> None:
    key = meshca.generate_key()
    with pytest.raises(meshca.VerificationError, match="anchor"):
        svid_from_response(response(rogue_ca, key, WEB, now), key, WEB, ca.bundle, now=now)


def test_a_response_for_another_key_is_refused(ca: TestCA, now: datetime) -> None:
    with pytest.raises(meshca.VerificationError, match="key"):
        svid_from_response(
            response(ca, meshca.generate_key(), WEB, now), meshca.generate_key(), WEB, ca.bundle, now=now
        )


def test_an_expired_or_garbled_response_is_refused(ca: TestCA, now: datetime) -> None:
    key = meshca.generate_key()
    good = response(ca, key, WEB, now)
    with pytest.raises(meshca.VerificationError):
        svid_from_response(good, key, WEB, ca.bundle, now=now + 11 * S)
    garbled = pb.IssueSVIDResponse(leaf=b"\x30\x03junk", intermediates=good.intermediates)
    with pytest.raises(meshca.VerificationError, match="parsed"):
        svid_from_response(garbled, key, WEB, ca.bundle, now=now)
    with pytest.raises(meshca.VerificationError):
        svid_from_response(pb.IssueSVIDResponse(), key, WEB, ca.bundle, now=now)


def test_bundle_from_message(ca: TestCA, rogue_ca: TestCA) -> None:
    der = [a.public_bytes(Encoding.DER) for a in (ca.anchor, rogue_ca.anchor)]
    bundle = bundle_from_message(pb.Bundle(trust_domain="example.org", anchors=der, sequence=7))
    assert set(bundle.anchors) == {ca.anchor, rogue_ca.anchor}
    assert bundle.sequence == 7


# -- the source machine

POLICY = RenewalPolicy(fraction=0.5, jitter=0.1)  # backoff: 0.5 s doubling to 30 s, never under 100 ms
DOWN = Failure("UNAVAILABLE: failed to connect to all addresses", reconnect=True)
BUSY = Failure("RESOURCE_EXHAUSTED: rate limited")
UNKNOWN_TOKEN = Failure(
    "UNAUTHENTICATED: unknown join token",
    meshca.RequestRefused("no SVID: refused", "UNAUTHENTICATED", "unknown join token"),
)


def make_machine(
    ca: TestCA,
    clock: FrozenClock,
    *,
    rng: random.Random | None = None,
    credentials: Credentials | None = None,
) -> tuple[SourceMachine, list[Event]]:
    """A machine whose random draws sit mid-range (renewal at exactly half the life), and its events."""
    config = SourceConfig("localhost:1", WEB, credentials or Credentials("tok"), renewal=POLICY)
    events: list[Event] = []
    machine = SourceMachine(config, ca.bundle, clock=clock, rng=rng or Pinned(0.5), hooks=[events.append])
    return machine, events


def answer(ca: TestCA, step: object, clock: FrozenClock, ttl: timedelta = 10 * S) -> pb.IssueSVIDResponse:
    """What a good identity service answers to ``step`` (a `Fetch`)."""
    assert isinstance(step, Fetch), step
    key = x509.load_der_x509_csr(step.request.csr).public_key()
    issued = ca.issuer.sign(key, WEB, now=clock(), ttl=ttl)  # type: ignore[arg-type]
    return pb.IssueSVIDResponse(spiffe_id=str(WEB), leaf=issued.leaf_der(), intermediates=issued.intermediates_der)


def credential(step: object) -> str | None:
    assert isinstance(step, Fetch), step
    return step.request.credential.WhichOneof("kind")


def bundle_message(*cas: TestCA, td: str = "example.org") -> pb.Bundle:
    der = [c.anchor.public_bytes(Encoding.DER) for c in cas]
    return pb.Bundle(trust_domain=td, anchors=der, sequence=2)


def first_svid(machine: SourceMachine, ca: TestCA, clock: FrozenClock) -> Flow:
    """A renewal flow that has just published its first SVID."""
    flow = machine.renewal()
    assert isinstance(flow.send(answer(ca, next(flow), clock)), Publish)
    return flow


def test_machine_refuses_a_bundle_of_another_trust_domain(foreign_ca: TestCA, clock: FrozenClock) -> None:
    with pytest.raises(ValueError, match=r"other\.test"):
        make_machine(foreign_ca, clock)


def test_renewal_backs_off_reconnects_after_unavailable_then_renews_at_half_life(
    ca: TestCA, clock: FrozenClock
) -> None:
    machine, events = make_machine(ca, clock)
    flow = machine.renewal()
    step = next(flow)
    assert credential(step) == "join_token"  # at once, with the join token
    assert flow.send(DOWN) == Sleep(250 * MS)  # attempt 1: half of the 0.5 s ceiling
    assert flow.send(None) == Reconnect(ca.bundle)  # UNAVAILABLE: the next call goes over a new channel
    step = flow.send(None)
    assert credential(step) == "join_token"
    assert flow.send(BUSY) == Sleep(500 * MS)  # attempt 2: half of 1 s; same channel
    step = flow.send(None)
    assert isinstance(step, Fetch)
    assert not machine.snapshot.ready
    published = flow.send(answer(ca, step, clock))
    assert isinstance(published, Publish)
    assert published.snapshot is machine.snapshot
    svid = published.snapshot.svid
    assert svid is not None and svid.not_after == clock() + 10 * S
    assert flow.send(None) == Sleep(5 * S)  # half of the 10 s life
    clock.advance(5 * S)
    step = flow.send(None)
    assert credential(step) == "svid"  # renewals prove the current SVID
    # 5 s left: retries at most 0.5 s apart (a tenth of it); the attempt count starts again.
    assert flow.send(BUSY) == Sleep(250 * MS)
    step = flow.send(None)
    assert isinstance(step, Fetch)
    clock.advance(3 * S)  # 2 s left: the cap is 0.2 s
    assert flow.send(BUSY) == Sleep(100 * MS)
    renewed = flow.send(answer(ca, flow.send(None), clock))
    assert isinstance(renewed, Publish)
    assert renewed.snapshot.svid is not None and renewed.snapshot.svid is not svid
    assert flow.send(None) == Sleep(5 * S)
    assert [(type(e).__name__, getattr(e, "attempt", None), getattr(e, "retry_in", None)) for e in events] == [
        ("FetchFailed", 1, 250 * MS),
        ("FetchFailed", 2, 500 * MS),
        ("Published", None, None),
        ("FetchFailed", 1, 250 * MS),
        ("FetchFailed", 2, 100 * MS),
        ("Published", None, None),
    ]
    assert [e.failure for e in events if isinstance(e, FetchFailed)] == [DOWN, BUSY, BUSY, BUSY]


def test_a_refusal_before_the_first_svid_gives_up_at_once(ca: TestCA, clock: FrozenClock) -> None:
    machine, events = make_machine(ca, clock)
    flow = machine.renewal()
    next(flow)
    assert str(machine.timeout_error(3)) == f"no SVID for {WEB} within 3 s"
    assert flow.send(BUSY) == Sleep(250 * MS)  # transient: retried
    next(flow)
    assert flow.send(UNKNOWN_TOKEN) == GiveUp(UNKNOWN_TOKEN.refusal)  # type: ignore[arg-type]
    with pytest.raises(StopIteration):
        flow.send(None)
    assert machine.refusal is UNKNOWN_TOKEN.refusal
    assert not machine.snapshot.ready
    assert events == [FetchFailed(WEB, BUSY, 1, 250 * MS), FetchFailed(WEB, UNKNOWN_TOKEN, 2, None)]
    assert str(machine.timeout_error(3)) == (
        f"no SVID for {WEB} within 3 s; the last attempt failed: UNAUTHENTICATED: unknown join token"
    )


def test_a_refusal_after_the_first_svid_is_retried_and_the_svid_kept(ca: TestCA, clock: FrozenClock) -> None:
    machine, events = make_machine(ca, clock)
    flow = first_svid(machine, ca, clock)
    svid = machine.snapshot.svid
    flow.send(None)  # the renewal sleep
    clock.advance(5 * S)
    delays = []
    for _ in range(4):
        assert credential(flow.send(None)) == "svid"
        step = flow.send(UNKNOWN_TOKEN)
        assert isinstance(step, Sleep)
        delays.append(step.delay)
    assert delays == [250 * MS] * 4  # 5 s left: a ceiling of 0.5 s, at half
    assert machine.snapshot.svid is svid
    assert machine.refusal is None
    assert [e.retry_in for e in events if isinstance(e, FetchFailed)] == delays


def test_a_bad_response_is_a_failure_and_keeps_the_old_svid(ca: TestCA, rogue_ca: TestCA, clock: FrozenClock) -> None:
    machine, events = make_machine(ca, clock, rng=random.Random(1))
    flow = first_svid(machine, ca, clock)
    svid = machine.snapshot.svid
    flow.send(None)
    clock.advance(5 * S)
    delays = []
    for _ in range(6):
        step = flow.send(answer(rogue_ca, flow.send(None), clock))
        assert isinstance(step, Sleep)
        delays.append(step.delay)
    assert machine.snapshot.svid is svid
    # Five seconds left: retries come at most half a second apart, never under 100 ms.
    assert all(100 * MS <= d <= 500 * MS for d in delays)
    failed = [e for e in events if isinstance(e, FetchFailed)]
    assert [e.attempt for e in failed] == [1, 2, 3, 4, 5, 6]
    assert all(e.failure.reason.startswith("VerificationError: chain does not lead to an anchor") for e in failed)
    assert isinstance(flow.send(answer(ca, flow.send(None), clock)), Publish)
    assert machine.snapshot.svid is not svid


def test_an_unreadable_jwt_file_is_retried(ca: TestCA, clock: FrozenClock, tmp_path: Path) -> None:
    machine, events = make_machine(ca, clock, credentials=Credentials(jwt_file=tmp_path / "missing"))
    flow = machine.renewal()
    assert next(flow) == Sleep(250 * MS)  # no call made: nothing to send
    (tmp_path / "missing").write_text("a.b.c")
    assert credential(flow.send(None)) == "jwt"
    assert [e.failure.reason for e in events if isinstance(e, FetchFailed)] == [
        f"cannot read {tmp_path / 'missing'}: No such file or directory"
    ]


def test_watch_applies_changed_anchors_backs_off_and_reconnects_once(
    ca: TestCA, rogue_ca: TestCA, foreign_ca: TestCA, clock: FrozenClock
) -> None:
    machine, events = make_machine(ca, clock)
    watch = machine.watch()
    assert next(watch) == NextBundle()
    assert watch.send(bundle_message(ca)) == NextBundle()  # the same anchors: nothing to publish
    assert watch.send(bundle_message(foreign_ca, td="other.test")) == NextBundle()  # refused
    assert events == [BundleIgnored("bundle for another trust domain: other.test")]
    published = watch.send(bundle_message(ca, rogue_ca))
    assert isinstance(published, Publish)
    assert set(published.snapshot.bundle.anchors) == {ca.anchor, rogue_ca.anchor}
    assert published.snapshot is machine.snapshot
    assert watch.send(None) == NextBundle()
    # The renewal flow's next call goes over a channel that trusts the new bundle: one reconnect.
    renewal = machine.renewal()
    assert next(renewal) == Reconnect(published.snapshot.bundle)
    assert isinstance(renewal.send(None), Fetch)
    # The stream on the old channel ends; the watch backs off and reopens on the new channel.
    assert watch.send(Failure("CANCELLED: Channel closed!")) == Sleep(250 * MS)
    assert watch.send(None) == NextBundle()
    assert watch.send(DOWN) == Sleep(500 * MS)  # attempt 2
    assert watch.send(None) == Reconnect(published.snapshot.bundle)  # asked for by UNAVAILABLE
    assert watch.send(None) == NextBundle()
    assert watch.send(bundle_message(ca, rogue_ca)) == NextBundle()  # a message resets the backoff
    assert watch.send(BUSY) == Sleep(250 * MS)
    assert [(e.attempt, e.retry_in) for e in events if isinstance(e, WatchFailed)] == [
        (1, 250 * MS),
        (2, 500 * MS),
        (1, 250 * MS),
    ]


def test_a_bundle_that_no_longer_verifies_the_svid_renews_it_at_once_with_the_bootstrap_credential(
    ca: TestCA, rogue_ca: TestCA, clock: FrozenClock
) -> None:
    """Anchor rotation as a source sees it (A = ca, B = rogue_ca): A+B changes nothing; B alone renews early."""
    machine, events = make_machine(ca, clock)
    renewal = first_svid(machine, ca, clock)
    assert renewal.send(None) == Sleep(5 * S)
    watch = machine.watch()
    next(watch)
    # Prepared: B joins the bundle. The SVID still verifies: no early renewal.
    assert isinstance(watch.send(bundle_message(ca, rogue_ca)), Publish)
    assert watch.send(None) == NextBundle()
    # A sleep that ends without cause (a stale wake-up) is decided again: it sleeps on, for the time left.
    clock.advance(1 * S)
    assert renewal.send(None) == Sleep(4 * S)
    # Retired: A leaves. The SVID chains to A alone: the watch wakes the renewal flow.
    machine.hooks.append(log_event)
    with capture_logs() as logs:
        assert isinstance(watch.send(bundle_message(rogue_ca)), Publish)
        assert watch.send(None) == RenewNow()
    assert watch.send(None) == NextBundle()
    [line] = [e for e in logs if e["event"] == "svid.untrusted"]
    assert (line["log_level"], line["spiffe_id"], line["action"]) == ("warning", str(WEB), "renewing now")
    assert "anchor" in line["reason"]
    [untrusted] = [e for e in events if isinstance(e, ChainUntrusted)]
    assert untrusted.spiffe_id == WEB
    assert "anchor" in untrusted.reason
    # Woken with no time passed, it renews now, over a channel that trusts B alone, and with the
    # join token: the server would refuse a proof of an SVID under A.
    assert renewal.send(None) == Reconnect(machine.snapshot.bundle)
    step = renewal.send(None)
    assert credential(step) == "join_token"
    assert renewal.send(BUSY) == Sleep(250 * MS)  # a failure backs off...
    step = renewal.send(None)
    assert credential(step) == "join_token"  # ...and tries again at once after it, not at half life
    renewed = renewal.send(answer(rogue_ca, step, clock))
    assert isinstance(renewed, Publish)
    assert renewed.snapshot.svid is not None and renewed.snapshot.svid.chain[1] == rogue_ca.issuer_certificate
    assert renewal.send(None) == Sleep(5 * S)  # under B: half of the new life
    clock.advance(5 * S)
    assert credential(renewal.send(None)) == "svid"  # renewals prove the SVID again


def test_an_unreadable_bundle_message_is_ignored(ca: TestCA, clock: FrozenClock) -> None:
    machine, events = make_machine(ca, clock)
    watch = machine.watch()
    next(watch)
    garbled = pb.Bundle(trust_domain="example.org", anchors=[b"\x30\x03junk"], sequence=3)
    assert watch.send(garbled) == NextBundle()
    assert machine.snapshot.bundle is ca.bundle
    assert len(events) == 1 and isinstance(events[0], BundleIgnored)
    assert events[0].reason.startswith("unreadable bundle")


def test_metrics_count_fetches_and_show_the_expiry(ca: TestCA, clock: FrozenClock) -> None:
    machine, _ = make_machine(ca, clock)
    metrics = ClientMetrics()
    machine.hooks.append(metrics)
    flow = machine.renewal()
    next(flow)
    flow.send(BUSY)
    flow.send(answer(ca, flow.send(None), clock))
    svid = machine.snapshot.svid
    assert svid is not None

    def count(result: str) -> float:
        return metrics.registry.get_sample_value(REFRESHES, {"spiffe_id": str(WEB), "result": result}) or 0.0

    assert (count("success"), count("failure")) == (1, 1)
    expiry = metrics.registry.get_sample_value("meshca_client_svid_expiry_timestamp_seconds", {"spiffe_id": str(WEB)})
    assert expiry == svid.not_after.timestamp()
    watch = machine.watch()
    next(watch)
    watch.send(pb.Bundle(trust_domain="example.org", anchors=[], sequence=2))  # a bundle change is no fetch
    assert (count("success"), count("failure")) == (1, 1)


def test_metrics_register_once_on_the_registry_given(ca: TestCA, clock: FrozenClock) -> None:
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    assert metrics.registry is registry
    with pytest.raises(ValueError, match="Duplicated"):
        ClientMetrics(registry)  # registering twice is prometheus' error: share the object instead
    assert ClientMetrics().registry is not ClientMetrics().registry


class CountingLock:
    """A real lock that counts the threads blocked on it, so a test can hold them all at one point."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0

    def __enter__(self) -> None:
        with self._count:
            self.waiting += 1
        self._lock.acquire()
        with self._count:
            self.waiting -= 1

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_concurrent_renewal_and_bundle_update_lose_neither(ca: TestCA, rogue_ca: TestCA, clock: FrozenClock) -> None:
    """The renewal thread and the watch thread both swap the snapshot; each keeps the other's half."""
    machine, _ = make_machine(ca, clock)
    renewal = first_svid(machine, ca, clock)
    assert renewal.send(None) == Sleep(5 * S)
    clock.advance(5 * S)  # a renewal sleep that ends early is decided again: the time must have come
    step = renewal.send(None)
    reply = answer(ca, step, clock)
    watch = machine.watch()
    next(watch)
    machine._lock = lock = CountingLock()  # type: ignore[assignment]
    # Hold the snapshot lock until both updates wait on it, then let them go at once.
    with lock:
        threads = [
            threading.Thread(target=renewal.send, args=(reply,)),
            threading.Thread(target=watch.send, args=(bundle_message(ca, rogue_ca),)),
        ]
        for t in threads:
            t.start()
        eventually_sync(lambda: lock.waiting == 2, 5, "both updates to wait on the snapshot lock")
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    svid = machine.snapshot.svid
    assert svid is not None
    assert svid.leaf.public_key() == x509.load_der_x509_csr(step.request.csr).public_key()  # type: ignore[union-attr]
    assert set(machine.snapshot.bundle.anchors) == {ca.anchor, rogue_ca.anchor}


def test_live_contexts_end_with_the_newest_svid_when_updates_race(
    ca: TestCA, rogue_ca: TestCA, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context refreshed for an older snapshot after a newer one must not go back to the older SVID."""
    import meshca.client._hooks as hooks_module
    from meshca.client._tls import make_context
    from meshca.client._tls import refresh as real_refresh

    machine, _ = make_machine(ca, clock)
    contexts = TlsContexts()
    machine.hooks.append(contexts)
    renewal = first_svid(machine, ca, clock)
    old = machine.snapshot.svid
    ctx = contexts.track(make_context("server", lambda: machine.snapshot, meshca.authorize_any(), clock))
    assert ctx.meshca_svid is old

    in_old_refresh, release = threading.Event(), threading.Event()

    def slow_refresh(context: object, snapshot: Snapshot) -> None:
        if snapshot.svid is old:  # the bundle update's refresh, held until the renewal is under way
            in_old_refresh.set()
            release.wait(5)
        real_refresh(context, snapshot)  # type: ignore[arg-type]

    monkeypatch.setattr(hooks_module, "refresh", slow_refresh)
    machine._lock = lock = CountingLock()  # type: ignore[assignment]
    renewal.send(None)  # the renewal sleep
    clock.advance(5 * S)
    reply = answer(ca, renewal.send(None), clock)
    watch = machine.watch()
    next(watch)
    updater = threading.Thread(target=watch.send, args=(bundle_message(ca, rogue_ca),))
    updater.start()
    assert in_old_refresh.wait(5)
    published: list[object] = []
    renewer = threading.Thread(target=lambda: published.append(renewal.send(reply)))
    renewer.start()
    # The renewal runs while the bundle update's refresh is in flight: it waits for the lock, or
    # (were the hooks run outside it) finishes first and is then overtaken.
    eventually_sync(lambda: lock.waiting == 1 or published, 5, "the renewal to run into the held refresh")
    release.set()
    for t in (updater, renewer):
        t.join(5)
        assert not t.is_alive()
    [done] = published
    assert isinstance(done, Publish)
    new = done.snapshot.svid
    assert new is not old
    assert machine.snapshot.svid is new
    assert ctx.meshca_svid is new


def test_published_events_carry_the_previous_snapshot(ca: TestCA, clock: FrozenClock) -> None:
    machine, events = make_machine(ca, clock)
    initial = machine.snapshot
    first_svid(machine, ca, clock)
    assert events == [Published(machine.snapshot, initial)]


@pytest.mark.parametrize("module", ["_state.py", "_core.py"])
def test_the_core_does_no_io_and_knows_no_metrics_or_logging(module: str) -> None:
    """TLS, sockets, gRPC, metrics, logs and sleeping belong to the drivers and hooks."""
    source = (Path(meshca.client.__file__).parent / module).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"ssl", "socket", "grpc", "asyncio", "time", "structlog", "prometheus_client", "logging"}
    assert imported & forbidden == set()
    assert "meshca" in imported  # the walk sees imports at all


def test_log_lines_name_what_happened_and_never_the_key(ca: TestCA, rogue_ca: TestCA, clock: FrozenClock) -> None:
    machine, _ = make_machine(ca, clock)
    machine.hooks.append(log_event)
    with capture_logs() as logs:
        renewal = first_svid(machine, ca, clock)
        renewal.send(None)  # the renewal sleep
        clock.advance(5 * S)
        assert isinstance(renewal.send(None), Fetch)
        renewal.send(BUSY)
        watch = machine.watch()
        next(watch)
        watch.send(bundle_message(ca, rogue_ca))
        watch.send(None)
        watch.send(bundle_message(rogue_ca, td="other.test"))
    svid = machine.snapshot.svid
    assert svid is not None
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("svid.issued", "info"),
        ("svid.fetch_failed", "warning"),
        ("bundle.updated", "info"),
        ("bundle.ignored", "warning"),
    ]
    assert logs[0]["serial"] == format(svid.leaf.serial_number, "x")
    assert logs[1]["reason"] == BUSY.reason and logs[1]["permanent"] is False
    assert logs[2]["anchors"] == 2
    assert "PRIVATE KEY" not in repr(logs) and "tok" not in repr(logs)


def test_a_machine_started_from_an_svid_is_ready_and_renews_it_by_proof_at_half_life(
    ca: TestCA, clock: FrozenClock
) -> None:
    """A restarted process (the node agent) hands in the SVID it saved: no join token is needed or sent."""
    held = svid_of(ca, WEB, clock())
    config = SourceConfig("localhost:1", WEB, Credentials(renewal_only=True), renewal=POLICY)
    machine = SourceMachine(config, ca.bundle, clock=clock, rng=Pinned(0.5), initial=held)
    assert machine.snapshot.svid is held
    flow = machine.renewal()
    wait = next(flow)
    assert wait == Sleep(5 * S)  # half of what is left of its 10 s
    clock.advance(wait.delay)
    assert credential(flow.send(None)) == "svid"


def test_a_machine_whose_initial_svid_expired_has_no_credential_left(ca: TestCA, clock: FrozenClock) -> None:
    held = svid_of(ca, WEB, clock())
    config = SourceConfig("localhost:1", WEB, Credentials(renewal_only=True), renewal=POLICY)
    machine = SourceMachine(config, ca.bundle, clock=clock, rng=Pinned(0.5), initial=held)
    clock.advance(timedelta(hours=1))
    flow = machine.renewal()
    step = next(flow)
    assert isinstance(step, Sleep)  # retried with backoff: an operator may still give a credential
    assert machine.last_failure is not None and machine.last_failure.refusal is not None
    assert "no other credential" in machine.last_failure.reason


def test_an_initial_svid_must_be_for_the_configured_id(ca: TestCA, clock: FrozenClock) -> None:
    config = SourceConfig("localhost:1", OTHER, Credentials(renewal_only=True), renewal=POLICY)
    with pytest.raises(ValueError, match="initial SVID is for"):
        SourceMachine(config, ca.bundle, clock=clock, rng=Pinned(0.5), initial=svid_of(ca, WEB, clock()))


def test_an_svid_whose_anchor_left_with_no_other_credential_says_so(
    ca: TestCA, rogue_ca: TestCA, clock: FrozenClock
) -> None:
    """A retire forced under a source holding only an initial SVID: the failure named an expired SVID."""
    config = SourceConfig("localhost:1", WEB, Credentials(renewal_only=True), renewal=POLICY)
    machine = SourceMachine(config, ca.bundle, clock=clock, rng=Pinned(0.5), initial=svid_of(ca, WEB, clock()))
    watch = machine.watch()
    next(watch)
    assert isinstance(watch.send(bundle_message(rogue_ca)), Publish)
    assert watch.send(None) == RenewNow()
    flow = machine.renewal()
    assert isinstance(next(flow), Reconnect)
    assert isinstance(flow.send(None), Sleep)  # retried with backoff: an operator may still give a credential
    failure = machine.last_failure
    assert failure is not None and failure.refusal is not None
    assert "does not verify against the bundle" in failure.reason and "no other credential" in failure.reason
    assert "not valid now" not in failure.reason
