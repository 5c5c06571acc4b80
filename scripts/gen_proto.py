"""Regenerates meshca/_proto/ from proto/ (run from the repository root).

    python scripts/gen_proto.py [OUT_ROOT]

The import path is mapped to meshca/_proto so the generated gRPC modules
import their messages from the package. tests/test_proto.py regenerates into
a temporary directory and fails on any difference with the checked-in code.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTOS = [
    "meshca_identity.proto",
    "meshca_agent.proto",
    "linkerd_identity.proto",
    "istio_ca.proto",
    "workload.proto",
]
# Messages only: the agent serves the Workload API with grpclib, on the SPIFFE paths (see proto/workload.proto).
NO_STUBS = {"workload.proto"}


def generate(repo: Path, out_root: Path) -> None:
    (out_root / "meshca" / "_proto").mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    for name in PROTOS:
        args = [
            "protoc",
            f"-Imeshca/_proto={repo / 'proto'}",
            f"-I{well_known}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            *([] if name in NO_STUBS else [f"--grpc_python_out={out_root}"]),
            f"meshca/_proto/{name}",
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {name}")


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    generate(root, Path(sys.argv[1]) if len(sys.argv) > 1 else root)
