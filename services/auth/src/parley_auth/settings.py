"""The auth service's settings (`AUTH_*`), built once per process and frozen."""

from __future__ import annotations

import ipaddress
from functools import cache
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from parley_kit.settings import PLACEHOLDER_PREFIX, ServiceSettings


class AuthSettings(ServiceSettings):
    """Users, tokens, API keys and service accounts: lifetimes, secrets and bootstrap values."""

    model_config = SettingsConfigDict(
        env_prefix="AUTH_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    service_name: str = "auth"
    bind: str = "127.0.0.1:8081"
    worker_class: Literal["gevent", "gthread", "sync"] = "gthread"  # argon2 is CPU-bound; requests are short
    threads: int = Field(8, ge=1, le=256)
    workers: int = Field(2, ge=1, le=64)

    database_url: str = "sqlite:///.run/auth.db"
    access_token_ttl: int = Field(900, ge=30, le=86_400)
    key_token_ttl: int = Field(300, ge=30, le=86_400)
    refresh_token_ttl: int = Field(30 * 86_400, ge=60)
    service_clients: dict[str, str] = Field(
        default_factory=lambda: {
            "gateway": "dev-insecure-gateway-secret",
            "jobs": "dev-insecure-jobs-secret",
        }
    )
    api_key_pepper_secret: str = Field("dev-insecure-pepper", min_length=16)
    registration: Literal["open", "closed", "invite"] = "open"
    invite_ttl: int = Field(7 * 86_400, ge=60, le=365 * 86_400)
    # Login throttling: failures counted per account and per client address in fixed windows.
    login_window: int = Field(900, ge=1, le=86_400)
    login_max_failures_per_account: int = Field(10, ge=1, le=10_000)
    # Higher: many people can share one address (NAT, an office), and one attacker tries many accounts from it.
    login_max_failures_per_address: int = Field(100, ge=1, le=100_000)
    # Peers whose X-Forwarded-For is believed (the gateway); comma-separated addresses or CIDR networks.
    trusted_proxies: Annotated[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], NoDecode] = (
        ipaddress.ip_network("127.0.0.1/32"),
    )
    admin_email: str | None = None
    admin_password: str | None = Field(None, min_length=8, max_length=256)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        """`AUTH_TRUSTED_PROXIES=127.0.0.1,10.0.0.0/8` (empty: trust no proxy)."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return tuple(ipaddress.ip_network(str(part), strict=False) for part in value)
        return value

    @model_validator(mode="after")
    def _check_service_clients(self) -> AuthSettings:
        """Client ids are short names; outside development no client may keep a placeholder secret."""
        for client_id, secret in self.service_clients.items():
            if not client_id or not client_id.replace("-", "").replace("_", "").isalnum():
                raise ValueError("service_clients: a client id is letters, digits, '-' or '_'")
            if not secret:
                raise ValueError(f"service_clients: client {client_id} has an empty secret")
            if not self.is_development and secret.startswith(PLACEHOLDER_PREFIX):
                raise ValueError(f"service_clients: client {client_id} still holds a development placeholder")
        if (self.admin_email is None) != (self.admin_password is None):
            raise ValueError("admin_email and admin_password are set together or not at all")
        return self


@cache
def load_settings() -> AuthSettings:
    """The process's settings, read from the environment once."""
    return AuthSettings()
