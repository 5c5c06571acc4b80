"""meshca agent against the real identity service, and py-spiffe's own clients against the agent.

The service runs in-process (support.serving), the agent on the test's loop,
py-spiffe's synchronous clients on threads (asyncio.to_thread) or in
subprocesses that change their uid before they connect.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from spiffe import JwtSource, WorkloadApiClient, X509Source
from spiffe import TrustDomain as SpiffeTrustDomain
from support.agents import NODE_AGENT, add_entry, agent_config, agent_token, wait_held
from support.certs import write_bundle
from support.ids import API, TD, WEB
from support.poll import eventually
from support.serving import serving

import meshca
from meshca._proto import workload_pb2 as wpb
from meshca.agent import NodeAgent
from meshca.testing import TestCA

OTHER_UID = 4242  # an entry gives it API
STRANGER_UID = 4343  # no entry


async def test_py_spiffe_gets_x509_and_jwt_svids_and_follows_rotation(tmp_path: Path, sock_path: Path) -> None:
    async with serving(tmp_path / "ca") as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"], x509_ttl=timedelta(seconds=6))
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            assert agent.own.spiffe_id == NODE_AGENT
            await wait_held(agent, 1)
            endpoint = f"unix://{sock_path}"

            def fetch() -> tuple[str, str, str]:
                with WorkloadApiClient(socket_path=endpoint) as client:
                    svid = client.fetch_x509_svid()
                    jwt = client.fetch_jwt_svid(audience={"payments"})
                    checked = client.validate_jwt_svid(jwt.token, "payments")
                    return str(svid.spiffe_id), str(jwt.spiffe_id), str(checked.spiffe_id)

            assert await asyncio.to_thread(fetch) == (str(WEB),) * 3

            # An X509Source follows renewal: the 6 s leaf is renewed at about half its life.
            source = await asyncio.to_thread(X509Source, socket_path=endpoint, timeout_in_seconds=10)
            try:

                def serial() -> int:
                    return int(source.get_x509_context().default_svid.leaf.serial_number)

                first = serial()
                await eventually(lambda: serial() != first, 15, "the source's SVID renewed")

                # A bundle change: a second anchor published by the service reaches the source with a Sync.
                def anchors() -> int:
                    bundle = source.get_bundle_for_trust_domain(SpiffeTrustDomain(TD))
                    return len(bundle.x509_authorities) if bundle is not None else 0

                assert anchors() == 1
                write_bundle(tmp_path / "ca", h.ca.anchor, TestCA(TD).anchor)
                await eventually(lambda: anchors() == 2, 15, "the source's bundle holding both anchors")
            finally:
                await asyncio.to_thread(source.close)

            jwt_source = await asyncio.to_thread(JwtSource, socket_path=endpoint, timeout_in_seconds=10)
            try:
                svid = await asyncio.to_thread(jwt_source.fetch_svid, {"orders"})
                assert str(svid.spiffe_id) == str(WEB)
                bundle = jwt_source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
                assert bundle is not None and bundle.jwt_authorities
            finally:
                await asyncio.to_thread(jwt_source.close)
        finally:
            await agent.stop()
        assert not sock_path.exists()


async def test_refusals_other_uids_and_missing_metadata(tmp_path: Path, sock_path: Path) -> None:
    async with serving(tmp_path / "ca") as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"])
        add_entry(h, API.path, [f"unix:uid:{OTHER_UID}"])
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            await wait_held(agent, 2)
            async with grpc.aio.insecure_channel(f"unix://{sock_path}") as channel:
                call = channel.unary_stream(
                    "/SpiffeWorkloadAPI/FetchX509SVID",
                    request_serializer=wpb.X509SVIDRequest.SerializeToString,
                    response_deserializer=wpb.X509SVIDResponse.FromString,
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in call(wpb.X509SVIDRequest()):
                        pass
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            if os.geteuid() != 0:
                pytest.skip("another uid needs root to switch to (CI runs as root)")
            assert await asyncio.to_thread(as_uid, OTHER_UID, sock_path) == f"ok {API}"
            assert await asyncio.to_thread(as_uid, STRANGER_UID, sock_path) == "refused PERMISSION_DENIED"
        finally:
            await agent.stop()


CLIENT = textwrap.dedent(
    """
    import os, sys
    import grpc
    from spiffe import WorkloadApiClient
    from spiffe.workloadapi.errors import FetchX509SvidError

    uid, path = int(sys.argv[1]), sys.argv[2]
    # Made as root (this interpreter lives under /root, 0700); the channel connects at the first call.
    client = WorkloadApiClient(socket_path="unix://" + path)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # every thread: the connection below is made as this uid, which the agent sees
    try:
        with client:
            print("ok", client.fetch_x509_svid(timeout=5).spiffe_id)
    except FetchX509SvidError as exc:
        cause = exc.__cause__ or exc.__context__
        print("refused", cause.code().name if isinstance(cause, grpc.RpcError) else exc)
    """
)


def as_uid(uid: int, sock: Path) -> str:
    """py-spiffe in a process that switched to ``uid`` before connecting (its interpreter under /root is root's)."""
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, str(uid), str(sock)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def syncs(agent: NodeAgent, outcome: str) -> float:
    return agent.metrics.registry.get_sample_value("meshca_agent_syncs_total", {"outcome": outcome}) or 0.0


async def test_serves_while_the_service_is_down_catches_up_and_a_restart_recovers_from_the_data_dir(
    tmp_path: Path, sock_path: Path
) -> None:
    endpoint = f"unix://{sock_path}"

    def spiffe_ids() -> set[str]:
        with WorkloadApiClient(socket_path=endpoint) as client:
            return {str(svid.spiffe_id) for svid in client.fetch_x509_svids(timeout=5)}

    async with serving(tmp_path / "ca") as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"])
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        await wait_held(agent, 1)
        ca, port = h.ca, h.port
    try:
        # The service is gone: the agent keeps serving what it holds.
        failed = syncs(agent, "unavailable")
        await eventually(lambda: syncs(agent, "unavailable") > failed, 10, "a failed sync")
        assert await asyncio.to_thread(spiffe_ids) == {str(WEB)}
        # It comes back (same port, same store) with a new entry for this caller: the agent catches up.
        async with serving(tmp_path / "ca", ca, write=False, port=port) as h2:
            add_entry(h2, API.path, [f"unix:gid:{os.getgid()}"])
            await eventually(lambda: len(agent.state.held) == 2, 15, "the new entry's SVID after the outage")
            assert await asyncio.to_thread(spiffe_ids) == {str(WEB), str(API)}
    finally:
        await agent.stop()
    saved = tmp_path / "agent-data" / "agent-svid.pem"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "agent-data").stat().st_mode & 0o777 == 0o700
    # A new agent with no token (the one token was used) recovers from the data dir, against the same service.
    async with serving(tmp_path / "ca", ca, write=False, port=port) as h3:
        restarted = NodeAgent(agent_config(h3, tmp_path, sock_path, None))
        await restarted.start()
        try:
            assert restarted.own.spiffe_id == NODE_AGENT
            await wait_held(restarted, 2)
            assert await asyncio.to_thread(spiffe_ids) == {str(WEB), str(API)}
            # A second agent on the same socket is refused while the first serves; so is a file at the path.
            second = NodeAgent(agent_config(h3, tmp_path, sock_path, None))
            with pytest.raises(meshca.PortTaken, match="served by another agent"):
                await second.start()
            await second.stop()
        finally:
            await restarted.stop()
        sock_path.write_text("not a socket")
        third = NodeAgent(agent_config(h3, tmp_path, sock_path, None))
        with pytest.raises(meshca.UnsafePermissions, match="is not a socket"):
            await third.start()
        await third.stop()
        assert sock_path.read_text() == "not a socket"


