"""Hot reload of the issuer while clients issue, with the ``..data`` symlink swap of a Kubernetes secret volume."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from structlog.testing import capture_logs
from support.calls import code_of, hpb, native_request
from support.certs import cert, p256, signed_by, spiffe_csr
from support.clocks import MovableClock
from support.ids import TD, WEB
from support.metrics import http_get, sample_value
from support.poll import eventually
from support.procs import ServeProcess
from support.serving import Harness, serving
from support.tokens import add_token

import meshca
from meshca._proto import meshca_identity_pb2_grpc
from meshca.pki._certs import certificates_pem
from meshca.pki._files import atomic_write
from meshca.pki._profiles import CLOCK_SKEW, build_issuer
from meshca.pki._time import system_clock
from meshca.server import SqliteStore
from meshca.server._metrics import Metrics
from meshca.server._state import IssuerState
from meshca.testing import FrozenClock, TestCA

_stamps = itertools.count()


class SecretVolume:
    """A directory laid out like a mounted Kubernetes secret.

    DIR/..2026_01_01_00_00_00.N/issuer.crt   the files of one version
    DIR/..data -> ..2026_01_01_00_00_00.N    swapped atomically by rename
    DIR/issuer.crt -> ..data/issuer.crt      stable names
    """

    NAMES = ("issuer.crt", "issuer.key", "bundle.pem")

    def __init__(self, path: Path, files: dict[str, bytes]) -> None:
        self.path = path
        current = self._write_version(files)
        os.symlink(current, path / "..data")
        for name in self.NAMES:
            os.symlink(Path("..data") / name, path / name)

    def _write_version(self, files: dict[str, bytes]) -> str:
        name = f"..2026_01_01_00_00_00.{next(_stamps)}"
        (self.path / name).mkdir()
        for file, data in files.items():
            (self.path / name / file).write_bytes(data)
            if file.endswith(".key"):
                os.chmod(self.path / name / file, 0o600)
        return name

    def swap(self, files: dict[str, bytes]) -> None:
        old = os.readlink(self.path / "..data")
        new = self._write_version(files)
        os.symlink(new, self.path / "..data_tmp")
        os.replace(self.path / "..data_tmp", self.path / "..data")
        shutil.rmtree(self.path / old)


def issuer_files(certificate: x509.Certificate, key: meshca.PrivateKey, bundle: meshca.TrustBundle) -> dict[str, bytes]:
    return {
        "issuer.crt": certificates_pem([certificate]),
        "issuer.key": meshca.private_key_pem(key),
        "bundle.pem": bundle.to_pem(),
    }


def new_issuer(
    ca: TestCA,
    *,
    lifetime: timedelta = timedelta(days=30),
    age: timedelta = timedelta(),
    not_before: datetime | None = None,
) -> tuple[x509.Certificate, meshca.PrivateKey]:
    """Another issuer signed by ``ca``'s anchor, made ``age`` ago or valid from ``not_before``."""
    key = meshca.generate_key()
    certificate = build_issuer(
        key.public_key(),
        signer_certificate=ca.anchor,
        signer_key=ca.anchor_key,
        trust_domain=meshca.TrustDomain(TD),
        # build_issuer backdates NotBefore by the skew
        now=MovableClock()() - age if not_before is None else not_before + CLOCK_SKEW,
        lifetime=lifetime,
    )
    assert not_before is None or certificate.not_valid_before_utc == not_before
    return certificate, key


def _volume(d: Path, ca: TestCA) -> SecretVolume:
    return SecretVolume(d, issuer_files(ca.issuer_certificate, ca.issuer_key, ca.bundle))


async def _issuer_of_next_leaf(h: Harness, token: str) -> x509.Certificate:
    response = await h.native.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=token))
    meshca.verify_chain([response.leaf, *response.intermediates], h.ca.bundle, at=h.clock())
    [issuer] = response.intermediates
    return cert(issuer)


