"""`meshca serve --manage-issuers` as a real process: rotations in real time under a client, replicas
each minting their own issuer on a shared store, the anchor on a PKCS#11 token; file-mode expiry warnings."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from support.calls import native_request
from support.certs import spiffe_csr
from support.ids import TD, WEB
from support.metrics import http_get, sample_value, samples
from support.procs import ServeProcess, meshca_cmd
from support.softhsm import PIN, SoftHsm
from support.tokens import add_token

import meshca
from meshca._proto import meshca_identity_pb2_grpc
from meshca.client import SvidSource
from meshca.pki._pkcs11 import Pkcs11Uri
from meshca.testing import TestCA

FAST = ("--manage-issuers", "--issuer-ttl", "1m", "--leaf-ttl", "10s")


def fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


def events(proc: ServeProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in proc.events if e.get("event") == name]


def issue(port: int, d: Path, token: str) -> list[x509.Certificate]:
    """One issuance over a fresh channel; the chain, verified against DIR's bundle now."""
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials((d / "bundle.pem").read_bytes())) as ch:
        _, csr = spiffe_csr()
        response = meshca_identity_pb2_grpc.IdentityStub(ch).IssueSVID(
            native_request(csr, join_token=token), timeout=20
        )
    chain = [x509.load_der_x509_certificate(c) for c in (response.leaf, *response.intermediates)]
    meshca.verify_chain(chain, meshca.TrustDir.at(d).load_bundle(), at=meshca.system_clock())
    return chain


def test_a_client_keeps_valid_svids_across_issuer_rotations_in_real_time(d: Path) -> None:
    """1-minute issuers: one is prepared at 30 s, takes over at 50 s, the first retires at 60 s (< 90 s)."""
    ca = TestCA(TD)
    ca.write(d)
    with ServeProcess(d, *FAST, "--workers", "1") as proc:
        port, metrics_port = proc.wait_workers(1)
        started = time.monotonic()
        bundle = ca.bundle
        source = SvidSource(f"127.0.0.1:{port}", bundle, WEB, join_token=add_token(d, WEB), server_name="localhost")
        try:
            source.wait_ready(timeout=20)
            seen: dict[str, x509.Certificate] = {}
            while not events(proc, "issuer.retired"):
                assert time.monotonic() - started < 85, "no issuer retired within 85 s:\n" + "\n".join(proc.lines)
                svid = source.svid
                now = meshca.system_clock()
                meshca.verify_chain(list(svid.chain), bundle, at=now)  # valid at every moment
                issuer = svid.chain[1]
                assert svid.not_after <= issuer.not_valid_after_utc  # never outlives its issuer
                seen[fp(issuer)] = issuer
                time.sleep(0.5)
        finally:
            source.close()
        assert len(seen) >= 2, "the client never got an SVID from the second issuer"
        assert {e["event"] for e in proc.events} >= {"issuer.prepared", "issuer.activated", "issuer.retired"}
        activated = events(proc, "issuer.activated")
        assert len(activated) == 2 and all("not_after" in e and "anchor" in e for e in activated)

        text = http_get(metrics_port, "/metrics")[1]
        assert (sample_value(text, "meshca_rotations_total", kind="issuer", result="success") or 0) >= 5
        assert sample_value(text, "meshca_rotations_total", kind="issuer", result="failure") is None
        assert (sample_value(text, "meshca_rotations_total", kind="server_svid", result="success") or 0) >= 2
        expiry = {ls["state"]: ls["fingerprint"] for n, ls, _ in samples(text) if n.startswith("meshca_issuer_expiry")}
        assert expiry["active"] == activated[-1]["issuer"]
        next_rotation = sample_value(text, "meshca_next_rotation_timestamp_seconds")
        assert next_rotation is not None and -5 < next_rotation - time.time() <= 60
        assert proc.terminate() == 0

    listed = meshca_cmd("log", "issuers", "--dir", d, "--json")
    assert listed.code == 0, listed.stderr
    recorded = json.loads(listed.stdout)
    assert set(seen) <= {r["fingerprint"] for r in recorded}
    assert len({r["writer"] for r in recorded}) == 1
    assert all(r["anchor_fingerprint"] == fp(ca.anchor) for r in recorded)


def _replica_issuers(proc: ServeProcess, count: int) -> set[str]:
    deadline = time.monotonic() + 30
    while len(found := {e["issuer"] for e in events(proc, "issuer.activated")}) < count:
        assert time.monotonic() < deadline, "\n".join(proc.lines)
        time.sleep(0.1)
    return found


