"""`meshca serve`: the identity service. Defaults are `ServerConfig`'s, so they are stated once."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import timedelta
from pathlib import Path

from meshca.cli._options import (
    CliError,
    add_dir,
    add_duration,
    add_leaf_ttl,
    add_passphrase_file,
    add_store,
    add_trust_domain,
    store_url,
)
from meshca.cli._options import passphrase as read_passphrase
from meshca.pki._lifecycle import check_issuer_ttl
from meshca.pki._spiffe import TrustDomain
from meshca.pki._time import Clock, format_duration
from meshca.pki._trustdir import TrustDir
from meshca.server import IdentityServer, K8sJwtConfig, ServerConfig, TokenReviewConfig, run_supervisor
from meshca.server._config import ISSUER_TTL
from meshca.server._logging import configure_logging
from meshca.server._state import check_anchor, validate

DEFAULT_DIR = "meshca-data"  # the zero-config directory: created, with a development CA, when absent
DEV_TRUST_DOMAIN = TrustDomain("cluster.local")
DEFAULTS = ServerConfig(dir=Path(DEFAULT_DIR))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the identity service")
    add_dir(
        p,
        f"trust domain directory (default ./{DEFAULT_DIR}, created with a development CA when absent; "
        "another DIR must exist, or pass --create)",
        required=False,
    )
    add_store(p)
    p.add_argument(
        "--create",
        action="store_true",
        help="create DIR with a DEVELOPMENT trust domain when it does not exist (a missing DIR is an error otherwise)",
    )
    add_trust_domain(
        p,
        f"trust domain of the development CA made in a new or empty DIR (default {DEV_TRUST_DOMAIN})",
        default=DEV_TRUST_DOMAIN,
    )
    p.add_argument(
        "--listen", default=DEFAULTS.listen, metavar="HOST:PORT", help=f"gRPC address (default {DEFAULTS.listen})"
    )
    p.add_argument(
        "--metrics-listen",
        default=DEFAULTS.metrics_listen,
        metavar="HOST:PORT",
        help=f"Prometheus /metrics, /livez, /readyz address (default {DEFAULTS.metrics_listen}; '' for none)",
    )
    add_leaf_ttl(p, "default leaf lifetime", DEFAULTS.leaf_ttl)
    add_duration(p, "--max-leaf-ttl", DEFAULTS.max_leaf_ttl, "longest lifetime a caller may ask for")
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help=f"DNS SAN of the server's own certificate (repeatable; default {', '.join(DEFAULTS.server_names)})",
    )
    p.add_argument("--insecure-plaintext", action="store_true", help="serve without TLS (local experiments only)")
    p.add_argument(
        "--linkerd-namespace",
        default=DEFAULTS.linkerd_namespace,
        metavar="NS",
        help=f"Linkerd control-plane namespace (default {DEFAULTS.linkerd_namespace})",
    )
    p.add_argument("--k8s-jwks", metavar="FILE", help="JWKS file of the cluster's service-account issuer")
    p.add_argument("--k8s-issuer", metavar="ISS", help="expected 'iss' of service-account tokens")
    p.add_argument(
        "--k8s-audience",
        action="append",
        default=[],
        metavar="AUD",
        help="accepted audience (repeatable; identity.l5d.io and istio-ca are accepted on their APIs)",
    )
    p.add_argument("--k8s-api", metavar="URL", help="Kubernetes API URL for TokenReview")
    p.add_argument("--k8s-api-ca", metavar="FILE", help="CA bundle of the Kubernetes API")
    p.add_argument("--k8s-api-token-file", metavar="FILE", help="bearer token meshca presents to the Kubernetes API")
    p.add_argument(
        "--rate-limit",
        type=float,
        default=DEFAULTS.rate_limit,
        metavar="PER_SECOND",
        help="per-principal request rate limit (default off)",
    )
    p.add_argument(
        "--max-watch-streams",
        type=int,
        default=DEFAULTS.max_watch_streams,
        metavar="N",
        help=f"open WatchBundle streams per serving process; more are refused (default {DEFAULTS.max_watch_streams})",
    )
    p.add_argument(
        "--max-watch-streams-per-peer",
        type=int,
        default=DEFAULTS.max_watch_streams_per_peer,
        metavar="N",
        help="open WatchBundle streams one client IP address may keep, per serving process "
        f"(default {DEFAULTS.max_watch_streams_per_peer})",
    )
    p.add_argument(
        "--manage-issuers",
        action="store_true",
        help="mint and rotate issuers from DIR/trust-anchor.crt and its key (or key URI) held by this service; "
        "issuer keys stay in memory (see README, Managed issuers)",
    )
    add_duration(
        p,
        "--issuer-ttl",
        None,
        f"lifetime of each managed issuer, with --manage-issuers (default {format_duration(ISSUER_TTL)})",
    )
    add_duration(
        p,
        "--issuer-warn",
        None,
        "file mode: log issuer.expiring this long before the issuer expires "
        "(default a third of its lifetime, at most 14 days)",
    )
    add_passphrase_file(p)
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="serving processes sharing the port (default: the number of cores)",
    )
    p.set_defaults(func=run)


def server_config(args: argparse.Namespace, directory: Path) -> ServerConfig:
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
    if args.issuer_ttl is not None and not args.manage_issuers:
        raise CliError("--issuer-ttl goes with --manage-issuers", 2)
    issuer_ttl = (args.issuer_ttl or ISSUER_TTL) if args.manage_issuers else None
    if issuer_ttl is not None:
        try:
            check_issuer_ttl(issuer_ttl, args.leaf_ttl)
        except ValueError as exc:
            raise CliError(f"--issuer-ttl {format_duration(issuer_ttl)}: {exc}", 2) from None
    if args.issuer_warn is not None and args.issuer_warn <= timedelta():
        raise CliError("--issuer-warn must be positive", 2)
    return ServerConfig(
        dir=directory,
        store=store_url(args),
        listen=args.listen,
        metrics_listen=args.metrics_listen or None,
        leaf_ttl=args.leaf_ttl,
        max_leaf_ttl=args.max_leaf_ttl,
        server_names=tuple(args.server_name) or DEFAULTS.server_names,
        insecure_plaintext=args.insecure_plaintext,
        linkerd_namespace=args.linkerd_namespace,
        k8s_jwt=k8s_jwt,
        token_review=token_review,
        rate_limit=args.rate_limit,
        max_watch_streams=args.max_watch_streams,
        max_watch_streams_per_peer=args.max_watch_streams_per_peer,
        passphrase=read_passphrase(args),
        issuer_ttl=issuer_ttl,
        issuer_warn=args.issuer_warn,
    )


def run(args: argparse.Namespace, clock: Clock) -> int:
    if args.workers < 1:
        raise CliError("--workers must be at least 1", 2)
    tdir = TrustDir.at(args.dir or DEFAULT_DIR)
    config = server_config(args, tdir.path)
    configure_logging()
    if tdir.path.exists():
        tdir.check_private()  # before a development CA is written into it
    made = _prepare(tdir, args, clock)
    tdir.check_private()  # one line naming the path others could write, before any banner
    log_key = tdir.ensure_log_key(config.passphrase)  # signs the issuance log's checkpoints
    if tdir.dev_marker.exists():
        _dev_banner(tdir, config, made)
    elif config.issuer_ttl is None and tdir.anchor_key.exists():
        print(
            f"meshca: warning: the trust anchor's private key {tdir.anchor_key.resolve()} sits beside the issuer "
            "in the serving directory; move it offline (see README, The identity service)",
            file=sys.stderr,
        )
    if config.insecure_plaintext:
        print(
            "meshca: WARNING: --insecure-plaintext: CSRs, certificates and credentials (join tokens, JWTs) "
            "cross the network in the clear",
            file=sys.stderr,
        )

    if args.workers > 1:
        # Check the trust directory here, so a bad one fails once, in one line.
        if config.issuer_ttl is None:
            validate(tdir.load_issuer(passphrase=config.passphrase), clock)
        else:
            check_anchor(tdir, config.passphrase)
        if run_supervisor(config, args.workers, clock=clock, log_key=log_key):
            raise CliError("a worker could not start; its worker.failed log line says why")
        return 0

    async def serve() -> None:
        server = IdentityServer(config, clock=clock, log_key=log_key)
        await server.serve_until_signal()

    asyncio.run(serve())
    return 0


def _prepare(tdir: TrustDir, args: argparse.Namespace, clock: Clock) -> str | None:
    """Makes the development CA when DIR is new or empty; returns what was done, None when DIR was ready.

    A DIR that does not exist is created only in the zero-config default or with
    --create: a typo in --dir must not start a fresh CA.
    """
    existed = tdir.path.exists()
    if existed and any(tdir.path.iterdir()):
        return None
    if not existed and args.dir is not None and not args.create:
        raise CliError(
            f"{tdir.path} does not exist: run 'meshca init --dir {tdir.path} ...' for a real trust domain, "
            "or pass --create for a development one"
        )
    tdir.init(args.trust_domain, now=clock(), passphrase=read_passphrase(args))
    tdir.mark_development()
    return "was empty" if existed else "did not exist"


def _dev_banner(tdir: TrustDir, config: ServerConfig, made: str | None) -> None:
    where = tdir.path.resolve()
    trust_domain = tdir.load_bundle().trust_domain
    first = f"{where} {made}: created" if made else f"serving from {where}"
    example = trust_domain.spiffe_id("/ns/default/sa/web")
    bar = "!" * 78
    lines = [
        f"meshca: {first} a DEVELOPMENT trust domain {trust_domain}",
        "its trust anchor key is on this disk: not for production (run 'meshca init' and keep the anchor offline)",
        f"keep {tdir.path.name}/ out of version control",
        f"clients trust {tdir.bundle.resolve()} and reach server name {config.server_names[0]} on {config.listen}",
        f"next: meshca token create --dir {where} --spiffe-id {example}",
    ]
    print("\n".join([bar, *(f"! {line}" for line in lines), bar]), file=sys.stderr)
