"""Detached bookkeeping: off the caller's greenlet under gevent, inline without it, drained before a worker exits."""

from __future__ import annotations

import subprocess
import sys

from parley_kit import background


def test_without_gevent_the_work_runs_inline() -> None:
    done: list[int] = []
    background.run_detached(lambda: done.append(1))
    assert done == [1]
    assert background.drain(timeout=0)


def test_under_gevent_the_caller_goes_on_at_once_and_drain_waits_for_the_work() -> None:
    """What a gevent worker sees: the close callback returns before the work (a database round trip here stood in
    for by a sleep) has run, and the worker_exit hook's drain lets it finish."""
    script = """
from gevent import monkey; monkey.patch_all()
import time
import parley_kit.gunicorn_hooks as hooks
from parley_kit import background
done = []
def work():
    time.sleep(0.2)
    done.append(1)
background.run_detached(work)
print(done, background.drain(timeout=0.01), end=" ")
hooks.worker_exit(None, None)
print(done)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout == "[] False [1]\n"