async def test_symlink_swap_while_clients_issue(d: Path) -> None:
    ca = TestCA(TD)
    volume = _volume(d, ca)
    async with serving(d, ca, write=False) as h:
        replacement, replacement_key = new_issuer(ca)
        old_der = ca.issuer_certificate.public_bytes(Encoding.DER)
        new_der = replacement.public_bytes(Encoding.DER)
        stop = asyncio.Event()
        errors: list[BaseException] = []
        results: list[list[bytes]] = [[] for _ in range(4)]
        straddled = 0  # calls in flight while the reload happened

        def reloads() -> int:
            return len(h.events("issuer.reloaded"))

        async def client(seen: list[bytes]) -> None:
            nonlocal straddled
            token = h.token(WEB, uses=100_000)
            stub = meshca_identity_pb2_grpc.IdentityStub(h.new_channel())
            while not stop.is_set():
                _, csr = spiffe_csr(WEB)
                reloads_before = reloads()
                try:
                    response = await stub.IssueSVID(native_request(csr, join_token=token), timeout=5)
                    straddled += reloads() > reloads_before
                    meshca.verify_chain([response.leaf, *response.intermediates], ca.bundle, at=h.clock())
                    assert signed_by(cert(response.leaf), cert(response.intermediates[0]))
                except Exception as exc:
                    errors.append(exc)
                    return
                seen.append(response.intermediates[0])

        def each_saw(der: bytes, n: int) -> bool:
            assert errors == []
            return all(seen.count(der) >= n for seen in results)

        tasks = [asyncio.create_task(client(seen)) for seen in results]
        await eventually(lambda: each_saw(old_der, 3), what="every client issuing from the old issuer")
        volume.swap(issuer_files(replacement, replacement_key, ca.bundle))
        await eventually(lambda: reloads() == 1, what="the reload")
        await eventually(lambda: each_saw(new_der, 3), what="every client issuing from the new issuer")
        stop.set()
        await asyncio.gather(*tasks)

        assert errors == []
        assert straddled > 0, "no call was in flight during the reload"
        for seen in results:
            assert set(seen) == {old_der, new_der}
            # old until the swap, new after: never back
            first_new = seen.index(new_der)
            assert all(s == new_der for s in seen[first_new:])
        assert await _issuer_of_next_leaf(h, h.token()) == replacement
        # new connections get a server certificate from the new issuer, and work
        fresh = meshca_identity_pb2_grpc.IdentityStub(h.new_channel())
        response = await fresh.IssueSVID(native_request(spiffe_csr(WEB)[1], join_token=h.token()))
        assert cert(response.intermediates[0]) == replacement
        assert h.server.state.serving_svid(("localhost",), timedelta(hours=1)).issuer_fingerprint == (
            replacement.fingerprint(hashes.SHA256()).hex(":")
        )
        assert h.events("issuer.reload_failed") == []


async def test_invalid_replacements_are_refused(d: Path) -> None:
    ca = TestCA(TD)
    volume = _volume(d, ca)
    async with serving(d, ca, write=False, metrics_listen="127.0.0.1:0") as h:
        token = h.token(uses=100)
        other_anchor = TestCA(TD)
        replacement, _ = new_issuer(ca)
        expired, expired_key = new_issuer(ca, lifetime=timedelta(days=1), age=timedelta(days=2))
        bad = {
            "key does not match": issuer_files(replacement, meshca.generate_key(), ca.bundle),
            "issuer of another anchor": issuer_files(
                other_anchor.issuer_certificate, other_anchor.issuer_key, ca.bundle
            ),
            "expired issuer": issuer_files(expired, expired_key, ca.bundle),
            "not a certificate": {**issuer_files(replacement, meshca.generate_key(), ca.bundle), "issuer.crt": b"junk"},
        }
        for n, (name, files) in enumerate(bad.items(), 1):
            volume.swap(files)
            await eventually(lambda n=n: len(h.events("issuer.reload_failed")) == n, what=f"refusal of {name}")
            assert await _issuer_of_next_leaf(h, token) == ca.issuer_certificate, name
            assert h.server.state.usable
        assert all(e["reason"] for e in h.events("issuer.reload_failed"))
        assert h.events("issuer.reloaded") == []
        text = await h.scrape()
        assert sample_value(text, "meshca_issuer_reloads_total", result="failure") == len(bad)
        assert sample_value(text, "meshca_issuer_reloads_total", result="success") is None
        health = await h.health.Check(hpb.HealthCheckRequest(service=""))
        assert health.status == hpb.HealthCheckResponse.SERVING

        # and a good one after the bad ones is taken
        good, good_key = new_issuer(ca)
        volume.swap(issuer_files(good, good_key, ca.bundle))
        await eventually(lambda: bool(h.events("issuer.reloaded")), what="the good reload")
        assert await _issuer_of_next_leaf(h, token) == good
        assert sample_value(await h.scrape(), "meshca_issuer_reloads_total", result="success") == 1


