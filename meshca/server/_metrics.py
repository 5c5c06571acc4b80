"""Prometheus metrics and the HTTP endpoint that serves them with /livez and /readyz."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshca.server._ports import bind_error

__all__ = ["Metrics", "MetricsServer"]

log = structlog.get_logger("meshca.server")


class Metrics:
    """The golden metrics of the identity service, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "meshca_requests",
            "gRPC requests by service, method and status code",
            ["service", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "meshca_request_duration_seconds",
            "gRPC request latency",
            ["service", "method"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.issued = Counter("meshca_svids_issued", "X.509-SVIDs issued", ["trust_domain", "api"], registry=r)
        self.auth_failures = Counter(
            "meshca_authentication_failures", "Refused credentials by reason", ["reason"], registry=r
        )
        self.reloads = Counter("meshca_issuer_reloads", "Issuer and bundle reloads by result", ["result"], registry=r)
        # multiprocess_mode applies under `serve --workers N`: the newest value of any worker.
        self.issuer_expiry = Gauge(
            "meshca_issuer_expiry_timestamp_seconds",
            "NotAfter of the serving issuer chain",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.anchor_expiry = Gauge(
            "meshca_anchor_expiry_timestamp_seconds",
            "NotAfter of each trust anchor",
            ["fingerprint"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.serving = Gauge(
            "meshca_issuer_usable", "1 while the issuer can sign", registry=r, multiprocess_mode="livemin"
        )


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, but at most ``slots`` of them: a connection beyond is closed at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], slots: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(slots)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # idle or slow clients hold every slot; refuse, do not queue threads
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper that gave up resets the connection: worth a line, not a traceback.
        exc = sys.exc_info()[1]
        log.info("metrics.connection_error", reason=str(exc) or type(exc).__name__)


class MetricsServer:
    """Serves /metrics, /livez and /readyz on a plain HTTP port, in a thread.

    At most ``max_connections`` connections are served at once, each read
    or write waits at most ``timeout`` seconds, and a connection is closed
    after one request.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        ready: Callable[[], bool],
        *,
        max_connections: int = 16,
        timeout: float = 10.0,
    ) -> None:
        io_timeout = timeout

        class Handler(BaseHTTPRequestHandler):
            timeout = io_timeout  # for every read and write of this connection

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/livez":
                    self._reply(200, b"ok\n")
                elif self.path == "/readyz":
                    ok = ready()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"no usable issuer\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes (and timed-out requests) are not worth a log line each

        try:
            self._httpd = _BoundedServer((host, port), Handler, max_connections)
        except OSError as exc:
            raise bind_error(exc, host, port, "metrics") from None
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="meshca-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
