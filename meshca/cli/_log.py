"""`meshca log`: the issuance log (in DIR/meshca.db, or the store --store names), newest first;
`meshca log verify`: its chains and checkpoints; `meshca log issuers`: the issuer certificates the store knows."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from meshca.cli._options import CliError, add_dir, add_json, add_store, emit, spiffe_id, store_url
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir
from meshca.server import IssuerCertRecord, Store, open_store
from meshca.server._audit import LogReport, verify_log


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("log", help="read the issuance log, newest first; 'log verify' checks it for tampering")
    add_dir(p, "trust domain directory whose meshca.db holds the log (needed without a store URL)", required=False)
    add_store(p)
    p.add_argument("--spiffe-id", type=spiffe_id, metavar="ID", help="only issuances for this SPIFFE ID")
    p.add_argument(
        "--limit", type=int, metavar="N", help="at most N records (the newest, or with --reverse the oldest)"
    )
    p.add_argument("--reverse", action="store_true", help="oldest first")
    add_json(p)
    p.set_defaults(func=run)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    v = actions.add_parser(
        "verify",
        help="check every writer's hash chain and signed checkpoint; exit 1 naming the first damaged record",
    )
    add_dir(v, "trust domain directory: its log-signing.pub checks the checkpoints (and its meshca.db is the log)")
    add_store(v)
    add_json(v)
    v.set_defaults(func=verify)
    i = actions.add_parser(
        "issuers", help="every issuer certificate the store recorded (minted by a managed replica or loaded from files)"
    )
    add_dir(i, "trust domain directory whose meshca.db is the store (needed without a store URL)", required=False)
    add_store(i)
    add_json(i)
    i.set_defaults(func=issuers)


def _open_reader(args: argparse.Namespace) -> Store:
    """The store --store (or MESHCA_STORE) names, else DIR/meshca.db, which must exist (never made here)."""
    url = store_url(args)
    if url is None:
        if args.dir is None:
            raise CliError("--dir is required without --store (or MESHCA_STORE)", 2)
        path = Path(args.dir) / "meshca.db"
        if not path.exists():
            raise CliError(f"no issuance log at {path}")
    return open_store(url, Path(args.dir or "."), writer=False)


def run(args: argparse.Namespace, clock: Clock) -> int:
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1", 2)
    store = _open_reader(args)
    try:
        rows = store.issuances(
            str(args.spiffe_id) if args.spiffe_id else None, args.limit, newest_first=not args.reverse
        )
    finally:
        store.close()
    data = [
        {
            "issued_at": r.issued_at.isoformat(),
            "serial": r.serial,
            "spiffe_id": r.spiffe_id,
            "not_after": r.not_after.isoformat(),
            "principal": r.principal,
            "api": r.api,
        }
        for r in rows
    ]
    text = "\n".join(
        f"{d['issued_at']}  {d['spiffe_id']}  serial={d['serial']}  until={d['not_after']}  "
        f"by={d['principal']}  api={d['api']}"
        for d in data
    )
    emit(args, data, text or "(no issuances)")
    return 0


def issuer_rows(records: list[IssuerCertRecord], now: datetime) -> list[dict[str, object]]:
    return [
        {
            "fingerprint": r.fingerprint,
            "writer": r.writer,
            "anchor_fingerprint": r.anchor_fingerprint,
            "not_before": r.not_before.isoformat(),
            "not_after": r.not_after.isoformat(),
            "recorded_at": r.recorded_at.isoformat(),
            "expired": r.not_after <= now,
        }
        for r in records
    ]


def issuers(args: argparse.Namespace, clock: Clock) -> int:
    store = _open_reader(args)
    try:
        data = issuer_rows(store.issuer_certs(), clock())
    finally:
        store.close()
    text = "\n".join(
        f"{d['fingerprint']}  by={d['writer']}  from={d['not_before']}  until={d['not_after']}"
        f"{'  (expired)' if d['expired'] else ''}  anchor={str(d['anchor_fingerprint'])[:23]}"
        for d in data
    )
    emit(args, data, text or "(no issuers recorded)")
    return 0


def verify(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    public_key = tdir.load_log_public_key()
    url = store_url(args)
    if url is None and not (tdir.path / "meshca.db").exists():
        raise CliError(f"no issuance log at {tdir.path / 'meshca.db'}")
    store = open_store(url, tdir.path, writer=False)
    try:
        # Checkpoints first: a writer signs only records it committed, so every checkpoint read
        # here finds its records below, even while a live service goes on writing.
        checkpoints = store.log_checkpoints()
        report = verify_log(store.log_records(), checkpoints, public_key)
    finally:
        store.close()
    data = {
        "ok": report.ok,
        "records": report.records,
        "writers": report.writers,
        "checkpoints": report.checkpoints,
        "unchecked": report.unchecked,
        "legacy": report.legacy,
        "findings": [
            {"kind": f.kind, "writer": f.writer, "seq": f.seq, "serial": f.serial, "detail": f.detail}
            for f in report.findings
        ],
    }
    emit(args, data, "\n".join([*(str(f) for f in report.findings), _summary(report)]))
    return 0 if report.ok else 1


def _summary(report: LogReport) -> str:
    """Counts as key=value (unchecked: after their writer's last checkpoint; legacy: from before the chain)."""
    verdict = "intact" if report.ok else f"TAMPERED, {len(report.findings)} finding(s), the first above"
    return (
        f"records={report.records} writers={report.writers} checkpoints={report.checkpoints} "
        f"unchecked={report.unchecked} legacy={report.legacy}: {verdict}"
    )
