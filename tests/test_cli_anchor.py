"""`meshca anchor prepare|activate|retire|list`: the staged rotation in a trust directory, on a frozen clock."""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from support.certbuild import NOW
from support.procs import Result, assert_clean_failure
from support.softhsm import SoftHsm

import meshca
from meshca.pki._anchors import chains_to
from meshca.pki._certs import fingerprint
from meshca.pki._lifecycle import mint_issuer
from meshca.server._state import issuer_record, load_anchor
from meshca.server._store import open_store
from meshca.testing import FrozenClock

Run = Callable[..., Result]
H, D = timedelta(hours=1), timedelta(days=1)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _bundle(d: Path) -> set[x509.Certificate]:
    return set(meshca.TrustDir.at(d).load_bundle().anchors)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
def d(tmp_path: Path, cli: Run, clock: FrozenClock) -> Path:
    d = tmp_path / "ca"
    assert cli("init", "--trust-domain", "example.org", "--dir", d, clock=clock).code == 0
    return d


def ok(result: Result) -> Result:
    assert result.code == 0, result
    return result


def test_a_staged_rotation_from_prepare_to_retire(d: Path, cli: Run, clock: FrozenClock) -> None:
    a = _cert(d / "trust-anchor.crt")
    old_issuer = _cert(d / "issuer.crt")
    clock.advance(H)
    # 1. prepare: B joins the bundle; A still signs.
    out = ok(cli("anchor", "prepare", "--dir", d, clock=clock)).stdout
    b = _cert(d / "trust-anchor.next.crt")
    assert f"prepared anchor {fingerprint(b)[:23]}" in out
    assert "activate from 2026-04-01T13:00:00Z (--min-age 90d)" in out
    assert _bundle(d) == {a, b}
    assert _cert(d / "trust-anchor.crt") == a and _cert(d / "issuer.crt") == old_issuer
    assert _mode(d / "trust-anchor.next.key") == 0o600
    assert _mode(d / "anchors.json") == 0o600
    listed = json.loads(ok(cli("anchor", "list", "--dir", d, "--json")).stdout)
    assert [(e["fingerprint"], e["state"]) for e in listed] == [
        (fingerprint(b), "prepared"),
        (fingerprint(a), "active"),
    ]
    assert listed[0]["prepared_at"] == (NOW + H).isoformat()
    assert listed[0]["not_after"] == b.not_valid_after_utc.isoformat()

    # A leaf issued while A signs, recorded in DIR/meshca.db.
    clock.advance(D)
    ok(cli("issue", "--dir", d, "--spiffe-id", "spiffe://example.org/web", "--cert-out", d.parent / "w.pem",
           "--key-out", d.parent / "w.key", "--ttl", "24h", clock=clock))  # fmt: skip

    # 2. activate: refused until B has been in the bundle for --min-age (default: serve's max leaf TTL, 90 days).
    refused = cli("anchor", "activate", "--dir", d, clock=clock)
    assert_clean_failure(refused, 1)
    assert "activation is allowed from 2026-04-01T13:00:00Z (--min-age 90d), or pass --force" in refused.stderr
    refused = cli("anchor", "activate", "--dir", d, "--min-age", "2d", clock=clock)
    assert_clean_failure(refused, 1)
    out = ok(cli("anchor", "activate", "--dir", d, "--min-age", "24h", clock=clock)).stdout
    activated_at = clock()
    assert f"activated anchor {fingerprint(b)[:23]}; {fingerprint(a)[:23]} is retiring" in out
    assert _cert(d / "trust-anchor.crt") == b
    assert meshca.load_private_key((d / "trust-anchor.key").read_bytes()).public_key() == b.public_key()
    assert _cert(d / "trust-anchor.old.crt") == a
    assert meshca.load_private_key((d / "trust-anchor.old.key").read_bytes()).public_key() == a.public_key()
    assert not (d / "trust-anchor.next.crt").exists() and not (d / "trust-anchor.next.key").exists()
    assert _bundle(d) == {a, b}  # the bundle does not change on activation
    # The issuer is re-issued under B: a new key (0600), the same lifetime.
    issuer = meshca.TrustDir.at(d).load_issuer()
    assert chains_to([issuer.certificate], b) and not chains_to([issuer.certificate], a)
    assert issuer.certificate.public_key() != old_issuer.public_key()
    assert _mode(d / "issuer.key") == 0o600
    lifetime = issuer.certificate.not_valid_after_utc - issuer.certificate.not_valid_before_utc
    assert lifetime == old_issuer.not_valid_after_utc - old_issuer.not_valid_before_utc
    listed = json.loads(ok(cli("anchor", "list", "--dir", d, "--json")).stdout)
    assert [e["state"] for e in listed] == ["active", "retiring"]
    assert listed[0]["activated_at"] == activated_at.isoformat()
    text = ok(cli("anchor", "list", "--dir", d)).stdout.splitlines()
    assert text[0].startswith(f"active    {fingerprint(b)}  not after ")
    assert text[1].startswith(f"retiring  {fingerprint(a)}  not after ")

    # 3. retire: refused while the grace runs and while the leaf issued under A lives.
    refused = cli("anchor", "retire", "--dir", d, clock=clock)
    assert_clean_failure(refused, 1)
    assert "issuers may sign under it until 5m after activation" in refused.stderr
    assert "1 recorded leaves issued before then may chain to it" in refused.stderr
    assert "earliest safe time 2026-01-03T13:00:00Z; or pass --force" in refused.stderr  # the leaf's NotAfter
    clock.advance(timedelta(minutes=10))  # past the grace, the leaf still lives
    refused = cli("anchor", "retire", "--dir", d, clock=clock)
    assert_clean_failure(refused, 1)
    assert "grace" not in refused.stderr and "earliest safe time 2026-01-03T13:00:00Z" in refused.stderr
    clock.advance(D)  # the leaf (issued at NOW + 25h for 24h) has expired
    out = ok(cli("anchor", "retire", "--dir", d, clock=clock)).stdout
    assert f"retired anchor {fingerprint(a)[:23]}" in out
    assert _bundle(d) == {b}
    assert not (d / "trust-anchor.old.crt").exists() and not (d / "trust-anchor.old.key").exists()
    assert fingerprint(a) not in (d / "anchors.json").read_text()
    assert [e["state"] for e in json.loads(ok(cli("anchor", "list", "--dir", d, "--json")).stdout)] == ["active"]
    # What the directory holds still checks out, and a next rotation can start.
    ok(cli("check", "--dir", d, clock=clock))
    ok(cli("anchor", "prepare", "--dir", d, clock=clock))


