"""`Idempotency-Key` on non-streamed completions and messages: one upstream call and one charge per key.

The first request claims the key with a unique row (user, key) before doing anything; a retry with the same body
gets the stored answer (never charged again), a different body gets 409, and a concurrent duplicate waits for
the first to finish. A failed first attempt releases the key so the retry really runs. Streams are not covered.

Each step is one Core statement, on PostgreSQL in autocommit (no BEGIN and COMMIT round trips): a first request
costs the database an `INSERT ... ON CONFLICT DO NOTHING` and an UPDATE, each retried on a lost connection.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import orjson
from flask import Response, g, request
from sqlalchemy import Connection, Row, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from parley_kit.db import Database, run_statement, utcnow
from parley_kit.errors import BadRequest, Conflict

from .models import IdempotencyRecord

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
REPLAYED_HEADER = "Idempotent-Replayed"
POLL_SECONDS = 0.05
T = TypeVar("T")
Executor = Session | Connection

# Each statement is built once, with bound parameters: building one per call (and its cache key) cost as much CPU as
# running it.
_columns = IdempotencyRecord.__table__.c
_this_key = (IdempotencyRecord.user_id == bindparam("p_user"), IdempotencyRecord.key == bindparam("p_key"))
_new_claim = {
    "user_id": bindparam("p_user"),
    "key": bindparam("p_key"),
    "request_hash": bindparam("p_hash"),
    "state": "pending",
    "created_at": bindparam("p_now", type_=_columns.created_at.type),
}
_CLAIM = {
    dialect: insert(IdempotencyRecord)
    .values(_new_claim)
    .on_conflict_do_nothing(index_elements=[IdempotencyRecord.user_id, IdempotencyRecord.key])
    .returning(IdempotencyRecord.key)
    for dialect, insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}
_LOOKUP = select(
    IdempotencyRecord.user_id,
    IdempotencyRecord.key,
    IdempotencyRecord.request_hash,
    IdempotencyRecord.state,
    IdempotencyRecord.status_code,
    IdempotencyRecord.response_body,
    IdempotencyRecord.created_at,
).where(*_this_key)
_TAKE_OVER = (
    update(IdempotencyRecord)
    .where(
        *_this_key,
        IdempotencyRecord.state == "pending",
        IdempotencyRecord.created_at == bindparam("p_claimed_at", type_=_columns.created_at.type),
    )
    .values(created_at=bindparam("p_now", type_=_columns.created_at.type), request_hash=bindparam("p_hash"))
    .execution_options(synchronize_session=False)
)
_STORE = (
    update(IdempotencyRecord)
    .where(*_this_key)
    .values(
        state="done",
        status_code=bindparam("p_status", type_=_columns.status_code.type),
        response_body=bindparam("p_body", type_=_columns.response_body.type),
    )
    .execution_options(synchronize_session=False)
)
_RELEASE = delete(IdempotencyRecord).where(*_this_key).execution_options(synchronize_session=False)


def request_hash(path: str, body: Any) -> str:
    """A fingerprint of the request: the route and the JSON body with its keys sorted (spacing does not count)."""
    return hashlib.sha256(path.encode() + b"\n" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def claim(session: Executor, *, user_id: str, key: str, fingerprint: str) -> bool:
    """Claim the key for this request (True), or False when someone holds or finished it (one statement)."""
    params = {"p_user": user_id, "p_key": key, "p_hash": fingerprint, "p_now": utcnow()}
    return session.execute(_CLAIM[_dialect(session)], params).first() is not None


def lookup(session: Executor, *, user_id: str, key: str) -> Row[Any] | None:
    """The key's row, if any (`user_id`, `key`, `request_hash`, `state`, `status_code`, `response_body`,
    `created_at`)."""
    return session.execute(_LOOKUP, {"p_user": user_id, "p_key": key}).one_or_none()


def take_over(session: Executor, *, record: Row[Any], fingerprint: str) -> bool:
    """Claim a pending key whose holder died (older than the wait); True if this request got it."""
    params = {
        "p_user": record.user_id,
        "p_key": record.key,
        "p_claimed_at": record.created_at,
        "p_now": utcnow(),
        "p_hash": fingerprint,
    }
    return session.execute(_TAKE_OVER, params).rowcount == 1  # type: ignore[attr-defined]


def store(session: Executor, *, user_id: str, key: str, status: int, body: bytes) -> None:
    """Keep the answer for replays."""
    session.execute(_STORE, {"p_user": user_id, "p_key": key, "p_status": status, "p_body": body})


def release(session: Executor, *, user_id: str, key: str) -> None:
    """Forget a claim whose request failed, so a retry runs for real."""
    session.execute(_RELEASE, {"p_user": user_id, "p_key": key})


def claim_many(session: Executor, *, user_id: str, fingerprints: dict[str, str]) -> set[str]:
    """Claim several keys for their requests (key → fingerprint) in one multi-row INSERT; the keys claimed (the
    others are held or finished by someone: `claim_or_replay` sorts each out)."""
    now = utcnow()
    rows = [{"p_user": user_id, "p_key": key, "p_hash": hash_, "p_now": now} for key, hash_ in fingerprints.items()]
    return set(session.execute(_CLAIM[_dialect(session)], rows).scalars())


def settle_many(db: Database, *, user_id: str, answers: dict[str, bytes | None]) -> None:
    """`settle_claim` for several keys (key → the 200 answer, or None to release), one statement per kind."""
    kept = [
        {"p_user": user_id, "p_key": key, "p_status": 200, "p_body": body}
        for key, body in answers.items()
        if body is not None
    ]
    released = [{"p_user": user_id, "p_key": key} for key, body in answers.items() if body is None]

    def write(connection: Connection) -> None:
        if kept:
            connection.execute(_STORE, kept)
        if released:
            connection.execute(_RELEASE, released)

    if kept or released:
        finish_claim(db, write)


def finish_claim(db: Database, write: Callable[[Connection], None]) -> None:
    """Store or release a claim, retried on a fresh connection when the database drops one (both writes are
    idempotent). Left pending otherwise (logged): a duplicate then waits, and the claim is taken over once stale —
    the answer already made is still the client's."""
    try:
        run_statement(db.engine, write)
    except Exception:
        log.exception("could not finish an idempotency claim")


