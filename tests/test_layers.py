"""The layers of docs/architecture.md, as a contract over the import graph.

Imports point down: cli -> server, agent, client -> pki. pki imports nothing
of meshca's outside itself; server and client never import each other or the
CLI; generated protobuf code is reached only from the layers that speak gRPC.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "meshca"

# layer -> the meshca layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "pki": set(),
    "server": {"pki", "_proto"},
    "agent": {"pki", "_proto", "client"},
    "client": {"pki", "_proto"},
    "cli": {"pki", "_proto", "server", "agent", "client"},
    "testing": {"pki"},
    "__init__": {"pki"},
    "__main__": {"cli"},
}


def _layer_of(relative: Path) -> str:
    return relative.with_suffix("").parts[0]


def _imports(relative: Path, source: str) -> set[str]:
    """The meshca modules ``source`` (the file at ``relative`` under meshca/) imports."""
    found: set[str] = set()
    package = ["meshca", *relative.parent.parts]
    for node in ast.walk(ast.parse(source, str(relative))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "meshca" or name.startswith("meshca.")}


def violations(relative: Path, source: str) -> set[str]:
    """The imports of ``source`` that point up or sideways."""
    layer = _layer_of(relative)
    if layer not in ALLOWED:
        return {f"<{relative} is in no layer of docs/architecture.md>"}
    wrong = set()
    for module in _imports(relative, source):
        parts = module.split(".")
        target = parts[1] if len(parts) > 1 else "__init__"
        if target != layer and target not in ALLOWED[layer]:
            wrong.add(module)
    return wrong


SOURCES = sorted(p.relative_to(ROOT) for p in ROOT.rglob("*.py") if "_proto" not in p.relative_to(ROOT).parts)


@pytest.mark.parametrize("relative", SOURCES, ids=str)
def test_imports_point_down(relative: Path) -> None:
    wrong = violations(relative, (ROOT / relative).read_text())
    assert not wrong, f"meshca/{relative} imports {sorted(wrong)} against the layering"


def test_every_layer_is_present() -> None:
    assert {"pki", "server", "client", "cli"} <= {_layer_of(p) for p in SOURCES}


@pytest.mark.parametrize(
    ("relative", "line"),
    [
        ("pki/_spiffe.py", "from meshca.server import _app"),
        ("pki/_spiffe.py", "import meshca"),
        ("pki/_spiffe.py", "from ..client import _source"),
        ("client/_tls.py", "from meshca.server._store import Store"),
        ("server/_app.py", "from meshca.cli import main"),
        ("server/_app.py", "import meshca"),
        ("new_layer/_x.py", "import json"),
    ],
)
def test_an_upward_import_is_caught(relative: str, line: str) -> None:
    assert violations(Path(relative), line + "\n")


def test_downward_imports_pass() -> None:
    assert not violations(Path("server/_app.py"), "from meshca.pki._issuer import Issuer\nfrom . import _store\n")
    assert not violations(Path("cli/_serve.py"), "from meshca.server._app import IdentityServer\n")
