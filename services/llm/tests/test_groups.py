"""`POST /internal/calls`, the batch worker's groups of calls (Flask test client, PostgreSQL, the real fake provider):
every call is admitted, charged and keyed on its own, as if it had come alone."""

from __future__ import annotations

from typing import Any

import pytest
import urllib3

from parley_kit.testing import TokenMint

CALLS = "/internal/calls"


def chat(text: str = "hello there", model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def call(body: dict[str, Any], key: str | None = None, path: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"path": path, "body": body, "idempotency_key": key}


def upstream_calls(fake_provider: str) -> int:
    stats = urllib3.PoolManager().request("GET", f"{fake_provider}/_fake/stats").json()
    return sum(stats["requests"].values())


@pytest.fixture
def acting(app, make_client, token_mint: TokenMint, user: str):  # type: ignore[no-untyped-def]
    """A client with the token the batch worker gets from auth: the user's, acted for by `jobs`."""
    return make_client(app, token_mint.mint(user, key_id="key-1", act={"sub": "jobs"}))


def test_each_call_is_answered_and_charged_once_and_a_repeat_is_replayed(acting, rows, fake_provider: str) -> None:  # type: ignore[no-untyped-def]
    group = {"calls": [call(chat(f"question {i}"), key=f"item-{i}") for i in range(3)]}
    before = upstream_calls(fake_provider)
    first = acting.post(CALLS, json=group)
    assert first.status_code == 200, first.json
    answers = first.json["data"]
    assert [a["status_code"] for a in answers] == [200, 200, 200]
    assert [a["body"]["object"] for a in answers] == ["chat.completion"] * 3
    assert len({a["request_id"] for a in answers}) == 3
    assert upstream_calls(fake_provider) - before == 3
    assert sorted(r["request_id"] for r in rows()) == sorted(a["request_id"] for a in answers)

    again = acting.post(CALLS, json=group)  # a redelivered group: every key is finished
    assert [a["body"] for a in again.json["data"]] == [a["body"] for a in answers]
    assert upstream_calls(fake_provider) - before == 3
    assert len(rows()) == 3


def test_a_failing_call_fails_alone_in_its_routes_shape(app, make_client, token_mint, user, rows) -> None:  # type: ignore[no-untyped-def]
    client = make_client(app, token_mint.mint(user, act={"sub": "jobs"}, models=["gpt-4o-mini", "claude-haiku-4-5"]))
    message = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    assert client.post(CALLS, json={"calls": [call(chat("first"), key="used")]}).status_code == 200
    group = {
        "calls": [
            call(chat("fine"), key="k-ok"),
            call(chat(model="gpt-4o"), key="k-forbidden"),
            call(chat(model="no-such-model"), key="k-unknown"),
            call(chat("another body"), key="used"),
            call(chat("x #fake:error=400"), key="k-provider"),
            call({"model": "claude-haiku-4-5", "messages": []}, path="/v1/messages"),
            call(message, key="k-message", path="/v1/messages"),
            call({**chat(), "stream": True}, key="k-stream"),
            call({**chat(), "stream": "false"}, key="k-stream-text"),  # invalid, as on /v1 (not a stream)
        ]
    }
    answers = client.post(CALLS, json=group).json["data"]
    assert [a["status_code"] for a in answers] == [200, 403, 404, 409, 400, 400, 200, 400, 400]
    assert answers[1]["body"]["error"]["code"] == "model_not_allowed"
    assert answers[2]["body"]["error"]["code"] == "model_not_found"
    assert answers[3]["body"]["error"]["code"] == "idempotency_key_reused"
    assert answers[5]["body"]["type"] == "error"  # Anthropic's shape on /v1/messages
    assert answers[6]["body"]["type"] == "message"
    assert answers[7]["body"]["error"]["param"] == "stream"
    assert "cannot stream" not in answers[8]["body"]["error"]["message"]
    # charged: the first call, "fine", the message; the provider's 400 is a row with nothing charged
    assert sorted(r["status"] for r in rows()) == ["error", "ok", "ok", "ok"]

    retried = client.post(CALLS, json={"calls": [call(chat("x #fake:error=400"), key="k-provider")]})
    assert retried.json["data"][0]["status_code"] == 400  # the failed call released its key: it ran again
    assert sorted(r["status"] for r in rows()) == ["error", "error", "ok", "ok", "ok"]


def test_a_chat_call_to_a_model_of_the_other_family_is_translated(acting, rows) -> None:  # type: ignore[no-untyped-def]
    answer = acting.post(CALLS, json={"calls": [call(chat(model="claude-haiku-4-5"), key="k-bridge")]})
    (translated,) = answer.json["data"]
    assert translated["status_code"] == 200 and translated["body"]["object"] == "chat.completion"
    assert len(rows()) == 1


@pytest.mark.parametrize(
    "group",
    [
        {},
        {"calls": []},
        {"calls": [call(chat())] * 65},
        {"calls": [call(chat(), path="/v1/models")]},
        {"calls": [call(chat(), key="k" * 256)]},
        {"calls": [{**call(chat()), "extra": 1}]},
        {"calls": [call(chat())], "stream": True},
        {"calls": [call(chat("one"), key="same"), call(chat("two"), key="same")]},  # would run, and charge, twice
    ],
)
def test_a_malformed_group_is_400_and_runs_nothing(acting, rows, group: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    answer = acting.post(CALLS, json=group)
    assert answer.status_code == 400 and answer.headers["Content-Type"] == "application/problem+json"
    assert rows() == []


def test_only_a_service_acting_for_a_user_may_send_a_group(app, make_client, token_mint, user, rows) -> None:  # type: ignore[no-untyped-def]
    group = {"calls": [call(chat())]}
    assert make_client(app, None).post(CALLS, json=group).status_code == 401
    assert make_client(app, None).post(CALLS, json={"calls": "x" * 10_000}).status_code == 401  # before validation
    own = make_client(app, token_mint.mint(user)).post(CALLS, json=group)
    assert own.status_code == 403 and own.json["code"] == "actor_required"
    service = make_client(app, token_mint.mint("jobs", roles=("service",))).post(CALLS, json=group)
    assert service.status_code == 403
    assert rows() == []
