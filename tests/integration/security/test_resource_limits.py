"""OWASP API4 (unrestricted resource consumption): oversized bodies, runaway JSON nesting, too many batch lines,
absurd max_tokens, oversized pages and too many requests each get a clear 4xx in the route's own error shape."""

from __future__ import annotations

import http.client
import io
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import jwt
import pytest

if TYPE_CHECKING:
    from conftest import Admin, Http, RunningPlatform

LIMITED_BODY_BYTES = 256 * 1024  # the limited gateway's GATEWAY_MAX_BODY_BYTES (conftest)
DEFAULT_BODY_BYTES = 16 * 1024 * 1024  # the platform gateway's default
DEEP = 100_000  # levels of nesting: far past any JSON parser's recursion limit
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi #fake:tokens=1"}]}
MESSAGES = {"model": "claude-3-5-haiku-latest", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def padded(body: dict[str, Any], size: int) -> bytes:
    """`body` as JSON, grown past `size` bytes with many messages (what "too many messages" costs on the wire)."""
    message = {"role": "user", "content": "x" * 100}
    count = size // len(json.dumps(message)) + 10
    grown = {**body, "messages": [message] * count + body["messages"]}
    data = json.dumps(grown).encode()
    assert len(data) > size
    return data


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_over_the_limit_are_413_in_each_shape(
    platform: RunningPlatform, http: Http, limited_gateway: str, chunked: bool
) -> None:
    """Past the gateway's body limit — declared or streamed chunked — every family of route answers 413 in its own
    shape: OpenAI on chat and files, Anthropic's request_too_large on messages, problem+json on auth."""
    client = platform.new_client()
    key = {**bearer(client.api_key), "Content-Type": "application/json"}
    form = {**bearer(client.api_key), "Content-Type": "multipart/form-data; boundary=x"}
    big = "x" * LIMITED_BODY_BYTES
    cases = [
        ("/v1/chat/completions", padded(CHAT, LIMITED_BODY_BYTES), key),
        ("/v1/messages", padded(MESSAGES, LIMITED_BODY_BYTES), key),
        ("/v1/embeddings", json.dumps({"model": "text-embedding-3-small", "input": big}).encode(), key),
        ("/v1/files", big.encode() + b"x", form),
        ("/auth/register", json.dumps({"email": "a@example.com", "password": big}).encode(), {}),
    ]
    for path, data, headers in cases:

        def pieces(data: bytes = data) -> Iterator[bytes]:
            for start in range(0, len(data), 64 * 1024):
                yield data[start : start + 64 * 1024]

        answer = http.post(limited_gateway + path, data=pieces() if chunked else data, headers=headers)
        assert answer.status_code == 413, (path, answer.status_code, answer.text[:300])
        if path == "/v1/messages":
            assert answer.json()["error"]["type"] == "request_too_large"


def test_a_declared_length_over_the_default_limit_is_refused_before_the_body(platform: RunningPlatform) -> None:
    """On the platform's own gateway (16 MiB), a request declaring 17 MiB is answered 413 without the gateway
    waiting for a single byte of it."""
    client = platform.new_client()
    target = urlparse(platform.gateway)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        connection.putheader("Authorization", f"Bearer {client.api_key}")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(DEFAULT_BODY_BYTES + 1024 * 1024))
        connection.endheaders()
        answer = connection.getresponse()
        body = json.loads(answer.read())
    finally:
        connection.close()
    assert answer.status == 413
    assert body["error"]["type"] == "invalid_request_error" and str(DEFAULT_BODY_BYTES) in body["error"]["message"]


def deep_json(prefix: str) -> bytes:
    """A JSON object whose first field opens `DEEP` nested arrays."""
    return (prefix + "[" * DEEP + "]" * DEEP + "}").encode()


def test_runaway_nesting_is_a_400_everywhere(platform: RunningPlatform, http: Http, admin: Admin) -> None:
    """100,000 nested arrays in a JSON body is a 400 in the route's shape on every JSON route, through the gateway
    and straight at each service (it was a 500: RecursionError in the parser, fixed in parley_kit.app)."""
    client = platform.new_client()
    user_id = jwt.decode(client.access_token, options={"verify_signature": False})["sub"]
    routes = [
        ("POST", "/v1/chat/completions", "llm", client.api_key),
        ("POST", "/v1/messages", "llm", client.api_key),
        ("POST", "/v1/embeddings", "llm", client.api_key),
        ("POST", "/v1/batches", "jobs", client.api_key),
        ("PUT", f"/v1/budgets/users/{user_id}", "llm", admin.access_token),
        ("POST", "/auth/register", "auth", None),
        ("POST", "/auth/token", "auth", None),
        ("POST", "/auth/api-keys", "auth", client.access_token),
    ]
    refused = 0
    for method, path, service, credential in routes:
        for base, token in ((platform.gateway, credential), (platform.url(service), None)):
            if token is None and credential is not None:  # straight at a service: a login token, never an API key
                token = admin.access_token if "budgets" in path else client.access_token
            headers = {"Content-Type": "application/json", **(bearer(token) if token else {})}
            answer = http.request(method, base + path, data=deep_json('{"model": '), headers=headers)
            assert answer.status_code == 400, (base, path, answer.status_code, answer.text[:300])
            refused += 1
    assert refused == 2 * len(routes)


def upload(http: Http, base: str, key: str, content: bytes) -> Any:
    """POST /v1/files with purpose=batch."""
    return http.post(
        f"{base}/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", io.BytesIO(content))},
        headers=bearer(key),
    )


