"""meshca agent against the real identity service, and py-spiffe's own clients against the agent.

The service runs in-process (support.serving), the agent on the test's loop,
py-spiffe's synchronous clients on threads (asyncio.to_thread) or in
subprocesses that change their uid before they connect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import JwtSource, WorkloadApiClient, X509Source
from spiffe import TrustDomain as SpiffeTrustDomain
from support.agents import NODE_AGENT, Agent, add_entry, agent_config, agent_stub, agent_token, wait_held
from support.certs import p256, write_bundle
from support.clocks import MovableClock, Pinned
from support.ids import API, TD, WEB
from support.malformed import forge_jwt
from support.poll import eventually
from support.serving import Harness, serving

import meshca
from meshca._proto import meshca_agent_pb2 as apb
from meshca._proto import workload_pb2 as wpb
from meshca.agent import NodeAgent
from meshca.agent import _agent as agent_module
from meshca.pki._files import atomic_write
from meshca.server._store import JwtPublicKey, open_store
from meshca.testing import TestCA

OTHER_UID = 4242  # an entry gives it API
STRANGER_UID = 4343  # no entry
WORKLOAD = (("workload.spiffe.io", "true"),)  # the spec's security header
STREAMS = {"FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"}
DER = Encoding.DER


@asynccontextmanager
async def web_agent(tmp_path: Path, sock_path: Path, **entry: Any) -> AsyncIterator[tuple[Harness, NodeAgent]]:
    """The service with one entry (WEB for this test's uid) and a started agent, on the service's clock, holding
    its SVID; both stopped on exit."""
    async with serving(tmp_path / "ca") as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"], **entry)
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)), clock=h.clock)
        await agent.start()
        try:
            await wait_held(agent, 1)
            yield h, agent
        finally:
            await agent.stop()


def fetched_id(sock: Path) -> str:
    """The SPIFFE ID of the X.509-SVID py-spiffe gets from the agent at ``sock``."""
    with WorkloadApiClient(socket_path=f"unix://{sock}") as client:
        return str(client.fetch_x509_svid().spiffe_id)


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


async def test_bundles_are_keyed_by_the_trust_domains_spiffe_id_and_hold_only_jwt_svid_keys(
    tmp_path: Path, sock_path: Path
) -> None:
    async with web_agent(tmp_path, sock_path) as (h, _):
        async with grpc.aio.insecure_channel(f"unix://{sock_path}") as channel:
            x509_call = channel.unary_stream(
                "/SpiffeWorkloadAPI/FetchX509Bundles", response_deserializer=wpb.X509BundlesResponse.FromString
            )
            jwt_call = channel.unary_stream(
                "/SpiffeWorkloadAPI/FetchJWTBundles", response_deserializer=wpb.JWTBundlesResponse.FromString
            )
            x509_bundles = await anext(aiter(x509_call(b"", metadata=WORKLOAD)))
            jwt_bundles = await anext(aiter(jwt_call(b"", metadata=WORKLOAD)))
        assert set(x509_bundles.bundles) == set(jwt_bundles.bundles) == {f"spiffe://{TD}"}
        assert x509_bundles.bundles[f"spiffe://{TD}"] == b"".join(a.public_bytes(DER) for a in h.ca.bundle.anchors)
        keys = json.loads(jwt_bundles.bundles[f"spiffe://{TD}"])["keys"]
        assert keys and all(k["use"] == "jwt-svid" and k["kid"] for k in keys)

        def py_spiffe() -> tuple[int, int]:  # py-spiffe reads the keys as trust domains
            with WorkloadApiClient(socket_path=f"unix://{sock_path}") as client:
                x509_set, jwt_set = client.fetch_x509_bundles(), client.fetch_jwt_bundles()
                x509_bundle = x509_set.get_bundle_for_trust_domain(SpiffeTrustDomain(TD))
                jwt_bundle = jwt_set.get_bundle_for_trust_domain(SpiffeTrustDomain(TD))
                assert x509_bundle is not None and jwt_bundle is not None
                return len(x509_bundle.x509_authorities), len(jwt_bundle.jwt_authorities)

        assert await asyncio.to_thread(py_spiffe) == (1, len(keys))


async def test_only_jwt_svid_keys_are_served_and_trusted_and_a_token_type_other_than_jwt_is_refused(
    tmp_path: Path, sock_path: Path
) -> None:
    async with serving(tmp_path / "ca") as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"])
        # A key of another use in the store (the SPIFFE bundle may carry x509-svid and other JWKs).
        other = ec.generate_private_key(ec.SECP256R1())
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(other.public_key(), as_dict=True) | {"kid": "other", "use": "sig"}
        later = h.clock() + timedelta(hours=2)
        h.server.store.publish_jwt_key(JwtPublicKey("other", "test", json.dumps(jwk), later, h.clock()))
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            await wait_held(agent, 1)
            kids = {k["kid"] for k in json.loads(agent.state.jwt_keys)["keys"]}
            assert kids and "other" not in kids
            now = int(time.time())
            claims = {"sub": str(WEB), "aud": ["db"], "exp": now + 300}
            by_other = jwt.encode(claims, other, "ES256", {"kid": "other"})
            assert await asyncio.to_thread(validated, sock_path, by_other, "db") == (
                f"INVALID_ARGUMENT: invalid JWT-SVID: no JWT key with id 'other' in the {TD} bundle"
            )
            key = h.server.jwt_keys._held[-1]
            for typ, outcome in [
                ("JOSE", str(WEB)),
                ("at+jwt", "INVALID_ARGUMENT: invalid JWT-SVID: the token's type"),
            ]:
                token = jwt.encode(claims, key.key, "ES256", {"kid": key.kid, "typ": typ})
                assert (await asyncio.to_thread(validated, sock_path, token, "db")).startswith(outcome)
        finally:
            await agent.stop()


async def test_streams_send_the_whole_set_on_each_change_and_end_permission_denied_when_no_entry_is_left(
    tmp_path: Path, sock_path: Path
) -> None:
    async with (
        web_agent(tmp_path, sock_path) as (h, agent),
        grpc.aio.insecure_channel(f"unix://{sock_path}") as channel,
    ):
        svids = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID", response_deserializer=wpb.X509SVIDResponse.FromString
        )(b"", metadata=WORKLOAD)
        bundles = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchJWTBundles", response_deserializer=wpb.JWTBundlesResponse.FromString
        )(b"", metadata=WORKLOAD)
        first = await svids.read()
        assert [s.spiffe_id for s in first.svids] == [str(WEB)]
        assert set((await bundles.read()).bundles) == {f"spiffe://{TD}"}
        api = add_entry(h, API.path, [f"unix:gid:{os.getgid()}"])
        second = await svids.read()  # the full set again, not the new SVID alone
        assert sorted(s.spiffe_id for s in second.svids) == sorted([str(WEB), str(API)])
        for entry in h.server.store.entries():
            h.server.store.delete_entry(entry.id)
        for call in (svids, bundles):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    assert await call.read() is not grpc.aio.EOF
            assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert api.id not in agent.state.held


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


async def test_an_agent_restarted_during_an_outage_answers_unavailable_not_denied_until_it_syncs(
    tmp_path: Path, sock_path: Path
) -> None:
    async with web_agent(tmp_path, sock_path) as (h, _):
        ca, port = h.ca, h.port
    restarted = NodeAgent(agent_config(h, tmp_path, sock_path, None))  # the saved SVID; the service is gone
    await restarted.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{sock_path}") as channel:
            call = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID")(b"", metadata=WORKLOAD)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with serving(tmp_path / "ca", ca, write=False, port=port):  # back, with the entry in its store
            await wait_held(restarted, 1)
            assert await asyncio.to_thread(fetched_id, sock_path) == str(WEB)
    finally:
        await restarted.stop()


async def test_an_outage_past_the_renewal_moment_is_retried_with_backoff_not_in_a_busy_loop(
    tmp_path: Path, sock_path: Path
) -> None:
    async with serving(tmp_path / "ca") as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"], x509_ttl=timedelta(hours=1))
        sync_every = timedelta(seconds=2)
        agent = NodeAgent(
            replace(agent_config(h, tmp_path, sock_path, agent_token(h)), sync_interval=sync_every),
            clock=h.clock,
            rng=Pinned(0.5),  # backoffs of half their ceiling: 0.25 s, 0.5 s, 1 s, then the sync interval
        )
        await agent.start()
        await wait_held(agent, 1)
        clock = h.clock
    try:
        # The service is gone and the SVID is past its renewal moment (40 of 60 minutes): every tick fails.
        clock.advance(timedelta(minutes=40))
        agent._wake.set()
        before = syncs(agent, "unavailable")
        await asyncio.sleep(4)
        attempts = syncs(agent, "unavailable") - before
        # 0.25 + 0.5 + 1 + 2 s: about 4 in 4 s. Retrying at once (every 50 ms) made about 80.
        assert 1 <= attempts <= 8, attempts

        assert await asyncio.to_thread(fetched_id, sock_path) == str(WEB)  # and it kept serving what it holds
    finally:
        await agent.stop()


async def test_an_agent_restarted_after_an_anchor_rotation_trusts_what_the_service_last_sent(
    tmp_path: Path, sock_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    async with serving(ca_dir, leaf_ttl=timedelta(seconds=6)) as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"])
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            # A new anchor and an issuer under it: the service now signs (and serves TLS) from the new one.
            new = TestCA(TD)
            write_bundle(ca_dir, h.ca.anchor, new.anchor)
            new_files = tmp_path / "new-ca"
            new.write(new_files)
            for name in ("issuer.key", "issuer.crt"):
                atomic_write(ca_dir / name, (new_files / name).read_bytes(), mode=0o600)
            await eventually(lambda: len(agent.state.bundle.anchors) == 2, 15, "the agent holding both anchors")
            await eventually(
                lambda: agent.own.chain[-1].issuer == new.anchor.subject, 15, "the agent's SVID from the new issuer"
            )
        finally:
            await agent.stop()
        assert (tmp_path / "agent-data" / "bundle.pem").stat().st_mode & 0o777 == 0o644
        # Restarted with the --bundle it was first given (the old anchor alone): it needs no new token.
        restarted = NodeAgent(agent_config(h, tmp_path, sock_path, None))
        await restarted.start()
        try:
            assert restarted.own.spiffe_id == NODE_AGENT
            await wait_held(restarted, 1)
            assert await asyncio.to_thread(fetched_id, sock_path) == str(WEB)
        finally:
            await restarted.stop()


async def test_a_data_dir_others_can_write_is_refused_before_the_join_spends_the_token(
    tmp_path: Path, sock_path: Path
) -> None:
    async with serving(tmp_path / "ca") as h:
        token = agent_token(h)
        data = tmp_path / "agent-data"
        data.mkdir()
        data.chmod(0o777)
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, token))
        with pytest.raises(meshca.UnsafePermissions, match="writable by other users"):
            await agent.start()
        await agent.stop()
        assert not list(data.iterdir())
        data.chmod(0o700)
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, token))  # the token was not spent
        await agent.start()
        try:
            assert agent.own.spiffe_id == NODE_AGENT
        finally:
            await agent.stop()


@pytest.mark.parametrize("mode", [0o777, 0o1777], ids=["world-writable", "sticky-like-tmp"])
async def test_a_socket_directory_others_can_write_is_refused_before_the_join(tmp_path: Path, mode: int) -> None:
    """Others who can create entries there can take the socket's path while the agent is not serving (before it
    starts, after it stops) and answer workloads with a bundle of their own; the sticky bit does not stop that."""
    async with serving(tmp_path / "ca") as h:
        token = agent_token(h)
        directory = tmp_path / "sockets"
        directory.mkdir()
        directory.chmod(mode)
        sock = directory / "agent.sock"
        agent = NodeAgent(agent_config(h, tmp_path, sock, token))
        with pytest.raises(meshca.UnsafePermissions, match="writable by other users"):
            await agent.start()
        await agent.stop()
        assert not (tmp_path / "agent-data" / "agent-svid.pem").exists()  # the token was not spent
        assert not sock.exists()


# spiffe-tls 0.4 reads X509Source.svid and .bundles (deprecated by spiffe 0.3) and hands pyOpenSSL X509 objects
# and PKey objects (deprecated by pyOpenSSL 26): their warnings, not ours.
@pytest.mark.filterwarnings("ignore:X509Source.(svid|bundles) is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning")
async def test_spiffe_tls_mutual_tls_between_workloads_of_the_agent(tmp_path: Path, sock_path: Path) -> None:
    from OpenSSL import SSL
    from spiffe import SpiffeId as PySpiffeId
    from spiffetls import ListenOptions, dial, listen
    from spiffetls.tlsconfig.authorize import authorize_id

    async with web_agent(tmp_path, sock_path) as _:

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


def validated(sock: Path, token: str, audience: str) -> str:
    """ValidateJWTSVID through py-spiffe: the SPIFFE ID, or the refusal's code and details."""
    from spiffe.workloadapi.errors import ValidateJwtSvidError

    with WorkloadApiClient(socket_path=f"unix://{sock}") as client:
        try:
            return str(client.validate_jwt_svid(token, audience).spiffe_id)
        except ValidateJwtSvidError as exc:
            cause = exc.__cause__
            assert isinstance(cause, grpc.RpcError)
            return f"{cause.code().name}: {cause.details()}"  # type: ignore[attr-defined]


