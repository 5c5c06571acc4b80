"""CA keys on a PKCS#11 token: URIs, keys generated on SoftHSM2, certificates and leaves signed through it."""

from __future__ import annotations

import multiprocessing
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from support.softhsm import PIN, SoftHsm, skip_or_fail

import meshca
from meshca.pki._custody import verify_signature
from meshca.pki._errors import InvalidKeyUri, KeyCustodyError
from meshca.pki._keys import signature_hash
from meshca.pki._pkcs11 import Pkcs11Uri, TokenKey
from meshca.pki._profiles import build_anchor

MODULE = "/usr/lib/softhsm/libsofthsm2.so"

# -- URIs (no token needed)


def test_a_uri_names_token_key_module_and_pin_file() -> None:
    uri = Pkcs11Uri.parse(
        f"pkcs11:token=my%20ca;serial=ab12;slot-id=7;object=issuer;id=%01%FF;type=private"
        f"?module-path={MODULE}&pin-source=file:/etc/meshca/pin"
    )
    assert (uri.token, uri.serial, uri.slot_id, uri.object, uri.id) == ("my ca", "ab12", 7, "issuer", b"\x01\xff")
    assert uri.module_path == Path(MODULE)
    assert uri.pin_source == Path("/etc/meshca/pin")
    assert uri.describe() == "pkcs11:token=my%20ca;serial=ab12;slot-id=7;object=issuer;id=%01%FF"
    assert Pkcs11Uri.parse(str(uri)) == uri
    assert Pkcs11Uri.parse(str(uri)).pin_source == uri.pin_source


def test_relative_paths_are_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = Pkcs11Uri.parse("pkcs11:object=k?module-path=lib.so&pin-source=pin")
    assert uri.module_path == tmp_path / "lib.so"
    assert uri.pin_source == tmp_path / "pin"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("file:/k.pem", "starts with 'pkcs11:'"),
        (f"pkcs11:object=k;colour=blue?module-path={MODULE}", "'colour'"),
        (f"pkcs11:object=k;object=j?module-path={MODULE}", "'object' is given twice"),
        (f"pkcs11:object=k?module-path={MODULE}&module-name=softhsm2", "'module-name'"),
        ("pkcs11:object=k", "module-path"),
        (f"pkcs11:token=t?module-path={MODULE}", "object=LABEL"),
        (f"pkcs11:object=k;type=public?module-path={MODULE}", "type=private"),
        (f"pkcs11:object=k;slot-id=x1?module-path={MODULE}", "slot-id=x1"),
        (f"pkcs11:object?module-path={MODULE}", "'object' has no value"),
        (f"pkcs11:object=k?module-path={MODULE}&pin-source=https://pins.example/1", "pin-source must be a file"),
    ],
)
def test_a_bad_uri_names_the_attribute(text: str, names: str) -> None:
    with pytest.raises(InvalidKeyUri, match=None) as refused:
        Pkcs11Uri.parse(text)
    assert names in str(refused.value)
    assert isinstance(refused.value, ValueError)


def test_pin_value_is_refused_without_echoing_the_pin(meshca_cmd: Any, tmp_path: Path) -> None:
    secret = "s3cret-PIN-value"
    with pytest.raises(InvalidKeyUri) as refused:
        Pkcs11Uri.parse(f"pkcs11:object=k?module-path={MODULE}&pin-value={secret}")
    assert "pin-source=file:" in str(refused.value)
    assert secret not in str(refused.value)
    uri = f"pkcs11:object=k?pin-value={secret}&module-path={MODULE}"
    result = meshca_cmd("init", "--dir", tmp_path / "d", "--trust-domain", "example.org", "--issuer-key-uri", uri)
    assert result.code == 2
    assert secret not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- keys on the token


@pytest.mark.parametrize("key_type", [meshca.KeyType.EC_P256, meshca.KeyType.EC_P384, meshca.KeyType.RSA_2048])
def test_a_key_generated_on_the_token_is_sensitive_and_not_extractable(
    softhsm: SoftHsm, key_type: meshca.KeyType
) -> None:
    import pkcs11
    from pkcs11 import Attribute

    name = f"gen-{key_type}"
    key = TokenKey.generate(Pkcs11Uri.parse(softhsm.uri(name)), key_type)
    assert key.key_type is key_type
    assert meshca.key_type_of(key.public_key()) is key_type
    assert name in repr(key) and PIN not in repr(key)

    # Through PKCS#11 attributes of the private key object meshca signs with.
    private = key._key
    assert private.label == name
    assert private[Attribute.SENSITIVE] and private[Attribute.ALWAYS_SENSITIVE]
    assert not private[Attribute.EXTRACTABLE] and private[Attribute.NEVER_EXTRACTABLE]
    secret = Attribute.PRIVATE_EXPONENT if key_type.is_rsa else Attribute.VALUE
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        private[secret]

    # And as OpenSC's pkcs11-tool reports it.
    if shutil.which("pkcs11-tool") is None:
        skip_or_fail("OpenSC's pkcs11-tool is not installed (apt-get install opensc)")
    tool = subprocess.run(
        ["pkcs11-tool", "--module", str(softhsm.module), "--token-label", "meshca", "--login", "--pin", PIN, "-O"],
        capture_output=True,
        text=True,
        check=True,
    )
    objects = re.split(r"\n(?=\S)", tool.stdout)  # one block per object, indented lines below its heading
    private_block = next(b for b in objects if b.startswith("Private Key Object") and f"label:      {name}\n" in b)
    assert "never extractable" in private_block and "always sensitive" in private_block


