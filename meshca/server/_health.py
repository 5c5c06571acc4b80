"""Whether the state store can write now: half of readiness (docs/architecture.md, Server).

A server is ready while its issuer is usable AND its store can write; gRPC
health, /readyz and the ``meshca_store_up`` gauge all say so. The store's
state is learnt from what happens anyway, plus a cheap check:

- a record the store fails to commit marks it down (a used-up join token or
  a duplicate serial says nothing about the store, so not those);
- a committed record, or a passing ``store.check()`` (run every few seconds
  while up, every poll while down), marks it up again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from meshca.pki._errors import DuplicateSerial, StoreError, TokenUsedUp

__all__ = ["StoreHealth"]

log = structlog.get_logger("meshca.server")


class StoreHealth:
    """The store's writability, from outcomes and checks; ``on_change(writable)`` hears every transition.

    `probe` blocks (it runs the store's check): call it off the event loop.
    """

    UP_CHECK_SECONDS = 5.0  # while up, failed records are the main signal; the check catches an idle outage

    def __init__(self, check: Callable[[], None], on_change: Callable[[bool], None] | None = None) -> None:
        self._check = check
        self._on_change = on_change
        self._lock = threading.Lock()
        self._last_check = time.monotonic()
        self.writable = True
        if on_change is not None:
            on_change(True)

    def outcome(self, error: BaseException | None) -> None:
        """What one record's commit says about the store: None (committed) or its error."""
        if error is None:
            if not self.writable:
                self._set(True, None)
        elif isinstance(error, StoreError) and not isinstance(error, TokenUsedUp | DuplicateSerial):
            self._set(False, str(error))

    def due(self) -> bool:
        """Whether a check is due: at every poll while down, every `UP_CHECK_SECONDS` while up."""
        return not self.writable or time.monotonic() - self._last_check >= self.UP_CHECK_SECONDS

    def probe(self) -> bool:
        """Runs the store's check and returns whether the store can write."""
        self._last_check = time.monotonic()
        try:
            self._check()
        except StoreError as exc:
            self._set(False, str(exc))
        else:
            self._set(True, None)
        return self.writable

    def _set(self, writable: bool, reason: str | None) -> None:
        with self._lock:  # commits finish on store threads, checks on executor threads
            if writable == self.writable:
                return
            self.writable = writable
            if writable:
                log.info("store.up")
            else:
                log.error("store.down", reason=reason)
            if self._on_change is not None:
                self._on_change(writable)
