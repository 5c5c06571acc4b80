"""`meshca anchor create` and `meshca issuer create`: one CA piece at a time."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from meshca.cli._options import CliError, add_duration, add_json, add_key_type, add_key_writing
from meshca.pki._files import make_dirs


def add_outputs(p: argparse.ArgumentParser, what: str, cert_name: str, key_name: str, lifetime: timedelta) -> None:
    """The options both commands take: where to write, the key, the lifetime."""
    p.add_argument(
        "--dir", metavar="DIR", help=f"write DIR/{cert_name} and DIR/{key_name} (and DIR/bundle.pem if absent)"
    )
    p.add_argument("--cert-out", metavar="FILE", help=f"write the {what} certificate here (PEM); with --key-out")
    p.add_argument("--key-out", metavar="FILE", help=f"write the {what} key here (PKCS#8 PEM, 0600); with --cert-out")
    add_key_type(p, f"the {what} key")
    add_duration(p, "--lifetime", lifetime, f"lifetime of the {what}")
    add_key_writing(p)
    add_json(p)


def cert_and_key_out(args: argparse.Namespace, cert_name: str, key_name: str) -> tuple[Path, Path]:
    if args.dir:
        if args.cert_out or args.key_out:
            raise CliError("give either --dir or --cert-out/--key-out, not both", 2)
        make_dirs(args.dir)  # 0700 whatever the umask: it holds keys
        return Path(args.dir) / cert_name, Path(args.dir) / key_name
    if not (args.cert_out and args.key_out):
        raise CliError("give --dir, or both --cert-out and --key-out", 2)
    return Path(args.cert_out), Path(args.key_out)
