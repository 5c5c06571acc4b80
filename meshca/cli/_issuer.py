"""`meshca issuer ...`: issuers (intermediate CAs) signed by an anchor you hold."""

from __future__ import annotations

import argparse

from meshca.cli._keypair import add_outputs, cert_and_key_out, new_key, save_key
from meshca.cli._options import CliError, add_trust_domain, emit, passphrase, read
from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import certificates_pem, load_certificates, spiffe_ids_of
from meshca.pki._custody import as_signer, is_key_uri, load_signing_key
from meshca.pki._files import atomic_write
from meshca.pki._inspect import describe_certificate
from meshca.pki._profiles import ISSUER_LIFETIME, build_issuer
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir

CERT, KEY = "issuer.crt", "issuer.key"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = sub.add_parser("issuer", help="issuers (intermediate CAs)").add_subparsers(
        dest="subcommand", required=True, metavar="ACTION"
    )
    p = actions.add_parser("create", help="create an issuer signed by an anchor you hold")
    p.add_argument("--anchor-cert", required=True, metavar="FILE", help="the signing anchor's certificate (PEM)")
    p.add_argument(
        "--anchor-key",
        required=True,
        metavar="FILE|URI",
        help="the signing anchor's key (PEM), or the PKCS#11 URI of an anchor key on a token",
    )
    add_trust_domain(p, "the issuer's trust domain (default: from the anchor's URI SAN)")
    add_outputs(p, "issuer", CERT, KEY, ISSUER_LIFETIME)
    p.set_defaults(func=create)


def create(args: argparse.Namespace, clock: Clock) -> int:
    cert_out, key_out = cert_and_key_out(args, CERT, KEY)
    try:
        signer = load_certificates(read(args.anchor_cert))[0]
    except ValueError as exc:
        raise CliError(f"{args.anchor_cert}: {exc}") from exc
    anchor_key = args.anchor_key.encode() if is_key_uri(args.anchor_key) else read(args.anchor_key)
    signer_key = load_signing_key(anchor_key, passphrase(args))
    if as_signer(signer_key).public_key() != signer.public_key():
        raise CliError(f"{args.anchor_key} is not the key of {args.anchor_cert}")
    trust_domain = args.trust_domain
    if trust_domain is None:
        named = {sid.trust_domain for sid in spiffe_ids_of(signer)}
        if len(named) != 1:
            raise CliError(f"{args.anchor_cert} names no single trust domain; pass --trust-domain")
        trust_domain = named.pop()
    key = new_key(args)
    cert = build_issuer(
        as_signer(key).public_key(),
        signer_certificate=signer,
        signer_key=signer_key,
        trust_domain=trust_domain,
        now=clock(),
        lifetime=args.lifetime,
    )
    written = save_key(key_out, key, args)
    atomic_write(cert_out, certificates_pem([cert]))
    if args.dir and not TrustDir.at(args.dir).bundle.exists():
        atomic_write(TrustDir.at(args.dir).bundle, TrustBundle(trust_domain, (signer,)).to_pem())
    emit(args, describe_certificate(cert), f"wrote issuer {cert_out} and key {written}")
    return 0
