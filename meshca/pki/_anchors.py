"""The rules of a staged trust anchor rotation: pure functions of times and certificates, no I/O.

prepare   a new anchor joins the bundle; the active one still signs.
activate  issuers are signed by the new anchor; the old one becomes retiring (still in the bundle).
retire    the old anchor leaves the bundle.

`meshca anchor ...` (file mode) and `meshca simulate` apply the same rules:

- **activation**: the prepared anchor must have been in the bundle for at
  least ``min_age``, the longest leaf lifetime the service hands out (`meshca
  serve --max-leaf-ttl`). A workload that follows no bundle stream fetches
  one at least at every renewal, which comes before its SVID expires: after
  that long, every workload holding a live SVID has fetched a bundle with the
  new anchor in it, so a peer's SVID under the new anchor verifies.
- **retirement**: refused while the active issuer chains only to the old
  anchor, or while a recorded leaf that may chain to it is unexpired. Leaves
  issued before ``activated_at + grace`` may (the grace covers replicas and
  workers that load the new issuer a little later); the earliest safe time is
  the latest NotAfter among them, and never before ``activated_at + grace``.
- **retirement, managed issuers** (`meshca serve --manage-issuers`): the
  issuers that sign are the ones each replica recorded in the store, not
  ``DIR/issuer.crt``. A replica (a writer of issuer records) whose newest
  recorded issuer is unexpired and signed by the old anchor has not switched
  yet: refused until it records an issuer under another anchor, at the latest
  until that issuer's NotAfter (no leaf it signs outlives it). The store
  cannot tell a live replica from one that is down, so both count; a replica
  that comes back mints from the active anchor, and one gone for good stops
  counting when its issuer expires (or ``--force``). A replica whose newest
  issuer has expired signs nothing and does not count. A replica that switched
  later than ``activated_at + grace`` moves the leaf cutoff to when it
  switched (the record of its first issuer under another anchor).

See docs/architecture.md, Trust anchor rotation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshca.pki._time import format_duration

__all__ = [
    "DEFAULT_RETIRE_GRACE",
    "AnchorState",
    "Blocker",
    "ReplicaIssuer",
    "RetireCheck",
    "activation_allowed_at",
    "chains_to",
    "retire_check",
]

DEFAULT_RETIRE_GRACE = timedelta(minutes=5)
"""After activation, how long a replica or worker may still sign with an issuer under the old anchor."""


class AnchorState(StrEnum):
    PREPARED = "prepared"  # in the bundle, signs nothing yet
    ACTIVE = "active"  # signs the issuers
    RETIRING = "retiring"  # still in the bundle until the leaves under it expire


def activation_allowed_at(prepared_at: datetime, min_age: timedelta) -> datetime:
    """When a prepared anchor may become active: once every client has had time to fetch the bundle holding it."""
    return prepared_at + min_age


def chains_to(chain: Sequence[x509.Certificate], anchor: x509.Certificate) -> bool:
    """True when the last certificate of ``chain`` (an issuer chain, leaf-side first) is signed by ``anchor``."""
    top = chain[-1]
    if top.issuer != anchor.subject:
        return False
    try:
        top.verify_directly_issued_by(anchor)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class Blocker:
    """One reason the old anchor must stay, and until when (None: until something changes, not a time)."""

    reason: str
    until: datetime | None


@dataclass(frozen=True, slots=True)
class RetireCheck:
    """What keeps the old anchor in the bundle, as `Blocker`s."""

    blockers: tuple[Blocker, ...]

    @property
    def never(self) -> bool:
        """True when no wait allows it: a blocker must go first (the issuer re-issued)."""
        return any(b.until is None for b in self.blockers)

    @property
    def safe_at(self) -> datetime | None:
        """The earliest safe time as far as time decides (None: no blocker has a time)."""
        return max((b.until for b in self.blockers if b.until is not None), default=None)

    def allows(self, now: datetime) -> bool:
        return not self.pending(now)

    def pending(self, now: datetime) -> tuple[Blocker, ...]:
        """The blockers still in force at ``now``."""
        return tuple(b for b in self.blockers if b.until is None or b.until > now)


@dataclass(frozen=True, slots=True)
class ReplicaIssuer:
    """An issuer a replica recorded in the store (managed mode): who, whether the old anchor signed it, when."""

    writer: str
    on_old_anchor: bool
    recorded_at: datetime
    not_after: datetime


def _replicas(issuers: Iterable[ReplicaIssuer]) -> tuple[list[ReplicaIssuer], ReplicaIssuer | None]:
    """The newest issuer of each replica that has not switched, and the first issuer under another anchor
    of the replica that switched last."""
    by_writer: dict[str, list[ReplicaIssuer]] = {}
    for issuer in sorted(issuers, key=lambda i: (i.recorded_at, i.not_after)):
        by_writer.setdefault(issuer.writer, []).append(issuer)
    unswitched, switches = [], []
    for history in by_writer.values():
        if history[-1].on_old_anchor:
            unswitched.append(history[-1])
            continue
        last_old = max((n for n, i in enumerate(history) if i.on_old_anchor), default=None)
        if last_old is not None:  # a replica that started under the new anchor never switched
            switches.append(history[last_old + 1])
    return unswitched, max(switches, key=lambda i: i.recorded_at, default=None)


def retire_check(
    *,
    activated_at: datetime | None,
    issuer_on_old_anchor: bool,
    leaves: Iterable[tuple[datetime, datetime]],
    grace: timedelta = DEFAULT_RETIRE_GRACE,
    replicas: Iterable[ReplicaIssuer] = (),
) -> RetireCheck:
    """When the retiring anchor may leave the bundle.

    ``activated_at``: when the anchor after it became active (None: not
    recorded, so every recorded leaf may chain to the old anchor).
    ``issuer_on_old_anchor``: the active issuer chains only to the old anchor (file mode).
    ``leaves``: (issued_at, not_after) of the recorded leaves; expired ones may be left out.
    ``replicas``: every issuer the replicas recorded (managed mode).
    """
    blockers = []
    if issuer_on_old_anchor:
        blockers.append(Blocker("the active issuer chains only to it", None))
    unswitched, last_switch = _replicas(replicas)
    for newest in unswitched:
        blockers.append(
            Blocker(
                f"replica {newest.writer} still signs with an issuer under it (until it switches, "
                f"at the latest until that issuer expires)",
                newest.not_after,
            )
        )
    cutoff = None if activated_at is None else activated_at + grace
    if cutoff is not None:
        blockers.append(Blocker(f"issuers may sign under it until {format_duration(grace)} after activation", cutoff))
        if last_switch is not None and last_switch.recorded_at > cutoff:
            cutoff = last_switch.recorded_at
            blockers.append(Blocker(f"replica {last_switch.writer} signed under it until it switched", cutoff))
    old = [not_after for issued_at, not_after in leaves if cutoff is None or issued_at < cutoff]
    if old:
        blockers.append(Blocker(f"{len(old)} recorded leaves issued before then may chain to it", max(old)))
    return RetireCheck(tuple(blockers))
