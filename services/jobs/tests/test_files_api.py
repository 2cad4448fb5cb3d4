"""The Files API against a real database: upload validation, reading back, deleting, owner isolation."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient

from .conftest import chat_line, jsonl

pytestmark = pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)


def assert_openai_error(response: Any, status: int, *, says: str = "") -> dict[str, Any]:
    """The response is an OpenAI-shaped error with that status whose message contains `says`."""
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert says in error["message"]
    return error


def test_a_good_batch_file_is_stored_and_read_back(client: FlaskClient, upload: Callable, auth: Callable) -> None:
    content = jsonl([chat_line("a"), chat_line("b")])
    response = upload(content, filename="questions.jsonl")
    assert response.status_code == 200
    file = response.json
    assert file["id"].startswith("file-")
    assert file["object"] == "file"
    assert file["bytes"] == len(content)
    assert file["filename"] == "questions.jsonl"
    assert file["purpose"] == "batch"
    assert file["expires_at"] - file["created_at"] == 30 * 24 * 3600

    assert client.get(f"/v1/files/{file['id']}", headers=auth()).json == file
    raw = client.get(f"/v1/files/{file['id']}/content", headers=auth())
    assert raw.status_code == 200 and raw.data == content
    listing = client.get("/v1/files", headers=auth()).json
    assert listing["object"] == "list" and [f["id"] for f in listing["data"]] == [file["id"]]


def test_a_bad_line_is_a_400_naming_the_line(upload: Callable, client: FlaskClient, auth: Callable) -> None:
    error = assert_openai_error(upload(jsonl([chat_line("a"), "{oops"])), 400, says="line 2")
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json_line"
    assert client.get("/v1/files", headers=auth()).json["data"] == []  # nothing was stored


def test_a_duplicate_custom_id_is_refused(upload: Callable) -> None:
    error = assert_openai_error(upload(jsonl([chat_line("a"), chat_line("a")])), 400, says="line 2")
    assert error["code"] == "duplicate_custom_id"


def test_a_wrong_url_is_refused(upload: Callable) -> None:
    line = {**chat_line("a"), "url": "/v1/images/generations"}
    assert assert_openai_error(upload(jsonl([line])), 400, says="line 1")["code"] == "invalid_url"


def test_streaming_lines_are_refused(upload: Callable) -> None:
    assert_openai_error(upload(jsonl([chat_line("a", stream=True)])), 400, says="stream")


def test_too_many_lines_are_refused(upload: Callable) -> None:  # the test settings allow 5
    assert upload(jsonl([chat_line(str(i)) for i in range(5)])).status_code == 200
    error = assert_openai_error(upload(jsonl([chat_line(str(i)) for i in range(6)])), 400, says="more than 5")
    assert error["code"] == "too_many_requests_in_file"


def test_an_oversized_file_is_a_413(upload: Callable, client: FlaskClient, auth: Callable) -> None:
    # 4096 bytes allowed in the tests: one valid line padded past the limit
    big = jsonl([chat_line("a", "x" * 5000)])
    assert_openai_error(upload(big), 413, says="limited to 4096 bytes")
    # also when the multipart framing fits but the file itself is over the limit
    just_over = jsonl([chat_line("a", "x" * (4097 - len(jsonl([chat_line("a", "")]))))])
    assert len(just_over) == 4097
    assert_openai_error(upload(just_over), 413)
    assert client.get("/v1/files", headers=auth()).json["data"] == []


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"purpose": "batch"}, "file"),
        ({"file": b"{}"}, "purpose"),
        ({"purpose": "batch_output", "file": b"x"}, "purpose must be one of"),
    ],
)
def test_a_malformed_upload_is_a_400(client: FlaskClient, auth: Callable, fields: dict, says: str) -> None:
    data = {k: (io.BytesIO(v), "a.jsonl") if k == "file" else v for k, v in fields.items()}
    response = client.post("/v1/files", data=data, headers=auth(), content_type="multipart/form-data")
    assert_openai_error(response, 400, says=says)


def test_other_purposes_are_stored_unvalidated(upload: Callable) -> None:
    response = upload(b"not jsonl at all", purpose="user_data", filename="notes.txt")
    assert response.status_code == 200 and response.json["purpose"] == "user_data"
    assert response.json["expires_at"] is None


def test_no_token_is_a_401_before_the_body_is_read(client: FlaskClient, token_mint: Any) -> None:
    response = client.post("/v1/files", data={"purpose": "batch"}, content_type="multipart/form-data")
    assert_openai_error(response, 401, says="missing bearer token")
    bad = client.get("/v1/files", headers={"Authorization": "Bearer not-a-jwt"})
    assert_openai_error(bad, 401)


def test_deleted_files_are_gone(client: FlaskClient, upload: Callable, auth: Callable) -> None:
    file_id = upload(jsonl([chat_line("a")])).json["id"]
    response = client.delete(f"/v1/files/{file_id}", headers=auth())
    assert response.status_code == 200 and response.json == {"id": file_id, "object": "file", "deleted": True}
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert_openai_error(client.get(path, headers=auth()), 404, says="No such File object")
    assert_openai_error(client.delete(f"/v1/files/{file_id}", headers=auth()), 404)


def test_files_are_visible_only_to_their_owner(client: FlaskClient, upload: Callable, auth: Callable) -> None:
    file_id = upload(jsonl([chat_line("a")]), user="alice").json["id"]
    bob = auth("bob")
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ]:
        assert_openai_error(client.open(path, method=method, headers=bob), 404)
    assert client.get("/v1/files", headers=bob).json["data"] == []
    created = client.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        headers=bob,
    )
    assert_openai_error(created, 404)
    assert client.get(f"/v1/files/{file_id}", headers=auth("alice")).status_code == 200


def test_file_listing_pages_and_filters(client: FlaskClient, upload: Callable, auth: Callable) -> None:
    ids = [upload(jsonl([chat_line(str(i))])).json["id"] for i in range(3)]
    upload(b"notes", purpose="user_data")
    first = client.get("/v1/files?purpose=batch&limit=2", headers=auth()).json
    assert first["has_more"] is True and len(first["data"]) == 2
    rest = client.get(f"/v1/files?purpose=batch&limit=2&after={first['last_id']}", headers=auth()).json
    assert rest["has_more"] is False
    assert {f["id"] for f in first["data"] + rest["data"]} == set(ids)
    assert_openai_error(client.get("/v1/files?limit=0", headers=auth()), 400)
