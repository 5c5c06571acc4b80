"""`meshca token ...`: join tokens, each bound to one SPIFFE ID."""

from __future__ import annotations

import argparse
from datetime import UTC, timedelta

from meshca.cli._options import CliError, add_dir, add_duration, add_json, add_store, emit, spiffe_id, store_url
from meshca.pki._errors import InvalidSpiffeId
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir
from meshca.server import JoinToken, hash_token, new_token, open_store

TOKEN_TTL = timedelta(hours=1)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = sub.add_parser("token", help="join tokens").add_subparsers(
        dest="subcommand", required=True, metavar="ACTION"
    )
    p = actions.add_parser("create", help="create a join token bound to one SPIFFE ID; prints it once")
    add_dir(p, "trust domain directory (its bundle names the trust domain; its meshca.db stores the token, hashed)")
    add_store(p)
    grants = p.add_mutually_exclusive_group(required=True)
    grants.add_argument("--spiffe-id", type=spiffe_id, metavar="ID", help="the one SPIFFE ID the token grants")
    grants.add_argument(
        "--agent",
        metavar="NAME",
        help="a node agent's token: grants spiffe://TD/meshca/agent/NAME, which the agent then renews itself",
    )
    add_duration(p, "--ttl", TOKEN_TTL, "how long the token is valid")
    p.add_argument("--uses", type=int, default=1, help="how many issuances it pays for (default 1)")
    add_json(p)
    p.set_defaults(func=create)


def create(args: argparse.Namespace, clock: Clock) -> int:
    sid = args.spiffe_id
    if sid is not None and sid.reserved:
        raise CliError(
            f"{sid} is reserved for meshca's own components (spiffe://TD/meshca/...): no token grants it"
            + (" (a node agent's token: --agent NAME)" if sid.is_agent else "")
        )
    tdir = TrustDir.at(args.dir)
    bundle = tdir.load_bundle()
    if args.agent is not None:
        try:
            sid = bundle.trust_domain.agent_id(args.agent)
        except InvalidSpiffeId as exc:
            raise CliError(f"--agent: {exc}", 2) from None
    if sid.trust_domain != bundle.trust_domain:
        raise CliError(f"{sid} is not in trust domain {bundle.trust_domain} of {tdir.path}")
    if not sid.path:
        raise CliError("a join token must name a SPIFFE ID with a path")
    if args.uses < 1:
        raise CliError("--uses must be at least 1", 2)
    if args.agent is not None and args.uses != 1:
        # One agent ID is one node: nodes joined with one token would share an ID, its entries and its log lines.
        raise CliError("--agent: an agent token is single-use (--uses 1): make one token per node", 2)
    token = new_token(agent=args.agent is not None)
    expires = clock().astimezone(UTC) + args.ttl
    store = open_store(store_url(args), tdir.path)
    try:
        store.add_token(JoinToken(hash_token(token), sid, expires, args.uses))
    finally:
        store.close()
    emit(
        args,
        {"token": token, "spiffe_id": str(sid), "expires_at": expires.isoformat(), "uses": args.uses},
        token,
    )
    return 0
