"""`meshca check`: a trust domain directory, and a running service, now and for how long."""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
from datetime import timedelta
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.cli._options import (
    CliError,
    add_duration,
    add_json,
    add_leaf_ttl,
    add_passphrase_file,
    add_server_name,
    add_store,
    emit,
    passphrase,
    read,
    store_url,
)
from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import fingerprint, load_certificates
from meshca.pki._check import Finding, check_served_chain, check_trust_dir
from meshca.pki._time import Clock
from meshca.pki._trustdir import TrustDir
from meshca.server import open_store

TIMEOUT = timedelta(seconds=5)
_MARKS = {"ok": "ok  ", "warning": "WARN", "error": "FAIL"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="check the anchors and issuer in DIR, and/or a running meshca serve",
        description="Checks DIR (--dir), a running service (--server), or both; exits 1 on any failed check.",
    )
    p.add_argument("--dir", metavar="DIR", help="trust domain directory to check")
    add_leaf_ttl(p, "leaf lifetime the issuer must have room for")
    add_passphrase_file(p)
    p.add_argument(
        "--server", metavar="HOST:PORT", help="also check this running service: reachable, TLS identity, health, issuer"
    )
    p.add_argument("--bundle", metavar="FILE", help="PEM bundle to verify the server with (default DIR/bundle.pem)")
    add_server_name(p)
    add_duration(
        p,
        "--issuer-warn",
        None,
        "warn when the issuer expires within this (default a third of its lifetime, at most 14 days)",
    )
    p.add_argument(
        "--manage-issuers",
        action="store_true",
        help="the --server mints its own issuers (serve --manage-issuers): its issuer is not DIR/issuer.crt",
    )
    add_store(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, clock: Clock) -> int:
    if args.dir is None and args.server is None:
        raise CliError("give --dir, --server, or both", 2)
    tdir = TrustDir.at(args.dir) if args.dir else None
    findings: list[Finding] = []
    if tdir is not None:
        findings += check_trust_dir(
            tdir, now=clock(), leaf_ttl=args.leaf_ttl, passphrase=passphrase(args), issuer_warn=args.issuer_warn
        )
    served: x509.Certificate | None = None
    if args.server:
        server_findings, served = _check_server(args, tdir, clock)
        findings += server_findings
    findings += _recorded_issuers(args, tdir, served, clock)
    emit(
        args,
        [{"level": f.level, "check": f.check, "message": f.message} for f in findings],
        "\n".join(f"[{_MARKS[f.level]}] {f.message}" for f in findings),
    )
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    if not args.json:
        print(f"\n{errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0


def _recorded_issuers(
    args: argparse.Namespace, tdir: TrustDir | None, served: x509.Certificate | None, clock: Clock
) -> list[Finding]:
    """The issuers the store knows (every replica's): one line each while valid, the expired ones as a count.

    The state is known for the issuer in DIR/issuer.crt and the one --server presents; a managed
    replica's other issuers (prepared, old) are only its own to know: see its metrics.
    """
    url = store_url(args)
    if url is None and (tdir is None or not (tdir.path / "meshca.db").exists()):
        return []  # no store to read (and none is made here)
    store = open_store(url, tdir.path if tdir is not None else Path("."), writer=False)
    try:
        records = store.issuer_certs()
    finally:
        store.close()
    now = clock()
    known: dict[str, str] = {}
    if tdir is not None and tdir.issuer_cert.exists():
        with contextlib.suppress(ValueError):
            known[fingerprint(load_certificates(tdir.issuer_cert.read_bytes())[0])] = "in DIR/issuer.crt"
    if served is not None:
        known[fingerprint(served)] = "served"
    findings = []
    for r in records:
        if r.not_after <= now:
            continue
        state = f", {known[r.fingerprint]}" if r.fingerprint in known else ""
        findings.append(
            Finding(
                "ok",
                "recorded issuer",
                f"issuer {r.fingerprint[:11]} of {r.writer}{state}: valid until {r.not_after:%Y-%m-%d %H:%M:%S}Z",
            )
        )
    expired = sum(r.not_after <= now for r in records)
    findings.append(
        Finding("ok", "recorded issuers", f"the store knows {len(records)} issuer(s), {expired} of them expired")
    )
    return findings


def _check_server(
    args: argparse.Namespace, tdir: TrustDir | None, clock: Clock
) -> tuple[list[Finding], x509.Certificate | None]:
    if args.bundle is None and tdir is None:
        raise CliError("--server needs --bundle (or --dir, whose bundle.pem is used)", 2)
    bundle_path = Path(args.bundle) if args.bundle else tdir.bundle  # type: ignore[union-attr]
    bundle_pem = read(bundle_path)
    bundle = TrustBundle.from_pem(bundle_pem)
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"--server {args.server}: expected HOST:PORT", 2)
    name = args.server_name or host.strip("[]")
    try:
        chain = _served_chain(host.strip("[]"), int(port), name, bundle_pem)
    except OSError as exc:
        reason = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc)
        return [Finding("error", "server reachable", f"cannot reach {args.server} over TLS as {name}: {reason}")], None
    expected = None
    if tdir is not None and tdir.issuer_cert.exists() and not args.manage_issuers:
        expected = load_certificates(tdir.issuer_cert.read_bytes())[0]
    findings = [Finding("ok", "server reachable", f"{args.server} answers TLS as {name}")]
    findings += check_served_chain(chain, bundle, now=clock(), expected=expected)
    findings.append(_health(args.server, name, bundle_pem))
    return findings, chain[1] if len(chain) > 1 else None


def _served_chain(host: str, port: int, name: str, bundle_pem: bytes) -> list[x509.Certificate]:
    """The chain the server presents, after Python's ssl verified it against the bundle."""
    context = ssl.create_default_context(cadata=bundle_pem.decode())
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=TIMEOUT.total_seconds()) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        # Public as SSLSocket.get_unverified_chain() from Python 3.13; the object underneath has it since 3.10.
        presented = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
        return x509.load_pem_x509_certificates("".join(c.public_bytes() for c in presented).encode())


def _health(server: str, name: str, bundle_pem: bytes) -> Finding:
    credentials = grpc.ssl_channel_credentials(bundle_pem)
    options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]
    with grpc.secure_channel(server, credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT.total_seconds())
        except grpc.RpcError as exc:
            return Finding("error", "server health", f"health check failed: {exc.code().name} {exc.details()}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return Finding("error", "server health", f"grpc.health.v1 reports {status}: no usable issuer")
    return Finding("ok", "server health", f"grpc.health.v1 reports {status}")
