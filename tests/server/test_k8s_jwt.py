"""Kubernetes service-account JWTs verified offline against a JWKS file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest
from support.calls import bearer, code_of, ipb, lpb, native_request
from support.certs import cert, linkerd_csr, spiffe_csr, to_pem, uris
from support.ids import LINKERD_WEB, TD, WEB
from support.serving import serving
from support.tokens import K8sIssuer

import meshca
from meshca.server import K8sJwtConfig, service_account_id
from meshca.testing import TestCA

C = grpc.StatusCode


def _jwks(path: Path, *issuers: K8sIssuer) -> Path:
    path.write_text(json.dumps({"keys": [k for i in issuers for k in i.jwks()["keys"]]}))
    return path


async def test_rsa_and_ec_keys_map_to_the_service_account_id(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, k8s_rsa: K8sIssuer
) -> None:
    ec_issuer, rsa_issuer = K8sIssuer(k8s.key, kid="ec"), K8sIssuer(k8s_rsa.key, kid="rsa")
    config = K8sJwtConfig(_jwks(d.parent / "jwks.json", ec_issuer, rsa_issuer), k8s.issuer)
    async with serving(d, server_ca, k8s_jwt=config) as h:
        for issuer, ns, sa in ((ec_issuer, "kube-system", "coredns"), (rsa_issuer, "payments", "ledger")):
            expected = meshca.SpiffeId.parse(f"spiffe://{TD}/ns/{ns}/sa/{sa}")
            _, csr = spiffe_csr(expected)
            token = issuer.token(ns, sa)
            assert issuer.alg in {"ES256", "RS256"}
            response = await h.native.IssueSVID(native_request(csr, jwt_token=token))
            assert uris(cert(response.leaf)) == [str(expected)]


async def test_default_audience_of_each_api(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    config = K8sJwtConfig(k8s.write_jwks(d.parent / "jwks.json"), k8s.issuer)
    async with serving(d, server_ca, k8s_jwt=config) as h:

        def native(aud: str) -> object:
            return h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=k8s.token(aud=aud)))

        def linkerd(aud: str) -> object:
            request = lpb.CertifyRequest(
                identity=LINKERD_WEB, token=k8s.token(aud=aud).encode(), certificate_signing_request=linkerd_csr()[1]
            )
            return h.linkerd.Certify(request)

        def istio(aud: str) -> object:
            request = ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(WEB)[1]))
            return h.istio.CreateCertificate(request, metadata=bearer(k8s.token(aud=aud)))

        expected = {
            (native, "meshca"): C.OK,
            (native, "identity.l5d.io"): C.UNAUTHENTICATED,
            (native, "istio-ca"): C.UNAUTHENTICATED,
            (linkerd, "identity.l5d.io"): C.OK,
            (linkerd, "istio-ca"): C.UNAUTHENTICATED,
            (linkerd, "meshca"): C.UNAUTHENTICATED,
            (istio, "istio-ca"): C.OK,
            (istio, "identity.l5d.io"): C.UNAUTHENTICATED,
            (istio, "kubernetes"): C.UNAUTHENTICATED,
        }
        got = {key: await code_of(key[0](key[1])) for key in expected}  # type: ignore[arg-type]
        assert got == expected
        assert {e["reason"] for e in h.events("auth.failed")} == {"jwt_audience"}


async def test_configured_audience_is_accepted_on_every_api(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    config = K8sJwtConfig(k8s.write_jwks(d.parent / "jwks.json"), k8s.issuer, ("meshca.example",))
    async with serving(d, server_ca, k8s_jwt=config) as h:
        token = k8s.token(aud=["something-else", "meshca.example"])
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=token))) == C.OK
        linkerd = lpb.CertifyRequest(
            identity=LINKERD_WEB, token=token.encode(), certificate_signing_request=linkerd_csr()[1]
        )
        assert await code_of(h.linkerd.Certify(linkerd)) == C.OK
        istio = ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(WEB)[1]))
        assert await code_of(h.istio.CreateCertificate(istio, metadata=bearer(token))) == C.OK


async def test_jwks_is_reread_when_the_cluster_rotates_its_key(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    jwks = k8s.write_jwks(d.parent / "jwks.json")
    async with serving(d, server_ca, k8s_jwt=K8sJwtConfig(jwks, k8s.issuer)) as h:
        old_token = k8s.token()
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr()[1], jwt_token=old_token))) == C.OK

        rotated = K8sIssuer.make("ec")
        rotated.kid = "k2"
        tmp = jwks.with_suffix(".tmp")
        rotated.write_jwks(tmp)
        os.replace(tmp, jwks)
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr()[1], jwt_token=rotated.token()))) == C.OK
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr()[1], jwt_token=old_token))) == (
            C.UNAUTHENTICATED
        )

        # A broken JWKS file keeps the last good key set.
        jwks.write_text("{not json")
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr()[1], jwt_token=rotated.token()))) == C.OK


@pytest.mark.parametrize(
    "subject",
    [
        "system:serviceaccount:default",
        "system:serviceaccount::web",
        "system:serviceaccount:default:",
        "system:node:worker-1",
        "serviceaccount:default:web",
        "system:serviceaccount:default:web:extra",
        "system:serviceaccount:default:we b",
    ],
)
def test_subjects_that_are_not_service_accounts(subject: str) -> None:
    with pytest.raises(meshca.AuthenticationError):
        service_account_id(meshca.TrustDomain(TD), subject)


def test_service_account_id() -> None:
    assert service_account_id(meshca.TrustDomain(TD), "system:serviceaccount:default:web") == WEB
