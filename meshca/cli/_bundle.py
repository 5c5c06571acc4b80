"""`meshca bundle`: the trust bundle of a directory, as PEM or SPIFFE JSON."""

from __future__ import annotations

import argparse
import sys

from meshca.cli._options import add_dir
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bundle", help="print the trust bundle of DIR")
    add_dir(p, "trust domain directory whose bundle.pem to print")
    p.add_argument(
        "--format", choices=["pem", "spiffe"], default="pem", help="pem (default) or spiffe (SPIFFE bundle JSON)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, clock: Clock) -> int:
    bundle = TrustDir.at(args.dir).load_bundle()
    out = bundle.to_pem() if args.format == "pem" else bundle.to_spiffe_json()
    sys.stdout.write(out.decode())
    return 0
