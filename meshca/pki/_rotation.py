"""When to renew, and how long to wait after a failure. Pure functions of time and a random source."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["RenewalPolicy", "renewal_time", "retry_delay"]


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """Renew after ``fraction`` of the lifetime (± ``jitter`` of it); back off exponentially on failure."""

    fraction: float = 0.5
    jitter: float = 0.1
    initial_backoff: timedelta = timedelta(milliseconds=500)
    max_backoff: timedelta = timedelta(seconds=30)
    min_backoff: timedelta = timedelta(milliseconds=100)

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError("fraction must be between 0 and 1")
        if not 0 <= self.jitter < min(self.fraction, 1 - self.fraction):
            raise ValueError("jitter must be smaller than fraction and 1 - fraction")
        if not timedelta() < self.min_backoff <= self.initial_backoff <= self.max_backoff:
            raise ValueError("backoffs must satisfy 0 < min <= initial <= max")


DEFAULT_POLICY = RenewalPolicy()


def renewal_time(received: datetime, not_after: datetime, policy: RenewalPolicy, rng: random.Random) -> datetime:
    """A moment at fraction ± jitter of the lifetime, so a fleet issued together does not renew together.

    The lifetime counts from ``received``, not NotBefore: issuers backdate
    NotBefore for clock skew, which would otherwise eat into the schedule
    (a 10-second leaf backdated by a minute would be renewed at once, forever).
    """
    lifetime = max(not_after - received, timedelta())
    share = policy.fraction + rng.uniform(-policy.jitter, policy.jitter)
    return received + lifetime * share


def retry_delay(
    attempt: int, now: datetime, not_after: datetime | None, policy: RenewalPolicy, rng: random.Random
) -> timedelta:
    """Delay before retry number ``attempt`` (1-based): exponential with full jitter, capped.

    The cap shrinks as expiry nears (a tenth of the time left), so a
    workload close to losing its identity retries more often, never below
    ``min_backoff``.
    """
    cap = policy.max_backoff
    if not_after is not None:
        cap = min(cap, max(policy.min_backoff, (not_after - now) / 10))
    ceiling = min(cap, policy.initial_backoff * (2 ** min(attempt - 1, 30)))
    jittered: timedelta = ceiling * rng.random()
    return max(policy.min_backoff, jittered)
