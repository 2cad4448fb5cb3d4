"""The official SDKs, unmodified, against a model of the other family, through a real `parley_llm serve`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from sqlalchemy import create_engine, text

from parley_kit.db import upgrade
from parley_kit.testing import ServiceProcess, free_port, python_module
from parley_llm import MIGRATIONS_DIR

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLAUDE_WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def translate_db(postgres) -> str:  # type: ignore[no-untyped-def]
    """A database of its own for the served process."""
    url = postgres.create_database("llm_translate")
    upgrade(MIGRATIONS_DIR, url)
    return url


@pytest.fixture(scope="module")
def llm(fake_provider: str, translate_db: str, token_mint, provider_key: str, tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The llm service under gunicorn (one gevent worker) on a free port; yields its base URL."""
    port = free_port()
    env = {
        "LLM_BIND": f"127.0.0.1:{port}",
        "LLM_WORKERS": "1",
        "LLM_WORKER_CLASS": "gevent",
        "LLM_DATABASE_URL": translate_db,
        "LLM_OPENAI_BASE_URL": f"{fake_provider}/v1",
        "LLM_ANTHROPIC_BASE_URL": fake_provider,
        "LLM_OPENAI_API_KEY": provider_key,
        "LLM_ANTHROPIC_API_KEY": provider_key,
        "LLM_METRICS_DIR": str(tmp_path_factory.mktemp("metrics")),
        "PARLEY_JWKS_URL": token_mint.jwks_url,
        "PARLEY_ENV": "test",
    }
    process = ServiceProcess(
        "llm-translate",
        python_module("parley_llm", "serve"),
        env=env,
        log_dir=tmp_path_factory.mktemp("llm-translate"),
        ready_url=f"http://127.0.0.1:{port}/readyz",
    )
    process.start()
    yield f"http://127.0.0.1:{port}"
    process.stop()


def ledger(url: str, user: str, *, expected: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Poll until the user's ledger has `expected` rows (settled after the answer), then return them."""
    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as connection:
                query = text("SELECT * FROM usage_records WHERE user_id = :u ORDER BY id")
                found = [dict(r) for r in connection.execute(query, {"u": user}).mappings()]
            if len(found) >= expected or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
    finally:
        engine.dispose()


def test_openai_sdk_against_claude(llm: str, translate_db: str, token_mint) -> None:  # type: ignore[no-untyped-def]
    user = "xlate-openai"
    messages: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello from openai"}]
    with openai.OpenAI(base_url=f"{llm}/v1", api_key=token_mint.mint(user), max_retries=0, timeout=20) as sdk:
        answer = sdk.chat.completions.create(model="claude-haiku-4-5", messages=messages, max_tokens=50)
        assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
        assert answer.choices[0].message.content.startswith("Parley fake reply to: hello from openai")
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 16)

        chunks = list(
            sdk.chat.completions.create(
                model="claude-haiku-4-5", messages=messages, stream=True, stream_options={"include_usage": True}
            )
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
        )
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == 5

        # The SDK's own stream helper accumulates the chunks; it refuses a completion cut by the length limit.
        with sdk.chat.completions.stream(model="claude-haiku-4-5", messages=messages, max_tokens=4) as stream:
            with pytest.raises(openai.LengthFinishReasonError) as cut:
                stream.get_final_completion()
        assert cut.value.completion.choices[0].message.content.count(" ") == 3

        forced = {"type": "function", "function": {"name": "get_weather"}}
        called = sdk.chat.completions.create(
            model="claude-haiku-4-5", messages=messages, tools=[WEATHER], tool_choice=forced
        )
        [call] = called.choices[0].message.tool_calls or []
        assert called.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "fake-city"}
        follow_up = sdk.chat.completions.create(
            model="claude-haiku-4-5",
            messages=[
                *messages,
                called.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
            ],
            tools=[WEATHER],
        )
        assert follow_up.choices[0].finish_reason == "stop"

        with sdk.chat.completions.stream(
            model="claude-haiku-4-5", messages=messages, tools=[WEATHER], tool_choice=forced
        ) as stream:
            streamed = stream.get_final_completion()
        [streamed_call] = streamed.choices[0].message.tool_calls or []
        assert json.loads(streamed_call.function.arguments) == {"city": "fake-city"}
        assert streamed.choices[0].finish_reason == "tool_calls"
    rows = ledger(translate_db, user, expected=6)
    assert [(r["provider"], r["operation"], r["status"]) for r in rows] == [("anthropic", "chat", "ok")] * 6
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (5, 16)
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (5, 16)
    assert rows[2]["output_tokens"] == 4


