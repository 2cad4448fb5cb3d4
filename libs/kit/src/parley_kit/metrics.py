"""Prometheus metrics that hold under several gunicorn workers (multiprocess mode) and RED per route."""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Histogram,
    generate_latest,
    multiprocess,
)

# LLM calls and streams run for minutes; the default buckets stop at 10 s.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
)

HTTP_SERVER_DURATION = Histogram(
    "http_server_request_duration_seconds",
    "Time to answer an HTTP request (to the first byte for streams).",
    ["http_request_method", "http_route", "http_response_status_code"],
    buckets=DURATION_BUCKETS,
)


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """One answered request in the RED histogram, by route template (never the raw path: unbounded labels)."""
    HTTP_SERVER_DURATION.labels(method, route, str(status)).observe(seconds)


def multiprocess_dir() -> str | None:
    """The directory gunicorn workers share their samples through, when running under gunicorn."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render_latest() -> bytes:
    """Exposition text: every live and dead worker's samples in multiprocess mode, the process's otherwise."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def init_app(app: Flask) -> None:
    """Time every request by route template (never the raw path: unbounded labels) and serve `/metrics`."""

    @app.before_request
    def _start_timer() -> None:
        g.parley_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("parley_started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            observe_request(request.method, route, response.status_code, time.perf_counter() - started)
        return response

    def metrics() -> Response:
        return Response(render_latest(), mimetype=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])


def mark_worker_dead(pid: int) -> None:
    """Called from gunicorn's child_exit hook so a dead worker's live gauges stop counting."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)
