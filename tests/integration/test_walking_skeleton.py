"""Issue #2's slice, end to end through the gateway, as a new user with the official SDKs would do it."""

from __future__ import annotations

import io
import json
import time
from typing import TYPE_CHECKING

import anthropic
import openai
import requests

if TYPE_CHECKING:
    from conftest import Client, RunningPlatform


def openai_client(platform: RunningPlatform, client: Client) -> openai.OpenAI:
    """The official SDK pointed at the gateway with the user's API key (its retries off: failures must show)."""
    return openai.OpenAI(base_url=f"{platform.gateway}/v1", api_key=client.api_key, max_retries=0, timeout=30)


def test_register_token_and_key_shapes(platform: RunningPlatform) -> None:
    """The auth slice answers with the documented shapes through the gateway."""
    client = platform.new_client()
    assert client.api_key.startswith("sk-pl-")
    token = requests.post(
        f"{platform.gateway}/auth/token", json={"email": client.email, "password": client.password}, timeout=10
    ).json()
    assert token["token_type"] == "bearer"
    assert token["expires_in"] > 0
    assert token["refresh_token"] and token["access_token"].count(".") == 2
    keys = requests.get(
        f"{platform.gateway}/auth/api-keys", headers={"Authorization": f"Bearer {client.access_token}"}, timeout=10
    )
    assert keys.status_code == 200
    assert [key["id"] for key in keys.json()["data"]] == [client.key_id]
    assert client.api_key not in keys.text


def test_openai_sdk_chat_completion(platform: RunningPlatform, client: Client) -> None:
    """A non-streamed completion from an OpenAI-routed model via the fake provider."""
    completion = openai_client(platform, client).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello to Parley"}]
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0


def test_openai_sdk_chat_completion_stream(platform: RunningPlatform, client: Client) -> None:
    """A streamed completion arrives as chunks, with the usage chunk when asked for."""
    stream = openai_client(platform, client).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Stream to me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(content_chunks)


def test_anthropic_sdk_message(platform: RunningPlatform, client: Client) -> None:
    """The Anthropic SDK with x-api-key gets a message from an Anthropic-routed model."""
    sdk = anthropic.Anthropic(base_url=platform.gateway, api_key=client.api_key, max_retries=0, timeout=30)
    message = sdk.messages.create(
        model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "Hello Claude"}]
    )
    assert message.type == "message"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens > 0


def test_two_line_batch_completes(platform: RunningPlatform, client: Client) -> None:
    """A two-line batch goes through the files API, RabbitMQ and a worker, and its output matches by custom_id."""
    sdk = openai_client(platform, client)
    lines = [
        {
            "custom_id": f"request-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Batch line {n}"}]},
        }
        for n in (1, 2)
    ]
    payload = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = sdk.files.create(file=("input.jsonl", io.BytesIO(payload)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (2, 2, 0)
    assert batch.output_file_id
    output = [json.loads(line) for line in sdk.files.content(batch.output_file_id).text.splitlines() if line]
    assert sorted(line["custom_id"] for line in output) == ["request-1", "request-2"]
    for line in output:
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["message"]["content"]


def test_unauthenticated_call_is_refused_in_openai_shape(platform: RunningPlatform) -> None:
    """No key, a made-up key: 401 in the OpenAI error shape the SDK understands."""
    for key in ("sk-pl-" + "A" * 43, "not-a-key"):
        sdk = openai.OpenAI(base_url=f"{platform.gateway}/v1", api_key=key, max_retries=0)
        try:
            sdk.models.list()
        except openai.AuthenticationError as exc:
            assert exc.status_code == 401
            assert isinstance(exc.body, dict) and exc.body.get("message")
        else:
            raise AssertionError("an unknown key was accepted")
