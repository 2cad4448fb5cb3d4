"""The batch worker: runs each item through llm as the batch's owner, writes its result once, finalises batches.

One process: the relay/scheduler in a thread, a kit `Consumer` of the items queue (prefetch `worker_prefetch`,
handlers on a thread pool, ack after the handler's commit), a second one of the dead-letter queue (items RabbitMQ
gave up on after the delivery limit: recorded as failed so they reach the error file and the batch can end), and
Prometheus metrics on `worker_metrics_port`.

An item costs the database two statements on PostgreSQL, each its own autocommit transaction: the claim (attempt
counted, work read) and the result (item and batch counters together). Finalisation is a transaction of its own, run
by whoever wrote the last item (or by a redelivery of any item of a finished batch, if that one died first).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

import orjson
from sqlalchemy import Connection

from parley_kit import logs
from parley_kit.amqp import Consumer, Message, Publisher, Reject
from parley_kit.db import Database, retry_lost_connection, run_statement
from parley_kit.errors import ParleyError, UpstreamError
from parley_kit.http import ServiceClient
from parley_kit.service_auth import ServiceTokenSource

from . import batches, metrics, open_database
from .credentials import ActAsRefused, ActingTokens
from .relay import QueueStats, Relay, dead_queue_declarer, queue_declarer
from .settings import JobsSettings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one item."""

    succeeded: bool
    status_code: int | None = None
    request_id: str | None = None
    body: Any = None
    error: dict[str, Any] | None = None


class ItemProcessor:
    """Handles one `batch.item` message; safe to run twice for the same item (the write is conditional)."""

    def __init__(
        self,
        db: Database,
        llm: ServiceClient,
        tokens: ActingTokens,
        *,
        delivery_limit: int,
        item_timeout: float,
        on_item_done: Callable[[], None] | None = None,
    ) -> None:
        self._db = db
        self._llm = llm
        self._tokens = tokens
        self._delivery_limit = delivery_limit
        self._timeout = (CONNECT_TIMEOUT, item_timeout)
        self._on_item_done = on_item_done

    def handle(self, message: Message) -> None:
        """Run the item unless it is finished or cancelled; raise to have it redelivered (transient failures)."""
        item_id = message.data.get("item_id")
        if not isinstance(item_id, str):
            raise Reject("batch.item message without an item_id")
        work = self._write(lambda connection: batches.claim_item(connection, item_id=item_id))
        batch_id = work.batch_id if work is not None else None
        if work is None:  # nothing to run: unknown, finished, or cancelled (then skipped) — start_item sorts it out
            batch_id, work = self._transaction(lambda session: batches.start_item(session, item_id=item_id))
        if batch_id is None:
            log.warning("batch item not found; dropping its message", extra={"batch.item_id": item_id})
            return
        progress = None
        if work is None:
            metrics.ITEMS_PROCESSED.labels(outcome="skipped").inc()
        else:
            last_attempt = message.delivery_count >= self._delivery_limit or work.attempts > self._delivery_limit
            try:
                outcome = self._run(work, last_attempt=last_attempt)
            except Exception:
                metrics.ITEMS_PROCESSED.labels(outcome="retried").inc()
                raise
            progress = self._write(
                lambda connection: batches.record_result(
                    connection,
                    item_id=item_id,
                    succeeded=outcome.succeeded,
                    status_code=outcome.status_code,
                    request_id=outcome.request_id,
                    body=outcome.body,
                    error=outcome.error,
                )
            )
            if progress is not None:
                metrics.ITEMS_PROCESSED.labels(outcome="succeeded" if outcome.succeeded else "failed").inc()
        if self._on_item_done is not None:
            self._on_item_done()
        # Also for a redelivered, already finished item: its first worker may have died before finalising.
        self.finish(batch_id, progress)

    def finish(self, batch_id: str, progress: batches.Progress | None = None) -> str | None:
        """Log progress and end the batch if no item is left (its own transaction, after the result's commit).

        `progress` is what writing this item's result returned; without it (a redelivery, a skip) it is read.
        """
        if progress is None:
            progress = self._transaction(lambda session: batches.progress(session, batch_id=batch_id))
            if progress is None:
                return None
        final = None
        if progress.done:
            final = self._transaction(lambda session: batches.finalize_if_done(session, batch_id=batch_id))
        log.info(
            "batch progress %d/%d",
            progress.finished,
            progress.total,
            extra={"batch.id": batch_id, "batch.done": progress.finished, "batch.total": progress.total},
        )
        if final:
            metrics.BATCHES.labels(status=final).inc()
            log.info("batch %s", final, extra={"batch.id": batch_id, "batch.status": final})
        return final

    def handle_dead(self, message: Message) -> None:
        """An item RabbitMQ dead-lettered after the delivery limit (its workers kept dying or failing): record it
        failed, so it reaches the error file and its batch can end."""
        item_id = message.data.get("item_id")
        if not isinstance(item_id, str):
            log.error("dead-lettered message without an item_id; dropped", extra={"message.id": message.id})
            return
        error = {
            "code": "delivery_limit_exceeded",
            "message": f"The request was abandoned after {self._delivery_limit} delivery attempts.",
        }

        def record(session: Any) -> tuple[str | None, batches.Progress | None]:
            batch_id = batches.item_batch_id(session, item_id=item_id)
            if batch_id is None:
                return None, None
            return batch_id, batches.record_result(session, item_id=item_id, succeeded=False, error=error)

        batch_id, progress = self._transaction(record)
        if batch_id is None:
            log.warning("dead-lettered item not found; dropped", extra={"batch.item_id": item_id})
            return
        if progress is not None:
            metrics.ITEMS_PROCESSED.labels(outcome="dead_lettered").inc()
            log.error("batch item dead-lettered", extra={"batch.id": batch_id, "batch.item_id": item_id})
        if self._on_item_done is not None:
            self._on_item_done()
        self.finish(batch_id, progress)

    def _write(self, statement: Callable[[Connection], T]) -> T:
        """Run a statement that is safe to repeat (`parley_kit.db.run_statement`: autocommit on PostgreSQL, retried
        on a fresh connection, as the pool does not ping before lending one out). A claim repeated after its commit
        counts one attempt more, which only brings the last attempt nearer."""
        return run_statement(self._db.engine, statement)

    def _transaction(self, work: Callable[[Any], T]) -> T:
        """Run `work` in a session transaction, again on a fresh connection when the database dropped this one."""

        def run() -> T:
            with self._db.transaction() as session:
                return work(session)

        return retry_lost_connection(run)

    def _run(self, work: batches.ItemWork, *, last_attempt: bool) -> Outcome:
        """Call llm; a transient failure raises unless this is the last delivery, which records it as failed."""
        try:
            return self._call(work)
        except ActAsRefused as exc:
            return Outcome(False, error={"code": "owner_unauthorized", "message": str(exc)})
        except ParleyError as exc:  # llm answered 5xx (the answer is the line), or llm/auth unreachable
            if not last_attempt:
                raise
            log.warning(
                "batch item failed on its last attempt",
                extra={"batch.id": work.batch_id, "batch.item_id": work.item_id, "error.type": type(exc).__name__},
            )
            if isinstance(exc, _ServerError):
                return exc.outcome
            return Outcome(False, error={"code": exc.code, "message": exc.detail})

    def _call(self, work: batches.ItemWork) -> Outcome:
        token = self._tokens.for_user(work.owner, work.key_id)
        response = self._llm.request(
            "POST",
            work.endpoint,
            json=work.body,
            # llm charges one item once, however often it is redelivered (a worker died after the call).
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": work.item_id},
            timeout=self._timeout,
        )
        body = _decode(response.data)
        outcome = Outcome(
            response.status < 400,
            status_code=response.status,
            request_id=response.headers.get("x-request-id"),
            body=body,
        )
        if response.status == 401:
            # The act-as token was refused (expired or revoked keys): fetch a fresh one on the next delivery.
            self._tokens.forget(work.owner, work.key_id)
            raise _ServerError(outcome)
        if response.status >= 500:
            raise _ServerError(outcome)
        return outcome