def test_a_name_taken_on_the_token_is_refused(softhsm: SoftHsm) -> None:
    uri = Pkcs11Uri.parse(softhsm.uri("taken"))
    TokenKey.generate(uri, meshca.KeyType.EC_P256)
    with pytest.raises(KeyCustodyError, match="already holds a key by that name"):
        TokenKey.generate(uri, meshca.KeyType.EC_P256)


def test_certificates_signed_through_the_token_verify(softhsm: SoftHsm) -> None:
    key = TokenKey.generate(Pkcs11Uri.parse(softhsm.uri("anchor-sig")), meshca.KeyType.EC_P384)
    td = meshca.TrustDomain("example.org")
    anchor = build_anchor(key, td, now=meshca.system_clock())
    anchor.verify_directly_issued_by(anchor)
    assert anchor.public_key() == key.public_key()
    data = b"to be signed"
    algorithm = signature_hash(key.public_key())
    assert verify_signature(key.public_key(), key.sign(data, algorithm), data, algorithm)


def test_a_token_that_goes_away_fails_with_the_pkcs11_error_and_recovers(softhsm: SoftHsm) -> None:
    key = TokenKey.generate(Pkcs11Uri.parse(softhsm.uri("flaky")), meshca.KeyType.EC_P256)
    algorithm = signature_hash(key.public_key())
    with softhsm.removed():
        with pytest.raises(KeyCustodyError) as failed:
            key.sign(b"x", algorithm)
        assert failed.value.pkcs11_error  # the PKCS#11 error class, e.g. ObjectHandleInvalid
        assert failed.value.pkcs11_error in str(failed.value)
        with pytest.raises(KeyCustodyError, match="no such token"):
            key.sign(b"x", algorithm)
    assert verify_signature(key.public_key(), key.sign(b"x", algorithm), b"x", algorithm)


_LOCKOUT_SCRIPT = """
import sys
from meshca.pki._errors import KeyCustodyError
from meshca.pki._pkcs11 import Pkcs11Uri, TokenKey
uri, pin_file, pin = Pkcs11Uri.parse(sys.argv[1]), sys.argv[2], sys.argv[3]
for _ in range(2):
    try:
        TokenKey.open(uri)
    except KeyCustodyError as exc:
        print(exc.pkcs11_error, exc)
open(pin_file, "w").write(pin + "\\n")
print("opened", TokenKey.open(uri).key_type)
"""


