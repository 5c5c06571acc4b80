"""Options and helpers shared by several command groups: each option is declared here once."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from meshca.pki._custody import SigningKey
from meshca.pki._keys import KeyType
from meshca.pki._pkcs11 import Pkcs11Uri
from meshca.pki._profiles import LEAF_TTL
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._time import DURATION_FORMAT, format_duration, parse_duration
from meshca.pki._trustdir import write_key as trustdir_write_key

__all__ = [
    "CliError",
    "add_dir",
    "add_duration",
    "add_force",
    "add_json",
    "add_key_type",
    "add_key_uri",
    "add_key_writing",
    "add_leaf_ttl",
    "add_passphrase_file",
    "add_server_name",
    "add_store",
    "add_trust_domain",
    "duration",
    "emit",
    "key_type",
    "key_uri",
    "passphrase",
    "read",
    "refuse_existing",
    "spiffe_id",
    "store_url",
    "trust_domain",
    "write_key",
]


class CliError(Exception):
    """A failure to report in one line (``meshca: error: ...``), with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- argument types: each turns a parse error into argparse's one-line usage error

T = TypeVar("T")


def _argument_type(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


duration = _argument_type(parse_duration, "duration")
trust_domain = _argument_type(TrustDomain.parse, "trust domain")
spiffe_id = _argument_type(SpiffeId.parse, "SPIFFE ID")
key_type = _argument_type(KeyType.parse, "key type")
key_uri = _argument_type(Pkcs11Uri.parse, "PKCS#11 URI")


# -- shared options


def add_dir(p: argparse._ActionsContainer, help: str, *, required: bool = True, default: str | None = None) -> None:
    p.add_argument("--dir", required=required, default=default, metavar="DIR", help=help)


def add_passphrase_file(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="file holding the passphrase that decrypts the CA keys meshca reads and encrypts the keys it writes",
    )


STORE_ENV = "MESHCA_STORE"


def add_store(p: argparse._ActionsContainer) -> None:
    """--store URL, for every command that reads or writes state; `store_url` resolves it."""
    # The help names the variable, never its value: a URL may hold a password.
    p.add_argument(
        "--store",
        metavar="URL",
        help=f"state store: postgresql://USER@HOST:PORT/DB (password best from PGPASSWORD or ~/.pgpass) "
        f"or sqlite:///PATH (default: ${STORE_ENV}, else SQLite in DIR/meshca.db)",
    )


def store_url(args: argparse.Namespace) -> str | None:
    """--store, else $MESHCA_STORE; None for the default SQLite store in DIR."""
    return args.store or os.environ.get(STORE_ENV) or None


def add_server_name(p: argparse._ActionsContainer) -> None:
    """For commands that dial `meshca serve` at --server."""
    p.add_argument(
        "--server-name", metavar="NAME", help="expected DNS name of the server's certificate (default: from --server)"
    )


def add_json(p: argparse._ActionsContainer) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_force(p: argparse._ActionsContainer) -> None:
    """--force: one help for every command (replacing key files, or a rotation step before it is safe)."""
    p.add_argument(
        "--force",
        action="store_true",
        help="do it anyway: replace existing key files, or take a rotation step its safety rule refuses",
    )


def add_key_writing(p: argparse._ActionsContainer) -> None:
    """For commands that write private keys: --force to replace, --passphrase-file to encrypt."""
    add_force(p)
    add_passphrase_file(p)


def add_key_type(p: argparse._ActionsContainer, what: str = "new keys") -> None:
    p.add_argument(
        "--key-type",
        type=key_type,
        default=KeyType.EC_P256,
        metavar="TYPE",
        help=f"type of {what}: ec-p256 (default), ec-p384, rsa-2048, rsa-3072 or rsa-4096",
    )


def add_key_uri(p: argparse._ActionsContainer, flag: str, what: str) -> None:
    p.add_argument(
        flag,
        type=key_uri,
        metavar="URI",
        help=f"generate {what} on a PKCS#11 token and record this RFC 7512 URI instead of a key file "
        "(pkcs11:token=...;object=...?module-path=...&pin-source=file:...; see README, Keys in an HSM)",
    )


def add_trust_domain(p: argparse._ActionsContainer, help: str, **kwargs: Any) -> None:
    p.add_argument("--trust-domain", type=trust_domain, metavar="TD", help=help, **kwargs)


def add_duration(p: argparse._ActionsContainer, flag: str, default: timedelta | None, help: str) -> None:
    """A duration option; its help always shows the format, and the default when there is one."""
    shown = f"default {format_duration(default)}; " if default is not None else ""
    p.add_argument(flag, type=duration, default=default, metavar="DURATION", help=f"{help} ({shown}{DURATION_FORMAT})")


def add_leaf_ttl(p: argparse._ActionsContainer, help: str, default: timedelta = LEAF_TTL) -> None:
    add_duration(p, "--leaf-ttl", default, help)


# -- helpers


def read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc


def passphrase(args: argparse.Namespace) -> bytes | None:
    path = getattr(args, "passphrase_file", None)
    if path is None:
        return None
    value = read(path).rstrip(b"\r\n")
    if not value:
        raise CliError(f"passphrase file {path} is empty")
    return value


def refuse_existing(path: Path, args: argparse.Namespace) -> None:
    if path.exists() and not args.force:
        raise CliError(f"{path} exists; pass --force to replace it")


def write_key(path: str | Path, key: SigningKey, args: argparse.Namespace) -> Path:
    """Writes a key file, or ``path``.uri for a key on a token; returns the file written."""
    try:
        return trustdir_write_key(Path(path), key, passphrase=passphrase(args), overwrite=args.force)
    except FileExistsError:
        raise CliError(f"{path} exists; pass --force to replace it") from None


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
