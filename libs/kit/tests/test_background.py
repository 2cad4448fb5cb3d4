"""Detached bookkeeping: off the caller's greenlet under gevent, inline without it, bounded, drained before exit."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from parley_kit import background


def test_without_gevent_the_work_runs_inline_and_its_error_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    done: list[int] = []
    background.run_detached(lambda: done.append(1))
    assert done == [1]
    with caplog.at_level(logging.ERROR, logger="parley_kit.background"):
        background.run_detached(lambda: 1 / 0)  # logged, not raised into the response being closed
    assert [record.message for record in caplog.records] == ["detached work failed"]
    assert background.drain(timeout=0)


def test_under_gevent_the_caller_goes_on_at_once_and_drain_waits_for_the_work() -> None:
    """What a gevent worker sees: the close callback returns before the work (a database round trip, here a sleep)
    has run; past MAX_DETACHED running, the next caller waits for a slot; the worker_exit hook lets all finish."""
    script = """
from gevent import monkey; monkey.patch_all()
import time
import parley_kit.gunicorn_hooks as hooks
from parley_kit import background
background.MAX_DETACHED = 2
done = []
def work():
    time.sleep(0.2)
    done.append(1)
background.run_detached(work)
print(len(done), background.drain(timeout=0.01), end=" ")
background.run_detached(work)
background.run_detached(work)  # the third waits until one of the first two is done
print(len(done) >= 1, end=" ")
hooks.worker_exit(None, None)
print(len(done))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout == "0 False True 3\n"
