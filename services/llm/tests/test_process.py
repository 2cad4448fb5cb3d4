"""A real `python -m parley_llm serve` (gunicorn + gevent) driven by the official openai and anthropic SDKs."""

from __future__ import annotations

import os
import time

import anthropic
import openai
import pytest
from sqlalchemy import create_engine, text


def ledger(url: str, user: str, *, expected: int, timeout: float = 10.0) -> list[dict]:
    """Poll until the user's ledger has `expected` rows (settled after the answer), then return them."""
    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as connection:
                found = [
                    dict(r)
                    for r in connection.execute(
                        text("SELECT * FROM usage_records WHERE user_id = :u ORDER BY id"), {"u": user}
                    ).mappings()
                ]
            if len(found) >= expected or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
    finally:
        engine.dispose()


def openai_client(llm, token: str) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{llm.base_url}/v1", api_key=token, max_retries=0, timeout=20)


def anthropic_client(llm, token: str) -> anthropic.Anthropic:  # type: ignore[no-untyped-def]
    return anthropic.Anthropic(base_url=llm.base_url, auth_token=token, api_key=None, max_retries=0, timeout=20)


USER_MSG = [{"role": "user", "content": "hello from the sdk"}]


def test_openai_sdk_chat_stream_embeddings_models(llm, llm_db: str, token_mint) -> None:  # type: ignore[no-untyped-def]
    user = "sdk-openai"
    with openai_client(llm, token_mint.mint(user)) as client:
        answer = client.chat.completions.create(model="gpt-4o-mini", messages=USER_MSG)
        assert answer.choices[0].message.content
        assert answer.usage is not None
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=USER_MSG, stream=True, stream_options={"include_usage": True}
            )
        )
        text_out = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text_out
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
        vectors = client.embeddings.create(model="text-embedding-3-small", input="some words")
        assert vectors.data[0].embedding
        models = {m.id: m.owned_by for m in client.models.list()}
        assert models["claude-3-5-haiku-latest"] == "anthropic"
    rows = ledger(llm_db, user, expected=3)
    assert [r["operation"] for r in rows] == ["chat", "chat", "embeddings"]
    assert rows[0]["input_tokens"] == answer.usage.prompt_tokens
    assert rows[0]["output_tokens"] == answer.usage.completion_tokens
    assert rows[0]["cost_usd"] > 0 and rows[1]["output_tokens"] == 16
    assert all(r["status"] == "ok" for r in rows)


def test_anthropic_sdk_messages(llm, llm_db: str, token_mint) -> None:  # type: ignore[no-untyped-def]
    user = "sdk-anthropic"
    with anthropic_client(llm, token_mint.mint(user)) as client:
        answer = client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=USER_MSG)
        assert answer.content[0].text
        with client.messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=USER_MSG) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed and final.usage.output_tokens == 16 and final.usage.input_tokens > 0
    rows = ledger(llm_db, user, expected=2)
    assert [(r["operation"], r["status"]) for r in rows] == [("messages", "ok"), ("messages", "ok")]
    assert rows[0]["output_tokens"] == answer.usage.output_tokens
    assert rows[1]["input_tokens"] == final.usage.input_tokens


def test_provider_429_is_an_openai_rate_limit_error(llm, llm_db: str, token_mint) -> None:  # type: ignore[no-untyped-def]
    user = "sdk-429"
    with openai_client(llm, token_mint.mint(user)) as client, pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x #fake:error=429 #fake:retry_after=3"}]
        )
    assert caught.value.response.headers["retry-after"] == "3"
    rows = ledger(llm_db, user, expected=1)
    assert len(rows) == 1 and rows[0]["status"] == "error"


def test_anthropic_errors_are_anthropic_errors(llm, token_mint) -> None:  # type: ignore[no-untyped-def]
    with anthropic_client(llm, token_mint.mint("sdk-a404")) as client, pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=8, messages=USER_MSG)


def fake_stats(fake_provider: str) -> dict:
    """The fake provider's counters (one worker, so one set)."""
    import urllib3

    return urllib3.PoolManager().request("GET", f"{fake_provider}/_fake/stats").json()


def test_abandoned_stream_is_charged_for_chunks_sent(llm, llm_db: str, token_mint, fake_provider: str) -> None:  # type: ignore[no-untyped-def]
    user = "sdk-abandon"
    disconnected_before = fake_stats(fake_provider)["streams_disconnected"]
    with openai_client(llm, token_mint.mint(user)) as client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "please go slow #fake:chunk_delay_ms=50 #fake:tokens=200"}],
            stream=True,
        )
        received = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
            if received == 3:
                break
        stream.close()
        closed_at = time.monotonic()
    # The upstream must see the disconnect within a second (llm closes its upstream response at once).
    while fake_stats(fake_provider)["streams_disconnected"] == disconnected_before:
        assert time.monotonic() - closed_at < 1.0, "the upstream never saw the client go away"
        time.sleep(0.02)
    rows = ledger(llm_db, user, expected=1)
    assert len(rows) == 1
    # Give a late duplicate a chance to show up: there must never be a second row.
    time.sleep(0.5)
    rows = ledger(llm_db, user, expected=2, timeout=0.5)
    assert len(rows) == 1
    [row] = rows
    assert row["status"] == "cancelled"
    assert 3 <= row["output_tokens"] < 50, row["output_tokens"]
    assert row["input_tokens"] > 0 and row["cost_usd"] > 0


def test_provider_key_never_leaks(llm, provider_key: str, fake_provider: str, token_mint) -> None:  # type: ignore[no-untyped-def]
    import urllib3

    http = urllib3.PoolManager()
    headers = {"Authorization": f"Bearer {token_mint.mint('sdk-leak')}", "Content-Type": "application/json"}
    bodies = []
    for payload in (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x #fake:error=400"}]}',
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x #fake:error=500"}]}',
        # Retried paths: a 429 with a short Retry-After, and a 529 on a model with a fallback.
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x #fake:error=429 #fake:retry_after=0"}]}',
        b'{"model":"claude-haiku-4-5","max_tokens":8,"messages":[{"role":"user","content":"x #fake:error=529"}]}',
        b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"x #fake:cut_after=2"}]}',
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}',
    ):
        bodies.append(http.request("POST", f"{llm.base_url}/v1/chat/completions", body=payload, headers=headers).data)
    bodies.append(http.request("GET", f"{llm.base_url}/metrics").data)
    for body in bodies:
        assert provider_key.encode() not in body
        assert fake_provider.encode() not in body
    log = llm.log_path.read_text()
    assert "llm call" in log and "gen_ai" in log
    assert provider_key not in log
    assert "hello" not in log  # no prompt text unless log_prompts


def test_metrics_use_the_genai_names(llm, token_mint) -> None:  # type: ignore[no-untyped-def]
    import urllib3

    with openai_client(llm, token_mint.mint("sdk-metrics")) as client:
        list(client.chat.completions.create(model="gpt-4o-mini", messages=USER_MSG, stream=True))
    body = urllib3.PoolManager().request("GET", f"{llm.base_url}/metrics").data.decode()
    assert "gen_ai_client_operation_duration_seconds_bucket" in body
    assert 'gen_ai_token_type="output"' in body
    assert "gen_ai_client_operation_time_to_first_chunk_seconds" in body
    assert "parley_cost_usd_total" in body
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None  # the test process itself stays single-process
