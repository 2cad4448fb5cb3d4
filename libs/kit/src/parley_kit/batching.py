"""Batching: many callers' round trips, done as one whenever they arrive together.

`GroupCommit` is for writes nobody waits on; `Coalescer` for round trips whose answer each caller needs.

Group commit: the caller that finds no write in progress becomes the writer: it writes its own item, then every item
queued while it wrote, until none is left. A caller that arrives during a write queues its item and returns at once.
So a lone call is written at once, in the caller (exactly as an unbatched write), and under load the writes coalesce
into one statement per round trip instead of one each. With a `linger` (under gevent), the writer runs detached and
waits that long before its first write, so calls spread out in time (one request at a time) share a round trip too;
a detached writer also keeps a batch that failed for a reason `retry_while` accepts (the database is away) and tries
it again, backing off, until it is written or the worker exits. A writer that falls behind (its greenlet gets few turns
in a worker busy serving) is helped: past `HELP_AFTER_BATCHES` batches waiting, a caller that adds writes a batch
itself, so callers slow down to the rate the database takes instead of the backlog filling up and items being dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from . import background

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_FIRST_SECONDS = 0.2  # a detached writer's first wait after a failed write; doubled up to RETRY_MAX_SECONDS
RETRY_MAX_SECONDS = 5.0
# Past this many batches waiting behind a writer, each caller that adds an item writes a batch itself.
HELP_AFTER_BATCHES = 2


class GroupCommit(Generic[T]):
    """Coalesces `add`s into calls of `write(batch)`; safe across threads and gevent greenlets.

    `linger` (seconds) applies under gevent only: the write then runs in a detached greenlet (`parley_kit.background`,
    drained at worker exit) that first waits `linger`, so no caller waits for the write (only, as any detached work,
    for a free slot). Without gevent a lingering writer would hold up its caller, so it writes at once. A detached
    writer keeps a batch whose write failed with an error `retry_while` accepts, and writes it again after a pause (so
    `write` must be safe to repeat); meanwhile at most `max_pending` items wait, and what comes past that is dropped
    and logged.
    """

    def __init__(
        self,
        write: Callable[[list[T]], None],
        *,
        name: str,
        max_batch: int = 500,
        linger: float = 0.0,
        retry_while: Callable[[Exception], bool] | None = None,
        max_pending: int = 20_000,
    ) -> None:
        self._write = write
        self._name = name
        self._max_batch = max_batch
        self._linger = linger
        self._retry_while = retry_while
        self._max_pending = max_pending
        self._pending: list[T] = []
        self._dropped = 0  # items refused since the backlog filled up
        self._lock = threading.Lock()
        self._writing = False
        self._retrying = False  # the writer is backing off after a failed write (the database is away)

    def add(self, item: T) -> None:
        """Queue `item`; write it (and whatever queues meanwhile) unless another caller is already writing."""
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self._dropped += 1
                if self._dropped == 1:  # once per episode: the writer tells how many when it drains
                    log.error(
                        "a batched write's backlog is full: items are dropped until it drains",
                        extra={"batch.name": self._name, "batch.size": self._max_pending},
                    )
                return
            self._pending.append(item)
            if self._writing:
                if len(self._pending) < HELP_AFTER_BATCHES * self._max_batch or self._retrying:
                    return
                # The writer is falling behind (a worker busy serving: its greenlet gets few turns): this caller
                # writes a batch itself. Callers slow down to the rate the database takes, instead of the backlog
                # filling up and items being dropped.
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
            else:
                self._writing = True
                batch = None
        if batch is not None:
            self._write_beside_writer(batch)
            return
        if self._linger and background.under_gevent():
            try:
                background.run_detached(self._write_after_linger)
            except BaseException:  # killed while waiting for a slot: the next caller becomes the writer
                with self._lock:
                    self._writing = False
                raise
        else:
            self._write_pending()

    def _write_beside_writer(self, batch: list[T]) -> None:
        """Write one batch in this caller, beside the writer; kept for the writer if it failed with an error
        `retry_while` accepts, logged otherwise (as the writer does)."""
        try:
            self._write(batch)
        except Exception as exc:
            if not self._keeps(exc):
                log.exception("a batched write failed", extra={"batch.name": self._name, "batch.size": len(batch)})
                return
            with self._lock:
                self._pending[:0] = batch

    def _write_after_linger(self) -> None:
        self._pause(self._linger)  # gevent's sleep: other greenlets add meanwhile
        self._write_pending(detached=True)

    def _write_pending(self, *, detached: bool = False) -> None:
        """As the writer: write batches until nothing is queued (a detached writer keeps and retries a batch that
        failed for a reason `retry_while` accepts)."""
        pause = RETRY_FIRST_SECONDS
        while True:
            with self._lock:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                if not batch:
                    self._writing = self._retrying = False
                    return
            try:
                self._write(batch)
                pause = RETRY_FIRST_SECONDS
                self._retrying = False
                self._report_dropped()
            except Exception as exc:
                if detached and self._keeps(exc):
                    with self._lock:
                        self._pending[:0] = batch  # first in line again, as it was
                        self._retrying = True  # callers do not help while the database is away
                    log.warning(
                        "a batched write failed; it is kept and tried again",
                        extra={"batch.name": self._name, "batch.size": len(batch), "error.type": type(exc).__name__},
                    )
                    self._pause(pause)
                    pause = min(2 * pause, RETRY_MAX_SECONDS)
                    continue
                # The writer retries what can be retried; a batch still failing is logged, as a lone write was.
                log.exception("a batched write failed", extra={"batch.name": self._name, "batch.size": len(batch)})
            except BaseException:  # the writer is being killed: the next caller takes over what is still queued
                with self._lock:
                    self._writing = False
                raise

    def _keeps(self, exc: Exception) -> bool:
        """Whether a batch that failed with `exc` is kept for another try (`retry_while`; False if it fails)."""
        if self._retry_while is None:
            return False
        try:
            return self._retry_while(exc)
        except Exception:
            log.exception("could not tell whether a batched write may be tried again", extra={"batch.name": self._name})
            return False

    def _pause(self, seconds: float) -> None:
        """Wait (lingering, or before writing a kept batch again); killed meanwhile, the next caller writes."""
        try:
            time.sleep(seconds)
        except BaseException:
            with self._lock:
                self._writing = False
            raise

    def _report_dropped(self) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.error(
                "items were dropped while a batched write's backlog was full",
                extra={"batch.name": self._name, "batch.dropped": dropped},
            )


R = TypeVar("R")


class _Waiter(Generic[T, R]):
    __slots__ = ("done", "error", "item", "lead", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = threading.Event()
        self.lead = False  # set instead of a result: this caller runs the next batch
        self.result: R | None = None
        self.error: BaseException | None = None


class Coalescer(Generic[T, R]):
    """Round trips with an answer per caller: calls that arrive while one is in flight go out together in the next.

    `run(items)` answers each item, in order. The caller that finds nothing in flight runs its own item at once (a lone
    call pays nothing extra); callers arriving meanwhile queue, and when the round trip ends the first of them runs
    all that queued in one. No caller runs more than one batch, and none waits on a timer. Safe across threads and
    gevent greenlets; an error in a batch is raised to every caller in it.
    """

    def __init__(self, run: Callable[[list[T]], list[R]], *, max_batch: int = 256) -> None:
        self._run = run
        self._max_batch = max_batch
        self._queue: list[_Waiter[T, R]] = []
        self._lock = threading.Lock()
        self._busy = False  # a batch is in flight (then a queued caller will lead the next one)

    def __call__(self, item: T) -> R:
        with self._lock:
            waiter: _Waiter[T, R] | None = _Waiter(item) if self._busy else None
            if waiter is not None:
                self._queue.append(waiter)
            self._busy = True
        others: list[_Waiter[T, R]] = []
        if waiter is not None:  # a round trip is in flight: wait to be served by it, or to lead the next one
            try:
                waiter.done.wait()
            except BaseException:  # killed while queued: leave the queue, and pass on the lead if it was just given
                with self._lock:
                    given_lead = waiter.lead
                    if waiter in self._queue:
                        self._queue.remove(waiter)
                if given_lead:
                    self._hand_over()
                raise
            if not waiter.lead:
                if waiter.error is not None:
                    raise waiter.error
                return waiter.result  # type: ignore[return-value]
            with self._lock:  # the leader is at the head of the queue
                others = self._queue[1 : self._max_batch]
                del self._queue[: self._max_batch]
        try:
            results = self._run([item, *(served.item for served in others)])
            if len(results) != 1 + len(others):
                raise ValueError(f"{len(results)} answers for a batch of {1 + len(others)}")
        except Exception as exc:
            for served in others:
                served.error = exc
            self._hand_over()
            for served in others:
                served.done.set()
            raise
        except BaseException:
            # This caller is being killed (its own timeout, a worker shutting down): the others go back to the front
            # of the queue for the next leader (the round trip may have happened: their items can count twice).
            with self._lock:
                self._queue[:0] = others
            self._hand_over()
            raise
        for served, result in zip(others, results[1:], strict=True):
            served.result = result
        self._hand_over()
        for served in others:
            served.done.set()
        return results[0]

    def _hand_over(self) -> None:
        """The batch is done: the first queued caller leads the next one, or nothing is in flight any more."""
        with self._lock:
            if self._queue:
                successor = self._queue[0]
                successor.lead = True
                successor.done.set()
            else:
                self._busy = False
