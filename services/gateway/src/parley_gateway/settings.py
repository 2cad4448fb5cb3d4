"""The gateway's settings: one frozen object built from the environment (`GATEWAY_*` and the shared `PARLEY_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
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
