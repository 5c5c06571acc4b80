"""Failures inside the server: INTERNAL with a request id (details only in the log), store errors UNAVAILABLE."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.calls import native_request
from support.certs import spiffe_csr
from support.metrics import sample_value
from support.serving import serving

from meshca import StoreError
from meshca.testing import TestCA


class BrokenStore:
    """Stands in for the store's write path only."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def record(self, record: Any, *, token_hash: str | None = None) -> concurrent.futures.Future[None]:
        if not isinstance(self.error, StoreError):
            raise self.error
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        future.set_exception(self.error)
        return future


async def test_unexpected_error_is_internal_with_a_request_id(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca, metrics_listen="127.0.0.1:0") as h:
        token = h.token()
        h.server.pipeline.store = BrokenStore(RuntimeError("disk controller says /dev/sda7 is on fire"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.native.IssueSVID(native_request(spiffe_csr()[1], join_token=token))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        details = caught.value.details() or ""
        assert "sda7" not in details
        [failed] = h.events("request.failed")
        assert f"request id {failed['request_id']}" in details
        assert failed["exc_info"]  # the traceback goes to the log, at error level
        assert failed["log_level"] == "error"
        text = await h.scrape()
        assert sample_value(text, "meshca_requests_total", method="IssueSVID", code="INTERNAL") == 1


async def test_store_failure_is_unavailable_and_nothing_is_returned(d: Path, server_ca: TestCA) -> None:
    async with serving(d, server_ca) as h:
        token = h.token()
        real = h.server.pipeline.store
        h.server.pipeline.store = BrokenStore(StoreError("database is locked"))
        code = None
        try:
            await h.native.IssueSVID(native_request(spiffe_csr()[1], join_token=token))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        assert code == grpc.StatusCode.UNAVAILABLE
        [refused] = h.events("request.refused")
        assert refused["code"] == "UNAVAILABLE"
        # the token was not spent: once the store is back, it still pays for one certificate
        h.server.pipeline.store = real
        await h.native.IssueSVID(native_request(spiffe_csr()[1], join_token=token))
