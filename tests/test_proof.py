"""pki/_proof.py: one proof construction, two contexts that never stand in for each other."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from support.certs import looping_chain

from meshca import AuthenticationError, SpiffeId
from meshca._proto import meshca_agent_pb2 as apb
from meshca.pki._proof import (
    SvidProof,
    agent_proof_body,
    sign_agent_proof,
    sign_svid_proof,
    verify_agent_proof,
    verify_svid_proof,
)
from meshca.pki._verify import MAX_CHAIN
from meshca.testing import FrozenClock, TestCA

AGENT = SpiffeId.parse("spiffe://example.org/meshca/agent/n1")
SYNC = "/meshca.agent.v1.Agent/Sync"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


def _held(ca: TestCA) -> tuple[tuple[bytes, ...], object]:
    svid = ca.issue_svid(AGENT)
    return tuple(c.public_bytes(Encoding.DER) for c in svid.chain), svid.key


def test_an_agent_proof_verifies_for_its_method_and_body_only(ca: TestCA) -> None:
    chain, key = _held(ca)
    now = FrozenClock(ca.now + timedelta(minutes=1))()
    proof = sign_agent_proof(chain, key, SYNC, b"body", now)  # type: ignore[arg-type]
    assert verify_agent_proof(proof, SYNC, b"body", ca.bundle, now=now) == AGENT
    for method, body in ((SYNC, b"other"), ("/meshca.agent.v1.Agent/NewJWTSVID", b"body")):
        with pytest.raises(AuthenticationError, match="agent proof signature does not verify") as caught:
            verify_agent_proof(proof, method, body, ca.bundle, now=now)
        assert caught.value.reason == "agent_proof"
    with pytest.raises(AuthenticationError, match="stale"):
        verify_agent_proof(proof, SYNC, b"body", ca.bundle, now=now + timedelta(minutes=5, seconds=1))


def test_a_renewal_proof_is_no_agent_proof_and_the_other_way_round(ca: TestCA) -> None:
    chain, key = _held(ca)
    now = ca.now + timedelta(minutes=1)
    renewal = sign_svid_proof(chain, key, b"csr", now)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_agent_proof(renewal, "", b"csr", ca.bundle, now=now)
    agent = sign_agent_proof(chain, key, "", b"csr", now)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_svid_proof(agent, b"csr", ca.bundle, now=now)


def test_the_body_is_the_request_without_its_proof_deterministically() -> None:
    request = apb.NewJWTSVIDRequest(entry_id="e", audience=["b", "a"])
    body = agent_proof_body(request)
    request.proof.signature = b"sig"
    request.proof.chain.append(b"leaf")
    assert agent_proof_body(request) == body
    assert request.proof.signature == b"sig"  # the request itself is left alone
    assert apb.NewJWTSVIDRequest.FromString(body) == apb.NewJWTSVIDRequest(entry_id="e", audience=["b", "a"])


_loop_keys: dict[bytes, Any] = {}


def _loop_proof(ca: TestCA, copies: int, **kwargs: bool) -> tuple[SvidProof, datetime]:
    now = ca.now + timedelta(minutes=1)
    chain, key = looping_chain("spiffe://example.org/meshca/agent/n1", copies, now, **kwargs)
    _loop_keys[chain[0]] = key
    return sign_agent_proof(tuple(chain), key, SYNC, b"body", now), now


def test_a_chain_of_copies_of_one_key_is_refused_before_any_path_is_searched(ca: TestCA) -> None:
    """Four CA certificates of one name and key, each an issuer of every other: the verifier's path search
    took 50 s over them (3 s for three, 220 s for five), on the server's event loop, for a caller with no
    credential at all."""
    proof, now = _loop_proof(ca, 4)
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="the same public key") as caught:
        verify_agent_proof(proof, SYNC, b"body", ca.bundle, now=now)
    assert caught.value.reason == "agent_proof"
    assert time.monotonic() - started < 5
    renewal = sign_svid_proof(proof.chain, _loop_keys[proof.chain[0]], b"csr", now)
    with pytest.raises(AuthenticationError, match="the same public key") as caught:
        verify_svid_proof(renewal, b"csr", ca.bundle, now=now)
    assert caught.value.reason == "svid_proof"


def test_a_chain_of_distinct_keys_is_searched_in_linear_time(ca: TestCA) -> None:
    proof, now = _loop_proof(ca, 7, distinct_keys=True)
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_agent_proof(proof, SYNC, b"body", ca.bundle, now=now)
    assert time.monotonic() - started < 5


def test_a_chain_longer_than_the_limit_is_refused(ca: TestCA) -> None:
    proof, now = _loop_proof(ca, MAX_CHAIN, distinct_keys=True)
    with pytest.raises(AuthenticationError, match=f"{MAX_CHAIN + 1} certificates, at most {MAX_CHAIN}"):
        verify_svid_proof(proof, b"body", ca.bundle, now=now)
