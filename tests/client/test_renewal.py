"""A minute of mutual TLS between two sources whose 10-second SVIDs renew under it."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from support.certs import serial, within_validity
from support.ids import API, WEB
from support.serving import ServerThread, Trust, start_pair
from support.tls import HandshakeLoop, TlsEcho

import meshca
from meshca.client import SvidSource

RUN_FOR = 60.0  # seconds
LEAF_TTL = timedelta(seconds=10)


@pytest.mark.slow
def test_handshakes_never_fail_while_ten_second_svids_renew(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]
) -> None:
    pair = start_pair(trust, servers, sources, leaf_ttl=LEAF_TTL)
    web, api = pair.web, pair.api
    server_ctx = web.server_ssl_context(meshca.authorize_id(API))
    client_ctx = api.client_ssl_context(meshca.authorize_id(WEB))
    seen: dict[meshca.SpiffeId, set[int]] = {WEB: set(), API: set()}
    checks = 0
    with TlsEcho(server_ctx) as echo, HandshakeLoop(client_ctx, echo.port, interval=0.15) as loop:
        deadline = time.monotonic() + RUN_FOR
        while time.monotonic() < deadline and not loop.failures and not echo.errors:
            now = datetime.now(UTC)
            for source, ctx in ((web, server_ctx), (api, client_ctx)):
                svid = source.snapshot.svid
                assert svid is not None and within_validity(svid, now), (source.spiffe_id, svid, now)
                assert svid.not_after - svid.not_before <= LEAF_TTL + timedelta(seconds=61)  # ttl + skew backdating
                loaded = ctx.meshca_svid
                assert loaded is not None and within_validity(loaded, now)
                seen[source.spiffe_id].add(serial(svid))
            checks += 1
            time.sleep(0.05)
    assert loop.failures == [], (loop.failures, echo.errors)
    assert echo.errors == []
    # About one handshake every 150 ms for a minute, each authorized on both sides.
    assert len(loop.replies) >= RUN_FOR / 0.6  # nominally one per 0.15 s; a loaded machine does fewer
    assert {r.peer for r in loop.replies} == {WEB}
    assert {a.peer for a in echo.accepted} == {API}
    assert checks >= RUN_FOR / 0.1
    # Renewed at 40-60 % of each 10 s life: about a dozen SVIDs each, every one of them used on the wire.
    for sid in (WEB, API):
        assert len(seen[sid]) >= 8, (sid, len(seen[sid]))
    assert len({r.serial for r in loop.replies}) >= 8
    assert len({a.serial for a in echo.accepted}) >= 8
    assert {r.serial for r in loop.replies} <= seen[WEB]
    assert {a.serial for a in echo.accepted} <= seen[API]
