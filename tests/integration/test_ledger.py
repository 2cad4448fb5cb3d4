"""The ledger through the gateway with the official SDKs: budgets refuse in each API's shape, Idempotency-Key
replays without a second charge, and usage is exported as CSV."""

from __future__ import annotations

import csv
import io
import time
import uuid
from decimal import Decimal

import anthropic
import openai
import pytest
import requests

from parley_kit.db import Database
from parley_llm import budgets

HELLO = [{"role": "user", "content": "hello ledger"}]


def test_a_key_budget_refuses_in_both_sdk_shapes(platform) -> None:  # type: ignore[no-untyped-def]
    client = platform.new_client()
    db = Database(platform.config.database_urls["llm"])
    with db.transaction() as session:
        budgets.put_budget(
            session, scope=budgets.Scope.KEY, subject_id=client.key_id, limit_usd=Decimal(0), period=budgets.Period.DAY
        )
    db.dispose()
    oai = openai.OpenAI(base_url=f"{platform.gateway}/v1", api_key=client.api_key, max_retries=0, timeout=20)
    # Each llm worker learns who has a budget within LLM_BUDGET_CACHE_SECONDS: poll with a deadline.
    deadline = time.monotonic() + 15
    while True:
        try:
            oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=4)
        except openai.RateLimitError as exc:
            assert exc.code == "insufficient_quota"
            break
        assert time.monotonic() < deadline, "the budget was never enforced"
        time.sleep(0.2)
    with pytest.raises(anthropic.RateLimitError):
        anthropic.Anthropic(
            base_url=platform.gateway, api_key=client.api_key, max_retries=0, timeout=20
        ).messages.create(model="claude-haiku-4-5", max_tokens=4, messages=HELLO)


def test_idempotency_key_through_the_gateway_charges_once(platform) -> None:  # type: ignore[no-untyped-def]
    client = platform.new_client()
    oai = openai.OpenAI(base_url=f"{platform.gateway}/v1", api_key=client.api_key, max_retries=0, timeout=20)
    key = {"Idempotency-Key": f"item-{uuid.uuid4().hex}"}
    first = oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers=key)
    again = oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers=key)
    assert first.id == again.id
    with pytest.raises(openai.ConflictError):
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "other"}], extra_headers=key
        )
    headers = {"Authorization": f"Bearer {client.api_key}"}
    deadline = time.monotonic() + 10
    while True:  # usage is settled just after the answer is sent
        exported = requests.get(f"{platform.gateway}/v1/usage?format=csv", headers=headers, timeout=10)
        assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(r["model"], r["requests"]) for r in rows] == [("gpt-4o-mini", "1")]
