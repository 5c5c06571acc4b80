"""The renewal schedule and retry backoff: pure functions of time, a policy and a random source."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta

import pytest
from support.clocks import Pinned

from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy, renewal_time, retry_delay

NOW = datetime(2026, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)


# -- renewal_time


@pytest.mark.parametrize(
    ("fraction", "jitter", "lifetime"),
    [(0.5, 0.1, 10 * S), (0.5, 0.0, 10 * S), (0.8, 0.15, 24 * 3600 * S), (0.2, 0.05, 4 * S)],
)
def test_renewal_time_is_within_fraction_plus_minus_jitter_of_the_lifetime(
    fraction: float, jitter: float, lifetime: timedelta
) -> None:
    policy = RenewalPolicy(fraction=fraction, jitter=jitter)
    rng = random.Random(7)
    low, high = NOW + lifetime * (fraction - jitter), NOW + lifetime * (fraction + jitter)
    moments = [renewal_time(NOW, NOW + lifetime, policy, rng) for _ in range(2000)]
    assert all(low <= m <= high for m in moments)
    if jitter:
        # The jitter is used: a fleet issued together spreads over the whole window.
        spread = (max(moments) - min(moments)) / (high - low)
        assert spread > 0.9
    else:
        assert set(moments) == {NOW + lifetime * fraction}


def test_renewal_time_ends_of_the_window() -> None:
    policy = RenewalPolicy(fraction=0.5, jitter=0.1)
    assert renewal_time(NOW, NOW + 10 * S, policy, Pinned(0.0)) == NOW + 4 * S
    assert renewal_time(NOW, NOW + 10 * S, policy, Pinned(1.0)) == NOW + 6 * S


def test_renewal_time_counts_the_lifetime_from_when_the_svid_was_received() -> None:
    # A 10 s leaf received 3 s after it was issued (and backdated by a minute
    # for clock skew, which the schedule never sees) is renewed at half of
    # the 7 s it has left, not at once.
    received = NOW + 3 * S
    not_after = NOW + 10 * S
    at = renewal_time(received, not_after, RenewalPolicy(fraction=0.5, jitter=0.0), random.Random(1))
    assert at == received + 3.5 * S


def test_renewal_time_of_an_expired_svid_is_now() -> None:
    assert renewal_time(NOW, NOW - 5 * S, DEFAULT_POLICY, random.Random(1)) == NOW
    assert renewal_time(NOW, NOW, DEFAULT_POLICY, random.Random(1)) == NOW


# -- retry_delay


def test_retry_delay_ceiling_doubles_per_attempt_up_to_max_backoff() -> None:
    policy = RenewalPolicy(initial_backoff=timedelta(milliseconds=500), max_backoff=30 * S)
    ceilings = [retry_delay(n, NOW, None, policy, Pinned(1.0)) for n in range(1, 10)]
    assert ceilings == [0.5 * S, 1 * S, 2 * S, 4 * S, 8 * S, 16 * S, 30 * S, 30 * S, 30 * S]


def test_retry_delay_is_capped_even_after_very_many_attempts() -> None:
    for attempt in (31, 64, 10_000, 10**9):
        assert retry_delay(attempt, NOW, None, DEFAULT_POLICY, Pinned(1.0)) == DEFAULT_POLICY.max_backoff


def test_retry_delay_has_full_jitter_and_never_goes_below_min_backoff() -> None:
    rng = random.Random(3)
    for attempt in range(1, 12):
        ceiling = min(DEFAULT_POLICY.max_backoff, DEFAULT_POLICY.initial_backoff * 2 ** (attempt - 1))
        delays = [retry_delay(attempt, NOW, None, DEFAULT_POLICY, rng) for _ in range(300)]
        assert all(DEFAULT_POLICY.min_backoff <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > (ceiling - DEFAULT_POLICY.min_backoff) * 0.8
    assert retry_delay(1, NOW, None, DEFAULT_POLICY, Pinned(0.0)) == DEFAULT_POLICY.min_backoff
    assert retry_delay(20, NOW, None, DEFAULT_POLICY, Pinned(0.0)) == DEFAULT_POLICY.min_backoff


@pytest.mark.parametrize(
    ("time_left", "cap"),
    [
        (3600 * S, 30 * S),  # far from expiry: max_backoff
        (60 * S, 6 * S),  # a tenth of the time left
        (10 * S, 1 * S),
        (2 * S, 0.2 * S),
        (0.5 * S, 0.1 * S),  # a tenth would be 50 ms: min_backoff instead
        (timedelta(), 0.1 * S),
        (-60 * S, 0.1 * S),  # already expired
    ],
)
def test_retry_delay_shrinks_as_expiry_nears(time_left: timedelta, cap: timedelta) -> None:
    assert retry_delay(30, NOW, NOW + time_left, DEFAULT_POLICY, Pinned(1.0)) == cap
    rng = random.Random(5)
    assert all(
        DEFAULT_POLICY.min_backoff <= retry_delay(n, NOW, NOW + time_left, DEFAULT_POLICY, rng) <= cap
        for n in range(1, 40)
    )


def test_retry_delay_near_expiry_does_not_exceed_the_exponential_ceiling() -> None:
    # The expiry cap only ever lowers the delay: attempt 1 stays at initial_backoff.
    assert retry_delay(1, NOW, NOW + 3600 * S, DEFAULT_POLICY, Pinned(1.0)) == DEFAULT_POLICY.initial_backoff


# -- RenewalPolicy


def test_default_policy() -> None:
    assert RenewalPolicy(0.5, 0.1, timedelta(milliseconds=500), 30 * S, timedelta(milliseconds=100)) == DEFAULT_POLICY


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.0}, "fraction"),
        ({"fraction": -0.5}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"jitter": -0.01}, "jitter"),
        ({"fraction": 0.3, "jitter": 0.3}, "jitter"),
        ({"fraction": 0.8, "jitter": 0.2}, "jitter"),  # fraction + jitter would reach the end of the life
        ({"min_backoff": timedelta()}, "backoffs"),
        ({"min_backoff": -S}, "backoffs"),
        ({"min_backoff": 2 * S, "initial_backoff": S}, "backoffs"),
        ({"initial_backoff": 60 * S, "max_backoff": 30 * S}, "backoffs"),
    ],
)
def test_policy_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RenewalPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"jitter": 0.0},
        {"fraction": 0.01, "jitter": 0.0},
        {"fraction": 0.99, "jitter": 0.009},
        {"min_backoff": S, "initial_backoff": S, "max_backoff": S},
    ],
)
def test_policy_edges_that_are_allowed(kwargs: dict[str, object]) -> None:
    RenewalPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_POLICY.fraction = 0.9  # type: ignore[misc]
