"""`meshca inspect`: describe a certificate, chain, CSR or bundle file."""

from __future__ import annotations

import argparse
import base64
import json
from typing import Any

from cryptography import x509

from meshca.cli._options import CliError, add_json, emit, read
from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import load_certificates, spiffe_ids_of
from meshca.pki._csr import load_csr
from meshca.pki._inspect import describe_certificate, describe_csr
from meshca.pki._spiffe import TrustDomain
from meshca.pki._time import Clock

_HEADINGS = {"trust-anchor": "Certificate (trust anchor)", "issuer": "Certificate (issuer)", "leaf": "Certificate"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="describe a certificate, chain, CSR or bundle")
    p.add_argument("file", metavar="FILE", help="PEM or DER certificate, chain or CSR, or a SPIFFE JSON bundle")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, clock: Clock) -> int:
    items = _describe_any(read(args.file))
    emit(args, items, "\n".join(_format_item(i) for i in items))
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
    lines = ["CSR" if item["type"] == "csr" else _HEADINGS[item["role"]]]
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
