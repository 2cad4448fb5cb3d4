"""Bookkeeping that must finish but need not hold up the connection it came from (a usage row, a token settlement).

Under gevent each piece runs in a greenlet of its own, so a keep-alive connection's greenlet reads the client's next
request at once rather than after the previous answer's bookkeeping: on llm, one request at a time, the previous
call's usage row was ~0.7 ms of each request's latency (bench/README.md, session 6). Without gevent (threaded workers,
tests) it runs inline, as before. A worker that exits first waits for what is still running (`drain`, called by the
kit's gunicorn `worker_exit` hook), so a restart does not lose a charge.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

_running: Any = None  # a gevent Group of the pieces in flight, made on first use


def run_detached(work: Callable[[], None]) -> None:
    """Run `work` off the caller's greenlet under gevent (it must handle its own errors), inline otherwise."""
    global _running  # one group per process
    if not _under_gevent():
        work()
        return
    if _running is None:
        from gevent.pool import Group

        _running = Group()
    _running.spawn(work)


def drain(timeout: float) -> bool:
    """Wait up to `timeout` seconds for detached work still running; True when none is left."""
    if _running is None:
        return True
    return bool(_running.join(timeout=timeout))


def _under_gevent() -> bool:
    """Whether this process runs on gevent's monkey-patched sockets (a gevent worker); not importing gevent to ask."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))
