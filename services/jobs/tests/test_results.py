"""Item results written once, finalisation into OpenAI output/error files exactly once, and cancellation."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from parley_jobs import batches
from parley_jobs.models import BatchItem, File
from parley_kit.db import Database

from .test_files_api import assert_openai_error


def item_ids(db: Database, batch_id: str) -> list[str]:
    with db.transaction() as session:
        query = select(BatchItem.id).where(BatchItem.batch_id == batch_id).order_by(BatchItem.line)
        return list(session.scalars(query))


def chat_response(text: str, prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def read_lines(client: FlaskClient, auth: Callable, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    response = client.get(f"/v1/files/{file_id}/content", headers=auth())
    assert response.status_code == 200
    return [orjson.loads(line) for line in response.data.splitlines()]


def test_a_result_is_written_once(db: Database, make_batch: Callable) -> None:
    first, *_ = item_ids(db, make_batch(2)["id"])
    with db.transaction() as session:
        assert batches.record_result(session, item_id=first, succeeded=True, status_code=200, body={"n": 1})
    with db.transaction() as session:  # a redelivery of the same item
        assert not batches.record_result(session, item_id=first, succeeded=False, status_code=500, body={"n": 2})
    with db.transaction() as session:
        item = session.get(BatchItem, first)
        assert item is not None
        assert (item.status, item.response_status, item.response_body) == ("succeeded", 200, {"n": 1})
        assert item.finished_at is not None


def test_a_finished_item_is_not_started_again(db: Database, make_batch: Callable) -> None:
    batch_id = make_batch(1)["id"]
    (item_id,) = item_ids(db, batch_id)
    with db.transaction() as session:
        found, work = batches.start_item(session, item_id=item_id)
    assert found == batch_id and work is not None and work.attempts == 1 and work.owner == "user-a"
    assert work.endpoint == "/v1/chat/completions" and work.body["model"] == "gpt-4o-mini"
    with db.transaction() as session:
        batches.record_result(session, item_id=item_id, succeeded=True, status_code=200, body={})
    with db.transaction() as session:
        assert batches.start_item(session, item_id=item_id) == (batch_id, None)
        assert batches.start_item(session, item_id="batch_req_unknown") == (None, None)


def test_finalising_writes_output_and_error_files(
    db: Database, client: FlaskClient, auth: Callable, make_batch: Callable
) -> None:
    batch = make_batch(3)
    ok, bad_request, broken = item_ids(db, batch["id"])
    with db.transaction() as session:
        batches.record_result(
            session, item_id=ok, succeeded=True, status_code=200, request_id="req_1", body=chat_response("hi", 10, 5, 2)
        )
        error_body = {"error": {"message": "unknown model", "type": "invalid_request_error"}}
        batches.record_result(session, item_id=bad_request, succeeded=False, status_code=404, body=error_body)
        assert batches.finalize_if_done(session, batch_id=batch["id"]) is None  # one item still pending
    with db.transaction() as session:
        batches.record_result(
            session, item_id=broken, succeeded=False, error={"code": "timeout", "message": "llm did not answer"}
        )
    with db.transaction() as session:
        assert batches.finalize_if_done(session, batch_id=batch["id"]) == "completed"
    with db.transaction() as session:
        assert batches.finalize_if_done(session, batch_id=batch["id"]) is None  # exactly once

    done = client.get(f"/v1/batches/{batch['id']}", headers=auth()).json
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert done["completed_at"] is not None and done["finalizing_at"] is not None
    assert done["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 2},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    }
    assert read_lines(client, auth, done["output_file_id"]) == [
        {
            "id": ok,
            "custom_id": "req-1",
            "response": {"status_code": 200, "request_id": "req_1", "body": chat_response("hi", 10, 5, 2)},
            "error": None,
        }
    ]
    assert read_lines(client, auth, done["error_file_id"]) == [
        {
            "id": bad_request,
            "custom_id": "req-2",
            "response": {"status_code": 404, "request_id": None, "body": error_body},
            "error": None,
        },
        {
            "id": broken,
            "custom_id": "req-3",
            "response": None,
            "error": {"code": "timeout", "message": "llm did not answer"},
        },
    ]
    output = client.get(f"/v1/files/{done['output_file_id']}", headers=auth()).json
    assert output["purpose"] == "batch_output" and output["filename"] == f"{batch['id']}_output.jsonl"


def test_several_workers_finalise_a_batch_once(db: Database, make_batch: Callable) -> None:
    batch_id = make_batch(2)["id"]
    with db.transaction() as session:
        for item_id in item_ids(db, batch_id):
            batches.record_result(session, item_id=item_id, succeeded=True, status_code=200, body={})
    results: list[str | None] = []
    start = threading.Barrier(4)

    def finalise() -> None:
        start.wait()
        with db.transaction() as session:
            results.append(batches.finalize_if_done(session, batch_id=batch_id))

    threads = [threading.Thread(target=finalise) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results, key=str) == [None, None, None, "completed"]
    with db.transaction() as session:
        assert session.scalar(select(func.count()).where(File.purpose == "batch_output")) == 1


def test_cancelling_a_batch_nobody_started_ends_it_at_once(
    db: Database, client: FlaskClient, auth: Callable, make_batch: Callable
) -> None:
    batch = make_batch(2)
    response = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth())
    assert response.status_code == 200
    cancelled = response.json
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelling_at"] is not None and cancelled["cancelled_at"] is not None
    assert cancelled["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    assert cancelled["output_file_id"] is None
    lines = read_lines(client, auth, cancelled["error_file_id"])
    assert [(line["custom_id"], line["error"]["code"], line["response"]) for line in lines] == [
        ("req-1", "batch_cancelled", None),
        ("req-2", "batch_cancelled", None),
    ]
    # Cancelling again is harmless; the worker later finds nothing to run.
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth()).json["status"] == "cancelled"
    with db.transaction() as session:
        assert batches.start_item(session, item_id=item_ids(db, batch["id"])[0])[1] is None


def test_cancelling_waits_for_started_items_and_keeps_their_output(
    db: Database, client: FlaskClient, auth: Callable, make_batch: Callable
) -> None:
    batch = make_batch(3)
    started, queued, _ = item_ids(db, batch["id"])
    with db.transaction() as session:
        assert batches.start_item(session, item_id=started)[1] is not None  # a worker is running it
    cancelling = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth()).json
    assert cancelling["status"] == "cancelling"
    with db.transaction() as session:  # a message still in the queue is skipped, not run
        assert batches.start_item(session, item_id=queued) == (batch["id"], None)
    with db.transaction() as session:
        batches.record_result(session, item_id=started, succeeded=True, status_code=200, body=chat_response("x", 3, 4))
    with db.transaction() as session:
        assert batches.finalize_if_done(session, batch_id=batch["id"]) == "cancelled"
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth()).json
    assert done["status"] == "cancelled" and done["request_counts"]["completed"] == 1
    assert [line["custom_id"] for line in read_lines(client, auth, done["output_file_id"])] == ["req-1"]
    assert {line["custom_id"] for line in read_lines(client, auth, done["error_file_id"])} == {"req-2", "req-3"}
    assert done["usage"]["total_tokens"] == 7


def test_a_finished_batch_cannot_be_cancelled(db: Database, client: FlaskClient, auth: Callable, make_batch: Callable):
    batch_id = make_batch(1)["id"]
    with db.transaction() as session:
        batches.record_result(session, item_id=item_ids(db, batch_id)[0], succeeded=True, status_code=200, body={})
    with db.transaction() as session:
        batches.finalize_if_done(session, batch_id=batch_id)
    assert_openai_error(client.post(f"/v1/batches/{batch_id}/cancel", headers=auth()), 409, says="completed")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"usage": {"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 2}}, (9, 2, 3, 0)),
        ({"usage": {"prompt_tokens": 5, "total_tokens": 5}}, (5, 0, 0, 0)),
        ({"usage": {"prompt_tokens": 1, "completion_tokens_details": {"reasoning_tokens": 1}}}, (1, 0, 0, 1)),
        ({"no": "usage"}, (0, 0, 0, 0)),
    ],
)
def test_usage_is_summed_from_either_api_shape(body: dict, expected: tuple[int, ...]) -> None:
    totals = {"input_tokens": 0, "cached_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0}
    batches._add_usage(totals, body)
    assert tuple(totals.values()) == expected
