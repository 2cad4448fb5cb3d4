"""The auth service's settings (`AUTH_*`), built once per process and frozen."""

from __future__ import annotations

from functools import cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

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
    registration: Literal["open", "closed"] = "open"
    admin_email: str | None = None
    admin_password: str | None = Field(None, min_length=8, max_length=256)

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
