"""What a source refuses from an identity service, and what it does when the service refuses it.

A fake native-API service answers with exactly the wrong thing (another ID,
another CA, another key); the source must count a failure, keep what it has
(nothing, or its current SVID) and never swap in what it was sent. A real
identity server refuses bad credentials: before the first SVID that ends
`wait_ready` at once with the server's reason; after it, the source keeps
its SVID and retries.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from structlog.testing import capture_logs
from support.certs import within_validity
from support.fake_identity import REFUSALS, FakeIdentity
from support.ids import API, TD, WEB
from support.metrics import refreshes
from support.poll import eventually_sync
from support.serving import ServerThread, Trust
from support.tokens import add_token

import meshca
from meshca.client import RenewalPolicy, SvidSource
from meshca.testing import TestCA

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
        with pytest.raises(TimeoutError, match=re.escape(f"the last attempt failed: {REASONS[mode]}")):
            source.wait_ready(1.0)
        assert not source.snapshot.ready
        assert refreshes(source, "success") == 0
        failures = refreshes(source, "failure")
        assert failures >= 2
        assert len(fake.requests) >= failures  # every answer was looked at, and refused
    reasons = [e["reason"] for e in logs if e["event"] == "svid.fetch_failed"]
    assert reasons and all(r.startswith(REASONS[mode]) for r in reasons), reasons


@pytest.mark.parametrize("mode", sorted(REASONS) + sorted(REFUSALS))
def test_a_bad_or_refused_renewal_never_replaces_the_current_svid_and_is_retried(
    mode: str, fake: FakeIdentity, sources: Callable[..., SvidSource]
) -> None:
    source = sources(fake.address, fake.ca.bundle, WEB, join_token="t", renewal=FAST)
    first = source.wait_ready(5)
    assert first.svid is not None
    with capture_logs() as logs:
        fake.mode = mode
        eventually_sync(lambda: refreshes(source, "failure") >= 3, 4, "three failed renewals")
        assert source.snapshot is first
        assert within_validity(first.svid)
        fake.mode = "good"
        eventually_sync(lambda: source.snapshot.svid is not first.svid, 3, "a good renewal")
    assert source.svid.spiffe_id == WEB
    assert source.svid.leaf.public_key() == source.svid.key.public_key()
    assert refreshes(source, "success") == 2
    # A refusal after the first SVID is logged with the server's reason, and retried all the same.
    if mode in REFUSALS:
        code, details = REFUSALS[mode]
        reason, permanent = f"{code.name}: {details}", True
    else:
        reason, permanent = REASONS[mode], False
    failed = [e for e in logs if e["event"] == "svid.fetch_failed"]
    assert len(failed) >= 3
    assert all(e["reason"].startswith(reason) and e["permanent"] is permanent for e in failed), failed
    assert [e for e in logs if e["event"] == "svid.refused"] == []


def test_an_identity_service_the_bundle_does_not_trust_is_refused(sources: Callable[..., SvidSource]) -> None:
    service = FakeIdentity(TestCA(TD), TestCA(TD)).start()
    try:
        stranger = TestCA(TD)  # the source trusts another CA than the one the service's certificate is from
        source = sources(service.address, stranger.bundle, WEB, join_token="t")
        with pytest.raises(TimeoutError, match=r"the last attempt failed: UNAVAILABLE: .*CERTIFICATE_VERIFY_FAILED"):
            source.wait_ready(1.0)
        assert refreshes(source, "failure") >= 2
        assert service.requests == []  # the TLS handshake failed: the request and its token never left
    finally:
        service.close()


# -- the service refuses: at once before the first SVID, retried after it


@pytest.mark.parametrize("case", ["unknown-token", "used-up-token", "token-for-another-id"])
def test_a_refused_first_request_ends_wait_ready_at_once_with_the_servers_reason(
    case: str, trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    server = servers(trust.dir)
    server.start()
    code, details = "UNAUTHENTICATED", "unknown join token"
    token = "mtok_nope"
    if case == "used-up-token":
        token = add_token(trust.dir, WEB, uses=1)
        sources(server.address, trust.ca.bundle, WEB, join_token=token).wait_ready(10)
        details = "join token has no use left"
    elif case == "token-for-another-id":
        token = add_token(trust.dir, API)
        code, details = "PERMISSION_DENIED", f"credential grants {API}, the request names {WEB}"
    with capture_logs() as logs:  # before the source starts: its refusal may come at once
        source = sources(server.address, trust.ca.bundle, WEB, join_token=token)
        started = time.monotonic()
        with pytest.raises(meshca.RequestRefused) as refused:
            source.wait_ready(30)
    assert time.monotonic() - started < 10  # not retried until the timeout
    assert (refused.value.code, refused.value.details) == (code, details)
    assert str(refused.value) == f"no SVID for {WEB}: the identity service refused: {code}: {details}"
    assert [e["reason"] for e in logs if e["event"] == "svid.refused"] == [f"{code}: {details}"]
    renewal = source._threads[0]
    renewal.join(5)
    assert not renewal.is_alive()  # the renewal flow has ended: nothing will ask again
    assert refreshes(source, "failure") == 1  # asked once
    with pytest.raises(meshca.RequestRefused):
        source.wait_ready(0)  # and every later wait says the same
    assert not source.snapshot.ready


def test_a_server_certificate_for_another_name_fails_at_once_and_names_the_fix(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    server = servers(trust.dir)
    server.start()
    token = add_token(trust.dir, WEB, uses=1)
    # Dial by IP, without server_name: the server's SVID names localhost only.
    source = sources(server.address, trust.ca.bundle, WEB, join_token=token, server_name=None)
    started = time.monotonic()
    with pytest.raises(meshca.VerificationError) as refused:
        source.wait_ready(30)
    assert time.monotonic() - started < 10
    assert str(refused.value) == (
        f"no SVID for {WEB}: the server's certificate does not name 127.0.0.1 (it names localhost): "
        "dial a name it carries, or pass server_name= (meshca fetch --server-name localhost)"
    )
    # The handshake failed before the request left: the one-use token still works, with the name.
    fixed = sources(server.address, trust.ca.bundle, WEB, join_token=token, server_name="localhost")
    assert fixed.wait_ready(10).ready
