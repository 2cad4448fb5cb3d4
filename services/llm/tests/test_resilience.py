"""With the fake provider failing every call: ≤ 1.1 upstream calls per client call, fast errors, breaker metric.

A fake provider and an llm process of this module's own: the failure mode is set process-wide on the fake.
"""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest
import urllib3

from parley_kit.db import upgrade
from parley_llm import MIGRATIONS_DIR

CALLS = 50


@pytest.fixture(scope="module")
def failing(postgres, token_mint, tmp_path_factory, spawn) -> tuple[Any, str]:  # type: ignore[no-untyped-def]
    """(llm process, fake provider URL) with the fake answering 500 to every call."""
    fake_url = spawn.fake(tmp_path_factory.mktemp("fake-failing"))
    url = postgres.create_database("llm_resilience")
    upgrade(MIGRATIONS_DIR, url)
    llm = spawn.llm(
        fake_url,
        url,
        token_mint.jwks_url,
        tmp_path_factory.mktemp("llm-failing"),
        LLM_BREAKER_FAILURES="3",
        LLM_BREAKER_COOLDOWN="120",
    )
    http = urllib3.PoolManager()
    assert http.request("POST", f"{fake_url}/_fake/config", json={"error": "500"}).status == 200
    return llm, fake_url


def upstream_calls(fake_url: str) -> int:
    """Chat requests the fake provider has received."""
    stats = urllib3.PoolManager().request("GET", f"{fake_url}/_fake/stats").json()
    return sum(n for endpoint, n in stats["requests"].items() if endpoint.endswith("/chat/completions"))


def test_failing_provider_costs_at_most_1_1_upstream_calls_per_client_call(failing, token_mint, provider_key) -> None:  # type: ignore[no-untyped-def]
    llm, fake_url = failing
    before = upstream_calls(fake_url)
    client = openai.OpenAI(
        base_url=f"{llm.base_url}/v1", api_key=token_mint.mint("resilience"), max_retries=0, timeout=20
    )
    slowest = 0.0
    statuses = []
    for _ in range(CALLS):
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        slowest = max(slowest, time.monotonic() - started)
        statuses.append(caught.value.status_code)
        # The error is in the OpenAI shape the SDK parses, and shows nothing of the provider.
        assert caught.value.body["code"] in ("upstream_error", "upstream_unavailable")
        assert provider_key not in caught.value.message and fake_url not in caught.value.message
    client.close()
    sent = upstream_calls(fake_url) - before
    assert sent / CALLS <= 1.1, f"{sent} upstream calls for {CALLS} client calls"
    assert set(statuses) <= {502, 503} and 503 in statuses  # the breaker opened: later calls fail fast
    assert slowest < 5.0, f"a failing call took {slowest:.1f}s"
    metrics = urllib3.PoolManager().request("GET", f"{llm.base_url}/metrics").data.decode()
    assert 'parley_circuit_open{deployment="openai:gpt-4o-mini"} 1.0' in metrics
    log = llm.log_path.read_text()
    assert "circuit opened" in log
    assert provider_key not in log and fake_url not in log
