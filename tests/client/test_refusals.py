"""What a source refuses from an identity service: another ID, another CA, another key.

A fake native-API service answers with exactly the wrong thing; the source
must count a failure, keep what it has (nothing, or its current SVID) and
never swap in what it was sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from meshca.client import RenewalPolicy, SvidSource
from meshca.testing import TestCA

from .support import TD, WEB, FakeIdentity, refreshes, wait_until, within_validity

REASONS = {
    "wrong-id": "AuthorizationError: peer spiffe://example.org/ns/default/sa/other is not authorized",
    "wrong-ca": "VerificationError: chain does not lead to an anchor",
    "wrong-key": "VerificationError: response leaf is not for the key this client generated",
}
FAST = RenewalPolicy(fraction=0.3, jitter=0.05)  # renew 3 s leaves at about 1 s


@pytest.fixture
def fake() -> Iterator[FakeIdentity]:
    service = FakeIdentity(TestCA(TD), TestCA(TD), ttl=timedelta(seconds=3)).start()
    yield service
    service.close()


@pytest.mark.parametrize("mode", sorted(REASONS))
def test_a_bad_first_response_never_makes_the_source_ready(
    mode: str, fake: FakeIdentity, sources: Callable[..., SvidSource]
) -> None:
    fake.mode = mode
    with capture_logs() as logs:
        source = sources(fake.address, fake.ca.bundle, WEB, join_token="t")
        with pytest.raises(TimeoutError):
            source.wait_ready(1.0)
        assert not source.snapshot.ready
        assert refreshes(source, "success") == 0
        failures = refreshes(source, "failure")
        assert failures >= 2
        assert len(fake.requests) >= failures  # every answer was looked at, and refused
    reasons = [e["reason"] for e in logs if e["event"] == "svid.fetch_failed"]
    assert reasons and all(r.startswith(REASONS[mode]) for r in reasons), reasons


@pytest.mark.parametrize("mode", sorted(REASONS))
def test_a_bad_renewal_never_replaces_the_current_svid(
    mode: str, fake: FakeIdentity, sources: Callable[..., SvidSource]
) -> None:
    source = sources(fake.address, fake.ca.bundle, WEB, join_token="t", renewal=FAST)
    first = source.wait_ready(5)
    assert first.svid is not None
    fake.mode = mode
    wait_until(lambda: refreshes(source, "failure") >= 3, 4, "three refused renewals")
    assert source.snapshot is first
    assert within_validity(first.svid)
    fake.mode = "good"
    wait_until(lambda: source.snapshot.svid is not first.svid, 3, "a good renewal")
    assert source.svid.spiffe_id == WEB
    assert source.svid.leaf.public_key() == source.svid.key.public_key()
    assert refreshes(source, "success") == 2


def test_an_identity_service_the_bundle_does_not_trust_is_refused(sources: Callable[..., SvidSource]) -> None:
    service = FakeIdentity(TestCA(TD), TestCA(TD)).start()
    try:
        stranger = TestCA(TD)  # the source trusts another CA than the one the service's certificate is from
        source = sources(service.address, stranger.bundle, WEB, join_token="t")
        with pytest.raises(TimeoutError):
            source.wait_ready(1.0)
        assert refreshes(source, "failure") >= 2
        assert service.requests == []  # the TLS handshake failed: the request and its token never left
    finally:
        service.close()
