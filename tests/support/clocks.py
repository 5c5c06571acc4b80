"""Time and chance under the test's control (`meshca.testing.FrozenClock` is the other clock)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta


class MovableClock:
    """Real time plus an offset that only moves forward when a test says so.

    For served servers: TLS peers (gRPC's C core, openssl) check the server
    certificate against the real clock, so a frozen clock in the past would
    break handshakes.
    """

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, by: timedelta) -> None:
        self.offset += by


class Pinned(random.Random):
    """A random source stuck at one point of every range: ``at`` 0.0 is the low end, 1.0 the high end."""

    def __init__(self, at: float) -> None:
        super().__init__(0)
        self.at = at

    def random(self) -> float:
        return self.at

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.at