# spiffe-tls 0.4 reads X509Source.svid and .bundles (deprecated by spiffe 0.3) and hands pyOpenSSL X509 objects
# and PKey objects (deprecated by pyOpenSSL 26): their warnings, not ours.
@pytest.mark.filterwarnings("ignore:X509Source.(svid|bundles) is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning")
async def test_spiffe_tls_mutual_tls_between_workloads_of_the_agent(tmp_path: Path, sock_path: Path) -> None:
    from OpenSSL import SSL
    from spiffe import SpiffeId as PySpiffeId
    from spiffetls import ListenOptions, dial, listen
    from spiffetls.tlsconfig.authorize import authorize_id

    async with serving(tmp_path / "ca") as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"])
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            await wait_held(agent, 1)

            def exchange(server_accepts: meshca.SpiffeId) -> bytes:
                """One ping over mutual TLS between two py-spiffe workloads (both WEB, this process)."""
                source = X509Source(socket_path=f"unix://{sock_path}", timeout_in_seconds=10)
                accept = ListenOptions(authorize_fn=authorize_id(PySpiffeId(str(server_accepts))))
                server = listen("127.0.0.1:0", source, accept)
                port = server.getsockname()[1]

                def serve_one() -> None:
                    conn, _ = server.accept()
                    try:
                        conn.do_handshake()
                        conn.sendall(b"pong " + conn.recv(64))
                    except SSL.Error:
                        pass  # the client sees the refusal
                    finally:
                        conn.close()

                thread = threading.Thread(target=serve_one)
                thread.start()
                try:
                    conn = dial(f"127.0.0.1:{port}", source, authorize_fn=authorize_id(PySpiffeId(str(WEB))))
                    try:
                        conn.sendall(b"ping")
                        return bytes(conn.recv(64))
                    finally:
                        conn.close()
                finally:
                    thread.join(10)
                    server.close()
                    source.close()

            assert await asyncio.to_thread(exchange, WEB) == b"pong ping"
            # A server that accepts only API refuses this WEB client: the client's read fails.
            with pytest.raises(SSL.Error):
                await asyncio.to_thread(exchange, API)
        finally:
            await agent.stop()


