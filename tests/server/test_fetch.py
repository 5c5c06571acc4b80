"""`meshca fetch`: SVID files for proxies that read PEM from disk, kept fresh with --watch."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from support.ids import WEB
from support.poll import eventually_sync
from support.procs import ServeProcess, meshca_exe, run_meshca
from support.tokens import add_token

import meshca


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


def _error_line(result: Any) -> str:
    """The one ``meshca: error`` line of a failed run (and no traceback)."""
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("meshca: error")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def test_fetch_with_a_bad_token_fails_at_once_in_one_line_with_the_servers_reason(d: Path, tmp_path: Path) -> None:
    with _serve(d) as server:
        started = time.monotonic()
        result = run_meshca(
            "fetch", "--server", f"localhost:{server.port}", "--bundle", d / "bundle.pem", "--token", "mtok_nope",
            "--spiffe-id", str(WEB), "--out-dir", tmp_path / "out", "--timeout", "60s", timeout=60,
        )  # fmt: skip
        assert time.monotonic() - started < 30  # refused, not retried until the timeout
        error = _error_line(result)
        assert "no SVID" in error
        assert error.endswith("the identity service refused: UNAUTHENTICATED: unknown join token"), error
        assert not (tmp_path / "out" / "svid.key").exists()


def test_fetch_by_ip_says_the_name_does_not_match_and_suggests_server_name(d: Path, tmp_path: Path) -> None:
    with _serve(d) as server:
        token = _token(d)
        started = time.monotonic()
        result = run_meshca(
            "fetch", "--server", f"127.0.0.1:{server.port}", "--bundle", d / "bundle.pem", "--token", token,
            "--spiffe-id", str(WEB), "--out-dir", tmp_path / "out", "--timeout", "60s", timeout=60,
        )  # fmt: skip
        assert time.monotonic() - started < 30
        error = _error_line(result)
        assert "the server's certificate does not name 127.0.0.1 (it names localhost)" in error, error
        assert error.endswith("(meshca fetch --server-name localhost)"), error
        assert "reachable" not in error
        # The suggestion works, with the same one-use token: it never left this machine.
        fixed = run_meshca(
            "fetch", "--server", f"127.0.0.1:{server.port}", "--server-name", "localhost", "--bundle",
            d / "bundle.pem", "--token", token, "--spiffe-id", str(WEB), "--out-dir", tmp_path / "out", timeout=60,
        )  # fmt: skip
        assert fixed.returncode == 0, fixed.stderr
        assert (tmp_path / "out" / "svid.key").exists()


def test_fetch_from_nothing_gives_up_at_the_timeout_with_the_last_reason(d: Path, tmp_path: Path) -> None:
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    result = run_meshca(
        "fetch", "--server", f"localhost:{port}", "--bundle", d / "bundle.pem", "--token", "mtok_x",
        "--spiffe-id", str(WEB), "--out-dir", tmp_path / "out", "--timeout", "2s", timeout=60,
    )  # fmt: skip
    error = _error_line(result)
    assert f"no SVID for {WEB} within 2.0 s; the last attempt failed: UNAVAILABLE: " in error, error


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

            def renewed_twice() -> bool:
                with contextlib.suppress(OSError, ValueError):
                    chain = (out / "svid.pem").read_bytes()
                    serials.add(meshca.pki._certs.load_certificates(chain)[0].serial_number)
                return len(serials) >= 3

            eventually_sync(renewed_twice, 20, "the SVID file to be renewed twice", interval=0.2)
            # The command runs after each write, in a process of its own: it may finish a moment later.
            eventually_sync(lambda: marker.exists() and len(marker.read_text()) >= 3, 10, "--exec after each write")
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


def test_fetch_watch_follows_an_anchor_rotation_and_renews_at_once_when_its_anchor_is_retired(
    d: Path, tmp_path: Path
) -> None:
    """bundle.pem is rewritten at each step; a forced retire renews the SVID now, not at half of its hour."""
    with _serve(d, "--leaf-ttl", "1h") as server:
        out = tmp_path / "out"
        proc = subprocess.Popen(
            [meshca_exe(), "fetch", "--server", f"localhost:{server.port}", "--bundle", str(d / "bundle.pem"),
             "--token", _token(d, uses=2), "--spiffe-id", str(WEB), "--out-dir", str(out), "--watch"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:

            def anchors() -> list[x509.Certificate]:
                with contextlib.suppress(OSError, ValueError):
                    return meshca.pki._certs.load_certificates((out / "bundle.pem").read_bytes())
                return []

            eventually_sync(lambda: len(anchors()) == 1, 20, "the first files", interval=0.2)
            first = (out / "svid.pem").read_bytes()
            a = anchors()[0]
            assert run_meshca("anchor", "prepare", "--dir", d).returncode == 0
            b = x509.load_pem_x509_certificate((d / "trust-anchor.next.crt").read_bytes())
            eventually_sync(lambda: anchors() == [a, b], 10, "bundle.pem with the prepared anchor", interval=0.2)
            assert run_meshca("anchor", "activate", "--dir", d, "--force").returncode == 0
            assert run_meshca("anchor", "retire", "--dir", d, "--force").returncode == 0
            eventually_sync(lambda: anchors() == [b], 10, "bundle.pem without the retired anchor", interval=0.2)

            def renewed_under_b() -> bool:
                with contextlib.suppress(OSError, ValueError):
                    chain = meshca.pki._certs.load_certificates((out / "svid.pem").read_bytes())
                    return chain[1].issuer == b.subject
                return False

            # The SVID under A verifies no more: renewed at once with the join token's second use.
            eventually_sync(renewed_under_b, 10, "an SVID under the new anchor", interval=0.2)
            assert (out / "svid.pem").read_bytes() != first
            chain = meshca.pki._certs.load_certificates((out / "svid.pem").read_bytes())
            bundle = meshca.TrustBundle.from_pem((out / "bundle.pem").read_bytes())
            meshca.verify_chain(chain, bundle, at=meshca.system_clock())
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
