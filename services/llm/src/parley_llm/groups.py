"""Groups of calls in one request: the batch worker's path (`POST /internal/calls`).

A batch's items are independent calls of one owner. Sent one HTTP request each, their requests cost llm and the
worker more CPU than the calls themselves (bench/README.md, session 11). A group shares one request, one token check,
one statement claiming its Idempotency-Keys and one storing the answers; its calls go upstream concurrently.

Each call is still admitted, charged and answered on its own, in its route's shape, as if it had come alone (the same
`admit`, ledger and `relay.complete` as `/v1`): a forbidden model, a provider error or a key reused with another body
fails that call only. A key already held or finished (a redelivered item) goes through `claim_or_replay` like a lone
request's: a finished one is replayed, never charged again.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from flask import Response, g, request
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from parley_kit import background, errors, tracing
from parley_kit.db import run_statement
from parley_kit.errors import BadRequest, Forbidden, ParleyError
from parley_kit.openapi import error_responses
from parley_kit.tokens import Identity, authenticate

from . import idempotency, relay
from .views import INFERENCE_ROUTES, LlmState, admit, bridge_for, context, passed_on

MAX_CALLS = 64
# Group calls one process runs at once, whatever the number of groups: each may briefly take a database connection
# (a budget's reservation and settlement) from a pool of 10 + 10, which the `/v1` requests need too.
MAX_CALLS_IN_FLIGHT = 32
_slots: threading.BoundedSemaphore | None = None


class GroupCall(BaseModel):
    """One call of a group: the `/v1` route it would have been sent to, its body, and its Idempotency-Key."""

    model_config = ConfigDict(extra="forbid")

    path: Literal["/v1/chat/completions", "/v1/messages", "/v1/embeddings"]
    body: dict[str, Any]
    idempotency_key: str | None = Field(None, min_length=1, max_length=idempotency.MAX_KEY_LENGTH)


class CallGroup(BaseModel):
    """`POST /internal/calls`: up to `MAX_CALLS` calls made for the token's user."""

    model_config = ConfigDict(extra="forbid")

    calls: list[GroupCall] = Field(min_length=1, max_length=MAX_CALLS)

    @model_validator(mode="after")
    def _keys_are_distinct(self) -> CallGroup:
        keys = [call.idempotency_key for call in self.calls if call.idempotency_key is not None]
        if len(keys) != len(set(keys)):
            raise ValueError("the calls of a group must have distinct idempotency keys")
        return self


@dataclass(slots=True)
class Answer:
    """One call's answer: its status, request id and JSON body (the provider's bytes, a replay, or an error)."""

    status: int
    request_id: str
    body: bytes
    kept: bool = False  # a 200 to store under its Idempotency-Key


@dataclass(slots=True)
class Admitted:
    """A call ready to go upstream."""

    ctx: relay.CallContext
    route: str  # the `/v1` path it stands for: its error shape
    upstream_path: str
    content: bytes
    key: str | None
    fingerprint: str
    convert: Callable[[Any], bytes] | None = None
    holds_key: bool = False  # this call claimed its key: it stores or releases it


def run_group(state: LlmState, identity: Identity, calls: list[GroupCall]) -> bytes:
    """Run every call of the group; the answers, in order, as `{"object": "list", "data": [...]}`."""
    trace = tracing.current()
    admitted: list[Admitted | Answer] = [_admit(state, identity, call) for call in calls]
    fingerprints = {a.key: a.fingerprint for a in admitted if isinstance(a, Admitted) and a.key is not None}
    claimed: set[str] = set()
    if fingerprints:
        claimed = _claim(state, identity, fingerprints)
    for call in admitted:
        if isinstance(call, Admitted):
            call.holds_key = call.key in claimed

    def run(call: Admitted | Answer) -> Answer:
        if isinstance(call, Answer):
            return call
        with _call_slots(), tracing.use(_call_trace(trace, call.ctx.request_id)):
            return _run(state, identity, call)

    try:
        answers = background.map_concurrently(run, admitted)
    except BaseException:  # killed (a worker's graceful timeout): the held keys are released, as a lone call's are
        held = {c.key: None for c in admitted if isinstance(c, Admitted) and c.key is not None and c.holds_key}
        idempotency.settle_many(state.db, user_id=identity.subject, answers=held)
        raise
    settled = {
        call.key: answer.body if answer.kept else None
        for call, answer in zip(admitted, answers, strict=True)
        if isinstance(call, Admitted) and call.key is not None and call.holds_key
    }
    idempotency.settle_many(state.db, user_id=identity.subject, answers=settled)
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"status_code": a.status, "request_id": a.request_id, "body": orjson.Fragment(a.body)} for a in answers
            ],
        }
    )


