"""`meshca fetch`: an SVID from `meshca serve`, written to files and optionally kept fresh (spiffe-helper's job)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta

from meshca.cli._options import CliError, add_duration, add_server_name, read, spiffe_id
from meshca.client import SvidSource
from meshca.client._sink import FileSink
from meshca.pki._time import Clock
from meshca.server._logging import configure_logging

TOKEN_ENV = "MESHCA_JOIN_TOKEN"  # noqa: S105 - the name of a variable, not a secret


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fetch",
        help="get an SVID from meshca serve and write it to files (optionally keep it fresh)",
        description=f"The credential is a join token from --token-file or ${TOKEN_ENV} (--token shows it to "
        "anyone who can run ps), or a service-account JWT from --jwt-file.",
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="address of meshca serve")
    p.add_argument("--bundle", required=True, metavar="FILE", help="PEM bundle to trust the server with")
    p.add_argument(
        "--spiffe-id", type=spiffe_id, required=True, metavar="ID", help="the SPIFFE ID to fetch an SVID for"
    )
    cred = p.add_mutually_exclusive_group()
    cred.add_argument("--token-file", metavar="FILE", help=f"file holding a join token (or set ${TOKEN_ENV})")
    cred.add_argument("--jwt-file", metavar="FILE", help="service-account JWT file, re-read on every attempt")
    cred.add_argument(
        "--token", metavar="TOKEN", help=f"join token (visible in ps: prefer --token-file or ${TOKEN_ENV})"
    )
    p.add_argument("--out-dir", required=True, metavar="DIR", help="writes svid.pem, svid.key (0600) and bundle.pem")
    p.add_argument("--watch", action="store_true", help="keep the files fresh until SIGTERM")
    p.add_argument(
        "--exec",
        metavar="COMMAND",
        help="after every change run COMMAND with 'sh -c', so pipes, $(...) and redirections work "
        "(e.g. 'nginx -s reload')",
    )
    add_duration(p, "--exec-timeout", timedelta(seconds=30), "stop waiting for COMMAND after this long")
    add_server_name(p)
    add_duration(p, "--timeout", timedelta(seconds=60), "wait this long for the first SVID")
    p.set_defaults(func=run)


def _join_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        token = read(args.token_file).decode().strip()
        if not token:
            raise CliError(f"token file {args.token_file} is empty")
        return token
    if args.token or args.jwt_file:
        return args.token  # type: ignore[no-any-return]
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise CliError(f"give --token-file, --jwt-file or --token, or set {TOKEN_ENV}", 2)
    return token


def _run_command(command: str | None, timeout: timedelta) -> None:
    if command is None:
        return
    try:
        result = subprocess.run(["/bin/sh", "-c", command], check=False, timeout=timeout.total_seconds())
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"meshca: --exec failed: {exc}", file=sys.stderr)
        return
    if result.returncode != 0:
        print(f"meshca: --exec command exited {result.returncode}", file=sys.stderr)


def run(args: argparse.Namespace, clock: Clock) -> int:
    token = _join_token(args)
    configure_logging()
    sink = FileSink(args.out_dir)
    changed = threading.Event()
    source = SvidSource(
        args.server,
        args.bundle,
        args.spiffe_id,
        join_token=token,
        jwt_file=args.jwt_file,
        server_name=args.server_name,
        clock=clock,
    )
    with source:
        try:
            snapshot = source.wait_ready(args.timeout.total_seconds())
        except TimeoutError as exc:
            raise CliError(f"{exc} (is meshca serve reachable at {args.server}?)") from None
        written = sink.write(snapshot)
        print(f"wrote {', '.join(str(p) for p in written)} for {args.spiffe_id}", file=sys.stderr)
        _run_command(args.exec, args.exec_timeout)
        if not args.watch:
            return 0
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        source.subscribe(lambda _: changed.set())
        while not stop.is_set():
            if not changed.wait(0.5):
                continue
            changed.clear()
            if sink.write(source.snapshot):
                _run_command(args.exec, args.exec_timeout)
    return 0
