"""Batching: group commit (every item written exactly once, lone items at once in the caller, concurrent ones
coalesced) and the coalescer (each caller gets its own answer, batches form while one is in flight)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from parley_kit.batching import Coalescer, GroupCommit


class Store:
    """A write target that takes its time, so callers arrive while a write is in progress."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def write(self, batch: list[int]) -> None:
        time.sleep(self.delay)
        with self.lock:
            self.batches.append(list(batch))

    @property
    def items(self) -> list[int]:
        return [item for batch in self.batches for item in batch]


def add_from_threads(commit: GroupCommit[int], *, threads: int, each: int) -> list[int]:
    """`each` items added by every one of `threads` threads started together; returns every item, sorted."""
    start = threading.Barrier(threads)

    def caller(base: int) -> None:
        start.wait()
        for n in range(each):
            commit.add(base + n)

    workers = [threading.Thread(target=caller, args=(i * 1000,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sorted(i * 1000 + n for i in range(threads) for n in range(each))


def test_a_lone_item_is_written_before_add_returns() -> None:
    store = Store()
    commit = GroupCommit(store.write, name="test")
    commit.add(1)
    assert store.batches == [[1]]
    commit.add(2)
    assert store.batches == [[1], [2]]


def test_a_lingering_writer_shares_one_write_among_calls_spread_in_time_and_holds_no_caller_up() -> None:
    """Under gevent (an llm worker), with a linger: calls a few ms apart (one request at a time) share one write,
    each `add` returns before any write, and the worker_exit hook writes what is still lingering. Without gevent the
    linger is ignored: a lone item is written before `add` returns (the test above)."""
    script = """
from gevent import monkey; monkey.patch_all()
import time
import parley_kit.gunicorn_hooks as hooks
from parley_kit.batching import GroupCommit
batches = []
commit = GroupCommit(batches.append, name="test", linger=0.2)
for n in range(5):
    commit.add(n)
    time.sleep(0.01)
print(batches, end=" ")
time.sleep(0.3)
print(batches, end=" ")
commit.add(5)
hooks.worker_exit(None, None)
print(batches)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout == "[] [[0, 1, 2, 3, 4]] [[0, 1, 2, 3, 4], [5]]\n"


def test_a_detached_writer_keeps_a_batch_while_the_database_is_away_and_drops_nothing_else() -> None:
    """Under gevent: a write failing for a reason `retry_while` accepts (the database is away) is tried again after a
    pause, with the items that came meanwhile, until it goes through: each item written once, in order. A batch that
    fails otherwise is logged and dropped, as before; items past `max_pending` are dropped and logged once."""
    script = """
from gevent import monkey; monkey.patch_all()
import logging, time
from parley_kit import batching
from parley_kit.batching import GroupCommit
batching.RETRY_FIRST_SECONDS = 0.05
logging.basicConfig(level=logging.WARNING, format="%(message)s")
class Away(Exception):
    pass
written, failures = [], {0: [Away(), Away()], 3: [ValueError("bad row")]}
def write(batch):
    if failures.get(batch[0]):
        raise failures[batch[0]].pop(0)
    written.append(list(batch))
commit = GroupCommit(write, name="test", linger=0.01, retry_while=lambda exc: isinstance(exc, Away), max_pending=4)
commit.add(0)
commit.add(1)
time.sleep(0.03)  # the first write fails: kept
commit.add(2)
time.sleep(0.3)  # failed again, then written with the item that came meanwhile
commit.add(3)
time.sleep(0.1)  # fails for a reason not retried: dropped
for n in range(4, 10):
    commit.add(n)  # the writer lingers: four wait, two are dropped
time.sleep(0.1)
print(written)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout == "[[0, 1, 2], [4, 5, 6, 7]]\n"
    log = result.stderr.splitlines()
    assert log.count("a batched write failed; it is kept and tried again") == 2
    assert log.count("a batched write failed") == 1  # the bad row, with its traceback
    assert log.count("a batched write's backlog is full: items are dropped until it drains") == 1
    assert log.count("items were dropped while a batched write's backlog was full") == 1


def test_concurrent_items_are_coalesced_and_each_written_once() -> None:
    store = Store(delay=0.005)
    commit = GroupCommit(store.write, name="test")
    added = add_from_threads(commit, threads=16, each=50)
    # Every add has returned, and the last writer only stops when nothing is queued: all 800 are written.
    assert sorted(store.items) == added
    assert len(store.batches) < 800, "concurrent adds must share writes"
    assert max(len(batch) for batch in store.batches) > 1


def test_callers_help_a_writer_that_falls_behind_instead_of_dropping_items() -> None:
    """Items come faster than one writer writes them (a busy worker's writer greenlet gets few turns): past two
    batches waiting, each caller that adds writes a batch itself, so the backlog never reaches `max_pending` and
    nothing is dropped; every item is written once."""
    store = Store(delay=0.02)
    commit = GroupCommit(store.write, name="test", max_batch=10, max_pending=60)
    added = add_from_threads(commit, threads=8, each=100)
    assert sorted(store.items) == added
    assert max(len(batch) for batch in store.batches) <= 10


def test_batches_are_capped() -> None:
    store = Store(delay=0.01)
    commit = GroupCommit(store.write, name="test", max_batch=5)
    threads = [threading.Thread(target=commit.add, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(store.items) == list(range(40))
    assert max(len(batch) for batch in store.batches) <= 5


def test_a_failed_batch_is_logged_and_the_next_is_still_written(caplog: pytest.LogCaptureFixture) -> None:
    written: list[list[int]] = []

    def write(batch: list[int]) -> None:
        if 1 in batch:
            raise RuntimeError("database down")
        written.append(batch)

    commit = GroupCommit(write, name="usage")
    commit.add(1)
    commit.add(2)
    assert written == [[2]]
    assert "a batched write failed" in caplog.text


def test_a_writer_killed_mid_write_hands_over_to_the_next_caller() -> None:
    written: list[list[int]] = []

    def write(batch: list[int]) -> None:
        if 1 in batch:
            raise KeyboardInterrupt  # what a killed greenlet or an interrupted thread sees
        written.append(batch)

    commit = GroupCommit(write, name="test")
    with pytest.raises(KeyboardInterrupt):
        commit.add(1)
    commit.add(2)  # not stuck behind a writer that is gone
    assert written == [[2]]


class Doubler:
    """A round trip answering each item with its double; the first batch waits until `release` (others queue)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.fail_next = False

    def run(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.release.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("the round trip failed")
        return [item * 2 for item in items]


def call_in_threads(
    coalesce: Coalescer[int, int], items: list[int]
) -> tuple[dict[int, object], list[threading.Thread]]:
    answers: dict[int, object] = {}

    def call(item: int) -> None:
        try:
            answers[item] = coalesce(item)
        except ConnectionError as exc:
            answers[item] = exc

    threads = [threading.Thread(target=call, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    return answers, threads


def test_a_lone_call_runs_at_once_in_its_caller() -> None:
    doubler = Doubler()
    doubler.release.set()
    coalesce = Coalescer(doubler.run)
    assert (coalesce(1), coalesce(2)) == (2, 4)
    assert doubler.batches == [[1], [2]]


def test_calls_arriving_during_a_round_trip_go_out_together_each_with_its_own_answer() -> None:
    doubler = Doubler()
    coalesce = Coalescer(doubler.run)
    first, first_threads = call_in_threads(coalesce, [1])
    _wait_for(lambda: len(doubler.batches) == 1)
    rest, threads = call_in_threads(coalesce, list(range(2, 12)))
    _wait_for(lambda: len(coalesce._queue) == 10)
    doubler.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert first == {1: 2}
    assert rest == {item: item * 2 for item in range(2, 12)}
    assert doubler.batches[0] == [1] and sorted(doubler.batches[1]) == list(range(2, 12))
    assert len(doubler.batches) == 2


def test_a_failed_round_trip_is_raised_to_every_caller_in_it_and_the_next_batch_still_runs() -> None:
    doubler = Doubler()
    coalesce = Coalescer(doubler.run, max_batch=3)
    first, first_threads = call_in_threads(coalesce, [1])
    _wait_for(lambda: len(doubler.batches) == 1)
    rest, threads = call_in_threads(coalesce, [2, 3, 4, 5, 6])
    _wait_for(lambda: len(coalesce._queue) == 5)
    doubler.fail_next = True  # the first batch fails
    doubler.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert isinstance(first[1], ConnectionError)
    assert {item: answer for item, answer in rest.items()} == {n: n * 2 for n in (2, 3, 4, 5, 6)}
    assert [len(batch) for batch in doubler.batches] == [1, 3, 2]  # max_batch bounds each round trip
    assert coalesce(7) == 14  # nothing is left in flight


def _wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
