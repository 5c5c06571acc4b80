"""`meshca install`: prints the Kubernetes manifests of the identity service, for `kubectl apply -f -`.

Reads DIR/issuer.crt, DIR/issuer.key and DIR/bundle.pem, checks the issuer
can sign now, and never opens DIR/trust-anchor.key; with --manage-issuers it
reads DIR/trust-anchor.crt and DIR/trust-anchor.key instead (the pods mint
their own issuers) and checks an issuer can be minted from them. The objects
themselves are built in `meshca.cli._manifests`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from importlib.metadata import version

from meshca.cli._manifests import GRPC_PORT, NAME, Install, manifests, yaml_stream
from meshca.cli._options import CliError, add_dir, add_duration, read
from meshca.pki._bundle import TrustBundle
from meshca.pki._issuer import Issuer
from meshca.pki._lifecycle import check_issuer_ttl, mint_issuer
from meshca.pki._profiles import LEAF_TTL
from meshca.pki._time import Clock, format_duration
from meshca.pki._trustdir import TrustDir
from meshca.server._config import ISSUER_TTL
from meshca.server._state import load_anchor, validate

__all__ = ["register"]

# RFC 1123, as Kubernetes checks object names
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(rf"{_LABEL.pattern}(\.{_LABEL.pattern})*")


def _name(pattern: re.Pattern[str], limit: int, what: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if len(text) > limit or not pattern.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return text

    convert.__name__ = what
    return convert


dns_label = _name(_LABEL, 63, "a DNS label (lower-case letters, digits and '-', at most 63)")
dns_subdomain = _name(_SUBDOMAIN, 253, "a DNS name (DNS labels joined by '.', at most 253)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "install",
        help="print the Kubernetes manifests of the identity service (pipe into 'kubectl apply -f -')",
    )
    add_dir(p, "trust domain directory whose issuer and bundle the cluster gets (never the trust anchor's key)")
    p.add_argument(
        "--namespace", type=dns_label, default=NAME, metavar="NS", help=f"namespace to install into (default {NAME})"
    )
    p.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="serving pods (default 3 with --store-secret; without it, 1: SQLite cannot be shared)",
    )
    p.add_argument(
        "--store-secret",
        type=dns_subdomain,
        metavar="NAME",
        help="Secret in NS whose key 'url' is the PostgreSQL URL of the shared store (MESHCA_STORE); "
        "without it, one replica on SQLite in a PersistentVolumeClaim",
    )
    p.add_argument(
        "--image",
        default=f"{NAME}:{version('meshca')}",
        metavar="IMAGE",
        help="container image built from the repository's Dockerfile (default %(default)s)",
    )
    p.add_argument(
        "--server-name",
        type=dns_subdomain,
        action="append",
        default=[],
        metavar="NAME",
        help=f"another DNS name for the service's certificate, besides {NAME}.NS.svc[.cluster.local] (repeatable)",
    )
    p.add_argument(
        "--manage-issuers",
        action="store_true",
        help="put the trust anchor (DIR/trust-anchor.crt and .key) in Secret meshca-anchor and run "
        "'meshca serve --manage-issuers': the pods mint and rotate their own issuers (see SECURITY.md)",
    )
    add_duration(
        p,
        "--issuer-ttl",
        None,
        f"lifetime of each managed issuer, with --manage-issuers (default {format_duration(ISSUER_TTL)})",
    )
    p.set_defaults(func=run)


def _managed_files(tdir: TrustDir, install: Install, clock: Clock) -> tuple[bytes, bytes, bytes]:
    """The anchor's certificate and key and the bundle, checked as the pods will use them."""
    if tdir.anchor_key_uri.exists():
        raise CliError(f"{tdir.anchor_key_uri}: a key on a PKCS#11 token cannot go into a Secret")
    if not (tdir.anchor_cert.exists() and tdir.anchor_key.exists()):
        raise CliError(f"{tdir.path} has no trust anchor (trust-anchor.crt and trust-anchor.key) to manage issuers")
    anchor = load_anchor(tdir, None)  # an encrypted key is refused here: the pods have no passphrase
    bundle = tdir.load_bundle()
    if anchor.certificate not in bundle:
        raise CliError(f"{tdir.anchor_cert.name} is not in {tdir.bundle.name}")
    assert install.issuer_ttl is not None
    validate(mint_issuer(anchor.certificate, anchor.key, bundle, now=clock(), ttl=install.issuer_ttl), clock)
    return read(tdir.anchor_cert), read(tdir.anchor_key), read(tdir.bundle)


def run(args: argparse.Namespace, clock: Clock) -> int:
    install = _install(args)
    tdir = TrustDir.at(args.dir)
    if install.issuer_ttl is not None:
        cert, key, bundle = _managed_files(tdir, install, clock)
    else:
        if not (tdir.issuer_cert.exists() and tdir.issuer_key.exists()):
            raise CliError(f"{tdir.path} has no issuer (issuer.crt and issuer.key): run 'meshca init' first")
        cert, key, bundle = read(tdir.issuer_cert), read(tdir.issuer_key), read(tdir.bundle)
        validate(Issuer.from_pem(cert, key, TrustBundle.from_pem(bundle)), clock)  # what the pod would refuse
    header = (
        f"meshca install: trust domain {TrustBundle.from_pem(bundle).trust_domain}, {install.summary}\n"
        f"clients dial {install.server_names[0]}:{GRPC_PORT} and trust ConfigMap {NAME}-bundle (bundle.pem)"
    )
    print(yaml_stream(manifests(install, cert=cert, key=key, bundle=bundle), header))
    if not install.store_secret:
        print(f"meshca: note: {install.summary}", file=sys.stderr)
    if install.issuer_ttl is not None:
        print(
            f"meshca: warning: the trust anchor's key is in Secret {install.secret[0]}: whoever can read Secrets "
            f"in namespace {install.namespace} (or run code in its pods) controls the trust domain",
            file=sys.stderr,
        )
    elif tdir.anchor_key.exists():
        print(
            f"meshca: note: {tdir.anchor_key} is not in the output; keep it offline (see README, The identity service)",
            file=sys.stderr,
        )
    return 0


def _install(args: argparse.Namespace) -> Install:
    replicas = args.replicas if args.replicas is not None else (3 if args.store_secret else 1)
    if replicas < 1:
        raise CliError("--replicas must be at least 1", 2)
    if replicas > 1 and not args.store_secret:
        raise CliError("--replicas above 1 needs --store-secret (PostgreSQL): SQLite cannot be shared", 2)
    if args.namespace == "default" or args.namespace.startswith("kube-"):
        # The output owns its Namespace: `kubectl delete -f` would take the namespace with it.
        raise CliError(f"--namespace {args.namespace}: meshca installs into a namespace of its own", 2)
    if not args.image.strip() or any(c.isspace() for c in args.image):
        raise CliError(f"--image {args.image!r} is not an image reference", 2)
    if args.issuer_ttl is not None and not args.manage_issuers:
        raise CliError("--issuer-ttl goes with --manage-issuers", 2)
    issuer_ttl = (args.issuer_ttl or ISSUER_TTL) if args.manage_issuers else None
    if issuer_ttl is not None:
        try:
            check_issuer_ttl(issuer_ttl, LEAF_TTL)  # the pods serve the default leaf TTL
        except ValueError as exc:
            raise CliError(f"--issuer-ttl {format_duration(issuer_ttl)}: {exc}", 2) from None
    return Install(args.namespace, args.image, replicas, args.store_secret, tuple(args.server_name), issuer_ttl)
