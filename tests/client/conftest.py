"""Fixtures for the client-library tests: a trust directory, identity servers on threads, SVID sources.

Everything a fixture makes is closed at teardown, in reverse order, even
when the test fails half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.ids import SERVER_NAME, TD
from support.serving import Pair, ServerThread, Trust, start_pair

from meshca.client import SvidSource
from meshca.testing import TestCA


@pytest.fixture
def trust(tmp_path: Path) -> Trust:
    ca = TestCA(TD)  # minted at the real time: TLS peers read the system clock
    directory = tmp_path / "trust"
    ca.write(directory)
    return Trust(ca, directory)


@pytest.fixture
def servers() -> Iterator[Callable[..., ServerThread]]:
    """Makes `ServerThread`s (not started); stops and closes them all at teardown."""
    made: list[ServerThread] = []

    def make(directory: Path, **config: Any) -> ServerThread:
        made.append(ServerThread(directory, **config))
        return made[-1]

    yield make
    for server in reversed(made):
        server.close()


@pytest.fixture
def sources() -> Iterator[Callable[..., SvidSource]]:
    """Makes `SvidSource`s (``server_name`` defaults to localhost, the server's name); closes them at teardown."""
    made: list[SvidSource] = []

    def make(*args: Any, **kwargs: Any) -> SvidSource:
        kwargs.setdefault("server_name", SERVER_NAME)
        made.append(SvidSource(*args, **kwargs))
        return made[-1]

    yield make
    for source in reversed(made):
        source.close()


@pytest.fixture
def pair(trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]) -> Pair:
    return start_pair(trust, servers, sources)
