"""go-spiffe, a second SPIFFE client independent of py-spiffe, gets its identity from meshca's agent.

The peer is `tests/peers/workloadapi` (go-spiffe v2 pinned by its go.mod and
go.sum), built once per session with the machine's Go toolchain from the Go
module proxy; without `go` the tests skip locally and fail in CI. It finds the
agent through SPIFFE_ENDPOINT_SOCKET only and prints one JSON line per result.
The service runs in-process, the agent on the test's loop (as in
test_workload_api), the Go workload in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from support.agents import add_entry, agent_config, agent_token, wait_held
from support.certs import write_bundle
from support.ids import API, TD, WEB
from support.serving import serving

import meshca
from meshca.agent import NodeAgent
from meshca.testing import TestCA

PEER = Path(__file__).parents[1] / "peers" / "workloadapi"
GO = meshca.SpiffeId.parse(f"spiffe://{TD}/go-workload")
SOMEONE_ELSE = 4242  # a uid that is not this process's
PYTHON = os.path.realpath(sys.executable)  # this process's executable, as the agent reads it from /proc


@pytest.fixture(scope="session")
def go_workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the Go toolchain is missing: CI must build the go-spiffe peer")
        pytest.skip("no Go toolchain: the go-spiffe peer is not built")
    out = tmp_path_factory.mktemp("go-spiffe") / "workloadapi"
    # The module cache and build cache are Go's own (warm after the first build); go.sum pins every module.
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -buildvcs=false"}
    built = subprocess.run(
        [go, "build", "-o", str(out), "."], cwd=PEER, capture_output=True, text=True, env=env, timeout=540
    )
    assert built.returncode == 0, f"go build of the go-spiffe peer failed:\n{built.stderr}"
    return out


def _env(sock: Path) -> dict[str, str]:
    return {**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{sock}"}


async def _run(peer: Path, sock: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """The peer's exit code and its one JSON line."""
    done = await asyncio.to_thread(
        subprocess.run, [str(peer), *args], env=_env(sock), capture_output=True, text=True, timeout=25
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 1, (done.stdout, done.stderr)
    return done.returncode, json.loads(lines[0])


async def test_go_spiffe_fetches_verifies_and_validates_its_svids(
    go_workload: Path, tmp_path: Path, sock_path: Path
) -> None:
    async with serving(tmp_path / "ca") as h:
        # The Go binary's own identity: this uid and that executable (path attestation of a Go workload).
        add_entry(h, GO.path, [f"unix:uid:{os.getuid()}", f"unix:path:{go_workload.resolve()}"])
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}", f"unix:path:{PYTHON}"])
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            await wait_held(agent, 2)
            (held,) = [s.svid for s in agent.state.held.values() if s.svid.spiffe_id == GO]
            code, out = await _run(go_workload, sock_path, "fetch", "payments")
            jwt_keys = agent.state.jwt_key_set()["keys"]
        finally:
            await agent.stop()
    assert code == 0, out
    assert out["spiffe_id"] == out["verified_id"] == str(GO)
    assert out["chain_length"] == len(held.chain_der) == 2  # leaf and intermediate, as the agent holds them
    assert out["verified_chain_length"] == 3  # ... up to the bundle's anchor
    assert out["bundle_trust_domains"] == [TD]
    assert out["x509_authorities"] == 1
    assert out["jwt_spiffe_id"] == out["jwt_parsed_id"] == out["jwt_validated_id"] == str(GO)
    assert out["jwt_audience"] == ["payments", "payments-2"]
    assert isinstance(jwt_keys, list) and out["jwt_authorities"] == len(jwt_keys) >= 1  # every key the agent serves
    assert "audience" in out["other_audience_local"]
    assert out["other_audience_api"] == "InvalidArgument"


async def test_a_go_caller_with_no_entry_is_refused_permission_denied(
    go_workload: Path, tmp_path: Path, sock_path: Path
) -> None:
    async with serving(tmp_path / "ca") as h:
        add_entry(h, API.path, [f"unix:uid:{SOMEONE_ELSE}"])  # another uid's: nothing for this caller
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            await wait_held(agent, 1)
            code, out = await _run(go_workload, sock_path, "fetch", "payments")
        finally:
            await agent.stop()
    assert code == 1
    assert out["code"] == "PermissionDenied"
    assert out["error"].startswith("FetchX509SVID: ")
    assert "no identity issued for this caller" in out["error"]


