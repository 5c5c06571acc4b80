"""Registration entries: which workloads a node agent may give which SPIFFE ID (docs/architecture.md, Agent API).

An entry names a SPIFFE ID, the selectors a workload must all have to get
it (``unix:uid:1000``, ...), the agent allowed to serve it (None: every
agent) and the lifetimes of its SVIDs (zero: the defaults). `new_entry`
checks everything once, with a message naming what is wrong; the store
keeps entries as they were checked.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from meshca.pki._errors import InvalidRequest
from meshca.pki._spiffe import SpiffeId, TrustDomain

__all__ = [
    "JWT_TTL",
    "MAX_JWT_TTL",
    "SELECTOR_TYPES",
    "RegistrationEntry",
    "check_dns_name",
    "new_entry",
    "parse_selector",
]

JWT_TTL = timedelta(minutes=5)  # a JWT-SVID's lifetime when neither the entry nor the request says
MAX_JWT_TTL = timedelta(hours=1)  # the longest a JWT-SVID lives, whatever an entry or a request asks
MAX_SELECTORS = 32
MAX_DNS_NAMES = 32

# type:key -> what the value must be
SELECTOR_TYPES: dict[str, str] = {
    "unix:uid": "a decimal user id",
    "unix:gid": "a decimal group id",
    "unix:user": "a user name",
    "unix:group": "a group name",
    "unix:path": "an absolute executable path, in canonical form (as /proc/PID/exe shows it)",
}
_NUMBER = re.compile(r"(0|[1-9][0-9]{0,9})")
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}\$?")  # POSIX portable names (and Samba's trailing $)
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _canonical_path(value: str) -> bool:
    """An absolute path as /proc/PID/exe gives one: no empty, '.' or '..' segment, no trailing '/', and not one
    the agent refuses to attest (``... (deleted)``): a path /proc never shows would make an entry no process matches.
    """
    segments = value.split("/")
    return (
        len(segments) > 1
        and segments[0] == ""
        and all(s not in ("", ".", "..") for s in segments[1:])
        and "\x00" not in value
        and not value.endswith(" (deleted)")
        and len(value) <= 4096
    )


def parse_selector(text: str) -> str:
    """``TYPE:KEY:VALUE`` of a known kind, in its canonical form (unchanged); `InvalidRequest` saying why not."""
    parts = text.split(":", 2)  # a path value may hold ':' itself
    if len(parts) != 3 or not all(parts):
        raise InvalidRequest(f"selector {text!r} is not TYPE:KEY:VALUE")
    kind, value = f"{parts[0]}:{parts[1]}", parts[2]
    if kind not in SELECTOR_TYPES:
        known = ", ".join(f"{k}:..." for k in SELECTOR_TYPES)
        raise InvalidRequest(f"selector {text!r} is of no known kind (known: {known})")
    ok = {
        "unix:uid": _NUMBER.fullmatch(value) is not None and int(value) < 2**32,
        "unix:gid": _NUMBER.fullmatch(value) is not None and int(value) < 2**32,
        "unix:user": _NAME.fullmatch(value) is not None,
        "unix:group": _NAME.fullmatch(value) is not None,
        "unix:path": _canonical_path(value),
    }[kind]
    if not ok:
        raise InvalidRequest(f"selector {text!r}: the value must be {SELECTOR_TYPES[kind]}")
    return text


def check_dns_name(name: str) -> str:
    """A lower-case DNS name of letters, digits and hyphens (a leading ``*.`` wildcard allowed)."""
    labels = name.removeprefix("*.").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise InvalidRequest(f"DNS name {name!r} is not a lower-case host name")
    return name


@dataclass(frozen=True, slots=True)
class RegistrationEntry:
    """A registration entry as stored: selectors sorted, lifetimes zero for "the default"."""

    id: str
    spiffe_id: SpiffeId
    selectors: tuple[str, ...]
    parent: SpiffeId | None  # the one agent that may serve it; None: every agent
    x509_ttl: timedelta
    jwt_ttl: timedelta
    dns_names: tuple[str, ...]
    created_at: datetime

    def served_by(self, agent: SpiffeId) -> bool:
        return self.parent is None or self.parent == agent

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "spiffe_id": str(self.spiffe_id),
            "selectors": list(self.selectors),
            "parent": str(self.parent) if self.parent else "",
            "x509_ttl_seconds": int(self.x509_ttl.total_seconds()),
            "jwt_ttl_seconds": int(self.jwt_ttl.total_seconds()),
            "dns_names": list(self.dns_names),
            "created_at": self.created_at.isoformat(),
        }


def _ttl(value: timedelta | None, maximum: timedelta, what: str) -> timedelta:
    if value is None:
        return timedelta()
    if value <= timedelta():
        raise InvalidRequest(f"{what} must be positive")
    if value > maximum:
        raise InvalidRequest(
            f"{what} {int(value.total_seconds())}s is above the maximum {int(maximum.total_seconds())}s"
        )
    return value


def new_entry(
    trust_domain: TrustDomain,
    spiffe_id: SpiffeId,
    selectors: Iterable[str],
    *,
    now: datetime,
    parent: SpiffeId | None = None,
    x509_ttl: timedelta | None = None,
    jwt_ttl: timedelta | None = None,
    dns_names: Iterable[str] = (),
    max_x509_ttl: timedelta,
) -> RegistrationEntry:
    """A checked entry with a new random id; `InvalidRequest` naming the first thing wrong."""
    if not spiffe_id.member_of(trust_domain):
        raise InvalidRequest(f"{spiffe_id} is not in trust domain {trust_domain}")
    if not spiffe_id.path:
        raise InvalidRequest(f"{spiffe_id} names the trust domain itself; an entry's SPIFFE ID has a path")
    if spiffe_id.reserved:
        raise InvalidRequest(f"{spiffe_id} is reserved for meshca's own components (spiffe://TD/meshca/...)")
    checked = sorted({parse_selector(s) for s in selectors})
    if not checked:
        raise InvalidRequest("an entry needs at least one selector")
    if len(checked) > MAX_SELECTORS:
        raise InvalidRequest(f"an entry has at most {MAX_SELECTORS} selectors")
    if parent is not None and not (parent.is_agent and parent.member_of(trust_domain)):
        raise InvalidRequest(
            f"parent {parent} is not an agent ID of this trust domain (spiffe://{trust_domain}/meshca/agent/NAME)"
        )
    names = tuple(dict.fromkeys(check_dns_name(n) for n in dns_names))
    if len(names) > MAX_DNS_NAMES:
        raise InvalidRequest(f"an entry has at most {MAX_DNS_NAMES} DNS names")
    return RegistrationEntry(
        id=secrets.token_hex(16),
        spiffe_id=spiffe_id,
        selectors=tuple(checked),
        parent=parent,
        x509_ttl=_ttl(x509_ttl, max_x509_ttl, "X.509-SVID lifetime"),
        jwt_ttl=_ttl(jwt_ttl, MAX_JWT_TTL, "JWT-SVID lifetime"),
        dns_names=names,
        created_at=now,
    )
