"""The metrics HTTP endpoint under hostile or careless clients: bounded threads, timeouts, no tracebacks."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from support.metrics import http_get

from meshca.server._metrics import MetricsServer


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, lambda: True, max_connections=4, timeout=0.5)
    server.start()
    yield server
    server.stop()


def _eventually(check: Callable[[], object], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_idle_half_sent_requests_hold_a_bounded_number_of_threads_and_time_out(server: MetricsServer) -> None:
    before = threading.active_count()
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]
    try:
        for client in clients:
            client.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        time.sleep(0.3)
        assert threading.active_count() <= before + 4
        # The slow clients are cut at the timeout; a scrape gets through again.
        _eventually(lambda: _try_get(server.port) == (200, "ok\n"), "a free slot")
    finally:
        for client in clients:
            client.close()


def _try_get(port: int) -> tuple[int, str] | None:
    try:
        return http_get(port, "/livez")
    except OSError:
        return None  # refused while every slot is held


def test_a_client_resetting_the_connection_costs_a_log_line_not_a_traceback(
    server: MetricsServer, capfd: pytest.CaptureFixture[str]
) -> None:
    with capture_logs() as logs:
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST, as a scraper that gave up
        _eventually(lambda: logs, "the log line")
    assert [e["event"] for e in logs] == ["metrics.connection_error"]
    assert "Traceback" not in capfd.readouterr().err
    assert http_get(server.port, "/livez") == (200, "ok\n")
