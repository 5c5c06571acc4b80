"""Edges found in review: absurd lifetimes, the server's own key in reprs, ports already taken, broken workers."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from google.protobuf.duration_pb2 import Duration
from support.calls import bearer, code_of, ipb, native_request
from support.certs import spiffe_csr, to_pem
from support.ids import WEB
from support.procs import run_meshca
from support.serving import serving

import meshca
from meshca.pki._keys import generate_key, write_private_key
from meshca.server import IdentityServer, ServerConfig
from meshca.testing import TestCA

C = grpc.StatusCode


@pytest.mark.parametrize("api", ["native-ttl", "istio-validity-duration"])
async def test_absurd_lifetimes_are_invalid_argument_not_internal(api: str, d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        token = h.token(WEB)
        if api == "native-ttl":
            request = native_request(spiffe_csr(WEB)[1], join_token=token)
            request.ttl.CopyFrom(Duration(seconds=10**15))
            call = h.native.IssueSVID(request)
        else:
            istio = ipb.IstioCertificateRequest(csr=to_pem(spiffe_csr(WEB)[1]), validity_duration=2**62)
            call = h.istio.CreateCertificate(istio, metadata=bearer(token))
        assert await code_of(call) == C.INVALID_ARGUMENT
        assert not h.events("request.failed")  # no INTERNAL, no traceback


async def test_the_server_svid_key_never_shows_in_a_repr(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        svid = h.server.state.serving_svid(("localhost",), timedelta(hours=1))
        assert b"PRIVATE KEY" in svid.key_pem
        assert "PRIVATE KEY" not in repr(svid)


async def test_a_second_server_on_a_taken_port_fails_to_start(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        other = IdentityServer(ServerConfig(dir=d, listen=f"127.0.0.1:{h.port}", metrics_listen=None))
        with pytest.raises(OSError, match="cannot listen"):
            await other.start()
        other.store.close()
        await asyncio.sleep(0)


def test_serve_with_a_broken_worker_config_exits_1_in_one_line(d: Path) -> None:
    meshca.TrustDir.at(d).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    result = run_meshca(
        "serve", "--dir", d, "--listen", "127.0.0.1:0", "--metrics-listen", "", "--workers", "2",
        "--k8s-jwks", d / "missing-jwks.json", "--k8s-issuer", "https://k8s", timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("meshca: error")]
    assert len(errors) == 1
    assert "worker.failed" in result.stderr and "missing-jwks.json" in result.stderr


def test_issuer_create_with_an_anchor_that_has_no_ski(tmp_path: Path) -> None:
    """An anchor from elsewhere may lack a Subject Key Identifier; the AKI is then computed from its key."""
    key = generate_key()
    now = meshca.system_clock()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "external root")])
    anchor = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )

    (tmp_path / "root.crt").write_bytes(anchor.public_bytes(Encoding.PEM))
    write_private_key(tmp_path / "root.key", key)
    result = run_meshca(
        "issuer", "create", "--anchor-cert", tmp_path / "root.crt", "--anchor-key", tmp_path / "root.key",
        "--trust-domain", "example.org", "--dir", tmp_path / "td",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    issuer = meshca.pki._certs.load_certificates((tmp_path / "td" / "issuer.crt").read_bytes())[0]
    aki = issuer.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    issuer.verify_directly_issued_by(anchor)
