"""The native API (meshca.identity.v1): IssueSVID with each credential kind, over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry
from support.calls import code_of, native_request, pb, proof_message
from support.certs import cert, csr_der, p256, serial_hex, spiffe_csr, uris
from support.ids import API, TD, WEB
from support.serving import Harness, serving
from support.tokens import K8sIssuer, k8s_config

import meshca
from meshca.pki._proof import SvidProof, sign_svid_proof
from meshca.server import SqliteStore, StoreMetrics, store_path
from meshca.testing import TestCA

DER = Encoding.DER


def _chain(response: pb.IssueSVIDResponse) -> list[bytes]:
    return [response.leaf, *response.intermediates]


async def test_join_token_issues_an_svid_that_verifies(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        _, csr = spiffe_csr(WEB)
        response = await h.native.IssueSVID(native_request(csr, join_token=h.token()))

        assert response.spiffe_id == str(WEB)
        leaf = cert(response.leaf)
        assert uris(leaf) == [str(WEB)]
        assert response.intermediates == [server_ca.issuer_certificate.public_bytes(DER)]
        assert meshca.verify_chain(_chain(response), server_ca.bundle, at=h.clock()) == WEB
        assert response.valid_until.ToDatetime(tzinfo=leaf.not_valid_after_utc.tzinfo) == leaf.not_valid_after_utc
        # the default lifetime, plus the backdating for clock skew
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert timedelta(hours=24) <= lifetime <= timedelta(hours=24, minutes=10)
        assert response.bundle.trust_domain == TD
        assert list(response.bundle.anchors) == [server_ca.anchor.public_bytes(DER)]
        assert response.bundle.sequence == 1
        [record] = h.issued()
        assert (record.serial, record.spiffe_id, record.api) == (serial_hex(leaf), str(WEB), "native")


async def test_requested_ttl_is_honoured(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        _, csr = spiffe_csr(WEB)
        response = await h.native.IssueSVID(native_request(csr, join_token=h.token(), ttl=timedelta(hours=1)))
        leaf = cert(response.leaf)
        assert leaf.not_valid_after_utc - h.clock() <= timedelta(hours=1)
        assert leaf.not_valid_after_utc - h.clock() > timedelta(minutes=59)


async def test_jwt_credential(d: Path, server_ca: TestCA, k8s: K8sIssuer) -> None:
    async with serving(d, server_ca, k8s_jwt=k8s_config(k8s, d.parent)) as h:
        _, csr = spiffe_csr(API)
        response = await h.native.IssueSVID(native_request(csr, jwt_token=k8s.token("default", "api")))
        assert response.spiffe_id == str(API)
        assert uris(cert(response.leaf)) == [str(API)]
        [record] = h.issued()
        assert record.principal == "k8s:default:api"


async def _first_svid(h: Harness) -> tuple[object, tuple[bytes, ...]]:
    key, csr = spiffe_csr(WEB)
    response = await h.native.IssueSVID(native_request(csr, join_token=h.token()))
    return key, tuple(_chain(response))


async def test_svid_proof_renews_the_same_id(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        old_key, chain = await _first_svid(h)
        for _ in range(2):  # a renewed SVID renews again
            new_key, csr = spiffe_csr(WEB)
            proof = sign_svid_proof(chain, old_key, csr, h.clock())
            response = await h.native.IssueSVID(native_request(csr, proof=proof_message(proof)))
            assert response.spiffe_id == str(WEB)
            assert cert(response.leaf).public_key() == new_key.public_key()
            old_key, chain = new_key, tuple(_chain(response))
        assert [r.principal for r in h.issued()][1:] == [f"svid:{WEB}"] * 2


@dataclass(frozen=True)
class Held:
    """What a workload holds after its first SVID, for building proofs: its key and chain, a fresh CSR, the time."""

    key: Any
    chain: tuple[bytes, ...]
    csr: bytes
    now: datetime


def _rogue_proof(held: Held) -> SvidProof:
    rogue = TestCA(TD).issue_svid(WEB)  # same ID, another anchor
    return sign_svid_proof(tuple(c.public_bytes(DER) for c in rogue.chain), rogue.key, held.csr, held.now)


U, P = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
API_CSR = spiffe_csr(API)[1]
# id -> (the proof, the request it is sent with, the status)
PROOF_REFUSALS: dict[str, tuple[Callable[[Held], SvidProof], Callable[[Held], Any], grpc.StatusCode]] = {
    "stale-signed-at": (
        lambda p: sign_svid_proof(p.chain, p.key, p.csr, p.now - timedelta(minutes=6)),
        lambda p: native_request(p.csr),
        U,
    ),
    "signed-at-in-the-future": (
        lambda p: sign_svid_proof(p.chain, p.key, p.csr, p.now + timedelta(minutes=6)),
        lambda p: native_request(p.csr),
        U,
    ),
    "wrong-key": (lambda p: sign_svid_proof(p.chain, p256(), p.csr, p.now), lambda p: native_request(p.csr), U),
    "bound-to-another-csr": (
        lambda p: sign_svid_proof(p.chain, p.key, spiffe_csr(WEB)[1], p.now),
        lambda p: native_request(p.csr),
        U,
    ),
    "chain-from-another-anchor": (_rogue_proof, lambda p: native_request(p.csr), U),
    "no-chain": (lambda p: sign_svid_proof((), p.key, p.csr, p.now), lambda p: native_request(p.csr), U),
    # A valid proof of WEB does not buy another ID: the credential is good, the identity is not its own.
    "csr-for-another-id": (
        lambda p: sign_svid_proof(p.chain, p.key, API_CSR, p.now),
        lambda p: native_request(API_CSR),
        P,
    ),
    "request-names-another-id": (
        lambda p: sign_svid_proof(p.chain, p.key, p.csr, p.now),
        lambda p: native_request(p.csr, spiffe_id=str(API)),
        P,
    ),
}


@pytest.mark.parametrize("case", PROOF_REFUSALS)
async def test_svid_proof_refusals(case: str, d: Path, server_ca: TestCA) -> None:
    make_proof, make_request, status = PROOF_REFUSALS[case]
    async with serving(d, server_ca) as h:
        key, chain = await _first_svid(h)
        held = Held(key, chain, spiffe_csr(WEB)[1], h.clock())
        request = make_request(held)
        request.credential.svid.CopyFrom(proof_message(make_proof(held)))
        assert await code_of(h.native.IssueSVID(request)) == status
        assert len(h.issued()) == 1
        reasons = [e["reason"] for e in h.events("auth.failed")]
        assert reasons == (["svid_proof"] if status == U else [])


async def test_csr_without_names_gets_the_granted_id(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        csr = csr_der(p256())
        response = await h.native.IssueSVID(native_request(csr, join_token=h.token()))
        assert uris(cert(response.leaf)) == [str(WEB)]


async def test_a_one_use_token_pays_for_one_certificate_under_concurrency(d: Path, server_ca: TestCA) -> None:
    """Every racer passes the up-front check; the use is taken in the transaction that records the issuance."""
    server_ca.write(d)
    registry = CollectorRegistry()
    store = SqliteStore(store_path(meshca.TrustDir.at(d)), metrics=StoreMetrics(registry))
    async with serving(d, server_ca, write=False, store=store) as h:
        token = h.token(uses=1)

        def committed() -> float:  # records that reached the transaction, taken or refused
            return registry.get_sample_value("meshca_store_batch_records_sum") or 0.0

        before = committed()
        calls = [h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=token)) for _ in range(8)]
        codes = await asyncio.gather(*(code_of(c) for c in calls))
        assert sorted(c.name for c in codes) == ["OK"] + ["UNAUTHENTICATED"] * 7
        assert len(h.issued()) == 1
        # The race was run: more than one racer got past the up-front check to the transaction.
        assert committed() - before > 1


async def test_svid_proof_with_an_expired_svid(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        key, csr = spiffe_csr(WEB)
        response = await h.native.IssueSVID(native_request(csr, join_token=h.token(), ttl=timedelta(seconds=30)))
        h.clock.advance(timedelta(minutes=1))
        _, renewal = spiffe_csr(WEB)
        proof = sign_svid_proof(tuple(_chain(response)), key, renewal, h.clock())
        code = await code_of(h.native.IssueSVID(native_request(renewal, proof=proof_message(proof))))
        assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_join_token_is_stripped_of_surrounding_whitespace_as_a_bearer_token_is(
    d: Path, server_ca: TestCA
) -> None:
    async with serving(d, server_ca) as h:
        token = h.token(uses=2)
        response = await h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=f" {token}\n"))
        assert response.spiffe_id == str(WEB)
        response = await h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], jwt_token=f"\t{token} "))
        assert response.spiffe_id == str(WEB)
        assert [r.principal for r in h.issued()] == [f"join-token:{meshca.server.hash_token(token)[:12]}"] * 2