def test_two_workers_on_one_sqlite_store_each_mint_their_own_issuer(d: Path) -> None:
    TestCA(TD).write(d)
    with ServeProcess(d, "--manage-issuers", "--workers", "2") as proc:
        port, metrics_port = proc.wait_workers(2)
        minted = _replica_issuers(proc, 2)
        token = add_token(d, WEB, uses=12)
        issuers = {fp(issue(port, d, token)[1])[:23] for _ in range(12)}
        assert issuers <= minted
        text = http_get(metrics_port, "/metrics")[1]  # summed over the workers
        active = {ls["fingerprint"] for n, ls, v in samples(text) if n.startswith("meshca_issuer_expiry") and v > 0}
        assert active == minted
        assert sample_value(text, "meshca_rotations_total", kind="issuer", result="success") == 4
        live = meshca_cmd("check", "--dir", d, "--server", f"localhost:{port}", "--manage-issuers", "--json")
        assert live.code == 0, live.stdout + live.stderr
        live_findings = json.loads(live.stdout)
        assert [f for f in live_findings if f["level"] != "ok"] == []
        [served] = [f["message"] for f in live_findings if f["check"] == "recorded issuer" and "served" in f["message"]]
        assert served.split()[1] in {m[:11] for m in minted}
        assert proc.terminate() == 0
    checked = meshca_cmd("check", "--dir", d, "--json")
    assert checked.code == 0, checked.stdout + checked.stderr
    findings = json.loads(checked.stdout)
    recorded = [f["message"] for f in findings if f["check"] == "recorded issuer"]
    assert {m.split()[1] for m in recorded} == {m[:11] for m in minted}
    assert len({m.split(" of ")[1].split(":")[0] for m in recorded}) == 2  # two writers
    [summary] = [f["message"] for f in findings if f["check"] == "recorded issuers"]
    assert summary == "the store knows 2 issuer(s), 0 of them expired"


def test_two_replicas_on_postgresql_each_mint_their_own_issuer(d: Path, pg_database: str) -> None:
    TestCA(TD).write(d)
    with (
        ServeProcess(d, "--manage-issuers", "--workers", "1", "--store", pg_database) as one,
        ServeProcess(d, "--manage-issuers", "--workers", "1", "--store", pg_database) as two,
    ):
        one.wait_workers(1)
        two.wait_workers(1)
        minted = _replica_issuers(one, 1) | _replica_issuers(two, 1)
        assert len(minted) == 2
        checked = meshca_cmd("check", "--dir", d, "--store", pg_database, "--json")
        assert checked.code == 0, checked.stderr
        recorded = [f["message"] for f in json.loads(checked.stdout) if f["check"] == "recorded issuer"]
        assert {m.split()[1] for m in recorded} == {m[:11] for m in minted}
        assert one.terminate() == 0 and two.terminate() == 0


def test_the_anchor_key_on_a_pkcs11_token_mints_the_issuers(d: Path, softhsm: SoftHsm) -> None:
    uri = Pkcs11Uri.parse(softhsm.uri("managed-anchor"))
    meshca.TrustDir.at(d).init(meshca.TrustDomain(TD), now=meshca.system_clock(), anchor_key_uri=uri)
    assert (d / "trust-anchor.key.uri").exists() and not (d / "trust-anchor.key").exists()
    anchor = x509.load_pem_x509_certificate((d / "trust-anchor.crt").read_bytes())
    with ServeProcess(d, "--manage-issuers", "--workers", "2") as proc:
        port, _ = proc.wait_workers(2)
        minted = _replica_issuers(proc, 2)
        token = add_token(d, WEB, uses=6)
        for _ in range(6):
            _, issuer = issue(port, d, token)
            issuer.verify_directly_issued_by(anchor)  # signed through the token
            assert fp(issuer)[:23] in minted
        assert proc.terminate() == 0
    assert PIN not in "\n".join(proc.lines)


def test_serve_refuses_a_leaf_ttl_that_cannot_fit_the_issuer_ttl(d: Path) -> None:
    TestCA(TD).write(d)
    result = meshca_cmd("serve", "--dir", d, "--manage-issuers", "--issuer-ttl", "1m")
    assert result.code == 2
    [line] = result.stderr.strip().splitlines()
    assert "leaf TTL 24h does not fit an issuer TTL of 1m" in line
    result = meshca_cmd("serve", "--dir", d, "--manage-issuers", "--issuer-ttl", "30s", "--leaf-ttl", "1s")
    assert result.code == 2 and "at least 1 minute" in result.stderr
    result = meshca_cmd("serve", "--dir", d, "--issuer-ttl", "7d")
    assert result.code == 2 and "--issuer-ttl goes with --manage-issuers" in result.stderr


def test_file_mode_warns_of_an_issuer_close_to_expiry_in_check_and_in_the_log(d: Path) -> None:
    # 30 days of life, 25 gone: 5 days left, inside the default warning of a third of its life
    TestCA(TD, now=datetime.now(UTC) - timedelta(days=25), issuer_lifetime=timedelta(days=30)).write(d)
    checked = meshca_cmd("check", "--dir", d)
    assert checked.code == 0, checked.stdout
    [warning] = [line for line in checked.stdout.splitlines() if line.startswith("[WARN]")]
    assert "expires in 4d" in warning or "expires in 5d" in warning
    assert "0 error(s), 1 warning(s)" in checked.stdout
    quiet = meshca_cmd("check", "--dir", d, "--issuer-warn", "1d")
    assert "0 error(s), 0 warning(s)" in quiet.stdout
    with ServeProcess(d, "--workers", "1") as proc:
        proc.wait_started()
        [expiring] = events(proc, "issuer.expiring")
        assert expiring["level"] == "warning"
        assert 4 * 86400 < expiring["left"] <= 5 * 86400
        text = http_get(int(events(proc, "server.started")[0]["metrics_port"]), "/metrics")[1]
        assert sample_value(text, "meshca_next_rotation_timestamp_seconds") is None
        assert [ls["state"] for n, ls, _ in samples(text) if n.startswith("meshca_issuer_expiry")] == ["active"]
        assert proc.terminate() == 0
