"""meshca.agent.v1.Agent against a real in-process server: proofs, Sync, batch issuance, JWT-SVIDs, replicas."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support.agents import Agent, add_entry, agent_stub, enroll, proof_message
from support.calls import native_request
from support.calls import proof_message as svid_proof_message
from support.certs import cert, csr_der, dns_names, looping_chain, p256, spiffe_csr, uris
from support.ids import TD, WEB
from support.metrics import sample_value
from support.procs import meshca_cmd
from support.serving import serving

from meshca import SpiffeId, TrustDomain
from meshca._proto import meshca_agent_pb2 as apb
from meshca.pki._proof import sign_agent_proof, sign_svid_proof
from meshca.server._store import open_store
from meshca.server.api._agent import MAX_BATCH
from meshca.testing import TestCA

C = grpc.StatusCode
DOMAIN = TrustDomain(TD)
NODE_1 = DOMAIN.agent_id("node-1")
NODE_2 = DOMAIN.agent_id("node-2")


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def _jwks(sync: apb.SyncResponse) -> dict[str, jwt.PyJWK]:
    return {k.key_id: k for k in jwt.PyJWKSet.from_json(sync.jwt_keys.decode()).keys}


# -- the agent's own identity


async def test_an_agent_token_grants_the_agent_id_and_a_proof_renews_exactly_it(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        agent = await enroll(h, "node-1")
        assert uris(cert(agent.chain[0])) == [str(NODE_1)]
        _, csr = spiffe_csr(NODE_1)
        proof = sign_svid_proof(agent.chain, agent.key, csr, h.clock())
        renewed = await h.native.IssueSVID(native_request(csr, proof=svid_proof_message(proof)))
        assert renewed.spiffe_id == str(NODE_1)
        # the same proof cannot name another agent, nor the service
        for other in (NODE_2, SpiffeId.parse(f"spiffe://{TD}/meshca/identity")):
            _, csr = spiffe_csr(other)
            proof = sign_svid_proof(agent.chain, agent.key, csr, h.clock())
            refused = await _refused(
                h.native.IssueSVID(native_request(csr, proof=svid_proof_message(proof), spiffe_id=str(other)))
            )
            assert refused.code() == C.PERMISSION_DENIED
        principals = [(r.spiffe_id, r.principal) for r in h.issued()]
        assert principals[0][0] == principals[1][0] == str(NODE_1)
        assert principals[1][1] == f"svid:{NODE_1}"


async def test_an_agent_token_grants_no_other_reserved_id(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        for reserved in (f"spiffe://{TD}/meshca/identity", f"spiffe://{TD}/meshca/agent/a/b", f"spiffe://{TD}/meshca"):
            sid = SpiffeId.parse(reserved)
            token = h.token(sid, agent=True)
            refused = await _refused(h.native.IssueSVID(native_request(spiffe_csr(sid)[1], join_token=token)))
            assert refused.code() == C.PERMISSION_DENIED, reserved
        assert h.issued() == []


@pytest.mark.parametrize("reserved", [str(NODE_2), f"spiffe://{TD}/meshca/identity", "spiffe://other.org/web"])
async def test_an_entry_for_a_reserved_or_foreign_id_in_the_store_gets_no_svid_of_either_kind(
    d: Path, server_ca: TestCA, reserved: str
) -> None:
    async with serving(d, server_ca) as h:
        agent = await enroll(h)
        # new_entry refuses these; a row written by other means must not be served either.
        entry = dataclasses.replace(add_entry(h, "/placeholder"), id="planted", spiffe_id=SpiffeId.parse(reserved))
        h.server.store.add_entry(entry)
        jwt_request = apb.NewJWTSVIDRequest(entry_id="planted", audience=["db"])
        refused = await _refused(agent_stub(h).NewJWTSVID(agent.prove(jwt_request, "NewJWTSVID", h.clock())))
        assert refused.code() == C.PERMISSION_DENIED
        batch = apb.BatchNewX509SVIDRequest(
            requests=[apb.X509SVIDRequest(entry_id="planted", csr=spiffe_csr(entry.spiffe_id)[1])]
        )
        (result,) = (await agent_stub(h).BatchNewX509SVID(agent.prove(batch, "BatchNewX509SVID", h.clock()))).results
        assert result.error_code in (
            C.PERMISSION_DENIED.value[0],
            C.FAILED_PRECONDITION.value[0],
        )  # foreign: the latter
        assert h.events("jwt_svid.issued") == [] and [r for r in h.issued() if r.api == "agent"] == []


# -- proofs


async def _sync(h: Any, agent: Agent, **kwargs: Any) -> apb.SyncResponse:
    return await agent_stub(h).Sync(agent.prove(apb.SyncRequest(), "Sync", h.clock(), **kwargs))


PROOF_REFUSALS: dict[str, tuple[Callable[[Agent, datetime], apb.SyncRequest], grpc.StatusCode, str]] = {
    "missing": (lambda a, now: apb.SyncRequest(), C.UNAUTHENTICATED, "no agent proof"),
    "stale": (
        lambda a, now: a.prove(apb.SyncRequest(), "Sync", now - timedelta(minutes=6)),
        C.UNAUTHENTICATED,
        "agent proof is stale",
    ),
    "from-the-future": (
        lambda a, now: a.prove(apb.SyncRequest(), "Sync", now + timedelta(minutes=6)),
        C.UNAUTHENTICATED,
        "agent proof is stale or from the future",
    ),
    "wrong-method": (
        lambda a, now: a.prove(apb.SyncRequest(), "NewJWTSVID", now),
        C.UNAUTHENTICATED,
        "signature does not verify",
    ),
    "wrong-key": (
        lambda a, now: a.prove(apb.SyncRequest(), "Sync", now, key=p256()),
        C.UNAUTHENTICATED,
        "signature does not verify",
    ),
    "no-chain": (
        lambda a, now: apb.SyncRequest(
            proof=proof_message(sign_agent_proof((), a.key, "/meshca.agent.v1.Agent/Sync", b"", now))
        ),
        C.UNAUTHENTICATED,
        "carries no certificate chain",
    ),
    "chain-from-another-anchor": (
        lambda a, now: Agent(
            a.spiffe_id, tuple(c.public_bytes(Encoding.DER) for c in _rogue().chain), _rogue().key
        ).prove(apb.SyncRequest(), "Sync", now),
        C.UNAUTHENTICATED,
        "chain does not verify",
    ),
}
_ROGUE: list[Any] = []


def _rogue() -> Any:
    if not _ROGUE:
        _ROGUE.append(TestCA(TD).issue_svid(NODE_1))  # same ID, another anchor
    return _ROGUE[0]


@pytest.mark.parametrize("case", PROOF_REFUSALS, ids=list(PROOF_REFUSALS))
async def test_a_proof_that_does_not_hold_is_unauthenticated(d: Path, server_ca: TestCA, case: str) -> None:
    make, code, message = PROOF_REFUSALS[case]
    async with serving(d, server_ca) as h:
        agent = await enroll(h)
        refused = await _refused(agent_stub(h).Sync(make(agent, h.clock())))
        assert refused.code() == code
        assert message in (refused.details() or "")


async def test_a_proof_covers_the_whole_request_body(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        agent = await enroll(h)
        entry = add_entry(h, "/web", parent=NODE_1)
        request = agent.prove(apb.NewJWTSVIDRequest(entry_id=entry.id, audience=["db"]), "NewJWTSVID", h.clock())
        await agent_stub(h).NewJWTSVID(request)
        request.audience.append("another")  # changed after signing
        refused = await _refused(agent_stub(h).NewJWTSVID(request))
        assert refused.code() == C.UNAUTHENTICATED


async def test_a_workload_svid_proof_is_permission_denied(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        key, csr = spiffe_csr(WEB)
        answer = await h.native.IssueSVID(native_request(csr, join_token=h.token(WEB)))
        workload = Agent(WEB, (answer.leaf, *answer.intermediates), key)
        refused = await _refused(_sync(h, workload))
        assert refused.code() == C.PERMISSION_DENIED
        assert refused.details() == f"{WEB} is not a node agent ID (spiffe://TD/meshca/agent/NAME)"


# -- Sync


async def test_sync_gives_the_agents_entries_the_bundle_and_the_jwt_keys(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        agent = await enroll(h, "node-1")
        mine = add_entry(
            h,
            "/web",
            ["unix:uid:1000", "unix:path:/usr/bin/web"],
            parent=NODE_1,
            x509_ttl=timedelta(hours=1),
            jwt_ttl=timedelta(minutes=2),
            dns_names=["web.example.org"],
        )
        anyone = add_entry(h, "/any", ["unix:gid:0"])
        add_entry(h, "/theirs", parent=NODE_2)
        sync = await _sync(h, agent)
        assert [e.id for e in sync.entries] == [mine.id, anyone.id]
        first = sync.entries[0]
        assert (first.spiffe_id, list(first.selectors), first.parent) == (
            f"spiffe://{TD}/web",
            ["unix:path:/usr/bin/web", "unix:uid:1000"],
            str(NODE_1),
        )
        assert (first.x509_ttl.seconds, first.jwt_ttl.seconds, list(first.dns_names)) == (
            3600,
            120,
            ["web.example.org"],
        )
        assert (sync.entries[1].parent, sync.entries[1].x509_ttl.seconds) == ("", 0)
        assert sync.trust_domain == TD
        assert [x509.load_der_x509_certificate(a) for a in sync.x509_anchors] == list(server_ca.bundle.anchors)
        assert sync.x509_sequence == h.server.state.sequence
        doc = json.loads(sync.jwt_keys)
        assert [(k["use"], k["kty"], k["crv"]) for k in doc["keys"]] == [("jwt-svid", "EC", "P-256")]
        assert doc["keys"][0]["kid"]


# -- BatchNewX509SVID


async def test_a_batch_issues_what_it_may_and_refuses_the_rest_one_by_one(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca, metrics_listen="127.0.0.1:0") as h:
        agent = await enroll(h, "node-1")
        web = add_entry(h, "/web", parent=NODE_1, x509_ttl=timedelta(hours=2), dns_names=["web.example.org"])
        anyone = add_entry(h, "/any")
        theirs = add_entry(h, "/theirs", parent=NODE_2)
        web_key = p256()
        requests = [
            apb.X509SVIDRequest(
                entry_id=web.id, csr=csr_der(web_key, uris=[str(web.spiffe_id)], dns=["web.example.org"])
            ),
            apb.X509SVIDRequest(entry_id=theirs.id, csr=spiffe_csr(theirs.spiffe_id)[1]),
            apb.X509SVIDRequest(entry_id=anyone.id, csr=spiffe_csr(web.spiffe_id)[1]),  # names another entry's ID
            apb.X509SVIDRequest(entry_id=anyone.id, csr=b"not a CSR"),
            apb.X509SVIDRequest(entry_id="no-such-entry", csr=spiffe_csr(anyone.spiffe_id)[1]),
            apb.X509SVIDRequest(entry_id=anyone.id, csr=csr_der(p256(), uris=[str(anyone.spiffe_id)], dns=["x.org"])),
            apb.X509SVIDRequest(entry_id=anyone.id, csr=spiffe_csr(anyone.spiffe_id)[1]),
        ]
        request = agent.prove(apb.BatchNewX509SVIDRequest(requests=requests), "BatchNewX509SVID", h.clock())
        answer = await agent_stub(h).BatchNewX509SVID(request)
        codes = [
            C.OK if r.error_code == 0 else next(c for c in C if c.value[0] == r.error_code) for r in answer.results
        ]
        assert [r.entry_id for r in answer.results] == [r.entry_id for r in requests]
        assert codes == [
            C.OK,
            C.PERMISSION_DENIED,
            C.PERMISSION_DENIED,
            C.INVALID_ARGUMENT,
            C.PERMISSION_DENIED,
            C.PERMISSION_DENIED,
            C.OK,
        ]
        assert "is not one this agent may serve" in answer.results[1].error
        assert answer.results[0].error == "" and not answer.results[1].leaf
        leaf = cert(answer.results[0].leaf)
        assert uris(leaf) == [str(web.spiffe_id)] and dns_names(leaf) == ["web.example.org"]
        assert leaf.public_key() == web_key.public_key()
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=2, seconds=60)  # + backdating
        assert answer.results[0].valid_until.ToDatetime(tzinfo=UTC) == leaf.not_valid_after_utc
        assert [x509.load_der_x509_certificate(c) for c in answer.results[0].intermediates] == [
            server_ca.issuer_certificate
        ]
        lifetime = cert(answer.results[6].leaf)
        assert lifetime.not_valid_after_utc - lifetime.not_valid_before_utc == timedelta(hours=24, seconds=60)
        logged = [(r.spiffe_id, r.principal, r.api) for r in h.issued() if r.api == "agent"]
        assert logged == [(str(web.spiffe_id), str(NODE_1), "agent"), (str(anyone.spiffe_id), str(NODE_1), "agent")]
        assert sample_value(await h.scrape(), "meshca_svids_issued_total", api="agent") == 2


async def test_no_svid_but_the_services_own_carries_a_dns_name_the_service_answers_to(
    d: Path, server_ca: TestCA
) -> None:
    """Clients and agents check the service's certificate by its DNS name (gRPC): a workload SVID with that name,
    or a wildcard covering it, would let its holder pose as the identity service and hand out its own bundle."""
    async with serving(d, server_ca, server_names=("localhost", "meshca.example.org")) as h:
        agent = await enroll(h)
        entries = {
            name: add_entry(h, f"/web-{n}", dns_names=[name])
            for n, name in enumerate(["localhost", "meshca.example.org", "*.example.org", "web.example.org"])
        }
        requests = [
            apb.X509SVIDRequest(entry_id=e.id, csr=csr_der(p256(), uris=[str(e.spiffe_id)], dns=[name]))
            for name, e in entries.items()
        ]
        request = agent.prove(apb.BatchNewX509SVIDRequest(requests=requests), "BatchNewX509SVID", h.clock())
        answer = await agent_stub(h).BatchNewX509SVID(request)
        refused = [r.error_code for r in answer.results]
        assert refused == [C.PERMISSION_DENIED.value[0]] * 3 + [0]
        assert "the identity service's own" in answer.results[2].error
        # A CSR without the name still gets the entry's ID.
        bare = apb.X509SVIDRequest(entry_id=entries["localhost"].id, csr=spiffe_csr(entries["localhost"].spiffe_id)[1])
        answer = await agent_stub(h).BatchNewX509SVID(
            agent.prove(apb.BatchNewX509SVIDRequest(requests=[bare]), "BatchNewX509SVID", h.clock())
        )
        assert answer.results[0].error_code == 0 and dns_names(cert(answer.results[0].leaf)) == []


async def test_a_batch_above_the_limit_is_refused_whole(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        agent = await enroll(h)
        entry = add_entry(h, "/web")
        one = apb.X509SVIDRequest(entry_id=entry.id, csr=spiffe_csr(entry.spiffe_id)[1])
        request = agent.prove(
            apb.BatchNewX509SVIDRequest(requests=[one] * (MAX_BATCH + 1)), "BatchNewX509SVID", h.clock()
        )
        refused = await _refused(agent_stub(h).BatchNewX509SVID(request))
        assert refused.code() == C.RESOURCE_EXHAUSTED
        assert h.issued()[-1].api != "agent"


# -- NewJWTSVID


async def test_a_jwt_svid_validates_against_the_synced_jwk_set(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        agent = await enroll(h)
        entry = add_entry(h, "/web", parent=NODE_1)
        short = add_entry(h, "/short", jwt_ttl=timedelta(minutes=1))
        stub = agent_stub(h)

        async def token(entry_id: str, ttl: timedelta | None = None) -> apb.NewJWTSVIDResponse:
            request = apb.NewJWTSVIDRequest(entry_id=entry_id, audience=["db", "cache"])
            if ttl is not None:
                request.ttl.FromTimedelta(ttl)
            return await stub.NewJWTSVID(agent.prove(request, "NewJWTSVID", h.clock()))

        answer = await token(entry.id)
        keys = _jwks(await _sync(h, agent))
        header = jwt.get_unverified_header(answer.token)
        assert (header["alg"], header["typ"]) == ("ES256", "JWT")
        claims = jwt.decode(answer.token, keys[header["kid"]], algorithms=["ES256"], audience="db")
        assert claims["sub"] == str(entry.spiffe_id)
        assert claims["aud"] == ["db", "cache"]
        assert claims["exp"] - claims["iat"] == 300  # 5 minutes by default
        assert answer.expires_at.ToDatetime(tzinfo=UTC).timestamp() == claims["exp"]
        with pytest.raises(jwt.InvalidAudienceError):
            jwt.decode(answer.token, keys[header["kid"]], algorithms=["ES256"], audience="other")
        lifetimes = {}
        for name, entry_id, ttl in (
            ("entry", short.id, None),
            ("asked", entry.id, timedelta(minutes=20)),
            ("capped", entry.id, timedelta(days=1)),
        ):
            claims = jwt.decode((await token(entry_id, ttl)).token, options={"verify_signature": False})
            lifetimes[name] = claims["exp"] - claims["iat"]
        assert lifetimes == {"entry": 60, "asked": 1200, "capped": 3600}


@pytest.mark.parametrize(
    ("audience", "entry_of", "code"),
    [
        ([], "mine", C.INVALID_ARGUMENT),
        ([""], "mine", C.INVALID_ARGUMENT),
        ([" db"], "mine", C.INVALID_ARGUMENT),
        (["db"] * 17, "mine", C.INVALID_ARGUMENT),
        (["db"], "theirs", C.PERMISSION_DENIED),
        (["db"], "none", C.PERMISSION_DENIED),
    ],
)
async def test_a_jwt_svid_request_is_refused_precisely(
    d: Path, server_ca: TestCA, audience: list[str], entry_of: str, code: grpc.StatusCode
) -> None:
    async with serving(d, server_ca) as h:
        agent = await enroll(h)
        ids = {"mine": add_entry(h, "/web", parent=NODE_1).id, "theirs": add_entry(h, "/x", parent=NODE_2).id}
        request = apb.NewJWTSVIDRequest(entry_id=ids.get(entry_of, "none"), audience=audience)
        refused = await _refused(agent_stub(h).NewJWTSVID(agent.prove(request, "NewJWTSVID", h.clock())))
        assert refused.code() == code


async def test_the_spiffe_bundle_of_the_directory_carries_the_published_jwt_keys(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        agent = await enroll(h)
        result = await asyncio.to_thread(meshca_cmd, "bundle", "--dir", d, "--format", "spiffe")
        assert result.code == 0, result
        doc = json.loads(result.stdout)
        assert [k["use"] for k in doc["keys"]] == ["x509-svid", "jwt-svid"]
        assert set(_jwks(await _sync(h, agent))) == {doc["keys"][1]["kid"]}


def test_the_spiffe_bundle_of_a_directory_without_a_store_creates_none(d: Path, server_ca: TestCA) -> None:
    server_ca.write(d)
    result = meshca_cmd("bundle", "--dir", d, "--format", "spiffe")
    assert result.code == 0, result
    assert [k["use"] for k in json.loads(result.stdout)["keys"]] == ["x509-svid"]
    assert not (d / "meshca.db").exists()


# -- replicas


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_replicas_on_one_store_each_publish_their_key_and_validate_each_others_tokens(
    d: Path, server_ca: TestCA, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite://{tmp_path}/shared.db" if backend == "sqlite" else request.getfixturevalue("pg_database")
    async with (
        serving(d, server_ca, store=open_store(url, d)) as first,
        serving(d, server_ca, write=False, store=open_store(url, d)) as second,
    ):
        agent = await enroll(first)
        entry = add_entry(first, "/web")
        tokens = []
        for h in (first, second):
            asked = apb.NewJWTSVIDRequest(entry_id=entry.id, audience=["db"])
            tokens.append((await agent_stub(h).NewJWTSVID(agent.prove(asked, "NewJWTSVID", h.clock()))).token)
        kids = {jwt.get_unverified_header(t)["kid"] for t in tokens}
        assert len(kids) == 2  # one key each
        for h in (first, second):
            keys = _jwks(await _sync(h, agent))
            assert kids <= set(keys)
            for token in tokens:
                assert jwt.decode(
                    token, keys[jwt.get_unverified_header(token)["kid"]], algorithms=["ES256"], audience="db"
                )


# -- malformed input: a clean status, never INTERNAL


def _with_proof(agent: Agent, h: Any, request: Any, method: str, **proof: Any) -> Any:
    agent.prove(request, method, h.clock())
    for name, value in proof.items():
        if name == "signed_at_seconds":
            request.proof.signed_at.seconds = value
        else:
            getattr(request.proof, name)[:] = value
    return request


MALFORMED: dict[str, tuple[Callable[[Any, Agent, str], Any], grpc.StatusCode]] = {
    "signed_at-out-of-range": (
        lambda h, a, e: agent_stub(h).Sync(_with_proof(a, h, apb.SyncRequest(), "Sync", signed_at_seconds=2**62)),
        C.UNAUTHENTICATED,
    ),
    "chain-of-garbage": (
        lambda h, a, e: agent_stub(h).Sync(_with_proof(a, h, apb.SyncRequest(), "Sync", chain=[b"\x30\x03\x02\x01"])),
        C.UNAUTHENTICATED,
    ),
    "chain-of-one-key-copies": (  # the path search over these took the event loop for minutes
        lambda h, a, e: agent_stub(h).Sync(
            _with_proof(a, h, apb.SyncRequest(), "Sync", chain=looping_chain(str(NODE_1), 5, h.clock())[0])
        ),
        C.UNAUTHENTICATED,
    ),
    "body-of-garbage": (
        lambda h, a, e: h.channel.unary_unary("/meshca.agent.v1.Agent/Sync")(b"\xff\xff\xff"),
        C.INVALID_ARGUMENT,
    ),
    "huge-ttl": (
        lambda h, a, e: agent_stub(h).NewJWTSVID(
            a.prove(
                apb.NewJWTSVIDRequest(entry_id=e, audience=["db"], ttl={"seconds": 315_576_000_000}),
                "NewJWTSVID",
                h.clock(),
            )
        ),
        C.OK,  # capped at the maximum
    ),
    "ttl-beyond-duration-range": (  # int64 seconds protobuf carries, that no timedelta holds
        lambda h, a, e: agent_stub(h).NewJWTSVID(
            a.prove(apb.NewJWTSVIDRequest(entry_id=e, audience=["db"], ttl={"seconds": 2**62}), "NewJWTSVID", h.clock())
        ),
        C.INVALID_ARGUMENT,
    ),
    "negative-ttl": (
        lambda h, a, e: agent_stub(h).NewJWTSVID(
            a.prove(apb.NewJWTSVIDRequest(entry_id=e, audience=["db"], ttl={"seconds": -5}), "NewJWTSVID", h.clock())
        ),
        C.INVALID_ARGUMENT,
    ),
    "empty-csr": (
        lambda h, a, e: agent_stub(h).BatchNewX509SVID(
            a.prove(
                apb.BatchNewX509SVIDRequest(requests=[apb.X509SVIDRequest(entry_id=e)]), "BatchNewX509SVID", h.clock()
            )
        ),
        C.OK,  # refused in its result
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
async def test_malformed_agent_requests_get_a_clean_status(d: Path, server_ca: TestCA, case: str) -> None:
    call, code = MALFORMED[case]
    async with serving(d, server_ca) as h:
        agent = await enroll(h)
        entry = add_entry(h, "/web")
        try:
            answer = await call(h, agent, entry.id)
            got = C.OK
        except grpc.aio.AioRpcError as exc:
            got = exc.code()
        assert got == code
        assert h.events("request.failed") == []  # nothing reached the INTERNAL path
        if case == "empty-csr":
            assert (answer.results[0].error_code, answer.results[0].error) == (
                C.INVALID_ARGUMENT.value[0],
                "csr is required",
            )
        if case == "huge-ttl":
            claims = jwt.decode(answer.token, options={"verify_signature": False})
            assert claims["exp"] - claims["iat"] == 3600
