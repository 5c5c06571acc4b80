"""IDs under spiffe://TD/meshca/ are meshca's own: no credential on any API obtains one."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from support.calls import bearer, ipb, lpb, native_request, proof_message
from support.certs import linkerd_csr, spiffe_csr, to_pem
from support.ids import LINKERD_WEB, TD
from support.serving import serving

import meshca
from meshca.pki._proof import sign_svid_proof
from meshca.server.credentials import Bearer, Presented, Principal
from meshca.testing import TestCA

C = grpc.StatusCode
SELF = meshca.SpiffeId.parse(f"spiffe://{TD}/meshca/identity")
AGENT = meshca.SpiffeId.parse(f"spiffe://{TD}/meshca/agent/node-1")


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


@pytest.mark.parametrize("reserved", [SELF, AGENT], ids=["identity", "agent"])
async def test_a_stored_join_token_for_a_reserved_id_yields_nothing(
    d: Path, server_ca: TestCA, reserved: meshca.SpiffeId
) -> None:
    async with serving(d, server_ca) as h:
        token = h.token(reserved, uses=3)
        refused = await _refused(h.native.IssueSVID(native_request(spiffe_csr(reserved)[1], join_token=token)))
        assert refused.code() == C.PERMISSION_DENIED
        assert refused.details() == f"{reserved} is reserved for meshca's own components"
        refused = await _refused(
            h.istio.CreateCertificate(
                ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(reserved)[1])), metadata=bearer(token)
            )
        )
        assert refused.code() == C.PERMISSION_DENIED
        certify = lpb.CertifyRequest(
            identity=LINKERD_WEB, token=token.encode(), certificate_signing_request=linkerd_csr()[1]
        )
        refused = await _refused(h.linkerd.Certify(certify))
        assert refused.code() == C.PERMISSION_DENIED  # not Linkerd's FAILED_PRECONDITION: no identity mismatch here
        assert h.issued() == []
        assert h.server.store.get_token(meshca.server.hash_token(token)).uses_left == 3
        assert [e["code"] for e in h.events("request.refused")] == ["PERMISSION_DENIED"] * 3


async def test_the_server_svid_is_no_renewal_credential(d: Path, server_ca: TestCA) -> None:
    """Someone holding the service's own key still cannot get a certificate for its ID from the API."""
    async with serving(d, server_ca) as h:
        serving_svid = h.server.state.serving_svid(("localhost",), timedelta(hours=1))
        chain = tuple(c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(serving_svid.chain_pem))
        key = load_pem_private_key(serving_svid.key_pem, None)
        _, csr = spiffe_csr(SELF)
        proof = sign_svid_proof(chain, key, csr, h.clock())  # type: ignore[arg-type]
        refused = await _refused(h.native.IssueSVID(native_request(csr, proof=proof_message(proof))))
        assert refused.code() == C.PERMISSION_DENIED
        assert "reserved for meshca's own components" in (refused.details() or "")
        assert h.issued() == []


class _Careless:
    """A credential kind that forgets the reserved-ID rule: the pipeline still refuses."""

    async def principal(self, presented: Presented) -> Principal | None:
        if isinstance(presented, Bearer) and presented.token == "careless":
            return Principal("careless", "careless", SELF)
        return None


async def test_the_pipeline_refuses_a_reserved_id_whatever_the_credential(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        pipeline = h.server.pipeline
        pipeline.credentials = (_Careless(), *pipeline.credentials)
        request = ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(SELF)[1]))
        refused = await _refused(h.istio.CreateCertificate(request, metadata=bearer("careless")))
        assert refused.code() == C.PERMISSION_DENIED
        assert h.issued() == []