@pytest.mark.parametrize(
    ("steps", "command", "message"),
    [
        ([], ["activate"], "no prepared anchor to activate: run meshca anchor prepare first"),
        ([], ["retire"], "no retiring anchor: meshca anchor activate makes the active one retiring"),
        ([["prepare"]], ["prepare"], "is already prepared: activate it first"),
        ([["prepare"], ["activate", "--force"]], ["prepare"], "is still retiring: retire it first"),
        ([["prepare"]], ["retire"], "no retiring anchor"),
        ([["prepare"]], ["activate", "--min-age", "oops"], "argument --min-age"),
    ],
    ids=[
        "activate-unprepared",
        "retire-nothing",
        "prepare-twice",
        "prepare-while-retiring",
        "retire-prepared",
        "bad-age",
    ],
)
def test_each_step_refuses_out_of_order_in_one_line(
    d: Path, cli: Run, clock: FrozenClock, steps: list[list[str]], command: list[str], message: str
) -> None:
    for step in steps:
        ok(cli("anchor", *step, "--dir", d, clock=clock))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    result = cli("anchor", *command, "--dir", d, clock=clock)
    assert_clean_failure(result)
    assert message in result.stderr
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing written


@pytest.mark.parametrize("crash_after", ["retiring-copy", "active-key", "active-cert"])
def test_an_interrupted_activation_is_finished_by_running_it_again(
    d: Path, cli: Run, clock: FrozenClock, crash_after: str
) -> None:
    a = _cert(d / "trust-anchor.crt")
    a_key = (d / "trust-anchor.key").read_bytes()
    ok(cli("anchor", "prepare", "--dir", d, clock=clock))
    b = _cert(d / "trust-anchor.next.crt")
    # What activate had written when it stopped, in its order.
    (d / "trust-anchor.old.key").write_bytes(a_key)
    (d / "trust-anchor.old.key").chmod(0o600)
    (d / "trust-anchor.old.crt").write_bytes((d / "trust-anchor.crt").read_bytes())
    if crash_after in ("active-key", "active-cert"):
        (d / "trust-anchor.key").write_bytes((d / "trust-anchor.next.key").read_bytes())
    if crash_after == "active-cert":
        (d / "trust-anchor.crt").write_bytes((d / "trust-anchor.next.crt").read_bytes())
    out = ok(cli("anchor", "activate", "--dir", d, "--force", clock=clock)).stdout
    assert f"activated anchor {fingerprint(b)[:23]}; {fingerprint(a)[:23]} is retiring" in out
    assert _cert(d / "trust-anchor.crt") == b and _cert(d / "trust-anchor.old.crt") == a
    assert (d / "trust-anchor.old.key").read_bytes() == a_key  # A's key is never lost
    assert meshca.load_private_key((d / "trust-anchor.key").read_bytes()).public_key() == b.public_key()
    assert chains_to([meshca.TrustDir.at(d).load_issuer().certificate], b)
    assert [e["state"] for e in json.loads(ok(cli("anchor", "list", "--dir", d, "--json")).stdout)] == [
        "active",
        "retiring",
    ]


