"""Fuzz targets: every parser an unauthenticated caller reaches, from raw bytes.

The invariant of each target: the input yields a value or a `MeshcaError`
(a clean refusal the service turns into a status), never another exception.
`scripts/fuzz.sh` runs them under atheris; `tests/test_fuzz_targets.py`
replays the seed corpora and every crash found so far on every test run.
Inputs that carry several fields use one framing: fields separated by the
byte string ``SEP`` (a chain, a CSR, a signature, ...).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
from service import Aborted, FuzzService  # fuzz/service.py

from meshca import InvalidSpiffeId, MeshcaError, SpiffeId, TrustBundle, TrustDomain, check_csr
from meshca.pki._proof import SvidProof, verify_svid_proof
from meshca.server import linkerd_identity_to_spiffe_id
from meshca.server.credentials import K8sJwtCredential
from meshca.testing import FrozenClock

HERE = Path(__file__).resolve().parent
SEP = b"\n--meshca-fuzz--\n"
TRUST_DOMAIN = TrustDomain("example.org")
GRANTED = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
# The seed CA (fuzz/fixtures/bundle.pem) was minted by fuzz/make_seeds.py; proofs are checked at its time.
AT = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _fixture_bundle() -> TrustBundle:
    return TrustBundle.from_pem((HERE / "fixtures" / "bundle.pem").read_bytes(), TRUST_DOMAIN)


def spiffe_id(data: bytes) -> None:
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        parsed = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert SpiffeId.parse(str(parsed)) == parsed, "a parsed ID must survive its own text form"


def csr(data: bytes) -> None:
    check_csr(data, GRANTED, allowed_dns=("web.default.svc",))


def bundle_pem(data: bytes) -> None:
    bundle = TrustBundle.from_pem(data, TRUST_DOMAIN)
    assert TrustBundle.from_pem(bundle.to_pem(), TRUST_DOMAIN).anchors == bundle.anchors


def bundle_json(data: bytes) -> None:
    bundle = TrustBundle.from_spiffe_json(data, TRUST_DOMAIN)
    assert TrustBundle.from_spiffe_json(bundle.to_spiffe_json(), TRUST_DOMAIN).anchors == bundle.anchors


_BUNDLE: list[TrustBundle] = []


def proof(data: bytes) -> None:
    """``chain DER (leaf first, SEP between) SEP csr SEP signature``: a renewal credential."""
    parts = data.split(SEP)
    if len(parts) < 3:
        raise _Skip
    *chain, csr_der, signature = parts
    if not _BUNDLE:
        _BUNDLE.append(_fixture_bundle())
    verify_svid_proof(SvidProof(tuple(chain), signature, AT), csr_der, _BUNDLE[0], now=AT)


_SERVICE: list[FuzzService] = []  # built once per process, on first use: it is slow to make


def _service() -> FuzzService:
    if not _SERVICE:
        _SERVICE.append(FuzzService(FrozenClock(AT)))
    return _SERVICE[0]


def _api(method: str, body: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    try:
        _service().call(method, body, metadata)
    except Aborted as refused:
        assert refused.code != grpc.StatusCode.INTERNAL, f"INTERNAL for a request: {refused}"


def native(data: bytes) -> None:
    """A serialized ``meshca.identity.v1.IssueSVIDRequest``."""
    _api("/meshca.identity.v1.Identity/IssueSVID", data)


def linkerd(data: bytes) -> None:
    """A serialized ``io.linkerd.proxy.identity.CertifyRequest``."""
    _api("/io.linkerd.proxy.identity.Identity/Certify", data)


def istio(data: bytes) -> None:
    """``IstioCertificateRequest bytes SEP authorization header value``."""
    body, _, authorization = data.partition(SEP)
    metadata = (("authorization", authorization.decode("utf-8", errors="replace")),) if authorization else ()
    _api("/istio.v1.auth.IstioCertificateService/CreateCertificate", body, metadata)


def k8s_jwt(data: bytes) -> None:
    """A service-account JWT, as the Linkerd and Istio APIs and the native ``jwt`` field carry it."""
    service = _service()
    credential = K8sJwtCredential(service.server.config.k8s_jwt, TRUST_DOMAIN, service.clock)
    credential.verify(data.decode("utf-8", errors="replace"), ("identity.l5d.io", "istio-ca", "meshca"))


def linkerd_name(data: bytes) -> None:
    """The identity a Linkerd proxy names in its request."""
    linkerd_identity_to_spiffe_id(data.decode("utf-8", errors="replace"), "linkerd", TRUST_DOMAIN)


AGENT_METHODS = ("Sync", "BatchNewX509SVID", "NewJWTSVID")


def agent(data: bytes) -> None:
    """``a method byte``, then a serialized ``meshca.agent.v1`` request of that method (low bits, modulo 3).

    With the byte's 0x80 bit, the request's proof is replaced by a valid one of an agent SVID over the rest,
    so the fuzzer also reaches what a verified (or stolen) agent reaches: entries, CSRs, audiences, lifetimes.
    """
    if not data:
        raise _Skip
    method = AGENT_METHODS[(data[0] & 0x7F) % len(AGENT_METHODS)]
    body = data[1:]
    if data[0] & 0x80:
        body = _service().prove_agent(method, body)  # a body that does not parse is refused there, cleanly
    _api(f"/meshca.agent.v1.Agent/{method}", body)


class _Skip(Exception):
    """An input the target's framing cannot carry: not a finding."""


TARGETS: dict[str, Callable[[bytes], None]] = {
    "spiffe_id": spiffe_id,
    "csr": csr,
    "bundle_pem": bundle_pem,
    "bundle_json": bundle_json,
    "proof": proof,
    "native": native,
    "linkerd": linkerd,
    "istio": istio,
    "k8s_jwt": k8s_jwt,
    "linkerd_name": linkerd_name,
    "agent": agent,
}


def run_one(name: str, data: bytes) -> None:
    """Runs one input through a target; raises only when the invariant breaks."""
    with contextlib.suppress(MeshcaError, _Skip):
        TARGETS[name](data)


def corpus(name: str) -> list[Path]:
    """The seed inputs and the regressions (crashes found, then fixed) of one target."""
    found = []
    for folder in (HERE / "corpus" / name, HERE / "regressions" / name):
        if folder.is_dir():
            found.extend(sorted(p for p in folder.iterdir() if p.is_file()))
    return found


if __name__ == "__main__":  # python fuzz/targets.py NAME FILE...: replay inputs by hand
    for arg in sys.argv[2:]:
        run_one(sys.argv[1], Path(arg).read_bytes())
