"""The Linkerd-compatible service (io.linkerd.proxy.identity.Identity/Certify), as linkerd2-proxy calls it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from support.calls import code_of, lpb
from support.certs import cert, dns_names, linkerd_csr, uris
from support.ids import LINKERD_WEB, TD, WEB
from support.serving import serving
from support.tokens import K8sIssuer, k8s_config

import meshca
from meshca.server import linkerd_identity_to_spiffe_id
from meshca.testing import TestCA


async def test_certify_issues_the_linkerd_identity_and_spiffe_id(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent)) as h:
        key, csr = linkerd_csr(LINKERD_WEB)
        token = k8s.token("default", "web", aud="identity.l5d.io").encode()
        response = await h.linkerd.Certify(
            lpb.CertifyRequest(identity=LINKERD_WEB, token=token, certificate_signing_request=csr)
        )
        leaf = cert(response.leaf_certificate)
        assert dns_names(leaf) == [LINKERD_WEB]
        assert uris(leaf) == ["spiffe://example.org/ns/default/sa/web"]
        assert leaf.public_key() == key.public_key()
        assert list(response.intermediate_certificates) == [server_ca.issuer_certificate.public_bytes(Encoding.DER)]
        assert response.valid_until.ToDatetime(tzinfo=leaf.not_valid_after_utc.tzinfo) == leaf.not_valid_after_utc
        chain = [response.leaf_certificate, *response.intermediate_certificates]
        assert meshca.verify_chain(chain, server_ca.bundle, at=h.clock()) == WEB
        [record] = h.issued()
        assert (record.api, record.spiffe_id) == ("linkerd", str(WEB))


async def test_certify_with_a_join_token(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        _, csr = linkerd_csr(LINKERD_WEB)
        token = h.token(WEB).encode()
        response = await h.linkerd.Certify(
            lpb.CertifyRequest(identity=LINKERD_WEB, token=token, certificate_signing_request=csr)
        )
        assert dns_names(cert(response.leaf_certificate)) == [LINKERD_WEB]


LINKERD_API = f"api.default.serviceaccount.identity.linkerd.{TD}"


@pytest.mark.parametrize(
    ("token_sa", "csr_identity"),
    [("api", LINKERD_WEB), ("web", LINKERD_API)],
    ids=["token-of-another-service-account", "csr-names-another-identity"],
)
async def test_name_mismatch_is_failed_precondition(
    token_sa: str, csr_identity: str, d: Path, server_ca: TestCA, k8s: K8sIssuer
) -> None:
    """linkerd2-proxy depends on FAILED_PRECONDITION when the token and the identity disagree."""
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent)) as h:
        request = lpb.CertifyRequest(
            identity=LINKERD_WEB,
            token=k8s.token("default", token_sa, aud="identity.l5d.io").encode(),
            certificate_signing_request=linkerd_csr(csr_identity)[1],
        )
        assert await code_of(h.linkerd.Certify(request)) == grpc.StatusCode.FAILED_PRECONDITION
        assert h.issued() == []
        assert len(h.events("request.refused")) == 1


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (f"web.default.serviceaccount.identity.linkerd.{TD}", "spiffe://example.org/ns/default/sa/web"),
        (f"web.kube-system.serviceaccount.identity.linkerd.{TD}", "spiffe://example.org/ns/kube-system/sa/web"),
        # service account names are DNS subdomains and may hold dots; namespaces are labels and may not
        (f"web.v2.payments.serviceaccount.identity.linkerd.{TD}", "spiffe://example.org/ns/payments/sa/web.v2"),
    ],
)
def test_identity_to_spiffe_id(identity: str, expected: str) -> None:
    got = linkerd_identity_to_spiffe_id(identity, "linkerd", meshca.TrustDomain(TD))
    assert got == meshca.SpiffeId.parse(expected)


@pytest.mark.parametrize(
    "identity",
    [
        f"default.serviceaccount.identity.linkerd.{TD}",
        f".default.serviceaccount.identity.linkerd.{TD}",
        f"web..serviceaccount.identity.linkerd.{TD}",
        "web.default.serviceaccount.identity.linkerd.other.org",
        f"web.default.serviceaccount.identity.linkerd2.{TD}",
        f"web.default.serviceaccount.identity.linkerd.{TD}.evil",
        f"web.default.serviceaccount.identity.linkerd.x{TD}",
    ],
)
def test_identity_not_of_this_trust_domain_or_form(identity: str) -> None:
    with pytest.raises(meshca.PermissionDenied):
        linkerd_identity_to_spiffe_id(identity, "linkerd", meshca.TrustDomain(TD))


async def test_service_account_with_a_dot(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    identity = f"web.v2.payments.serviceaccount.identity.linkerd.{TD}"
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent)) as h:
        token = k8s.token("payments", "web.v2", aud="identity.l5d.io").encode()
        response = await h.linkerd.Certify(
            lpb.CertifyRequest(identity=identity, token=token, certificate_signing_request=linkerd_csr(identity)[1])
        )
        leaf = cert(response.leaf_certificate)
        assert uris(leaf) == ["spiffe://example.org/ns/payments/sa/web.v2"]
        assert dns_names(leaf) == [identity]
