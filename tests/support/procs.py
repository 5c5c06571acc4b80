"""The ``meshca`` console script in a subprocess: one command and its result, or `meshca serve` kept running."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def meshca_exe() -> str:
    """The console script of the Python running the tests (a venv's, even when not activated), else PATH's."""
    beside = Path(sys.executable).parent / "meshca"
    if beside.is_file():
        return str(beside)
    found = shutil.which("meshca")
    if found is None:
        pytest.fail("the meshca console script is not on PATH; install the package with pip install -e .")
    return found


class ServeProcess:
    """``meshca serve --dir DIR`` on ephemeral 127.0.0.1 ports; stderr is collected line by line."""

    def __init__(self, directory: Path, *extra: str, umask: int | None = None) -> None:
        args = [
            meshca_exe(),
            "serve",
            "--dir",
            str(directory),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            *extra,
        ]
        self.proc = subprocess.Popen(
            with_umask(args, umask), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.port = 0

    def _read(self, stream: Any, collect: bool) -> None:
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip("\n")
                if collect:
                    self.lines.append(line)
                    self._queue.put(line)
        if collect:
            self._queue.put(None)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON log events; a log line that is not exactly one JSON object fails the test."""
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise AssertionError(f"a log line is not one JSON object (interleaved writes?): {line!r}") from None
        return out

    def wait_started(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise AssertionError("meshca serve did not start:\n" + "\n".join(self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(5)
                raise AssertionError(f"meshca serve exited {self.proc.returncode}:\n" + "\n".join(self.lines))
            if line.startswith("{") and json.loads(line).get("event") == "server.started":
                self.port = int(json.loads(line)["port"])
                return self.port

    def wait_workers(self, workers: int, timeout: float = 30) -> tuple[int, int]:
        """Waits for N started workers; the port and the metrics port (the supervisor's, or the one process's)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events
            started = [e for e in events if e.get("event") == "server.started"]
            sup = [e for e in events if e.get("event") == "supervisor.started"]
            if len(started) >= workers and (sup or workers == 1):  # `--workers 1` runs without a supervisor
                return int(started[0]["port"]), int((sup or started)[0]["metrics_port"])
            time.sleep(0.1)
        raise AssertionError("workers did not start:\n" + "\n".join(self.lines))

    def terminate(self, timeout: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def with_umask(args: list[str], umask: int | None) -> list[str]:
    """``args`` run under ``umask`` (None: the parent's), by a shell that then execs them (same pid)."""
    if umask is None:
        return args
    return ["/bin/sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *args]


def run_meshca(
    *args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 30, umask: int | None = None
) -> subprocess.CompletedProcess[str]:
    command = with_umask([meshca_exe(), *map(str, args)], umask)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False)


@dataclass(frozen=True)
class Result:
    """What the ``meshca_cmd`` fixture returns."""

    code: int
    stdout: str
    stderr: str


def assert_clean_failure(result: Result, code: int | None = None) -> None:
    """Non-zero, no traceback, and one ``meshca: error:`` line: usage errors too, no usage dump."""
    assert result.code != 0, result
    if code is not None:
        assert result.code == code, result
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshca: error: "), result.stderr


def meshca_cmd(*args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 30) -> Result:
    proc = run_meshca(*args, cwd=cwd, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)
