"""The ``meshca`` command: bootstrap, inspect, check and run a trust domain.

Every command exits 0 on success and non-zero with one line on stderr on
error; commands that print data accept ``--json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import certificates_pem, load_certificates, spiffe_ids_of
from meshca.pki._check import check_trust_dir
from meshca.pki._csr import load_csr
from meshca.pki._errors import MeshcaError
from meshca.pki._files import atomic_write
from meshca.pki._inspect import describe_certificate, describe_csr
from meshca.pki._keys import KeyType, generate_key, load_private_key, write_private_key
from meshca.pki._profiles import ANCHOR_LIFETIME, ISSUER_LIFETIME, LEAF_TTL, build_anchor, build_issuer
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._time import Clock, format_duration, parse_duration, system_clock
from meshca.pki._trustdir import TrustDir
from meshca.pki._verify import authorize_id, authorize_member_of, verify_chain

__all__ = ["main"]


class CliError(Exception):
    """A failure to report in one line, with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- argument types: each raises ArgumentTypeError with a clear message


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _trust_domain(text: str) -> TrustDomain:
    try:
        return TrustDomain.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _spiffe_id(text: str) -> SpiffeId:
    try:
        return SpiffeId.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_type(text: str) -> KeyType:
    try:
        return KeyType.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- helpers


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc


def _passphrase(args: argparse.Namespace) -> bytes | None:
    path = getattr(args, "passphrase_file", None)
    if path is None:
        return None
    value = _read(path).rstrip(b"\r\n")
    if not value:
        raise CliError(f"passphrase file {path} is empty")
    return value


def _write_key(path: str | Path, key: Any, args: argparse.Namespace) -> None:
    try:
        write_private_key(path, key, passphrase=_passphrase(args), overwrite=args.force)
    except FileExistsError:
        raise CliError(f"{path} exists; pass --force to replace it") from None


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_key_options(p: argparse.ArgumentParser, lifetime: timedelta, what: str) -> None:
    p.add_argument(
        "--key-type", type=_key_type, default=KeyType.EC_P256, help="ec-p256 (default), ec-p384, rsa-2048/3072/4096"
    )
    p.add_argument(
        "--lifetime", type=_duration, default=lifetime, help=f"{what} lifetime (default {format_duration(lifetime)})"
    )
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.add_argument("--passphrase-file", help="encrypt written keys (and read keys) with the passphrase in this file")


# -- commands


