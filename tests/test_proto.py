"""The checked-in generated code is exactly what the pinned grpcio-tools makes from proto/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_proto_sources(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = gen
    spec.loader.exec_module(gen)
    gen.generate(ROOT, tmp_path)
    fresh = sorted(p.name for p in (tmp_path / "meshca" / "_proto").iterdir())
    checked_in = sorted(
        p.name for p in (ROOT / "meshca" / "_proto").iterdir() if p.name != "__init__.py" and p.is_file()
    )
    assert fresh == checked_in
    for name in fresh:
        assert (tmp_path / "meshca" / "_proto" / name).read_text() == (ROOT / "meshca" / "_proto" / name).read_text(), (
            f"meshca/_proto/{name} is stale: run python scripts/gen_proto.py"
        )


def test_wire_names_are_the_ones_linkerd_and_istio_use() -> None:
    from meshca._proto import istio_ca_pb2, linkerd_identity_pb2

    linkerd = linkerd_identity_pb2.DESCRIPTOR.services_by_name["Identity"]
    assert linkerd.full_name == "io.linkerd.proxy.identity.Identity"
    request = linkerd_identity_pb2.CertifyRequest.DESCRIPTOR
    assert {f.name: f.number for f in request.fields} == {
        "identity": 1,
        "token": 2,
        "certificate_signing_request": 3,
    }
    response = linkerd_identity_pb2.CertifyResponse.DESCRIPTOR
    assert {f.name: f.number for f in response.fields} == {
        "leaf_certificate": 1,
        "intermediate_certificates": 2,
        "valid_until": 3,
    }
    istio = istio_ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    assert istio.full_name == "istio.v1.auth.IstioCertificateService"
    ireq = istio_ca_pb2.IstioCertificateRequest.DESCRIPTOR
    assert {f.name: f.number for f in ireq.fields} == {"csr": 1, "validity_duration": 3, "metadata": 4}
    assert {f.name: f.number for f in istio_ca_pb2.IstioCertificateResponse.DESCRIPTOR.fields} == {"cert_chain": 1}


def _shape(descriptor) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Every message's fields as (number, type, label, map) by name: what reaches the wire."""
    shape: dict[str, object] = {}
    for name, message in descriptor.message_types_by_name.items():
        fields = {}
        for f in message.fields:
            entry = (
                f.message_type.fields_by_name["value"].type
                if f.message_type and f.message_type.GetOptions().map_entry
                else None
            )
            fields[f.name] = (f.number, f.type, f.is_repeated, entry)
        shape[name] = fields
    return shape


def test_workload_api_matches_py_spiffe() -> None:
    from spiffe._proto import workload_pb2 as theirs

    from meshca._proto import workload_pb2 as ours

    assert _shape(ours.DESCRIPTOR) == _shape(theirs.DESCRIPTOR)
    mine = ours.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
    spec = theirs.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
    assert spec.full_name == "SpiffeWorkloadAPI"  # the SPIFFE paths: /SpiffeWorkloadAPI/<Rpc>
    assert [(m.name, m.input_type.name, m.output_type.name, m.server_streaming) for m in mine.methods] == [
        (m.name, m.input_type.name, m.output_type.name, m.server_streaming) for m in spec.methods
    ]