async def test_go_spiffes_x509_source_follows_renewal_and_a_new_anchor(
    go_workload: Path, tmp_path: Path, sock_path: Path
) -> None:
    async with serving(tmp_path / "ca") as h:
        add_entry(h, GO.path, [f"unix:uid:{os.getuid()}"], x509_ttl=timedelta(seconds=6))  # renewed at about 3 s
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            await wait_held(agent, 1)
            proc = await asyncio.create_subprocess_exec(
                str(go_workload), "watch", "2", "2", env=_env(sock_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            try:
                assert proc.stdout is not None
                ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 15) or b"{}")
                # A second anchor published by the service reaches the Go source with a Sync of the agent.
                write_bundle(tmp_path / "ca", h.ca.anchor, TestCA(TD).anchor)
                out, err = await asyncio.wait_for(proc.communicate(), 20)
            finally:
                if proc.returncode is None:  # the test failed: the peer goes with it
                    proc.kill()
                    await proc.wait()
        finally:
            await agent.stop()
    assert ready == {"spiffe_id": str(GO), "authorities": 1}, err
    assert proc.returncode == 0, (out, err)
    assert json.loads(out) == {"spiffe_id": str(GO), "serials": 2, "authorities": 2}


async def test_go_spiffes_x509_source_comes_back_to_a_restarted_agent(
    go_workload: Path, tmp_path: Path, sock_path: Path
) -> None:
    """The agent stops (its connections close) and a new one starts on the same socket from its data dir: the
    source reconnects on its own and takes the new agent's SVID (workload keys are never kept: a new serial)."""
    async with serving(tmp_path / "ca") as h:
        add_entry(h, GO.path, [f"unix:uid:{os.getuid()}"])
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            await wait_held(agent, 1)
            proc = await asyncio.create_subprocess_exec(
                str(go_workload), "watch", "2", "1", env=_env(sock_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            try:
                assert proc.stdout is not None
                ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 15) or b"{}")
                await agent.stop()
                agent = NodeAgent(agent_config(h, tmp_path, sock_path, None))
                await agent.start()
                out, err = await asyncio.wait_for(proc.communicate(), 20)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        finally:
            await agent.stop()
    assert ready == {"spiffe_id": str(GO), "authorities": 1}, err
    assert proc.returncode == 0, (out, err)
    assert json.loads(out) == {"spiffe_id": str(GO), "serials": 2, "authorities": 1}


