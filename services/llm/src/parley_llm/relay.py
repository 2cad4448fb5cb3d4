"""The hot path: send a request to its provider, forward the answer's bytes, meter usage, settle the ledger.

Non-streams are parsed only for `usage`; streams are forwarded event by event as they arrive (never buffered),
counting content chunks so a stream cut by either side is charged for what was sent.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Engine

from parley_kit import background, tracing
from parley_kit.batching import GroupCommit
from parley_kit.db import retry_lost_connection, run_statement, utcnow
from parley_kit.errors import ParleyError, UpstreamError, database_unavailable
from parley_kit.forward import ForwardResponse

from . import budgets, service
from .catalog import Deployment, Operation, Provider
from .routing import Router
from .telemetry import CallRecord, observe

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# A usage row without a budget waits up to this long (s) for others to share its INSERT: one request at a time, an
# INSERT per call was ~300 µs of llm and PostgreSQL CPU, a quarter of the whole path's (bench/README.md, session 7).
USAGE_LINGER = 0.01


@dataclass(slots=True)
class CallContext:
    """Who asked for what, and when: everything the ledger row needs besides the usage."""

    request_id: str
    user_id: str
    key_id: str | None
    deployment: Deployment
    operation: str  # chat | embeddings | messages
    body: dict[str, Any]
    started: float  # perf_counter at request start
    response: ForwardResponse | None = None  # the upstream stream once routed
    reservation: Any = None  # the budget reservation to settle, if the caller has budgets
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # its usage row's identity (written once)

    def new_record(self, *, streamed: bool = False) -> CallRecord:
        """An empty call record for this context."""
        return CallRecord(
            operation=self.operation,
            provider=self.deployment.provider.value,
            request_model=self.deployment.name,
            upstream_model=self.deployment.upstream_model,
            streamed=streamed,
        )


Settle = Callable[[CallContext, CallRecord, "float | None"], None]


class Ledger:
    """Reserves budget before a call; after it, one usage row, its metrics and log line, and the settled budget."""

    def __init__(
        self, engine: Engine, price_version: str, *, budget_cache_seconds: float = 0, default_max_tokens: int = 1024
    ) -> None:
        self.engine = engine
        self.price_version = price_version
        self.directory = budgets.BudgetDirectory(engine, budget_cache_seconds)
        self.default_max_tokens = default_max_tokens
        # Under gevent (llm's workers), rows of calls answered while the database is away are kept and written once it
        # is back (their call ids make a repeated write after an ambiguous commit write nothing).
        self._rows: GroupCommit[dict[str, Any]] = GroupCommit(
            self._write_rows, name="usage", linger=USAGE_LINGER, retry_while=database_unavailable
        )

    def reserve(self, ctx: CallContext) -> None:
        """Hold the call's estimated cost on the caller's budgets (none: no database work); 429 when over."""
        subjects = self.directory.subjects_for(ctx.user_id, ctx.key_id)
        if not subjects:
            return
        body = ctx.body
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            max_tokens = self.default_max_tokens
        if ctx.deployment.operation is Operation.EMBEDDINGS:
            max_tokens = 0
        estimate = budgets.to_nano(ctx.deployment.cost(estimate_prompt_words(body), max_tokens))
        with self.engine.begin() as connection:
            ctx.reservation = budgets.reserve(connection, subjects=subjects, estimate_nusd=estimate, now=utcnow())

    def settle(self, ctx: CallContext, record: CallRecord, first_chunk: float | None = None) -> None:
        """Finish the call's bookkeeping; a ledger failure is logged, never raised into a response.

        A call holding a reservation writes its usage row and the budget settlement in one transaction. Any other
        call's row goes through the group commit: written with the rows of the calls that finish within
        `USAGE_LINGER` of it, or while that write is in progress, in one INSERT. A connection lost on the way (a
        database restart, a killed backend) is retried on a fresh one: the row's call id makes a retry after an
        ambiguous commit write nothing, and its budget settlement, committed with it, is not repeated either.
        """
        elapsed = time.perf_counter() - ctx.started
        cost = service.price(ctx.deployment, input_tokens=record.input_tokens, output_tokens=record.output_tokens)
        try:
            observe(record, duration=elapsed, first_chunk=first_chunk, cost=float(cost), user_id=ctx.user_id)
        except Exception:
            log.exception("could not record call metrics", extra={"http.request.id": ctx.request_id})
        row = service.usage_row(
            call_id=ctx.call_id,
            request_id=ctx.request_id,
            user_id=ctx.user_id,
            key_id=ctx.key_id,
            operation=ctx.operation,
            deployment=ctx.deployment,
            input_tokens=record.input_tokens,
            output_tokens=record.output_tokens,
            cost_usd=cost,
            latency_ms=int(elapsed * 1000),
            status=record.status,
            price_version=self.price_version,
        )
        if ctx.reservation is None:
            self._rows.add(row)
            return
        try:
            retry_lost_connection(lambda: self._write_settled(ctx, row, cost))
        except Exception:
            log.exception("could not settle usage", extra={"http.request.id": ctx.request_id})

    def settle_after_answer(self, ctx: CallContext, record: CallRecord, trace: tracing.TraceContext | None) -> None:
        """Settle a call whose answer has gone out (from the WSGI close, after the request's trace is cleared).

        A row alone is only queued for the group commit, no I/O: done here, without a greenlet per call. A budget
        settlement is a transaction: detached, so the connection's next request does not wait for it.
        """

        def settle_in_trace() -> None:
            with tracing.use(trace):
                self.settle(ctx, record)

        if ctx.reservation is not None:
            background.run_detached(settle_in_trace)
            return
        try:
            settle_in_trace()
        except Exception:
            log.exception("could not settle usage", extra={"http.request.id": ctx.request_id})

    def _write_settled(self, ctx: CallContext, row: dict[str, Any], cost: Decimal) -> None:
        """One transaction: the usage row (once per call) and, with it, the budget settlement."""
        with self.engine.begin() as connection:
            written = service.record_usage(connection, row)
            if written and ctx.reservation is not None:
                budgets.settle(connection, ctx.reservation, cost_nusd=budgets.to_nano(cost), now=utcnow())
        ctx.reservation = None  # settled (or, with the row already there, settled by the attempt that wrote it)

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        """Usage rows without a budget to settle: one INSERT for all of them, retried on a lost connection."""
        run_statement(self.engine, lambda connection: service.record_usages(connection, rows))


def estimate_prompt_words(body: dict[str, Any]) -> int:
    """Input tokens estimated as words of the prompt, for when the provider never told us."""
    words = 0
    for part in (body.get("system"), body.get("input"), *(m.get("content") for m in body.get("messages") or ())):
        words += _words(part)
    return words


def estimate_answer_words(data: dict[str, Any]) -> int:
    """Output tokens estimated as words of an answer: an OpenAI completion's text, refusals and tool-call arguments;
    an Anthropic message's text and tool inputs."""
    choices = data.get("choices")
    if isinstance(choices, list):
        words = 0
        for choice in choices:
            message = _dig(choice, "message")
            words += _words(_dig(message, "content")) + _words(_dig(message, "refusal"))
            calls = _dig(message, "tool_calls")
            for call in calls if isinstance(calls, list) else ():
                words += _words(_dig(call, "function", "arguments"))
        return words
    blocks = data.get("content")
    words = _words(blocks)
    for block in blocks if isinstance(blocks, list) else ():
        if _dig(block, "type") == "tool_use":
            words += _words(orjson.dumps(block.get("input")).decode())
    return words


def _dig(value: Any, *keys: str) -> Any:
    """`value[key][key]…`, or None where a level is missing or not an object (an upstream's answer, unchecked)."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_words(item.get("text") if isinstance(item, dict) else item) for item in content)
    return 0


# The ledger's token columns are 32-bit: a count past this is garbage, and in a batched INSERT it would fail its batch.
TOKEN_COUNT_LIMIT = 2**31 - 1
MODEL_NAME_LIMIT = 128  # a response model names a metric label: an unbounded upstream string must not


def _counts(usage: Any, names: tuple[str, ...]) -> tuple[int, ...] | None:
    """The named counts of a usage object (absent or null ones are 0), or None when it is not an object, names none
    of them, or a count is not one: a string, a bool, a fraction, a negative number, or one past the ledger's
    columns."""
    if not isinstance(usage, dict):
        return None
    counts, named = [], False
    for name in names:
        value = usage.get(name)
        if value is None:
            value = 0
        elif type(value) is not int or not 0 <= value <= TOKEN_COUNT_LIMIT:
            return None
        else:
            named = True
        counts.append(value)
    return tuple(counts) if named else None


def openai_tokens(usage: Any) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) tokens of an OpenAI usage object, or None when it is unusable (`_counts`)."""
    counts = _counts(usage, ("prompt_tokens", "completion_tokens"))
    if counts is None:
        return None
    prompt, completion = counts
    (cached,) = _counts(_dig(usage, "prompt_tokens_details"), ("cached_tokens",)) or (0,)
    return prompt, completion, min(cached, prompt)


def anthropic_tokens(usage: Any) -> tuple[int, int, int] | None:
    """(input with cache writes and reads, output, cache reads) tokens of an Anthropic usage object, or None when it is
    unusable (`_counts`, or its input's parts sum past the ledger's columns)."""
    counts = _counts(usage, ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    if counts is None:
        return None
    uncached, output, written, read = counts
    total_input = uncached + written + read
    return (total_input, output, read) if total_input <= TOKEN_COUNT_LIMIT else None


def model_name(value: Any) -> str:
    """The model an answer names, or "" if it names none a label can carry."""
    return value if isinstance(value, str) and len(value) <= MODEL_NAME_LIMIT else ""


def read_usage(record: CallRecord, provider: Provider, data: Any, request: dict[str, Any]) -> bool:
    """Copy the provider's usage and response model from a parsed (non-stream) answer into the record; False when the
    answer has no usable usage, which is then charged an estimate (words of the prompt and of the answer)."""
    if not isinstance(data, dict):
        raise UpstreamError(f"the {provider.value} provider answered with an unexpected body", code="upstream_garbage")
    record.response_model = model_name(data.get("model"))
    usage = data.get("usage")
    tokens = openai_tokens(usage) if provider is Provider.OPENAI else anthropic_tokens(usage)
    if tokens is None:
        record.input_tokens, record.output_tokens = estimate_prompt_words(request), estimate_answer_words(data)
        return False
    record.input_tokens, record.output_tokens = tokens[0], tokens[1]
    return True


def complete(
    router: Router,
    ctx: CallContext,
    *,
    path: str,
    content: bytes,
    settle: Callable[[CallRecord], None],
    headers: dict[str, str] | None = None,
    convert: Callable[[Any], bytes] | None = None,
) -> bytes:
    """A non-streamed call: the provider's bytes, unchanged (or `convert`ed from the parsed answer, for a client of
    the other API family); usage parsed and handed to `settle`. An answer that cannot be read or converted is a 502,
    settled as an error with nothing charged."""
    record = ctx.new_record()
    provider = ctx.deployment.provider
    try:
        ctx.deployment, body = router.complete(ctx.deployment, path, content, headers=headers)
        routed_to(ctx, record)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                f"the {provider.value} provider answered with a malformed body", code="upstream_garbage"
            ) from None
        answer = body if convert is None else convert(data)
        if not read_usage(record, provider, data, ctx.body):
            log.warning(
                "the provider's answer has no usable usage: charged an estimate",
                extra={
                    "http.request.id": ctx.request_id,
                    "gen_ai.provider.name": provider.value,
                    "parley.usage_type": type(data.get("usage")).__name__,
                },
            )
    except ParleyError as exc:
        record.status = "error"
        record.error_type = exc.code if exc.status >= 500 else str(exc.status)
        settle(record)
        raise
    except Exception:  # a bug of ours: the call still gets its row and its reservation back
        record.status, record.error_type = "error", "internal_error"
        settle(record)
        raise
    settle(record)
    return answer


class StreamMeter:
    """Per-format handling of a passed-through stream: which events to forward and what they tell the ledger."""

    def __init__(self, record: CallRecord) -> None:
        self.record = record
        self.chunks = 0  # content deltas forwarded to the client
        self.usage_seen = False
        self.done = False  # the upstream ended the stream properly
        self.failed = False  # the upstream sent an error event

    def handle(self, event: bytes) -> bytes | None:
        """The bytes to forward for one SSE event (without its blank line), or None to drop it."""
        raise NotImplementedError

    def error_event(self, message: str) -> bytes:
        """The format's own mid-stream error event, for when the upstream fails under us."""
        raise NotImplementedError


def sse_data(event: bytes) -> bytes | None:
    """The `data:` payload of an SSE event, multi-line data joined; the single line both providers send is the
    fast path (it runs for every chunk of every stream)."""
    start = event.find(b"data:")
    if start < 0:
        return None
    if event.find(b"\ndata:", start) < 0:
        end = event.find(b"\n", start)
        payload = event[start + 5 : end if end >= 0 else len(event)]
        return payload[1:] if payload.startswith(b" ") else payload
    return b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))


