"""Managed issuers: when to mint the next one, when to switch to it, when to let the old one go.

The schedule is SPIRE's. An issuer that lives L is followed by a *prepared*
issuer at ``NotAfter - min(L/2, 30 days)`` and replaced by it at
``NotAfter - min(L/6, 7 days)``; the replaced one becomes *old* and is kept
(listed, its expiry exported) until the last leaf it can have signed has
expired: leaves never outlive their issuer, and none is signed after the
switch, so that is ``min(NotAfter, switch + longest leaf lifetime)``.

An issuer never outlives its anchor. One that already ends with its anchor
gets no successor from that anchor: the successor would end at the same
moment, and each one minted over the anchor's last days would be shorter than
the one before (a mint every few seconds before the end). It signs until the
anchor changes (``meshca anchor activate``) or both expire.

`IssuerSlots` holds the three slots and moves them forward; it does no I/O and
reads no clock. The service calls `IssuerSlots.advance` with the time and a
``mint`` function that makes an issuer from the current anchor; ``meshca
simulate`` calls the same code on a simulated clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import fingerprint
from meshca.pki._custody import SigningKey
from meshca.pki._errors import IssuerUnavailable, MeshcaError
from meshca.pki._issuer import Issuer
from meshca.pki._keys import KeyType, generate_key
from meshca.pki._profiles import CLOCK_SKEW, build_issuer
from meshca.pki._time import format_duration

__all__ = [
    "ACTIVATE_CAP",
    "MIN_ISSUER_TTL",
    "PREPARE_CAP",
    "IssuerSlots",
    "OldIssuer",
    "Rotation",
    "activation_time",
    "check_issuer_ttl",
    "ends_with_anchor",
    "handover_room",
    "mint_issuer",
    "preparation_time",
]

MIN_ISSUER_TTL = timedelta(minutes=1)
PREPARE_CAP = timedelta(days=30)
ACTIVATE_CAP = timedelta(days=7)

Step = Literal["prepare", "activate", "retire"]


def mint_issuer(
    anchor: x509.Certificate,
    anchor_key: SigningKey,
    bundle: TrustBundle,
    *,
    now: datetime,
    ttl: timedelta,
    key_type: KeyType = KeyType.EC_P256,
) -> Issuer:
    """A new issuer signed by ``anchor``, its key made here and kept in memory only.

    Raises `IssuerUnavailable` once the anchor has expired (an issuer cut to it would be born expired)."""
    if now >= anchor.not_valid_after_utc:
        raise IssuerUnavailable(
            f"the trust anchor {fingerprint(anchor)[:23]} expired at {anchor.not_valid_after_utc.isoformat()}"
        )
    key = generate_key(key_type)
    cert = build_issuer(
        key.public_key(),
        signer_certificate=anchor,
        signer_key=anchor_key,
        trust_domain=bundle.trust_domain,
        now=now,
        lifetime=ttl,
    )
    return Issuer([cert], key, bundle)


def handover_room(issuer_ttl: timedelta) -> timedelta:
    """The least life an active issuer of ``issuer_ttl`` has left when it hands over: a longer leaf is cut."""
    return min(issuer_ttl / 6, ACTIVATE_CAP)


def check_issuer_ttl(issuer_ttl: timedelta, leaf_ttl: timedelta) -> None:
    """Raises ValueError unless managed issuers of ``issuer_ttl`` give every leaf of ``leaf_ttl`` its full life."""
    if issuer_ttl < MIN_ISSUER_TTL:
        raise ValueError("issuer TTL must be at least 1 minute")
    room = handover_room(issuer_ttl)
    if leaf_ttl > room:
        raise ValueError(
            f"leaf TTL {format_duration(leaf_ttl)} does not fit an issuer TTL of {format_duration(issuer_ttl)}: "
            f"an active issuer has {format_duration(room)} of its life left when it hands over "
            "(a sixth, at most 7 days), so the leaf TTL must be at most that"
        )


def _lifetime(issuer: Issuer) -> timedelta:
    # counted from when it was minted: NotBefore is backdated by the clock-skew allowance
    return max(issuer.not_after - issuer.not_before - CLOCK_SKEW, timedelta())


def preparation_time(issuer: Issuer) -> datetime:
    """When the issuer that follows ``issuer`` is minted: half its life before NotAfter, at most 30 days."""
    return issuer.not_after - min(_lifetime(issuer) / 2, PREPARE_CAP)


def ends_with_anchor(issuer: Issuer) -> bool:
    """True when ``issuer`` was cut to its anchor's NotAfter: no issuer from that anchor can last longer."""
    return issuer.not_after >= issuer.anchor.not_valid_after_utc


