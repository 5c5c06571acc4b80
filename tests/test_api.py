"""The public API: `meshca.__all__` is the curated, complete, sorted list of public names."""

from __future__ import annotations

import inspect
import types

import pytest

import meshca
import meshca.testing


def test_all_is_sorted() -> None:
    assert list(meshca.__all__) == sorted(meshca.__all__)


def test_all_has_no_duplicates() -> None:
    assert len(set(meshca.__all__)) == len(meshca.__all__)


def test_all_has_no_private_names() -> None:
    assert [name for name in meshca.__all__ if name.startswith("_")] == []


@pytest.mark.parametrize("name", meshca.__all__)
def test_every_name_resolves(name: str) -> None:
    assert getattr(meshca, name) is not None


def test_every_public_name_is_listed() -> None:
    public = {
        name
        for name, value in vars(meshca).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }
    assert public - set(meshca.__all__) == set(), "public names missing from __all__"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from meshca import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(meshca.__all__)


def test_public_names_come_from_private_pki_modules() -> None:
    for name in meshca.__all__:
        value = getattr(meshca, name)
        module = getattr(value, "__module__", None)
        if module is not None and (inspect.isclass(value) or inspect.isfunction(value)):
            assert module.startswith("meshca.pki._"), f"{name} is defined in {module}"


def test_version() -> None:
    assert isinstance(meshca.__version__, str)
    assert meshca.__version__.count(".") >= 2


def test_error_tree() -> None:
    errors = [
        getattr(meshca, n)
        for n in meshca.__all__
        if n.endswith("Error")
        or n in ("InvalidSpiffeId", "InvalidCsr", "IssuerUnavailable", "CsrNameMismatch", "PermissionDenied")
    ]
    assert meshca.MeshcaError in errors
    for cls in errors:
        assert issubclass(cls, meshca.MeshcaError), cls
    assert issubclass(meshca.InvalidSpiffeId, ValueError)
    assert issubclass(meshca.AuthorizationError, meshca.VerificationError)
    assert issubclass(meshca.IssuerUnavailable, meshca.IssuanceError)


def test_testing_module_api() -> None:
    assert meshca.testing.__all__ == sorted(meshca.testing.__all__)
    for name in meshca.testing.__all__:
        assert getattr(meshca.testing, name) is not None
    assert meshca.testing.TestCA.__test__ is False
    assert meshca.testing.TestSvid.__test__ is False
