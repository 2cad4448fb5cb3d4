"""Settings: one frozen object per service, read from the environment (and `.env` in development) once."""

from __future__ import annotations

import os
import tempfile
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_PREFIX = "dev-insecure-"


class ServiceSettings(BaseSettings):
    """Platform-wide settings every service shares; services subclass it with their own prefix.

    Shared fields carry an explicit `PARLEY_*` alias so a subclass's `env_prefix` (e.g. `AUTH_`) applies only to
    that service's own fields.
    """

    # hide_input_in_errors: a start-up validation error would otherwise print the raw inputs, secrets included.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, populate_by_name=True, hide_input_in_errors=True
    )

    service_name: str = "parley"
    environment: Literal["development", "test", "production"] = Field("development", alias="PARLEY_ENV")
    version: str = Field("0.1.0", alias="PARLEY_VERSION")
    log_level: str = Field("INFO", alias="PARLEY_LOG_LEVEL")
    logstash_host: str | None = Field(None, alias="PARLEY_LOGSTASH_HOST")
    logstash_port: int = Field(5000, alias="PARLEY_LOGSTASH_PORT")
    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/%2F", alias="PARLEY_AMQP_URL")
    amqp_prefix: str = Field("parley", alias="PARLEY_AMQP_PREFIX", pattern=r"^[a-z0-9][a-z0-9._-]{0,60}$")
    jwt_issuer: str = Field("parley-auth", alias="PARLEY_JWT_ISSUER")
    jwt_audience: str = Field("parley", alias="PARLEY_JWT_AUDIENCE")
    jwks_url: str = Field("http://127.0.0.1:8081/.well-known/jwks.json", alias="PARLEY_JWKS_URL")
    auth_url: str = Field("http://127.0.0.1:8081", alias="PARLEY_AUTH_URL")
    llm_url: str = Field("http://127.0.0.1:8082", alias="PARLEY_LLM_URL")
    jobs_url: str = Field("http://127.0.0.1:8083", alias="PARLEY_JOBS_URL")

    # How the service is served (read with the service's own prefix, e.g. AUTH_BIND, LLM_WORKERS).
    bind: str = "127.0.0.1:8080"
    workers: int = Field(2, ge=1, le=64)
    worker_class: Literal["gevent", "gthread", "sync"] = "gevent"
    threads: int = Field(1, ge=1, le=256)
    worker_connections: int = Field(2000, ge=1)
    metrics_dir: str = ""

    @property
    def metrics_path(self) -> str:
        """Where gunicorn workers share metric samples; one directory per service instance."""
        port = self.bind.rsplit(":", 1)[-1]
        return self.metrics_dir or os.path.join(tempfile.gettempdir(), "parley-metrics", f"{self.service_name}-{port}")

    @property
    def is_development(self) -> bool:
        """True only for a developer's machine, where placeholder secrets are tolerated."""
        return self.environment == "development"

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> ServiceSettings:
        """Outside development, a secret still holding its placeholder value stops the service at start-up."""
        if self.is_development:
            return self
        for name, value in self:
            if "secret" in name and isinstance(value, str) and value.startswith(PLACEHOLDER_PREFIX):
                raise ValueError(f"{name} still holds a development placeholder; set a real secret")
        return self

    def amqp_name(self, suffix: str) -> str:
        """The broker name of an exchange or queue, namespaced so test runs never share one."""
        return f"{self.amqp_prefix}.{suffix}"
