"""A staged trust anchor rotation against `meshca serve --manage-issuers` (real processes: two workers on
one SQLite store, or two replicas on PostgreSQL), run as an operator would with `meshca anchor
prepare|activate|retire`, while two `SvidSource` clients handshake with each other every 0.1 s: none
fails, and the service switches by itself."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from cryptography import x509
from support.certs import serial as svid_serial
from support.ids import API, TD, WEB
from support.metrics import http_get, sample_value
from support.poll import eventually_sync
from support.procs import Result, ServeProcess, meshca_cmd
from support.tls import HandshakeLoop, TlsEcho
from support.tokens import add_token

import meshca
from meshca.client import SvidSource
from meshca.pki._anchors import chains_to
from meshca.pki._certs import fingerprint
from meshca.server._store import open_store
from meshca.testing import TestCA

# 10-minute issuers: no issuer rotation of their own gets in the way; 6-second leaves renew every ~3 s.
MANAGED = ("--manage-issuers", "--issuer-ttl", "10m", "--leaf-ttl", "6s")


def _anchor_rotations(metrics_ports: list[int]) -> float:
    total = 0.0
    for port in metrics_ports:
        text = http_get(port, "/metrics")[1]
        total += sample_value(text, "meshca_rotations_total", kind="anchor", result="success") or 0
    return total


@pytest.mark.slow
def test_two_workers_on_sqlite_follow_a_staged_anchor_rotation_under_continuous_mutual_tls(d: Path) -> None:
    _rotate_under_mutual_tls(d, replicas=1, workers=2, store=())


@pytest.mark.slow
def test_two_replicas_on_postgresql_follow_a_staged_anchor_rotation_under_continuous_mutual_tls(
    d: Path, pg_database: str
) -> None:
    """Each source renews at its own replica: both replicas must switch, and retire waits for both."""
    _rotate_under_mutual_tls(d, replicas=2, workers=1, store=("--store", pg_database))


def _rotate_under_mutual_tls(d: Path, *, replicas: int, workers: int, store: tuple[str, ...]) -> None:
    started = time.monotonic()
    ca = TestCA(TD)
    ca.write(d)
    for name in ("issuer.crt", "issuer.key"):  # a managed directory: the service mints its own issuers
        (d / name).unlink()
    a = ca.anchor

    def run(*args: str) -> Result:
        """`meshca anchor ...`; the commands that read the store (retire, list) get --store."""
        return meshca_cmd("anchor", *args, "--dir", d, *(store if args[0] in {"retire", "list"} else ()))

    def live_issuers() -> dict[str, int]:
        listed = run("list", "--json")
        assert listed.code == 0, listed.stderr
        return {a["state"]: a["live_issuers"] for a in json.loads(listed.stdout)}

    def newest_issuer_per_replica() -> dict[str, dict[str, str]]:
        listed = meshca_cmd("log", "issuers", "--json", "--dir", d, *store)
        assert listed.code == 0, listed.stderr
        newest: dict[str, dict[str, str]] = {}
        for record in json.loads(listed.stdout):  # by NotBefore, oldest first
            newest[record["writer"]] = record
        return newest

    with ExitStack() as stack:
        procs = [
            stack.enter_context(ServeProcess(d, *MANAGED, "--workers", str(workers), *store)) for _ in range(replicas)
        ]
        ports = [proc.wait_workers(workers) for proc in procs]
        metrics_ports = [m for _, m in ports]
        tokens = open_store(store[1] if store else None, d)
        try:
            # With two replicas, each source renews at its own.
            sources = [
                SvidSource(
                    f"127.0.0.1:{ports[n % replicas][0]}",
                    ca.bundle,
                    sid,
                    join_token=add_token(tokens, sid),
                    server_name="localhost",
                )
                for n, sid in enumerate((WEB, API))
            ]
        finally:
            tokens.close()
        stack.callback(lambda: [source.close() for source in sources])
        web, api = sources
        for source in sources:
            source.wait_ready(timeout=20)
        issuers: dict[int, x509.Certificate] = {}  # every SVID either source held: serial -> its issuer
        for source in sources:
            issuers[svid_serial(source.svid)] = source.svid.chain[1]
            source.subscribe(lambda snap: issuers.setdefault(svid_serial(snap.svid), snap.svid.chain[1]))
        server_ctx = web.server_ssl_context(meshca.authorize_id(API))
        client_ctx = api.client_ssl_context(meshca.authorize_id(WEB))
        before = _anchor_rotations(metrics_ports)

        with TlsEcho(server_ctx) as echo, HandshakeLoop(client_ctx, echo.port, interval=0.1) as loop:

            def handshakes(what: str) -> None:
                start = len(loop.replies)
                eventually_sync(lambda: len(loop.replies) >= start + 3 or loop.failures, 10, f"handshakes {what}")

            handshakes("under A")
            # 1. prepare: B joins the bundle; every replica serves it, both sources get it.
            assert run("prepare").code == 0
            b = x509.load_pem_x509_certificate((d / "trust-anchor.next.crt").read_bytes())
            eventually_sync(lambda: all(set(s.bundle.anchors) == {a, b} for s in sources), 10, "B at both")
            handshakes("with A and B trusted")
            # 2. activate, once B has been in the bundle for --min-age; no issuer file is written.
            eventually_sync(lambda: run("activate", "--min-age", "2s").code == 0, 10, "activation", interval=0.5)
            assert not (d / "issuer.crt").exists()
            # The service switches by itself: the sources renew under an issuer B signed.
            eventually_sync(lambda: all(chains_to([s.svid.chain[1]], b) for s in sources), 20, "SVIDs renewed under B")
            handshakes("with SVIDs under B, A and B trusted")
            # Every replica minted under B (the 10-minute issuers they had under A are still unexpired).
            eventually_sync(lambda: live_issuers() == {"active": 2, "retiring": 2}, 10, "both replicas under B")
            # 3. retire: refused while leaves issued under A live, then allowed.
            refused = run("retire", "--grace", "2s")
            assert refused.code == 1 and "earliest safe time" in refused.stderr, refused
            eventually_sync(lambda: run("retire", "--grace", "2s").code == 0, 30, "retire allowed", interval=0.5)
            eventually_sync(lambda: all(s.bundle.anchors == (b,) for s in sources), 10, "A gone at both")
            renewed = {s.spiffe_id: svid_serial(s.svid) for s in sources}
            eventually_sync(
                lambda: all(svid_serial(s.svid) != renewed[s.spiffe_id] for s in sources), 10, "renewals under B"
            )
            handshakes("under B alone")
        assert loop.failures == [], (loop.failures, echo.errors)
        assert echo.errors == []
        assert len(loop.replies) >= 30  # a handshake every 0.1 s for well over ten seconds
        # Both eras were on the wire, on both sides.
        for seen in ([issuers[r.serial] for r in loop.replies], [issuers[acc.serial] for acc in echo.accepted]):
            assert chains_to([seen[0]], a)
            assert chains_to([seen[-1]], b)
        # The clients' chains end at B, and verify against B alone.
        only_b = meshca.TrustBundle(meshca.TrustDomain(TD), (b,))
        for source in sources:
            meshca.verify_chain(list(source.svid.chain), only_b, at=meshca.system_clock())
        # Every replica's newest recorded issuer is B's; each switched once.
        newest = newest_issuer_per_replica()
        assert len(newest) == 2
        assert all(r["anchor_fingerprint"] == fingerprint(b) for r in newest.values()), newest
        assert _anchor_rotations(metrics_ports) >= before + 2
        for source in sources:
            source.close()  # closing twice (the stack closes them too) is harmless
        assert all(proc.terminate() == 0 for proc in procs)
    assert time.monotonic() - started < 90