def test_batch_files_over_the_line_limit_or_too_deep_are_400(platform: RunningPlatform, http: Http) -> None:
    """A batch file of 50,001 requests (the limit is 50,000) and one whose line nests 100,000 deep are refused
    whole with a 400 naming the problem; nothing is stored."""
    client = platform.new_client()
    line = b'{"custom_id":"%d","method":"POST","url":"/v1/embeddings","body":{"model":"text-embedding-3-small"}}\n'
    too_many = b"".join(line % n for n in range(50_001))
    answer = upload(http, platform.gateway, client.api_key, too_many)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "too_many_requests_in_file", answer.text
    nested = (
        b'{"custom_id":"1","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":'
        + b"[" * DEEP
        + b"]" * DEEP
        + b"}}\n"
    )
    answer = upload(http, platform.gateway, client.api_key, nested)
    assert answer.status_code == 400, answer.text[:300]
    assert http.get(f"{platform.gateway}/v1/files", headers=bearer(client.api_key)).json()["data"] == []


def test_absurd_max_tokens_is_refused(platform: RunningPlatform, http: Http, admin: Admin) -> None:
    """max_tokens that is not a positive integer, or above the model's output ceiling (a trillion), is a 400 in the
    route's shape; the ceiling itself against a budget too small for it is refused before the provider is called
    (429 insufficient_quota), and nothing is spent."""
    client = platform.new_client()
    key = bearer(client.api_key)
    for value in (0, -1, "lots", 1.5, None, [1], 10**12):
        answer = http.post(f"{platform.gateway}/v1/messages", json={**MESSAGES, "max_tokens": value}, headers=key)
        assert answer.status_code == 400, (value, answer.text)
        answer = http.post(f"{platform.gateway}/v1/chat/completions", json={**CHAT, "max_tokens": value}, headers=key)
        if value is not None:
            assert answer.status_code == 400, (value, answer.text)
    user_id = jwt.decode(client.access_token, options={"verify_signature": False})["sub"]
    budget = f"{platform.gateway}/v1/budgets/users/{user_id}"
    limit = {"limit_usd": "0.001"}  # less than either model's full output ceiling costs
    assert http.request("PUT", budget, json=limit, headers=bearer(admin.access_token)).status_code == 200
    for path, body, ceiling in (("/v1/chat/completions", CHAT, 16384), ("/v1/messages", MESSAGES, 8192)):
        answer = http.post(f"{platform.gateway}{path}", json={**body, "max_tokens": ceiling}, headers=key)
        assert answer.status_code == 429, (path, answer.text)
        error = answer.json()["error"]
        assert error["type"] == ("insufficient_quota" if path == "/v1/chat/completions" else "rate_limit_error")
    after = http.get(budget, headers=key).json()
    assert after["spent_usd"] == 0 and after["reserved_usd"] == 0


def test_too_many_messages_are_refused(platform: RunningPlatform, http: Http) -> None:
    """More than 2,048 messages in one request is a 400 in the route's shape (OpenAI's own ceiling), not a call."""
    client = platform.new_client()
    many = [{"role": "user", "content": "hi"}] * 2049
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGES)):
        answer = http.post(f"{platform.gateway}{path}", json={**body, "messages": many}, headers=bearer(client.api_key))
        assert answer.status_code == 400, (path, answer.text[:300])
        assert "messages" in answer.text
    assert http.get(f"{platform.gateway}/v1/usage", headers=bearer(client.api_key)).json()["data"] == []


def test_pages_and_lists_are_bounded(platform: RunningPlatform, http: Http) -> None:
    """Page sizes past the documented maximum and key requests with too many models or a huge name are 400s."""
    client = platform.new_client()
    key = bearer(client.api_key)
    assert http.get(f"{platform.gateway}/v1/files", params={"limit": 10_001}, headers=key).status_code == 400
    assert http.get(f"{platform.gateway}/v1/batches", params={"limit": 101}, headers=key).status_code == 400
    login = bearer(client.access_token)
    too_many = {"name": "k", "allowed_models": [f"m{n}" for n in range(201)]}
    assert http.post(f"{platform.gateway}/auth/api-keys", json=too_many, headers=login).status_code == 400
    huge_name = {"name": "n" * 10_000}
    assert http.post(f"{platform.gateway}/auth/api-keys", json=huge_name, headers=login).status_code == 400


def test_too_many_requests_are_429_in_each_shape(platform: RunningPlatform, http: Http, limited_gateway: str) -> None:
    """With 3 requests per minute per key, the 4th is a 429 with Retry-After: OpenAI's shape on chat, Anthropic's on
    messages; the refused requests never reach llm (the key's usage counts 3)."""
    for path, body, kind in (
        ("/v1/chat/completions", CHAT, None),
        ("/v1/messages", MESSAGES, "rate_limit_error"),
    ):
        client = platform.new_client()
        statuses = [
            http.post(limited_gateway + path, json=body, headers=bearer(client.api_key)).status_code for _ in range(3)
        ]
        assert statuses == [200, 200, 200]
        refused = http.post(limited_gateway + path, json=body, headers=bearer(client.api_key))
        assert refused.status_code == 429, refused.text
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        error = refused.json()["error"]
        assert error["type"] == (kind or "rate_limit_error")
        usage = http.get(f"{platform.gateway}/v1/usage", headers=bearer(client.api_key)).json()["data"]
        assert sum(row["requests"] for row in usage) <= 3
