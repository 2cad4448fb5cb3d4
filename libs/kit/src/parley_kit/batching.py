"""Group commit: many callers' writes, done as one batch whenever they arrive together.

The caller that finds no write in progress becomes the writer: it writes its own item, then every item queued while it
wrote, until none is left. A caller that arrives during a write queues its item and returns at once. So a lone call is
written at once, in the caller (exactly as an unbatched write), and under load the writes coalesce into one statement
per round trip instead of one each, with no timer and no added delay.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Coalesces `add`s into calls of `write(batch)`; safe across threads and gevent greenlets."""

    def __init__(self, write: Callable[[list[T]], None], *, name: str, max_batch: int = 500) -> None:
        self._write = write
        self._name = name
        self._max_batch = max_batch
        self._pending: list[T] = []
        self._lock = threading.Lock()
        self._writing = False

    def add(self, item: T) -> None:
        """Queue `item`; write it (and whatever queues meanwhile) unless another caller is already writing."""
        with self._lock:
            self._pending.append(item)
            if self._writing:
                return
            self._writing = True
        while True:
            with self._lock:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                if not batch:
                    self._writing = False
                    return
            try:
                self._write(batch)
            except Exception:
                # The writer retries what can be retried; a batch still failing is logged, as a lone write was.
                log.exception("a batched write failed", extra={"batch.name": self._name, "batch.size": len(batch)})
            except BaseException:  # the writer is being killed: the next caller takes over what is still queued
                with self._lock:
                    self._writing = False
                raise
