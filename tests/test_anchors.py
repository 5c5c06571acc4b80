"""The staged anchor rotation rules (`pki/_anchors.py`): tables of times, no clock read, no I/O."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

import meshca
from meshca.pki._anchors import (
    DEFAULT_RETIRE_GRACE,
    AnchorState,
    ReplicaIssuer,
    activation_allowed_at,
    chains_to,
    retire_check,
)
from meshca.testing import TestCA

T0 = datetime.fromisoformat("2026-03-01T12:00:00+00:00")
S, H, D = timedelta(seconds=1), timedelta(hours=1), timedelta(days=1)


def test_the_states_are_the_words_list_prints() -> None:
    assert [s.value for s in AnchorState] == ["prepared", "active", "retiring"]


@pytest.mark.parametrize(
    ("min_age", "allowed"),
    [(90 * D, T0 + 90 * D), (24 * H, T0 + 24 * H), (timedelta(), T0)],
    ids=["default-max-leaf-ttl", "24h-leaves", "no-wait"],
)
def test_activation_waits_for_the_longest_leaf_lifetime(min_age: timedelta, allowed: datetime) -> None:
    assert activation_allowed_at(T0, min_age) == allowed


GRACE = 5 * 60 * S


@pytest.mark.parametrize(
    ("issuer_on_old", "leaves", "at", "allowed", "safe_at", "never"),
    [
        # Nothing recorded: only the grace after activation holds it.
        (False, [], T0 + GRACE - S, False, T0 + GRACE, False),
        (False, [], T0 + GRACE, True, T0 + GRACE, False),
        # A leaf issued just before activation lives 24 h: the latest NotAfter decides.
        (False, [(T0 - S, T0 + 24 * H), (T0 - H, T0 + 23 * H)], T0 + 24 * H - S, False, T0 + 24 * H, False),
        (False, [(T0 - S, T0 + 24 * H)], T0 + 24 * H, True, T0 + 24 * H, False),
        # Issued inside the grace: a replica may still have signed it under the old anchor.
        (False, [(T0 + GRACE - S, T0 + 2 * H)], T0 + H, False, T0 + 2 * H, False),
        # Issued after the grace: under the new anchor; it does not count.
        (False, [(T0 + GRACE, T0 + 48 * H)], T0 + GRACE, True, T0 + GRACE, False),
        # A leaf that expired before the grace ends changes nothing.
        (False, [(T0 - H, T0 + S)], T0 + GRACE, True, T0 + GRACE, False),
        # The active issuer still chains to it alone: no time makes it safe.
        (True, [], T0 + 365 * D, False, T0 + GRACE, True),
    ],
    ids=[
        "grace-not-over",
        "grace-over",
        "leaf-alive",
        "last-leaf-expired",
        "leaf-in-grace",
        "leaf-after-grace",
        "expired-leaf",
        "issuer-on-old",
    ],
)
def test_retirement_waits_for_the_issuer_and_every_leaf_that_may_chain_to_the_old_anchor(
    issuer_on_old: bool,
    leaves: list[tuple[datetime, datetime]],
    at: datetime,
    allowed: bool,
    safe_at: datetime,
    never: bool,
) -> None:
    check = retire_check(activated_at=T0, issuer_on_old_anchor=issuer_on_old, leaves=leaves, grace=GRACE)
    assert check.allows(at) is allowed
    assert check.safe_at == safe_at
    assert check.never is never
    assert bool(check.pending(at)) is not allowed


def test_retirement_without_a_recorded_activation_counts_every_leaf() -> None:
    check = retire_check(activated_at=None, issuer_on_old_anchor=False, leaves=[(T0 + 30 * D, T0 + 31 * D)])
    assert check.safe_at == T0 + 31 * D
    assert not check.allows(T0 + 31 * D - S)
    assert check.allows(T0 + 31 * D)
    nothing = retire_check(activated_at=None, issuer_on_old_anchor=False, leaves=[])
    assert nothing.allows(T0) and nothing.safe_at is None and not nothing.never


def test_the_refusal_reasons_say_what_holds_the_anchor() -> None:
    check = retire_check(activated_at=T0, issuer_on_old_anchor=True, leaves=[(T0, T0 + H), (T0 - H, T0 + S)])
    assert [b.reason for b in check.pending(T0)] == [
        "the active issuer chains only to it",
        "issuers may sign under it until 5m after activation",
        "2 recorded leaves issued before then may chain to it",
    ]
    assert DEFAULT_RETIRE_GRACE == GRACE


def _issuer(writer: str, old: bool, recorded_at: datetime, lifetime: timedelta = 7 * D) -> ReplicaIssuer:
    return ReplicaIssuer(writer, old, recorded_at, recorded_at + lifetime)


def test_managed_retirement_waits_for_every_replica_whose_newest_issuer_is_under_the_old_anchor() -> None:
    # r1 switched 1 s after activation; r2 has not (its newest issuer, prepared before, is under the old anchor).
    replicas = [
        _issuer("r1", True, T0 - 3 * D),
        _issuer("r1", False, T0 + S),
        _issuer("r2", True, T0 - 3 * D),
        _issuer("r2", True, T0 - D),
    ]
    check = retire_check(activated_at=T0, issuer_on_old_anchor=False, leaves=[], grace=GRACE, replicas=replicas)
    [blocker] = check.pending(T0 + H)
    assert blocker.reason.startswith("replica r2 still signs with an issuer under it")
    assert blocker.until == T0 + 6 * D  # its newest issuer's NotAfter: no leaf it signs outlives it
    assert check.safe_at == T0 + 6 * D and not check.never
    assert check.allows(T0 + 6 * D)  # by then it switched, or it is down and its issuer expired
    # r2 switches: only the grace is left.
    switched = retire_check(
        activated_at=T0,
        issuer_on_old_anchor=False,
        leaves=[],
        grace=GRACE,
        replicas=[*replicas, _issuer("r2", False, T0 + 2 * S)],
    )
    assert switched.allows(T0 + GRACE) and not switched.allows(T0 + GRACE - S)


def test_a_replica_whose_newest_issuer_expired_signs_nothing_and_does_not_count() -> None:
    gone = [_issuer("gone", True, T0 - 8 * D)]  # down since before activation; its issuer expired at T0 - D
    check = retire_check(activated_at=T0, issuer_on_old_anchor=False, leaves=[], grace=GRACE, replicas=gone)
    assert check.allows(T0 + GRACE)


def test_a_replica_that_started_under_the_new_anchor_never_switched_and_moves_nothing() -> None:
    fresh = [_issuer("fresh", False, T0 + D)]  # a day after activation: every leaf it signs is under the new one
    leaves = [(T0 + H, T0 + 25 * H)]
    check = retire_check(activated_at=T0, issuer_on_old_anchor=False, leaves=leaves, grace=GRACE, replicas=fresh)
    assert check.allows(T0 + GRACE)


def test_a_replica_that_switched_after_the_grace_moves_the_leaf_cutoff_to_its_switch() -> None:
    late = [_issuer("late", True, T0 - D), _issuer("late", False, T0 + H)]  # switched an hour after activation
    leaves = [(T0 + 30 * 60 * S, T0 + 30 * 60 * S + 24 * H), (T0 + 2 * H, T0 + 48 * H)]
    check = retire_check(activated_at=T0, issuer_on_old_anchor=False, leaves=leaves, grace=GRACE, replicas=late)
    assert [b.reason for b in check.pending(T0 + H - S)] == [
        "replica late signed under it until it switched",
        "1 recorded leaves issued before then may chain to it",
    ]
    # The leaf issued at +30 min may be under the old anchor; the one at +2 h is not.
    assert check.safe_at == T0 + 30 * 60 * S + 24 * H
    assert not check.allows(check.safe_at - S) and check.allows(check.safe_at)


def test_chains_to_checks_the_signature_not_only_the_name(ca: TestCA, rogue_ca: TestCA) -> None:
    chain = [ca.issuer_certificate]
    assert chains_to(chain, ca.anchor)
    assert not chains_to(chain, rogue_ca.anchor)  # another anchor, another name
    # An impostor with the anchor's very name and another key.
    key = meshca.generate_key()
    impostor = (
        x509.CertificateBuilder()
        .subject_name(ca.anchor.subject)
        .issuer_name(ca.anchor.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(ca.anchor.not_valid_before_utc)
        .not_valid_after(ca.anchor.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )
    assert not chains_to(chain, impostor)