async def test_a_new_issuer_restores_service_after_expiry(d: Path, server_ca: TestCA) -> None:
    """Rotation is the way out of an expired issuer: health goes back to SERVING without a restart."""
    async with serving(d, server_ca, metrics_listen="127.0.0.1:0") as h:
        token = h.token(uses=5, ttl=timedelta(days=3650))
        h.clock.advance(server_ca.issuer_certificate.not_valid_after_utc - h.clock() + timedelta(seconds=1))
        await eventually(lambda: not h.server.state.usable, what="expiry")
        assert await code_of(h.native.IssueSVID(native_request(spiffe_csr()[1], join_token=token))) == (
            grpc.StatusCode.UNAVAILABLE
        )
        key = meshca.generate_key()
        renewed = build_issuer(
            key.public_key(),
            signer_certificate=server_ca.anchor,
            signer_key=server_ca.anchor_key,
            trust_domain=meshca.TrustDomain(TD),
            now=h.clock(),
            lifetime=timedelta(days=365),
        )
        meshca.write_private_key(d / "issuer.key", key, overwrite=True)
        (d / "issuer.crt").write_bytes(certificates_pem([renewed]))
        await eventually(lambda: h.server.state.usable, what="the new issuer")

        async def serving_again() -> bool:
            return (await h.health.Check(hpb.HealthCheckRequest(service=""))).status == hpb.HealthCheckResponse.SERVING

        await eventually(serving_again, what="health SERVING again")
        assert await _issuer_of_next_leaf(h, token) == renewed


# -- an issuer staged ahead of its NotBefore (cert-manager's rotation)


def write_issuer(d: Path, certificate: x509.Certificate, key: meshca.PrivateKey) -> None:
    meshca.write_private_key(d / "issuer.key", key, overwrite=True)
    atomic_write(d / "issuer.crt", certificates_pem([certificate]))


@contextlib.contextmanager
def state_on(
    d: Path, ca: TestCA, clock: FrozenClock, metrics: Metrics
) -> Iterator[tuple[IssuerState, list[dict[str, Any]]]]:
    """An `IssuerState` on ``ca`` written to ``d``, under ``clock``, and the log events of its life."""
    store = SqliteStore(d / "meshca.db")
    try:
        with capture_logs() as logs:
            yield IssuerState.from_files(ca.write(d), clock, metrics, store), logs
    finally:
        store.close()


def test_an_issuer_staged_ahead_takes_over_at_its_not_before(d: Path) -> None:
    clock = FrozenClock()
    ca = TestCA(TD, now=clock(), issuer_lifetime=timedelta(minutes=1))  # a minute left
    metrics = Metrics()
    with state_on(d, ca, clock, metrics) as (state, logs):
        takes_over = clock() + timedelta(seconds=15)
        staged, staged_key = new_issuer(ca, not_before=takes_over, lifetime=timedelta(days=1))
        write_issuer(d, staged, staged_key)
        assert not state.poll()
        for _ in range(14):  # not valid yet: retried at every poll, quietly
            clock.advance(timedelta(seconds=1))
            assert not state.poll()
            assert state.issuer.certificate == ca.issuer_certificate
        clock.advance(timedelta(seconds=1))
        assert state.poll()
        assert state.issuer.certificate == staged
        # the server's own TLS certificate moves to the new issuer
        svid = state.serving_svid(("localhost",), timedelta(hours=1))
        assert svid.issuer_fingerprint == staged.fingerprint(hashes.SHA256()).hex(":")
        # and the service outlives the old issuer
        clock.advance(timedelta(minutes=2))
        state.poll()
        assert state.usable
        leaf = cert(state.issuer.sign(p256().public_key(), WEB, now=clock()).leaf_der())
        assert signed_by(leaf, staged)
    events = [e["event"] for e in logs if e["event"].startswith("issuer.")]
    assert events == ["issuer.staged", "issuer.reloaded"]
    [staged_event] = [e for e in logs if e["event"] == "issuer.staged"]
    assert staged_event["takes_over"] == takes_over.isoformat()
    value = metrics.registry.get_sample_value
    assert value("meshca_issuer_reloads_total", {"result": "failure"}) is None
    assert value("meshca_issuer_reloads_total", {"result": "staged"}) == 1
    assert value("meshca_issuer_reloads_total", {"result": "success"}) == 1


