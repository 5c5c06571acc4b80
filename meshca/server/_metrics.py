"""Prometheus metrics and the HTTP endpoint that serves them with /livez and /readyz."""

from __future__ import annotations

import contextlib
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshca.server._ports import bind_error

__all__ = ["Children", "Labelled", "Metrics", "MetricsServer", "StoreMetrics"]

log = structlog.get_logger("meshca.server")


class Metrics:
    """The golden metrics of the identity service, on their own registry.

    ``multiprocess`` is set for the workers of `serve --workers N`, whose
    metrics prometheus_client writes to files the supervisor sums.
    ``managed`` (`serve --manage-issuers`) adds `next_rotation`, which file mode has nothing to put in.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess: bool = False, managed: bool = False
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess
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
        self.jwt_issued = Counter("meshca_jwt_svids_issued", "JWT-SVIDs issued", ["trust_domain"], registry=r)
        self.auth_failures = Counter(
            "meshca_authentication_failures", "Refused credentials by reason", ["reason"], registry=r
        )
        self.reloads = Counter("meshca_issuer_reloads", "Issuer and bundle reloads by result", ["result"], registry=r)
        # multiprocess_mode applies under `serve --workers N`. Each worker of a managed service has issuers
        # of its own: their series are per worker and vanish with it (livemostrecent). A series no longer in
        # use cannot be removed from the files prometheus_client shares; it is set to NaN (`Labelled`).
        self.issuer_expiry = Gauge(
            "meshca_issuer_expiry_timestamp_seconds",
            "NotAfter of every issuer in use, by fingerprint and state (active, prepared, old; staged in file mode)",
            ["fingerprint", "state"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.anchor_expiry = Gauge(
            "meshca_anchor_expiry_timestamp_seconds",
            "NotAfter of each trust anchor in the bundle",
            ["fingerprint"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.rotations = Counter(
            "meshca_rotations",
            "Rotations by kind (issuer: a managed step or a file-mode issuer swap; anchor; server_svid) and result",
            ["kind", "result"],
            registry=r,
        )
        # Managed mode only; the soonest step of any worker. A time, not a countdown: a poll loop that is
        # stuck (a store or a token that hangs) stops updating it, and a countdown would stay where it was.
        self.next_rotation = (
            Gauge(
                "meshca_next_rotation_timestamp_seconds",
                "When the next scheduled managed issuer step is due (Unix time; in the past when overdue)",
                registry=r,
                multiprocess_mode="livemin",
            )
            if managed
            else None
        )
        self.serving = Gauge(
            "meshca_issuer_usable", "1 while the issuer can sign", registry=r, multiprocess_mode="livemin"
        )
        self.watch_streams = Gauge(
            "meshca_watch_streams", "Open WatchBundle streams", registry=r, multiprocess_mode="livesum"
        )
        self.watch_refused = Counter(
            "meshca_watch_streams_refused",
            "WatchBundle streams refused at a cap, by the cap that refused them (peer or total)",
            ["limit"],
            registry=r,
        )
        self.store_up = Gauge(
            "meshca_store_up",
            "1 while the state store can write (see the store.down log line for why not)",
            registry=r,
            multiprocess_mode="livemin",
        )


class Labelled:
    """The series of a labelled gauge that are in use now: `update` sets them and drops the rest.

    A dropped series is removed; in multiprocess mode, where the shared files
    cannot forget a series, it is set to NaN, which no comparison in an alert
    rule matches.
    """

    __slots__ = ("_gauge", "_multiprocess", "_shown")

    def __init__(self, gauge: Gauge, multiprocess: bool) -> None:
        self._gauge = gauge
        self._multiprocess = multiprocess
        self._shown: set[tuple[str, ...]] = set()

    def update(self, values: dict[tuple[str, ...], float]) -> None:
        for labels in self._shown - values.keys():
            if self._multiprocess:
                self._gauge.labels(*labels).set(math.nan)
            else:
                self._gauge.remove(*labels)
        for labels, value in values.items():
            self._gauge.labels(*labels).set(value)
        self._shown = set(values)


class Children:
    """A metric's children by label values, looked up once: `labels()` takes a lock and builds a key per call."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


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
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"not ready: no usable issuer or store\n")
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


class StoreMetrics:
    """What a state store reports: latency by operation, errors by kind, records per transaction, pool use.

    Passed to the store by whoever owns the registry; a store given none keeps
    a private registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.latency = Histogram(
            "meshca_store_duration_seconds",
            "State store latency by operation (commit is one group-commit transaction)",
            ["op"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.errors = Counter(
            "meshca_store_errors",
            "State store failures by operation and kind (unavailable, constraint, database)",
            ["op", "kind"],
            registry=r,
        )
        self.batch = Histogram(
            "meshca_store_batch_records",
            "Issuance records committed per transaction (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.pool = Gauge(
            "meshca_store_pool_connections",
            "Store connection pool: open connections, idle ones, and requests waiting for one",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",
        )

    @contextlib.contextmanager
    def timed(self, op: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.latency.labels(op).observe(time.perf_counter() - start)

    def error(self, op: str, exc: BaseException) -> None:
        self.errors.labels(op, error_kind(exc)).inc()


def error_kind(exc: BaseException) -> str:
    """A store error's kind from its DB-API class (sqlite3 and psycopg share the names)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OperationalError" in names:  # cannot connect, connection lost, locked, pool timeout
        return "unavailable"
    if "IntegrityError" in names:
        return "constraint"
    return "database"