class OpenAIStreamMeter(StreamMeter):
    """OpenAI chat chunks: counts content deltas, reads the final usage chunk, drops it if unasked for."""

    def __init__(self, record: CallRecord, *, client_wants_usage: bool) -> None:
        super().__init__(record)
        self.client_wants_usage = client_wants_usage

    def handle(self, event: bytes) -> bytes | None:
        """Forward the chunk unless it is the usage chunk the client did not ask for."""
        payload = sse_data(event)
        if payload is None:
            return event
        if payload.startswith(b"[DONE]"):
            self.done = True
            return event
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        if "error" in chunk:
            self.failed = True
            return event
        if not self.record.response_model:
            self.record.response_model = model_name(chunk.get("model"))
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            choices = ()
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls") or delta.get("refusal")):
                self.chunks += 1
                break
        usage = chunk.get("usage")
        if usage:
            tokens = openai_tokens(usage)
            if tokens is not None:  # else unusable: the stream is charged by its chunks and the prompt's words
                self.usage_seen = True
                self.record.input_tokens, self.record.output_tokens = tokens[0], tokens[1]
            if not choices and not self.client_wants_usage:
                return None
        return event

    def error_event(self, message: str) -> bytes:
        """`data: {"error": …}`, which the OpenAI SDK raises as APIError."""
        return b"data: " + orjson.dumps({"error": {"message": message, "type": "server_error", "code": None}})