def test_a_directory_without_an_anchor_is_refused(tmp_path: Path, cli: Run) -> None:
    for action in ("prepare", "activate", "retire", "list"):
        result = cli("anchor", action, "--dir", tmp_path)
        assert_clean_failure(result, 1)
        assert f"no active anchor at {tmp_path / 'trust-anchor.crt'} (run meshca init)" in result.stderr


@pytest.mark.parametrize("when", ["yesterday", "2026-03-01T12:00:00"], ids=["not-a-time", "no-utc-offset"])
def test_an_unreadable_anchor_record_is_refused_in_one_line(d: Path, cli: Run, clock: FrozenClock, when: str) -> None:
    ok(cli("anchor", "prepare", "--dir", d, clock=clock))
    record = json.loads((d / "anchors.json").read_text())
    for times in record["anchors"].values():
        times["prepared_at"] = when  # a time without an offset could not be compared with the clock's
    (d / "anchors.json").write_text(json.dumps(record))
    for action in ("list", "activate"):
        result = cli("anchor", action, "--dir", d, clock=clock)
        assert_clean_failure(result, 1)
        assert f"{d / 'anchors.json'} is not an anchor record meshca wrote" in result.stderr


def test_activation_without_a_record_of_preparation_needs_force(d: Path, cli: Run, clock: FrozenClock) -> None:
    ok(cli("anchor", "prepare", "--dir", d, clock=clock))
    (d / "anchors.json").unlink()
    clock.advance(365 * D)
    result = cli("anchor", "activate", "--dir", d, clock=clock)
    assert_clean_failure(result)
    assert "no record of when anchor" in result.stderr
    ok(cli("anchor", "activate", "--dir", d, "--force", clock=clock))


@pytest.mark.parametrize("mode", [(), ("--manage-issuers",)], ids=["file-mode", "managed-with-issuer-files"])
def test_retire_refuses_while_the_issuer_chains_only_to_the_old_anchor(
    d: Path, cli: Run, clock: FrozenClock, mode: tuple[str, ...]
) -> None:
    old_issuer = ((d / "issuer.crt").read_bytes(), (d / "issuer.key").read_bytes())
    ok(cli("anchor", "prepare", "--dir", d, clock=clock))
    ok(cli("anchor", "activate", "--dir", d, "--force", clock=clock))
    # An operator puts the old issuer back (say, from a Secret that was not updated).
    (d / "issuer.key").write_bytes(old_issuer[1])
    (d / "issuer.crt").write_bytes(old_issuer[0])
    clock.advance(365 * D)
    result = cli("anchor", "retire", "--dir", d, *mode, clock=clock)
    assert_clean_failure(result)
    assert "the active issuer chains only to it" in result.stderr
    assert "no safe time until that changes; or pass --force" in result.stderr
    ok(cli("anchor", "retire", "--dir", d, "--force", clock=clock))
    assert _bundle(d) == {_cert(d / "trust-anchor.crt")}