def activation_time(issuer: Issuer) -> datetime:
    """When ``issuer`` hands over to the prepared one: a sixth of its life before NotAfter, at most 7 days."""
    return issuer.not_after - min(_lifetime(issuer) / 6, ACTIVATE_CAP)


@dataclass(frozen=True, slots=True)
class OldIssuer:
    issuer: Issuer
    keep_until: datetime


@dataclass(frozen=True, slots=True)
class Rotation:
    """One step taken (or tried): ``issuer`` is the one it concerns, None when minting failed."""

    step: Step
    ok: bool
    issuer: Issuer | None
    reason: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.issuer.certificate) if self.issuer is not None else ""


@dataclass(slots=True)
class IssuerSlots:
    """The prepared, active and old issuers of one service replica.

    ``max_leaf_ttl`` bounds the leaves an issuer signs, so an old issuer is
    dropped once its last possible leaf has expired.
    """

    max_leaf_ttl: timedelta
    active: Issuer | None = None
    prepared: Issuer | None = None
    old: list[OldIssuer] = field(default_factory=list)

    def advance(self, now: datetime, mint: Callable[[datetime], Issuer]) -> list[Rotation]:
        """Takes every step due at ``now``. A failed mint is reported and tried again at the next call;
        the active issuer keeps signing meanwhile."""
        done: list[Rotation] = []
        if self.active is None or not self.active.not_before <= now < self.active.not_after:
            # nothing to sign with (first start, asleep past the whole schedule, or the clock stepped back
            # before the active issuer's NotBefore): mint and use at once
            if self.prepared is not None and self.prepared.not_before <= now < self.prepared.not_after:
                self._activate(now, self.prepared, done)
            elif (fresh := self._mint(now, mint, done)) is not None:
                self._activate(now, fresh, done)
        active = self.active
        if active is not None:
            if self.prepared is None and now >= preparation_time(active) and not ends_with_anchor(active):
                self.prepared = self._mint(now, mint, done)
            if self.prepared is not None and now >= activation_time(active):
                self._activate(now, self.prepared, done)
        for gone in [o for o in self.old if now >= o.keep_until]:
            self.old.remove(gone)
            done.append(Rotation("retire", True, gone.issuer))
        return done

    def replace(self, now: datetime, mint: Callable[[datetime], Issuer]) -> list[Rotation]:
        """Mints and activates a new issuer at once (the anchor changed): a prepared one chains to the
        old anchor and is dropped. On failure the current issuer stays active."""
        done: list[Rotation] = []
        fresh = self._mint(now, mint, done)
        if fresh is not None:
            self.prepared = None
            self._activate(now, fresh, done)
        return done

    def next_step(self) -> datetime | None:
        """When `advance` next has something to do (None before the first issuer)."""
        if self.active is None:
            return None
        active = self.active
        if self.prepared is not None:
            due = [activation_time(active)]
        elif ends_with_anchor(active):
            due = [active.not_after]  # a new anchor by then, or nothing left to sign with
        else:
            due = [preparation_time(active)]
        due += [o.keep_until for o in self.old]
        return min(due)

    def in_use(self) -> list[Issuer]:
        """Every issuer a valid leaf may chain through: active, prepared, old."""
        current = [i for i in (self.active, self.prepared) if i is not None]
        return current + [o.issuer for o in self.old]

    def _mint(self, now: datetime, mint: Callable[[datetime], Issuer], done: list[Rotation]) -> Issuer | None:
        try:
            issuer = mint(now)
        except (MeshcaError, ValueError, OSError) as exc:  # the anchor key or its token failed
            done.append(Rotation("prepare", False, None, str(exc) or type(exc).__name__))
            return None
        done.append(Rotation("prepare", True, issuer))
        return issuer

    def _activate(self, now: datetime, issuer: Issuer, done: list[Rotation]) -> None:
        previous = self.active
        if previous is not None and now < previous.not_after:
            keep = min(previous.not_after, now + self.max_leaf_ttl + CLOCK_SKEW)
            self.old.append(OldIssuer(previous, keep))
        self.active, self.prepared = issuer, None
        done.append(Rotation("activate", True, issuer))
