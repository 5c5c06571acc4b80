"""`meshca log`: the issuance log (in DIR/meshca.db, or the store --store names), newest first."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshca.cli._options import CliError, add_dir, add_json, add_store, emit, spiffe_id, store_url
from meshca.pki._time import Clock
from meshca.server import open_store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("log", help="read the issuance log, newest first")
    add_dir(p, "trust domain directory whose meshca.db holds the log (needed without a store URL)", required=False)
    add_store(p)
    p.add_argument("--spiffe-id", type=spiffe_id, metavar="ID", help="only issuances for this SPIFFE ID")
    p.add_argument(
        "--limit", type=int, metavar="N", help="at most N records (the newest, or with --reverse the oldest)"
    )
    p.add_argument("--reverse", action="store_true", help="oldest first")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, clock: Clock) -> int:
    url = store_url(args)
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1", 2)
    if url is None:
        if args.dir is None:
            raise CliError("--dir is required without --store (or MESHCA_STORE)", 2)
        path = Path(args.dir) / "meshca.db"
        if not path.exists():
            raise CliError(f"no issuance log at {path}")
    store = open_store(url, Path(args.dir or "."), writer=False)
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
