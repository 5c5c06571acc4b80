"""Logging setup for meshca's entry points. The library itself never configures logging."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

__all__ = ["configure_logging"]


class _LineLogger:
    """Writes each event with one write(2) per line, so the lines of several worker processes
    sharing stderr never interleave (a pipe write of up to 4 KiB is atomic)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def msg(self, message: str) -> None:
        data = (message + "\n").encode()
        while data:
            data = data[os.write(self._fd, data) :]

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


def _line_logger(*_: Any) -> _LineLogger:
    return _LineLogger(sys.stderr.fileno())


def configure_logging(level: int = logging.INFO, *, json: bool | None = None) -> None:
    """structlog to stderr: JSON lines when stderr is not a terminal, key=value on a terminal."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_line_logger,
        cache_logger_on_first_use=True,
    )