def replay(record: Row[Any]) -> Response:
    """The stored answer, marked as a replay."""
    return Response(
        record.response_body or b"",
        status=record.status_code or 200,
        mimetype="application/json",
        headers={REPLAYED_HEADER: "true"},
    )


def claim_or_replay(
    db: Database, *, user_id: str, key: str, fingerprint: str, wait: float, stale_after: float
) -> Row[Any] | None:
    """Claim the key for this request (None), or the finished record to replay. 409 when the key was used with
    another request, or is still held by one after `wait` seconds; a claim older than `stale_after` is taken over."""
    deadline = time.monotonic() + wait
    while True:
        if run_statement(db.engine, lambda c: claim(c, user_id=user_id, key=key, fingerprint=fingerprint)):
            return None
        record = run_statement(db.engine, lambda c: lookup(c, user_id=user_id, key=key))
        if record is None:
            continue  # released between our insert and our read: claim again
        if record.request_hash != fingerprint:
            raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_key_reused")
        if record.state == "done":
            return record
        if record.created_at < utcnow() - timedelta(seconds=stale_after) and run_statement(
            db.engine, functools.partial(take_over, record=record, fingerprint=fingerprint)
        ):
            return None
        if time.monotonic() > deadline:
            raise Conflict("a request with this Idempotency-Key is still in progress", code="idempotency_key_in_use")
        time.sleep(POLL_SECONDS)


def settle_claim(db: Database, *, user_id: str, key: str, answer: bytes | None) -> None:
    """Keep a 200 answer for replays, or release the key (`answer` None: the request failed) so a retry runs."""
    if answer is None:
        finish_claim(db, lambda session: release(session, user_id=user_id, key=key))
    else:
        finish_claim(db, lambda session: store(session, user_id=user_id, key=key, status=200, body=answer))


def checked_key(value: str | None) -> str | None:
    """The request's Idempotency-Key (None: none, or empty); 400 past 255 characters."""
    if value and len(value) > MAX_KEY_LENGTH:
        raise BadRequest("Idempotency-Key is longer than 255 characters", code="invalid_idempotency_key")
    return value or None


def idempotent(
    db: Database, *, wait: float, stale_after: float
) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Decorate a JSON route so a request with an Idempotency-Key (and no `stream`) runs at most once per user.

    A duplicate waits up to `wait` seconds for the first; a claim older than `stale_after` is taken over.
    """

    def decorate(view: Callable[..., Response]) -> Callable[..., Response]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Response:
            raw = request.get_json(silent=True)
            if not isinstance(raw, dict) or raw.get("stream"):
                return view(*args, **kwargs)
            key = checked_key(request.headers.get(HEADER))
            if key is None:
                return view(*args, **kwargs)
            user_id = g.identity.subject
            done = claim_or_replay(
                db,
                user_id=user_id,
                key=key,
                fingerprint=request_hash(request.path, raw),
                wait=wait,
                stale_after=stale_after,
            )
            if done is not None:
                return replay(done)
            try:
                response = view(*args, **kwargs)
            except BaseException:
                settle_claim(db, user_id=user_id, key=key, answer=None)
                raise
            kept = response.status_code == 200 and not response.is_streamed
            settle_claim(db, user_id=user_id, key=key, answer=response.get_data() if kept else None)
            return response

        return wrapper

    return decorate


def pending_count(session: Executor) -> int:
    """How many keys are claimed and unfinished (for tests and operators)."""
    return len(session.scalars(select(IdempotencyRecord.key).where(IdempotencyRecord.state == "pending")).all())


def _dialect(session: Executor) -> str:
    bind = session.get_bind() if isinstance(session, Session) else session
    return bind.dialect.name
