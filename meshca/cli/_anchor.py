"""`meshca anchor ...`: trust anchors, and their staged rotation (prepare, activate, retire, list)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

from meshca.cli._keypair import add_outputs, cert_and_key_out, new_key, save_key
from meshca.cli._options import (
    CliError,
    add_dir,
    add_duration,
    add_force,
    add_json,
    add_key_type,
    add_key_uri,
    add_passphrase_file,
    add_store,
    add_trust_domain,
    emit,
    passphrase,
    store_url,
)
from meshca.pki._anchors import (
    DEFAULT_RETIRE_GRACE,
    AnchorState,
    ReplicaIssuer,
    activation_allowed_at,
    chains_to,
    retire_check,
)
from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import certificates_pem, fingerprint, load_certificates
from meshca.pki._files import atomic_write
from meshca.pki._inspect import describe_certificate
from meshca.pki._profiles import ANCHOR_LIFETIME, build_anchor
from meshca.pki._time import Clock, format_duration
from meshca.pki._trustdir import AnchorSlot, TrustDir
from meshca.server._config import ServerConfig
from meshca.server._store import IssuerCertRecord, open_store

CERT, KEY = "trust-anchor.crt", "trust-anchor.key"
MIN_AGE = ServerConfig(Path()).max_leaf_ttl
"""The default wait before activation: the longest leaf lifetime `meshca serve` hands out by default."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = sub.add_parser("anchor", help="trust anchors and their staged rotation").add_subparsers(
        dest="subcommand", required=True, metavar="ACTION"
    )
    p = actions.add_parser("create", help="create a self-signed trust anchor")
    add_trust_domain(p, "the trust domain the anchor is for", required=True)
    add_outputs(p, "trust anchor", CERT, KEY, ANCHOR_LIFETIME)
    p.set_defaults(func=create)

    p = actions.add_parser(
        "prepare", help="rotation step 1: a new anchor joins DIR/bundle.pem; the active one still signs"
    )
    add_dir(p, "trust domain directory")
    add_key_uri(p, "--key-uri", "the new anchor key (DIR/trust-anchor.next.key.uri records the URI)")
    add_key_type(p, "the new anchor key")
    add_duration(p, "--lifetime", ANCHOR_LIFETIME, "lifetime of the new anchor")
    add_passphrase_file(p)
    add_json(p)
    p.set_defaults(func=prepare)

    p = actions.add_parser(
        "activate", help="rotation step 2: the prepared anchor signs the issuers (file mode: DIR/issuer.crt re-issued)"
    )
    add_dir(p, "trust domain directory")
    add_duration(
        p,
        "--min-age",
        MIN_AGE,
        "how long the prepared anchor must have been in the bundle first: the longest leaf lifetime "
        "the service hands out (meshca serve --max-leaf-ttl)",
    )
    add_duration(p, "--issuer-lifetime", None, "lifetime of the re-issued issuer (default: the current issuer's)")
    add_force(p)
    add_passphrase_file(p)
    add_json(p)
    p.set_defaults(func=activate)

    p = actions.add_parser("retire", help="rotation step 3: the retiring anchor leaves the bundle; its key is deleted")
    add_dir(p, "trust domain directory")
    add_store(p)
    p.add_argument(
        "--manage-issuers",
        action="store_true",
        help="the service mints its own issuers (serve --manage-issuers): wait for every replica's issuer recorded "
        "in the store to switch (the default when DIR holds no issuer.crt)",
    )
    add_duration(
        p,
        "--grace",
        DEFAULT_RETIRE_GRACE,
        "after activation, how long replicas may still have signed with the old issuer (their reload time)",
    )
    add_force(p)
    add_json(p)
    p.set_defaults(func=retire)

    p = actions.add_parser("list", help="the anchors of DIR: fingerprint, state, NotAfter, live recorded issuers")
    add_dir(p, "trust domain directory")
    add_store(p)
    add_json(p)
    p.set_defaults(func=list_anchors)


