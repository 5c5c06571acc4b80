"""`meshca verify`: verify an X.509-SVID chain against a bundle."""

from __future__ import annotations

import argparse

from meshca.cli._options import CliError, add_json, add_trust_domain, emit, read, spiffe_id
from meshca.pki._bundle import TrustBundle
from meshca.pki._spiffe import TrustDomain
from meshca.pki._time import Clock
from meshca.pki._verify import authorize_id, authorize_member_of, verify_chain


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("verify", help="verify an X.509-SVID chain against a bundle")
    p.add_argument("--bundle", required=True, metavar="FILE", help="PEM or SPIFFE JSON bundle")
    p.add_argument("chain", metavar="CHAIN_FILE", help="leaf first, PEM or DER")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--spiffe-id", type=spiffe_id, metavar="ID", help="require exactly this ID")
    add_trust_domain(group, "require a member of this trust domain")
    add_json(p)
    p.set_defaults(func=run)


def load_bundle_file(path: str, trust_domain: TrustDomain | None) -> TrustBundle:
    """A PEM or SPIFFE JSON bundle file (JSON names no trust domain: it must be given)."""
    data = read(path)
    if data.lstrip().startswith(b"{"):
        if trust_domain is None:
            raise CliError("a SPIFFE JSON bundle does not name its trust domain; pass --trust-domain or --spiffe-id")
        return TrustBundle.from_spiffe_json(data, trust_domain)
    return TrustBundle.from_pem(data, trust_domain)


def run(args: argparse.Namespace, clock: Clock) -> int:
    td = args.trust_domain or (args.spiffe_id.trust_domain if args.spiffe_id else None)
    bundle = load_bundle_file(args.bundle, td)
    authorizer = (
        authorize_id(args.spiffe_id)
        if args.spiffe_id
        else authorize_member_of(args.trust_domain)
        if args.trust_domain
        else None
    )
    sid = verify_chain(read(args.chain), bundle, at=clock(), authorizer=authorizer)
    emit(args, {"spiffe_id": str(sid), "valid": True}, str(sid))
    return 0
