"""`meshca agent`: the node agent, serving the SPIFFE Workload API on a Unix socket."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import timedelta
from pathlib import Path

import grpc

from meshca.agent import AgentConfig, AgentMetrics, NodeAgent
from meshca.agent._metrics import serve_metrics
from meshca.cli._options import CliError, add_duration, add_server_name, read
from meshca.client._core import load_bundle
from meshca.pki._time import Clock
from meshca.server._logging import configure_logging

DATA_DIR = "/var/lib/meshca/agent"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "agent",
        help="run the node agent: the SPIFFE Workload API on a Unix socket",
        description="Joins with a join token made by 'meshca token create --agent NAME' (needed once: the agent "
        "keeps its SVID in --data-dir and renews it), then serves the SVIDs of the registration entries "
        "whose selectors a calling process matches.",
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="address of meshca serve")
    p.add_argument("--bundle", required=True, metavar="FILE", help="PEM bundle to trust the server with")
    cred = p.add_mutually_exclusive_group()
    cred.add_argument("--join-token", metavar="TOKEN", help="join token (visible in ps: prefer --token-file)")
    cred.add_argument("--token-file", metavar="FILE", help="file holding a join token")
    p.add_argument("--socket", required=True, metavar="PATH", help="the Workload API socket to create")
    p.add_argument(
        "--data-dir", default=DATA_DIR, metavar="DIR", help=f"where the agent keeps its own SVID (default {DATA_DIR})"
    )
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics there")
    add_duration(p, "--sync-interval", timedelta(seconds=5), "how often to fetch entries and bundles")
    add_server_name(p)
    p.set_defaults(func=run)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        token = read(args.token_file).decode().strip()
        if not token:
            raise CliError(f"token file {args.token_file} is empty")
        return token
    return args.join_token  # type: ignore[no-any-return]


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise CliError(f"--metrics-listen must be HOST:PORT, not {text!r}", 2)
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace, clock: Clock) -> int:
    if not args.socket.startswith("/"):
        raise CliError("--socket must be an absolute path", 2)
    metrics_at = _host_port(args.metrics_listen) if args.metrics_listen else None
    config = AgentConfig(
        server=args.server,
        bundle=load_bundle(read(args.bundle)),
        socket=Path(args.socket),
        data_dir=Path(args.data_dir),
        join_token=_token(args),
        sync_interval=args.sync_interval,
        server_name=args.server_name,
    )
    configure_logging()
    return asyncio.run(_serve(config, clock, metrics_at))


async def _serve(config: AgentConfig, clock: Clock, metrics_at: tuple[str, int] | None) -> int:
    metrics = AgentMetrics()
    agent = NodeAgent(config, clock=clock, metrics=metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http, port = None, 0
    try:
        if metrics_at is not None:
            try:
                http, port = serve_metrics(metrics, *metrics_at)
            except OSError as exc:
                raise CliError(
                    f"cannot listen on {metrics_at[0]}:{metrics_at[1]} for metrics: {exc.strerror}"
                ) from None
        try:
            await agent.start()
        except grpc.aio.AioRpcError as exc:
            raise CliError(f"cannot join through {config.server}: {exc.code().name}: {exc.details()}") from None
        where = f"; metrics on {metrics_at[0]}:{port}" if metrics_at is not None else ""
        print(
            f"meshca agent: serving the Workload API on {config.socket} as {agent.own.spiffe_id}{where}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    finally:
        await agent.stop()
        if http is not None:
            http.shutdown()
    return 0