class _GoServer:
    """``workloadapi serve AUTHORIZED-ID``: its first line gives the port; then one connection and its result."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, spiffe_id: str) -> None:
        self.proc, self.port, self.spiffe_id = proc, port, spiffe_id

    @classmethod
    async def start(cls, peer: Path, sock: Path, authorized: meshca.SpiffeId) -> _GoServer:
        proc = await asyncio.create_subprocess_exec(
            str(peer), "serve", str(authorized), env=_env(sock), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 15) or b'{"error": "no line"}')
        if "listening" not in first:
            proc.kill()
            await proc.wait()
            raise AssertionError(first)
        return cls(proc, int(first["listening"].rsplit(":", 1)[1]), first["spiffe_id"])

    async def result(self) -> tuple[int, dict[str, Any]]:
        out, err = await asyncio.wait_for(self.proc.communicate(), 15)
        lines = out.decode().splitlines()
        assert len(lines) == 1, (out, err)
        return self.proc.returncode or 0, json.loads(lines[0])


# spiffe-tls 0.4's own deprecation warnings (see test_workload_api).
@pytest.mark.filterwarnings("ignore:X509Source.(svid|bundles) is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning")
async def test_go_spiffe_and_py_spiffe_workloads_of_one_agent_complete_mutual_tls(
    go_workload: Path, tmp_path: Path, sock_path: Path
) -> None:
    from OpenSSL import SSL
    from spiffe import SpiffeId as PySpiffeId
    from spiffe import X509Source
    from spiffetls import ListenOptions, dial, listen
    from spiffetls.tlsconfig.authorize import authorize_id

    endpoint = f"unix://{sock_path}"

    def py_dial(port: int, server: meshca.SpiffeId) -> bytes:
        """py-spiffe (WEB) dials, authorizing only ``server``; a refused handshake reads as b"refused"."""
        source = X509Source(socket_path=endpoint, timeout_in_seconds=10)
        try:
            conn = dial(f"127.0.0.1:{port}", source, authorize_fn=authorize_id(PySpiffeId(str(server))))
            try:
                conn.sendall(b"ping")
                return bytes(conn.recv(64))
            except SSL.Error:
                return b"refused"
            finally:
                conn.close()
        finally:
            source.close()

    async def go_dials_py(client: meshca.SpiffeId, server: meshca.SpiffeId) -> tuple[tuple[int, dict[str, Any]], str]:
        """py-spiffe (WEB) serves one connection, authorizing only ``client``; Go dials it, authorizing ``server``."""
        source = await asyncio.to_thread(X509Source, socket_path=endpoint, timeout_in_seconds=10)
        listener = listen("127.0.0.1:0", source, ListenOptions(authorize_fn=authorize_id(PySpiffeId(str(client)))))
        listener.settimeout(15)  # accept gives up if Go never dials
        seen: list[str] = []

        def serve_one() -> None:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                seen.append(f"no connection: {exc}")
                return
            try:
                conn.do_handshake()
                conn.sendall(b"pong " + conn.recv(64))
                seen.append("served")
            except SSL.Error as exc:
                seen.append(f"refused: {exc}")
            finally:
                conn.close()

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        try:
            port = listener.getsockname()[1]
            ran = await _run(go_workload, sock_path, "dial", f"127.0.0.1:{port}", str(server))
        finally:
            await asyncio.to_thread(thread.join, 15)
            listener.close()
            await asyncio.to_thread(source.close)
        return ran, seen[0] if seen else "thread still running"

    async with serving(tmp_path / "ca") as h:
        add_entry(h, GO.path, [f"unix:uid:{os.getuid()}", f"unix:path:{go_workload.resolve()}"])
        add_entry(h, WEB.path, [f"unix:uid:{os.getuid()}", f"unix:path:{PYTHON}"])
        agent = NodeAgent(agent_config(h, tmp_path, sock_path, agent_token(h)))
        await agent.start()
        try:
            await wait_held(agent, 2)

            # Go serves (tlsconfig.MTLSServerConfig) for WEB; py-spiffe dials, authorizing GO.
            go = await _GoServer.start(go_workload, sock_path, WEB)
            assert go.spiffe_id == str(GO)
            assert await asyncio.to_thread(py_dial, go.port, GO) == b"pong ping"
            assert await go.result() == (0, {"peer_id": str(WEB), "received": "ping"})

            # py-spiffe serves for GO; Go dials (spiffetls), authorizing WEB.
            (code, out), served = await go_dials_py(GO, WEB)
            assert (code, out, served) == (0, {"peer_id": str(WEB), "reply": "pong ping"}, "served")

            # Go to Go, both through X509Source.
            go = await _GoServer.start(go_workload, sock_path, GO)
            code, out = await _run(go_workload, sock_path, "dial", f"127.0.0.1:{go.port}", str(GO))
            assert (code, out) == (0, {"peer_id": str(GO), "reply": "pong ping"})
            assert await go.result() == (0, {"peer_id": str(GO), "received": "ping"})

            # Refusals on both sides: a Go server for API refuses py-spiffe's WEB ...
            go = await _GoServer.start(go_workload, sock_path, API)
            assert await asyncio.to_thread(py_dial, go.port, GO) == b"refused"
            code, out = await go.result()
            assert code == 1 and out["error"].startswith("handshake: ")
            assert f'unexpected ID "{WEB}"' in out["error"], out
            # ... and a Go client for API refuses py-spiffe's WEB server.
            (code, out), served = await go_dials_py(GO, API)
            assert code == 1 and out["error"].startswith("spiffetls.DialWithMode: "), out
            assert f'unexpected ID "{WEB}"' in out["error"], out
            assert served.startswith("refused: ")
        finally:
            await agent.stop()
