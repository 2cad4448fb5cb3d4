"""LLM-call metrics (OpenTelemetry GenAI names) and the one log line per call; defined once at module level."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from parley_kit.metrics import DURATION_BUCKETS

log = logging.getLogger("parley_llm.calls")

_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model"]

OPERATION_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of an LLM call made by the llm service (to the last byte for streams).",
    [*_LABELS, "error_type"],
    buckets=DURATION_BUCKETS,
)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Billable tokens per LLM call.",
    [*_LABELS, "gen_ai_token_type"],
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304),
)
TIME_TO_FIRST_CHUNK = Histogram(
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "Time from the request to the first streamed chunk of an LLM call.",
    _LABELS,
    buckets=DURATION_BUCKETS,
)
COST = Counter(
    "parley_cost_usd_total",
    "USD spent on upstream providers, by the price table in force.",
    ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"],
)


@dataclass(slots=True)
class CallRecord:
    """What one LLM call did: fed to the metrics, the log line and the ledger."""

    operation: str  # chat | embeddings | messages (the ledger's word); GenAI metrics say chat for messages
    provider: str
    request_model: str
    upstream_model: str
    response_model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    status: str = "ok"  # ok | error | cancelled
    error_type: str = ""
    streamed: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def gen_ai_operation(self) -> str:
        """The GenAI operation name (`messages` is a chat call)."""
        return "embeddings" if self.operation == "embeddings" else "chat"


def observe(record: CallRecord, *, duration: float, first_chunk: float | None, cost: float, user_id: str) -> None:
    """Record the call's metrics and write its one ECS log line (never prompt text, never a key)."""
    operation = record.gen_ai_operation
    response_model = record.response_model or record.upstream_model
    labels = (operation, record.provider, record.request_model, response_model)
    OPERATION_DURATION.labels(*labels, record.error_type).observe(duration)
    if record.status != "error" or record.input_tokens or record.output_tokens:
        TOKEN_USAGE.labels(*labels, "input").observe(record.input_tokens)
        if operation == "chat":
            TOKEN_USAGE.labels(*labels, "output").observe(record.output_tokens)
    if first_chunk is not None:
        TIME_TO_FIRST_CHUNK.labels(*labels).observe(first_chunk)
    if cost:
        COST.labels(operation, record.provider, record.request_model).inc(cost)
    fields: dict[str, object] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": record.provider,
        "gen_ai.request.model": record.request_model,
        "gen_ai.response.model": response_model,
        "gen_ai.usage.input_tokens": record.input_tokens,
        "gen_ai.usage.output_tokens": record.output_tokens,
        "event.duration": int(duration * 1e9),
        "event.outcome": "success" if record.status == "ok" else "failure",
        "parley.usage.status": record.status,
        "parley.usage.cost_usd": cost,
        "parley.stream": record.streamed,
        "user.id": user_id,
    }
    if record.error_type:
        fields["error.type"] = record.error_type
    fields.update(record.extra)
    log.info("llm call %s %s %s", operation, record.request_model, record.status, extra=fields)
