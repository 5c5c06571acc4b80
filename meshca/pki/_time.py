"""Clocks and durations. The only ``datetime.now()`` in meshca is here."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

__all__ = ["DURATION_FORMAT", "Clock", "format_duration", "parse_duration", "system_clock"]

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime."""


def system_clock() -> datetime:
    return datetime.now(UTC)


_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "y": timedelta(days=365),
}
MAX_DURATION = timedelta(days=100 * 365)
DURATION_FORMAT = "forms like 90s, 24h, 1h30m, 90d, 10y"
"""Shown wherever a duration is asked for: the help of every duration option, and parse errors."""
_PART = re.compile(r"(\d+)(ms|s|m|h|d|y)")


def parse_duration(text: str) -> timedelta:
    """Parses ``90s``, ``24h``, ``1h30m``, ``90d``, ``10y`` (a year is 365 days)."""
    pos, total = 0, timedelta()
    if not text:
        raise ValueError("empty duration")
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}: use {DURATION_FORMAT}")
        try:
            total += int(m.group(1)) * _UNITS[m.group(2)]
        except OverflowError:
            raise ValueError(f"duration {text!r} is too long (at most {MAX_DURATION.days // 365}y)") from None
        pos = m.end()
    if total > MAX_DURATION:
        raise ValueError(f"duration {text!r} is too long (at most {MAX_DURATION.days // 365}y)")
    if total <= timedelta():
        raise ValueError(f"duration must be positive, got {text!r}")
    return total


def format_duration(value: timedelta) -> str:
    """A short form `parse_duration` reads: ``23h59m``, ``24h``, ``89d``, ``10y``, ``-3d`` for the past."""
    seconds = int(value.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rem = divmod(seconds, 86400)
    if days and not rem and days % 365 == 0:
        return f"{sign}{days // 365}y"
    hours, rem = divmod(rem, 3600)
    if days == 1:  # 24h and 30h read better than 1d and 1d6h
        days, hours = 0, hours + 24
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{sign}{days}d{hours}h" if hours and days < 10 else f"{sign}{days}d"
    if hours:
        return f"{sign}{hours}h{minutes}m" if minutes else f"{sign}{hours}h"
    if minutes:
        return f"{sign}{minutes}m{secs}s" if secs else f"{sign}{minutes}m"
    return f"{sign}{secs}s"
