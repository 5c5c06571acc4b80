"""Shared fixtures: a frozen time, test CAs minted at that time, and a CLI runner; the async test hook.

CAs are session-scoped because key generation is the slow part; tests treat
them as read-only. What tests import lives in the ``support`` package.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from support import procs
from support.certbuild import NOW
from support.softhsm import SoftHsm, make_softhsm

import meshca
from meshca.cli import main
from meshca.testing import FrozenClock, TestCA

ASYNC_TEST_TIMEOUT = 30.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Runs an ``async def`` test in a fresh event loop of its own, under a hard timeout (no plugin needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**args), ASYNC_TEST_TIMEOUT))
    return True


@pytest.fixture
def now() -> datetime:
    return NOW


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture(scope="session")
def ca() -> TestCA:
    """The main test CA for ``example.org``, minted at NOW."""
    return TestCA("example.org", now=NOW)


@pytest.fixture(scope="session")
def rogue_ca() -> TestCA:
    """Another CA for the same trust domain: same names, different keys."""
    return TestCA("example.org", now=NOW)


@pytest.fixture(scope="session")
def foreign_ca() -> TestCA:
    """A CA for another trust domain."""
    return TestCA("other.test", now=NOW)


@pytest.fixture(scope="session")
def live_ca() -> TestCA:
    """A CA minted at the real time, for peers (OpenSSL, GnuTLS, TLS) that read the system clock."""
    return TestCA("example.org")


@pytest.fixture(scope="session")
def live_foreign_ca() -> TestCA:
    return TestCA("example.org")


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A throwaway SoftHSM2 token labelled ``meshca`` for the whole session (tests/softhsm.py)."""
    before = os.environ.get("SOFTHSM2_CONF")
    yield make_softhsm(tmp_path_factory.mktemp("softhsm"))
    if before is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = before


@pytest.fixture(scope="session")
def rsa4096_key() -> meshca.PrivateKey:
    """RSA-4096 generation takes a second or more: once per session."""
    return meshca.generate_key(meshca.KeyType.RSA_4096)


@pytest.fixture(scope="session")
def meshca_cmd() -> Callable[..., procs.Result]:
    """Runs the installed ``meshca`` console script in a subprocess."""
    procs.meshca_exe()  # fails at once when the console script is not installed
    return procs.meshca_cmd


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., procs.Result]]:
    """Runs `meshca.cli.main` in-process, optionally with a frozen clock."""

    def run(*args: str | Path, clock: FrozenClock | None = None) -> procs.Result:
        capsys.readouterr()
        crash = ""
        try:
            code = main([str(a) for a in args], clock=clock) if clock else main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            # What the console script would print: an escaped exception is a traceback.
            code, crash = 1, traceback.format_exc()
        out, err = capsys.readouterr()
        return procs.Result(code, out, err + crash)

    yield run
