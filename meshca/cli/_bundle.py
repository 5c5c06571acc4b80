"""`meshca bundle`: the trust bundle of a directory, as PEM or SPIFFE JSON (with the published JWT-SVID keys)."""

from __future__ import annotations

import argparse
import json
import sys

from meshca.cli._options import add_dir, add_store, store_url
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir
from meshca.server import open_store
from meshca.server._store import sqlite_path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bundle", help="print the trust bundle of DIR")
    add_dir(p, "trust domain directory whose bundle.pem to print")
    p.add_argument(
        "--format",
        choices=["pem", "spiffe"],
        default="pem",
        help="pem (default) or spiffe (SPIFFE bundle JSON, with the JWT-SVID keys the service published in the store)",
    )
    add_store(p)
    p.set_defaults(func=run)


def _jwt_keys(args: argparse.Namespace, tdir: TrustDir, clock: Clock) -> list[dict[str, object]]:
    """The JWT-SVID keys published in the store and still valid; none when the directory has no store yet."""
    url = store_url(args)
    path = sqlite_path(url, tdir.path)
    if path is not None and not path.exists():
        return []  # reading the bundle never creates a store
    store = open_store(url, tdir.path, writer=False)
    try:
        return [json.loads(k.jwk) for k in store.jwt_keys(clock())]
    finally:
        store.close()


def run(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    bundle = tdir.load_bundle()
    out = bundle.to_pem() if args.format == "pem" else bundle.to_spiffe_json(_jwt_keys(args, tdir, clock))
    sys.stdout.write(out.decode())
    return 0
