"""The managed-issuer schedule (SPIRE's thresholds) and the prepared/active/old slots, on a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meshca.pki._errors import KeyCustodyError
from meshca.pki._issuer import Issuer
from meshca.pki._lifecycle import IssuerSlots, activation_time, mint_issuer, preparation_time
from meshca.pki._profiles import CLOCK_SKEW
from meshca.pki._spiffe import SpiffeId
from meshca.pki._verify import verify_chain
from meshca.testing import TestCA

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ID = SpiffeId.parse("spiffe://example.org/w")


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA(now=T0, anchor_lifetime=timedelta(days=3650))


def minter(ca: TestCA, ttl: timedelta) -> tuple[list[Issuer], object]:
    made: list[Issuer] = []

    def mint(now: datetime) -> Issuer:
        issuer = mint_issuer(ca.anchor, ca.anchor_key, ca.bundle, now=now, ttl=ttl)
        made.append(issuer)
        return issuer

    return made, mint


@pytest.mark.parametrize(
    ("ttl", "prepare_after", "activate_after"),
    [
        (timedelta(days=7), timedelta(days=3.5), timedelta(days=7) * 5 / 6),
        (timedelta(minutes=1), timedelta(seconds=30), timedelta(seconds=50)),
        # long issuers: the caps (30 days and 7 days before NotAfter) take over from the fractions
        (timedelta(days=365), timedelta(days=335), timedelta(days=358)),
    ],
)
def test_spire_thresholds(ca: TestCA, ttl: timedelta, prepare_after: timedelta, activate_after: timedelta) -> None:
    issuer = mint_issuer(ca.anchor, ca.anchor_key, ca.bundle, now=T0, ttl=ttl)
    assert issuer.not_before == T0 - CLOCK_SKEW and issuer.not_after == T0 + ttl
    assert preparation_time(issuer) == T0 + prepare_after
    assert activation_time(issuer) == T0 + activate_after


def test_minted_issuer_signs_leaves_that_verify(ca: TestCA) -> None:
    issuer = mint_issuer(ca.anchor, ca.anchor_key, ca.bundle, now=T0, ttl=timedelta(days=7))
    leaf = issuer.sign(TestCA(now=T0).issuer_key.public_key(), ID, now=T0)
    verify_chain([leaf.leaf, *leaf.intermediates], ca.bundle, at=T0)
    assert issuer.certificate.issuer == ca.anchor.subject


def test_slots_prepare_activate_and_drop_old(ca: TestCA) -> None:
    made, mint = minter(ca, timedelta(days=7))
    slots = IssuerSlots(max_leaf_ttl=timedelta(hours=24))
    steps = slots.advance(T0, mint)
    assert [(r.step, r.ok) for r in steps] == [("prepare", True), ("activate", True)]
    first = slots.active
    assert first is made[0] and slots.next_step() == preparation_time(first)
    assert slots.advance(T0 + timedelta(days=3), mint) == []  # nothing due before half life
    steps = slots.advance(T0 + timedelta(days=3.5), mint)
    assert [r.step for r in steps] == ["prepare"] and slots.prepared is made[1] and slots.active is first
    assert slots.next_step() == activation_time(first)
    switch = activation_time(first)
    steps = slots.advance(switch, mint)
    assert [r.step for r in steps] == ["activate"] and slots.active is made[1] and slots.prepared is None
    # the old issuer stays until the last leaf it can have signed expired: the switch plus the longest leaf
    assert [o.issuer for o in slots.old] == [first]
    keep = slots.old[0].keep_until
    assert keep == min(first.not_after, switch + timedelta(hours=24) + CLOCK_SKEW)
    assert slots.in_use() == [made[1], first]
    assert slots.advance(keep - timedelta(seconds=1), mint) == []
    steps = slots.advance(keep, mint)
    assert [(r.step, r.issuer) for r in steps] == [("retire", first)] and slots.old == []


def test_half_an_hour_of_one_minute_issuers_never_leaves_a_gap(ca: TestCA) -> None:
    """Every moment has a valid active issuer, and every leaf it signs outlives nothing."""
    _, mint = minter(ca, timedelta(minutes=1))
    slots = IssuerSlots(max_leaf_ttl=timedelta(seconds=30))
    now, end, activations = T0, T0 + timedelta(minutes=30), 0
    while now < end:
        activations += sum(r.step == "activate" for r in slots.advance(now, mint))
        active = slots.active
        assert active is not None and active.not_before <= now < active.not_after
        assert active.not_after - now >= timedelta(seconds=10)  # a sixth of a minute at the least
        now += timedelta(seconds=1)
    # each issuer is minted at its predecessor's half life, so the switches come every half lifetime
    assert 59 <= activations <= 61


def test_a_failed_mint_is_reported_and_retried(ca: TestCA) -> None:
    _, mint = minter(ca, timedelta(days=7))
    slots = IssuerSlots(max_leaf_ttl=timedelta(hours=24))
    slots.advance(T0, mint)
    first = slots.active
    failing = True

    def flaky(now: datetime) -> Issuer:
        if failing:
            raise KeyCustodyError("token removed")
        return mint(now)  # type: ignore[operator]

    steps = slots.advance(T0 + timedelta(days=4), flaky)
    assert [(r.step, r.ok, r.reason) for r in steps] == [("prepare", False, "token removed")]
    assert slots.active is first and slots.prepared is None
    failing = False
    steps = slots.advance(T0 + timedelta(days=4, seconds=5), flaky)
    assert [(r.step, r.ok) for r in steps] == [("prepare", True)]


def test_replace_switches_at_once_and_drops_the_prepared(ca: TestCA) -> None:
    _, mint = minter(ca, timedelta(days=7))
    slots = IssuerSlots(max_leaf_ttl=timedelta(hours=24))
    slots.advance(T0, mint)
    slots.advance(T0 + timedelta(days=4), mint)
    first, prepared = slots.active, slots.prepared
    assert prepared is not None
    other = TestCA(now=T0)
    steps = slots.replace(
        T0 + timedelta(days=4, hours=1),
        lambda now: mint_issuer(other.anchor, other.anchor_key, other.bundle, now=now, ttl=timedelta(days=7)),
    )
    assert [r.step for r in steps] == ["prepare", "activate"]
    assert slots.active is not None and slots.active.anchor == other.anchor
    assert slots.prepared is None and [o.issuer for o in slots.old] == [first]


def test_asleep_past_the_whole_schedule_mints_at_once(ca: TestCA) -> None:
    _, mint = minter(ca, timedelta(minutes=10))
    slots = IssuerSlots(max_leaf_ttl=timedelta(minutes=1))
    slots.advance(T0, mint)
    later = T0 + timedelta(hours=1)
    steps = slots.advance(later, mint)
    assert [r.step for r in steps] == ["prepare", "activate"]
    assert slots.active is not None and slots.active.not_before <= later < slots.active.not_after


def test_an_issuer_cut_to_its_anchor_gets_no_successor_from_it() -> None:
    """Over an anchor's last weeks each successor would end with the anchor too, and be shorter than the last:
    the service minted (and recorded) one every few seconds before the end. Now: one rotation, then none."""
    short_lived = TestCA(now=T0, anchor_lifetime=timedelta(days=10))
    end = short_lived.anchor.not_valid_after_utc
    made: list[Issuer] = []

    def mint(now: datetime) -> Issuer:
        made.append(
            mint_issuer(short_lived.anchor, short_lived.anchor_key, short_lived.bundle, now=now, ttl=timedelta(days=7))
        )
        return made[-1]

    slots = IssuerSlots(max_leaf_ttl=timedelta(hours=1))
    now = T0
    while now < end:
        slots.advance(now, mint)
        active = slots.active
        assert active is not None and active.not_before <= now < active.not_after
        now += timedelta(minutes=1)
    # the first issuer (7 days), and its successor, prepared at day 3.5, cut to the anchor's end at day 10
    assert len(made) == 2 and made[1].not_after == end
    assert slots.active is made[1] and slots.next_step() == end  # the overdue alert fires if nothing changes by then
    steps = slots.advance(end, mint)  # the anchor has expired: minting fails, reported at every call
    assert [(r.step, r.ok) for r in steps] == [("prepare", False)]


def test_a_clock_stepped_back_before_the_active_issuer_mints_one_valid_now(ca: TestCA) -> None:
    """An NTP step or a restored VM: the active issuer is not yet valid (past the clock-skew allowance), so
    nothing could sign until the clock caught up; now a new issuer takes over at once."""
    _, mint = minter(ca, timedelta(days=7))
    slots = IssuerSlots(max_leaf_ttl=timedelta(hours=24))
    slots.advance(T0 + timedelta(days=1), mint)
    first = slots.active
    assert first is not None
    back = T0 + timedelta(hours=12)
    assert slots.advance(back, mint) != []
    active = slots.active
    assert active is not None and active is not first and active.not_before <= back < active.not_after
    # a step back within the allowance changes nothing
    slots2 = IssuerSlots(max_leaf_ttl=timedelta(hours=24))
    slots2.advance(T0, mint)
    assert slots2.advance(T0 - timedelta(seconds=30), mint) == []
