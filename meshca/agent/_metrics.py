"""The agent's Prometheus metrics, on their own registry, and the HTTP endpoint that serves them."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["AgentMetrics", "serve_metrics"]


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "meshca_agent_workload_requests",
            "Workload API calls by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.syncs = Counter(
            "meshca_agent_syncs", "Sync calls to the identity service by outcome", ["outcome"], registry=r
        )
        self.signed = Counter(
            "meshca_agent_svids_signed", "Workload X.509-SVIDs signed, by outcome", ["outcome"], registry=r
        )
        self.held = Gauge("meshca_agent_svids_held", "Workload X.509-SVIDs the agent holds now", registry=r)


def serve_metrics(metrics: AgentMetrics, host: str, port: int) -> tuple[Any, int]:
    """Starts /metrics on ``host:port`` (port 0: any free one); returns the server (call ``shutdown``) and its port."""
    server, _thread = start_http_server(port, host, registry=metrics.registry)
    return server, int(server.server_address[1])
