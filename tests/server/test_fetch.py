"""`meshca fetch`: SVID files for proxies that read PEM from disk, kept fresh with --watch."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import meshca

from .harness import WEB, add_token
from .procs import ServeProcess, meshca_exe, run_meshca


def _serve(d: Path, *extra: str) -> ServeProcess:
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    proc = ServeProcess(d, "--workers", "1", *extra)
    proc.wait_started()
    return proc


def _token(d: Path, uses: int = 1) -> str:
    store = meshca.server.SqliteStore(meshca.server.store_path(meshca.TrustDir.at(d)))
    try:
        return add_token(store, WEB, uses=uses)
    finally:
        store.close()


def test_fetch_writes_a_verified_svid_key_and_bundle(d: Path, tmp_path: Path) -> None:
    with _serve(d) as server:
        out = tmp_path / "out"
        token_file = tmp_path / "token"
        token_file.write_text(_token(d) + "\n")
        result = run_meshca(
            "fetch", "--server", f"localhost:{server.port}", "--bundle", d / "bundle.pem",
            "--token-file", token_file, "--spiffe-id", str(WEB), "--out-dir", out, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(os.stat(out / "svid.key").st_mode) == 0o600
        chain = (out / "svid.pem").read_bytes()
        bundle = meshca.TrustBundle.from_pem((out / "bundle.pem").read_bytes())
        assert meshca.verify_chain(chain, bundle, at=meshca.system_clock()) == WEB
        key = meshca.load_private_key((out / "svid.key").read_bytes())
        leaf = meshca.pki._certs.load_certificates(chain)[0]
        assert leaf.public_key() == key.public_key()
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(out / "bundle.pem"), "-untrusted", str(out / "svid.pem"),
             str(out / "svid.pem")], capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr


def test_fetch_with_a_bad_token_fails_in_one_line(d: Path, tmp_path: Path) -> None:
    with _serve(d) as server:
        result = run_meshca(
            "fetch", "--server", f"localhost:{server.port}", "--bundle", d / "bundle.pem", "--token", "mtok_nope",
            "--spiffe-id", str(WEB), "--out-dir", tmp_path / "out", "--timeout", "3s", timeout=60,
        )  # fmt: skip
        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if line.startswith("meshca: error")]
        assert len(errors) == 1 and "no SVID" in errors[0]
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out" / "svid.key").exists()


def test_fetch_watch_renews_rewrites_and_runs_the_command(d: Path, tmp_path: Path) -> None:
    with _serve(d, "--leaf-ttl", "4s") as server:
        out = tmp_path / "out"
        marker = tmp_path / "reloads"
        command = f"{sys.executable} -c \"open('{marker}', 'a').write('x')\""
        proc = subprocess.Popen(
            [meshca_exe(), "fetch", "--server", f"localhost:{server.port}", "--bundle", str(d / "bundle.pem"),
             "--token", _token(d), "--spiffe-id", str(WEB), "--out-dir", str(out), "--watch", "--exec", command],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            serials = set()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(serials) < 3:
                try:
                    chain = (out / "svid.pem").read_bytes()
                    serials.add(meshca.pki._certs.load_certificates(chain)[0].serial_number)
                except (OSError, ValueError):
                    pass
                time.sleep(0.2)
            assert len(serials) >= 3, "the SVID file was not renewed"
            assert marker.exists() and len(marker.read_text()) >= 3
            # Key and certificate on disk always belong together after a rewrite.
            key = meshca.load_private_key((out / "svid.key").read_bytes())
            leaf = meshca.pki._certs.load_certificates((out / "svid.pem").read_bytes())[0]
            if leaf.public_key() != key.public_key():  # caught between the two renames: read again
                time.sleep(0.5)
                key = meshca.load_private_key((out / "svid.key").read_bytes())
                leaf = meshca.pki._certs.load_certificates((out / "svid.pem").read_bytes())[0]
            assert leaf.public_key() == key.public_key()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
