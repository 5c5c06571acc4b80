"""No token, key or PEM in any log event, on success or refusal, on any API."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from support.calls import bearer, code_of, ipb, lpb, native_request, proof_message
from support.certs import flip_last_byte, linkerd_csr, spiffe_csr, to_pem
from support.ids import LINKERD_WEB, WEB
from support.kubeapi import FakeApiServer, review_token
from support.serving import serving
from support.tokens import K8sIssuer, k8s_config

from meshca.pki._proof import sign_svid_proof
from meshca.server import hash_token, new_token
from meshca.testing import TestCA

FORBIDDEN = ("BEGIN", "PRIVATE", "mtok_")


def assert_clean(logs: list[dict[str, object]], secrets: list[str]) -> None:
    assert logs, "nothing was logged"
    for event in logs:
        text = repr(event)
        for marker in FORBIDDEN:
            assert marker not in text, event
        for secret in secrets:
            assert secret not in text, event


async def test_no_secret_in_any_event(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent), rate_limit=100, rate_burst=100) as h:
        join = h.token(WEB, uses=2)
        jwts = [k8s.token(aud=aud) for aud in ("meshca", "identity.l5d.io", "istio-ca", "wrong")]
        unknown = new_token()

        key, csr = spiffe_csr(WEB)
        first = await h.native.IssueSVID(native_request(csr, join_token=join))
        await h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=jwts[0]))
        await h.linkerd.Certify(
            lpb.CertifyRequest(
                identity=LINKERD_WEB, token=jwts[1].encode(), certificate_signing_request=linkerd_csr()[1]
            )
        )
        await h.istio.CreateCertificate(
            ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(WEB)[1])), metadata=bearer(join)
        )
        await h.istio.CreateCertificate(
            ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(WEB)[1])), metadata=bearer(jwts[2])
        )
        _, renewal = spiffe_csr(WEB)
        proof = sign_svid_proof((first.leaf, *first.intermediates), key, renewal, h.clock())
        await h.native.IssueSVID(native_request(renewal, proof=proof_message(proof)))
        stale = sign_svid_proof((first.leaf, *first.intermediates), key, renewal, h.clock() - timedelta(hours=1))
        refusals = [
            h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=unknown)),
            h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=join)),  # a third use of a two-use token
            h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=jwts[3])),
            h.native.IssueSVID(native_request(flip_last_byte(spiffe_csr(WEB)[1]), jwt_token=jwts[0])),
            h.native.IssueSVID(native_request(renewal, proof=proof_message(stale))),
            h.istio.CreateCertificate(ipb.IstioCertificateRequest(csr=to_pem(csr)), metadata=bearer("x" + jwts[2])),
            h.linkerd.Certify(
                lpb.CertifyRequest(identity=LINKERD_WEB, token=unknown.encode(), certificate_signing_request=csr)
            ),
        ]
        for call in refusals:
            await code_of(call)

        assert len(h.events("svid.issued")) == 6
        assert len(h.events("auth.failed")) + len(h.events("request.refused")) == len(refusals)
        secrets = [join, unknown, hash_token(join), hash_token(unknown)]
        secrets += jwts + [j.split(".")[2] for j in jwts]
        assert_clean(h.logs, secrets)
        # the join token is named by a short hash prefix, enough to correlate with the store
        principals = {e["principal"] for e in h.events("svid.issued")}
        assert f"join-token:{hash_token(join)[:12]}" in principals


async def test_no_secret_with_tokenreview(
    d: Path, server_ca: TestCA, k8s: K8sIssuer, api_server: FakeApiServer
) -> None:
    async with serving(d, server_ca, token_review=api_server.config()) as h:
        good = review_token(api_server, k8s, "web", ["meshca"])
        refused = k8s.token(aud="meshca")
        await h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=good))
        await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=refused)))
        assert len(h.events("auth.failed")) == 1
        assert_clean(h.logs, [good, refused, good.split(".")[2], refused.split(".")[2], "meshca-reviewer-token"])
