"""Leaves from each API pass `openssl verify` and parse as X.509-SVIDs in py-spiffe."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support.calls import bearer, ipb, lpb, native_request
from support.certs import linkerd_csr, spiffe_csr, to_pem
from support.ids import API, LINKERD_WEB, WEB
from support.serving import serving
from support.tokens import K8sIssuer, k8s_config

import meshca
from meshca.pki._certs import certificates_pem
from meshca.testing import TestCA


def openssl_verify(
    tmp: Path, chain: list[x509.Certificate], anchor: x509.Certificate
) -> subprocess.CompletedProcess[str]:
    (tmp / "anchor.pem").write_bytes(anchor.public_bytes(Encoding.PEM))
    (tmp / "untrusted.pem").write_bytes(certificates_pem(chain[1:]))
    (tmp / "leaf.pem").write_bytes(chain[0].public_bytes(Encoding.PEM))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(tmp / "anchor.pem"),
            "-untrusted",
            str(tmp / "untrusted.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def _issue_each(d: Path, ca: TestCA, k8s: K8sIssuer) -> dict[str, tuple[str, list[x509.Certificate], bytes]]:
    """api -> (SPIFFE ID, chain leaf first, PKCS#8 key PEM)."""
    out = {}
    async with serving(d, ca, k8s_jwt=k8s_config(k8s, d.parent)) as h:
        key, csr = spiffe_csr(WEB)
        r = await h.native.IssueSVID(native_request(csr, join_token=h.token()))
        out["native"] = (str(WEB), [x509.load_der_x509_certificate(c) for c in (r.leaf, *r.intermediates)], key)

        key, csr = linkerd_csr(LINKERD_WEB)
        token = k8s.token("default", "web", aud="identity.l5d.io").encode()
        lr = await h.linkerd.Certify(
            lpb.CertifyRequest(identity=LINKERD_WEB, token=token, certificate_signing_request=csr)
        )
        ders = (lr.leaf_certificate, *lr.intermediate_certificates)
        out["linkerd"] = (str(WEB), [x509.load_der_x509_certificate(c) for c in ders], key)

        key, csr = spiffe_csr(API)
        ir = await h.istio.CreateCertificate(
            ipb.IstioCertificateRequest(csr=to_pem(csr)), metadata=bearer(k8s.token("default", "api", aud="istio-ca"))
        )
        out["istio"] = (str(API), [x509.load_pem_x509_certificate(c.encode()) for c in ir.cert_chain[:-1]], key)
    return {api: (sid, chain, meshca.private_key_pem(key)) for api, (sid, chain, key) in out.items()}


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory, server_ca: TestCA, k8s: K8sIssuer) -> dict[str, tuple]:
    d = tmp_path_factory.mktemp("interop") / "trust"
    d.mkdir()
    return asyncio.run(_issue_each(d, server_ca, k8s))


@pytest.mark.parametrize("api", ["native", "linkerd", "istio"])
def test_openssl_verifies_the_chain(api: str, issued: dict[str, tuple], server_ca: TestCA, tmp_path: Path) -> None:
    _, chain, _ = issued[api]
    assert len(chain) == 2
    result = openssl_verify(tmp_path, chain, server_ca.anchor)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


@pytest.mark.parametrize("api", ["native", "linkerd", "istio"])
def test_openssl_refuses_the_chain_under_another_anchor(api: str, issued: dict[str, tuple], tmp_path: Path) -> None:
    _, chain, _ = issued[api]
    result = openssl_verify(tmp_path, chain, TestCA("example.org").anchor)
    assert result.returncode != 0


@pytest.mark.parametrize("api", ["native", "linkerd", "istio"])
def test_py_spiffe_parses_the_svid(api: str, issued: dict[str, tuple]) -> None:
    sid, chain, key_pem = issued[api]
    svid = spiffe.X509Svid.parse(certificates_pem(chain), key_pem)
    assert str(svid.spiffe_id) == sid
    assert svid.leaf == chain[0]
    assert len(svid.cert_chain) == 2
