"""The jobs service's settings: one frozen object, read from `JOBS_*` (and the shared `PARLEY_*`) once."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from parley_kit.settings import ServiceSettings

MIB = 1024 * 1024


class JobsSettings(ServiceSettings):
    """Files + Batch API and its RabbitMQ workers."""

    model_config = SettingsConfigDict(
        env_prefix="JOBS_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    service_name: str = "jobs"
    bind: str = "127.0.0.1:8083"
    worker_class: Literal["gevent", "gthread", "sync"] = "gthread"
    threads: int = Field(8, ge=1, le=256)
    workers: int = Field(2, ge=1, le=64)
    database_url: str = "sqlite:///.run/jobs.db"

    # The worker's service account at auth (client credentials); it acts for each batch's owner.
    client_id: str = "jobs"
    client_secret: str = "dev-insecure-jobs-secret"  # noqa: S105 - a placeholder, refused outside development

    max_file_bytes: int = Field(200 * MIB, ge=1)
    max_lines: int = Field(50_000, ge=1)
    worker_prefetch: int = Field(8, ge=1, le=1000)
    # Items per message, run by a worker in one llm request (up to llm's 64 calls per group).
    item_group: int = Field(16, ge=1, le=64)
    relay_interval: float = Field(0.2, gt=0)
    # With nothing to relay, the polls space out to this (a new batch is queued at most this late).
    relay_idle_interval: float = Field(1.0, gt=0)
    delivery_limit: int = Field(5, ge=1)
    # A failed item waits this x 2^(redeliveries so far) seconds (at most 10) before RabbitMQ redelivers it: with the
    # default limit of 5 deliveries, ~15 s of a database or llm outage is ridden out before an item fails.
    retry_backoff: float = Field(0.5, ge=0)
    # How long the worker waits for llm's answers to a group: past llm's own limit for a call (LLM_TOTAL_TIMEOUT, 600 s)
    # plus its wait for a key an earlier delivery still holds (LLM_IDEMPOTENCY_WAIT, 60 s), so llm answers first.
    item_timeout: float = Field(720.0, gt=0)
    # The "24h" completion window, shortened in tests; the worker's sweep expires batches that outlive it.
    completion_window_seconds: float = Field(86_400.0, gt=0)
    # Items one owner may have queued but unfinished; the relay tops the window up as they finish (fairness).
    schedule_window: int = Field(64, ge=1, le=100_000)
    # The worker is not under gunicorn: it serves its own /metrics here (0 = off).
    worker_metrics_port: int = Field(9464, ge=0, le=65535)
    # How often the worker refreshes its gauges (queue depth, oldest pending age, outbox lag).
    stats_interval: float = Field(5.0, gt=0)

    @property
    def items_queue(self) -> str:
        """The work queue every batch item goes through."""
        return self.amqp_name("jobs.items")

    @property
    def dead_letter_exchange(self) -> str:
        """Where items that exhausted their deliveries go."""
        return self.amqp_name("jobs.dlx")

    @property
    def dead_queue(self) -> str:
        """Where the dead-letter exchange puts them (named by the kit's `declare_work_queue`)."""
        return f"{self.items_queue}.dead"


def load_settings() -> JobsSettings:
    """Build the settings from the environment (called once per process)."""
    return JobsSettings()
