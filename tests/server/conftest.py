"""Fixtures for the identity-service tests: CAs, a Kubernetes token signer and API server, PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import pg
from support.ids import TD
from support.kubeapi import FakeApiServer
from support.tokens import K8sIssuer

from meshca.testing import TestCA


@pytest.fixture(scope="session")
def server_ca() -> TestCA:
    """A CA for example.org minted at the real time (TLS peers read the system clock). Read-only."""
    return TestCA(TD)


@pytest.fixture(scope="session")
def k8s() -> K8sIssuer:
    """The cluster's service-account token signer (EC P-256: fast to make)."""
    return K8sIssuer.make("ec")


@pytest.fixture(scope="session")
def k8s_rsa() -> K8sIssuer:
    return K8sIssuer.make("rsa")


@pytest.fixture
def d(tmp_path: Path) -> Path:
    """The trust directory of one test's server."""
    path = tmp_path / "trust"
    path.mkdir()
    return path


@pytest.fixture
def api_server(server_ca: TestCA, tmp_path: Path) -> Iterator[FakeApiServer]:
    """A Kubernetes API server stand-in on 127.0.0.1 that answers TokenReviews."""
    fake = FakeApiServer(server_ca, tmp_path)
    yield fake
    fake.close()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test PostgreSQL server (MESHCA_TEST_POSTGRES_URL); a role that may create databases."""
    return pg.server_url()


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database on the test server, dropped afterwards; its URL."""
    url = pg.create_database(postgres_url)
    yield url
    pg.drop_database(postgres_url, url)


@pytest.fixture
def pg_cluster() -> Iterator[pg.Cluster]:
    """A PostgreSQL server of this test's own, which the test may stop and start."""
    cluster = pg.Cluster()
    yield cluster
    cluster.remove()
