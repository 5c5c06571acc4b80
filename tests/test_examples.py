"""The examples run as their READMEs say, and the dashboard charts metrics that exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from meshca.server._metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def test_sidecar_demo_authorizes_web_and_refuses_the_intruder() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sidecar" / "demo.py")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[api-sidecar] inbound: authorized spiffe://cluster.local/ns/default/sa/web" in out
    assert "[web app] got: api says hello" in out
    assert "spiffe://cluster.local/ns/default/sa/intruder is not authorized" in out
    assert "[intruder app] got: (connection closed)" in out


def test_workload_api_example_serves_a_py_spiffe_client() -> None:
    bindir = str(Path(sys.executable).parent)  # the meshca console script beside this interpreter
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "PYTHON": sys.executable}
    result = subprocess.run(
        ["sh", str(ROOT / "examples" / "workload-api" / "run.sh")],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "X.509-SVID spiffe://example.org/python-tool valid until" in out
    assert "X.509-SVID spiffe://example.org/web valid until" in out
    assert re.search(r"JWT-SVID for (spiffe://example.org/\S+), audience \['orders'\]: validated as \1$", out, re.M)


def test_dashboard_queries_only_metrics_meshca_exports() -> None:
    dashboard = json.loads((ROOT / "examples" / "grafana" / "meshca-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bmeshca_[a-z_]+", e)}
    server = Metrics(CollectorRegistry())
    server.requests.labels("s", "m", "OK").inc()
    server.latency.labels("s", "m").observe(0.001)
    server.issued.labels("td", "native").inc()
    server.auth_failures.labels("missing").inc()
    server.reloads.labels("success").inc()
    server.anchor_expiry.labels("ab").set(1)
    server.issuer_expiry.labels("ab", "active").set(1)
    exported = generate_latest(server.registry).decode()
    from meshca.client import ClientMetrics

    client_registry = CollectorRegistry()
    client = ClientMetrics(client_registry)
    client.expiry.labels("spiffe://td/x").set(1)
    client.refreshes.labels("spiffe://td/x", "success").inc()
    exported += generate_latest(client_registry).decode()
    names = set(re.findall(r"^(meshca_[a-z_]+)", exported, re.M))
    assert used and used <= names, f"dashboard uses metrics nobody exports: {sorted(used - names)}"
