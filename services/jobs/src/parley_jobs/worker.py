"""The batch worker: runs each item through llm as the batch's owner, writes its result once, finalises batches.

One process: the relay/scheduler in a thread, a kit `Consumer` of the items queue (prefetch `worker_prefetch`,
handlers on a thread pool, ack after the handler's commit), a second one of the dead-letter queue (items RabbitMQ
gave up on after the delivery limit: recorded as failed so they reach the error file and the batch can end), and
Prometheus metrics on `worker_metrics_port`.

A message carries a group of items of one batch (`JOBS_ITEM_GROUP`). On PostgreSQL a group costs the database two
statements, each its own autocommit transaction, whatever its size: the claim (attempts counted, work read) and the
results (items and batch counters together); and llm one request (`POST /internal/calls`), each item's call keyed by
its id, so a redelivered group is never charged twice. Finalisation is a transaction of its own, run by whoever wrote
the last item (or by a redelivery of any item of a finished batch, if that one died first).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
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
from .batches import Outcome
from .credentials import ActAsRefused, ActingTokens
from .relay import QueueStats, Relay, dead_queue_declarer, queue_declarer
from .settings import JobsSettings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
GROUP_PATH = "/internal/calls"  # llm's route for a group of calls made for one user
T = TypeVar("T")


class ItemProcessor:
    """Handles `batch.items` messages (a group of items of one batch; or an older relay's `batch.item`, one item);
    safe to run twice for the same items (each item's write is conditional, and llm answers a key once)."""

    def __init__(
        self,
        db: Database,
        llm: ServiceClient,
        tokens: ActingTokens,
        *,
        delivery_limit: int,
        item_timeout: float,
        on_item_done: Callable[[int], None] | None = None,
    ) -> None:
        self._db = db
        self._llm = llm
        self._tokens = tokens
        self._delivery_limit = delivery_limit
        self._timeout = (CONNECT_TIMEOUT, item_timeout)
        self._on_item_done = on_item_done

    def handle(self, message: Message) -> None:
        """Run the group's items that are neither finished nor cancelled, in one llm request, and write their results
        in one statement; raise to have the message redelivered when some failed transiently (the redelivery runs
        only those: the others are finished)."""
        item_ids = message_item_ids(message.data)
        works = self._write(lambda connection: batches.claim_items(connection, item_ids=item_ids))
        touched = {work.batch_id for work in works}
        claimed = {work.item_id for work in works}
        for item_id in item_ids:
            if item_id in claimed:
                continue
            # Nothing to run: unknown, finished, or cancelled (then skipped) — start_item sorts it out.
            batch_id, work = self._transaction(
                lambda session, item_id=item_id: batches.start_item(session, item_id=item_id)
            )
            if batch_id is None:
                log.warning("batch item not found; dropping it", extra={"batch.item_id": item_id})
                continue
            touched.add(batch_id)
            if work is None:
                metrics.ITEMS_PROCESSED.labels(outcome="skipped").inc()
            else:
                works.append(work)
        results: list[tuple[str, Outcome]] = []
        retry: Exception | None = None
        for work, outcome in self._run(works):
            if isinstance(outcome, ParleyError):
                last = message.delivery_count >= self._delivery_limit or work.attempts > self._delivery_limit
                if not last:
                    retry = outcome
                    metrics.ITEMS_PROCESSED.labels(outcome="retried").inc()
                    continue
                log.warning(
                    "batch item failed on its last attempt",
                    extra={
                        "batch.id": work.batch_id,
                        "batch.item_id": work.item_id,
                        "error.type": type(outcome).__name__,
                    },
                )
                outcome = _last_outcome(outcome)
            results.append((work.item_id, outcome))
        recorded = self._write(lambda connection: batches.record_results(connection, results)) if results else []
        progress_of: dict[str, batches.Progress] = {}
        for entry in recorded:
            metrics.ITEMS_PROCESSED.labels(outcome="succeeded").inc(entry.completed)
            metrics.ITEMS_PROCESSED.labels(outcome="failed").inc(entry.failed)
            progress_of[entry.progress.batch_id] = entry.progress
        self._items_done(len(item_ids) - len(works) + len(results))
        # Also for redelivered, already finished items: their first worker may have died before finalising.
        for batch_id in touched:
            self.finish(batch_id, progress_of.get(batch_id))
        if retry is not None:
            raise retry

    def finish(self, batch_id: str, progress: batches.Progress | None = None) -> str | None:
        """Log progress and end the batch if no item is left (its own transaction, after the results' commit).

        `progress` is what writing this message's results returned; without it (a redelivery, a skip) it is read.
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
        """Items RabbitMQ dead-lettered after the delivery limit (their workers kept dying or failing): record the
        unfinished ones failed, so they reach the error file and their batches can end."""
        try:
            item_ids = message_item_ids(message.data)
        except Reject:
            log.error("dead-lettered message without item ids; dropped", extra={"message.id": message.id})
            return
        error = {
            "code": "delivery_limit_exceeded",
            "message": f"The request was abandoned after {self._delivery_limit} delivery attempts.",
        }

        def record(session: Any) -> tuple[set[str], list[batches.Recorded]]:
            batch_ids = {batches.item_batch_id(session, item_id=item_id) for item_id in item_ids} - {None}
            results = [(item_id, Outcome(False, error=error)) for item_id in item_ids]
            return batch_ids, batches.record_results(session, results)  # type: ignore[return-value]

        batch_ids, recorded = self._transaction(record)
        if not batch_ids:
            log.warning("dead-lettered items not found; dropped", extra={"batch.item_id": item_ids[0]})
            return
        progress_of = {}
        for entry in recorded:
            metrics.ITEMS_PROCESSED.labels(outcome="dead_lettered").inc(entry.failed)
            progress_of[entry.progress.batch_id] = entry.progress
            log.error(
                "batch items dead-lettered", extra={"batch.id": entry.progress.batch_id, "batch.items": entry.failed}
            )
        self._items_done(len(item_ids))
        for batch_id in batch_ids:
            self.finish(batch_id, progress_of.get(batch_id))

    def _items_done(self, count: int) -> None:
        if self._on_item_done is not None:
            self._on_item_done(count)

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

    def _run(self, works: list[batches.ItemWork]) -> list[tuple[batches.ItemWork, Outcome | ParleyError]]:
        """Each item's outcome, or the transient failure that left it to a redelivery: one llm request per owner's
        key (a group is one batch's, so one request)."""
        by_caller: dict[tuple[str, str | None], list[batches.ItemWork]] = {}
        for work in works:
            by_caller.setdefault((work.owner, work.key_id), []).append(work)
        done: list[tuple[batches.ItemWork, Outcome | ParleyError]] = []
        for (owner, key_id), group in by_caller.items():
            try:
                outcomes: list[Outcome | ParleyError] = list(self._call(owner, key_id, group))
            except ActAsRefused as exc:
                outcomes = [Outcome(False, error={"code": "owner_unauthorized", "message": str(exc)})] * len(group)
            except ParleyError as exc:  # no answers (llm's non-200, llm or auth unreachable): every item retried
                outcomes = [exc] * len(group)
            done += zip(group, outcomes, strict=True)
        return done

    def _call(self, owner: str, key_id: str | None, works: list[batches.ItemWork]) -> list[Outcome | ParleyError]:
        """One llm request for the items: each call's outcome, or a `_ServerError` for a call answered 5xx."""
        token = self._tokens.for_user(owner, key_id)
        calls = [
            # llm charges an item once, however often it is redelivered (a worker died after the call).
            {"path": work.endpoint, "body": work.body, "idempotency_key": work.item_id}
            for work in works
        ]
        response = self._llm.request(
            "POST",
            GROUP_PATH,
            json={"calls": calls},
            headers={"Authorization": f"Bearer {token}"},
            timeout=self._timeout,
        )
        body = _decode(response.data)
        if response.status == 401:
            # The act-as token was refused (expired or revoked keys): fetch a fresh one on the next delivery.
            self._tokens.forget(owner, key_id)
        if response.status != 200:
            # Not the items' answers (a refused token, an llm restarting or not yet upgraded): retried; on the last
            # attempt this answer is each item's line.
            raise _ServerError(Outcome(False, status_code=response.status, body=body))
        try:
            answers = [(answer["status_code"], answer["request_id"], answer["body"]) for answer in body["data"]]
        except (KeyError, TypeError) as exc:
            raise UpstreamError("the llm service answered a group of calls with a malformed body") from exc
        if len(answers) != len(works):
            raise UpstreamError("the llm service answered a group of calls with a malformed body")
        outcomes: list[Outcome | ParleyError] = []
        for status, request_id, answer in answers:
            outcome = Outcome(status < 400, status_code=status, request_id=request_id, body=answer)
            outcomes.append(_ServerError(outcome) if status >= 500 or _key_in_use(answer) else outcome)
        return outcomes


def message_item_ids(data: dict[str, Any]) -> list[str]:
    """The distinct item ids a message carries: `item_ids` (a group), or a single `item_id` (`batch.item`)."""
    item_ids = data.get("item_ids", [data.get("item_id")])
    if not isinstance(item_ids, list) or not item_ids or not all(isinstance(item_id, str) for item_id in item_ids):
        raise Reject("batch message without item ids")
    return list(dict.fromkeys(item_ids))


def _key_in_use(answer: Any) -> bool:
    """llm's 409 for a key an earlier delivery's request still holds (that worker died or timed out while llm ran
    the call): not the item's answer, which that request stores; a later delivery replays it."""
    error = answer.get("error") if isinstance(answer, dict) else None
    return isinstance(error, dict) and error.get("code") == "idempotency_key_in_use"


def _last_outcome(error: ParleyError) -> Outcome:
    """What a transient failure leaves on an item's last attempt: llm's answer (the line), or the error."""
    if isinstance(error, _ServerError):
        return error.outcome
    return Outcome(False, error={"code": error.code, "message": error.detail})


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
    settings: JobsSettings, db: Database, *, on_item_done: Callable[[int], None] | None = None
) -> ItemProcessor:
    """An ItemProcessor wired to llm and auth from the settings; `on_item_done` hears how many items a message ended."""
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
        group=settings.item_group,
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
