"""`meshca issue`: an X.509-SVID signed offline by the issuer in DIR, recorded in DIR's issuance log."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from meshca.cli._options import (
    add_dir,
    add_duration,
    add_json,
    add_key_type,
    add_key_writing,
    add_store,
    emit,
    passphrase,
    refuse_existing,
    spiffe_id,
    store_url,
    write_key,
)
from meshca.pki._files import atomic_write
from meshca.pki._inspect import describe_certificate
from meshca.pki._keys import generate_key
from meshca.pki._profiles import LEAF_TTL
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir
from meshca.server import IssuanceRecord, open_store

API = "offline"  # the `api` of its records in `meshca log`


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("issue", help="issue an X.509-SVID offline from the issuer in DIR")
    add_dir(p, "trust domain directory whose issuer signs (and whose meshca.db records the issuance)")
    add_store(p)
    p.add_argument("--spiffe-id", type=spiffe_id, required=True, metavar="ID", help="the SVID's SPIFFE ID")
    p.add_argument("--cert-out", required=True, metavar="FILE", help="write the leaf then the issuer here (PEM)")
    p.add_argument("--key-out", required=True, metavar="FILE", help="write the leaf's key here (PKCS#8 PEM, 0600)")
    add_duration(p, "--ttl", LEAF_TTL, "lifetime of the SVID")
    p.add_argument("--dns", action="append", default=[], metavar="NAME", help="a DNS SAN (repeatable)")
    add_key_type(p, "the leaf key")
    add_key_writing(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    issuer = tdir.load_issuer(passphrase=passphrase(args))
    key_out = Path(args.key_out)
    refuse_existing(key_out, args)
    key = generate_key(args.key_type)
    now = clock()
    svid = issuer.sign(key.public_key(), args.spiffe_id, now=now, ttl=args.ttl, dns_names=args.dns)
    # Recorded before the files are written, as the service records before it responds. The
    # store's log.checkpoint lines (the copy of its checkpoints) go to stderr: stdout is the output.
    log_key = tdir.ensure_log_key(passphrase(args))
    with contextlib.redirect_stdout(sys.stderr):
        store = open_store(store_url(args), tdir.path, log_key=log_key, clock=clock)
        try:
            record = IssuanceRecord(
                format(svid.serial, "x"), str(svid.spiffe_id), svid.not_after, _principal(), API, now
            )
            store.record(record).result()
        finally:
            store.close()
    write_key(key_out, key, args)
    atomic_write(args.cert_out, svid.chain_pem())
    data = describe_certificate(svid.leaf)
    emit(args, data, f"issued {svid.spiffe_id} until {data['not_after']} -> {args.cert_out}, {key_out}")
    return 0


def _principal() -> str:
    """Who issued offline: whoever could read the issuer key, by uid."""
    return f"local:uid={os.getuid()}"
