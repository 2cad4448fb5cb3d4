"""Gunicorn server hooks shared by every service (`-c python:parley_kit.gunicorn_hooks`)."""

from __future__ import annotations

from typing import Any

from parley_kit import metrics

accesslog = None  # the app writes ECS access lines itself
keepalive = 75  # longer than the gateway's idle pool timeout, so pooled connections are not cut under it
graceful_timeout = 30
# gunicorn 27 opens a control socket at one path per user: several services on one host would clash over it.
control_socket_disable = True


def child_exit(_server: Any, worker: Any) -> None:
    """Mark a dead worker's metric files so its live gauges stop counting."""
    metrics.mark_worker_dead(worker.pid)