async def test_jwt_svids_are_validated_for_signature_expiry_and_audience(tmp_path: Path, sock_path: Path) -> None:
    async with web_agent(tmp_path, sock_path, jwt_ttl=timedelta(minutes=1)) as (h, _):

        def check() -> list[str]:
            with WorkloadApiClient(socket_path=f"unix://{sock_path}") as client:
                token = client.fetch_jwt_svid(audience={"orders"}).token
            header, payload, signature = token.split(".")
            forged = f"{header}.{payload}.{signature[:-4]}AAAA"
            outcomes = [validated(sock_path, token, "orders"), validated(sock_path, token, "billing")]
            outcomes.append(validated(sock_path, forged, "orders"))
            h.clock.advance(timedelta(minutes=2))  # the agent's clock too: past the 1-minute token's exp
            outcomes.append(validated(sock_path, token, "orders"))
            return outcomes

        valid, other_audience, forged, expired = await asyncio.to_thread(check)
        assert valid == str(WEB)
        assert other_audience == "INVALID_ARGUMENT: invalid JWT-SVID: Audience doesn't match"
        assert forged == "INVALID_ARGUMENT: invalid JWT-SVID: Signature verification failed"
        assert expired == "INVALID_ARGUMENT: invalid JWT-SVID: the token has expired"


