"""The llm service's settings (env prefix `LLM_`), built once and frozen."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from parley_kit.settings import ServiceSettings

BUNDLED_MODELS_FILE = str(Path(__file__).with_name("models.yaml"))


class LlmSettings(ServiceSettings):
    """Where the llm service listens, its ledger database, the model catalogue and the provider endpoints."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    service_name: str = "llm"
    bind: str = "127.0.0.1:8082"
    # worker_class (gevent) and workers (2) keep the base defaults: thousands of long streams per process want
    # gevent. Every connection a gateway worker forwards (4000) may be a stream held here, so as many per worker.
    worker_connections: int = Field(4000, ge=1)
    database_url: str = "sqlite:///.run/llm.db"
    models_file: str = BUNDLED_MODELS_FILE
    openai_base_url: str = "http://127.0.0.1:8090/v1"
    openai_api_key: str = Field("dev-fake-key", repr=False)
    anthropic_base_url: str = "http://127.0.0.1:8090"
    anthropic_api_key: str = Field("dev-fake-key", repr=False)
    connect_timeout: float = Field(3.0, gt=0)
    first_byte_timeout: float = Field(60.0, gt=0)
    total_timeout: float = Field(600.0, gt=0)
    log_prompts: bool = False
    # One retry loop of ours (the SDKs' are off): attempts per client call across deployments and fallbacks.
    max_attempts: int = Field(2, ge=1, le=10)
    retry_backoff: float = Field(0.1, ge=0)
    retry_max_wait: float = Field(2.0, ge=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown: float = Field(30.0, gt=0)
    # Who has a budget is cached this long per process (0: ask the database on every call).
    budget_cache_seconds: float = Field(2.0, ge=0)
    # The output-token estimate for a reservation when the request sets no max_tokens.
    default_max_tokens: int = Field(1024, ge=1)
    # How long a duplicate waits for the first request with the same Idempotency-Key to finish.
    idempotency_wait: float = Field(60.0, gt=0)


def load_settings() -> LlmSettings:
    """Read the settings from the environment (and `.env`)."""
    return LlmSettings()