def test_retire_reads_the_store_named_by_store(d: Path, tmp_path: Path, cli: Run, clock: FrozenClock) -> None:
    store = tmp_path / "elsewhere.db"
    ok(cli("issue", "--dir", d, "--store", f"sqlite://{store}", "--spiffe-id", "spiffe://example.org/web",
           "--cert-out", tmp_path / "w.pem", "--key-out", tmp_path / "w.key", "--ttl", "48h", clock=clock))  # fmt: skip
    ok(cli("anchor", "prepare", "--dir", d, clock=clock))
    ok(cli("anchor", "activate", "--dir", d, "--force", clock=clock))
    clock.advance(D)
    ok(cli("anchor", "retire", "--dir", d, "--json", clock=clock))  # DIR/meshca.db records nothing
    ok(cli("anchor", "prepare", "--dir", d, clock=clock))
    ok(cli("anchor", "activate", "--dir", d, "--force", clock=clock))
    clock.advance(H)
    result = cli("anchor", "retire", "--dir", d, "--store", f"sqlite://{store}", "--grace", "1m", clock=clock)
    assert_clean_failure(result)
    assert "earliest safe time 2026-01-03T12:00:00Z" in result.stderr  # issued at NOW for 48h


def test_encrypted_keys_stay_encrypted_and_need_the_passphrase(tmp_path: Path, cli: Run, clock: FrozenClock) -> None:
    d, secret = tmp_path / "ca", tmp_path / "pass"
    secret.write_text("correct horse\n")
    ok(cli("init", "--trust-domain", "example.org", "--dir", d, "--passphrase-file", secret, clock=clock))
    ok(cli("anchor", "prepare", "--dir", d, "--passphrase-file", secret, clock=clock))
    assert b"ENCRYPTED" in (d / "trust-anchor.next.key").read_bytes()
    result = cli("anchor", "activate", "--dir", d, "--force", clock=clock)
    assert_clean_failure(result)
    assert (d / "trust-anchor.next.crt").exists()  # nothing moved
    ok(cli("anchor", "activate", "--dir", d, "--force", "--passphrase-file", secret, clock=clock))
    for key in ("trust-anchor.key", "trust-anchor.old.key", "issuer.key"):
        assert b"ENCRYPTED" in (d / key).read_bytes(), key
    meshca.TrustDir.at(d).load_issuer(passphrase=b"correct horse")


def test_an_anchor_key_on_a_pkcs11_token(tmp_path: Path, cli: Run, clock: FrozenClock, softhsm: SoftHsm) -> None:
    d = tmp_path / "ca"
    ok(cli("init", "--trust-domain", "example.org", "--dir", d, "--anchor-key-uri", softhsm.uri("rot-a"), clock=clock))
    ok(cli("anchor", "prepare", "--dir", d, "--key-uri", softhsm.uri("rot-b"), clock=clock))
    assert (d / "trust-anchor.next.key.uri").read_text().strip() == softhsm.uri("rot-b")
    ok(cli("anchor", "activate", "--dir", d, "--force", clock=clock))
    # The token keys' URIs moved like key files; the issuer was signed on the token.
    assert (d / "trust-anchor.key.uri").read_text().strip() == softhsm.uri("rot-b")
    assert (d / "trust-anchor.old.key.uri").read_text().strip() == softhsm.uri("rot-a")
    assert not (d / "trust-anchor.key").exists()
    issuer = meshca.TrustDir.at(d).load_issuer()
    assert chains_to([issuer.certificate], _cert(d / "trust-anchor.crt"))
    clock.advance(D)
    ok(cli("anchor", "retire", "--dir", d, clock=clock))
    assert not (d / "trust-anchor.old.key.uri").exists()