async def test_a_jwt_key_published_after_the_last_sync_is_fetched_on_use_at_most_once_a_window(
    tmp_path: Path, sock_path: Path
) -> None:
    ca_dir, url = tmp_path / "ca", f"sqlite://{tmp_path}/shared.db"
    async with serving(ca_dir, store=open_store(url, ca_dir)) as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"])
        quiet = replace(agent_config(h, tmp_path, sock_path, agent_token(h)), sync_interval=timedelta(hours=1))
        agent = NodeAgent(quiet, clock=h.clock)
        await agent.start()
        try:
            await wait_held(agent, 1)
            # A second replica on the same store starts after the agent's last sync, with a JWT key of its own.
            async with serving(ca_dir, h.ca, write=False, store=open_store(url, ca_dir), clock=h.clock) as second:
                own = agent.own
                (entry_id,) = agent.state.entries
                asked = apb.NewJWTSVIDRequest(entry_id=entry_id, audience=["db"])
                proved = Agent(own.spiffe_id, own.chain_der, own.key).prove(asked, "NewJWTSVID", h.clock())
                token = (await agent_stub(second).NewJWTSVID(proved)).token
            kid = jwt.get_unverified_header(token)["kid"]
            assert kid not in agent.state.jwt_keys.decode()
            start = syncs(agent, "ok")
            assert await asyncio.to_thread(validated, sock_path, token, "db") == str(WEB)
            assert syncs(agent, "ok") == start + 1  # the unknown key id made it sync once

            # Made-up key ids: refused, and no more than one sync for them a window (5 s on the agent's clock).
            made_up = jwt.encode({"sub": str(WEB), "aud": ["db"], "exp": 2**40}, p256(), "ES256", {"kid": "made-up"})
            for _ in range(3):
                refused = await asyncio.to_thread(validated, sock_path, made_up, "db")
                assert refused == f"INVALID_ARGUMENT: invalid JWT-SVID: no JWT key with id 'made-up' in the {TD} bundle"
            assert syncs(agent, "ok") == start + 1
            h.clock.advance(timedelta(seconds=6))
            await asyncio.to_thread(validated, sock_path, made_up, "db")
            assert syncs(agent, "ok") == start + 2
        finally:
            await agent.stop()


