"""Writes the seed corpora and the fixture CA the targets use: python fuzz/make_seeds.py.

Run it again only to change the seeds; the corpora are checked in. The
fixture CA is minted at `targets.AT` (proofs are verified at that time).
"""

from __future__ import annotations

import shutil
from datetime import timedelta

import targets
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca import KeyType, build_csr, generate_key
from meshca.pki._proof import sign_svid_proof
from meshca.testing import TestCA


def main() -> None:
    shutil.rmtree(targets.HERE / "corpus", ignore_errors=True)
    ca = TestCA(targets.TRUST_DOMAIN, now=targets.AT - timedelta(days=1))
    fixtures = targets.HERE / "fixtures"
    fixtures.mkdir(exist_ok=True)
    (fixtures / "bundle.pem").write_bytes(ca.bundle.to_pem())
    granted = targets.GRANTED
    seeds: dict[str, list[bytes]] = {
        "spiffe_id": [
            str(granted).encode(),
            b"spiffe://example.org",
            b"spiffe://a.b-c_d/x/./y",
            b"SPIFFE://example.org/x",
            b"spiffe://example.org/x%41",
            b"spiffe://user@example.org:80/x?q#f",
        ],
        "csr": [],
        "bundle_pem": [ca.bundle.to_pem()],
        "bundle_json": [ca.bundle.to_spiffe_json()],
        "proof": [],
    }
    for key_type in (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048):
        key = generate_key(key_type)
        seeds["csr"].append(build_csr(key, granted))
        seeds["csr"].append(build_csr(key, granted, dns_names=("web.default.svc",)))
    seeds["csr"].append(x509.load_der_x509_csr(build_csr(generate_key(), granted)).public_bytes(Encoding.PEM))
    for key_type in (KeyType.EC_P256, KeyType.RSA_2048):
        svid = ca.issue_svid(granted, key_type=key_type, now=targets.AT - timedelta(hours=1))
        new_csr = build_csr(generate_key(), granted)
        chain = tuple(c.public_bytes(Encoding.DER) for c in svid.chain)
        made = sign_svid_proof(chain, svid.key, new_csr, targets.AT)
        seeds["proof"].append(targets.SEP.join((*made.chain, new_csr, made.signature)))
    _api_seeds(seeds)
    for name, inputs in seeds.items():
        folder = targets.HERE / "corpus" / name
        folder.mkdir(parents=True)
        for i, data in enumerate(inputs):
            (folder / f"seed-{i:02d}").write_bytes(data)
            if name not in ("spiffe_id", "linkerd_name"):
                targets.TARGETS[name](data)  # a valid seed: fuzzing starts from the deep end


def _api_seeds(seeds: dict[str, list[bytes]]) -> None:
    """Requests that succeed against the fuzz service (fuzz/service.py)."""
    from service import JOIN_TOKEN, service_account_jwt

    from meshca._proto import istio_ca_pb2, linkerd_identity_pb2, meshca_identity_pb2

    clock = targets._service().clock
    web = "web.default.serviceaccount.identity.linkerd.example.org"
    seeds["native"] = [
        meshca_identity_pb2.IssueSVIDRequest(
            csr=build_csr(generate_key(), targets.GRANTED), credential={"join_token": JOIN_TOKEN}
        ).SerializeToString(),
        meshca_identity_pb2.IssueSVIDRequest(
            csr=build_csr(generate_key(), targets.GRANTED),
            spiffe_id=str(targets.GRANTED),
            ttl={"seconds": 3600},
            credential={"jwt": service_account_jwt("default", "web", "meshca", clock)},
        ).SerializeToString(),
    ]
    seeds["linkerd"] = [
        linkerd_identity_pb2.CertifyRequest(
            identity=web,
            token=service_account_jwt("default", "web", "identity.l5d.io", clock).encode(),
            certificate_signing_request=build_csr(generate_key(), dns_names=(web,)),
        ).SerializeToString()
    ]
    pem = x509.load_der_x509_csr(build_csr(generate_key(), targets.GRANTED)).public_bytes(Encoding.PEM)
    seeds["istio"] = [
        istio_ca_pb2.IstioCertificateRequest(csr=pem.decode(), validity_duration=3600).SerializeToString()
        + targets.SEP
        + b"Bearer "
        + service_account_jwt("default", "web", "istio-ca", clock).encode()
    ]
    seeds["k8s_jwt"] = [service_account_jwt("default", "web", "istio-ca", clock).encode()]
    seeds["agent"] = _agent_seeds()
    seeds["linkerd_name"] = [web.encode(), b"a.b.serviceaccount.identity.linkerd.example.org", b"x"]


def _agent_seeds() -> list[bytes]:
    """Each Agent API method for the fuzz service's entry: proved by the target (0x80), and with a proof of
    this process's fuzz CA, which another process's does not verify (the proof's parsing and checks)."""
    from service import ENTRY_ID

    from meshca._proto import meshca_agent_pb2 as apb

    csr = build_csr(generate_key(), targets.GRANTED, dns_names=("web.default.svc",))
    requests = [
        apb.SyncRequest(),
        apb.BatchNewX509SVIDRequest(requests=[apb.X509SVIDRequest(entry_id=ENTRY_ID, csr=csr)]),
        apb.NewJWTSVIDRequest(entry_id=ENTRY_ID, audience=["db"], ttl={"seconds": 60}),
    ]
    service = targets._service()
    proved = [
        service.prove_agent(m, r.SerializeToString()) for m, r in zip(targets.AGENT_METHODS, requests, strict=True)
    ]
    return [bytes([0x80 | i]) + r.SerializeToString() for i, r in enumerate(requests)] + [
        bytes([i]) + body for i, body in enumerate(proved)
    ]


if __name__ == "__main__":
    main()
