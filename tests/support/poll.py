"""`eventually`: wait for a condition, failing with what was awaited when the deadline passes.

One helper in two drivers: ``await eventually(...)`` in async tests (the
server shares the loop, so the wait must yield to it; the predicate may be a
coroutine function, such as a gRPC call), `eventually_sync` in tests whose
subjects run on threads.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


class _Deadline:
    def __init__(self, timeout: float, what: str) -> None:
        self.at = time.monotonic() + timeout
        self.timeout = timeout
        self.what = what

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise AssertionError(f"timed out after {self.timeout} s waiting for {self.what}")


async def eventually(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 5.0,
    what: str = "condition",
    interval: float = 0.02,
) -> None:
    deadline = _Deadline(timeout, what)
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        deadline.check()
        await asyncio.sleep(interval)


def eventually_sync(
    predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition", interval: float = 0.02
) -> None:
    deadline = _Deadline(timeout, what)
    while not predicate():
        deadline.check()
        time.sleep(interval)