def create(args: argparse.Namespace, clock: Clock) -> int:
    cert_out, key_out = cert_and_key_out(args, CERT, KEY)
    key = new_key(args)
    cert = build_anchor(key, args.trust_domain, now=clock(), lifetime=args.lifetime)
    written = save_key(key_out, key, args)
    atomic_write(cert_out, certificates_pem([cert]))
    if args.dir and not TrustDir.at(args.dir).bundle.exists():
        atomic_write(TrustDir.at(args.dir).bundle, TrustBundle(args.trust_domain, (cert,)).to_pem())
    emit(args, describe_certificate(cert), f"wrote trust anchor {cert_out} and key {written}")
    return 0


def _slots(tdir: TrustDir) -> dict[AnchorState, AnchorSlot]:
    if not tdir.anchor_cert.exists():
        raise CliError(f"no active anchor at {tdir.anchor_cert} (run meshca init)")
    return {slot.state: slot for slot in tdir.anchors()}


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(slot: AnchorSlot) -> str:
    return slot.fingerprint[:23]


def prepare(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    slots = _slots(tdir)
    if AnchorState.PREPARED in slots:
        raise CliError(f"anchor {_short(slots[AnchorState.PREPARED])} is already prepared: activate it first")
    for leftover in (tdir.anchor_key_for(AnchorState.PREPARED), tdir.anchor_cert_for(AnchorState.PREPARED)):
        for path in (leftover, leftover.with_name(leftover.name + ".uri")):
            if path.exists():
                raise CliError(f"{path} exists without a prepared anchor: remove it first")
    if AnchorState.RETIRING in slots:
        raise CliError(f"anchor {_short(slots[AnchorState.RETIRING])} is still retiring: retire it first")
    secret = passphrase(args)  # read before a key is made (on a token, say)
    now = clock()
    cert = tdir.prepare_anchor(new_key(args), now=now, lifetime=args.lifetime, passphrase=secret)
    data = {**describe_certificate(cert), "fingerprint": fingerprint(cert), "prepared_at": now.isoformat()}
    emit(
        args,
        data,
        f"prepared anchor {fingerprint(cert)[:23]} (in {tdir.bundle}; the active anchor still signs)\n"
        f"activate from {_when(activation_allowed_at(now, MIN_AGE))} (--min-age {format_duration(MIN_AGE)}): "
        f"meshca anchor activate --dir {tdir.path}",
    )
    return 0


def activate(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    slots = _slots(tdir)
    prepared = slots.get(AnchorState.PREPARED)
    if prepared is None:
        raise CliError("no prepared anchor to activate: run meshca anchor prepare first")
    active, retiring = slots[AnchorState.ACTIVE], slots.get(AnchorState.RETIRING)
    # A retiring anchor here is an activation interrupted after its first writes: the retiring copy
    # is still the active anchor, or the active anchor is the prepared one already. Running again finishes it.
    interrupted = retiring is not None and active.certificate in (retiring.certificate, prepared.certificate)
    if retiring is not None and not interrupted:
        raise CliError(f"anchor {_short(retiring)} is still retiring: retire it first")
    now = clock()
    if not args.force:
        if prepared.prepared_at is None:
            raise CliError(
                f"no record of when anchor {_short(prepared)} joined the bundle ({tdir.anchor_times_file}); "
                "pass --force once every client has it"
            )
        allowed = activation_allowed_at(prepared.prepared_at, args.min_age)
        if now < allowed:
            raise CliError(
                f"anchor {_short(prepared)} joined the bundle at {_when(prepared.prepared_at)}: clients may not have "
                f"it yet; activation is allowed from {_when(allowed)} (--min-age {format_duration(args.min_age)}), "
                "or pass --force"
            )
    issuer = tdir.activate_anchor(now=now, issuer_lifetime=args.issuer_lifetime, passphrase=passphrase(args))
    old = retiring if retiring is not None else active
    data = {
        "active": prepared.fingerprint,
        "retiring": old.fingerprint,
        "activated_at": now.isoformat(),
        "issuer": describe_certificate(issuer) if issuer is not None else None,
    }
    text = f"activated anchor {_short(prepared)}; {_short(old)} is retiring"
    if issuer is not None:
        text += f"\nre-issued {tdir.issuer_cert} under it (until {_when(issuer.not_valid_after_utc)})"
    else:
        text += f"\nno {tdir.issuer_cert.name} in {tdir.path}: a service with --manage-issuers switches by itself"
    emit(args, data, text)
    return 0


@dataclass(frozen=True, slots=True)
class _Recorded:
    """What the store recorded: the unexpired leaves, and every issuer certificate."""

    leaves: list[tuple[datetime, datetime]]
    issuers: list[IssuerCertRecord]


def _recorded(args: argparse.Namespace, tdir: TrustDir, now: datetime, *, leaves: bool = True) -> _Recorded:
    url = store_url(args)
    if url is None and not (tdir.path / "meshca.db").exists():
        return _Recorded([], [])  # never served: nothing recorded
    store = open_store(url, Path(args.dir), writer=False)
    try:
        unexpired = [(r.issued_at, r.not_after) for r in store.issuances() if r.not_after > now] if leaves else []
        return _Recorded(unexpired, store.issuer_certs())
    finally:
        store.close()


def _chains_to_old(record: IssuerCertRecord, old: AnchorSlot) -> bool:
    """The recorded issuer is signed by the retiring anchor (its signature checked, not only the record's word)."""
    try:
        cert = x509.load_der_x509_certificate(record.der)
    except ValueError as exc:
        raise CliError(f"issuer {record.fingerprint[:23]} recorded by {record.writer}: {exc}") from None
    return chains_to([cert], old.certificate)


def retire(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    slots = _slots(tdir)
    old = slots.get(AnchorState.RETIRING)
    if old is None:
        raise CliError("no retiring anchor: meshca anchor activate makes the active one retiring")
    now = clock()
    if not args.force:
        managed = args.manage_issuers or not tdir.issuer_cert.exists()
        recorded = _recorded(args, tdir, now)
        replicas = [
            ReplicaIssuer(r.writer, _chains_to_old(r, old), r.recorded_at, r.not_after) for r in recorded.issuers
        ]
        issuer_on_old = False
        if tdir.issuer_cert.exists():  # managed too: `activate` re-issues issuer files wherever they are
            try:
                chain = load_certificates(tdir.issuer_cert.read_bytes())
            except ValueError as exc:
                raise CliError(f"{tdir.issuer_cert}: {exc}") from None
            others = [a for a in tdir.load_bundle().anchors if a != old.certificate]
            issuer_on_old = chains_to(chain, old.certificate) and not any(chains_to(chain, a) for a in others)
        check = retire_check(
            activated_at=slots[AnchorState.ACTIVE].activated_at,
            issuer_on_old_anchor=issuer_on_old,
            leaves=recorded.leaves,
            grace=args.grace,
            replicas=replicas if managed else (),
        )
        pending = check.pending(now)
        if pending:
            safe = check.safe_at
            until = (
                "no safe time until that changes"
                if check.never or safe is None
                else f"earliest safe time {_when(safe)}"
            )
            raise CliError(
                f"anchor {_short(old)} must stay in the bundle: "
                + "; ".join(b.reason for b in pending)
                + f"; {until}; or pass --force"
            )
    tdir.retire_anchor()
    emit(
        args,
        {"retired": old.fingerprint, "retired_at": now.isoformat()},
        f"retired anchor {_short(old)}: it left {tdir.bundle} and its key was deleted",
    )
    return 0


def list_anchors(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    slots = _slots(tdir).values()
    now = clock()
    live = [r for r in _recorded(args, tdir, now, leaves=False).issuers if r.not_after > now]
    issuers = {s.fingerprint: sum(r.anchor_fingerprint == s.fingerprint for r in live) for s in slots}
    lines = [
        f"{s.state.value:<9} {s.fingerprint}  not after {_when(s.certificate.not_valid_after_utc)}"
        + (f"  prepared {_when(s.prepared_at)}" if s.prepared_at else "")
        + (f"  activated {_when(s.activated_at)}" if s.activated_at else "")
        + f"  {issuers[s.fingerprint]} live issuer(s)"
        for s in slots
    ]
    emit(args, [{**s.to_json(), "live_issuers": issuers[s.fingerprint]} for s in slots], "\n".join(lines))
    return 0
