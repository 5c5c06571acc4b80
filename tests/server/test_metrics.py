"""The Prometheus endpoint: request, latency, issuance, failure and expiry series; /livez and /readyz."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from support.calls import bearer, code_of, ipb, lpb, native_request
from support.certs import linkerd_csr, spiffe_csr, to_pem
from support.ids import API, LINKERD_WEB, TD, WEB
from support.metrics import http_get, sample_value, samples
from support.poll import eventually
from support.serving import serving
from support.tokens import K8sIssuer, k8s_config

from meshca.server import new_token
from meshca.testing import TestCA

NATIVE = {"service": "meshca.identity.v1.Identity", "method": "IssueSVID"}
LINKERD = {"service": "io.linkerd.proxy.identity.Identity", "method": "Certify"}
ISTIO = {"service": "istio.v1.auth.IstioCertificateService", "method": "CreateCertificate"}


async def test_metrics_after_traffic(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent), metrics_listen="127.0.0.1:0") as h:
        await h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=h.token()))
        await code_of(h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=new_token())))
        await code_of(h.native.IssueSVID(native_request(b"garbage", join_token=h.token())))
        token = k8s.token(aud="identity.l5d.io").encode()
        await h.linkerd.Certify(
            lpb.CertifyRequest(identity=LINKERD_WEB, token=token, certificate_signing_request=linkerd_csr()[1])
        )
        jwt = k8s.token("default", "api", aud="istio-ca")
        await h.istio.CreateCertificate(
            ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(API)[1])), metadata=bearer(jwt)
        )
        await code_of(h.istio.CreateCertificate(ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(API)[1]))))

        text = await h.scrape()
        requests = "meshca_requests_total"
        assert sample_value(text, requests, **NATIVE, code="OK") == 1
        assert sample_value(text, requests, **NATIVE, code="UNAUTHENTICATED") == 1
        assert sample_value(text, requests, **NATIVE, code="INVALID_ARGUMENT") == 1
        assert sample_value(text, requests, **LINKERD, code="OK") == 1
        assert sample_value(text, requests, **ISTIO, code="OK") == 1
        assert sample_value(text, requests, **ISTIO, code="UNAUTHENTICATED") == 1

        assert sample_value(text, "meshca_request_duration_seconds_count", **NATIVE) == 3
        assert sample_value(text, "meshca_request_duration_seconds_count", **ISTIO) == 2
        buckets = [ls for n, ls, _ in samples(text) if n == "meshca_request_duration_seconds_bucket"]
        assert {"le", "service", "method"} <= set(buckets[0])
        assert (sample_value(text, "meshca_request_duration_seconds_sum", **NATIVE) or 0) > 0

        for api in ("native", "linkerd", "istio"):
            assert sample_value(text, "meshca_svids_issued_total", trust_domain=TD, api=api) == 1, api
        assert sample_value(text, "meshca_authentication_failures_total", reason="unknown_token") == 1
        assert sample_value(text, "meshca_authentication_failures_total", reason="missing") == 1

        issuer_not_after = server_ca.issuer_certificate.not_valid_after_utc.timestamp()
        issuer_fingerprint = server_ca.issuer_certificate.fingerprint(hashes.SHA256()).hex(":")[:23]
        [issuer_series] = [ls for n, ls, _ in samples(text) if n == "meshca_issuer_expiry_timestamp_seconds"]
        assert issuer_series == {"fingerprint": issuer_fingerprint, "state": "active"}
        expiry = "meshca_issuer_expiry_timestamp_seconds"
        assert sample_value(text, expiry, fingerprint=issuer_fingerprint, state="active") == issuer_not_after
        assert sample_value(text, "meshca_next_rotation_timestamp_seconds") is None  # file mode: nothing scheduled
        fingerprint = server_ca.anchor.fingerprint(hashes.SHA256()).hex(":")[:23]
        anchor_not_after = server_ca.anchor.not_valid_after_utc.timestamp()
        assert sample_value(text, "meshca_anchor_expiry_timestamp_seconds", fingerprint=fingerprint) == anchor_not_after
        assert sample_value(text, "meshca_issuer_usable") == 1


async def test_anchor_expiry_follows_the_bundle(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca, metrics_listen="127.0.0.1:0") as h:
        extra = TestCA(TD).anchor
        (d / "bundle.pem").write_bytes(server_ca.bundle.to_pem() + extra.public_bytes(Encoding.PEM))
        await eventually(lambda: h.server.state.sequence == 2, what="the bundle reload")
        series = [v for n, _, v in samples(await h.scrape()) if n == "meshca_anchor_expiry_timestamp_seconds"]
        assert sorted(series) == sorted(a.not_valid_after_utc.timestamp() for a in (server_ca.anchor, extra))


async def test_probes(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca, metrics_listen="127.0.0.1:0") as h:
        port = h.server.metrics_port
        assert port
        assert await asyncio.to_thread(http_get, port, "/livez") == (200, "ok\n")
        assert await asyncio.to_thread(http_get, port, "/readyz") == (200, "ok\n")
        assert (await asyncio.to_thread(http_get, port, "/nothing"))[0] == 404


async def test_issuer_usable_from_the_start(d: Path, server_ca: TestCA) -> None:
    """Before the first reload poll, the gauge already says what /readyz says."""
    async with serving(d, server_ca, metrics_listen="127.0.0.1:0", reload_interval=timedelta(hours=1)) as h:
        assert sample_value(await h.scrape(), "meshca_issuer_usable") == 1
        assert await asyncio.to_thread(http_get, h.server.metrics_port, "/readyz") == (200, "ok\n")