def test_anthropic_sdk_against_gpt(llm: str, translate_db: str, token_mint) -> None:  # type: ignore[no-untyped-def]
    user = "xlate-anthropic"
    messages: list[Any] = [{"role": "user", "content": "hello from anthropic"}]
    sdk = anthropic.Anthropic(base_url=llm, api_key=None, auth_token=token_mint.mint(user), max_retries=0, timeout=20)
    with sdk:
        answer = sdk.messages.create(model="gpt-4o-mini", max_tokens=64, system="Be brief.", messages=messages)
        assert answer.type == "message" and answer.id.startswith("msg_") and answer.stop_reason == "end_turn"
        assert answer.content[0].type == "text"
        assert answer.content[0].text.startswith("Parley fake reply to: hello from anthropic")
        assert (answer.usage.input_tokens, answer.usage.output_tokens) == (5, 16)

        with sdk.messages.stream(model="gpt-4o-mini", max_tokens=64, system="Be brief.", messages=messages) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed == answer.content[0].text
        assert final.stop_reason == "end_turn"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 16)

        events = list(sdk.messages.create(model="gpt-4o-mini", max_tokens=3, messages=messages, stream=True))
        assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
        assert [e.type for e in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 3

        forced: Any = {"type": "tool", "name": "get_weather"}
        called = sdk.messages.create(
            model="gpt-4o-mini", max_tokens=64, messages=messages, tools=[CLAUDE_WEATHER], tool_choice=forced
        )
        assert called.stop_reason == "tool_use"
        [block] = called.content
        assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "fake-city"}
        follow_up = sdk.messages.create(
            model="gpt-4o-mini",
            max_tokens=64,
            tools=[CLAUDE_WEATHER],
            messages=[
                *messages,
                {"role": "assistant", "content": called.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "sunny"}]},
            ],
        )
        assert follow_up.stop_reason == "end_turn"

        with sdk.messages.stream(
            model="gpt-4o-mini", max_tokens=64, messages=messages, tools=[CLAUDE_WEATHER], tool_choice=forced
        ) as stream:
            tool_message = stream.get_final_message()
        [streamed_block] = tool_message.content
        assert streamed_block.type == "tool_use" and streamed_block.input == {"city": "fake-city"}
        assert tool_message.stop_reason == "tool_use"
    rows = ledger(translate_db, user, expected=6)
    assert [(r["provider"], r["operation"], r["status"]) for r in rows] == [("openai", "messages", "ok")] * 6
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (5, 16)
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (5, 16)


def test_sdk_errors_across_formats(llm: str, token_mint) -> None:  # type: ignore[no-untyped-def]
    token = token_mint.mint("xlate-errors")
    with openai.OpenAI(base_url=f"{llm}/v1", api_key=token, max_retries=0, timeout=20) as sdk:
        with pytest.raises(openai.BadRequestError):
            sdk.chat.completions.create(
                model="claude-haiku-4-5", messages=[{"role": "user", "content": "#fake:error=400"}]
            )
        stream = sdk.chat.completions.create(
            model="claude-haiku-4-5", messages=[{"role": "user", "content": "#fake:stream_error_after=2"}], stream=True
        )
        with pytest.raises(openai.APIError, match="Overloaded"):
            list(stream)
    sdk2 = anthropic.Anthropic(base_url=llm, api_key=None, auth_token=token, max_retries=0, timeout=20)
    with sdk2:
        with pytest.raises(anthropic.BadRequestError):
            sdk2.messages.create(
                model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "#fake:error=400"}]
            )
        with pytest.raises(anthropic.APIStatusError):
            with sdk2.messages.stream(
                model="gpt-4o-mini", max_tokens=64, messages=[{"role": "user", "content": "#fake:stream_error_after=2"}]
            ) as stream:
                stream.get_final_message()


def test_abandoned_translated_stream_is_charged_for_what_was_sent(llm: str, translate_db: str, token_mint) -> None:  # type: ignore[no-untyped-def]
    user = "xlate-abandon"
    slow = [{"role": "user", "content": "go slow #fake:chunk_delay_ms=50 #fake:tokens=200"}]
    sdk = anthropic.Anthropic(base_url=llm, api_key=None, auth_token=token_mint.mint(user), max_retries=0, timeout=20)
    with sdk, sdk.messages.stream(model="gpt-4o-mini", max_tokens=500, messages=slow) as stream:
        received = 0
        for _ in stream.text_stream:
            received += 1
            if received == 3:
                break
    rows = ledger(translate_db, user, expected=1)
    assert len(rows) == 1
    [row] = rows
    assert row["status"] == "cancelled" and row["provider"] == "openai"
    assert 3 <= row["output_tokens"] < 50 and row["input_tokens"] > 0