async def test_jwt_svids_are_timed_on_the_agents_clock_with_skew_for_nbf_and_none_for_iat(
    tmp_path: Path, sock_path: Path
) -> None:
    ahead = MovableClock()
    ahead.advance(timedelta(seconds=30))  # the service's host runs 30 s ahead of the agent's
    async with serving(tmp_path / "ca", clock=ahead) as h:
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}"])
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))  # on the system clock
        await agent.start()
        try:
            await wait_held(agent, 1)

            def fetched() -> str:
                with WorkloadApiClient(socket_path=f"unix://{sock_path}") as client:
                    return client.fetch_jwt_svid(audience={"db"}).token

            token = await asyncio.to_thread(fetched)
            assert (
                jwt.decode(token, options={"verify_signature": False})["iat"] > time.time() + 20
            )  # issued "in the future"
            assert await asyncio.to_thread(validated, sock_path, token, "db") == str(WEB)

            # Signed by the service's own key: nbf within the skew passes, beyond it does not.
            key = h.server.jwt_keys._held[-1]
            now = int(time.time())

            def signed(**claims: int) -> str:
                body = {"sub": str(WEB), "aud": ["db"], "exp": now + 300, **claims}
                return jwt.encode(body, key.key, "ES256", {"kid": key.kid})

            assert await asyncio.to_thread(validated, sock_path, signed(nbf=now + 50), "db") == str(WEB)
            late = await asyncio.to_thread(validated, sock_path, signed(nbf=now + 600), "db")
            assert late == "INVALID_ARGUMENT: invalid JWT-SVID: the token is not valid yet (nbf)"
            # The key is P-256: its algorithm is ES256, whatever the header says.
            es384 = jwt.encode(
                {"sub": str(WEB), "aud": ["db"], "exp": now + 300},
                ec.generate_private_key(ec.SECP384R1()),
                "ES384",
                {"kid": key.kid},
            )
            wrong_alg = await asyncio.to_thread(validated, sock_path, es384, "db")
            assert wrong_alg == "INVALID_ARGUMENT: invalid JWT-SVID: The specified alg value is not allowed"
        finally:
            await agent.stop()


