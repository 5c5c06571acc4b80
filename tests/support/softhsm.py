"""A throwaway SoftHSM2 token for the PKCS#11 tests.

SOFTHSM2_CONF points at a temporary config and token directory for the
whole test session, so the machine's own tokens are never touched. Without
softhsm2 (or python-pkcs11) a test skips with the reason; in CI (CI=true) it
fails instead: scripts/test.sh installs both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

LABEL = "meshca"
PIN = "4711-test-pin"  # a throwaway token's; never in a log line or error (the tests check)
SO_PIN = "so-4711-test-pin"
MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: never skipped)")
    pytest.skip(reason)


@dataclass(frozen=True)
class SoftHsm:
    module: Path
    tokens: Path
    pin_file: Path

    def uri(self, obj: str, *, token: str = LABEL, pin_file: Path | None = None) -> str:
        pin = pin_file or self.pin_file
        return f"pkcs11:token={token};object={obj}?module-path={self.module}&pin-source=file:{pin}"

    @contextmanager
    def removed(self) -> Iterator[None]:
        """The token directory moved away (the token is gone) and put back afterwards."""
        away = self.tokens.with_name("tokens.away")
        self.tokens.rename(away)
        self.tokens.mkdir()
        try:
            yield
        finally:
            self.tokens.rmdir()
            away.rename(self.tokens)


def make_softhsm(directory: Path) -> SoftHsm:
    module = next((Path(m) for m in MODULES if Path(m).is_file()), None)
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        skip_or_fail("SoftHSM2 is not installed (apt-get install softhsm2)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        skip_or_fail("python-pkcs11 is not installed (pip install 'meshca[hsm]')")
    assert module is not None and util is not None
    tokens = directory / "tokens"
    tokens.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by this process's module and every meshca started
    subprocess.run(
        [util, "--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
    )
    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    return SoftHsm(module, tokens, pin_file)