def test_a_staged_set_is_checked_now_and_dropped_when_replaced(d: Path) -> None:
    clock = FrozenClock()
    ca = TestCA(TD, now=clock())
    with state_on(d, ca, clock, Metrics()) as (state, logs):
        # not valid yet, and wrong for another reason: refused at once, as any bad set
        staged, _ = new_issuer(ca, not_before=clock() + timedelta(seconds=15), lifetime=timedelta(days=1))
        write_issuer(d, staged, meshca.generate_key())
        assert not state.poll()
        assert [e["event"] for e in logs if e["event"].startswith("issuer.")] == ["issuer.reload_failed"]
        # a good staged set, then another write before it is due: the later set decides
        write_issuer(d, *new_issuer(ca, not_before=clock() + timedelta(seconds=15), lifetime=timedelta(days=1)))
        assert not state.poll()
        later, later_key = new_issuer(ca, not_before=clock() + timedelta(seconds=30), lifetime=timedelta(days=1))
        write_issuer(d, later, later_key)
        assert not state.poll()
        clock.advance(timedelta(seconds=20))
        assert not state.poll()
        assert state.issuer.certificate == ca.issuer_certificate
        clock.advance(timedelta(seconds=10))
        assert state.poll()
        assert state.issuer.certificate == later


def _wait_for_events(server: ServeProcess, name: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while sum(e["event"] == name for e in server.events) < count:
        assert time.monotonic() < deadline, f"no {count} {name} events:\n" + "\n".join(server.lines)
        time.sleep(0.05)


def test_a_real_server_switches_to_a_staged_issuer_without_a_failure(d: Path) -> None:
    """`meshca serve --workers 2`, its issuer expiring in ~10 s and the next one staged ~3 s ahead: nothing fails."""
    ca = TestCA(TD)
    volume = _volume(d, ca)
    store = SqliteStore(d / "meshca.db")
    token = add_token(store, uses=1000)
    store.close()
    with ServeProcess(d, "--workers", "2") as server:
        port, metrics_port = server.wait_workers(2)
        # The issuer about to expire goes in once the workers run, so a slow start cannot eat its life.
        expiring, expiring_key = new_issuer(ca, lifetime=timedelta(seconds=10))
        volume.swap(issuer_files(expiring, expiring_key, ca.bundle))
        _wait_for_events(server, "issuer.reloaded", 2)
        assert http_get(metrics_port, "/readyz")[0] == 200
        takes_over = system_clock().replace(microsecond=0) + timedelta(seconds=3)  # certificates keep whole seconds
        assert takes_over < expiring.not_valid_after_utc - timedelta(seconds=2), "the first reload took too long"
        staged, staged_key = new_issuer(ca, not_before=takes_over, lifetime=timedelta(days=1))
        volume.swap(issuer_files(staged, staged_key, ca.bundle))
        issuers = set()
        while system_clock() < expiring.not_valid_after_utc + timedelta(seconds=2):
            # a new connection each time: a TLS handshake against the server's current certificate
            with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca.bundle.to_pem())) as ch:
                response = meshca_identity_pb2_grpc.IdentityStub(ch).IssueSVID(
                    native_request(spiffe_csr(WEB)[1], join_token=token), timeout=5
                )
            meshca.verify_chain([response.leaf, *response.intermediates], ca.bundle, at=system_clock())
            issuers.add(cert(response.intermediates[0]))
            assert http_get(metrics_port, "/readyz")[0] == 200  # a staged issuer does not make the service unready
            time.sleep(0.1)
        assert issuers == {expiring, staged}
        server.terminate()
    events = [e["event"] for e in server.events if e["event"].startswith("issuer.") and e["event"] != "issuer.expiring"]
    # each worker: the expiring issuer taken, the next one staged, then taken
    assert sorted(events) == ["issuer.reloaded"] * 4 + ["issuer.staged"] * 2
    # a third of its 10 s lifetime before its end, each worker said the first one was expiring
    assert {e["worker"] for e in server.events if e["event"] == "issuer.expiring"} == {0, 1}


async def test_a_reload_from_a_key_others_can_write_is_refused(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        token = h.token(uses=10)
        replacement, key = new_issuer(server_ca)
        loose_key = d / ".issuer.key.new"
        loose_key.write_bytes(meshca.private_key_pem(key))
        os.chmod(loose_key, 0o660)
        atomic_write(d / "issuer.crt", certificates_pem([replacement]))
        os.replace(loose_key, d / "issuer.key")
        unsafe = f"{(d / 'issuer.key').resolve()} is writable by other users (mode 0660)"
        await eventually(
            lambda: any(unsafe in e["reason"] for e in h.events("issuer.reload_failed")), what="the refusal"
        )
        assert await _issuer_of_next_leaf(h, token) == server_ca.issuer_certificate
        assert h.events("issuer.reloaded") == []
        # `chmod go-w`, as the refusal says, is a change: the set is taken
        os.chmod(d / "issuer.key", 0o600)
        await eventually(lambda: bool(h.events("issuer.reloaded")), what="the reload")
        assert await _issuer_of_next_leaf(h, token) == replacement
