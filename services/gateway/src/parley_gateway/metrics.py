"""The gateway's own metrics (defined once at import: a second registration would raise in multiprocess mode)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# The gateway's own time is sub-millisecond: buckets start at 50 µs.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

GATEWAY_OVERHEAD = Histogram(
    "parley_gateway_overhead_seconds",
    "Time spent in the gateway itself per proxied request, excluding waiting on auth and the upstream.",
    ["upstream"],
    buckets=OVERHEAD_BUCKETS,
)
AUTH_FAILURES = Counter(
    "parley_gateway_auth_failures_total",
    "Requests refused at the edge for missing or invalid credentials, by reason.",
    ["reason"],
)
RATELIMIT_DECISIONS = Counter(
    "parley_ratelimit_decisions_total",
    "Rate-limit decisions on limited routes, by outcome and by the kind of limit (requests or tokens per minute).",
    ["decision", "kind"],
)
# livemax: any live worker that cannot reach Redis makes the platform's limits degraded.
RATELIMIT_DEGRADED = Gauge(
    "parley_ratelimit_degraded",
    "1 while rate limits cannot be checked in Redis (requests are refused or admitted per the failure mode).",
    multiprocess_mode="livemax",
)

# Every reason the edge refuses credentials for (its own and the kit's token verifier's).
AUTH_FAILURE_REASONS = (
    "missing_credentials",
    "missing_token",
    "invalid_api_key",
    "invalid_credentials",
    "invalid_token",
    "token_expired",
    "token_revoked",
)


def start_known_series_at_zero() -> None:
    """Export every known label set from the start: a counter whose first sample already holds its first event never
    shows that event in rate() or increase(), so the first refusal would be invisible to dashboards and alerts."""
    for reason in AUTH_FAILURE_REASONS:
        AUTH_FAILURES.labels(reason)
    for decision in ("allowed", "limited"):
        for kind in ("requests", "tokens"):
            RATELIMIT_DECISIONS.labels(decision, kind)
