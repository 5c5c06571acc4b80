"""A store that cannot write turns the server not-ready (gRPC health, /readyz, meshca_store_up), and back.

The SQLite store is made unwritable for real: the serving process (the
supervisor under --workers, which owns the store) gets a file-size limit of
0 bytes (RLIMIT_FSIZE), so the kernel refuses its every file write as it
would on a full disk; reads still work. Raising the limit again is the disk
that got space back.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from support.metrics import http_get, sample_value
from support.procs import run_meshca
from support.tokens import add_token

import meshca

from .test_replicas import NOT_SERVING, SERVING, Replica, wait_until

pytestmark = pytest.mark.slow


def _writes_refused(pid: int) -> Callable[[], None]:
    """Limits ``pid``'s file writes to 0 bytes; returns what lifts the limit."""
    before = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, before[1]))
    return lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE, before)


@pytest.mark.parametrize("workers", [1, 2])
def test_sqlite_that_cannot_write_means_not_serving_until_it_can(tmp_path: Path, workers: int) -> None:
    trust = tmp_path / "trust"
    meshca.TrustDir.at(trust).init(meshca.TrustDomain("example.org"), now=meshca.system_clock())
    replica = Replica(trust, tmp_path / "host", f"sqlite://{tmp_path / 'host' / 'meshca.db'}", workers)
    with replica.proc as proc:
        token = add_token(replica.directory, uses=10)
        first = replica.issue(token)
        assert replica.health() == SERVING

        lift = _writes_refused(proc.proc.pid)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                replica.issue(token)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            wait_until(lambda: http_get(replica.metrics_port, "/readyz")[0] == 503, "/readyz 503")
            wait_until(lambda: replica.health() == NOT_SERVING, "health NOT_SERVING")
            wait_until(lambda: replica.metric("meshca_store_up") == 0, "meshca_store_up 0")
            # one line from whoever commits (the process, or the supervisor); under --workers, workers say so too
            reasons = [e["reason"] for e in replica.events("store.down") if "worker" not in e]
            assert len(reasons) == 1 and ("I/O error" in reasons[0] or "full" in reasons[0]), reasons
            time.sleep(1.5)  # checks keep failing while the disk is full: no flapping back
            assert http_get(replica.metrics_port, "/readyz")[0] == 503
            if workers == 1:  # under --workers the supervisor commits, and its store metrics are not exported
                _, text = http_get(replica.metrics_port, "/metrics")
                assert (sample_value(text, "meshca_store_errors_total", op="commit") or 0) >= 1
        finally:
            lift()

        wait_until(lambda: replica.health() == SERVING, "health SERVING again")
        wait_until(lambda: http_get(replica.metrics_port, "/readyz")[0] == 200, "/readyz 200")
        wait_until(lambda: replica.metric("meshca_store_up") == 1, "meshca_store_up 1")
        second = replica.issue(token)
        assert replica.events("store.up")
        assert proc.terminate() == 0
    shown = run_meshca("log", "--dir", replica.directory, "--json")
    serials = [row["serial"] for row in json.loads(shown.stdout) if row["api"] != "self"]
    assert sorted(serials) == sorted([first, second])  # the refused one was never logged
