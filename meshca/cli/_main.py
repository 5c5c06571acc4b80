"""The parser, dispatch and error handling of the ``meshca`` command (docs/architecture.md, CLI).

Each command group is a module with ``register(subparsers)``; `COMMANDS` lists
them in the order ``meshca --help`` shows them. Every failure, argparse's
included, is one line on stderr: ``meshca: error: ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import NoReturn

from meshca.cli import (
    _agent,
    _anchor,
    _bundle,
    _check,
    _entry,
    _fetch,
    _init,
    _inspect,
    _install,
    _issue,
    _issuer,
    _log,
    _serve,
    _simulate,
    _token,
    _verify,
)
from meshca.cli._options import CliError
from meshca.pki._errors import MeshcaError
from meshca.pki._time import Clock, system_clock

__all__ = ["COMMANDS", "Command", "build_parser", "main", "run"]

COMMANDS = (
    _init,
    _anchor,
    _issuer,
    _issue,
    _bundle,
    _verify,
    _inspect,
    _check,
    _serve,
    _install,
    _token,
    _entry,
    _log,
    _fetch,
    _agent,
    _simulate,
)

Command = Callable[[argparse.Namespace, Clock], int]


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line, like every other error, with where to find help."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')", 2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshca", description="SPIFFE certificate authority for service meshes.")
    parser.add_argument("--version", action="version", version=f"meshca {version('meshca')}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMANDS:
        group.register(subparsers)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"meshca: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None, *, clock: Clock = system_clock) -> int:
    try:
        args = build_parser().parse_args(argv)
        func: Command = args.func
        return func(args, clock)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except (MeshcaError, ValueError) as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
