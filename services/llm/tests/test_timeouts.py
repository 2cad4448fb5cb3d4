"""A first-byte timeout is a retryable upstream failure: retried once, then a 504 in the route's shape."""

from __future__ import annotations

import urllib3


def upstream_chats(fake_provider: str) -> int:
    stats = urllib3.PoolManager().request("GET", f"{fake_provider}/_fake/stats").json()
    return stats["requests"].get("POST /v1/chat/completions", 0)


def test_first_byte_timeout_is_retried_then_504(make_app, make_client, token_mint, fake_provider: str) -> None:  # type: ignore[no-untyped-def]
    app = make_app(first_byte_timeout=0.3, retry_backoff=0.0, max_attempts=2)
    client = make_client(app, token_mint.mint("timeout-user"))
    before = upstream_chats(fake_provider)
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "slow start #fake:latency_ms=1500"}],
    }
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 504
    assert answer.get_json()["error"]["code"] == "upstream_timeout"
    assert upstream_chats(fake_provider) - before == 2
