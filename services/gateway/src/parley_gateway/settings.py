"""The gateway's settings: one frozen object built from the environment (`GATEWAY_*` and the shared `PARLEY_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from parley_kit.settings import ServiceSettings

MIB = 1024 * 1024


class GatewaySettings(ServiceSettings):
    """Where the gateway listens, how it reaches auth/llm/jobs, and its limits."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    service_name: str = "gateway"
    bind: str = "127.0.0.1:8080"
    workers: int = Field(2, ge=1, le=64)
    # Streams pass through: thousands of mostly idle connections per worker, so greenlets, not threads.
    worker_class: Literal["gevent", "gthread", "sync"] = "gevent"
    worker_connections: int = Field(4000, ge=1)

    # The gateway's own service account at auth (client credentials), used only for the key exchange.
    client_id: str = "gateway"
    client_secret: str = "dev-insecure-gateway-secret"  # noqa: S105 - a placeholder refused outside development

    max_body_bytes: int = Field(16 * MIB, ge=1)
    connect_timeout: float = Field(2.0, gt=0)
    auth_read_timeout: float = Field(10.0, gt=0)
    llm_read_timeout: float = Field(600.0, gt=0)
    jobs_read_timeout: float = Field(120.0, gt=0)
    # Pooled keep-alive connections kept per upstream and worker (more are opened under bursts, then closed).
    upstream_pool_size: int = Field(1024, ge=1)

    # Exchanged API-key tokens are kept at most this long (and never past their expiry minus the margin).
    key_cache_ttl: float = Field(300.0, gt=0)
    token_refresh_margin: float = Field(30.0, ge=0)
    # An API key auth refused is refused here without asking again for this long (blunts key spraying).
    rejected_key_ttl: float = Field(10.0, ge=0)
    # Listen to auth's identity events (key.revoked, user.disabled, password.changed) on the broker.
    revocation_events: bool = True
    access_log: bool = True

    # Rate limits, shared by every gateway process through Redis. 0 turns a limit off. A token's `rpm`/`tpm` claims,
    # when present, replace the per-key limits (or the per-user ones for a token without `key_id`).
    redis_url: str | None = None
    redis_prefix: str = "parley:"
    # Redis must answer quickly or not at all: the check is on every limited request's path.
    redis_timeout: float = Field(0.25, gt=0)
    # Connections to Redis per worker; a check waits up to redis_pool_wait seconds for one when all are busy.
    redis_pool_size: int = Field(64, ge=1)
    redis_pool_wait: float = Field(5.0, gt=0)
    rate_limit_key_rpm: int = Field(600, ge=0)
    rate_limit_key_tpm: int = Field(1_000_000, ge=0)
    rate_limit_user_rpm: int = Field(1200, ge=0)
    rate_limit_user_tpm: int = Field(2_000_000, ge=0)
    # Tokens are summed per process and written to Redis this often (one round trip for all, not one per request).
    rate_limit_settle_interval: float = Field(0.05, gt=0, le=5)
    # Redis down: "closed" refuses limited requests with 503, "open" lets them through (both set the degraded gauge).
    rate_limit_failure_mode: Literal["closed", "open"] = "closed"

    # Browser origins allowed to call the API, comma-separated exact matches ("https://app.example.com"); empty = none.
    cors_origins: str = ""
    cors_max_age: int = Field(600, ge=0)
    # How long the gateway keeps each service's OpenAPI document for /docs.
    docs_cache_ttl: float = Field(60.0, ge=0)

    @property
    def cors_allowed(self) -> frozenset[str]:
        """The CORS allow-list as a set of origins."""
        return frozenset(origin.strip().rstrip("/") for origin in self.cors_origins.split(",") if origin.strip())

    @property
    def rate_limits_enabled(self) -> bool:
        """Whether any limit is on."""
        return any(
            (self.rate_limit_key_rpm, self.rate_limit_key_tpm, self.rate_limit_user_rpm, self.rate_limit_user_tpm)
        )

    @model_validator(mode="after")
    def _limits_need_redis(self) -> GatewaySettings:
        """Per-process limits would multiply by the number of processes: only a developer's machine may have them."""
        if self.rate_limits_enabled and not self.redis_url and not self.is_development:
            raise ValueError("GATEWAY_REDIS_URL is required for rate limits outside development (or set them to 0)")
        return self
