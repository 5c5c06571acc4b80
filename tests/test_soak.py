"""bench/soak.py runs for a few seconds against a real `meshca serve` and reports what it saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "bench" / "soak.py"

pytestmark = pytest.mark.slow

GOOD = ("native", "renew", "linkerd", "istio", "watch")
BAD = {
    "bad-csr": "INVALID_ARGUMENT",
    "bad-token": "UNAUTHENTICATED",
    "bad-identity": "PERMISSION_DENIED",
    "bad-linkerd-identity": "FAILED_PRECONDITION",
}
INTERVAL_KEYS = {
    "elapsed_s", "requests", "rate", "p50_ms", "p99_ms", "rss_kib", "threads", "fds", "processes", "shed",
    "unexpected_so_far", "client_cpu",
}  # fmt: skip


def soak(*args: str) -> tuple[int, dict[str, Any], str]:
    """Runs the script with --json and --workers 1; returns its exit code, report and the lines it printed."""
    argv = [sys.executable, str(SOAK), "--json", "--workers", "1", "--seed", "3", *args]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the script stops its server on the way out (SIGKILL would orphan it)
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"bench/soak.py ran past 180 s:\n{err}")
    assert proc.returncode in (0, 1), out + err
    return proc.returncode, json.loads(out), err


def test_probe_then_soak_reports_every_interval_and_counts_every_status() -> None:
    code, report, lines = soak(
        "--probe-seconds", "2", "--concurrency", "8", "--fraction", "0.3",
        "--minutes", "0.1", "--interval", "2", "--bad-fraction", "0.2",
    )  # fmt: skip
    assert report["max_rate"] > 0
    assert report["rate"] == pytest.approx(report["max_rate"] * 0.3, rel=0.01)
    assert "max rate" in lines

    intervals = report["intervals"]
    assert len(intervals) == 3
    for r in intervals:
        assert set(r) == INTERVAL_KEYS
        assert r["requests"] > 0
        assert r["rss_kib"] > 10_000
        assert r["threads"] > 2
        assert r["fds"] > 3
        assert r["processes"] >= 1  # --workers 1 serves in one process
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert report["baseline_interval"] == 1
    assert set(report["growth"]) == {"rss_kib", "fds", "threads", "p99_ms"}

    statuses = report["statuses"]
    for kind in GOOD:
        assert statuses[kind]["OK"] > 0, statuses
    for kind, expected in BAD.items():
        assert statuses[kind][expected] > 0, statuses
    assert report["unexpected"] == {}
    assert (code == 1) == bool(report["failures"])  # growth over a few seconds may fail, and then says why


def test_an_unexpected_status_is_counted_and_fails_the_run() -> None:
    # The join token pays for 20 issuances (one goes on the renewal SVID): later native requests are refused.
    code, report, lines = soak(
        "--rate", "40", "--minutes", "0.05", "--interval", "3", "--bad-fraction", "0", "--token-uses", "20"
    )
    assert report["max_rate"] is None
    unexpected = report["unexpected"]
    assert set(unexpected) == {"native UNAUTHENTICATED"}
    assert unexpected["native UNAUTHENTICATED"] == report["statuses"]["native"]["UNAUTHENTICATED"]
    assert report["statuses"]["native"]["OK"] == 19
    assert report["intervals"][-1]["unexpected_so_far"] == unexpected["native UNAUTHENTICATED"]
    assert code == 1
    assert f"{unexpected['native UNAUTHENTICATED']} unexpected statuses" in report["failures"]
    assert "FAIL" in lines
