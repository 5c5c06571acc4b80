"""`meshca entry ...`: registration entries, which node agents turn into workload SVIDs (see docs/architecture.md)."""

from __future__ import annotations

import argparse
import json

from meshca.cli._options import (
    CliError,
    add_dir,
    add_duration,
    add_json,
    add_store,
    spiffe_id,
    store_url,
)
from meshca.cli._serve import DEFAULTS
from meshca.pki._errors import InvalidRequest
from meshca.pki._time import Clock, format_duration
from meshca.pki._trustdir import TrustDir
from meshca.server import open_store
from meshca.server._entries import MAX_JWT_TTL, RegistrationEntry, new_entry

# The longest X.509-SVID lifetime an entry may ask for: `meshca serve`'s default --max-leaf-ttl
# (a server started with a lower maximum caps longer entries at its own).
MAX_X509_TTL = DEFAULTS.max_leaf_ttl


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = sub.add_parser("entry", help="registration entries for node agents").add_subparsers(
        dest="subcommand", required=True, metavar="ACTION"
    )
    p = actions.add_parser("create", help="store an entry; prints its id")
    _common(p)
    p.add_argument("--spiffe-id", type=spiffe_id, required=True, metavar="ID", help="the SPIFFE ID the entry grants")
    p.add_argument(
        "--selector",
        action="append",
        required=True,
        metavar="TYPE:KEY:VALUE",
        help="a selector every matching workload has (repeat for more; all must match): unix:uid:N, unix:gid:N, "
        "unix:user:NAME, unix:group:NAME, unix:path:/abs/exe",
    )
    p.add_argument(
        "--parent",
        type=spiffe_id,
        metavar="AGENT-ID",
        help="the one agent that may serve it, spiffe://TD/meshca/agent/NAME (default: every agent)",
    )
    add_duration(p, "--x509-ttl", None, "X.509-SVID lifetime (default: the server's --leaf-ttl)")
    add_duration(p, "--jwt-ttl", None, f"JWT-SVID lifetime (default 5m; at most {format_duration(MAX_JWT_TTL)})")
    p.add_argument("--dns", action="append", default=[], metavar="NAME", help="a DNS name for the X.509-SVID (repeat)")
    p.set_defaults(func=create)

    p = actions.add_parser("list", help="list the entries")
    _common(p)
    p.set_defaults(func=list_entries)

    p = actions.add_parser("delete", help="delete an entry")
    _common(p, json_output=False)
    p.add_argument("entry_id", metavar="ENTRY-ID", help="the id `meshca entry create` printed")
    p.set_defaults(func=delete)


def _common(p: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    add_dir(p, "trust domain directory (its bundle names the trust domain; its meshca.db stores the entries)")
    add_store(p)
    if json_output:
        add_json(p)


def create(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    trust_domain = tdir.load_bundle().trust_domain
    try:
        entry = new_entry(
            trust_domain,
            args.spiffe_id,
            args.selector,
            now=clock(),
            parent=args.parent,
            x509_ttl=args.x509_ttl,
            jwt_ttl=args.jwt_ttl,
            dns_names=args.dns,
            max_x509_ttl=MAX_X509_TTL,
        )
    except InvalidRequest as exc:
        raise CliError(str(exc), 2) from None
    store = open_store(store_url(args), tdir.path)
    try:
        store.add_entry(entry)
    finally:
        store.close()
    print(json.dumps(entry.to_json(), indent=2, sort_keys=True) if args.json else entry.id)
    return 0


def _line(entry: RegistrationEntry) -> str:
    parts = [entry.id, str(entry.spiffe_id), ",".join(entry.selectors), f"parent={entry.parent or '*'}"]
    if entry.x509_ttl:
        parts.append(f"x509-ttl={format_duration(entry.x509_ttl)}")
    if entry.jwt_ttl:
        parts.append(f"jwt-ttl={format_duration(entry.jwt_ttl)}")
    if entry.dns_names:
        parts.append("dns=" + ",".join(entry.dns_names))
    return "  ".join(parts)


def list_entries(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    store = open_store(store_url(args), tdir.path)
    try:
        entries = store.entries()
    finally:
        store.close()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2, sort_keys=True))
    else:
        for entry in entries:
            print(_line(entry))
    return 0


def delete(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    store = open_store(store_url(args), tdir.path)
    try:
        found = store.delete_entry(args.entry_id)
    finally:
        store.close()
    if not found:
        raise CliError(f"no entry {args.entry_id!r}")
    return 0
