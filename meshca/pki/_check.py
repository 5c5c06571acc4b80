"""`meshca check`: is this trust domain directory healthy now, and for how long?

Pure over the files' bytes and a time; each finding is ok, warning or error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509

from meshca.pki._certs import fingerprint, load_certificates
from meshca.pki._errors import KeyPolicyError, MeshcaError
from meshca.pki._inspect import describe_key
from meshca.pki._issuer import Issuer
from meshca.pki._keys import key_type_of
from meshca.pki._time import format_duration
from meshca.pki._trustdir import TrustDir

__all__ = ["ANCHOR_WARN", "ISSUER_WARN", "Finding", "check_trust_dir"]

ANCHOR_WARN = timedelta(days=60)
ISSUER_WARN = timedelta(days=14)

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


def _algorithm(cert: x509.Certificate, what: str) -> Finding:
    try:
        return Finding("ok", f"{what} algorithm", f"{what} key is {key_type_of(cert.public_key())}")
    except KeyPolicyError as exc:
        return Finding("error", f"{what} algorithm", f"{what} key {describe_key(cert.public_key())}: {exc}")


def check_trust_dir(
    tdir: TrustDir, *, now: datetime, leaf_ttl: timedelta, passphrase: bytes | None = None
) -> list[Finding]:
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
    findings.append(_validity(cert, what, now, ISSUER_WARN))
    findings.append(_leaf_room(issuer, now, leaf_ttl))
    return findings


def _leaf_room(issuer: Issuer, now: datetime, leaf_ttl: timedelta) -> Finding:
    room = issuer.not_after - now
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
