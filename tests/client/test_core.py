"""The pure parts of the client: requests, response checks, and the source state machine (frozen clock)."""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry

import meshca
from meshca._proto import meshca_identity_pb2 as pb
from meshca.client import Snapshot, X509Svid
from meshca.client._core import Credentials, bundle_from_message, make_request, svid_from_response
from meshca.client._state import SourceConfig, SourceState
from meshca.pki._proof import SvidProof, verify_svid_proof
from meshca.pki._rotation import RenewalPolicy
from meshca.testing import FrozenClock, TestCA

from .support import OTHER, REFRESHES, WEB

S = timedelta(seconds=1)


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


# -- the source state machine


POLICY = RenewalPolicy(fraction=0.5, jitter=0.1)


def make_state(ca: TestCA, clock: FrozenClock) -> SourceState:
    config = SourceConfig("localhost:1", WEB, Credentials("tok"), renewal=POLICY)
    return SourceState(config, ca.bundle, clock, CollectorRegistry(), random.Random(1))


def fetch(state: SourceState, ca: TestCA, ttl: timedelta = 10 * S) -> X509Svid:
    key, _ = state.new_request()
    return state.accept(key, response(ca, key, WEB, state.clock(), ttl))


def count(state: SourceState, result: str) -> float:
    return state.registry.get_sample_value(REFRESHES, {"spiffe_id": str(WEB), "result": result}) or 0.0


def test_state_refuses_a_bundle_of_another_trust_domain(foreign_ca: TestCA, clock: FrozenClock) -> None:
    with pytest.raises(ValueError, match=r"other\.test"):
        make_state(foreign_ca, clock)


def test_state_fetches_at_once_then_at_the_renewal_moment(ca: TestCA, clock: FrozenClock) -> None:
    state = make_state(ca, clock)
    assert state.next_delay() == timedelta()
    assert not state.snapshot.ready
    svid = fetch(state, ca)
    assert state.snapshot.svid is svid
    assert 4 * S <= state.next_delay() <= 6 * S
    clock.advance(3 * S)
    assert 1 * S <= state.next_delay() <= 3 * S
    clock.advance(5 * S)
    assert state.next_delay() == timedelta()
    # The renewal uses the current SVID as credential.
    _, request = state.new_request()
    assert request.credential.WhichOneof("kind") == "svid"
    assert count(state, "success") == 1
    expiry = state.registry.get_sample_value("meshca_client_svid_expiry_timestamp_seconds", {"spiffe_id": str(WEB)})
    assert expiry == svid.not_after.timestamp()


def test_state_keeps_the_old_svid_when_a_response_is_bad(ca: TestCA, rogue_ca: TestCA, clock: FrozenClock) -> None:
    state = make_state(ca, clock)
    svid = fetch(state, ca)
    clock.advance(5 * S)
    key, _ = state.new_request()
    with pytest.raises(meshca.VerificationError):
        state.accept(key, response(rogue_ca, key, WEB, clock()))
    assert state.snapshot.svid is svid
    delays = [state.failed(RuntimeError("boom")) for _ in range(6)]
    assert count(state, "failure") == 6
    # Five seconds left: retries come at most half a second apart, never under 100 ms.
    assert all(timedelta(milliseconds=100) <= d <= timedelta(milliseconds=500) for d in delays)
    assert state.snapshot.svid is svid
    fetch(state, ca)
    assert state.snapshot.svid is not svid
    assert count(state, "success") == 2


def test_state_applies_a_bundle_only_when_the_anchors_change(
    ca: TestCA, rogue_ca: TestCA, foreign_ca: TestCA, clock: FrozenClock
) -> None:
    state = make_state(ca, clock)
    seen: list[Snapshot] = []
    state.subscribe(lambda s: 1 / 0)  # a broken listener does not stop the others
    unsubscribe = state.subscribe(seen.append)
    svid = fetch(state, ca)
    assert seen == [state.snapshot]

    def message(*cas: TestCA, td: str = "example.org") -> pb.Bundle:
        der = [c.anchor.public_bytes(Encoding.DER) for c in cas]
        return pb.Bundle(trust_domain=td, anchors=der, sequence=2)

    assert not state.bundle_update(message(ca))
    assert not state.bundle_update(message(foreign_ca, td="other.test"))
    assert state.bundle_update(message(ca, rogue_ca))
    assert set(state.snapshot.bundle.anchors) == {ca.anchor, rogue_ca.anchor}
    assert state.snapshot.svid is svid
    assert len(seen) == 2
    unsubscribe()
    assert state.bundle_update(message(rogue_ca))
    assert len(seen) == 2


def test_concurrent_renewal_and_bundle_update_lose_neither(ca: TestCA, rogue_ca: TestCA, clock: FrozenClock) -> None:
    """The renewal thread and the watch thread both swap the snapshot; each keeps the other's half."""
    state = make_state(ca, clock)
    fetch(state, ca)
    key, _ = state.new_request()
    renewal = response(ca, key, WEB, clock())
    anchors = [c.anchor.public_bytes(Encoding.DER) for c in (ca, rogue_ca)]
    message = pb.Bundle(trust_domain="example.org", anchors=anchors, sequence=2)
    # Hold the snapshot lock so both updates are in flight at once, then let them go.
    with state._lock:
        threads = [
            threading.Thread(target=state.accept, args=(key, renewal)),
            threading.Thread(target=state.bundle_update, args=(message,)),
        ]
        for t in threads:
            t.start()
            time.sleep(0.2)
    for t in threads:
        t.join(5)
    assert state.snapshot.svid is not None
    assert state.snapshot.svid.leaf.public_key() == key.public_key()
    assert set(state.snapshot.bundle.anchors) == {ca.anchor, rogue_ca.anchor}


def test_live_contexts_end_with_the_newest_svid_when_updates_race(
    ca: TestCA, rogue_ca: TestCA, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context refreshed for an older snapshot after a newer one must not go back to the older SVID."""
    import meshca.client._state as state_module
    from meshca.client._tls import make_context
    from meshca.client._tls import refresh as real_refresh

    state = make_state(ca, clock)
    old = fetch(state, ca)
    ctx = state.track(make_context("server", lambda: state.snapshot, meshca.authorize_any(), clock))

    def slow_refresh(context: object, snapshot: Snapshot) -> None:
        if snapshot.svid is old:
            time.sleep(0.3)  # the bundle update's refresh is overtaken by the renewal's
        real_refresh(context, snapshot)  # type: ignore[arg-type]

    monkeypatch.setattr(state_module, "refresh", slow_refresh)
    anchors = [c.anchor.public_bytes(Encoding.DER) for c in (ca, rogue_ca)]
    watch = threading.Thread(
        target=state.bundle_update, args=(pb.Bundle(trust_domain="example.org", anchors=anchors, sequence=2),)
    )
    watch.start()
    time.sleep(0.1)
    new = fetch(state, ca)
    watch.join(5)
    assert state.snapshot.svid is new
    assert ctx.meshca_svid is new
