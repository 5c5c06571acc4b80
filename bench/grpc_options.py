"""What the gRPC server layer costs, option by option, on this machine.

    python bench/grpc_options.py                 # every option, 32 connections and 1 connection
    python bench/grpc_options.py --requests 500  # a smoke run

Serves meshca's native IssueSVID (the same wire, TLS, the same request body
bench/run.py sends) from a small stand-alone server per option, so the
server layer is the only thing that changes:

- ``aio``: grpc.aio, as meshca serves today;
- ``threaded``: grpcio's synchronous server on a thread pool;
- ``grpclib``: grpclib (pure-Python HTTP/2 on asyncio, same wire);
- each with 1, cores and 2 x cores processes sharing the port (SO_REUSEPORT).

and two handlers: ``noop`` answers an empty response (the layer alone), ``pki``
does the per-request PKI work of meshca (parse the CSR, check it, sign a
leaf from the template) without authentication or the durable record. The
difference between the two is what the layer adds around the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (bench/run.py: h2load driver, request body)

OPTIONS = ("aio", "threaded", "grpclib")


def _work(kind: str) -> Any:
    """A function from request to response for the handler ``kind``."""
    from meshca._proto import meshca_identity_pb2 as pb
    from meshca.pki._csr import check_csr, load_csr
    from meshca.testing import TestCA

    if kind == "noop":
        return lambda request: pb.IssueSVIDResponse()
    ca = TestCA("bench.example")
    issuer = ca.issuer
    sid = ca.trust_domain.spiffe_id("/ns/bench/sa/load")

    def pki(request: Any) -> Any:
        checked = check_csr(load_csr(request.csr), sid)
        svid = issuer.sign(checked.public_key, sid, now=ca.now)
        return pb.IssueSVIDResponse(spiffe_id=str(sid), leaf=svid.leaf_der(), intermediates=svid.intermediates_der)

    return pki


def serve(option: str, kind: str, port: int, cert: Path, key: Path) -> None:
    from meshca._proto import meshca_identity_pb2 as pb
    from meshca._proto import meshca_identity_pb2_grpc as pb_grpc

    work = _work(kind)
    chain, key_pem = cert.read_bytes(), key.read_bytes()
    options = [("grpc.so_reuseport", 1)]
    if option == "grpclib":
        import grpclib.const
        import grpclib.server

        class Identity:
            async def issue(self, stream: Any) -> None:
                request = await stream.recv_message()
                await stream.send_message(work(request))

            def __mapping__(self) -> dict[str, grpclib.const.Handler]:
                return {
                    "/meshca.identity.v1.Identity/IssueSVID": grpclib.const.Handler(
                        self.issue, grpclib.const.Cardinality.UNARY_UNARY, pb.IssueSVIDRequest, pb.IssueSVIDResponse
                    )
                }

        async def main() -> None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
            context.set_alpn_protocols(["h2"])
            server = grpclib.server.Server([Identity()])
            await server.start("127.0.0.1", port, ssl=context, reuse_port=True)
            await server.wait_closed()

        asyncio.run(main())
        return
    credentials = __import__("grpc").ssl_server_credentials([(key_pem, chain)])
    if option == "aio":
        import grpc

        class AioIdentity(pb_grpc.IdentityServicer):
            async def IssueSVID(self, request: Any, context: Any) -> Any:
                return work(request)

        async def main_aio() -> None:
            server = grpc.aio.server(options=options)
            pb_grpc.add_IdentityServicer_to_server(AioIdentity(), server)
            server.add_secure_port(f"127.0.0.1:{port}", credentials)
            await server.start()
            await server.wait_for_termination()

        asyncio.run(main_aio())
        return
    import grpc

    class SyncIdentity(pb_grpc.IdentityServicer):
        def IssueSVID(self, request: Any, context: Any) -> Any:
            return work(request)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    pb_grpc.add_IdentityServicer_to_server(SyncIdentity(), server)
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    server.wait_for_termination()


class Servers:
    """``processes`` copies of one option sharing one port."""

    def __init__(self, option: str, kind: str, processes: int, cert: Path, key: Path, body: Path) -> None:
        self.name = f"{option} x{processes}"
        port = run.free_port()
        argv = [sys.executable, __file__, "--serve", option, "--kind", kind, "--port", str(port),
                "--cert", str(cert), "--key", str(key)]
        self.procs = [subprocess.Popen(argv) for _ in range(processes)]
        run.wait_port(port)
        time.sleep(1.0)  # every process has bound the port
        self.url = f"https://127.0.0.1:{port}/meshca.identity.v1.Identity/IssueSVID"
        self.body = body

    def measure(self, requests: int, connections: int) -> tuple[float, float]:
        seconds, latencies, ok = run.h2load([self.url], self.body, ["content-type: application/grpc", "te: trailers"],
                                            requests=requests, connections=connections, h1=False)
        if ok != requests:
            raise SystemExit(f"{self.name}: {ok} of {requests} answered")
        return requests / seconds, run.pct(latencies, 0.5)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--serve", choices=OPTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="pki", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.kind, args.port, args.cert, args.key)
        return 0

    import meshca
    from meshca.testing import TestCA

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="meshca-grpc-options-") as tmp:
        work = Path(tmp)
        ca = TestCA("bench.example")
        tls = ca.issue_svid("spiffe://bench.example/server", dns_names=["localhost"])
        cert, key = work / "tls.pem", work / "tls-key.pem"
        cert.write_bytes(tls.chain_pem)
        key.write_bytes(tls.key_pem)
        body = work / "request.bin"
        body.write_bytes(run._grpc_request("spiffe://bench.example/ns/bench/sa/load", ("join_token", "unused")))
        del meshca
        print("| server | processes | handler | issuances/s (32 conns) | p50 ms (32) | p50 ms (1 conn) |")
        print("|---|---|---|---|---|---|", flush=True)
        for option in args.options:
            for processes in sorted({1, cores, 2 * cores}):
                for kind in ("noop", "pki"):
                    servers = Servers(option, kind, processes, cert, key, body)
                    try:
                        servers.measure(max(200, args.requests // 10), run.CONNECTIONS)  # warm-up
                        rps, p50 = servers.measure(args.requests, run.CONNECTIONS)
                        _, seq = servers.measure(max(200, args.requests // 10), 1)
                    finally:
                        servers.stop()
                    print(f"| {option} | {processes} | {kind} | {rps:,.0f} | {p50:.2f} | {seq:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    sys.exit(main())
