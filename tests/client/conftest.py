"""Fixtures for the client-library tests: a trust directory, identity servers on threads, SVID sources.

Everything a fixture makes is closed at teardown, in reverse order, even
when the test fails half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshca.client import SvidSource
from meshca.testing import TestCA

from .support import API, SERVER_NAME, TD, WEB, ServerThread, add_token


@dataclass(frozen=True)
class Trust:
    """A trust directory as `meshca init` writes it, and the CA in it."""

    ca: TestCA
    dir: Path


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


@dataclass(frozen=True)
class Pair:
    """An identity server and two ready sources: ``web`` (a TLS server here) and ``api`` (its client)."""

    server: ServerThread
    web: SvidSource
    api: SvidSource


def start_pair(
    trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource], **config: Any
) -> Pair:
    server = servers(trust.dir, **config)
    server.start()
    web = sources(server.address, trust.ca.bundle, WEB, join_token=add_token(trust.dir, WEB))
    api = sources(server.address, trust.ca.bundle, API, join_token=add_token(trust.dir, API))
    web.wait_ready(10)
    api.wait_ready(10)
    return Pair(server, web, api)


@pytest.fixture
def pair(trust: Trust, servers: Callable[..., ServerThread], sources: Callable[..., SvidSource]) -> Pair:
    return start_pair(trust, servers, sources)
