"""Trust anchor rotation, A to B, with mutual TLS between two sources never failing on the way.

The runbook: (1) publish A+B in the bundle, and wait until every client has
it; (2) sign with an issuer under B, and wait until every SVID chains to B;
(3) drop A from the bundle. First by hand (the files), then with `meshca
anchor prepare|activate|retire`.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from support.certs import serial as svid_serial
from support.certs import write_bundle
from support.ids import API, TD, WEB
from support.poll import eventually_sync
from support.procs import Result
from support.serving import ServerThread, Trust, start_pair
from support.tls import HandshakeLoop, TlsEcho, refused

import meshca
from meshca.client import SvidSource
from meshca.pki._certs import certificates_pem
from meshca.pki._files import atomic_write
from meshca.testing import TestCA

Run = Callable[..., Result]


@pytest.mark.slow
def test_anchor_rotation_with_handshakes_succeeding_throughout(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    a, b = trust.ca, TestCA(TD)
    pair = start_pair(trust, servers, sources, leaf_ttl=timedelta(seconds=6))
    web, api = pair.web, pair.api
    both = (web, api)
    server_ctx = web.server_ssl_context(meshca.authorize_id(API))
    client_ctx = api.client_ssl_context(meshca.authorize_id(WEB))
    contexts = (server_ctx, client_ctx)
    tdir = meshca.TrustDir.at(trust.dir)
    # Every SVID each source has held: serial -> the issuer that signed it.
    held: dict[meshca.SpiffeId, dict[int, x509.Certificate]] = {
        s.spiffe_id: {svid_serial(s.svid): s.svid.chain[1]} for s in both
    }
    for source in both:
        source.subscribe(lambda snap: held[snap.svid.spiffe_id].setdefault(svid_serial(snap.svid), snap.svid.chain[1]))

    def renewed_twice() -> Callable[[], bool]:
        start = {sid: len(svids) for sid, svids in held.items()}
        return lambda: all(len(svids) >= start[sid] + 2 for sid, svids in held.items())

    with TlsEcho(server_ctx) as echo, HandshakeLoop(client_ctx, echo.port, interval=0.1) as loop:

        def handshakes(what: str) -> None:
            """Waits for three more handshakes: each era of the rotation is exercised on the wire."""
            start = len(loop.replies)
            eventually_sync(lambda: len(loop.replies) >= start + 3 or loop.failures, 10, f"handshakes {what}")

        handshakes("under A alone")

        # 1. A and B in the bundle: the watch stream brings B to both sources and their contexts.
        write_bundle(trust.dir, a.anchor, b.anchor)
        eventually_sync(
            lambda: all(set(s.bundle.anchors) == {a.anchor, b.anchor} for s in both), 5, "B at both sources"
        )
        assert all(b.anchor.fingerprint(hashes.SHA256()) in ctx.meshca_anchors for ctx in contexts)
        # Renewals still come from A's issuer, over channels that now trust A and B.
        eventually_sync(renewed_twice(), 10, "two renewals with A and B in the bundle")
        assert all(s.svid.chain[1] == a.issuer_certificate for s in both)
        handshakes("with A's SVIDs and A and B trusted")

        # 2. Sign under B (key first, then certificate: the server refuses the mismatched pair in between).
        meshca.write_private_key(tdir.issuer_key, b.issuer_key, overwrite=True)
        atomic_write(tdir.issuer_cert, certificates_pem([b.issuer_certificate]))
        eventually_sync(lambda: all(s.svid.chain[1] == b.issuer_certificate for s in both), 10, "SVIDs renewed under B")
        assert all(ctx.meshca_svid is s.svid for ctx, s in zip(contexts, both, strict=True))
        handshakes("with B's SVIDs and A and B trusted")

        # 3. Nothing in use chains to A any more: drop it.
        write_bundle(trust.dir, b.anchor)
        eventually_sync(lambda: all(s.bundle.anchors == (b.anchor,) for s in both), 5, "A gone at both sources")
        # Renewals carry on against an identity server that B alone vouches for now.
        eventually_sync(renewed_twice(), 10, "two renewals with B alone")
        handshakes("under B alone")
    assert loop.failures == [], (loop.failures, echo.errors)
    assert echo.errors == []
    assert len(loop.replies) >= 30  # a handshake every 0.15 s, minus a loaded machine's slack
    assert {r.peer for r in loop.replies} == {WEB}
    # The handshakes used SVIDs of both eras, on both sides: A's first, B's last, several of B's.
    for issuers in (
        [held[WEB][r.serial] for r in loop.replies],
        [held[API][acc.serial] for acc in echo.accepted],
    ):
        assert issuers[0] == a.issuer_certificate
        assert issuers[-1] == b.issuer_certificate
    assert all(len([i for i in svids.values() if i == b.issuer_certificate]) >= 3 for svids in held.values())
    assert all(s.svid.chain[1] == b.issuer_certificate for s in both)

    # The contexts still hold A inside OpenSSL (anchors cannot be removed), but the SPIFFE check
    # uses the current bundle: a peer whose SVID chains to A is refused now.
    stale = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    stale.check_hostname = False
    b.configure_trust(stale)
    a.issue_svid(API).configure_cert(stale)
    with TlsEcho(server_ctx) as echo:
        assert refused(stale, echo.port)
        assert echo.accepted == []
    assert len(echo.errors) == 1
    assert isinstance(echo.errors[0], ssl.SSLCertVerificationError)
    assert "anchor" in str(echo.errors[0])


@pytest.mark.slow
def test_meshca_anchor_prepare_activate_retire_under_continuous_mutual_tls(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource], meshca_cmd: Run
) -> None:
    """The staged commands, run as an operator would, while two sources handshake every 0.1 s: none fails."""
    started = time.monotonic()
    d = trust.dir
    a = trust.ca.anchor
    pair = start_pair(trust, servers, sources, leaf_ttl=timedelta(seconds=6))
    web, api = pair.web, pair.api
    both = (web, api)
    server_ctx = web.server_ssl_context(meshca.authorize_id(API))
    client_ctx = api.client_ssl_context(meshca.authorize_id(WEB))
    issuers: dict[int, x509.Certificate] = {}  # every SVID either source held: serial -> its issuer
    for source in both:
        issuers[svid_serial(source.svid)] = source.svid.chain[1]
        source.subscribe(lambda snap: issuers.setdefault(svid_serial(snap.svid), snap.svid.chain[1]))

    def run(*args: str) -> Result:
        return meshca_cmd("anchor", *args, "--dir", d)

    with TlsEcho(server_ctx) as echo, HandshakeLoop(client_ctx, echo.port, interval=0.1) as loop:

        def handshakes(what: str) -> None:
            start = len(loop.replies)
            eventually_sync(lambda: len(loop.replies) >= start + 3 or loop.failures, 10, f"handshakes {what}")

        handshakes("under A")
        # 1. prepare: B reaches both sources through the watch stream.
        assert run("prepare").code == 0
        b = x509.load_pem_x509_certificate((d / "trust-anchor.next.crt").read_bytes())
        eventually_sync(lambda: all(set(s.bundle.anchors) == {a, b} for s in both), 5, "B at both sources")
        handshakes("with A and B trusted")
        # 2. activate: refused by default (clients had 90 days to fetch B in production), forced here.
        refused = run("activate")
        assert refused.code == 1 and "activation is allowed from" in refused.stderr
        assert run("activate", "--force").code == 0
        new_issuer = x509.load_pem_x509_certificate((d / "issuer.crt").read_bytes())
        assert new_issuer.issuer == b.subject
        # The server reloads the issuer by itself; the sources renew under it at half life.
        eventually_sync(lambda: all(s.svid.chain[1] == new_issuer for s in both), 15, "SVIDs renewed under B")
        handshakes("with SVIDs under B, A and B trusted")
        # 3. retire: refused while leaves issued under A live (and the grace after activation runs).
        refused = run("retire", "--grace", "2s")
        assert refused.code == 1 and "earliest safe time" in refused.stderr, refused
        eventually_sync(lambda: run("retire", "--grace", "2s").code == 0, 20, "retire allowed", interval=0.5)
        eventually_sync(lambda: all(s.bundle.anchors == (b,) for s in both), 5, "A gone at both sources")
        renewed = {s.spiffe_id: svid_serial(s.svid) for s in both}
        eventually_sync(lambda: all(svid_serial(s.svid) != renewed[s.spiffe_id] for s in both), 10, "renewals under B")
        handshakes("under B alone")
    assert loop.failures == [], (loop.failures, echo.errors)
    assert echo.errors == []
    # Both eras were on the wire, on both sides.
    for seen in ([issuers[r.serial] for r in loop.replies], [issuers[acc.serial] for acc in echo.accepted]):
        assert seen[0] == trust.ca.issuer_certificate
        assert seen[-1] == new_issuer
    assert time.monotonic() - started < 60