class AnthropicStreamMeter(StreamMeter):
    """Anthropic named events: input tokens from message_start, cumulative output from message_delta."""

    def handle(self, event: bytes) -> bytes | None:
        """Every event is forwarded unchanged; only its usage is read."""
        payload = sse_data(event)
        if payload is None:
            return event
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "content_block_delta":
            self.chunks += 1
        elif kind == "message_start":
            message = data.get("message")
            if isinstance(message, dict):
                self.record.response_model = model_name(message.get("model"))
                tokens = anthropic_tokens(message.get("usage"))
                if tokens is not None:
                    self.record.input_tokens = tokens[0]
        elif kind == "message_delta":
            usage = data.get("usage")
            tokens = anthropic_tokens(usage)
            if tokens is not None and usage.get("output_tokens") is not None:
                self.usage_seen = True
                self.record.output_tokens = tokens[1]
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.failed = True
        return event

    def error_event(self, message: str) -> bytes:
        """`event: error`, which the Anthropic SDK raises."""
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + orjson.dumps(body)


def sse_events(response: ForwardResponse, deadline: float) -> Iterator[bytes]:
    """The upstream's SSE events (without their blank line) as they arrive; a trailing partial event is dropped."""
    buffer = b""
    for chunk in response.chunks():
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buffer += chunk
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2 :]
            if event:
                yield event
        if time.monotonic() > deadline:
            raise TimeoutError("total timeout")


