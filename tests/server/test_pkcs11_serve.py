"""`meshca serve` with the issuer key on a PKCS#11 token (SoftHSM2): every worker signs through it,
a failing token makes the service unavailable and not ready, and it recovers with the token."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from support.calls import native_request
from support.certs import spiffe_csr
from support.ids import WEB
from support.metrics import http_get
from support.procs import ServeProcess
from support.softhsm import PIN, SoftHsm
from support.tokens import add_token

import meshca
from meshca._proto import meshca_identity_pb2_grpc
from meshca.pki._pkcs11 import Pkcs11Uri


def _init_on_token(d: Path, softhsm: SoftHsm, name: str) -> None:
    uri = Pkcs11Uri.parse(softhsm.uri(name))
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock(), issuer_key_uri=uri)


def _issue(port: int, d: Path, token: str) -> x509.Certificate:
    """One issuance over a fresh channel (a new connection, which the kernel may hand to either worker)."""
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials((d / "bundle.pem").read_bytes())) as ch:
        _, csr = spiffe_csr()
        response = meshca_identity_pb2_grpc.IdentityStub(ch).IssueSVID(
            native_request(csr, join_token=token), timeout=20
        )
    leaf = x509.load_der_x509_certificate(response.leaf)
    chain = [leaf, *(x509.load_der_x509_certificate(c) for c in response.intermediates)]
    meshca.verify_chain(chain, meshca.TrustDir.at(d).load_bundle(), at=meshca.system_clock())
    return leaf


def _wait_for(proc: ServeProcess, count: int, event: str, timeout: float = 30) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in proc.events if e.get("event") == event]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {event} event:\n" + "\n".join(proc.lines))


def test_two_workers_issue_through_the_token(d: Path, softhsm: SoftHsm) -> None:
    _init_on_token(d, softhsm, "serve-workers")
    issuer_cert = x509.load_pem_x509_certificate((d / "issuer.crt").read_bytes())
    with ServeProcess(d, "--workers", "2") as proc:
        port = int(_wait_for(proc, 2, "server.started")[0]["port"])  # type: ignore[call-overload]
        token = add_token(d, WEB, uses=24)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            leaves = list(pool.map(lambda _: _issue(port, d, token), range(24)))
        for leaf in leaves:
            leaf.verify_directly_issued_by(issuer_cert)
        assert {e.get("worker") for e in proc.events if e.get("event") == "svid.issued"} == {0, 1}
        assert proc.terminate() == 0
    assert PIN not in "\n".join(proc.lines)


def test_a_failing_token_makes_serve_unavailable_and_not_ready_until_it_returns(d: Path, softhsm: SoftHsm) -> None:
    _init_on_token(d, softhsm, "serve-flaky")
    with ServeProcess(d, "--workers", "1") as proc:
        port = proc.wait_started()
        metrics_port = int(_wait_for(proc, 1, "server.started")[0]["metrics_port"])  # type: ignore[call-overload]
        token = add_token(d, WEB, uses=10)
        _issue(port, d, token)
        assert http_get(metrics_port, "/readyz")[0] == 200
        with softhsm.removed():
            with pytest.raises(grpc.RpcError) as refused:
                _issue(port, d, token)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "PKCS#11" in (refused.value.details() or "")
            failed = _wait_for(proc, 1, "issuer.key_failed")[0]
            assert failed["pkcs11_error"]  # the PKCS#11 error class, e.g. ObjectHandleInvalid
            deadline = time.monotonic() + 10
            while http_get(metrics_port, "/readyz")[0] != 503 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert http_get(metrics_port, "/readyz")[0] == 503
            with pytest.raises(grpc.RpcError) as still:
                _issue(port, d, token)  # refused at once while the token is away
            assert still.value.code() == grpc.StatusCode.UNAVAILABLE
        _wait_for(proc, 1, "issuer.key_recovered", timeout=15)
        _issue(port, d, token)
        assert http_get(metrics_port, "/readyz")[0] == 200
        assert proc.terminate() == 0
    assert PIN not in "\n".join(proc.lines)


def test_a_missing_token_fails_serve_in_one_line(d: Path, softhsm: SoftHsm) -> None:
    _init_on_token(d, softhsm, "serve-missing")
    tdir = meshca.TrustDir.at(d)
    tdir.issuer_key_uri.write_text(softhsm.uri("serve-missing", token="unplugged") + "\n")
    for workers in ("1", "2"):
        with ServeProcess(d, "--workers", workers) as proc:
            assert proc.wait(30) == 1
        errors = [line for line in proc.lines if line.startswith("meshca: error:")]
        assert len(errors) == 1 and "no such token is present" in errors[0], proc.lines
        assert not any("Traceback" in line for line in proc.lines)
