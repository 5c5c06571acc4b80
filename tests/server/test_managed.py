"""Managed issuers wired into `IssuerState` on a fake clock: the schedule's steps with their log lines,
metrics and store records; anchor changes; a store that cannot record; file-mode expiry warnings."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from structlog.testing import capture_logs
from support.certs import p256
from support.ids import TD, WEB

import meshca
from meshca.pki._certs import certificates_pem
from meshca.pki._check import issuer_warning
from meshca.pki._files import atomic_write
from meshca.pki._lifecycle import activation_time, check_issuer_ttl, preparation_time
from meshca.server import SqliteStore
from meshca.server._config import ServerConfig
from meshca.server._metrics import Metrics
from meshca.server._state import IssuerState
from meshca.testing import FrozenClock, TestCA

TTL = timedelta(hours=1)
LEAF = timedelta(minutes=10)


def fp(cert: Any) -> str:
    return str(cert.fingerprint(hashes.SHA256()).hex(":"))


@contextlib.contextmanager
def managed(d: Path, ca: TestCA, clock: FrozenClock, metrics: Metrics) -> Iterator[tuple[IssuerState, SqliteStore]]:
    ca.write(d)
    store = SqliteStore(d / "meshca.db")
    try:
        yield (
            IssuerState.managed(
                meshca.TrustDir.at(d), clock, metrics, store, issuer_ttl=TTL, max_leaf_ttl=LEAF, replica="test-1"
            ),
            store,
        )
    finally:
        store.close()


def series(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


def states(metrics: Metrics) -> dict[str, str]:
    """fingerprint prefix -> state, from the issuer expiry gauge."""
    found = series(metrics, "meshca_issuer_expiry_timestamp_seconds")
    return {dict(k)["fingerprint"]: dict(k)["state"] for k in found}


def test_the_schedule_runs_from_the_poll_with_logs_metrics_and_records(d: Path) -> None:
    clock = FrozenClock()
    ca = TestCA(TD, now=clock())
    metrics = Metrics(managed=True)
    with capture_logs() as logs, managed(d, ca, clock, metrics) as (state, store):
        first = state.issuer
        assert first.anchor == ca.anchor
        assert first.certificate != ca.issuer_certificate  # minted, not the files' issuer
        assert first.not_after - first.not_before == TTL + timedelta(seconds=60)  # NotBefore backdated
        assert states(metrics) == {fp(first.certificate)[:23]: "active"}
        [recorded] = store.issuer_certs()
        assert (recorded.fingerprint, recorded.writer) == (fp(first.certificate), "test-1")
        assert recorded.anchor_fingerprint == fp(ca.anchor)
        svid = state.serving_svid(("localhost",), LEAF)
        assert svid.issuer_fingerprint == fp(first.certificate)

        # half life: the next one is prepared (and recorded), the first still signs
        prepare_at = preparation_time(first)
        next_rotation = metrics.registry.get_sample_value("meshca_next_rotation_timestamp_seconds")
        assert next_rotation == prepare_at.timestamp()
        clock.now = prepare_at
        assert not state.poll()
        [_, prepared] = state.in_use()
        assert prepared[0] == "prepared"
        assert state.issuer is first
        assert len(store.issuer_certs()) == 2
        assert states(metrics)[fp(prepared[1].certificate)[:23]] == "prepared"

        # five-sixths: the prepared one takes over; the server SVID follows it
        clock.now = activation_time(first)
        assert state.poll()
        assert state.issuer is prepared[1]
        assert state.serving_svid(("localhost",), LEAF).issuer_fingerprint == fp(prepared[1].certificate)
        assert states(metrics) == {
            fp(first.certificate)[:23]: "old",
            fp(prepared[1].certificate)[:23]: "active",
        }
        leaf = state.issuer.sign(p256().public_key(), WEB, now=clock(), ttl=LEAF)
        assert leaf.not_after <= state.issuer.not_after

        # the old one goes once its last leaf can have expired (its NotAfter here, as LEAF + skew is longer);
        # the active one, minted half an hour before, is at its own half life: the next is prepared
        clock.now = first.not_after
        state.poll()
        assert [s for s, _ in state.in_use()] == ["active", "prepared"]
        assert fp(first.certificate)[:23] not in states(metrics)
        assert state.usable
    events = [e["event"] for e in logs if e["event"].startswith("issuer.")]
    assert events == [
        "issuer.prepared",
        "issuer.activated",
        "issuer.prepared",
        "issuer.activated",
        "issuer.prepared",
        "issuer.retired",
    ]
    retired = next(e for e in logs if e["event"] == "issuer.retired")
    assert retired["issuer"] == fp(first.certificate)[:23]
    assert "not_after" in retired and "anchor" in retired
    value = metrics.registry.get_sample_value
    assert value("meshca_rotations_total", {"kind": "issuer", "result": "success"}) == 6
    assert value("meshca_rotations_total", {"kind": "server_svid", "result": "success"}) == 2
    assert value("meshca_rotations_total", {"kind": "issuer", "result": "failure"}) is None


def test_a_store_that_cannot_record_stops_the_new_issuer_not_the_current_one(d: Path) -> None:
    clock = FrozenClock()
    ca = TestCA(TD, now=clock())
    metrics = Metrics(managed=True)
    with capture_logs() as logs, managed(d, ca, clock, metrics) as (state, store):
        first = state.issuer
        with sqlite3.connect(d / "meshca.db") as other:  # the table is gone: every insert fails
            other.execute("ALTER TABLE issuer_certs RENAME TO issuer_certs_away")
        clock.now = preparation_time(first)
        state.poll()
        clock.advance(timedelta(seconds=1))
        state.poll()
        assert [s for s, _ in state.in_use()] == ["active"]  # nothing unrecorded is kept
        assert state.issuer is first and state.usable
        with sqlite3.connect(d / "meshca.db") as other:
            other.execute("ALTER TABLE issuer_certs_away RENAME TO issuer_certs")
        clock.advance(timedelta(seconds=1))
        state.poll()
        assert [s for s, _ in state.in_use()] == ["active", "prepared"]
        assert len(store.issuer_certs()) == 2
    failed = [e for e in logs if e["event"] == "issuer.mint_failed"]
    assert len(failed) == 1  # the same reason at the next poll is counted, not logged again
    assert "issuer certificate" in failed[0]["reason"]
    assert failed[0]["serving"] == fp(first.certificate)[:23]
    value = metrics.registry.get_sample_value
    assert value("meshca_rotations_total", {"kind": "issuer", "result": "failure"}) == 2


def _write_anchor(d: Path, anchor: Any, key: meshca.PrivateKey, *, key_only: bool = False) -> None:
    os.unlink(d / "trust-anchor.key")
    meshca.write_private_key(d / "trust-anchor.key", key)
    if not key_only:
        atomic_write(d / "trust-anchor.crt", certificates_pem([anchor]))


def test_anchor_prepare_activate_retire_as_the_anchor_commands_write_them(d: Path) -> None:
    clock = FrozenClock()
    ca = TestCA(TD, now=clock())
    new = TestCA(TD, now=clock())
    metrics = Metrics(managed=True)
    with capture_logs() as logs, managed(d, ca, clock, metrics) as (state, _):
        first = state.issuer
        changed = state.change_event()
        # prepare: the new anchor joins the bundle; the issuers stay
        atomic_write(d / "bundle.pem", certificates_pem([ca.anchor, new.anchor]))
        clock.advance(timedelta(seconds=1))
        assert not state.poll()
        assert changed.is_set() and state.sequence == 2
        assert set(state.bundle.anchors) == {ca.anchor, new.anchor}
        assert state.issuer is first
        anchors = series(metrics, "meshca_anchor_expiry_timestamp_seconds")
        assert {dict(k)["fingerprint"] for k in anchors} == {fp(ca.anchor)[:23], fp(new.anchor)[:23]}

        # activate, caught between the key and the certificate: retried, never fatal
        _write_anchor(d, new.anchor, new.anchor_key, key_only=True)
        clock.advance(timedelta(seconds=1))
        assert not state.poll()
        clock.advance(timedelta(seconds=1))
        assert not state.poll()
        assert state.issuer is first and state.usable
        _write_anchor(d, new.anchor, new.anchor_key)
        clock.advance(timedelta(seconds=1))
        assert state.poll()
        assert state.issuer.anchor == new.anchor
        assert dict(state.in_use())["old"] is first  # its leaves stay valid: kept, listed
        assert state.sequence == 2  # the bundle did not change
        issued = state.issuer.sign(p256().public_key(), WEB, now=clock())
        meshca.verify_chain([issued.leaf, *issued.intermediates], state.bundle, at=clock())

        # retire: the old anchor leaves the bundle, the issuers stay
        atomic_write(d / "bundle.pem", certificates_pem([new.anchor]))
        clock.advance(timedelta(seconds=1))
        state.poll()
        assert state.sequence == 3 and state.bundle.anchors == (new.anchor,)
        anchors = series(metrics, "meshca_anchor_expiry_timestamp_seconds")
        assert {dict(k)["fingerprint"] for k in anchors} == {fp(new.anchor)[:23]}
    refused = [e for e in logs if e["event"] == "anchor.reload_failed"]
    assert len(refused) == 1  # once per state of the files, not at every poll
    assert "is not the key of" in refused[0]["reason"]
    [activated] = [e for e in logs if e["event"] == "anchor.activated"]
    assert activated["anchor"] == fp(new.anchor)[:23] and activated["previous"] == fp(ca.anchor)[:23]
    value = metrics.registry.get_sample_value
    assert value("meshca_rotations_total", {"kind": "anchor", "result": "success"}) == 1


def test_a_bundle_without_the_active_anchor_is_refused(d: Path) -> None:
    clock = FrozenClock()
    ca = TestCA(TD, now=clock())
    metrics = Metrics(managed=True)
    with capture_logs() as logs, managed(d, ca, clock, metrics) as (state, _):
        atomic_write(d / "bundle.pem", certificates_pem([TestCA(TD, now=clock()).anchor]))
        clock.advance(timedelta(seconds=1))
        state.poll()
        assert state.sequence == 1 and state.bundle.anchors == (ca.anchor,)
    [refused] = [e for e in logs if e["event"] == "bundle.reload_failed"]
    assert "does not hold the active anchor" in refused["reason"]


_MULTIPROCESS = """
import json, sys
from prometheus_client import CollectorRegistry, multiprocess
from meshca.server._metrics import Labelled, Metrics

