"""Unit tests of routing, the retry loop and the circuit breaker (no network)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from parley_kit.errors import BadRequest, ParleyError, ServiceUnavailable, UpstreamError
from parley_llm.catalog import CatalogError, load_catalog
from parley_llm.routing import CircuitBreaker, RetryPolicy, Router

MODELS = """
prices:
  price_version: t1
  chat: {input: 1, output: 1}
  backup: {input: 2, output: 2}
  claude: {input: 1, output: 1}
models:
  chat:
    deployments:
      - {provider: openai, upstream_model: a, weight: 3}
      - {provider: openai, upstream_model: b, weight: 1}
    fallbacks: [backup, claude]
  backup: {provider: openai, upstream_model: c}
  claude: {provider: anthropic, upstream_model: claude-x}
"""


class FakeUpstreams:
    """Only what Router reads from Upstreams."""

    total_timeout = 5.0


def router(tmp_path: Path, **policy: float) -> Router:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS)
    return Router(load_catalog(path), RetryPolicy(**policy), FakeUpstreams(), rng=random.Random(7))  # type: ignore[arg-type]


def failure(status: int, retry_after: float | None = None) -> ParleyError:
    error = UpstreamError("the provider failed")
    error.upstream_status = status  # type: ignore[attr-defined]
    error.retry_after = retry_after  # type: ignore[attr-defined]
    return error


def test_deployments_by_weight_then_same_provider_fallbacks(tmp_path: Path) -> None:
    r = router(tmp_path)
    chat = r.catalog.get("chat")
    assert chat is not None and chat.provider == "openai" and chat.upstream_model == "a"
    firsts = Counter(r.candidates(chat)[0].upstream_model for _ in range(2000))
    assert 0.70 < firsts["a"] / 2000 < 0.80  # weight 3 : 1
    assert [d.upstream_model for d in r.candidates(chat)][2:] == ["c"]  # the anthropic fallback is skipped
    assert r.candidates(chat)[2].name == "backup"  # charged at the fallback's own price


def test_bad_fallback_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(MODELS.replace("fallbacks: [backup, claude]", "fallbacks: [nope]"))
    with pytest.raises(CatalogError, match="no other model named nope"):
        load_catalog(path)


def test_falls_back_on_5xx_before_anything_is_sent(tmp_path: Path) -> None:
    r = router(tmp_path, max_attempts=3)
    tried: list[str] = []

    def attempt(d):  # type: ignore[no-untyped-def]
        tried.append(d.upstream_model)
        if d.upstream_model != "c":
            raise failure(500)
        return "answer"

    served, result = r.call(r.catalog.get("chat"), attempt)  # type: ignore[arg-type]
    assert result == "answer" and served.name == "backup" and tried[-1] == "c" and len(tried) == 3


def test_a_client_error_is_not_retried(tmp_path: Path) -> None:
    r = router(tmp_path, max_attempts=3)
    calls = []

    def attempt(d):  # type: ignore[no-untyped-def]
        calls.append(d)
        raise BadRequest("bad")

    with pytest.raises(BadRequest):
        r.call(r.catalog.get("backup"), attempt)  # type: ignore[arg-type]
    assert len(calls) == 1


def test_retry_after_is_honoured_and_a_long_one_is_not_waited(tmp_path: Path) -> None:
    r = router(tmp_path, max_attempts=2, retry_max_wait=1.0)
    times: list[float] = []

    def attempt(d):  # type: ignore[no-untyped-def]
        times.append(time.monotonic())
        if len(times) == 1:
            raise failure(429, retry_after=0.3)
        return "ok"

    assert r.call(r.catalog.get("backup"), attempt)[1] == "ok"  # type: ignore[arg-type]
    assert times[1] - times[0] >= 0.3

    long_wait: list[float] = []

    def limited(d):  # type: ignore[no-untyped-def]
        long_wait.append(time.monotonic())
        raise failure(429, retry_after=30)

    with pytest.raises(UpstreamError):
        r.call(r.catalog.get("backup"), limited)  # type: ignore[arg-type]
    assert len(long_wait) == 1  # the provider asked for 30 s: the client hears it now instead


def test_breaker_opens_fails_fast_and_lets_one_probe_through() -> None:
    now = [0.0]
    breaker = CircuitBreaker("openai:x", failures=2, cooldown=10, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow() and breaker.is_open and breaker.retry_in() == 10
    now[0] = 11
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.failure()  # the probe failed: open again
    assert not breaker.allow()
    now[0] = 22
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.allow() and not breaker.is_open


def test_open_breaker_answers_503_without_calling(tmp_path: Path) -> None:
    r = router(tmp_path, breaker_failures=1, max_attempts=1)
    backup = r.catalog.get("backup")
    with pytest.raises(UpstreamError):
        r.call(backup, lambda d: (_ for _ in ()).throw(failure(502)))  # type: ignore[arg-type]
    calls = []
    with pytest.raises(ServiceUnavailable) as caught:
        r.call(backup, lambda d: calls.append(d))  # type: ignore[arg-type]
    assert calls == [] and caught.value.headers["retry-after"] == "30"


def test_the_breaker_never_serializes_calls(tmp_path: Path) -> None:
    r = router(tmp_path)
    backup = r.catalog.get("backup")
    inside = threading.Barrier(4, timeout=5)

    def attempt(d):  # type: ignore[no-untyped-def]
        inside.wait()  # all four calls must be upstream at the same time
        return "ok"

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(r.call(backup, attempt)[1]))  # type: ignore[arg-type]
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["ok"] * 4
