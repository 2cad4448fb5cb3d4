"""Gunicorn server hooks shared by every service (`-c python:parley_kit.gunicorn_hooks`)."""

from __future__ import annotations

import gc
from typing import Any

accesslog = None  # the app writes ECS access lines itself
keepalive = 75  # longer than the gateway's idle pool timeout, so pooled connections are not cut under it
graceful_timeout = 30
# gunicorn 27 opens a control socket at one path per user: several services on one host would clash over it.
control_socket_disable = True
DRAIN_SECONDS = 5.0


def child_exit(_server: Any, worker: Any) -> None:
    """Mark a dead worker's metric files so its live gauges stop counting."""
    from parley_kit import metrics  # here, not at the top: the master then never loads Flask (~9 MB per service)

    metrics.mark_worker_dead(worker.pid)


# Full collections wait for 1,000 middle-generation ones (Python's default: 10). A full collection walks every live
# object and pauses the worker for it: with 2,000 streams held by a worker that had served a while, 60-130 ms each,
# every few seconds, and they were the added time-to-first-chunk p99 (bench/README.md, session 6). Cycles seldom
# live long enough to reach the oldest generation; the young collections, which find most of them, are unchanged.
GC_THRESHOLDS = (700, 10, 1000)


def worker_exit(_server: Any, _worker: Any) -> None:
    """Let detached bookkeeping (llm's usage rows: `parley_kit.background`) finish before the worker goes. A worker
    that drained its connections has usually let it finish already; this covers one that had none open and exits at
    once. Short, as the master's graceful timeout may be mostly spent by now."""
    from parley_kit import background

    background.drain(timeout=DRAIN_SECONDS)


def post_worker_init(_worker: Any) -> None:
    """Move everything the app allocated at start-up out of the garbage collector's sight (a full collection then walks
    only what requests create, not the whole loaded app: imports, models, SDK clients), and make full collections
    rare (`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
