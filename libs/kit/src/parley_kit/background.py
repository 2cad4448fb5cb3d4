"""Bookkeeping that must finish but need not hold up the connection it came from (llm's usage row after an answer).

Under gevent each piece runs in a greenlet of its own, so a keep-alive connection's greenlet reads the client's next
request at once rather than after the previous answer's bookkeeping: on llm, one request at a time, the previous
call's usage row was ~0.9 ms of each request's latency (bench/README.md, session 6). At most `MAX_DETACHED` pieces run
at once (each may hold a database connection): past that, the caller waits for a free slot, as it waited for the
work itself before. Without gevent (threaded workers, tests) the work runs inline. A worker that exits first waits for
what is still running (`drain`, from the kit's gunicorn `worker_exit` hook), so a restart does not lose a charge.

`map_concurrently` is the other use of the same choice: I/O-bound pieces of one request at once (llm's group of
calls), as greenlets under gevent, as threads otherwise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

MAX_DETACHED = 16  # below llm's database pool (10 + 10 overflow): the requests' own statements still find connections

_running: Any = None  # a gevent Pool of the pieces in flight, made on first use


def under_gevent() -> bool:
    """Whether this process runs on gevent's monkey-patched sockets (a gevent worker); not importing gevent to ask."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def run_detached(work: Callable[[], None]) -> None:
    """Run `work` off the caller's greenlet under gevent, inline otherwise; an error it raises is logged."""
    global _running  # one pool per process
    if not under_gevent():
        _logged(work)
        return
    if _running is None:
        from gevent.pool import Pool

        _running = Pool(MAX_DETACHED)
    _running.spawn(_logged, work)  # blocks while MAX_DETACHED are running


def drain(timeout: float) -> bool:
    """Wait up to `timeout` seconds for detached work still running; True when none is left (else logged)."""
    if _running is None or _running.join(timeout=timeout):
        return True
    log.error("detached work still running at exit", extra={"background.running": len(_running)})
    return False


def _logged(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:
        log.exception("detached work failed")


def map_concurrently(work: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`work` applied to every item at once, results in order: greenlets under gevent, threads otherwise (each
    item is mostly waiting on I/O). `work` must not raise: it answers for its own failures."""
    if len(items) < 2:
        return [work(item) for item in items]
    if under_gevent():
        from gevent.pool import Group

        group = Group()
        try:
            return list(group.imap(work, items))
        except BaseException:  # the caller is being killed: so is its work
            group.kill()
            raise
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(work, items))
