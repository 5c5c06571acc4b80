"""Fixtures of the node agent's tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import socket_dir


@pytest.fixture
def sock_path() -> Iterator[Path]:
    """The Workload API socket's path, in a `socket_dir` removed afterwards."""
    directory = socket_dir()
    yield directory / "api.sock"
    shutil.rmtree(directory)
