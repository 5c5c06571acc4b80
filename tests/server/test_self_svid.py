"""The service's own SVID: in the issuance log, renewed by the clients' rotation policy; the probe leaf is not."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from support.ids import TD
from support.poll import eventually
from support.serving import serving

from meshca.pki._rotation import DEFAULT_POLICY
from meshca.testing import TestCA

from .test_reload import SecretVolume, issuer_files, new_issuer

TTL = timedelta(hours=1)


def _leaf(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem)[0]


async def test_the_server_svid_is_in_the_issuance_log(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        leaf = _leaf(h.server.state.serving_svid(("localhost",), h.server.config.leaf_ttl).chain_pem)
        [record] = h.server.store.issuances()
        assert (record.spiffe_id, record.principal, record.api) == (f"spiffe://{TD}/meshca/identity", "meshca", "self")
        assert record.serial == format(leaf.serial_number, "x")
        assert record.not_after == leaf.not_valid_after_utc
        # the probe leaf that validated the issuer at start is never handed out, and not logged
        assert not [r for r in h.server.store.issuances() if "probe" in r.spiffe_id]


async def test_the_server_svid_renews_by_the_rotation_policy_and_each_is_logged(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        state = h.server.state
        first = state.serving_svid(("localhost",), TTL)
        leaf = _leaf(first.chain_pem)
        issued_at = h.clock()
        life = (leaf.not_valid_after_utc - issued_at).total_seconds()
        share = (first.renew_at - issued_at.timestamp()) / life
        low, high = DEFAULT_POLICY.fraction - DEFAULT_POLICY.jitter, DEFAULT_POLICY.fraction + DEFAULT_POLICY.jitter
        assert low - 0.01 <= share <= high + 0.01
        assert state.serving_svid(("localhost",), TTL) is first  # not yet
        h.clock.advance(timedelta(seconds=first.renew_at - issued_at.timestamp() + 1))
        second = state.serving_svid(("localhost",), TTL)
        assert second is not first
        serials = {r.serial for r in h.server.store.issuances() if r.api == "self"}
        assert format(_leaf(second.chain_pem).serial_number, "x") in serials


async def test_a_reloaded_issuer_probe_is_not_logged(d: Path) -> None:
    ca = TestCA(TD)
    volume = SecretVolume(d, issuer_files(ca.issuer_certificate, ca.issuer_key, ca.bundle))
    async with serving(d, ca, write=False) as h:
        before = h.server.store.issuances()
        replacement, key = new_issuer(ca)
        volume.swap(issuer_files(replacement, key, ca.bundle))
        await eventually(lambda: bool(h.events("issuer.reloaded")), what="the reload")
        # the reload loop renews the server SVID from the new issuer, logged like the first; the probe is not
        await eventually(lambda: len(h.server.store.issuances()) == 2, what="the server SVID renewed")
        records = h.server.store.issuances()
        assert records[0] == before[0]
        assert [(r.api, r.spiffe_id) for r in records] == [("self", f"spiffe://{TD}/meshca/identity")] * 2
        svid = h.server.state.serving_svid(("localhost",), TTL)
        assert svid.issuer_fingerprint == replacement.fingerprint(hashes.SHA256()).hex(":")
        assert len(h.server.store.issuances()) == 2