def _mint(d: Path, writer: str, clock: FrozenClock, ttl: timedelta = 7 * D) -> x509.Certificate:
    """What a replica of `serve --manage-issuers` does: an issuer from the active anchor, recorded in the store."""
    tdir = meshca.TrustDir.at(d)
    anchor = load_anchor(tdir, None)
    issuer = mint_issuer(anchor.certificate, anchor.key, tdir.load_bundle(), now=clock(), ttl=ttl)
    store = open_store(None, d)
    try:
        store.record_issuer(issuer_record(issuer, writer, clock()))
    finally:
        store.close()
    return issuer.certificate


def test_managed_retire_waits_for_every_replica_to_switch(tmp_path: Path, cli: Run, clock: FrozenClock) -> None:
    d = tmp_path / "ca"
    ok(cli("init", "--trust-domain", "example.org", "--dir", d, clock=clock))
    (d / "issuer.crt").unlink()  # a managed directory: the service mints its issuers
    (d / "issuer.key").unlink()
    _mint(d, "host/1", clock)
    old_r2 = _mint(d, "host/2", clock)
    ok(cli("anchor", "prepare", "--dir", d, clock=clock))
    activated = ok(cli("anchor", "activate", "--dir", d, "--force", clock=clock))
    assert "a service with --manage-issuers switches by itself" in activated.stdout
    assert not (d / "issuer.crt").exists()
    clock.advance(timedelta(seconds=1))
    _mint(d, "host/1", clock)  # host/1 switched; host/2 has not
    listed = json.loads(ok(cli("anchor", "list", "--dir", d, "--json", clock=clock)).stdout)
    assert {a["state"]: a["live_issuers"] for a in listed} == {"active": 1, "retiring": 2}
    clock.advance(H)
    result = cli("anchor", "retire", "--dir", d, "--grace", "1m", clock=clock)
    assert_clean_failure(result)
    assert "replica host/2 still signs with an issuer under it" in result.stderr
    safe = old_r2.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"earliest safe time {safe}" in result.stderr
    # host/2 switches: nothing holds the old anchor any more.
    _mint(d, "host/2", clock)
    old_anchor = _cert(d / "trust-anchor.old.crt")
    retired = json.loads(ok(cli("anchor", "retire", "--dir", d, "--grace", "1m", "--json", clock=clock)).stdout)
    assert retired["retired"] == fingerprint(old_anchor)
    assert _bundle(d) == {_cert(d / "trust-anchor.crt")}


def test_a_replica_that_never_switches_holds_the_anchor_until_its_issuer_expires(
    tmp_path: Path, cli: Run, clock: FrozenClock
) -> None:
    d = tmp_path / "ca"
    ok(cli("init", "--trust-domain", "example.org", "--dir", d, clock=clock))
    stuck = _mint(d, "host/9", clock, ttl=D)  # down, or stuck: the store cannot tell
    ok(cli("anchor", "prepare", "--dir", d, clock=clock))
    ok(cli("anchor", "activate", "--dir", d, "--force", clock=clock))  # issuer files here: re-issued under B
    assert chains_to([_cert(d / "issuer.crt")], _cert(d / "trust-anchor.crt"))
    clock.advance(H)
    # Issuer files here: only --manage-issuers says the service mints its own and reads the replicas' issuers.
    managed = cli("anchor", "retire", "--dir", d, "--grace", "1m", "--manage-issuers", clock=clock)
    assert_clean_failure(managed)
    assert "replica host/9 still signs" in managed.stderr
    # Without it, file mode: DIR/issuer.crt is what signs, and it chains to the new anchor.
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    ok(cli("anchor", "retire", "--dir", copy, "--grace", "1m", clock=clock))
    clock.advance(stuck.not_valid_after_utc - clock())
    ok(cli("anchor", "retire", "--dir", d, "--grace", "1m", "--manage-issuers", clock=clock))
