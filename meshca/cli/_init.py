"""`meshca init`: a trust anchor, an issuer and the bundle in one directory."""

from __future__ import annotations

import argparse

from meshca.cli._options import (
    CliError,
    add_dir,
    add_duration,
    add_json,
    add_key_type,
    add_key_uri,
    add_key_writing,
    add_leaf_ttl,
    add_trust_domain,
    emit,
    passphrase,
)
from meshca.pki._check import lifetime_findings
from meshca.pki._profiles import ANCHOR_LIFETIME, ISSUER_LIFETIME
from meshca.pki._time import Clock, format_duration
from meshca.pki._trustdir import TrustDir


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help="create a trust anchor, an issuer and the bundle in a directory")
    add_trust_domain(p, "the trust domain, e.g. example.org", required=True)
    add_dir(p, "directory to write the trust domain into (created if absent)")
    add_key_type(p, "the anchor and issuer keys")
    add_key_uri(p, "--anchor-key-uri", "the trust anchor key")
    add_key_uri(p, "--issuer-key-uri", "the issuer key")
    add_duration(p, "--anchor-lifetime", ANCHOR_LIFETIME, "lifetime of the trust anchor")
    add_duration(
        p,
        "--issuer-lifetime",
        None,
        f"lifetime of the issuer, at most the anchor's (default {format_duration(ISSUER_LIFETIME)}, "
        "or the anchor's lifetime if that is shorter)",
    )
    add_leaf_ttl(p, "leaf lifetime the issuer must have room for, as `meshca check` checks it")
    add_key_writing(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, clock: Clock) -> int:
    issuer_lifetime = args.issuer_lifetime or min(ISSUER_LIFETIME, args.anchor_lifetime)
    # The rules `meshca check` applies, applied before anything is made.
    for finding in lifetime_findings(
        anchor_lifetime=args.anchor_lifetime, issuer_lifetime=issuer_lifetime, leaf_ttl=args.leaf_ttl
    ):
        if finding.level == "error":
            raise CliError(finding.message)
    tdir = TrustDir.at(args.dir)
    try:
        tdir.init(
            args.trust_domain,
            now=clock(),
            key_type=args.key_type,
            anchor_lifetime=args.anchor_lifetime,
            issuer_lifetime=issuer_lifetime,
            force=args.force,
            passphrase=passphrase(args),
            anchor_key_uri=args.anchor_key_uri,
            issuer_key_uri=args.issuer_key_uri,
        )
    except FileExistsError as exc:
        raise CliError(str(exc)) from None
    anchor_key = tdir.anchor_key_uri if args.anchor_key_uri else tdir.anchor_key
    issuer_key = tdir.issuer_key_uri if args.issuer_key_uri else tdir.issuer_key
    files = [
        str(p)
        for p in (
            tdir.anchor_cert,
            anchor_key,
            tdir.issuer_cert,
            issuer_key,
            tdir.bundle,
            tdir.log_key,
            tdir.log_public_key,
        )
    ]
    emit(
        args,
        {"trust_domain": str(args.trust_domain), "files": files},
        f"initialized trust domain {args.trust_domain} in {tdir.path}\n" + "\n".join(f"  {f}" for f in files),
    )
    return 0