async def test_the_jwt_svid_cache_is_bounded_and_keeps_the_newest(
    tmp_path: Path, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "JWT_CACHE_SIZE", 3)
    async with web_agent(tmp_path, sock_path) as (h, agent):
        (entry,) = agent.state.entries.values()

        def issued() -> int:
            return len(h.events("jwt_svid.issued"))

        for i in range(10):
            await agent.jwt_svid(entry, [f"aud-{i}"])
        assert len(agent._jwt_cache) == 3
        start = issued()
        for i in (7, 8, 9):  # the newest three: from the cache
            await agent.jwt_svid(entry, [f"aud-{i}"])
        assert issued() == start
        await agent.jwt_svid(entry, ["aud-0"])  # evicted: a new one
        assert issued() == start + 1


async def _raw(sock: Path, method: str, body: bytes) -> str:
    """``body`` as the request message of ``method`` (grpcio frames it); the call's status code."""
    async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
        try:
            if method in STREAMS:
                async for _ in channel.unary_stream(f"/SpiffeWorkloadAPI/{method}")(body, metadata=WORKLOAD):
                    return "OK"  # the first message came: the request was taken
            else:
                await channel.unary_unary(f"/SpiffeWorkloadAPI/{method}")(body, metadata=WORKLOAD)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return "OK"


async def _framed(sock: Path, data: bytes | None) -> str:
    """FetchJWTSVID whose request stream is ``data`` as sent (None: no message at all); the status.

    The client side is declared client-streaming: grpclib's unary client insists on one whole message.
    """
    from grpclib import GRPCError
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    channel = Channel(path=str(sock))
    try:
        path = "/SpiffeWorkloadAPI/FetchJWTSVID"
        async with channel.request(
            path, Cardinality.STREAM_UNARY, wpb.JWTSVIDRequest, wpb.JWTSVIDResponse, metadata=dict(WORKLOAD)
        ) as stream:
            await stream.send_request(end=data is None)
            if data is not None:
                await stream._stream.send_data(data, end_stream=True)  # bytes no well-behaved client would frame
                stream._end_done = True  # what grpclib's own send_message(end=True) records
            try:
                await stream.recv_message()
            except GRPCError as exc:
                return exc.status.name
            return "OK"
    finally:
        channel.close()


