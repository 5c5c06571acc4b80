"""A small mTLS sidecar built on meshca's client library.

Inbound:  terminates mTLS, authorizes the caller's SPIFFE ID, forwards to a local plain-TCP app.
Outbound: accepts plain TCP from the local app, dials the remote sidecar over mTLS expecting its SPIFFE ID.

    python sidecar.py --server localhost:8443 --bundle bundle.pem \\
        --spiffe-id spiffe://cluster.local/ns/default/sa/web --token mtok_... \\
        --inbound 127.0.0.1:15001 --app 127.0.0.1:8080 --allow spiffe://cluster.local/ns/default/sa/client \\
        --outbound 127.0.0.1:15002 --remote 127.0.0.1:25001 --remote-id spiffe://cluster.local/ns/default/sa/api

The identity renews itself; new connections pick up renewed SVIDs and bundles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys

from cryptography import x509

import meshca
from meshca.client import AsyncSvidSource


def hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def splice(a: Stream, b: Stream) -> None:
    await asyncio.gather(pipe(a[0], b[1]), pipe(b[0], a[1]))


def peer_id(writer: asyncio.StreamWriter) -> meshca.SpiffeId:
    """The caller's SPIFFE ID; the handshake already verified and authorized it."""
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return meshca.leaf_spiffe_id(x509.load_der_x509_certificate(der))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--spiffe-id", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--name", default="sidecar", help="label for log lines")
    p.add_argument("--inbound", help="mTLS listen address")
    p.add_argument("--app", help="local app address inbound traffic goes to")
    p.add_argument("--allow", action="append", default=[], help="SPIFFE ID allowed to call in (repeatable)")
    p.add_argument("--outbound", help="plain-TCP listen address for the local app's outgoing calls")
    p.add_argument("--remote", help="remote sidecar's inbound address")
    p.add_argument("--remote-id", help="SPIFFE ID the remote sidecar must have")
    args = p.parse_args()

    def say(message: str) -> None:
        print(f"[{args.name}] {message}", flush=True)

    async with AsyncSvidSource(args.server, args.bundle, args.spiffe_id, join_token=args.token) as source:
        await source.wait_ready(30)
        say(f"identity {source.spiffe_id} ready")
        servers = []
        if args.inbound:
            allowed = meshca.authorize_one_of(*(meshca.SpiffeId.parse(a) for a in args.allow))
            server_ctx = source.server_ssl_context(allowed)
            app_host, app_port = hostport(args.app)

            async def inbound(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                say(f"inbound: authorized {peer_id(writer)}")
                upstream = await asyncio.open_connection(app_host, app_port)
                await splice((reader, writer), upstream)

            host, port = hostport(args.inbound)
            server = await asyncio.start_server(inbound, host, port, ssl=server_ctx)
            # A refused handshake never reaches inbound(); meshca logs it as tls.peer_refused.
            servers.append(server)
        if args.outbound:
            remote_id = meshca.SpiffeId.parse(args.remote_id)
            client_ctx = source.client_ssl_context(meshca.authorize_id(remote_id))
            remote_host, remote_port = hostport(args.remote)

            async def outbound(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    upstream = await asyncio.open_connection(
                        remote_host, remote_port, ssl=client_ctx, server_hostname=""
                    )
                except (ssl.SSLError, ConnectionError) as exc:
                    say(f"outbound: refused: {exc}")
                    writer.close()
                    return
                say(f"outbound: connected to {remote_id}")
                await splice((reader, writer), upstream)

            host, port = hostport(args.outbound)
            servers.append(await asyncio.start_server(outbound, host, port))
        say("listening")
        await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    sys.exit(0)
