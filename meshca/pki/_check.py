"""`meshca check`: is this trust domain directory healthy now, and for how long?

Pure over the files' bytes and a time; each finding is ok, warning or error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import fingerprint, load_certificates, spiffe_ids_of
from meshca.pki._errors import KeyPolicyError, MeshcaError
from meshca.pki._inspect import describe_key
from meshca.pki._keys import key_type_of
from meshca.pki._time import format_duration
from meshca.pki._trustdir import TrustDir

__all__ = [
    "ANCHOR_WARN",
    "ISSUER_WARN",
    "Finding",
    "check_served_chain",
    "check_trust_dir",
    "issuer_warning",
    "leaf_room",
    "lifetime_findings",
]

ANCHOR_WARN = timedelta(days=60)
ISSUER_WARN = timedelta(days=14)  # the most warning an issuer gets by default (see `issuer_warning`)

Level = Literal["ok", "warning", "error"]


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    check: str
    message: str


def _short(cert: x509.Certificate) -> str:
    return fingerprint(cert)[:11]


def _validity(cert: x509.Certificate, what: str, now: datetime, warn: timedelta) -> Finding:
    if now < cert.not_valid_before_utc:
        return Finding(
            "error", f"{what} validity", f"{what} is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z"
        )
    left = cert.not_valid_after_utc - now
    if left <= timedelta():
        return Finding("error", f"{what} validity", f"{what} expired {format_duration(-left)} ago")
    if left < warn:
        return Finding(
            "warning",
            f"{what} validity",
            f"{what} expires in {format_duration(left)} (rotate before {format_duration(warn)} remain)",
        )
    return Finding("ok", f"{what} validity", f"{what} is valid for {format_duration(left)} more")


def issuer_warning(not_before: datetime, not_after: datetime, override: timedelta | None = None) -> timedelta:
    """How long before its NotAfter an issuer is reported as expiring (`meshca check`, ``issuer.expiring``):
    ``override`` when given, else a third of its lifetime, at most 14 days."""
    if override is not None:
        return override
    return min((not_after - not_before) / 3, ISSUER_WARN)


def _algorithm(cert: x509.Certificate, what: str) -> Finding:
    try:
        return Finding("ok", f"{what} algorithm", f"{what} key is {key_type_of(cert.public_key())}")
    except KeyPolicyError as exc:
        return Finding("error", f"{what} algorithm", f"{what} key {describe_key(cert.public_key())}: {exc}")


def check_trust_dir(
    tdir: TrustDir,
    *,
    now: datetime,
    leaf_ttl: timedelta,
    passphrase: bytes | None = None,
    issuer_warn: timedelta | None = None,
) -> list[Finding]:
    """``issuer_warn``: warn this long before the issuer expires (default `issuer_warning`'s rule)."""
    findings: list[Finding] = []
    try:
        bundle = tdir.load_bundle()
    except MeshcaError as exc:
        return [Finding("error", "trust bundle", str(exc))]
    findings.append(
        Finding("ok", "trust bundle", f"{tdir.bundle} holds {len(bundle.anchors)} anchor(s) for {bundle.trust_domain}")
    )
    for cert in bundle.anchors:
        what = f"anchor {_short(cert)}"
        findings.append(_algorithm(cert, what))
        findings.append(_validity(cert, what, now, ANCHOR_WARN))
    if tdir.anchor_cert.exists():
        try:
            local = load_certificates(tdir.anchor_cert.read_bytes())[0]
        except ValueError as exc:
            findings.append(Finding("error", "anchor file", f"{tdir.anchor_cert}: {exc}"))
        else:
            if local in bundle:
                findings.append(Finding("ok", "anchor file", f"{tdir.anchor_cert.name} is in the bundle"))
            else:
                findings.append(
                    Finding("error", "anchor file", f"{tdir.anchor_cert.name} is not in {tdir.bundle.name}")
                )
    try:
        issuer = tdir.load_issuer(bundle, passphrase)
    except MeshcaError as exc:
        findings.append(Finding("error", "issuer", str(exc)))
        return findings
    cert = issuer.certificate
    what = f"issuer {_short(cert)}"
    findings.append(Finding("ok", "issuer", f"{what} matches its key and chains to the bundle"))
    findings.append(_algorithm(cert, what))
    findings.append(_validity(cert, what, now, issuer_warning(issuer.not_before, issuer.not_after, issuer_warn)))
    findings.append(leaf_room(issuer.not_after - now, leaf_ttl))
    return findings


def leaf_room(room: timedelta, leaf_ttl: timedelta) -> Finding:
    """Whether an issuer with ``room`` left can sign a leaf of its full ``leaf_ttl``."""
    if room <= timedelta():
        return Finding("error", "leaf lifetime", "no leaf can be issued: the issuer chain has expired")
    if room < leaf_ttl:
        return Finding(
            "error",
            "leaf lifetime",
            f"leaves issued now are cut to {format_duration(room)} by the issuer chain "
            f"(wanted {format_duration(leaf_ttl)})",
        )
    return Finding("ok", "leaf lifetime", f"leaves issued now get their full {format_duration(leaf_ttl)}")


def lifetime_findings(*, anchor_lifetime: timedelta, issuer_lifetime: timedelta, leaf_ttl: timedelta) -> list[Finding]:
    """The lifetime rules for a trust domain about to be made (`meshca init` refuses any error).

    The same rules `check_trust_dir` applies to one that exists: the issuer is
    not cut by its anchor, and it has room for a full leaf.
    """
    findings = []
    if issuer_lifetime > anchor_lifetime:
        findings.append(
            Finding(
                "error",
                "issuer lifetime",
                f"the issuer lifetime {format_duration(issuer_lifetime)} exceeds the anchor lifetime "
                f"{format_duration(anchor_lifetime)}: an issuer never outlives its anchor",
            )
        )
    findings.append(leaf_room(min(issuer_lifetime, anchor_lifetime), leaf_ttl))
    return findings


def check_served_chain(
    chain: list[x509.Certificate], bundle: TrustBundle, *, now: datetime, expected: x509.Certificate | None = None
) -> list[Finding]:
    """What a running service presents: its own identity, and the issuer it signs with (the certificate after
    its leaf). ``chain`` has already been verified against ``bundle`` by the TLS handshake; ``expected`` is the
    issuer on disk, when known.
    """
    leaf = chain[0]
    ids = spiffe_ids_of(leaf)
    if len(ids) == 1 and ids[0].reserved and ids[0].trust_domain == bundle.trust_domain:
        findings = [Finding("ok", "server identity", f"server presents {ids[0]}, verified against the bundle")]
    else:
        named = ", ".join(map(str, ids)) or "no SPIFFE ID"
        findings = [Finding("warning", "server identity", f"server presents {named}, not a meshca identity")]
    if len(chain) < 2:
        findings.append(Finding("error", "served issuer", "server presents no issuer after its certificate"))
        return findings
    issuer = chain[1]
    what = f"served issuer {_short(issuer)}"
    warn = issuer_warning(issuer.not_valid_before_utc, issuer.not_valid_after_utc)
    findings.append(_validity(issuer, what, now, warn))
    if expected is not None and expected != issuer:
        findings.append(
            Finding("warning", "served issuer", f"{what} is not the issuer on disk {_short(expected)} (not reloaded?)")
        )
    return findings