async def test_malformed_workload_api_calls_get_a_clean_status_and_the_agent_serves_on(
    tmp_path: Path, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with web_agent(tmp_path, sock_path) as (_, agent):
        kid = json.loads(agent.state.jwt_keys)["keys"][0]["kid"]
        claims = {"sub": str(WEB), "aud": ["db"], "exp": 2**40}
        hs256 = forge_jwt({"alg": "HS256", "kid": kid}, claims, agent.state.jwt_keys)
        validate = "ValidateJWTSVID"
        garbage = b"\xff\xff\xff"
        # (what, method or None for FetchJWTSVID framed by hand, bytes, the status expected)
        cases: list[tuple[str, str | None, bytes | None, str]] = [
            *((f"garbage-{m}", m, garbage, "INVALID_ARGUMENT") for m in [*STREAMS, "FetchJWTSVID", validate]),
            (
                "oversized",
                validate,
                wpb.ValidateJWTSVIDRequest(svid="x" * 100_000).SerializeToString(),
                "RESOURCE_EXHAUSTED",
            ),
            ("unknown-method", "FetchEverything", b"", "UNIMPLEMENTED"),
            ("no-message", None, None, "INVALID_ARGUMENT"),
            ("truncated", None, b"\x00\x00\x00\x00\x10\x0a\x02db", "INVALID_ARGUMENT"),
            ("compressed", None, b"\x01\x00\x00\x00\x02\x0a\x00", "UNIMPLEMENTED"),
            ("huge-length", None, b"\x00\xff\xff\xff\xff", "RESOURCE_EXHAUSTED"),
        ]
        # Refused by the service for the caller's own request: said as such, not UNAVAILABLE.
        too_long = wpb.JWTSVIDRequest(audience=["a" * 300]).SerializeToString()
        cases.append(("audience-too-long", "FetchJWTSVID", too_long, "INVALID_ARGUMENT"))
        for token in ["", "a.b.c", "x" * 5000, forge_jwt({"alg": "none", "kid": kid}, claims, None), hs256]:
            request = wpb.ValidateJWTSVIDRequest(audience="db", svid=token).SerializeToString()
            cases.append((f"token-{token[:12]}", validate, request, "INVALID_ARGUMENT"))
        outcomes = {}
        for what, method, data, _ in cases:
            if method is None:
                outcomes[what] = await _framed(sock_path, data)
            else:
                assert data is not None
                outcomes[what] = await _raw(sock_path, method, data)
        assert outcomes == {what: expected for what, _, _, expected in cases}

        assert await asyncio.to_thread(fetched_id, sock_path) == str(WEB)
    assert not [r for r in caplog.records if r.name.startswith("grpclib") and r.levelno >= logging.ERROR]


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


async def test_a_renewal_the_data_dir_cannot_take_is_logged_and_the_next_one_is_saved(
    tmp_path: Path, sock_path: Path
) -> None:
    async with serving(tmp_path / "ca", leaf_ttl=timedelta(seconds=6)) as h:
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            saved = tmp_path / "agent-data" / "agent-svid.pem"
            saved.unlink()
            saved.mkdir()  # nothing can be renamed over a directory: the next save fails
            await eventually(lambda: bool(h.events("agent.save_failed")), 15, "a failed save")
            saved.rmdir()
            await eventually(saved.is_file, 15, "the next renewal saved")
            on_disk = x509.load_pem_x509_certificates(saved.read_bytes())[0]
            assert on_disk.serial_number == agent.own.leaf.serial_number
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


async def test_a_slow_name_service_delays_its_caller_not_the_agent(
    tmp_path: Path, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """User and group names come from NSS (LDAP, sssd in production; nothing slow runs here, so the first
    lookup is held on a gate): while one caller's lookup hangs, another caller is answered."""
    from meshca.agent import _attest

    real = _attest.pwd.getpwuid
    entered, gate = threading.Event(), threading.Event()

    def slow_once(uid: int) -> Any:
        if not entered.is_set():
            entered.set()
            gate.wait(20)
        return real(uid)

    async with web_agent(tmp_path, sock_path):
        monkeypatch.setattr(_attest.pwd, "getpwuid", slow_once)
        first = asyncio.ensure_future(asyncio.to_thread(fetched_id, sock_path))
        try:
            await eventually(entered.is_set, 10, "the first caller's name lookup")
            second = await asyncio.wait_for(asyncio.to_thread(fetched_id, sock_path), 10)
            assert second == str(WEB) and not gate.is_set() and not first.done()
        finally:
            gate.set()
        assert await first == str(WEB)
