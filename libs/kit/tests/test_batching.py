"""Group commit: every item written exactly once, lone items at once in the caller, concurrent ones coalesced."""

from __future__ import annotations

import threading
import time

import pytest

from parley_kit.batching import GroupCommit


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


def test_a_lone_item_is_written_before_add_returns() -> None:
    store = Store()
    commit = GroupCommit(store.write, name="test")
    commit.add(1)
    assert store.batches == [[1]]
    commit.add(2)
    assert store.batches == [[1], [2]]


def test_concurrent_items_are_coalesced_and_each_written_once() -> None:
    store = Store(delay=0.005)
    commit = GroupCommit(store.write, name="test")
    start = threading.Barrier(16)

    def caller(base: int) -> None:
        start.wait()
        for n in range(50):
            commit.add(base + n)

    threads = [threading.Thread(target=caller, args=(i * 1000,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Every add has returned, and the last writer only stops when nothing is queued: all 800 are written.
    assert sorted(store.items) == sorted(i * 1000 + n for i in range(16) for n in range(50))
    assert len(store.batches) < 800, "concurrent adds must share writes"
    assert max(len(batch) for batch in store.batches) > 1


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
