"""Configuration of `meshca serve`, as one frozen value the CLI fills in."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from meshca.pki._csr import KeyPolicy
from meshca.pki._lifecycle import check_issuer_ttl

__all__ = ["ISSUER_TTL", "K8sJwtConfig", "ServerConfig", "TokenReviewConfig"]


@dataclass(frozen=True, slots=True)
class K8sJwtConfig:
    """Offline verification of Kubernetes service-account JWTs against a JWKS file."""

    jwks_path: Path
    issuer: str
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")


@dataclass(frozen=True, slots=True)
class TokenReviewConfig:
    """Kubernetes TokenReview against the API server, for clusters without a JWKS."""

    api_url: str
    ca_file: Path | None = None
    token_file: Path | None = None
    audiences: tuple[str, ...] = ()
    max_concurrency: int = 8
    timeout: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.timeout <= timedelta():
            raise ValueError("TokenReview max_concurrency must be at least 1 and timeout positive")


ISSUER_TTL = timedelta(days=7)  # `serve --manage-issuers` default, as SPIRE's ca_ttl order of magnitude


@dataclass(frozen=True, slots=True)
class ServerConfig:
    dir: Path
    # --store URL; None: SQLite in DIR. Kept out of repr: a PostgreSQL URL may hold a password.
    store: str | None = field(default=None, repr=False)
    listen: str = "127.0.0.1:8443"  # loopback unless a deployment says otherwise (--listen)
    metrics_listen: str | None = "127.0.0.1:9090"
    leaf_ttl: timedelta = timedelta(hours=24)
    max_leaf_ttl: timedelta = timedelta(days=90)
    server_names: tuple[str, ...] = ("localhost",)
    insecure_plaintext: bool = False
    linkerd_namespace: str = "linkerd"
    k8s_jwt: K8sJwtConfig | None = None
    token_review: TokenReviewConfig | None = None
    key_policy: KeyPolicy = field(default_factory=KeyPolicy)
    rate_limit: float | None = None  # requests per second per principal; None = off
    rate_burst: int = 20
    request_timeout: timedelta = timedelta(seconds=10)
    max_message_bytes: int = 64 * 1024
    reload_interval: timedelta = timedelta(seconds=1)
    drain_grace: timedelta = timedelta(seconds=10)
    passphrase: bytes | None = field(default=None, repr=False)
    reuse_port: bool = False  # set for the workers of `serve --workers N`, which share the port
    # Open WatchBundle streams, counted by each serving process (each worker of `serve --workers N`).
    max_watch_streams: int = 10000
    max_watch_streams_per_peer: int = 100  # per client IP address
    # Managed issuers (`serve --manage-issuers`): the lifetime of each minted issuer; None: file mode.
    issuer_ttl: timedelta | None = None
    # File mode: log issuer.expiring this long before the issuer's NotAfter (None: `issuer_warning`'s rule).
    issuer_warn: timedelta | None = None

    def __post_init__(self) -> None:
        # A library user cannot build a configuration the server would misread.
        zero = timedelta()
        if not zero < self.leaf_ttl <= self.max_leaf_ttl:
            raise ValueError("leaf_ttl must be positive and at most max_leaf_ttl")
        if not self.server_names:
            raise ValueError("server_names must name at least one DNS name")
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError("rate_limit must be positive (None turns it off)")
        if self.rate_burst < 1:
            raise ValueError("rate_burst must be at least 1")
        if self.request_timeout <= zero or self.reload_interval <= zero or self.drain_grace < zero:
            raise ValueError("request_timeout and reload_interval must be positive, drain_grace not negative")
        if self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        if self.issuer_ttl is not None:
            check_issuer_ttl(self.issuer_ttl, self.leaf_ttl)
        if self.issuer_warn is not None and self.issuer_warn <= zero:
            raise ValueError("issuer_warn must be positive")
        if self.max_watch_streams < 1 or self.max_watch_streams_per_peer < 1:
            raise ValueError("max_watch_streams and max_watch_streams_per_peer must be at least 1")
