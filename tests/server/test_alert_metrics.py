"""Every metric examples/prometheus/alerts.yaml reads, with every label it selects or groups by, scraped from a
real `meshca serve`: one process in file mode, and two managed workers summed by the supervisor."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
import yaml
from support.ids import TD
from support.metrics import http_get, samples
from support.procs import ServeProcess

from meshca.testing import TestCA

RULES = Path(__file__).resolve().parent.parent.parent / "examples" / "prometheus" / "alerts.yaml"
ALWAYS = {"job", "instance"}  # Prometheus adds them at scrape time
# series that exist only once something went wrong (a counter's children appear when first counted)
ON_FAILURE = {"meshca_issuer_reloads_total"}
MANAGED_ONLY = {"meshca_next_rotation_timestamp_seconds"}


def used() -> dict[str, set[str]]:
    """Each metric the alert expressions name, with the labels they select on or group it by."""
    out: dict[str, set[str]] = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split())
            for name, matchers in re.findall(r"(meshca_[a-z_]+)(?:\{([^}]*)\})?", expr):
                out.setdefault(name, set()).update(re.findall(r"(\w+)\s*[!=]~?", matchers))
            for by, name in re.findall(r"by \(([^)]*)\) \((?:\w+\()?(meshca_[a-z_]+)", expr):
                out[name].update(label.strip() for label in by.split(","))
    return {name: labels - ALWAYS for name, labels in out.items()}


def test_the_expressions_are_read_as_expected() -> None:
    found = used()
    assert found["meshca_issuer_expiry_timestamp_seconds"] == {"state"}
    assert found["meshca_anchor_expiry_timestamp_seconds"] == {"fingerprint"}
    assert found["meshca_rotations_total"] == {"kind", "result"}
    assert "meshca_next_rotation_timestamp_seconds" in found and "meshca_store_up" in found


@pytest.mark.parametrize(
    ("mode", "workers"), [((), 1), (("--manage-issuers", "--issuer-ttl", "1m", "--leaf-ttl", "10s"), 2)]
)
def test_every_metric_the_alerts_use_is_scraped_with_its_labels(d: Path, mode: tuple[str, ...], workers: int) -> None:
    TestCA(TD).write(d)
    with ServeProcess(d, *mode, "--workers", str(workers)) as proc:
        _, metrics_port = proc.wait_workers(workers)
        wanted = used()
        if not mode:
            wanted = {n: ls for n, ls in wanted.items() if n not in MANAGED_ONLY}
        deadline = time.monotonic() + 30
        while True:  # the server SVID (rotations_total) is issued at the first poll
            scraped: dict[str, list[dict[str, str]]] = {}
            for name, labels, value in samples(http_get(metrics_port, "/metrics")[1]):
                if not math.isnan(value):
                    scraped.setdefault(name, []).append(labels)
            missing = {n for n in wanted.keys() - ON_FAILURE if n not in scraped}
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not missing, f"not scraped: {missing}"
        for name, labels in wanted.items():
            for series in scraped.get(name, []):
                assert labels <= series.keys(), (name, series)
        if mode:
            # one soonest step for the service, not one series per worker
            assert len(scraped["meshca_next_rotation_timestamp_seconds"]) == 1
            assert len(scraped["meshca_issuer_expiry_timestamp_seconds"]) >= workers
        else:
            assert "meshca_next_rotation_timestamp_seconds" not in scraped
        assert proc.terminate() == 0
