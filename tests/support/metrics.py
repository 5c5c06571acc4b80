"""Reading Prometheus metrics: a server's endpoint, a client source's registry."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from meshca.client import AsyncSvidSource, SvidSource

REFRESHES = "meshca_client_svid_refreshes_total"


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples named ``name`` whose labels include ``labels``; None if there is none."""
    found = [v for n, ls, v in samples(text) if n == name and all(ls.get(k) == x for k, x in labels.items())]
    return sum(found) if found else None


def refreshes(source: SvidSource | AsyncSvidSource, result: str) -> float:
    """The source's own count of SVID fetches with ``result`` ("success" or "failure")."""
    value = source.metrics_registry.get_sample_value(REFRESHES, {"spiffe_id": str(source.spiffe_id), "result": result})
    return value or 0.0
