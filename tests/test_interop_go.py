"""Go's crypto/x509 verifies meshca's X.509-SVIDs, every key type and name shape the leaf template encodes.

The peer is `tests/peers/x509verify.go` (standard library only), built once per
session with the machine's Go toolchain. Without `go` the test skips locally
and fails in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from support.certbuild import NOW

from meshca import KeyType, SpiffeId
from meshca.testing import TestCA

PEER = Path(__file__).parent / "peers" / "x509verify.go"


@pytest.fixture(scope="session")
def go_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the Go toolchain is missing: CI must build the crypto/x509 peer")
        pytest.skip("no Go toolchain: the crypto/x509 peer is not built")
    out = tmp_path_factory.mktemp("go") / "x509verify"
    env = {**os.environ, "GO111MODULE": "off", "CGO_ENABLED": "0"}  # one file, standard library only
    built = subprocess.run([go, "build", "-o", str(out), str(PEER)], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr
    return out


def _verify(verifier: Path, tmp: Path, ca: TestCA, chain_pem: bytes, sid: str, at: int) -> tuple[int, str]:
    (tmp / "bundle.pem").write_bytes(ca.bundle.to_pem())
    (tmp / "chain.pem").write_bytes(chain_pem)
    done = subprocess.run(
        [str(verifier), str(tmp / "bundle.pem"), str(tmp / "chain.pem"), sid, str(at)],
        capture_output=True,
        text=True,
    )
    return done.returncode, done.stdout.strip()


@pytest.mark.parametrize("issuer_key", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048], ids=lambda k: k.value)
@pytest.mark.parametrize("leaf_key", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048], ids=lambda k: k.value)
@pytest.mark.parametrize("dns", [(), ("web.default.svc",), ("a.example", "b.example", "c.example")], ids=len)
def test_go_verifies_the_leaf(
    go_verifier: Path, tmp_path: Path, issuer_key: KeyType, leaf_key: KeyType, dns: tuple[str, ...]
) -> None:
    ca = TestCA("example.org", now=NOW, key_type=issuer_key)
    sid = "spiffe://example.org/ns/default/sa/web"
    svid = ca.issue_svid(sid, key_type=leaf_key, dns_names=dns)
    code, out = _verify(go_verifier, tmp_path, ca, svid.chain_pem, sid, int(NOW.timestamp()))
    assert (code, out) == (0, "ok")


def test_go_refuses_what_meshca_refuses(go_verifier: Path, tmp_path: Path) -> None:
    ca, rogue = TestCA("example.org", now=NOW), TestCA("example.org", now=NOW)
    sid = SpiffeId.parse("spiffe://example.org/web")
    svid = ca.issue_svid(sid, ttl=timedelta(hours=1))
    expired = int((NOW + timedelta(hours=2)).timestamp())
    assert _verify(go_verifier, tmp_path, ca, svid.chain_pem, str(sid), expired)[0] == 1
    assert _verify(go_verifier, tmp_path, rogue, svid.chain_pem, str(sid), int(NOW.timestamp()))[0] == 1
    wrong_id = "spiffe://example.org/api"
    assert _verify(go_verifier, tmp_path, ca, svid.chain_pem, wrong_id, int(NOW.timestamp()))[0] == 1