class _ServerError(UpstreamError):
    """llm answered 5xx (or refused our token): retry; on the last attempt the answer itself is the line."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"the llm service answered {outcome.status_code}")
        self.outcome = outcome


def _decode(data: bytes) -> Any:
    """A JSON response body, or the text wrapped as an error body when llm sent something else."""
    try:
        return orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return {"error": {"message": data[:1000].decode("utf-8", "replace"), "type": "server_error"}}


def build_processor(
    settings: JobsSettings, db: Database, *, on_item_done: Callable[[], None] | None = None
) -> ItemProcessor:
    """An ItemProcessor wired to llm and auth from the settings; `on_item_done` is told each time an item ends."""
    llm = ServiceClient(
        settings.llm_url, name="llm", read_timeout=settings.item_timeout, max_connections=settings.worker_prefetch
    )
    auth = ServiceClient(settings.auth_url, name="auth", read_timeout=10.0, max_connections=4)
    tokens = ActingTokens(ServiceTokenSource(auth, client_id=settings.client_id, client_secret=settings.client_secret))
    return ItemProcessor(
        db,
        llm,
        tokens,
        delivery_limit=settings.delivery_limit,
        item_timeout=settings.item_timeout,
        on_item_done=on_item_done,
    )


def run_worker(settings: JobsSettings) -> None:
    """Run the relay and the consumer until SIGTERM or SIGINT."""
    logs.configure(
        settings.service_name,
        settings.version,
        settings.environment,
        settings.log_level,
        settings.logstash_host,
        settings.logstash_port,
    )
    # No ping per checkout (a round trip each): every database touch of the worker is retried on a lost connection,
    # or fails its message, which is then redelivered (the relay's pass, the next tick).
    db = open_database(settings, pre_ping=False)
    declare = queue_declarer(settings)
    relay = Relay(
        db,
        Publisher(settings.amqp_url, declare=declare),
        queue=settings.items_queue,
        interval=settings.relay_interval,
        idle_interval=settings.relay_idle_interval,
        window=settings.schedule_window,
        stats=QueueStats(settings.amqp_url, {"items": settings.items_queue, "dead": settings.dead_queue}),
        stats_interval=settings.stats_interval,
    )
    processor = build_processor(settings, db, on_item_done=relay.item_done)
    consumer = Consumer(
        settings.amqp_url,
        processor.handle,
        declare=declare,
        prefetch=settings.worker_prefetch,
        name="jobs-items",
        retry_backoff=settings.retry_backoff,
    )
    dead_consumer = Consumer(
        settings.amqp_url, processor.handle_dead, declare=dead_queue_declarer(settings), prefetch=1, name="jobs-dead"
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping the worker", extra={"signal": signal.Signals(signum).name})
        consumer.stop()
        dead_consumer.stop()
        relay.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    metrics.serve(settings.worker_metrics_port)
    relay_thread = relay.start_in_thread()
    dead_thread = dead_consumer.start_in_thread()
    log.info("jobs worker started", extra={"queue": settings.items_queue})
    try:
        consumer.run()
    finally:
        relay.stop()
        dead_consumer.stop()
        relay_thread.join(timeout=10)
        dead_thread.join(timeout=10)
        db.dispose()
        logs.shutdown()
