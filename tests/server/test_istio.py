"""The Istio-compatible service (istio.v1.auth.IstioCertificateService/CreateCertificate)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
from cryptography import x509
from support.calls import bearer, code_of, ipb
from support.certs import spiffe_csr, to_pem, uris
from support.ids import API
from support.serving import serving
from support.tokens import K8sIssuer, k8s_config

import meshca
from meshca.testing import TestCA


async def test_create_certificate_returns_leaf_issuer_root(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent)) as h:
        key, csr = spiffe_csr(API)
        token = k8s.token("default", "api", aud="istio-ca")
        response = await h.istio.CreateCertificate(
            ipb.IstioCertificateRequest(csr=to_pem(csr), validity_duration=3600), metadata=bearer(token)
        )
        leaf, issuer, root = (x509.load_pem_x509_certificate(c.encode()) for c in response.cert_chain)
        assert uris(leaf) == [str(API)]
        assert leaf.public_key() == key.public_key()
        assert issuer == server_ca.issuer_certificate
        assert root == server_ca.anchor
        assert meshca.verify_chain([leaf, issuer], server_ca.bundle, at=h.clock()) == API
        assert timedelta(minutes=59) < leaf.not_valid_after_utc - h.clock() <= timedelta(hours=1)
        [record] = h.issued()
        assert (record.api, record.principal) == ("istio", "k8s:default:api")


async def test_identity_comes_from_the_credential_not_the_csr(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent)) as h:
        _, named_other = spiffe_csr("spiffe://example.org/ns/default/sa/web")
        token = k8s.token("default", "api", aud="istio-ca")
        request = ipb.IstioCertificateRequest(csr=to_pem(named_other))
        assert await code_of(h.istio.CreateCertificate(request, metadata=bearer(token))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )


async def test_validity_above_the_maximum_is_refused(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent), max_leaf_ttl=timedelta(hours=48)) as h:
        _, csr = spiffe_csr(API)
        token = k8s.token("default", "api", aud="istio-ca")
        too_long = int(timedelta(hours=48, seconds=1).total_seconds())
        request = ipb.IstioCertificateRequest(csr=to_pem(csr), validity_duration=too_long)
        assert await code_of(h.istio.CreateCertificate(request, metadata=bearer(token))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        at_max = ipb.IstioCertificateRequest(csr=to_pem(csr), validity_duration=too_long - 1)
        assert await code_of(h.istio.CreateCertificate(at_max, metadata=bearer(token))) == grpc.StatusCode.OK