def test_a_refused_pin_file_is_not_tried_again_until_it_changes(softhsm: SoftHsm, tmp_path: Path) -> None:
    """A login is per process, so a process of its own: the second attempt does not reach the token."""
    TokenKey.generate(Pkcs11Uri.parse(softhsm.uri("lockout")), meshca.KeyType.EC_P256)
    pin = tmp_path / "pin"
    pin.write_text("0000-wrong\n")
    uri = softhsm.uri("lockout", pin_file=pin)
    run = subprocess.run(
        [sys.executable, "-c", _LOCKOUT_SCRIPT, uri, str(pin), PIN], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    first, second, opened = run.stdout.splitlines()
    assert first.startswith("PinIncorrect ") and "not tried again" not in first
    assert second.startswith("PinIncorrect ") and f"not tried again until {pin} changes" in second
    assert opened == "opened ec-p256"
    assert PIN not in first + second


def _sign_in_child(key: TokenKey, done: Any) -> None:
    algorithm = signature_hash(key.public_key())
    done.put(verify_signature(key.public_key(), key.sign(b"child", algorithm), b"child", algorithm))


def test_a_forked_child_opens_its_own_session(softhsm: SoftHsm) -> None:
    key = TokenKey.generate(Pkcs11Uri.parse(softhsm.uri("forked")), meshca.KeyType.EC_P256)
    algorithm = signature_hash(key.public_key())
    key.sign(b"parent", algorithm)  # the parent's session is open when it forks
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()
    child = ctx.Process(target=_sign_in_child, args=(key, done))
    child.start()
    child.join(30)
    assert child.exitcode == 0 and done.get(timeout=5) is True
    assert verify_signature(key.public_key(), key.sign(b"parent", algorithm), b"parent", algorithm)


# -- the CLI


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_init_on_the_token_then_issue_and_verify(
    softhsm: SoftHsm, meshca_cmd: Any, tmp_path: Path, key_type: str
) -> None:
    d = tmp_path / "d"
    anchor_uri, issuer_uri = softhsm.uri(f"init-anchor-{key_type}"), softhsm.uri(f"init-issuer-{key_type}")
    r = meshca_cmd(
        "init", "--dir", d, "--trust-domain", "example.org", "--key-type", key_type,
        "--anchor-key-uri", anchor_uri, "--issuer-key-uri", issuer_uri,
    )  # fmt: skip
    assert r.code == 0, r.stderr
    tdir = meshca.TrustDir.at(d)
    assert not tdir.anchor_key.exists() and not tdir.issuer_key.exists()
    assert Pkcs11Uri.parse(tdir.issuer_key_uri.read_text().strip()) == Pkcs11Uri.parse(issuer_uri)
    assert PIN not in tdir.issuer_key_uri.read_text() + r.stdout + r.stderr

    leaf = tmp_path / "leaf.pem"
    r = meshca_cmd(
        "issue", "--dir", d, "--spiffe-id", "spiffe://example.org/web", "--cert-out", leaf,
        "--key-out", tmp_path / "leaf.key",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    chain = x509.load_pem_x509_certificates(leaf.read_bytes())
    meshca.verify_chain(chain, tdir.load_bundle(), at=meshca.system_clock())
    openssl = subprocess.run(
        ["openssl", "verify", "-CAfile", tdir.bundle, "-untrusted", leaf, leaf], capture_output=True, text=True
    )
    assert openssl.returncode == 0 and "OK" in openssl.stdout, openssl.stderr
    r = meshca_cmd("check", "--dir", d)
    assert r.code == 0, r.stdout


def test_anchor_and_issuer_create_with_key_uris(softhsm: SoftHsm, meshca_cmd: Any, tmp_path: Path) -> None:
    d = tmp_path / "d"
    anchor_uri = softhsm.uri("create-anchor")
    r = meshca_cmd("anchor", "create", "--trust-domain", "example.org", "--dir", d, "--key-uri", anchor_uri)
    assert r.code == 0, r.stderr
    assert (d / "trust-anchor.key.uri").exists() and not (d / "trust-anchor.key").exists()
    r = meshca_cmd(
        "issuer", "create", "--anchor-cert", d / "trust-anchor.crt", "--anchor-key", anchor_uri,
        "--dir", d, "--key-uri", softhsm.uri("create-issuer"),
    )  # fmt: skip
    assert r.code == 0, r.stderr
    issuer = meshca.TrustDir.at(d).load_issuer()
    svid = issuer.sign(
        meshca.generate_key().public_key(), meshca.SpiffeId.parse("spiffe://example.org/a"), now=meshca.system_clock()
    )
    meshca.verify_chain([svid.leaf, *svid.intermediates], issuer.bundle, at=meshca.system_clock())


def test_a_wrong_pin_and_a_missing_token_give_one_line_and_exit_1(
    softhsm: SoftHsm, meshca_cmd: Any, tmp_path: Path
) -> None:
    d = tmp_path / "d"
    r = meshca_cmd("init", "--dir", d, "--trust-domain", "example.org", "--issuer-key-uri", softhsm.uri("pins"))
    assert r.code == 0, r.stderr
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("0000-wrong\n")
    tdir = meshca.TrustDir.at(d)
    issue = ("issue", "--dir", d, "--spiffe-id", "spiffe://example.org/web", "--cert-out", tmp_path / "l.pem")
    cases = {
        softhsm.uri("pins", pin_file=wrong): "PinIncorrect",
        softhsm.uri("pins", token="not-plugged-in"): "no such token is present",
    }
    for uri, expected in cases.items():
        tdir.issuer_key_uri.write_text(uri + "\n")
        for argv in ((*issue, "--key-out", tmp_path / "l.key"), ("check", "--dir", d)):
            r = meshca_cmd(*argv)
            assert r.code == 1, (argv, r.stdout, r.stderr)
            out = r.stderr if argv[0] == "issue" else r.stdout
            assert expected in out
            assert "Traceback" not in r.stderr and PIN not in r.stderr + r.stdout
            if argv[0] == "issue":
                assert r.stderr.count("\n") == 1 and r.stderr.startswith("meshca: error: ")
