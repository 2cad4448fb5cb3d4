"""The Batch API against a real database: creation in one transaction, validation, reading, pagination,
cancellation and owner isolation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from parley_jobs import batches
from parley_jobs.models import Batch, BatchItem, OutboxEvent
from parley_kit.db import Database

from .conftest import chat_line, jsonl
from .test_files_api import assert_openai_error


def count(db: Database, model: type) -> int:
    with db.transaction() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_creating_a_batch_writes_batch_items_and_outbox(
    client: FlaskClient, db: Database, make_batch: Callable, auth: Callable
) -> None:
    batch = make_batch(3, metadata={"project": "demo"})
    assert batch["id"].startswith("batch_")
    assert batch["object"] == "batch"
    assert batch["status"] == "in_progress"
    assert batch["endpoint"] == "/v1/chat/completions" and batch["completion_window"] == "24h"
    assert batch["model"] == "gpt-4o-mini"
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert batch["metadata"] == {"project": "demo"}
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert batch["in_progress_at"] == batch["created_at"]
    assert batch["output_file_id"] is None and batch["completed_at"] is None
    with db.transaction() as session:
        items = session.scalars(select(BatchItem).order_by(BatchItem.line)).all()
        assert [(i.line, i.custom_id, i.status, i.batch_id) for i in items] == [
            (n, f"req-{n}", "pending", batch["id"]) for n in (1, 2, 3)
        ]
        assert all(i.id.startswith("batch_req_") for i in items)
        assert items[0].body["messages"][0]["content"] == "question 1"
        events = session.scalars(select(OutboxEvent)).all()
        assert [(e.type, e.payload, e.published_at) for e in events] == [
            ("batch.created", {"batch_id": batch["id"]}, None)
        ]
    assert client.get(f"/v1/batches/{batch['id']}", headers=auth()).json == batch


def test_batch_rows_commit_together_or_not_at_all(db: Database, client: FlaskClient, upload: Callable) -> None:
    file_id = upload(jsonl([chat_line("a"), chat_line("b")])).json["id"]

    class Abort(Exception):
        pass

    with pytest.raises(Abort), db.transaction() as session:
        batches.create_batch(
            session,
            owner="user-a",
            key_id=None,
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=None,
            max_lines=10,
        )
        assert session.scalar(select(func.count()).select_from(BatchItem)) == 2  # written, not yet committed
        raise Abort
    assert (count(db, Batch), count(db, BatchItem), count(db, OutboxEvent)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("change", "status", "says"),
    [
        ({"completion_window": "1h"}, 400, "completion_window"),
        ({"endpoint": "/v1/embeddings"}, 400, "does not match the batch endpoint"),
        ({"endpoint": "/v1/images/generations"}, 400, "endpoint"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "16"),
        ({"metadata": {"k" * 65: "v"}}, 400, "64"),
        ({"metadata": {"k": "v" * 513}}, 400, "512"),
        ({"input_file_id": "file-nope"}, 404, "No such File object"),  # the id is not echoed back
        ({"surprise": 1}, 400, "surprise"),
    ],
)
def test_bad_batch_requests_are_4xx(
    client: FlaskClient, upload: Callable, auth: Callable, db: Database, change: dict, status: int, says: str
) -> None:
    file_id = upload(jsonl([chat_line("a")])).json["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **change}
    assert_openai_error(client.post("/v1/batches", json=body, headers=auth()), status, says=says)
    assert count(db, Batch) == 0


def test_a_batch_needs_a_batch_file(client: FlaskClient, upload: Callable, auth: Callable) -> None:
    file_id = upload(b"notes", purpose="user_data").json["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert_openai_error(client.post("/v1/batches", json=body, headers=auth()), 400, says="purpose")


def test_a_non_json_body_is_a_400(client: FlaskClient, auth: Callable) -> None:
    response = client.post("/v1/batches", data="nope", headers={**auth(), "Content-Type": "application/json"})
    assert_openai_error(response, 400)


def test_request_counts_are_live(client: FlaskClient, db: Database, make_batch: Callable, auth: Callable) -> None:
    batch = make_batch(3)
    with db.transaction() as session:
        first, second = session.scalars(select(BatchItem.id).order_by(BatchItem.line).limit(2)).all()
        batches.record_result(session, item_id=first, succeeded=True, status_code=200, body={})
        batches.record_result(session, item_id=second, succeeded=False, status_code=400, body={})
    live = client.get(f"/v1/batches/{batch['id']}", headers=auth()).json
    assert live["request_counts"] == {"total": 3, "completed": 1, "failed": 1}
    assert live["status"] == "in_progress"


def test_batches_page_newest_first(client: FlaskClient, make_batch: Callable, auth: Callable) -> None:
    made = [make_batch(1)["id"] for _ in range(5)]
    make_batch(1, user="someone-else")
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        query = "/v1/batches?limit=2" + (f"&after={after}" if after else "")
        page = client.get(query, headers=auth()).json
        pages += 1
        assert page["object"] == "list"
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == 3
    assert seen == list(reversed(made))
    default = client.get("/v1/batches", headers=auth()).json
    assert len(default["data"]) == 5 and default["has_more"] is False
    for bad in ("limit=0", "limit=101", "after=batch_unknown"):
        assert_openai_error(client.get(f"/v1/batches?{bad}", headers=auth()), 400)


def test_batches_are_visible_only_to_their_owner(client: FlaskClient, make_batch: Callable, auth: Callable) -> None:
    batch_id = make_batch(2, user="alice")["id"]
    bob = auth("bob")
    assert_openai_error(client.get(f"/v1/batches/{batch_id}", headers=bob), 404, says="No such Batch object")
    assert_openai_error(client.post(f"/v1/batches/{batch_id}/cancel", headers=bob), 404)
    assert client.get("/v1/batches", headers=bob).json["data"] == []
    assert_openai_error(client.get(f"/v1/batches?after={batch_id}", headers=bob), 400)
    assert client.get(f"/v1/batches/{batch_id}", headers=auth("alice")).json["status"] == "in_progress"


def test_the_key_of_the_creating_token_is_kept_for_the_worker(
    client: FlaskClient, upload: Callable, auth: Callable, db: Database
) -> None:
    file_id = upload(jsonl([chat_line("a")])).json["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch_id = client.post("/v1/batches", json=body, headers=auth("user-a", key_id="key_123")).json["id"]
    with db.transaction() as session:
        assert session.get(Batch, batch_id).key_id == "key_123"  # type: ignore[union-attr]


def test_openapi_documents_the_routes(client: FlaskClient) -> None:
    spec = client.get("/openapi/openapi.json").json
    for path in ("/v1/files", "/v1/files/{file_id}/content", "/v1/batches", "/v1/batches/{batch_id}/cancel"):
        assert path in spec["paths"]
    assert "BatchObject" in spec["components"]["schemas"]
