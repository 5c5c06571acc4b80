"""`meshca anchor create` and `meshca issuer create`: one CA piece at a time."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from meshca.cli._options import (
    CliError,
    add_duration,
    add_json,
    add_key_type,
    add_key_uri,
    add_key_writing,
    refuse_existing,
    write_key,
)
from meshca.pki._custody import SigningKey
from meshca.pki._files import make_dirs
from meshca.pki._keys import generate_key
from meshca.pki._pkcs11 import TokenKey


def add_outputs(p: argparse.ArgumentParser, what: str, cert_name: str, key_name: str, lifetime: timedelta) -> None:
    """The options both commands take: where to write, the key, the lifetime."""
    p.add_argument(
        "--dir", metavar="DIR", help=f"write DIR/{cert_name} and DIR/{key_name} (and DIR/bundle.pem if absent)"
    )
    p.add_argument("--cert-out", metavar="FILE", help=f"write the {what} certificate here (PEM); with --key-out")
    p.add_argument("--key-out", metavar="FILE", help=f"write the {what} key here (PKCS#8 PEM, 0600); with --cert-out")
    add_key_uri(p, "--key-uri", f"the {what} key (DIR/{key_name}.uri records the URI)")
    add_key_type(p, f"the {what} key")
    add_duration(p, "--lifetime", lifetime, f"lifetime of the {what}")
    add_key_writing(p)
    add_json(p)


def cert_and_key_out(args: argparse.Namespace, cert_name: str, key_name: str) -> tuple[Path, Path | None]:
    """Where the certificate and the key go; no key file for --key-uri without --dir (the URI is printed)."""
    if args.dir:
        if args.cert_out or args.key_out:
            raise CliError("give either --dir or --cert-out/--key-out, not both", 2)
        make_dirs(args.dir)  # 0700 whatever the umask: it holds keys
        key_out = Path(args.dir) / key_name
    elif args.key_uri:
        if not args.cert_out or args.key_out:
            raise CliError("with --key-uri give --dir, or --cert-out alone (the key stays on the token)", 2)
        return Path(args.cert_out), None
    elif not (args.cert_out and args.key_out):
        raise CliError("give --dir, or both --cert-out and --key-out", 2)
    else:
        key_out = Path(args.key_out)
    refuse_existing(key_out, args)
    refuse_existing(key_out.with_name(key_out.name + ".uri"), args)
    return Path(args.cert_out) if args.cert_out else Path(args.dir) / cert_name, key_out


def new_key(args: argparse.Namespace) -> SigningKey:
    """A new key of --key-type: in memory, or generated on the token --key-uri names."""
    return TokenKey.generate(args.key_uri, args.key_type) if args.key_uri else generate_key(args.key_type)


def save_key(key_out: Path | None, key: SigningKey, args: argparse.Namespace) -> str:
    """Writes the key file (or the URI file beside it); names what was written, for the summary line."""
    if key_out is None:
        assert isinstance(key, TokenKey)
        return str(key.uri)
    return str(write_key(key_out, key, args))
