"""Durations and clocks."""

from __future__ import annotations

from datetime import UTC, timedelta

import pytest

from meshca import parse_duration, system_clock
from meshca.testing import FrozenClock


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("24h", timedelta(hours=24)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("90d", timedelta(days=90)),
        ("10y", timedelta(days=3650)),
        ("500ms", timedelta(milliseconds=500)),
        ("1d12h", timedelta(days=1, hours=12)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("10", "invalid duration"),
        ("h", "invalid duration"),
        ("10x", "invalid duration"),
        ("-1h", "invalid duration"),
        ("1.5h", "invalid duration"),
        ("1h ", "invalid duration"),
        (" 1h", "invalid duration"),
        ("1H", "invalid duration"),
        ("0s", "positive"),
        ("0h0m", "positive"),
    ],
)
def test_parse_duration_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(text)


@pytest.mark.parametrize("text", ["9999999999999d", "99999999999999999999y"])
def test_parse_duration_of_absurd_sizes_is_a_value_error(text: str) -> None:
    """Callers (argparse types, config loaders) catch ValueError; an OverflowError escapes them."""
    with pytest.raises(ValueError):
        parse_duration(text)


def test_system_clock_is_aware_utc() -> None:
    now = system_clock()
    assert now.tzinfo is not None
    assert now.utcoffset() == timedelta(0)
    assert now.tzinfo == UTC


def test_frozen_clock() -> None:
    clock = FrozenClock()
    start = clock()
    assert start.tzinfo is not None
    assert clock() == start
    clock.advance(timedelta(hours=1))
    assert clock() == start + timedelta(hours=1)
