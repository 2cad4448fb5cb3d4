"""Idempotent batch creation, expiry at the end of the completion window, and the fair scheduler."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from parley_jobs import batches, create_app
from parley_jobs.models import Batch, BatchItem
from parley_jobs.settings import JobsSettings
from parley_kit.db import Database, utcnow

from .conftest import chat_line, jsonl
from .test_files_api import assert_openai_error
from .test_results import chat_response, item_ids, read_lines


def batch_body(file_id: str, **extra: Any) -> dict[str, Any]:
    return {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **extra}


def batch_count(db: Database) -> int:
    with db.transaction() as session:
        return session.scalar(select(func.count()).select_from(Batch)) or 0


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_the_same_idempotency_key_and_body_give_the_same_batch(
    client: FlaskClient, auth: Callable, upload: Callable, db: Database
) -> None:
    file_id = upload(jsonl([chat_line("a"), chat_line("b")])).json["id"]
    headers = {**auth(), "Idempotency-Key": "create-1"}
    first = client.post("/v1/batches", json=batch_body(file_id, metadata={"k": "v"}), headers=headers)
    again = client.post("/v1/batches", json=batch_body(file_id, metadata={"k": "v"}), headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json["id"] == first.json["id"]
    assert again.json["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    assert batch_count(db) == 1

    other = client.post("/v1/batches", json=batch_body(file_id, metadata={"k": "other"}), headers=headers)
    assert assert_openai_error(other, 409, says="different request body")["code"] == "idempotency_key_reused"
    # Keys are per owner, and no key means a new batch every time.
    someone_else = upload(jsonl([chat_line("a")]), user="user-b").json["id"]
    theirs = client.post(
        "/v1/batches", json=batch_body(someone_else), headers={**auth("user-b"), "Idempotency-Key": "create-1"}
    )
    assert theirs.status_code == 200 and theirs.json["id"] != first.json["id"]
    plain = client.post("/v1/batches", json=batch_body(file_id, metadata={"k": "v"}), headers=auth())
    assert plain.status_code == 200 and plain.json["id"] != first.json["id"]
    assert batch_count(db) == 3


def test_an_oversized_idempotency_key_is_a_400(client: FlaskClient, auth: Callable, upload: Callable) -> None:
    file_id = upload(jsonl([chat_line("a")])).json["id"]
    response = client.post("/v1/batches", json=batch_body(file_id), headers={**auth(), "Idempotency-Key": "k" * 256})
    assert response.status_code in (400, 422)
    assert "error" in response.json


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_a_batch_past_its_window_expires_keeping_its_finished_lines(
    client: FlaskClient, auth: Callable, make_batch: Callable, db: Database
) -> None:
    batch = make_batch(3)
    assert batch["expires_at"] - batch["created_at"] == 86_400  # the default "24h" window
    first, second, _third = item_ids(db, batch["id"])
    with db.transaction() as session:
        batches.record_result(session, item_id=first, succeeded=True, status_code=200, body=chat_response("a", 5, 2))
        batches.record_result(session, item_id=second, succeeded=False, status_code=400, body={"error": {}})
    with db.transaction() as session:
        assert batches.expire_due(session, now=utcnow()) == []  # not yet
    with db.transaction() as session:
        assert batches.expire_due(session, now=utcnow() + timedelta(days=1, seconds=1)) == [batch["id"]]
    with db.transaction() as session:
        assert batches.expire_due(session, now=utcnow() + timedelta(days=2)) == []  # only once

    expired = client.get(f"/v1/batches/{batch['id']}", headers=auth()).json
    assert expired["status"] == "expired" and expired["expired_at"] is not None
    assert expired["request_counts"] == {"total": 3, "completed": 1, "failed": 1}
    assert expired["usage"]["total_tokens"] == 7
    assert [line["custom_id"] for line in read_lines(client, auth, expired["output_file_id"])] == ["req-1"]
    errors = read_lines(client, auth, expired["error_file_id"])
    assert [(line["custom_id"], (line["error"] or {}).get("code")) for line in errors] == [
        ("req-2", None),
        ("req-3", "batch_expired"),
    ]
    # A worker finishing the expired line late changes nothing.
    with db.transaction() as session:
        assert not batches.record_result(session, item_id=_third, succeeded=True, status_code=200, body={})


def test_the_completion_window_length_comes_from_the_settings(
    make_settings: Callable[..., JobsSettings], auth: Callable
) -> None:
    app = create_app(make_settings(completion_window_seconds=30))
    try:
        client = app.test_client()
        file_id = client.post(
            "/v1/files",
            data={"purpose": "batch", "file": (io.BytesIO(jsonl([chat_line("a")])), "in.jsonl")},
            headers=auth(),
            content_type="multipart/form-data",
        ).json["id"]
        batch = client.post("/v1/batches", json=batch_body(file_id), headers=auth()).json
        assert batch["expires_at"] - batch["created_at"] == 30
    finally:
        app.extensions["parley_db"].dispose()


def schedule(session: Session, *, window: int) -> list[str]:
    """What a relay pass queues, one item per message: the scheduled ids, stamped queued (as after their publish)."""
    groups = batches.schedule(session, window=window)
    assert all(len(group) == 1 for group in groups)
    item_ids = [item_id for (item_id,) in groups]
    batches.mark_queued(session, item_ids, now=utcnow())
    return item_ids


def finish(db: Database, ids: list[str]) -> None:
    with db.transaction() as session:
        for item_id in ids:
            batches.record_result(session, item_id=item_id, succeeded=True, status_code=200, body={})


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_the_scheduler_keeps_a_window_per_owner_and_interleaves_owners(db: Database, make_batch: Callable) -> None:
    big = item_ids(db, make_batch(5, user="big")["id"])  # max_lines is 5 in the test settings
    big2 = item_ids(db, make_batch(5, user="big")["id"])
    with db.transaction() as session:
        assert schedule(session, window=3) == big[:3]
    small = item_ids(db, make_batch(2, user="small")["id"])
    with db.transaction() as session:
        # big's window is full: only the newcomer's lines go out, at once.
        assert schedule(session, window=3) == small
    finish(db, big[:2])
    with db.transaction() as session:
        assert schedule(session, window=3) == big[3:5]
    finish(db, big[2:5] + small)
    with db.transaction() as session:
        # An owner's batches go in creation order; the next owner's line is interleaved with them.
        assert schedule(session, window=3) == big2[:3]
    with db.transaction() as session:
        assert schedule(session, window=3) == []


def test_new_owners_are_interleaved_line_by_line(db: Database, make_batch: Callable) -> None:
    a = item_ids(db, make_batch(3, user="a")["id"])
    b = item_ids(db, make_batch(2, user="b")["id"])
    with db.transaction() as session:
        assert schedule(session, window=10) == [a[0], b[0], a[1], b[1], a[2]]


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_groups_hold_one_batchs_items_and_owners_are_interleaved_group_by_group(
    db: Database, make_batch: Callable
) -> None:
    a1 = item_ids(db, make_batch(5, user="a")["id"])
    a2 = item_ids(db, make_batch(2, user="a")["id"])
    b = item_ids(db, make_batch(3, user="b")["id"])
    with db.transaction() as session:
        # a's window (6) takes a1 whole and one line of a2: a group never mixes batches.
        assert batches.schedule(session, window=6, group=2) == [a1[0:2], b[0:2], a1[2:4], b[2:], a1[4:], a2[:1]]


def test_cancelled_and_finished_batches_are_not_scheduled(
    db: Database, client: FlaskClient, auth: Callable, make_batch: Callable
) -> None:
    cancelled = make_batch(2)
    client.post(f"/v1/batches/{cancelled['id']}/cancel", headers=auth())
    running = item_ids(db, make_batch(1)["id"])
    with db.transaction() as session:
        session.execute(update(BatchItem).where(BatchItem.id == running[0]).values(queued_at=None))
        assert schedule(session, window=10) == running
