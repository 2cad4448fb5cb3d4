"""Issue #4, "any model from either API": both official SDKs, unmodified, through the gateway with an API key,
against an OpenAI-routed and an Anthropic-routed model: plain, streamed and forced tool calls."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anthropic
import openai
import pytest

if TYPE_CHECKING:
    from conftest import Client, RunningPlatform

# One model of each family; each SDK talks to both (one of them through translation).
MODELS = ["gpt-4o-mini", "claude-haiku-4-5"]
OPENAI_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ANTHROPIC_TOOL: Any = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def openai_sdk(platform: RunningPlatform, client: Client) -> openai.OpenAI:
    """The official OpenAI SDK pointed at the gateway with the user's API key (retries off: failures must show)."""
    return openai.OpenAI(base_url=f"{platform.gateway}/v1", api_key=client.api_key, max_retries=0, timeout=30)


def anthropic_sdk(platform: RunningPlatform, client: Client) -> anthropic.Anthropic:
    """The official Anthropic SDK (it sends the key as `x-api-key`) pointed at the gateway."""
    return anthropic.Anthropic(base_url=platform.gateway, api_key=client.api_key, max_retries=0, timeout=30)


@pytest.mark.parametrize("model", MODELS)
def test_openai_sdk(platform: RunningPlatform, client: Client, model: str) -> None:
    """Chat completions, streamed with usage, and a forced tool call (plain and streamed) on either family."""
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello Parley"}]
    with openai_sdk(platform, client) as sdk:
        answer = sdk.chat.completions.create(model=model, messages=messages)
        assert answer.object == "chat.completion"
        assert answer.choices[0].message.content.startswith("Parley fake reply to: Hello Parley")
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None and answer.usage.completion_tokens == 16 and answer.usage.prompt_tokens == 4

        chunks = list(
            sdk.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answer.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 16)

        forced: Any = {"type": "function", "function": {"name": "get_weather"}}
        called = sdk.chat.completions.create(model=model, messages=messages, tools=[OPENAI_TOOL], tool_choice=forced)
        assert called.choices[0].finish_reason == "tool_calls"
        [call] = called.choices[0].message.tool_calls or []
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "fake-city"}

        with sdk.chat.completions.stream(
            model=model, messages=messages, tools=[OPENAI_TOOL], tool_choice=forced
        ) as stream:
            final = stream.get_final_completion()
        assert final.choices[0].finish_reason == "tool_calls"
        [streamed_call] = final.choices[0].message.tool_calls or []
        assert json.loads(streamed_call.function.arguments) == {"city": "fake-city"}


@pytest.mark.parametrize("model", MODELS)
def test_anthropic_sdk(platform: RunningPlatform, client: Client, model: str) -> None:
    """Messages with a system prompt, the streaming helper, and a forced tool use (plain and streamed)."""
    messages: Any = [{"role": "user", "content": "Hello Parley"}]
    with anthropic_sdk(platform, client) as sdk:
        answer = sdk.messages.create(model=model, max_tokens=64, system="Be brief.", messages=messages)
        assert answer.type == "message" and answer.stop_reason == "end_turn"
        assert answer.content[0].type == "text"
        assert answer.content[0].text.startswith("Parley fake reply to: Hello Parley")
        assert (answer.usage.input_tokens, answer.usage.output_tokens) == (4, 16)

        with sdk.messages.stream(model=model, max_tokens=64, system="Be brief.", messages=messages) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed == answer.content[0].text
        assert final.stop_reason == "end_turn"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (4, 16)

        forced: Any = {"type": "tool", "name": "get_weather"}
        called = sdk.messages.create(
            model=model, max_tokens=64, messages=messages, tools=[ANTHROPIC_TOOL], tool_choice=forced
        )
        assert called.stop_reason == "tool_use"
        [block] = called.content
        assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "fake-city"}

        with sdk.messages.stream(
            model=model, max_tokens=64, messages=messages, tools=[ANTHROPIC_TOOL], tool_choice=forced
        ) as stream:
            tool_message = stream.get_final_message()
        assert tool_message.stop_reason == "tool_use"
        [streamed_block] = tool_message.content
        assert streamed_block.type == "tool_use" and streamed_block.input == {"city": "fake-city"}


def test_upstream_errors_reach_each_sdk_in_its_own_shape(platform: RunningPlatform, client: Client) -> None:
    """A provider error on a translated call raises the client SDK's own error classes, mid-stream included."""
    with openai_sdk(platform, client) as sdk:
        with pytest.raises(openai.BadRequestError):
            sdk.chat.completions.create(
                model="claude-haiku-4-5", messages=[{"role": "user", "content": "x #fake:error=400"}]
            )
        stream = sdk.chat.completions.create(
            model="claude-haiku-4-5",
            messages=[{"role": "user", "content": "x #fake:stream_error_after=2"}],
            stream=True,
        )
        with pytest.raises(openai.APIError):
            list(stream)
    with anthropic_sdk(platform, client) as sdk2:
        with pytest.raises(anthropic.BadRequestError):
            sdk2.messages.create(
                model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "x #fake:error=400"}]
            )
        events = sdk2.messages.create(
            model="gpt-4o-mini",
            max_tokens=64,
            messages=[{"role": "user", "content": "x #fake:stream_error_after=2"}],
            stream=True,
        )
        with pytest.raises(anthropic.APIStatusError):
            list(events)
