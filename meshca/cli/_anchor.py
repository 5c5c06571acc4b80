"""`meshca anchor ...`: trust anchors."""

from __future__ import annotations

import argparse

from meshca.cli._keypair import add_outputs, cert_and_key_out, new_key, save_key
from meshca.cli._options import add_trust_domain, emit
from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import certificates_pem
from meshca.pki._files import atomic_write
from meshca.pki._inspect import describe_certificate
from meshca.pki._profiles import ANCHOR_LIFETIME, build_anchor
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir

CERT, KEY = "trust-anchor.crt", "trust-anchor.key"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = sub.add_parser("anchor", help="trust anchors").add_subparsers(
        dest="subcommand", required=True, metavar="ACTION"
    )
    p = actions.add_parser("create", help="create a self-signed trust anchor")
    add_trust_domain(p, "the trust domain the anchor is for", required=True)
    add_outputs(p, "trust anchor", CERT, KEY, ANCHOR_LIFETIME)
    p.set_defaults(func=create)


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