def _admit(state: LlmState, identity: Identity, call: GroupCall) -> Admitted | Answer:
    """The call checked as its route would (400/403/404 answered here, before any claim or reservation)."""
    route = INFERENCE_ROUTES[call.path]
    request_id = _new_request_id()
    raw = call.body
    try:
        try:
            route.body.model_validate(raw)
        except ValidationError as exc:
            raise errors.validation_error(exc) from None
        if raw.get("stream"):
            raise BadRequest("a call in a group cannot stream", code="invalid_request", param="stream")
        deployment = admit(state.catalog, route, identity, raw)
        ctx = context(identity, deployment, route, raw, started=time.perf_counter(), request_id=request_id)
        bridge = bridge_for(route, deployment)
        key = call.idempotency_key if route.idempotent else None
        fingerprint = idempotency.request_hash(call.path, raw) if key is not None else ""
        if bridge is not None:
            content = bridge.request(raw, model=deployment.upstream_model)
            return Admitted(ctx, call.path, bridge.path, content, key, fingerprint, convert=bridge.response)
        content = passed_on(deployment, raw, orjson.dumps(raw))
        return Admitted(ctx, call.path, route.upstream_path, content, key, fingerprint)
    except ParleyError as exc:
        return _error(call.path, request_id, exc)
    except Exception as exc:  # noqa: BLE001 - a bug of ours fails this call only (from_unexpected logs it)
        return _error(call.path, request_id, errors.from_unexpected(exc, call.path))


def _claim(state: LlmState, identity: Identity, fingerprints: dict[str, str]) -> set[str]:
    """The keys this group claimed at once; none when the database failed (each call then claims its own)."""
    try:
        return run_statement(
            state.db.engine,
            lambda c: idempotency.claim_many(c, user_id=identity.subject, fingerprints=fingerprints),
        )
    except Exception:  # noqa: BLE001 - every call retries its own claim, and answers for its failure
        return set()


def _run(state: LlmState, identity: Identity, call: Admitted) -> Answer:
    """One admitted call: its claim (when the group's did not get it), the reservation, the provider, the ledger."""
    ctx = call.ctx
    try:
        if call.key is not None and not call.holds_key:
            done = idempotency.claim_or_replay(
                state.db,
                user_id=identity.subject,
                key=call.key,
                fingerprint=call.fingerprint,
                wait=state.idempotency_wait,
                stale_after=state.idempotency_stale_after,
            )
            if done is not None:
                return Answer(done.status_code or 200, ctx.request_id, done.response_body or b"{}")
            call.holds_key = True
        state.ledger.reserve(ctx)
        answer = relay.complete(
            state.router,
            ctx,
            path=call.upstream_path,
            content=call.content,
            settle=functools.partial(state.ledger.settle, ctx),
            convert=call.convert,
        )
        return Answer(200, ctx.request_id, answer, kept=True)
    except ParleyError as exc:
        return _error(call.route, ctx.request_id, exc)
    except Exception as exc:  # noqa: BLE001 - a bug of ours fails this call only (from_unexpected logs it)
        return _error(call.route, ctx.request_id, errors.from_unexpected(exc, call.route))


def _error(path: str, request_id: str, error: ParleyError) -> Answer:
    """A call's failure in its route's error shape."""
    body = orjson.dumps(errors.error_body(errors.provider_api_shape(path), error))
    return Answer(error.status, request_id, body)


def _call_slots() -> threading.BoundedSemaphore:
    """The process's slots for group calls in flight (made on first use: after gevent patched `threading`)."""
    global _slots  # one per process
    if _slots is None:
        _slots = threading.BoundedSemaphore(MAX_CALLS_IN_FLIGHT)
    return _slots


def _new_request_id() -> str:
    """Each call of a group has its own request id (the batch's output lines quote it)."""
    return f"req_{os.urandom(12).hex()}"


def _call_trace(group: tracing.TraceContext | None, request_id: str) -> tracing.TraceContext:
    """The call's trace context: the group's trace, its own span and request id."""
    trace_id = group.trace_id if group is not None else os.urandom(16).hex()
    return tracing.TraceContext(trace_id, os.urandom(8).hex(), request_id)


class CallAnswer(BaseModel):
    """One call's answer, as its `/v1` route would have given it."""

    status_code: int
    request_id: str
    body: dict[str, Any]


class GroupAnswers(BaseModel):
    """The answers of a group, in the order of its calls."""

    object: Literal["list"] = "list"
    data: list[CallAnswer]


def register_group_route(app: OpenAPI, state: LlmState) -> None:
    """Mount `POST /internal/calls`, for services acting for a user (the batch worker's act-as tokens only)."""
    bp = APIBlueprint(
        "llm-internal", __name__, url_prefix="/internal", abp_tags=[Tag(name="internal")], abp_security=[{"bearer": []}]
    )

    @bp.before_request
    def _authenticate() -> None:  # before the body is read and validated, as on `/v1`
        g.identity = authenticate(request, state.verifier)
        if g.identity.actor is None:
            raise Forbidden("only a service acting for a user may send a group of calls", code="actor_required")

    @bp.post("/calls", responses={200: GroupAnswers, **error_responses(400, 401, 403)})
    def calls(body: CallGroup) -> Response:
        """Run a group of non-streamed calls for the token's user; each is answered, charged and keyed on its own."""
        return Response(run_group(state, g.identity, body.calls), mimetype="application/json")

    app.register_api(bp)