class RelayedStream:
    """The WSGI body of a relayed stream. A generator closed before its first item never runs its `finally`, so a
    client that leaves before the first event would leave the upstream open and the reservation unsettled: `close`
    covers that case itself."""

    def __init__(
        self, response: ForwardResponse, ctx: CallContext, meter: StreamMeter, settle: Settle, *, total_timeout: float
    ) -> None:
        self._response, self._ctx, self._meter, self._settle = response, ctx, meter, settle
        self._events = _relay(response, ctx, meter, settle, total_timeout=total_timeout)
        self._started = False

    def __iter__(self) -> Iterator[bytes]:
        self._started = True
        return self._events

    def close(self) -> None:
        """Close the stream; if no event was ever pulled, close the upstream and settle as cancelled here."""
        if self._started:
            self._events.close()
            return
        self._events.close()
        self._response.close()
        record = self._meter.record
        record.status, record.error_type = "cancelled", "cancelled"
        record.input_tokens = record.input_tokens or estimate_prompt_words(self._ctx.body)
        self._settle(self._ctx, record, None)


def _relay(
    response: ForwardResponse, ctx: CallContext, meter: StreamMeter, settle: Settle, *, total_timeout: float
) -> Iterator[bytes]:
    """Forward the upstream's events one by one; whatever ends the stream, close the upstream and settle once."""
    record = meter.record
    first_chunk: float | None = None
    provider = ctx.deployment.provider.value
    try:
        for event in sse_events(response, time.monotonic() + total_timeout):
            try:
                out = meter.handle(event)
            except Exception:  # an event no meter expected: end the stream with the format's error, not a cut
                log.exception("a stream event could not be read", extra={"http.request.id": ctx.request_id})
                record.status, record.error_type = "error", "upstream_garbage"
                yield meter.error_event(f"the {provider} provider sent an unreadable event") + b"\n\n"
                return
            if out is None:
                continue
            if first_chunk is None:
                first_chunk = time.perf_counter() - ctx.started
            yield out + b"\n\n"
        if meter.failed:
            record.status, record.error_type = "error", "upstream_stream_error"
        elif not meter.done:
            record.status, record.error_type = "error", "upstream_cut"
            yield meter.error_event(f"the {provider} provider ended the stream early") + b"\n\n"
    except GeneratorExit:
        # The client went away: stop reading at once (closing below drops the upstream connection).
        record.status, record.error_type = "cancelled", "cancelled"
        raise
    except OSError as exc:  # a cut stream (BodyCut), a silent one (TimeoutError)
        record.status, record.error_type = "error", type(exc).__name__
        yield meter.error_event(f"the {provider} provider stream failed") + b"\n\n"
    finally:
        response.close()
        if not meter.usage_seen:
            # No final usage: 1 content delta = 1 output token; input tokens estimated if still unknown.
            record.output_tokens = max(record.output_tokens, meter.chunks)
        if not record.input_tokens:
            record.input_tokens = estimate_prompt_words(ctx.body)
        settle(ctx, record, first_chunk)


def routed_to(ctx: CallContext, record: CallRecord) -> None:
    """Point the record at the deployment that answered (a fallback is charged at its own price)."""
    record.provider = ctx.deployment.provider.value
    record.request_model = ctx.deployment.name
    record.upstream_model = ctx.deployment.upstream_model


def start_stream(
    router: Router,
    ctx: CallContext,
    record: CallRecord,
    *,
    path: str,
    content: bytes,
    settle: Settle,
    headers: dict[str, str] | None = None,
) -> ForwardResponse:
    """Open the upstream stream; a refusal before the first byte is settled as an error and raised."""
    try:
        ctx.deployment, ctx.response = router.open_stream(ctx.deployment, path, content, headers=headers)
        routed_to(ctx, record)
        return ctx.response
    except ParleyError as exc:
        record.status = "error"
        record.error_type = exc.code if exc.status >= 500 else str(exc.status)
        settle(ctx, record, None)
        raise
