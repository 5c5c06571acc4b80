"""Shared fixtures: a frozen time, test CAs minted at that time, and a CLI runner.

CAs are session-scoped because key generation is the slow part; tests treat
them as read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from certbuild import NOW
from softhsm import SoftHsm, make_softhsm

import meshca
from meshca.testing import FrozenClock, TestCA


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


# -- running the CLI


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


def _console_script() -> list[str]:
    found = shutil.which("meshca")
    if found is None:
        pytest.fail("the meshca console script is not on PATH; install the package with pip install -e .")
    return [found]


@pytest.fixture(scope="session")
def meshca_cmd() -> Callable[..., Result]:
    """Runs the installed ``meshca`` console script in a subprocess."""
    script = _console_script()

    def run(*args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 30) -> Result:
        proc = subprocess.run(
            [*script, *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run
