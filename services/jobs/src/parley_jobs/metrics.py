"""The jobs worker's Prometheus metrics (defined once, at import; the worker serves them on its own port)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

ITEMS_PROCESSED = Counter(
    "parley_jobs_items_processed",
    "Batch items handled by workers, by outcome (succeeded, failed, retried, skipped, dead_lettered).",
    ["outcome"],
)
BATCHES = Counter("parley_jobs_batches", "Batches that reached a final status.", ["status"])
QUEUE_DEPTH = Gauge(
    "parley_jobs_queue_depth", "Messages ready in the work queues (items, dead).", ["queue"], multiprocess_mode="max"
)
OLDEST_PENDING_AGE = Gauge(
    "parley_jobs_oldest_pending_age_seconds",
    "Age of the oldest running batch that still has unfinished lines.",
    multiprocess_mode="max",
)
OUTBOX_LAG = Gauge(
    "parley_jobs_outbox_lag_seconds",
    "How long the oldest unpublished outbox event has waited.",
    multiprocess_mode="max",
)


# Prometheus scrapes the worker from other hosts (a pod IP in Kubernetes).
def serve(port: int, address: str = "0.0.0.0") -> bool:
    """Serve /metrics on `port` (0 = off); a port in use is logged, not fatal: the worker's job is the work."""
    if port == 0:
        return False
    try:
        start_http_server(port, addr=address)
    except OSError as exc:
        log.warning("cannot serve worker metrics", extra={"port": port, "error.message": str(exc)})
        return False
    log.info("serving worker metrics", extra={"port": port})
    return True
