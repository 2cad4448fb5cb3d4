"""`Idempotency-Key` on non-streamed completions and messages: one upstream call and one charge per key.

The first request claims the key with a unique row (user, key) before doing anything; a retry with the same body
gets the stored answer (never charged again), a different body gets 409, and a concurrent duplicate waits for
the first to finish. A failed first attempt releases the key so the retry really runs. Streams are not covered.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson
from flask import Response, g, request
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from parley_kit.db import Database, retry_lost_connection, utcnow
from parley_kit.errors import BadRequest, Conflict

from .models import IdempotencyRecord

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
POLL_SECONDS = 0.05


def request_hash(path: str, body: Any) -> str:
    """A fingerprint of the request: the route and the JSON body with its keys sorted (spacing does not count)."""
    return hashlib.sha256(path.encode() + b"\n" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def claim(session: Session, *, user_id: str, key: str, fingerprint: str) -> bool:
    """Claim the key for this request (True), or False when someone holds or finished it."""
    session.add(IdempotencyRecord(user_id=user_id, key=key, request_hash=fingerprint, state="pending"))
    try:
        session.flush()
    except IntegrityError:
        return False
    return True


def lookup(session: Session, *, user_id: str, key: str) -> IdempotencyRecord | None:
    """The key's row, if any."""
    return session.get(IdempotencyRecord, (user_id, key))


def take_over(session: Session, *, record: IdempotencyRecord, fingerprint: str) -> bool:
    """Claim a pending key whose holder died (older than the wait); True if this request got it."""
    result = session.execute(
        update(IdempotencyRecord)
        .where(
            IdempotencyRecord.user_id == record.user_id,
            IdempotencyRecord.key == record.key,
            IdempotencyRecord.state == "pending",
            IdempotencyRecord.created_at == record.created_at,
        )
        .values(created_at=utcnow(), request_hash=fingerprint)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def store(session: Session, *, user_id: str, key: str, status: int, body: bytes) -> None:
    """Keep the answer for replays."""
    session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key)
        .values(state="done", status_code=status, response_body=body)
    )


def release(session: Session, *, user_id: str, key: str) -> None:
    """Forget a claim whose request failed, so a retry runs for real."""
    session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key))


def finish_claim(db: Database, write: Callable[[Session], None]) -> None:
    """Store or release a claim, retried on a fresh connection when the database drops one (both writes are
    idempotent). Left pending otherwise (logged): a duplicate then waits, and the claim is taken over once stale —
    the answer already made is still the client's."""

    def transaction() -> None:
        with db.transaction() as session:
            write(session)

    try:
        retry_lost_connection(transaction)
    except Exception:
        log.exception("could not finish an idempotency claim")


def replay(record: IdempotencyRecord) -> Response:
    """The stored answer, marked as a replay."""
    return Response(
        record.response_body or b"",
        status=record.status_code or 200,
        mimetype="application/json",
        headers={REPLAYED_HEADER: "true"},
    )


def idempotent(
    db: Database, *, wait: float, stale_after: float
) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Decorate a JSON route so a request with an Idempotency-Key (and no `stream`) runs at most once per user.

    A duplicate waits up to `wait` seconds for the first; a claim older than `stale_after` is taken over.
    """

    def decorate(view: Callable[..., Response]) -> Callable[..., Response]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Response:
            key = request.headers.get(HEADER)
            raw = request.get_json(silent=True)
            if not key or not isinstance(raw, dict) or raw.get("stream"):
                return view(*args, **kwargs)
            if len(key) > 255:
                raise BadRequest("Idempotency-Key is longer than 255 characters", code="invalid_idempotency_key")
            user_id, fingerprint = g.identity.subject, request_hash(request.path, raw)
            deadline = time.monotonic() + wait
            while True:
                with db.transaction() as session:
                    if claim(session, user_id=user_id, key=key, fingerprint=fingerprint):
                        break
                with db.transaction() as session:
                    record = lookup(session, user_id=user_id, key=key)
                    if record is None:
                        continue  # released between our insert and our read: claim again
                    if record.request_hash != fingerprint:
                        raise Conflict(
                            "this Idempotency-Key was used with a different request", code="idempotency_key_reused"
                        )
                    if record.state == "done":
                        return replay(record)
                    if record.created_at < utcnow() - timedelta(seconds=stale_after) and take_over(
                        session, record=record, fingerprint=fingerprint
                    ):
                        break
                if time.monotonic() > deadline:
                    raise Conflict(
                        "a request with this Idempotency-Key is still in progress", code="idempotency_key_in_use"
                    )
                time.sleep(POLL_SECONDS)
            try:
                response = view(*args, **kwargs)
            except BaseException:
                finish_claim(db, lambda session: release(session, user_id=user_id, key=key))
                raise
            if response.status_code == 200 and not response.is_streamed:
                body = response.get_data()
                finish_claim(db, lambda session: store(session, user_id=user_id, key=key, status=200, body=body))
            else:
                finish_claim(db, lambda session: release(session, user_id=user_id, key=key))
            return response

        return wrapper

    return decorate


def pending_count(session: Session) -> int:
    """How many keys are claimed and unfinished (for tests and operators)."""
    return len(session.scalars(select(IdempotencyRecord.key).where(IdempotencyRecord.state == "pending")).all())
