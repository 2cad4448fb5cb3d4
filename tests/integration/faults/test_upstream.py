"""Fault 4: an upstream that hangs, cuts a stream, or answers garbage. Our llm (its own database, short timeouts)
talks to a raw socket server that misbehaves on purpose; the client must get a clear 502/504 in the API's own shape
(or, once a stream has started, the API's own error event), never a 500, and the ledger must charge only what the
client was sent."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest

from parley_kit.testing import TokenMint

from .conftest import (
    OwnLlm,
    RawUpstream,
    assert_anthropic_error,
    assert_openai_error,
    call,
    content_deltas,
    figure,
    final_error,
    sse,
)


def only_row(llm: OwnLlm, user: str) -> Any:
    """The user's single ledger row (one client call, one row however many upstream attempts)."""
    rows = llm.usage(user)
    assert len(rows) == 1, rows
    return rows[0]


NON_STREAM_FAULTS = {
    # mode: the statuses a client may see (504 for a timeout, 502 for a broken or unreadable answer)
    "hang": (504,),
    "close": (502,),
    "html": (502,),
    "text": (502,),
    "truncated": (502,),
    "short": (502,),
}


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("mode", list(NON_STREAM_FAULTS))
def test_a_broken_answer_is_a_clear_502_or_504_and_charges_no_output(
    raw_llm: OwnLlm, raw_upstream: RawUpstream, token_mint: TokenMint, api: str, mode: str
) -> None:
    user = f"faults-up-{uuid.uuid4().hex[:8]}"
    before = raw_upstream.calls[mode]
    response = call(raw_llm, token_mint.mint(user), api, f"#raw:{mode}", stream=False)
    check = assert_openai_error if api == "openai" else assert_anthropic_error
    error = check(response, *NON_STREAM_FAULTS[mode])
    attempts = raw_upstream.calls[mode] - before
    row = only_row(raw_llm, user)
    assert row.status == "error" and row.output_tokens == 0, row
    assert 1 <= attempts <= 2, attempts  # our retry loop only (LLM_MAX_ATTEMPTS=2), never the SDK's as well
    figure(
        f"upstream-{mode}-{api}",
        status=response.status_code,
        error=error.get("code") or error.get("type"),
        upstream_calls=attempts,
        charged_output_tokens=row.output_tokens,
        cost_usd=row.cost_usd,
    )


STREAM_FAULTS = {
    # mode: content deltas the upstream sends before failing
    "cut=5": 5,
    "garbage_after=4": 4,
    "headers_then_hang": 0,
    "wrong_type": 0,
    "html": 0,
}


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("mode", list(STREAM_FAULTS))
def test_a_broken_stream_ends_with_the_apis_error_event_and_charges_what_was_sent(
    raw_llm: OwnLlm, raw_upstream: RawUpstream, token_mint: TokenMint, api: str, mode: str
) -> None:
    user = f"faults-st-{uuid.uuid4().hex[:8]}"
    response = call(raw_llm, token_mint.mint(user), api, f"#raw:{mode}", stream=True)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response)
    error = final_error(api, events)
    sent = content_deltas(api, events)
    assert sent == STREAM_FAULTS[mode], events
    row = only_row(raw_llm, user)
    assert row.status == "error", row
    assert row.output_tokens == sent, (row, sent)  # what was sent, not what was promised
    figure(
        f"stream-{mode}-{api}",
        deltas_sent=sent,
        final_event=error.get("type"),
        charged_output_tokens=row.output_tokens,
        cost_usd=row.cost_usd,
    )


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_stream_that_never_starts_is_a_504_before_any_byte(
    raw_llm: OwnLlm, raw_upstream: RawUpstream, token_mint: TokenMint, api: str
) -> None:
    user = f"faults-sh-{uuid.uuid4().hex[:8]}"
    response = call(raw_llm, token_mint.mint(user), api, "#raw:hang", stream=True)
    (assert_openai_error if api == "openai" else assert_anthropic_error)(response, 504)
    row = only_row(raw_llm, user)
    assert row.status == "error" and row.output_tokens == 0 and Decimal(row.cost_usd) == 0, row


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_healthy_upstream_after_the_faults_is_answered_and_charged_in_full(
    raw_llm: OwnLlm, token_mint: TokenMint, api: str
) -> None:
    """The faults leave nothing behind (no open breaker, no poisoned pooled connection)."""
    user = f"faults-ok-{uuid.uuid4().hex[:8]}"
    token = token_mint.mint(user)
    plain = call(raw_llm, token, api, "", stream=False)
    assert plain.status_code == 200, plain.text
    streamed = call(raw_llm, token, api, "", stream=True)
    events = sse(streamed)
    assert content_deltas(api, events) == 16
    rows = raw_llm.usage(user, 2)
    assert [(row.status, row.output_tokens) for row in rows] == [("ok", 16), ("ok", 16)], rows
