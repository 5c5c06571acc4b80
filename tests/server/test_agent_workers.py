"""The Agent API under `meshca serve --workers N`: each worker holds and publishes a JWT key of its own."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import grpc
import jwt
from support.agents import Agent
from support.calls import native_request
from support.certs import spiffe_csr
from support.poll import eventually_sync
from support.procs import ServeProcess
from support.tokens import add_token

import meshca
from meshca._proto import meshca_agent_pb2 as apb
from meshca._proto import meshca_agent_pb2_grpc, meshca_identity_pb2_grpc
from meshca.server import SqliteStore


def test_each_worker_publishes_its_jwt_key_and_sync_returns_them_all(d: Path) -> None:
    td = meshca.TrustDomain("example.org")
    meshca.TrustDir.at(d).init(td, now=meshca.system_clock())
    with ServeProcess(d, "--workers", "2") as proc:
        port, _ = proc.wait_workers(2, 30)
        store = SqliteStore.reader(d / "meshca.db")
        try:
            eventually_sync(
                lambda: len({k.writer for k in store.jwt_keys(datetime.now(UTC))}) == 2, 15, "a key from each worker"
            )
            published = {k.kid for k in store.jwt_keys(datetime.now(UTC))}
        finally:
            store.close()
        agent_id = td.agent_id("node-1")
        token = add_token(d, agent_id, agent=True)
        bundle = (d / "bundle.pem").read_bytes()
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(bundle)) as channel:
            key, csr = spiffe_csr(agent_id)
            answer = meshca_identity_pb2_grpc.IdentityStub(channel).IssueSVID(
                native_request(csr, join_token=token), timeout=20
            )
            agent = Agent(agent_id, (answer.leaf, *answer.intermediates), key)
            sync = meshca_agent_pb2_grpc.AgentStub(channel).Sync(
                agent.prove(apb.SyncRequest(), "Sync", datetime.now(UTC)), timeout=20
            )
        keys = json.loads(sync.jwt_keys)["keys"]
        assert {k["kid"] for k in keys} == published
        assert all(k["use"] == "jwt-svid" for k in keys)
        assert {k.key_id for k in jwt.PyJWKSet.from_dict(json.loads(sync.jwt_keys)).keys} == published
        assert proc.terminate() == 0