metrics = Metrics(multiprocess=True, managed=True)
series = Labelled(metrics.issuer_expiry, metrics.multiprocess)
series.update({("aa", "active"): 1.0, ("bb", "prepared"): 2.0})
series.update({("aa", "old"): 1.0, ("bb", "active"): 2.0})
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, sys.argv[1])
print(json.dumps({
    s.labels["fingerprint"] + "/" + s.labels["state"]: repr(s.value)
    for family in registry.collect()
    for s in family.samples
    if s.name == "meshca_issuer_expiry_timestamp_seconds"
}))
"""


def test_multiprocess_metrics_set_series_no_longer_in_use_to_nan(tmp_path: Path) -> None:
    """Under `serve --workers N` (prometheus_client reads its mode at import: a process of its own)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _MULTIPROCESS, str(tmp_path)], env=env, capture_output=True, check=True, timeout=60
    )
    found = json.loads(out.stdout)
    assert found == {"aa/active": "nan", "bb/prepared": "nan", "aa/old": "1.0", "bb/active": "2.0"}


@pytest.mark.parametrize(
    ("issuer_ttl", "leaf_ttl", "error"),
    [
        (timedelta(seconds=59), timedelta(seconds=5), "at least 1 minute"),
        (timedelta(minutes=1), timedelta(seconds=11), "does not fit"),
        (timedelta(days=7), timedelta(days=2), "does not fit"),
        # a long issuer hands over 7 days before its end, not a sixth of its life: a 10-day leaf is cut
        (timedelta(days=90), timedelta(days=10), "7d of its life left"),
    ],
)
def test_issuer_ttls_that_cannot_work_are_refused(issuer_ttl: timedelta, leaf_ttl: timedelta, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        check_issuer_ttl(issuer_ttl, leaf_ttl)
    with pytest.raises(ValueError, match=error):
        ServerConfig(dir=Path("x"), issuer_ttl=issuer_ttl, leaf_ttl=leaf_ttl, max_leaf_ttl=leaf_ttl)
    check_issuer_ttl(timedelta(minutes=1), timedelta(seconds=10))
    check_issuer_ttl(timedelta(days=7), timedelta(hours=24))


# -- file mode


def test_file_mode_logs_issuer_expiring_at_start_at_the_threshold_and_hourly(d: Path) -> None:
    clock = FrozenClock()
    ca = TestCA(TD, now=clock(), issuer_lifetime=timedelta(days=30))  # warned about 10 days ahead (a third)
    store = SqliteStore(d / "meshca.db")
    metrics = Metrics()
    try:
        with capture_logs() as logs:
            state = IssuerState.from_files(ca.write(d), clock, metrics, store)
            assert not [e for e in logs if e["event"] == "issuer.expiring"]
            not_after = ca.issuer_certificate.not_valid_after_utc
            warn = issuer_warning(ca.issuer_certificate.not_valid_before_utc, not_after)
            assert timedelta(days=10) <= warn < timedelta(days=10, minutes=1)
            clock.now = not_after - warn - timedelta(seconds=1)
            state.poll()
            assert not [e for e in logs if e["event"] == "issuer.expiring"]
            clock.advance(timedelta(seconds=1))
            state.poll()  # crossing
            for _ in range(59):
                clock.advance(timedelta(minutes=1))
                state.poll()  # not at every poll
            clock.advance(timedelta(minutes=1))
            state.poll()  # an hour later
        expiring = [e for e in logs if e["event"] == "issuer.expiring"]
        assert len(expiring) == 2
        assert expiring[0]["issuer"] == fp(ca.issuer_certificate)[:23]
        assert expiring[0]["left"] == warn.total_seconds()
        assert expiring[0]["log_level"] == "warning"
        # the loaded issuer is in the store too
        [recorded] = store.issuer_certs()
        assert recorded.fingerprint == fp(ca.issuer_certificate)
        assert metrics.registry.get_sample_value("meshca_next_rotation_timestamp_seconds") is None

        # a restart inside the window warns at once
        with capture_logs() as logs:
            IssuerState.from_files(meshca.TrustDir.at(d), clock, Metrics(), store)
        assert [e["event"] for e in logs if e["event"] == "issuer.expiring"] == ["issuer.expiring"]
    finally:
        store.close()
