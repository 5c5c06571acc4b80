"""Every fenced block of README.md runs as written, so no snippet can rot.

Blocks run in document order in one temporary directory, so a block sees
what earlier ones made (``td/`` from ``meshca init``, a token file):

- ```sh blocks: each command (backslash continuations joined) runs in bash
  and must exit 0. A ``meshca serve`` command keeps running until the end of
  the test, on ephemeral 127.0.0.1 ports (``--listen`` and
  ``--metrics-listen`` are given again at the end; the last one counts), must
  start, and must exit 0 on SIGTERM. The newest one is the live server.
- ```python blocks run in a fresh interpreter with ``MESHCA_SERVER`` set to
  the live server's address and must exit 0.
- Blocks in another language fail the test unless they are plain text.

SKIP_PREFIX and SKIP_COMMAND list what does not run as written, with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

# Commands that do not run as written, by prefix, with the reason.
SKIP_PREFIX = {
    "pip install . && ": "the package under test is installed already (reinstalling would test another copy); "
    "the rest of the command runs",
}
SKIP_COMMAND = {
    "bash scripts/test.sh": "it runs this test suite, which would run itself",
}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, blank and comment-only lines dropped."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            out.append(command)
    return out


class Servers:
    """The `meshca serve` processes the README starts."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.running: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.address: str | None = None

    def start(self, command: str) -> None:
        args = shlex.split(command, comments=True)
        args += ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
        log = self.directory / f"serve-{len(self.running)}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(args, cwd=self.directory, env=self.env, stdout=sink, stderr=sink)
        self.running.append((proc, log))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            for line in log.read_text().splitlines():
                event = json.loads(line) if line.startswith("{") else {}
                if event.get("event") == "server.started":
                    self.address = f"127.0.0.1:{event['port']}"
                    return
            time.sleep(0.1)
        pytest.fail(f"`{command}` did not start:\n{log.read_text()}")

    def stop(self) -> None:
        for proc, log in self.running:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            assert code == 0, f"meshca serve exited {code} on SIGTERM:\n{log.read_text()}"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    exe = shutil.which("meshca")
    assert exe is not None, "the meshca console script is not on PATH; install the package with pip install -e ."
    env = {**os.environ, "PATH": f"{Path(exe).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = Servers(tmp_path, env)
    try:
        yield started
    finally:
        for proc, _ in started.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def run_shell(command: str, servers: Servers) -> None:
    if any(command.startswith(skipped) for skipped in SKIP_COMMAND):
        return
    for prefix in SKIP_PREFIX:
        command = command.removeprefix(prefix)
    if shlex.split(command, comments=True)[:2] == ["meshca", "serve"]:
        servers.start(command)
        return
    result = subprocess.run(
        ["bash", "-c", command], cwd=servers.directory, env=servers.env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{result.stdout}{result.stderr}"


def run_python(code: str, servers: Servers) -> None:
    env = dict(servers.env)
    if servers.address is not None:
        env["MESHCA_SERVER"] = servers.address
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=servers.directory, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"this snippet exited {result.returncode}:\n{code}\n{result.stdout}{result.stderr}"


def test_every_readme_block_runs(servers: Servers) -> None:
    found = blocks(README.read_text())
    assert {lang for lang, _ in found} >= {"sh", "python"}
    for lang, body in found:
        if lang == "sh":
            for command in commands(body):
                run_shell(command, servers)
        elif lang == "python":
            run_python(body, servers)
        else:
            assert lang in ("", "text"), f"a ```{lang} block is neither run nor plain text"
    servers.stop()


def test_commands_and_exemptions() -> None:
    assert commands("a \\\n  b  # c\n\n# only a comment\nd\n") == ["a    b  # c", "d"]
    text = README.read_text()
    shell = [c for lang, body in blocks(text) if lang == "sh" for c in commands(body)]
    # Each exemption still matches a README command: a stale one would hide nothing and mislead.
    for prefix in (*SKIP_PREFIX, *SKIP_COMMAND):
        assert any(c.startswith(prefix) for c in shell), prefix