async def test_jwt_svids_are_validated_for_signature_expiry_and_audience(tmp_path: Path, sock_path: Path) -> None:
    from spiffe.workloadapi.errors import ValidateJwtSvidError

    def validated(client: WorkloadApiClient, token: str, audience: str) -> str:
        try:
            return str(client.validate_jwt_svid(token, audience).spiffe_id)
        except ValidateJwtSvidError as exc:
            cause = exc.__cause__
            assert isinstance(cause, grpc.RpcError)
            return f"{cause.code().name}: {cause.details()}"  # type: ignore[attr-defined]

    async with serving(tmp_path / "ca") as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"], jwt_ttl=timedelta(minutes=1))
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)), clock=h.clock)
        await agent.start()
        try:
            await wait_held(agent, 1)

            def check() -> list[str]:
                with WorkloadApiClient(socket_path=f"unix://{sock_path}") as client:
                    token = client.fetch_jwt_svid(audience={"orders"}).token
                    header, payload, signature = token.split(".")
                    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
                    outcomes = [validated(client, token, "orders"), validated(client, token, "billing")]
                    outcomes.append(validated(client, forged, "orders"))
                    h.clock.advance(timedelta(minutes=2))  # the agent's clock too: past the 1-minute token's exp
                    outcomes.append(validated(client, token, "orders"))
                    return outcomes

            valid, other_audience, forged, expired = await asyncio.to_thread(check)
            assert valid == str(WEB)
            assert other_audience == "INVALID_ARGUMENT: invalid JWT-SVID: Audience doesn't match"
            assert forged == "INVALID_ARGUMENT: invalid JWT-SVID: Signature verification failed"
            assert expired == "INVALID_ARGUMENT: invalid JWT-SVID: the token has expired"
        finally:
            await agent.stop()


async def test_workload_svids_renew_at_half_life_on_the_agents_clock(tmp_path: Path, sock_path: Path) -> None:
    async with serving(tmp_path / "ca") as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"], x509_ttl=timedelta(hours=1))
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)), clock=h.clock)
        await agent.start()
        try:
            await wait_held(agent, 1)
            (entry_id,) = agent.state.held

            def serial() -> int:
                return int(agent.state.held[entry_id].svid.leaf.serial_number)

            async def two_more_syncs() -> None:
                start = syncs(agent, "ok")
                await eventually(lambda: syncs(agent, "ok") >= start + 2, 10, "two more syncs")

            first = serial()
            h.clock.advance(timedelta(minutes=20))  # before 50 % +- 10 % of the hour
            await two_more_syncs()  # each tick signs what is due right after its sync
            assert serial() == first
            h.clock.advance(timedelta(minutes=20))  # 40 minutes: past any renewal moment
            await eventually(lambda: serial() != first, 10, "the renewed SVID")
            renewed = agent.state.held[entry_id].svid
            assert renewed.not_after - h.clock() > timedelta(minutes=55)
        finally:
            await agent.stop()


async def test_the_agent_renews_its_own_svid_by_proof_and_saves_each(tmp_path: Path, sock_path: Path) -> None:
    async with serving(tmp_path / "ca", leaf_ttl=timedelta(seconds=6)) as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"])
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            saved = tmp_path / "agent-data" / "agent-svid.pem"

            def saved_serial() -> int:
                return int(x509.load_pem_x509_certificates(saved.read_bytes())[0].serial_number)

            first = saved_serial()
            assert first == agent.own.leaf.serial_number
            await eventually(lambda: saved_serial() != first, 15, "a renewed agent SVID saved")
            assert agent.own.spiffe_id == NODE_AGENT
            agent_records = [r for r in h.issued() if str(r.spiffe_id) == str(NODE_AGENT)]
            assert len(agent_records) >= 2  # the join, then renewals (the token was single-use)
            await wait_held(agent, 1)  # and it still signs workload SVIDs with the renewed one
        finally:
            await agent.stop()
