"""JWT-SVID signing keys: the rotation rules on a frozen clock, the keyring over a real store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from meshca import SpiffeId
from meshca.server._jwt_keys import CLOCK_SKEW, JwtKeyring, KeyWindow, RotationPolicy, jwk_thumbprint, jwks
from meshca.server._store import SqliteStore
from meshca.testing import FrozenClock

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = RotationPolicy(sign_for=timedelta(hours=24), publish_ahead=timedelta(minutes=10))
WEB = SpiffeId.parse("spiffe://example.org/web")
H = timedelta(hours=1)
M = timedelta(minutes=1)


def test_a_key_signs_for_its_window_and_its_successor_is_due_publish_ahead_before_it_ends() -> None:
    first = POLICY.first(T0)
    assert first == KeyWindow(T0, T0 + 24 * H)
    assert not POLICY.successor_due(first, T0 + 24 * H - 11 * M)
    assert POLICY.successor_due(first, T0 + 24 * H - 10 * M)
    current, successor = POLICY.successor(first, T0 + 24 * H - 10 * M)
    assert current == first  # on time: nothing moves
    assert successor == KeyWindow(T0 + 24 * H, T0 + 48 * H)


def test_a_late_successor_still_waits_publish_ahead_and_the_current_key_signs_on() -> None:
    first = POLICY.first(T0)
    late = T0 + 30 * H
    current, successor = POLICY.successor(first, late)
    assert successor.signs_from == late + 10 * M
    assert current == KeyWindow(T0, late + 10 * M)


def test_a_key_stays_published_until_its_last_token_expired() -> None:
    window = POLICY.first(T0)
    assert POLICY.published_until(window) == window.signs_until + POLICY.max_token_ttl + CLOCK_SKEW


@pytest.mark.parametrize(
    "kwargs", [{"publish_ahead": timedelta()}, {"publish_ahead": 25 * H}, {"max_token_ttl": timedelta()}]
)
def test_a_policy_that_cannot_rotate_is_refused(kwargs: dict[str, timedelta]) -> None:
    with pytest.raises(ValueError, match="JWT key rotation"):
        RotationPolicy(**kwargs)


def test_the_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 7638 section 3.1's construction, on the EC key of RFC 7517 appendix A.1
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
        "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM",
        "use": "enc",
        "kid": "1",
    }
    assert jwk_thumbprint(jwk) == "cn-I_WNMClehiVp51i_0VpOENW1upEerA8sEam5hn-s"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "meshca.db")
    yield opened
    opened.close()


def _verify(token: str, ring: JwtKeyring, at: datetime) -> dict[str, object]:
    keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(jwks(ring.published())).keys}
    header = jwt.get_unverified_header(token)
    return jwt.decode(
        token,
        keys[header["kid"]],
        algorithms=["ES256"],
        audience="db",
        options={"verify_exp": False, "verify_iat": False},
    )


def test_the_keyring_rotates_over_a_day_publishing_ahead_and_keeping_old_keys_published(store: SqliteStore) -> None:
    clock = FrozenClock(T0)
    ring = JwtKeyring(store, clock, POLICY)
    ring.maintain()
    published = ring.published()
    assert len(published) == 1
    first = json.loads(published[0].jwk)
    assert first["use"] == "jwt-svid"
    assert first["kid"] == published[0].kid == jwk_thumbprint(first)
    assert published[0].not_after == T0 + 24 * H + POLICY.max_token_ttl + CLOCK_SKEW
    token, expires = ring.sign(WEB, ["db"], 5 * M)
    assert jwt.get_unverified_header(token)["kid"] == first["kid"]
    assert expires == T0 + 5 * M

    clock.now = T0 + 24 * H - 10 * M  # the successor is published, but the first key still signs
    ring.maintain()
    kids = [k.kid for k in ring.published()]
    assert len(kids) == 2
    token, _ = ring.sign(WEB, ["db"], 5 * M)
    assert jwt.get_unverified_header(token)["kid"] == first["kid"]

    clock.now = T0 + 24 * H  # the successor signs; the first stays published for its last tokens
    ring.maintain()
    token, _ = ring.sign(WEB, ["db"], H)
    assert jwt.get_unverified_header(token)["kid"] == kids[1]
    assert _verify(token, ring, clock.now)["sub"] == str(WEB)
    clock.now = T0 + 24 * H + POLICY.max_token_ttl + CLOCK_SKEW - timedelta(seconds=1)
    assert [k.kid for k in ring.published()] == kids
    clock.now += timedelta(seconds=1)
    assert [k.kid for k in ring.published()] == kids[1:]


def test_a_stalled_keyring_extends_the_current_key_rather_than_sign_with_an_unannounced_one(
    store: SqliteStore,
) -> None:
    clock = FrozenClock(T0)
    ring = JwtKeyring(store, clock, POLICY)
    ring.maintain()
    first = ring.published()[0]
    clock.now = T0 + 30 * H  # nothing ran for 30 hours
    token, _ = ring.sign(WEB, ["db"], 5 * M)  # signing runs the rules first
    assert jwt.get_unverified_header(token)["kid"] == first.kid
    by_kid = {k.kid: k for k in ring.published()}
    assert len(by_kid) == 2
    assert by_kid[first.kid].not_after == clock.now + 10 * M + POLICY.max_token_ttl + CLOCK_SKEW


def test_replicas_on_one_store_each_publish_their_own_key(store: SqliteStore, tmp_path: Path) -> None:
    other = SqliteStore(tmp_path / "meshca.db")
    try:
        clock = FrozenClock(T0)
        rings = [JwtKeyring(store, clock, POLICY), JwtKeyring(other, clock, POLICY)]
        for ring in rings:
            ring.maintain()
        assert {k.writer for k in store.jwt_keys(T0)} == {r.writer for r in rings}
        for ring in rings:
            token, _ = ring.sign(WEB, ["db"], 5 * M)
            assert _verify(token, rings[0], T0)["aud"] == ["db"]
            assert _verify(token, rings[1], T0)["aud"] == ["db"]
    finally:
        other.close()


def test_a_lifetime_beyond_the_policy_is_refused(store: SqliteStore) -> None:
    ring = JwtKeyring(store, FrozenClock(T0), POLICY)
    with pytest.raises(ValueError, match="lifetime"):
        ring.sign(WEB, ["db"], POLICY.max_token_ttl + timedelta(seconds=1))
