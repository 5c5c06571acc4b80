"""ServerConfig refuses values the server would misread, so a library user cannot build an invalid one."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from meshca.server import ServerConfig, TokenReviewConfig

H = timedelta(hours=1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"leaf_ttl": 2 * H, "max_leaf_ttl": H}, "leaf_ttl"),
        ({"leaf_ttl": timedelta()}, "leaf_ttl"),
        ({"leaf_ttl": -H}, "leaf_ttl"),
        ({"server_names": ()}, "server_names"),
        ({"rate_limit": 0.0}, "rate_limit"),
        ({"rate_limit": -1.0}, "rate_limit"),
        ({"rate_burst": 0}, "rate_burst"),
        ({"request_timeout": timedelta()}, "request_timeout"),
        ({"reload_interval": -H}, "reload_interval"),
        ({"drain_grace": -H}, "drain_grace"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"max_watch_streams": 0}, "max_watch_streams"),
        ({"max_watch_streams_per_peer": 0}, "max_watch_streams_per_peer"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
def test_invalid_configurations_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig(dir=Path("/nonexistent"), **fields)


def test_edges_are_valid() -> None:
    config = ServerConfig(
        dir=Path("/x"),
        leaf_ttl=H,
        max_leaf_ttl=H,
        rate_limit=0.5,
        rate_burst=1,
        drain_grace=timedelta(),
        max_watch_streams=1,
        max_watch_streams_per_peer=1,
    )
    assert config.leaf_ttl == config.max_leaf_ttl


@pytest.mark.parametrize("fields", [{"max_concurrency": 0}, {"timeout": timedelta()}])
def test_invalid_token_review_configurations_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="TokenReview"):
        TokenReviewConfig("https://k8s", **fields)