def cmd_init(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    try:
        tdir.init(
            args.trust_domain,
            now=clock(),
            key_type=args.key_type,
            anchor_lifetime=args.anchor_lifetime,
            issuer_lifetime=args.issuer_lifetime,
            force=args.force,
            passphrase=_passphrase(args),
        )
    except FileExistsError as exc:
        raise CliError(str(exc)) from None
    files = [str(p) for p in (tdir.anchor_cert, tdir.anchor_key, tdir.issuer_cert, tdir.issuer_key, tdir.bundle)]
    _emit(
        args,
        {"trust_domain": str(args.trust_domain), "files": files},
        f"initialized trust domain {args.trust_domain} in {tdir.path}\n" + "\n".join(f"  {f}" for f in files),
    )
    return 0


def _cert_and_key_out(args: argparse.Namespace, cert_name: str, key_name: str) -> tuple[Path, Path]:
    if args.dir:
        if args.cert_out or args.key_out:
            raise CliError("give either --dir or --cert-out/--key-out, not both", 2)
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        return Path(args.dir) / cert_name, Path(args.dir) / key_name
    if not (args.cert_out and args.key_out):
        raise CliError("give --dir, or both --cert-out and --key-out", 2)
    return Path(args.cert_out), Path(args.key_out)


def cmd_anchor_create(args: argparse.Namespace, clock: Clock) -> int:
    cert_out, key_out = _cert_and_key_out(args, "trust-anchor.crt", "trust-anchor.key")
    if key_out.exists() and not args.force:
        raise CliError(f"{key_out} exists; pass --force to replace it")
    key = generate_key(args.key_type)
    cert = build_anchor(key, args.trust_domain, now=clock(), lifetime=args.lifetime)
    _write_key(key_out, key, args)
    atomic_write(cert_out, certificates_pem([cert]))
    if args.dir and not TrustDir.at(args.dir).bundle.exists():
        atomic_write(TrustDir.at(args.dir).bundle, TrustBundle(args.trust_domain, (cert,)).to_pem())
    _emit(args, describe_certificate(cert), f"wrote trust anchor {cert_out} and key {key_out}")
    return 0


def cmd_issuer_create(args: argparse.Namespace, clock: Clock) -> int:
    cert_out, key_out = _cert_and_key_out(args, "issuer.crt", "issuer.key")
    if key_out.exists() and not args.force:
        raise CliError(f"{key_out} exists; pass --force to replace it")
    try:
        signer = load_certificates(_read(args.anchor_cert))[0]
    except ValueError as exc:
        raise CliError(f"{args.anchor_cert}: {exc}") from exc
    signer_key = load_private_key(_read(args.anchor_key), _passphrase(args))
    if signer_key.public_key() != signer.public_key():
        raise CliError(f"{args.anchor_key} is not the key of {args.anchor_cert}")
    trust_domain = args.trust_domain
    if trust_domain is None:
        named = {sid.trust_domain for sid in spiffe_ids_of(signer)}
        if len(named) != 1:
            raise CliError(f"{args.anchor_cert} names no single trust domain; pass --trust-domain")
        trust_domain = named.pop()
    key = generate_key(args.key_type)
    cert = build_issuer(
        key.public_key(),
        signer_certificate=signer,
        signer_key=signer_key,
        trust_domain=trust_domain,
        now=clock(),
        lifetime=args.lifetime,
    )
    _write_key(key_out, key, args)
    atomic_write(cert_out, certificates_pem([cert]))
    if args.dir and not TrustDir.at(args.dir).bundle.exists():
        atomic_write(TrustDir.at(args.dir).bundle, TrustBundle(trust_domain, (signer,)).to_pem())
    _emit(args, describe_certificate(cert), f"wrote issuer {cert_out} and key {key_out}")
    return 0


def cmd_issue(args: argparse.Namespace, clock: Clock) -> int:
    tdir = TrustDir.at(args.dir)
    issuer = tdir.load_issuer(passphrase=_passphrase(args))
    key_out = Path(args.key_out)
    if key_out.exists() and not args.force:
        raise CliError(f"{key_out} exists; pass --force to replace it")
    key = generate_key(args.key_type)
    svid = issuer.sign(key.public_key(), args.spiffe_id, now=clock(), ttl=args.ttl, dns_names=args.dns)
    _write_key(key_out, key, args)
    atomic_write(args.cert_out, svid.chain_pem())
    data = describe_certificate(svid.leaf)
    _emit(args, data, f"issued {svid.spiffe_id} until {data['not_after']} -> {args.cert_out}, {key_out}")
    return 0


def cmd_bundle(args: argparse.Namespace, clock: Clock) -> int:
    bundle = TrustDir.at(args.dir).load_bundle()
    out = bundle.to_pem() if args.format == "pem" else bundle.to_spiffe_json()
    sys.stdout.write(out.decode())
    return 0


def _load_bundle_file(path: str, trust_domain: TrustDomain | None) -> TrustBundle:
    data = _read(path)
    if data.lstrip().startswith(b"{"):
        if trust_domain is None:
            raise CliError("a SPIFFE JSON bundle does not name its trust domain; pass --trust-domain or --spiffe-id")
        return TrustBundle.from_spiffe_json(data, trust_domain)
    return TrustBundle.from_pem(data, trust_domain)


def cmd_verify(args: argparse.Namespace, clock: Clock) -> int:
    td = args.trust_domain or (args.spiffe_id.trust_domain if args.spiffe_id else None)
    bundle = _load_bundle_file(args.bundle, td)
    authorizer = (
        authorize_id(args.spiffe_id)
        if args.spiffe_id
        else authorize_member_of(args.trust_domain)
        if args.trust_domain
        else None
    )
    sid = verify_chain(_read(args.chain), bundle, at=clock(), authorizer=authorizer)
    _emit(args, {"spiffe_id": str(sid), "valid": True}, str(sid))
    return 0


def _describe_any(data: bytes) -> list[dict[str, Any]]:
    stripped = data.lstrip()
    if stripped.startswith(b"{"):
        doc = json.loads(data)
        bundle = TrustBundle.from_spiffe_json(data, _td_from_json(doc))
        return [{"type": "spiffe-bundle", "sequence": bundle.sequence}] + [
            describe_certificate(c) for c in bundle.anchors
        ]
    if b"CERTIFICATE REQUEST-----" in data or (not stripped.startswith(b"-----") and _is_der_csr(data)):
        return [describe_csr(load_csr(data))]
    try:
        return [describe_certificate(c) for c in load_certificates(data)]
    except ValueError as exc:
        raise CliError(f"not a certificate, chain, CSR or bundle: {exc}") from exc


def _td_from_json(doc: Any) -> TrustDomain:
    """A SPIFFE bundle names no trust domain; its anchors' URI SANs usually do.

    Best effort: anything malformed is left for `TrustBundle.from_spiffe_json` to report.
    """
    try:
        for entry in doc["keys"]:
            cert = x509.load_der_x509_certificate(base64.b64decode(entry["x5c"][0], validate=True))
            for sid in spiffe_ids_of(cert):
                return sid.trust_domain
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    return TrustDomain("unknown")


def _is_der_csr(data: bytes) -> bool:
    try:
        x509.load_der_x509_csr(data)
    except ValueError:
        return False
    return True


def _format_item(item: dict[str, Any]) -> str:
    if item["type"] == "spiffe-bundle":
        return f"SPIFFE bundle, sequence {item['sequence']}"
    lines = [f"{'CSR' if item['type'] == 'csr' else 'Certificate'}"]
    for label, key in (("Subject", "subject"), ("Issuer", "issuer"), ("Serial", "serial"), ("SPIFFE ID", "spiffe_id")):
        if key in item:
            lines.append(f"  {label + ':':<14}{item[key] or '(empty)'}")
    for kind, values in item["sans"].items():
        lines.append(f"  {'SAN ' + kind.upper() + ':':<14}{', '.join(values)}")
    if "not_before" in item:
        lines.append(f"  {'Valid:':<14}{item['not_before']} .. {item['not_after']}")
        lines.append(f"  {'CA:':<14}{'yes' if item['is_ca'] else 'no'}")
    lines.append(f"  {'Key:':<14}{item['key']}")
    if "sha256" in item:
        lines.append(f"  {'SHA-256:':<14}{item['sha256']}")
    if "signature_valid" in item:
        lines.append(f"  {'Signature:':<14}{'valid' if item['signature_valid'] else 'INVALID'}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace, clock: Clock) -> int:
    items = _describe_any(_read(args.file))
    _emit(args, items, "\n".join(_format_item(i) for i in items))
    return 0


def cmd_check(args: argparse.Namespace, clock: Clock) -> int:
    findings = check_trust_dir(TrustDir.at(args.dir), now=clock(), leaf_ttl=args.leaf_ttl, passphrase=_passphrase(args))
    marks = {"ok": "ok  ", "warning": "WARN", "error": "FAIL"}
    _emit(
        args,
        [{"level": f.level, "check": f.check, "message": f.message} for f in findings],
        "\n".join(f"[{marks[f.level]}] {f.message}" for f in findings),
    )
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    if not args.json:
        print(f"\n{errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0


def _server_config(args: argparse.Namespace) -> Any:
    from meshca.server import K8sJwtConfig, ServerConfig, TokenReviewConfig

    k8s_jwt = None
    if args.k8s_jwks or args.k8s_issuer:
        if not (args.k8s_jwks and args.k8s_issuer):
            raise CliError("--k8s-jwks and --k8s-issuer go together", 2)
        k8s_jwt = K8sJwtConfig(Path(args.k8s_jwks), args.k8s_issuer, tuple(args.k8s_audience))
    token_review = None
    if args.k8s_api:
        token_review = TokenReviewConfig(
            args.k8s_api,
            Path(args.k8s_api_ca) if args.k8s_api_ca else None,
            Path(args.k8s_api_token_file) if args.k8s_api_token_file else None,
            tuple(args.k8s_audience),
        )
    if args.max_leaf_ttl < args.leaf_ttl:
        raise CliError("--leaf-ttl must not exceed --max-leaf-ttl", 2)
    return ServerConfig(
        dir=Path(args.dir),
        listen=args.listen,
        metrics_listen=args.metrics_listen or None,
        leaf_ttl=args.leaf_ttl,
        max_leaf_ttl=args.max_leaf_ttl,
        server_names=tuple(args.server_name) or ("localhost",),
        insecure_plaintext=args.insecure_plaintext,
        linkerd_namespace=args.linkerd_namespace,
        k8s_jwt=k8s_jwt,
        token_review=token_review,
        rate_limit=args.rate_limit,
        passphrase=_passphrase(args),
    )


def cmd_serve(args: argparse.Namespace, clock: Clock) -> int:
    import asyncio

    from meshca.server import IdentityServer
    from meshca.server._logging import configure_logging

    configure_logging()
    tdir = TrustDir.at(args.dir)
    if not tdir.path.exists() or not any(tdir.path.iterdir()):
        tdir.init(args.trust_domain, now=clock(), passphrase=_passphrase(args))
        bar = "!" * 72
        print(
            f"{bar}\n! meshca: {tdir.path} was empty: created a DEVELOPMENT trust domain {args.trust_domain}\n"
            f"! with its anchor key on this disk. Do not use it in production: run\n"
            f"! 'meshca init' (or bring your own anchor) and keep the anchor key offline.\n{bar}",
            file=sys.stderr,
        )
    config = _server_config(args)
    if config.insecure_plaintext:
        print(
            "meshca: WARNING: --insecure-plaintext: credentials and keys cross the network in the clear",
            file=sys.stderr,
        )

    if args.workers < 1:
        raise CliError("--workers must be at least 1", 2)
    if args.workers > 1:
        from meshca.server import run_supervisor
        from meshca.server._state import validate

        # Check the trust directory here, so a bad one fails once, in one line.
        validate(TrustDir.at(config.dir).load_issuer(passphrase=config.passphrase), clock)
        code = run_supervisor(config, args.workers, clock=clock)
        if code:
            raise CliError("a worker could not start; its worker.failed log line says why")
        return 0

    async def serve() -> None:
        server = IdentityServer(config, clock=clock)
        await server.serve_until_signal()

    asyncio.run(serve())
    return 0


def cmd_token_create(args: argparse.Namespace, clock: Clock) -> int:
    from datetime import UTC

    from meshca.server import JoinToken, SqliteStore, hash_token, new_token, store_path

    tdir = TrustDir.at(args.dir)
    bundle = tdir.load_bundle()
    if args.spiffe_id.trust_domain != bundle.trust_domain:
        raise CliError(f"{args.spiffe_id} is not in trust domain {bundle.trust_domain} of {tdir.path}")
    if not args.spiffe_id.path:
        raise CliError("a join token must name a SPIFFE ID with a path")
    if args.uses < 1:
        raise CliError("--uses must be at least 1", 2)
    token = new_token()
    expires = clock().astimezone(UTC) + args.ttl
    store = SqliteStore(store_path(tdir))
    try:
        store.add_token(JoinToken(hash_token(token), args.spiffe_id, expires, args.uses))
    finally:
        store.close()
    _emit(
        args,
        {"token": token, "spiffe_id": str(args.spiffe_id), "expires_at": expires.isoformat(), "uses": args.uses},
        token,
    )
    return 0


def cmd_log(args: argparse.Namespace, clock: Clock) -> int:
    from meshca.server import SqliteStore, store_path

    tdir = TrustDir.at(args.dir)
    path = Path(store_path(tdir))
    if not path.exists():
        raise CliError(f"no issuance log at {path}")
    store = SqliteStore.reader(path)
    try:
        rows = store.issuances(str(args.spiffe_id) if args.spiffe_id else None, args.limit)
    finally:
        store.close()
    data = [
        {
            "issued_at": r.issued_at.isoformat(),
            "serial": r.serial,
            "spiffe_id": r.spiffe_id,
            "not_after": r.not_after.isoformat(),
            "principal": r.principal,
            "api": r.api,
        }
        for r in rows
    ]
    text = "\n".join(
        f"{d['issued_at']}  {d['spiffe_id']}  serial={d['serial']}  until={d['not_after']}  "
        f"by={d['principal']}  api={d['api']}"
        for d in data
    )
    _emit(args, data, text or "(no issuances)")
    return 0


def cmd_fetch(args: argparse.Namespace, clock: Clock) -> int:
    import shlex
    import signal
    import subprocess
    import threading

    from meshca.client import SvidSource
    from meshca.client._sink import FileSink
    from meshca.server._logging import configure_logging

    configure_logging()
    token = args.token
    if args.token_file:
        token = _read(args.token_file).decode().strip()
    command = shlex.split(args.exec) if args.exec else None
    sink = FileSink(args.out_dir)
    changed = threading.Event()

    def run_command() -> None:
        if command is None:
            return
        try:
            result = subprocess.run(command, check=False, timeout=args.exec_timeout.total_seconds())
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"meshca: --exec {command[0]} failed: {exc}", file=sys.stderr)
            return
        if result.returncode != 0:
            print(f"meshca: --exec {command[0]} exited {result.returncode}", file=sys.stderr)

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
        run_command()
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
                run_command()
    return 0


# -- parser

Command = Callable[[argparse.Namespace, Clock], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshca", description="SPIFFE certificate authority for service meshes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a trust anchor, an issuer and the bundle in a directory")
    p.add_argument("--trust-domain", type=_trust_domain, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument(
        "--key-type", type=_key_type, default=KeyType.EC_P256, help="ec-p256 (default), ec-p384, rsa-2048/3072/4096"
    )
    p.add_argument("--anchor-lifetime", type=_duration, default=ANCHOR_LIFETIME, help="default 10y")
    p.add_argument("--issuer-lifetime", type=_duration, default=ISSUER_LIFETIME, help="default 365d")
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.add_argument("--passphrase-file", help="encrypt the keys with the passphrase in this file")
    _add_json(p)
    p.set_defaults(func=cmd_init)

    anchor = sub.add_parser("anchor", help="trust anchors").add_subparsers(
        dest="subcommand", required=True, metavar="ACTION"
    )
    p = anchor.add_parser("create", help="create a self-signed trust anchor")
    p.add_argument("--trust-domain", type=_trust_domain, required=True)
    p.add_argument("--dir", help="write DIR/trust-anchor.crt and .key (and DIR/bundle.pem if absent)")
    p.add_argument("--cert-out")
    p.add_argument("--key-out")
    _add_key_options(p, ANCHOR_LIFETIME, "anchor")
    _add_json(p)
    p.set_defaults(func=cmd_anchor_create)

    issuer = sub.add_parser("issuer", help="issuers (intermediate CAs)").add_subparsers(
        dest="subcommand", required=True, metavar="ACTION"
    )
    p = issuer.add_parser("create", help="create an issuer signed by an anchor you hold")
    p.add_argument("--anchor-cert", required=True, help="the signing anchor's certificate (PEM)")
    p.add_argument("--anchor-key", required=True, help="the signing anchor's key (PEM)")
    p.add_argument("--trust-domain", type=_trust_domain, help="default: from the anchor's URI SAN")
    p.add_argument("--dir", help="write DIR/issuer.crt and .key (and DIR/bundle.pem if absent)")
    p.add_argument("--cert-out")
    p.add_argument("--key-out")
    _add_key_options(p, ISSUER_LIFETIME, "issuer")
    _add_json(p)
    p.set_defaults(func=cmd_issuer_create)

    p = sub.add_parser("issue", help="issue an X.509-SVID offline from the issuer in DIR")
    p.add_argument("--dir", required=True)
    p.add_argument("--spiffe-id", type=_spiffe_id, required=True)
    p.add_argument("--cert-out", required=True, help="leaf then issuer, PEM")
    p.add_argument("--key-out", required=True, help="PKCS#8 PEM, written 0600")
    p.add_argument("--ttl", type=_duration, default=LEAF_TTL, help="default 24h")
    p.add_argument("--dns", action="append", default=[], metavar="NAME", help="a DNS SAN (repeatable)")
    p.add_argument("--key-type", type=_key_type, default=KeyType.EC_P256)
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.add_argument("--passphrase-file", help="passphrase of the issuer key (and of the written key)")
    _add_json(p)
    p.set_defaults(func=cmd_issue)

    p = sub.add_parser("bundle", help="print the trust bundle of DIR")
    p.add_argument("--dir", required=True)
    p.add_argument("--format", choices=["pem", "spiffe"], default="pem")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("verify", help="verify an X.509-SVID chain against a bundle")
    p.add_argument("--bundle", required=True, help="PEM or SPIFFE JSON bundle")
    p.add_argument("chain", metavar="CHAIN_FILE", help="leaf first, PEM or DER")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--spiffe-id", type=_spiffe_id, help="require exactly this ID")
    group.add_argument("--trust-domain", type=_trust_domain, help="require a member of this trust domain")
    _add_json(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="describe a certificate, chain, CSR or bundle")
    p.add_argument("file", metavar="FILE")
    _add_json(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("check", help="check the anchors and issuer in DIR")
    p.add_argument("--dir", required=True)
    p.add_argument("--leaf-ttl", type=_duration, default=LEAF_TTL, help="leaf lifetime to check room for (default 24h)")
    p.add_argument("--passphrase-file", help="passphrase of the issuer key")
    _add_json(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("serve", help="run the identity service")
    p.add_argument("--dir", default="meshca-data", help="trust domain directory (default ./meshca-data)")
    p.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default=TrustDomain("cluster.local"),
        help="trust domain of the development CA made when DIR is empty (default cluster.local)",
    )
    p.add_argument("--listen", default="0.0.0.0:8443", help="gRPC address (default 0.0.0.0:8443)")
    p.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9090",
        help="Prometheus /metrics, /livez, /readyz address (default 127.0.0.1:9090; '' for none)",
    )
    p.add_argument("--leaf-ttl", type=_duration, default=LEAF_TTL, help="default leaf lifetime (default 24h)")
    p.add_argument(
        "--max-leaf-ttl",
        type=_duration,
        default=timedelta(days=90),
        help="longest lifetime a caller may ask for (default 90d)",
    )
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS SAN of the server's own certificate (repeatable; default localhost)",
    )
    p.add_argument("--insecure-plaintext", action="store_true", help="serve without TLS (local experiments only)")
    p.add_argument("--linkerd-namespace", default="linkerd", help="Linkerd control-plane namespace (default linkerd)")
    p.add_argument("--k8s-jwks", help="JWKS file of the cluster's service-account issuer")
    p.add_argument("--k8s-issuer", help="expected 'iss' of service-account tokens")
    p.add_argument(
        "--k8s-audience",
        action="append",
        default=[],
        metavar="AUD",
        help="accepted audience (repeatable; identity.l5d.io and istio-ca are accepted on their APIs)",
    )
    p.add_argument("--k8s-api", help="Kubernetes API URL for TokenReview")
    p.add_argument("--k8s-api-ca", help="CA bundle of the Kubernetes API")
    p.add_argument("--k8s-api-token-file", help="bearer token meshca presents to the Kubernetes API")
    p.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        metavar="PER_SECOND",
        help="per-principal request rate limit (default off)",
    )
    p.add_argument("--passphrase-file", help="passphrase of the issuer key")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="serving processes sharing the port (default: the number of cores)",
    )
    p.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="join tokens").add_subparsers(
        dest="subcommand", required=True, metavar="ACTION"
    )
    p = token.add_parser("create", help="create a join token bound to one SPIFFE ID; prints it once")
    p.add_argument("--dir", required=True)
    p.add_argument("--spiffe-id", type=_spiffe_id, required=True)
    p.add_argument("--ttl", type=_duration, default=timedelta(hours=1), help="default 1h")
    p.add_argument("--uses", type=int, default=1, help="how many issuances it pays for (default 1)")
    _add_json(p)
    p.set_defaults(func=cmd_token_create)

    p = sub.add_parser("log", help="read the issuance log")
    p.add_argument("--dir", required=True)
    p.add_argument("--spiffe-id", type=_spiffe_id)
    p.add_argument("--limit", type=int)
    _add_json(p)
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("fetch", help="get an SVID from meshca serve and write it to files (optionally keep it fresh)")
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.add_argument("--bundle", required=True, help="PEM bundle to trust the server with")
    p.add_argument("--spiffe-id", type=_spiffe_id, required=True)
    cred = p.add_mutually_exclusive_group(required=True)
    cred.add_argument("--token", help="join token")
    cred.add_argument("--token-file", help="file holding a join token")
    cred.add_argument("--jwt-file", help="service-account JWT file, re-read on every attempt")
    p.add_argument("--out-dir", required=True, help="writes svid.pem, svid.key (0600) and bundle.pem")
    p.add_argument("--watch", action="store_true", help="keep the files fresh until SIGTERM")
    p.add_argument("--exec", metavar="COMMAND", help="run COMMAND after every change (e.g. 'nginx -s reload')")
    p.add_argument("--exec-timeout", type=_duration, default=timedelta(seconds=30))
    p.add_argument("--server-name", help="expected DNS name of the server's certificate (default: from --server)")
    p.add_argument("--timeout", type=_duration, default=timedelta(seconds=60), help="wait this long for the first SVID")
    p.set_defaults(func=cmd_fetch)

    return parser


def main(argv: Sequence[str] | None = None, *, clock: Clock = system_clock) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args, clock)
    except CliError as exc:
        print(f"meshca: error: {exc}", file=sys.stderr)
        return exc.code
    except (MeshcaError, ValueError) as exc:
        print(f"meshca: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"meshca: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
