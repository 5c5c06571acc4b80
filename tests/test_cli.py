"""The ``meshca`` command, run as the installed console script and in-process through `meshca.cli.main`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.certbuild import NOW
from support.procs import Result, assert_clean_failure

import meshca
from meshca import SpiffeId, TrustBundle, TrustDomain
from meshca.cli import build_parser
from meshca.cli._options import duration
from meshca.pki._time import format_duration, parse_duration
from meshca.testing import FrozenClock, TestCA

Run = Callable[..., Result]

WEB = "spiffe://example.org/ns/default/sa/web"
FILES = ["bundle.pem", "issuer.crt", "issuer.key", "trust-anchor.crt", "trust-anchor.key"]
LOG_FILES = ["log-signing.key", "log-signing.pub"]  # the issuance log's checkpoint key, kept by --force


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def initialized(tmp_path: Path, cli: Run) -> Path:
    ca = tmp_path / "ca"
    result = cli("init", "--trust-domain", "example.org", "--dir", ca)
    assert result.code == 0, result
    return ca


@pytest.fixture
def initialized_by_script(tmp_path: Path, meshca_cmd: Run) -> Path:
    ca = tmp_path / "ca"
    result = meshca_cmd("init", "--trust-domain", "example.org", "--dir", ca)
    assert result.code == 0, result
    assert result.stderr == ""
    assert "initialized trust domain example.org" in result.stdout
    return ca


# -- init


def test_init_writes_seven_files_with_private_keys(initialized_by_script: Path) -> None:
    initialized = initialized_by_script
    assert sorted(p.name for p in initialized.iterdir()) == sorted(FILES + LOG_FILES)
    assert _mode(initialized / "trust-anchor.key") == 0o600
    assert _mode(initialized / "issuer.key") == 0o600
    assert _mode(initialized / "log-signing.key") == 0o600
    log_key = meshca.load_private_key((initialized / "log-signing.key").read_bytes())
    assert meshca.key_type_of(log_key) is meshca.KeyType.EC_P256
    assert meshca.TrustDir.at(initialized).load_log_public_key() == log_key.public_key()
    for cert in ("trust-anchor.crt", "issuer.crt", "bundle.pem", "log-signing.pub"):
        assert not _mode(initialized / cert) & 0o022, "certificates are written by the owner only"
    tdir = meshca.TrustDir.at(initialized)
    issuer = tdir.load_issuer()
    assert issuer.trust_domain == TrustDomain("example.org")
    assert tdir.load_bundle().anchors == tuple(x509.load_pem_x509_certificates(tdir.anchor_cert.read_bytes()))


def test_init_refuses_to_overwrite(initialized_by_script: Path, meshca_cmd: Run) -> None:
    initialized = initialized_by_script
    before = {name: (initialized / name).read_bytes() for name in FILES}
    result = meshca_cmd("init", "--trust-domain", "example.org", "--dir", initialized)
    assert_clean_failure(result, 1)
    assert "exists" in result.stderr
    assert "--force" in result.stderr
    assert {name: (initialized / name).read_bytes() for name in FILES} == before
    assert sorted(p.name for p in initialized.iterdir()) == sorted(FILES + LOG_FILES)


def test_init_force_replaces(initialized_by_script: Path, meshca_cmd: Run) -> None:
    initialized = initialized_by_script
    before = {name: (initialized / name).read_bytes() for name in FILES + LOG_FILES}
    result = meshca_cmd("init", "--trust-domain", "example.org", "--dir", initialized, "--force")
    assert result.code == 0, result
    after = {name: (initialized / name).read_bytes() for name in FILES + LOG_FILES}
    assert all(after[n] != before[n] for n in FILES)
    # The log's checkpoints were signed with the log key: a new trust domain does not orphan them.
    assert all(after[n] == before[n] for n in LOG_FILES)
    assert _mode(initialized / "issuer.key") == 0o600
    meshca.TrustDir.at(initialized).load_issuer()


def test_init_json(tmp_path: Path, cli: Run) -> None:
    result = cli("init", "--trust-domain", "example.org", "--dir", tmp_path / "ca", "--json")
    assert result.code == 0
    data = json.loads(result.stdout)
    assert data["trust_domain"] == "example.org"
    assert sorted(Path(f).name for f in data["files"]) == sorted(FILES + LOG_FILES)


def test_init_with_passphrase(tmp_path: Path, cli: Run) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    ca = tmp_path / "ca"
    assert cli("init", "--trust-domain", "example.org", "--dir", ca, "--passphrase-file", pw).code == 0
    assert b"ENCRYPTED" in (ca / "issuer.key").read_bytes()
    assert b"ENCRYPTED" in (ca / "log-signing.key").read_bytes()
    meshca.TrustDir.at(ca).load_issuer(passphrase=b"s3cret")
    out = tmp_path / "web.pem"
    result = cli(
        "issue", "--dir", ca, "--spiffe-id", WEB, "--cert-out", out, "--key-out", tmp_path / "web.key",
        "--passphrase-file", pw,
    )  # fmt: skip
    assert result.code == 0, result
    without = cli("issue", "--dir", ca, "--spiffe-id", WEB, "--cert-out", out, "--key-out", tmp_path / "w2.key")
    assert_clean_failure(without, 1)


def test_check_on_a_passphrase_protected_dir(tmp_path: Path, cli: Run) -> None:
    """`check` must be usable on what `init --passphrase-file` wrote."""
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    ca = tmp_path / "ca"
    assert cli("init", "--trust-domain", "example.org", "--dir", ca, "--passphrase-file", pw).code == 0
    result = cli("check", "--dir", ca, "--passphrase-file", pw)
    assert result.code == 0, result


# -- a user-held anchor (the step-ca path)


def test_anchor_create_then_issuer_create_with_a_held_anchor(tmp_path: Path, meshca_cmd: Run) -> None:
    held = tmp_path / "offline"
    held.mkdir()
    ca = tmp_path / "ca"
    result = meshca_cmd(
        "anchor", "create", "--trust-domain", "example.org",
        "--cert-out", held / "root.crt", "--key-out", held / "root.key",
    )  # fmt: skip
    assert result.code == 0, result
    assert _mode(held / "root.key") == 0o600
    result = meshca_cmd(
        "issuer", "create", "--anchor-cert", held / "root.crt", "--anchor-key", held / "root.key", "--dir", ca
    )
    assert result.code == 0, result
    assert sorted(p.name for p in ca.iterdir()) == ["bundle.pem", "issuer.crt", "issuer.key"]
    assert _mode(ca / "issuer.key") == 0o600
    anchor = x509.load_pem_x509_certificate((held / "root.crt").read_bytes())
    bundle = TrustBundle.from_pem((ca / "bundle.pem").read_bytes())
    assert bundle.anchors == (anchor,)

    leaf = tmp_path / "web.pem"
    result = meshca_cmd("issue", "--dir", ca, "--spiffe-id", WEB, "--cert-out", leaf, "--key-out", tmp_path / "web.key")
    assert result.code == 0, result
    assert meshca.verify_chain(leaf.read_bytes(), bundle, at=meshca.system_clock()) == SpiffeId.parse(WEB)
    result = meshca_cmd("verify", "--bundle", held / "root.crt", leaf)
    assert result.code == 0, result
    assert result.stdout.strip() == WEB

    check = meshca_cmd("check", "--dir", ca)
    assert check.code == 0, check


def test_writing_into_a_missing_directory_names_the_file_asked_for(tmp_path: Path, cli: Run) -> None:
    missing = tmp_path / "missing"
    result = cli(
        "anchor", "create", "--trust-domain", "example.org",
        "--cert-out", missing / "root.crt", "--key-out", missing / "root.key",
    )  # fmt: skip
    assert_clean_failure(result, 1)
    assert ".tmp" not in result.stderr, "the error names a temp file the user never asked for"
    assert str(missing) in result.stderr


def test_anchor_create_into_a_dir(tmp_path: Path, cli: Run) -> None:
    ca = tmp_path / "ca"
    result = cli("anchor", "create", "--trust-domain", "example.org", "--dir", ca, "--lifetime", "5y", "--json")
    assert result.code == 0, result
    data = json.loads(result.stdout)
    assert data["is_ca"] is True
    assert data["spiffe_id"] == "spiffe://example.org"
    assert sorted(p.name for p in ca.iterdir()) == ["bundle.pem", "trust-anchor.crt", "trust-anchor.key"]
    again = cli("anchor", "create", "--trust-domain", "example.org", "--dir", ca)
    assert_clean_failure(again, 1)
    result = cli(
        "issuer", "create", "--anchor-cert", ca / "trust-anchor.crt", "--anchor-key", ca / "trust-anchor.key",
        "--dir", ca, "--lifetime", "30d",
    )  # fmt: skip
    assert result.code == 0, result
    assert sorted(p.name for p in ca.iterdir()) == FILES
    assert cli("check", "--dir", ca).code == 0


def test_issuer_create_with_a_key_that_is_not_the_anchors(tmp_path: Path, cli: Run) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("anchor", "create", "--trust-domain", "example.org", "--dir", a).code == 0
    assert cli("anchor", "create", "--trust-domain", "example.org", "--dir", b).code == 0
    result = cli(
        "issuer", "create", "--anchor-cert", a / "trust-anchor.crt", "--anchor-key", b / "trust-anchor.key",
        "--dir", tmp_path / "ca",
    )  # fmt: skip
    assert_clean_failure(result, 1)
    assert "is not the key of" in result.stderr


@pytest.mark.parametrize(
    "outs",
    [[], ["--cert-out", "{tmp}/x.crt"], ["--dir", "{tmp}/d", "--cert-out", "{tmp}/x.crt", "--key-out", "{tmp}/x.key"]],
    ids=["none", "cert-only", "both"],
)
def test_anchor_create_needs_one_output_form(tmp_path: Path, cli: Run, outs: list[str]) -> None:
    result = cli(
        "anchor", "create", "--trust-domain", "example.org", *[o.replace("{tmp}", str(tmp_path)) for o in outs]
    )
    assert_clean_failure(result, 2)
    assert "--dir" in result.stderr
    assert list(tmp_path.iterdir()) == []


# -- issue


def test_issue_writes_leaf_and_issuer_and_a_private_key(initialized: Path, tmp_path: Path, cli: Run) -> None:
    cert, key = tmp_path / "web.pem", tmp_path / "web.key"
    result = cli(
        "issue", "--dir", initialized, "--spiffe-id", WEB, "--cert-out", cert, "--key-out", key,
        "--ttl", "1h", "--dns", "web.default.svc", "--json",
    )  # fmt: skip
    assert result.code == 0, result
    data = json.loads(result.stdout)
    assert data["spiffe_id"] == WEB
    assert data["sans"]["dns"] == ["web.default.svc"]
    chain = x509.load_pem_x509_certificates(cert.read_bytes())
    assert len(chain) == 2
    assert chain[1] == x509.load_pem_x509_certificate((initialized / "issuer.crt").read_bytes())
    assert chain[0].not_valid_after_utc - chain[0].not_valid_before_utc == timedelta(hours=1, seconds=60)
    assert _mode(key) == 0o600
    private = meshca.load_private_key(key.read_bytes())
    assert private.public_key() == chain[0].public_key()
    bundle = TrustBundle.from_pem((initialized / "bundle.pem").read_bytes())
    assert meshca.verify_chain(chain, bundle, at=meshca.system_clock()) == SpiffeId.parse(WEB)


def test_issue_refuses_to_overwrite_a_key(initialized: Path, tmp_path: Path, cli: Run) -> None:
    cert, key = tmp_path / "web.pem", tmp_path / "web.key"
    args = ["issue", "--dir", initialized, "--spiffe-id", WEB, "--cert-out", cert, "--key-out", key]
    assert cli(*args).code == 0
    before = key.read_bytes(), cert.read_bytes()
    result = cli(*args)
    assert_clean_failure(result, 1)
    assert (key.read_bytes(), cert.read_bytes()) == before
    assert cli(*args, "--force").code == 0
    assert key.read_bytes() != before[0]


def test_issue_for_another_trust_domain_fails(initialized: Path, tmp_path: Path, cli: Run) -> None:
    result = cli(
        "issue", "--dir", initialized, "--spiffe-id", "spiffe://other.test/web",
        "--cert-out", tmp_path / "w.pem", "--key-out", tmp_path / "w.key",
    )  # fmt: skip
    assert_clean_failure(result, 1)
    assert "trust domain" in result.stderr
    assert not (tmp_path / "w.key").exists()


def test_issue_with_a_frozen_clock(tmp_path: Path, cli: Run) -> None:
    clock = FrozenClock(NOW)
    ca = tmp_path / "ca"
    assert cli("init", "--trust-domain", "example.org", "--dir", ca, clock=clock).code == 0
    clock.advance(timedelta(days=400))
    result = cli(
        "issue", "--dir", ca, "--spiffe-id", WEB, "--cert-out", tmp_path / "w.pem", "--key-out", tmp_path / "w.key",
        clock=clock,
    )  # fmt: skip
    assert_clean_failure(result, 1)
    assert "expired" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["init", "--trust-domain", "example.org", "--dir", "{tmp}/big", "--anchor-lifetime", "100000y"],
        ["init", "--trust-domain", "example.org", "--dir", "{tmp}/big", "--issuer-lifetime", "9999999999999d"],
        ["issue", "--dir", "{ca}", "--spiffe-id", WEB, "--cert-out", "{tmp}/w.pem", "--key-out", "{tmp}/w.key",
         "--ttl", "4000000d"],
    ],
    ids=["anchor-100000y", "issuer-huge-days", "ttl-beyond-year-9999"],
)  # fmt: skip
def test_absurd_durations_fail_cleanly(initialized: Path, tmp_path: Path, cli: Run, args: list[str]) -> None:
    result = cli(*[a.replace("{tmp}", str(tmp_path)).replace("{ca}", str(initialized)) for a in args])
    assert_clean_failure(result)


# -- bundle


def test_bundle_pem(initialized: Path, cli: Run) -> None:
    result = cli("bundle", "--dir", initialized)
    assert result.code == 0
    assert result.stdout.encode() == (initialized / "bundle.pem").read_bytes()
    explicit = cli("bundle", "--dir", initialized, "--format", "pem")
    assert explicit.stdout == result.stdout


def test_bundle_spiffe(initialized: Path, cli: Run) -> None:
    result = cli("bundle", "--dir", initialized, "--format", "spiffe")
    assert result.code == 0
    doc = json.loads(result.stdout)
    assert [k["use"] for k in doc["keys"]] == ["x509-svid"]
    bundle = TrustBundle.from_spiffe_json(result.stdout, TrustDomain("example.org"))
    assert bundle.anchors == TrustBundle.from_pem((initialized / "bundle.pem").read_bytes()).anchors


def test_bundle_format_must_be_known(initialized: Path, cli: Run) -> None:
    assert_clean_failure(cli("bundle", "--dir", initialized, "--format", "jwks"), 2)


# -- verify


@pytest.fixture
def issued(initialized: Path, tmp_path: Path, cli: Run) -> Path:
    cert = tmp_path / "web.pem"
    result = cli(
        "issue", "--dir", initialized, "--spiffe-id", WEB, "--cert-out", cert, "--key-out", tmp_path / "web.key"
    )
    assert result.code == 0, result
    return cert


def test_verify_prints_the_id(initialized: Path, issued: Path, meshca_cmd: Run) -> None:
    result = meshca_cmd("verify", "--bundle", initialized / "bundle.pem", issued)
    assert result.code == 0, result
    assert result.stdout.strip() == WEB
    result = meshca_cmd("verify", "--bundle", initialized / "bundle.pem", "--spiffe-id", WEB, "--json", issued)
    assert result.code == 0, result
    assert json.loads(result.stdout) == {"spiffe_id": WEB, "valid": True}


def test_verify_with_trust_domain_spiffe_bundle_and_der(
    initialized: Path, issued: Path, tmp_path: Path, cli: Run
) -> None:
    bundle = initialized / "bundle.pem"
    assert cli("verify", "--bundle", bundle, "--trust-domain", "example.org", issued).code == 0
    spiffe = tmp_path / "bundle.json"
    spiffe.write_text(cli("bundle", "--dir", initialized, "--format", "spiffe").stdout)
    assert cli("verify", "--bundle", spiffe, "--spiffe-id", WEB, issued).stdout.strip() == WEB
    assert cli("verify", "--bundle", spiffe, "--trust-domain", "example.org", issued).code == 0
    no_td = cli("verify", "--bundle", spiffe, issued)
    assert_clean_failure(no_td, 1)
    assert "--trust-domain" in no_td.stderr
    leaf_der = tmp_path / "leaf.der"
    leaf_der.write_bytes(
        x509.load_pem_x509_certificates(issued.read_bytes())[0].public_bytes(serialization.Encoding.DER)
    )
    # A lone DER leaf lacks its issuer, so it cannot chain: a clean failure, not a crash.
    assert_clean_failure(cli("verify", "--bundle", bundle, leaf_der), 1)


def _bundle_of(ca: TestCA, path: Path) -> Path:
    path.write_bytes(ca.bundle.to_pem())
    return path


# id -> (the verify arguments before the chain, from the trust dir and a scratch dir; what stderr says)
VERIFY_REFUSALS: dict[str, tuple[Callable[[Path, Path], list[str | Path]], str]] = {
    "another-id": (
        lambda ca, _: ["--bundle", ca / "bundle.pem", "--spiffe-id", "spiffe://example.org/db"],
        "not authorized",
    ),
    "another-trust-domain": (lambda ca, _: ["--bundle", ca / "bundle.pem", "--trust-domain", "other.test"], ""),
    "bundle-of-another-ca": (
        lambda _, tmp: ["--bundle", _bundle_of(TestCA("example.org"), tmp / "other.pem")],
        "does not lead to an anchor",
    ),
    "bundle-of-another-trust-domain": (
        lambda _, tmp: ["--bundle", _bundle_of(TestCA("other.test"), tmp / "foreign.pem")],
        "trust domain",
    ),
}


@pytest.mark.parametrize("case", VERIFY_REFUSALS)
def test_verify_refuses(case: str, initialized: Path, issued: Path, tmp_path: Path, meshca_cmd: Run) -> None:
    args, says = VERIFY_REFUSALS[case]
    result = meshca_cmd("verify", *args(initialized, tmp_path), issued)
    assert_clean_failure(result, 1)
    assert says in result.stderr


def test_verify_garbage_chain(initialized: Path, tmp_path: Path, cli: Run) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a chain")
    result = cli("verify", "--bundle", initialized / "bundle.pem", garbage)
    assert_clean_failure(result, 1)
    assert "cannot read the chain" in result.stderr


# -- inspect


def test_inspect_certificate_and_chain(initialized: Path, issued: Path, cli: Run) -> None:
    result = cli("inspect", issued)
    assert result.code == 0
    assert result.stdout.count("Certificate") == 2
    assert f"SPIFFE ID:    {WEB}" in result.stdout
    assert "CA:           no" in result.stdout
    assert "CA:           yes" in result.stdout
    items = json.loads(cli("inspect", "--json", issued).stdout)
    assert [i["type"] for i in items] == ["certificate", "certificate"]
    assert items[0]["spiffe_id"] == WEB
    assert items[0]["is_ca"] is False
    assert items[1]["is_ca"] is True
    assert items[0]["key"] == "ec-p256"
    leaf = x509.load_pem_x509_certificates(issued.read_bytes())[0]
    assert items[0]["serial"] == format(leaf.serial_number, "x")
    single = json.loads(cli("inspect", "--json", initialized / "trust-anchor.crt").stdout)
    assert len(single) == 1
    assert single[0]["spiffe_id"] == "spiffe://example.org"


def test_inspect_der_certificate(initialized: Path, tmp_path: Path, cli: Run) -> None:
    der = tmp_path / "anchor.der"
    der.write_bytes(
        x509.load_pem_x509_certificate((initialized / "trust-anchor.crt").read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    )
    items = json.loads(cli("inspect", "--json", der).stdout)
    assert items[0]["type"] == "certificate"
    assert items[0]["is_ca"] is True


@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_inspect_csr(tmp_path: Path, cli: Run, encoding: str) -> None:
    der = meshca.build_csr(meshca.generate_key(meshca.KeyType.EC_P384), SpiffeId.parse(WEB))
    path = tmp_path / f"web.csr.{encoding}"
    path.write_bytes(der if encoding == "der" else x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM))
    text = cli("inspect", path)
    assert text.code == 0, text
    assert text.stdout.startswith("CSR")
    assert WEB in text.stdout
    assert "Signature:    valid" in text.stdout
    (item,) = json.loads(cli("inspect", "--json", path).stdout)
    assert item["type"] == "csr"
    assert item["spiffe_id"] == WEB
    assert item["signature_valid"] is True
    assert item["key"] == "ec-p384"


def test_inspect_csr_with_a_bad_signature(tmp_path: Path, cli: Run) -> None:
    der = meshca.build_csr(meshca.generate_key(), SpiffeId.parse(WEB))
    path = tmp_path / "tampered.csr"
    path.write_bytes(der[:-1] + bytes([der[-1] ^ 1]))
    result = cli("inspect", path)
    assert result.code == 0, result
    assert "Signature:    INVALID" in result.stdout
    (item,) = json.loads(cli("inspect", "--json", path).stdout)
    assert item["signature_valid"] is False


def test_inspect_spiffe_bundle(initialized: Path, tmp_path: Path, cli: Run) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(cli("bundle", "--dir", initialized, "--format", "spiffe").stdout)
    text = cli("inspect", path)
    assert text.code == 0, text
    assert "SPIFFE bundle, sequence 0" in text.stdout
    items = json.loads(cli("inspect", "--json", path).stdout)
    assert items[0] == {"type": "spiffe-bundle", "sequence": 0}
    assert items[1]["type"] == "certificate"
    assert items[1]["spiffe_id"] == "spiffe://example.org"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"\x00\x01\x02",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"{",
        b'{"keys": "abc"}',
        b'{"keys": [1]}',
        b'{"keys": [{"use": "x509-svid", "x5c": [1]}]}',
        b'{"keys": [{"use": "x509-svid", "x5c": ["AAAA"]}]}',
    ],
    ids=["empty", "garbage", "binary", "key", "bad-json", "keys-str", "keys-int", "x5c-int", "x5c-junk"],
)
def test_inspect_garbage_fails_cleanly(tmp_path: Path, cli: Run, content: bytes) -> None:
    path = tmp_path / "input"
    path.write_bytes(content)
    assert_clean_failure(cli("inspect", path), 1)


@pytest.mark.parametrize("content", [b"garbage", b'{"keys": [1]}'], ids=["garbage", "keys-int"])
def test_inspect_garbage_in_the_console_script(tmp_path: Path, meshca_cmd: Run, content: bytes) -> None:
    path = tmp_path / "input"
    path.write_bytes(content)
    assert_clean_failure(meshca_cmd("inspect", path), 1)


# -- check


def _check_counts(result: Result) -> tuple[int, int]:
    last = result.stdout.strip().splitlines()[-1]
    errors, warnings = (int(part.split()[0]) for part in last.split(", "))
    return errors, warnings


def test_check_fresh_dir(initialized: Path, meshca_cmd: Run) -> None:
    result = meshca_cmd("check", "--dir", initialized)
    assert result.code == 0, result
    assert _check_counts(result) == (0, 0)
    assert "[FAIL]" not in result.stdout
    assert "[WARN]" not in result.stdout


def test_check_warns_about_an_issuer_expiring_soon(tmp_path: Path, meshca_cmd: Run) -> None:
    ca = tmp_path / "ca"
    assert meshca_cmd("init", "--trust-domain", "example.org", "--dir", ca, "--issuer-lifetime", "10d").code == 0
    # by default an issuer is expiring in the last third of its life (at most 14 days): not a fresh one
    assert _check_counts(meshca_cmd("check", "--dir", ca)) == (0, 0)
    result = meshca_cmd("check", "--dir", ca, "--issuer-warn", "11d")
    assert result.code == 0, result
    assert _check_counts(result) == (0, 1)
    (warning,) = [line for line in result.stdout.splitlines() if line.startswith("[WARN]")]
    assert "issuer" in warning
    assert "expires in" in warning


def test_check_warns_about_an_anchor_expiring_soon(tmp_path: Path, meshca_cmd: Run) -> None:
    ca = tmp_path / "ca"
    assert meshca_cmd("init", "--trust-domain", "example.org", "--dir", ca, "--anchor-lifetime", "30d").code == 0
    result = meshca_cmd("check", "--dir", ca, "--json")
    assert result.code == 0, result
    findings = json.loads(result.stdout)
    warnings = [f for f in findings if f["level"] == "warning"]
    assert [w["check"].split()[0] for w in warnings] == ["anchor"]
    assert not [f for f in findings if f["level"] == "error"]


def test_check_fails_when_the_issuer_does_not_chain(initialized: Path, meshca_cmd: Run) -> None:
    (initialized / "bundle.pem").write_bytes(TestCA("other.test").bundle.to_pem())
    result = meshca_cmd("check", "--dir", initialized)
    assert result.code == 1, result
    assert "Traceback" not in result.stderr
    assert any(line.startswith("[FAIL]") and "does not chain" in line for line in result.stdout.splitlines())


def test_check_fails_when_a_leaf_ttl_does_not_fit(tmp_path: Path, meshca_cmd: Run) -> None:
    ca = tmp_path / "ca"
    assert meshca_cmd("init", "--trust-domain", "example.org", "--dir", ca, "--issuer-lifetime", "10d").code == 0
    assert meshca_cmd("check", "--dir", ca, "--leaf-ttl", "9d").code == 0
    result = meshca_cmd("check", "--dir", ca, "--leaf-ttl", "11d")
    assert result.code == 1, result
    assert any(line.startswith("[FAIL]") and "cut to" in line for line in result.stdout.splitlines())


def test_check_follows_the_clock(tmp_path: Path, cli: Run) -> None:
    clock = FrozenClock(NOW)
    ca = tmp_path / "ca"
    assert cli("init", "--trust-domain", "example.org", "--dir", ca, clock=clock).code == 0
    assert cli("check", "--dir", ca, clock=clock).code == 0
    clock.advance(timedelta(days=355))
    soon = cli("check", "--dir", ca, clock=clock)
    assert soon.code == 0
    assert _check_counts(soon) == (0, 1)
    clock.advance(timedelta(days=10, hours=1))
    expired = cli("check", "--dir", ca, clock=clock)
    assert expired.code == 1
    assert "expired" in expired.stdout


def test_check_missing_dir(tmp_path: Path, meshca_cmd: Run) -> None:
    result = meshca_cmd("check", "--dir", tmp_path / "nowhere")
    assert result.code == 1
    assert "Traceback" not in result.stderr + result.stdout


# -- help and bad input


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.extend(_commands(sub, (*prefix, name)))
    return found


CORE_COMMANDS = [
    (),
    ("init",),
    ("anchor",),
    ("anchor", "create"),
    ("issuer",),
    ("issuer", "create"),
    ("issue",),
    ("bundle",),
    ("verify",),
    ("inspect",),
    ("check",),
]


@pytest.mark.parametrize("command", [(), ("init",), ("anchor", "create")], ids=lambda c: " ".join(c) or "meshca")
def test_help_in_the_console_script(meshca_cmd: Run, command: tuple[str, ...]) -> None:
    result = meshca_cmd(*command, "--help")
    assert result.code == 0, result
    assert result.stdout.startswith("usage: meshca")
    assert result.stderr == ""


def test_help_of_every_command_in_the_parser(cli: Run) -> None:
    commands = _commands(build_parser())
    assert set(CORE_COMMANDS) <= set(commands)
    for command in commands:
        result = cli(*command, "--help")
        assert result.code == 0, (command, result)
        assert result.stdout.startswith("usage: meshca")
        assert result.stderr == ""


BAD_INPUT: list[tuple[list[str], int, str]] = [
    ([], 2, "required"),
    (["frobnicate"], 2, "invalid choice"),
    (["init", "--trust-domain", "Example.org", "--dir", "{tmp}/ca"], 2, "upper-case"),
    (["init", "--trust-domain", "example.org:80", "--dir", "{tmp}/ca"], 2, "a port"),
    (["init", "--trust-domain", "example.org", "--dir", "{tmp}/ca", "--issuer-lifetime", "10x"], 2, "invalid duration"),
    (["init", "--trust-domain", "example.org", "--dir", "{tmp}/ca", "--anchor-lifetime", "0s"], 2, "positive"),
    (["init", "--trust-domain", "example.org", "--dir", "{tmp}/ca", "--key-type", "ec-p521"], 2, "unknown key type"),
    (["init", "--trust-domain", "example.org"], 2, "--dir"),
    (["init", "--trust-domain", "example.org", "--dir", "{tmp}/ca", "--passphrase-file", "{tmp}/nope"], 1, "nope"),
    (["init", "--trust-domain", "example.org", "--dir", "{tmp}/ca", "--passphrase-file", "{tmp}/empty"], 1, "empty"),
    (
        ["issue", "--dir", "{tmp}", "--spiffe-id", "SPIFFE://example.org/a", "--cert-out", "a", "--key-out", "b"],
        2,
        "lower-case",
    ),
    (
        ["issue", "--dir", "{tmp}", "--spiffe-id", "spiffe://example.org/a/", "--cert-out", "a", "--key-out", "b"],
        2,
        "trailing slash",
    ),
    (
        ["issue", "--dir", "{tmp}/missing", "--spiffe-id", WEB, "--cert-out", "{tmp}/a", "--key-out", "{tmp}/b"],
        1,
        "cannot read",
    ),
    (
        ["issue", "--dir", "{tmp}", "--spiffe-id", WEB, "--cert-out", "a", "--key-out", "b", "--ttl=-1h"],
        2,
        "invalid duration",
    ),
    (["bundle", "--dir", "{tmp}/missing"], 1, "cannot read"),
    (["bundle", "--dir", "{tmp}/garbage"], 1, "cannot read trust bundle"),
    (["verify", "--bundle", "{tmp}/missing.pem", "{tmp}/chain.pem"], 1, "cannot read"),
    (["verify", "--bundle", "{tmp}/garbage/bundle.pem", "{tmp}/chain.pem"], 1, "trust bundle"),
    (
        ["verify", "--bundle", "{tmp}/b.pem", "--spiffe-id", "spiffe://x/a", "--trust-domain", "x", "c"],
        2,
        "not allowed",
    ),
    (["inspect", "{tmp}/missing.pem"], 1, "cannot read"),
    (["inspect", "{tmp}"], 1, "cannot read"),
    (["anchor"], 2, "required"),
    (
        ["issuer", "create", "--anchor-cert", "{tmp}/missing.crt", "--anchor-key", "{tmp}/k", "--dir", "{tmp}/ca"],
        1,
        "cannot read",
    ),
]


@pytest.mark.parametrize(("args", "code", "reason"), BAD_INPUT, ids=[" ".join(a)[:50] for a, _, _ in BAD_INPUT])
def test_bad_input_fails_cleanly(tmp_path: Path, cli: Run, args: list[str], code: int, reason: str) -> None:
    _bad_input_files(tmp_path)
    result = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_clean_failure(result, code)
    assert reason in result.stderr


def _bad_input_files(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "bundle.pem").write_bytes(b"garbage")


CONSOLE_BAD_INPUT = [BAD_INPUT[i] for i in (0, 2, 4, 10, 12, 19)]


@pytest.mark.parametrize(
    ("args", "code", "reason"), CONSOLE_BAD_INPUT, ids=[" ".join(a)[:50] for a, _, _ in CONSOLE_BAD_INPUT]
)
def test_bad_input_in_the_console_script(
    tmp_path: Path, meshca_cmd: Run, args: list[str], code: int, reason: str
) -> None:
    _bad_input_files(tmp_path)
    result = meshca_cmd(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_clean_failure(result, code)
    assert reason in result.stderr


# -- every option has help; durations show their format; the command's version


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_parsers(sub))
    return found


def test_every_option_has_help_and_every_duration_shows_the_format() -> None:
    checked = durations = 0
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            checked += 1
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{name} has no help"
            if action.type is duration:
                durations += 1
                assert "90s, 24h, 1h30m, 90d, 10y" in action.help, f"{name}: the duration format is not shown"
    assert checked > 80
    assert durations >= 10


def test_a_shared_option_says_the_same_in_every_command() -> None:
    helps: dict[str, set[str | None]] = {}
    users: dict[str, int] = {}
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            for flag in action.option_strings:
                helps.setdefault(flag, set()).add(action.help)
                users[flag] = users.get(flag, 0) + 1
    for flag in ("--passphrase-file", "--json", "--force"):
        assert users[flag] >= 3, flag
        assert len(helps[flag]) == 1, (flag, helps[flag])


@pytest.mark.parametrize("module", [[], ["-m", "meshca"]], ids=["console-script", "python-m"])
def test_version(meshca_cmd: Run, module: list[str]) -> None:
    if module:
        proc = subprocess.run([sys.executable, *module, "--version"], capture_output=True, text=True, check=False)
        result = Result(proc.returncode, proc.stdout, proc.stderr)
    else:
        result = meshca_cmd("--version")
    assert result.code == 0, result
    assert result.stdout.strip() == f"meshca {meshca.__version__}"


def test_python_m_meshca_runs_commands(initialized: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshca", "bundle", "--dir", str(initialized)], capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (initialized / "bundle.pem").read_bytes()


def test_usage_errors_are_one_line_in_the_console_script(meshca_cmd: Run) -> None:
    result = meshca_cmd("init", "--trust-domain", "example.org")
    assert_clean_failure(result, 2)
    assert "usage" not in result.stderr
    assert "--dir" in result.stderr
    assert "meshca init --help" in result.stderr


# -- init refuses lifetimes check would reject (one rule: pki/_check.py)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--anchor-lifetime", "1d", "--issuer-lifetime", "365d"], "exceeds the anchor lifetime 24h"),
        (["--issuer-lifetime", "12h"], "cut to 12h"),
        (["--anchor-lifetime", "12h"], "cut to 12h"),
        (["--issuer-lifetime", "2d", "--leaf-ttl", "3d"], "cut to 2d"),
    ],
    ids=["issuer-beyond-anchor", "issuer-shorter-than-a-leaf", "anchor-shorter-than-a-leaf", "leaf-ttl"],
)
def test_init_refuses_lifetimes_check_rejects(tmp_path: Path, cli: Run, flags: list[str], reason: str) -> None:
    ca = tmp_path / "ca"
    result = cli("init", "--trust-domain", "example.org", "--dir", ca, *flags)
    assert_clean_failure(result, 1)
    assert reason in result.stderr
    assert not ca.exists()


def test_init_and_check_state_the_same_leaf_rule(tmp_path: Path, cli: Run) -> None:
    ca = tmp_path / "ca"
    made = cli("init", "--trust-domain", "example.org", "--dir", ca, "--issuer-lifetime", "2d", clock=FrozenClock(NOW))
    assert made.code == 0, made
    refused = cli("init", "--trust-domain", "example.org", "--dir", tmp_path / "b", "--issuer-lifetime", "2d",
                  "--leaf-ttl", "3d")  # fmt: skip
    check = cli("check", "--dir", ca, "--leaf-ttl", "3d", clock=FrozenClock(NOW))
    assert check.code == 1
    rule = "leaves issued now are cut to 2d by the issuer chain (wanted 3d)"
    assert rule in refused.stderr
    assert f"[FAIL] {rule}" in check.stdout


def test_init_with_a_short_anchor_gives_the_issuer_the_anchors_lifetime(tmp_path: Path, cli: Run) -> None:
    ca = tmp_path / "ca"
    assert cli("init", "--trust-domain", "example.org", "--dir", ca, "--anchor-lifetime", "30d").code == 0
    anchor = x509.load_pem_x509_certificate((ca / "trust-anchor.crt").read_bytes())
    issuer = x509.load_pem_x509_certificate((ca / "issuer.crt").read_bytes())
    assert issuer.not_valid_after_utc == anchor.not_valid_after_utc


# -- inspect names attributes and roles


def test_inspect_names_serial_number_and_labels_the_trust_anchor(initialized: Path, issued: Path, cli: Run) -> None:
    anchor = cli("inspect", initialized / "trust-anchor.crt")
    assert anchor.code == 0, anchor
    assert anchor.stdout.startswith("Certificate (trust anchor)")
    assert "serialNumber=" in anchor.stdout
    assert "2.5.4.5" not in anchor.stdout
    chain = json.loads(cli("inspect", "--json", issued).stdout)
    assert [c["role"] for c in chain] == ["leaf", "issuer"]
    assert "Certificate (issuer)" in cli("inspect", issued).stdout
    assert json.loads(cli("inspect", "--json", initialized / "trust-anchor.crt").stdout)[0]["role"] == "trust-anchor"


# -- offline issuance is logged; the log reads newest first


def _issue(ca: Path, tmp_path: Path, cli: Run, name: str, clock: FrozenClock | None = None) -> str:
    result = cli(
        "issue", "--dir", ca, "--spiffe-id", f"spiffe://example.org/{name}", "--cert-out", tmp_path / f"{name}.pem",
        "--key-out", tmp_path / f"{name}.key", "--json", clock=clock,
    )  # fmt: skip
    assert result.code == 0, result
    return str(json.loads(result.stdout)["serial"])


def test_offline_issue_is_recorded_in_the_log(initialized: Path, tmp_path: Path, cli: Run) -> None:
    serial = _issue(initialized, tmp_path, cli, "web")
    [row] = json.loads(cli("log", "--dir", initialized, "--json").stdout)
    assert (row["serial"], row["spiffe_id"], row["api"]) == (serial, "spiffe://example.org/web", "offline")
    leaf = x509.load_pem_x509_certificates((tmp_path / "web.pem").read_bytes())[0]
    assert row["not_after"] == leaf.not_valid_after_utc.isoformat()


def test_log_is_newest_first_and_reverse_is_oldest_first(tmp_path: Path, cli: Run) -> None:
    clock = FrozenClock(NOW)
    ca = tmp_path / "ca"
    assert cli("init", "--trust-domain", "example.org", "--dir", ca, clock=clock).code == 0
    serials = []
    for name in ("a", "b", "c"):
        clock.advance(timedelta(minutes=1))
        serials.append(_issue(ca, tmp_path, cli, name, clock))
    rows = json.loads(cli("log", "--dir", ca, "--json").stdout)
    assert [r["serial"] for r in rows] == serials[::-1]
    [newest] = json.loads(cli("log", "--dir", ca, "--json", "--limit", "1").stdout)
    assert newest["serial"] == serials[-1]
    [oldest] = json.loads(cli("log", "--dir", ca, "--json", "--limit", "1", "--reverse").stdout)
    assert oldest["serial"] == serials[0]
    assert_clean_failure(cli("log", "--dir", ca, "--limit", "0"), 2)


# -- join tokens never grant meshca's own identities


@pytest.mark.parametrize("path", ["/meshca/identity", "/meshca", "/meshca/agent/node-1"])
def test_token_create_refuses_reserved_ids(initialized: Path, cli: Run, path: str) -> None:
    result = cli("token", "create", "--dir", initialized, "--spiffe-id", f"spiffe://example.org{path}")
    assert_clean_failure(result, 1)
    assert "reserved for meshca's own components" in result.stderr
    assert result.stdout == ""
    assert not (initialized / "meshca.db").exists()


def test_token_create_accepts_an_id_that_only_starts_like_a_reserved_one(initialized: Path, cli: Run) -> None:
    result = cli("token", "create", "--dir", initialized, "--spiffe-id", "spiffe://example.org/meshcas/web")
    assert result.code == 0, result
    assert result.stdout.startswith("mtok_")


# -- durations: what format_duration writes, parse_duration reads


@pytest.mark.parametrize(
    "value",
    [timedelta(seconds=90), timedelta(hours=24), timedelta(hours=1, minutes=30), timedelta(days=90),
     timedelta(days=3650), timedelta(days=365)],
)  # fmt: skip
def test_format_duration_round_trips(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


def test_format_duration_writes_years() -> None:
    assert format_duration(timedelta(days=3650)) == "10y"
    assert format_duration(timedelta(days=366)) == "366d"
    assert format_duration(timedelta(hours=24)) == "24h"
    assert format_duration(timedelta(days=1, hours=6)) == "30h"


# -- bench/setup.sh installs Debian packages only as root


def test_bench_setup_without_root_says_what_to_install() -> None:
    # A PATH the unprivileged user can read (pytest's tmp_path is private to root).
    with tempfile.TemporaryDirectory() as name:
        _run_bench_setup_unprivileged(Path(name))


def _run_bench_setup_unprivileged(bin_dir: Path) -> None:
    bin_dir.chmod(0o755)
    for tool in ("bash", "dirname", "id"):  # real tools; h2load and cfssl are absent from this PATH
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    script = Path(__file__).resolve().parent.parent / "bench" / "setup.sh"
    # As root, drop to nobody for real; a non-root runner is already what the test needs.
    as_user = [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.run(
        [*(as_user if os.getuid() == 0 else []), "/bin/bash", str(script)],
        capture_output=True, text=True, env={"PATH": str(bin_dir)}, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "missing Debian packages: nghttp2-client golang-cfssl" in proc.stderr
    assert "sudo apt-get install" in proc.stderr
