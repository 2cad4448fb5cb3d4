"""Rate limits: the usage meter and header maths (unit), then the gateway app on the REAL Redis and fake provider."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import orjson
import pytest
import redis
from flask.testing import FlaskClient

from parley_gateway import GatewaySettings, create_app, ratelimit
from parley_gateway.ratelimit import (
    LEASE_SHARE,
    DefaultLimits,
    LocalRateLimiter,
    Principal,
    RedisRateLimiter,
    Scope,
    UsageMeter,
    duration,
)
from parley_kit.errors import RateLimited, ServiceUnavailable
from parley_kit.testing import TokenMint, eventually, free_port

CHAT = "/v1/chat/completions"


def chat(text: str, **extra: object) -> bytes:
    """A chat completion request body."""
    return orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra})


# ----- unit: the meter, the header maths, the limits' scopes, the in-process limiter ----------------------------


def test_meter_reads_openai_json_usage() -> None:
    """A non-streamed answer: `total_tokens` of its usage."""
    meter = UsageMeter(request_bytes=400)
    meter.feed(b'{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}')
    assert meter.tokens == 42


def test_meter_reads_openai_stream_usage_split_across_chunks() -> None:
    """The usage chunk of a stream, cut in the middle of a counter, still counts once and exactly."""
    meter = UsageMeter(request_bytes=400)
    meter.feed(b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n')
    meter.feed(b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_to')
    meter.feed(b'kens":12}}\n\ndata: [DONE]\n\n')
    assert meter.tokens == 12


def test_meter_reads_anthropic_cumulative_usage() -> None:
    """Anthropic: input from message_start, the LAST cumulative output_tokens (not the sum of events)."""
    meter = UsageMeter(request_bytes=400)
    meter.feed(
        b'event: message_start\ndata: {"message":{"usage":{"input_tokens":10,'
        b'"cache_creation_input_tokens":99,"output_tokens":1}}}\n\n'
    )
    meter.feed(b'event: content_block_delta\ndata: {"delta":{"text":"hi"}}\n\n')
    meter.feed(b'event: message_delta\ndata: {"delta":{},"usage":{"output_tokens":25}}\n\n')
    assert meter.tokens == 35


def test_meter_estimates_without_usage() -> None:
    """A stream without usage (the client did not ask for it): a quarter of the request bytes plus one per delta."""
    meter = UsageMeter(request_bytes=400)
    for _ in range(6):
        meter.feed(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    assert meter.tokens == 100 + 6


def test_content_cannot_fake_usage() -> None:
    """Text mentioning a counter is JSON-escaped (`\\"`), so it never matches a real counter."""
    meter = UsageMeter(request_bytes=0)
    meter.feed(b'{"content":"\\"total_tokens\\": 1","usage":{"total_tokens":9}}')
    assert meter.tokens == 9


@pytest.mark.parametrize(("ms", "text"), [(0, "0ms"), (850, "850ms"), (1000, "1s"), (12_300, "13s"), (90_000, "1m30s")])
def test_reset_durations_read_like_openais(ms: float, text: str) -> None:
    """`x-ratelimit-reset-*` values as OpenAI writes them."""
    assert duration(ms) == text


def test_scopes_from_settings_and_claims() -> None:
    """A key token has a key scope and a user scope; `rpm`/`tpm` claims replace the key's defaults (or the user's)."""
    limits = DefaultLimits(key_rpm=10, key_tpm=100, user_rpm=20, user_tpm=0)
    assert limits.scopes(Principal("u1", "k1")) == (Scope("key", "k1", 10, 100), Scope("user", "u1", 20, 0))
    assert limits.scopes(Principal("u1", "k1", rpm=3)) == (Scope("key", "k1", 3, 100), Scope("user", "u1", 20, 0))
    assert limits.scopes(Principal("u1", None, rpm=5, tpm=7)) == (Scope("user", "u1", 5, 7),)
    assert DefaultLimits(0, 0, 0, 0).scopes(Principal("u1", "k1")) == ()


def test_local_limiter_counts_requests_and_settles_tokens() -> None:
    """The in-process fallback has the same rules: N requests per window, tokens admitted while under the limit."""
    limiter = LocalRateLimiter()
    scopes = (Scope("key", "k", 2, 50),)
    first = limiter.admit(scopes)
    assert dict(first.headers)["x-ratelimit-remaining-requests"] == "1"
    limiter.settle(first.token_scopes, 60)  # over the token limit after the fact ...
    with pytest.raises(RateLimited) as caught:
        limiter.admit(scopes)  # ... so the next request is refused for tokens
    assert "tokens" in caught.value.detail
    assert int(caught.value.headers["Retry-After"]) >= 1
    requests_only = (Scope("user", "u", 2, 0),)
    limiter.admit(requests_only)
    limiter.admit(requests_only)
    with pytest.raises(RateLimited) as caught:
        limiter.admit(requests_only)
    assert caught.value.headers["x-ratelimit-remaining-requests"] == "0"


# ----- the app on the real Redis --------------------------------------------------------------------------------


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client to read the counters."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def limited(settings: GatewaySettings, redis_url: str, redis_prefix: str) -> GatewaySettings:
    """Settings with Redis and low limits: 3 requests per minute per key, 40 tokens per minute per user."""
    return settings.model_copy(
        update={
            "redis_url": redis_url,
            "redis_prefix": f"{redis_prefix}{uuid.uuid4().hex[:8]}:",
            "rate_limit_key_rpm": 3,
            "rate_limit_key_tpm": 0,
            "rate_limit_user_rpm": 0,
            "rate_limit_user_tpm": 40,
        }
    )


@pytest.fixture
def limited_client(limited: GatewaySettings) -> Iterator[FlaskClient]:
    """The app with those limits."""
    app = create_app(limited)
    yield app.test_client()
    app.extensions["parley_gateway"].close()


def counted_tokens(client: redis.Redis, key: str, expected: list[int]) -> list[int]:
    """The token counts in a window hash once the settler's next batch has written them (or what is there after 5 s)."""
    eventually(lambda: sorted(int(value) for value in client.hvals(key)) == expected, 5, 0.01)
    return sorted(int(value) for value in client.hvals(key))


def test_settlements_are_summed_and_written_in_one_batch(redis_url: str, redis_prefix: str) -> None:
    """Many answers' tokens reach Redis as one sum per key at the next interval, not one write each; close() writes
    what is still pending."""
    prefix = f"{redis_prefix}{uuid.uuid4().hex[:8]}:"
    limiter = RedisRateLimiter(redis_url, prefix=prefix, timeout=1, failure_mode="closed", settle_interval=3600)
    client = redis.Redis.from_url(redis_url)
    try:
        user, key = Scope("user", "u1", 0, 1000), Scope("key", "k1", 0, 1000)
        for tokens in (5, 7, 11):
            limiter.settle((user, key), tokens)
        limiter.settle((user,), 100)
        assert client.hvals(f"{prefix}ratelimit:user:u1:tok") == []  # nothing written before the batch
        limiter.close()
        assert [int(v) for v in client.hvals(f"{prefix}ratelimit:user:u1:tok")] == [123]
        assert [int(v) for v in client.hvals(f"{prefix}ratelimit:key:k1:tok")] == [23]
    finally:
        client.close()


def key_token(token_mint: TokenMint, **claims: object) -> dict[str, str]:
    """Headers with a fresh user's key token (fresh ids: each test starts with empty counters)."""
    token = token_mint.mint(f"u-{uuid.uuid4().hex[:8]}", key_id=f"k-{uuid.uuid4().hex[:8]}", **claims)
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def test_requests_per_minute_per_key(limited_client: FlaskClient, token_mint: TokenMint) -> None:
    """3 per minute: remaining counts down 2, 1, 0; the 4th is 429 with Retry-After and the headers, OpenAI shape."""
    headers = key_token(token_mint)
    remaining = []
    for _ in range(3):
        response = limited_client.post(CHAT, data=chat("hi #fake:tokens=1"), headers=headers)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    refused = limited_client.post(CHAT, data=chat("hi"), headers=headers)
    assert refused.status_code == 429
    assert refused.json["error"]["type"] == "rate_limit_error"
    assert refused.json["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    # another key of another user is not affected
    assert limited_client.post(CHAT, data=chat("hi"), headers=key_token(token_mint)).status_code == 200


def test_429_on_messages_is_in_anthropic_shape(limited_client: FlaskClient, token_mint: TokenMint) -> None:
    """The limit holds on /v1/messages too, refused in the Anthropic error shape."""
    headers = key_token(token_mint, rpm=1)
    body = orjson.dumps({"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
    assert limited_client.post("/v1/messages", data=body, headers=headers).status_code == 200
    refused = limited_client.post("/v1/messages", data=body, headers=headers)
    assert refused.status_code == 429
    assert refused.json == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": refused.json["error"]["message"]},
    }
    assert "Retry-After" in refused.headers


def test_token_claims_override_the_defaults(limited_client: FlaskClient, token_mint: TokenMint) -> None:
    """A token carrying `rpm: 1` gets one request a minute, not the default 3."""
    headers = key_token(token_mint, rpm=1)
    assert limited_client.post(CHAT, data=chat("hi"), headers=headers).status_code == 200
    assert limited_client.post(CHAT, data=chat("hi"), headers=headers).status_code == 429


def test_tokens_are_settled_from_reported_usage(
    limited_client: FlaskClient, limited: GatewaySettings, token_mint: TokenMint, redis_client: redis.Redis
) -> None:
    """The tokens counted in Redis are the usage the answer reports; over 40 the next request is refused for tokens,
    though it was admitted while under the limit."""
    subject = f"u-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {token_mint.mint(subject)}", "Content-Type": "application/json"}
    first = limited_client.post(CHAT, data=chat("count me #fake:tokens=45"), headers=headers, buffered=True)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"  # nothing counted before the answer
    total = first.json["usage"]["total_tokens"]
    assert counted_tokens(redis_client, f"{limited.redis_prefix}ratelimit:user:{subject}:tok", [total]) == [total]
    assert first.json["usage"]["total_tokens"] > 40
    second = limited_client.post(CHAT, data=chat("again"), headers=headers)
    assert second.status_code == 429
    assert "tokens" in second.json["error"]["message"]
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"


def test_stream_tokens_are_settled_from_the_last_events(
    limited_client: FlaskClient, limited: GatewaySettings, token_mint: TokenMint, redis_client: redis.Redis
) -> None:
    """A relayed stream's usage chunk is read as it passes: the count equals the usage the client saw."""
    subject = f"u-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {token_mint.mint(subject)}", "Content-Type": "application/json"}
    response = limited_client.post(
        CHAT,
        data=chat("stream #fake:tokens=6", stream=True, stream_options={"include_usage": True}),
        headers=headers,
        buffered=False,
    )
    events = b"".join(response.response)
    response.close()
    usage_line = [line for line in events.split(b"\n\n") if b'"usage":{' in line][-1]
    reported = orjson.loads(usage_line.removeprefix(b"data: "))["usage"]["total_tokens"]
    key = f"{limited.redis_prefix}ratelimit:user:{subject}:tok"
    assert counted_tokens(redis_client, key, [reported]) == [reported]


def test_anthropic_stream_tokens_are_input_plus_last_output(
    limited_client: FlaskClient, limited: GatewaySettings, token_mint: TokenMint, redis_client: redis.Redis
) -> None:
    """An Anthropic stream: input tokens from message_start plus the final cumulative output tokens."""
    subject = f"u-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {token_mint.mint(subject)}", "Content-Type": "application/json"}
    body = orjson.dumps(
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 64,
            "stream": True,
            "messages": [{"role": "user", "content": "tell me #fake:tokens=7"}],
        }
    )
    response = limited_client.post("/v1/messages", data=body, headers=headers, buffered=False)
    events = b"".join(response.response)
    response.close()
    payloads = [orjson.loads(line[6:]) for line in events.split(b"\n") if line.startswith(b"data: ")]
    started = next(p for p in payloads if p["type"] == "message_start")["message"]["usage"]["input_tokens"]
    finished = [p for p in payloads if p["type"] == "message_delta"][-1]["usage"]["output_tokens"]
    assert finished == 7
    key = f"{limited.redis_prefix}ratelimit:user:{subject}:tok"
    assert counted_tokens(redis_client, key, [started + finished]) == [started + finished]


def test_unlimited_routes_and_settings_skip_redis(
    settings: GatewaySettings, token_mint: TokenMint, redis_prefix: str
) -> None:
    """No limits configured: no limiter at all; /v1/models is never limited (no headers) even with limits on."""
    off = settings.model_copy(
        update={
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",  # nothing there: any call would fail
            "redis_prefix": redis_prefix,
            "rate_limit_key_rpm": 0,
            "rate_limit_key_tpm": 0,
            "rate_limit_user_rpm": 0,
            "rate_limit_user_tpm": 0,
        }
    )
    app = create_app(off)
    assert app.extensions["parley_gateway"].limiter is None
    response = app.test_client().post(CHAT, data=chat("hi"), headers=key_token(token_mint))
    assert response.status_code == 200
    assert "x-ratelimit-limit-requests" not in response.headers
    on = create_app(off.model_copy(update={"rate_limit_key_rpm": 5}))
    models = on.test_client().get("/v1/models", headers=key_token(token_mint))
    assert models.status_code == 200
    assert "x-ratelimit-limit-requests" not in models.headers


@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("open", 200)])
def test_redis_down_refuses_or_admits_per_failure_mode(
    settings: GatewaySettings, token_mint: TokenMint, mode: str, status: int
) -> None:
    """Redis unreachable: `closed` answers 503 in the route's shape, `open` lets the request through."""
    app = create_app(
        settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "rate_limit_failure_mode": mode})
    )
    response = app.test_client().post(CHAT, data=chat("hi"), headers=key_token(token_mint))
    assert response.status_code == status
    if status == 503:
        assert response.json["error"]["type"] == "server_error"
        assert "rate limits" in response.json["error"]["message"]


def test_limits_need_redis_outside_development() -> None:
    """Per-process limits outside development would multiply by the process count: refused at start-up."""
    with pytest.raises(ValueError, match="GATEWAY_REDIS_URL"):
        GatewaySettings(environment="production", client_secret="a-real-secret-for-this-test")
    assert (
        GatewaySettings(
            environment="production",
            client_secret="a-real-secret-for-this-test",
            rate_limit_key_rpm=0,
            rate_limit_key_tpm=0,
            rate_limit_user_rpm=0,
            rate_limit_user_tpm=0,
        ).redis_url
        is None
    )


def test_more_checks_in_flight_than_redis_connections_all_get_an_answer(redis_url: str, redis_prefix: str) -> None:
    """64 concurrent checks over a pool of 4 connections: each waits for a connection and is admitted. A pool that
    raised "too many connections" instead would read as Redis being down and refuse them all with 503."""
    from concurrent.futures import ThreadPoolExecutor

    limiter = RedisRateLimiter(redis_url, prefix=redis_prefix, timeout=1.0, failure_mode="closed", pool_size=4)
    rpm = 2 * LEASE_SHARE - 1  # too small a limit to lease: every check goes to Redis
    scopes = (Scope("key", f"pool-{uuid.uuid4().hex}", rpm, 0),)
    with ThreadPoolExecutor(max_workers=64) as pool:
        decisions = list(pool.map(lambda _: limiter.admit(scopes), range(64)))
    assert len(decisions) == 64
    remaining = sorted(int(dict(d.headers)["x-ratelimit-remaining-requests"]) for d in decisions)
    assert remaining == list(range(rpm - 64, rpm))  # each one counted exactly once


def test_concurrent_checks_share_round_trips_and_each_is_counted_in_order(redis_url: str, redis_prefix: str) -> None:
    """30 concurrent checks of two different principals: fewer EVALSHAs than checks (they coalesce), yet each limit
    admits exactly its count, each admitted request sees its own place in the window, and the rest get 429."""
    from concurrent.futures import ThreadPoolExecutor

    limiter = RedisRateLimiter(
        redis_url, prefix=f"{redis_prefix}{uuid.uuid4().hex[:8]}:", timeout=1.0, failure_mode="closed"
    )
    round_trips: list[int] = []
    script = limiter._check

    def counted(keys: list[str], args: list[int | str]) -> list[int]:
        round_trips.append(1)
        time.sleep(0.01)  # a slower Redis: checks arriving meanwhile queue for the next round trip
        return script(keys, args)

    limiter._check = counted  # type: ignore[method-assign]
    first = (Scope("key", "k1", 10, 0), Scope("user", "u1", 1000, 0))
    second = (Scope("key", "k2", 5, 0),)

    def check(scopes: tuple[Scope, ...]) -> tuple[str, int | None]:
        try:
            decision = limiter.admit(scopes)
        except RateLimited:
            return scopes[0].subject, None
        return scopes[0].subject, int(dict(decision.headers)["x-ratelimit-remaining-requests"])

    with ThreadPoolExecutor(max_workers=30) as pool:
        outcomes = list(pool.map(check, [first] * 20 + [second] * 10))
    admitted = {subject: sorted(r for s, r in outcomes if s == subject and r is not None) for subject in ("k1", "k2")}
    assert admitted == {"k1": list(range(10)), "k2": list(range(5))}
    assert sum(1 for _, remaining in outcomes if remaining is None) == 15
    assert len(round_trips) < 30


class Interrupted(BaseException):
    """What a killed greenlet or a worker timeout raises in the middle of a call."""


def test_a_check_cut_off_mid_call_leaves_no_answer_for_the_next(redis_url: str, redis_prefix: str) -> None:
    """The first check is interrupted after Redis ran it but before its answer was read: the next check must read
    its own answer (the second admission: 98 left of 100), not the stale one (99)."""
    limiter = RedisRateLimiter(
        redis_url, prefix=f"{redis_prefix}{uuid.uuid4().hex[:8]}:", timeout=1.0, failure_mode="closed"
    )
    scopes = (Scope("key", "k1", 100, 0),)
    limiter.admit((Scope("key", "warm-up", 100, 0),))  # Redis knows the script: the interrupted check will run
    connection = limiter._check_connection
    read_response = connection.read_response

    def interrupted_once(*args: object, **kwargs: object) -> object:
        connection.read_response = read_response  # type: ignore[method-assign]
        raise Interrupted

    connection.read_response = interrupted_once  # type: ignore[method-assign]
    try:
        with pytest.raises(Interrupted):
            limiter.admit(scopes)
        assert dict(limiter.admit(scopes).headers)["x-ratelimit-remaining-requests"] == "98"
    finally:
        limiter.close()


def test_a_redis_that_forgot_the_script_gets_it_again_and_counts_the_check_once(
    redis_url: str, redis_prefix: str
) -> None:
    """After a Redis restart or `SCRIPT FLUSH` the first EVALSHA is answered NOSCRIPT: the check loads the script,
    runs it again on the same connection, and the request is counted once, not refused as Redis being down."""
    limiter = RedisRateLimiter(redis_url, prefix=redis_prefix, timeout=1.0, failure_mode="closed")
    client = redis.Redis.from_url(redis_url)
    scopes = (Scope("key", f"flush-{uuid.uuid4().hex}", 10, 0),)
    try:
        assert dict(limiter.admit(scopes).headers)["x-ratelimit-remaining-requests"] == "9"
        client.script_flush()
        assert dict(limiter.admit(scopes).headers)["x-ratelimit-remaining-requests"] == "8"
        assert dict(limiter.admit(scopes).headers)["x-ratelimit-remaining-requests"] == "7"
    finally:
        client.close()
        limiter.close()


def count_round_trips(limiter: RedisRateLimiter) -> list[int]:
    """Record the number of requests each of this limiter's EVALSHA checks carried."""
    trips: list[int] = []
    check = limiter._check

    def counted(keys: list[str], args: list[int | str]) -> list[int]:
        trips.append(int(args[2]))
        return check(keys, args)

    limiter._check = counted  # type: ignore[method-assign]
    return trips


def test_a_large_limit_is_leased_yet_two_processes_never_exceed_it(redis_url: str, redis_prefix: str) -> None:
    """Two gateway processes taking turns on one key with a limit large enough to lease: far fewer round trips than
    requests, never more admitted than the limit, and once both have given back what their leases did not use, the
    window holds exactly the requests admitted."""
    prefix = f"{redis_prefix}{uuid.uuid4().hex[:8]}:"
    first, second = (RedisRateLimiter(redis_url, prefix=prefix, timeout=1.0, failure_mode="closed") for _ in range(2))
    first_trips, second_trips = count_round_trips(first), count_round_trips(second)
    client = redis.Redis.from_url(redis_url)
    rpm = 20 * LEASE_SHARE
    scopes = (Scope("key", "leased", rpm, 0),)
    try:
        admitted = refused = 0
        for n in range(rpm + 200):
            try:
                (first, second)[n % 2].admit(scopes)
                admitted += 1
            except RateLimited:
                refused += 1  # each one asked Redis
        round_trips = len(first_trips) + len(second_trips)
        assert admitted <= rpm
        assert admitted >= rpm - 2 * (rpm // LEASE_SHARE)  # at most a lease's worth held back by each process
        assert round_trips - refused < admitted / 8
        first.close()
        second.close()
        assert client.zcard(f"{prefix}ratelimit:key:leased:req") == admitted
    finally:
        client.close()


def leasing_key(
    redis_url: str, redis_prefix: str, *, settle_interval: float
) -> tuple[RedisRateLimiter, redis.Redis, str, tuple[Scope, ...]]:
    """A limiter of its own, a Redis client, and a key whose 1,000 rpm is large enough to lease (its request log)."""
    prefix = f"{redis_prefix}{uuid.uuid4().hex[:8]}:"
    limiter = RedisRateLimiter(
        redis_url, prefix=prefix, timeout=1.0, failure_mode="closed", settle_interval=settle_interval
    )
    return (
        limiter,
        redis.Redis.from_url(redis_url),
        f"{prefix}ratelimit:key:leasing:req",
        (Scope("key", "leasing", 1000, 0),),
    )


def test_a_lease_counts_each_request_in_its_headers_and_gives_back_what_it_did_not_use(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight requests in a row grow leases of 1, 2, 4 and 8 admissions (leases that last, however slow the machine):
    the headers still count one request each, and once the last lease ends its seven unused admissions leave the
    window."""
    monkeypatch.setattr(ratelimit, "LEASE_SECONDS", 60.0)
    limiter, client, key, scopes = leasing_key(redis_url, redis_prefix, settle_interval=3600)
    try:
        remaining = [int(dict(limiter.admit(scopes).headers)["x-ratelimit-remaining-requests"]) for _ in range(8)]
        assert remaining == list(range(999, 991, -1))
        assert client.zcard(key) == 1 + 2 + 4 + 8  # reserved as leased
        limiter.flush()
        assert client.zcard(key) == 15  # the lease has not ended: nothing is given back yet
        limiter.flush(every_lease=True)
        assert client.zcard(key) == 8
    finally:
        client.close()
        limiter.close()


def test_concurrent_requests_ask_for_one_lease_at_a_time(redis_url: str, redis_prefix: str) -> None:
    """Thirty-two threads on one key: only one check at a time asks for a lease (the others count only themselves),
    so concurrency never multiplies what a process holds; every admission is a real one once leases end."""
    from concurrent.futures import ThreadPoolExecutor

    prefix = f"{redis_prefix}{uuid.uuid4().hex[:8]}:"
    limiter = RedisRateLimiter(redis_url, prefix=prefix, timeout=1.0, failure_mode="closed")
    client = redis.Redis.from_url(redis_url)
    scopes = (Scope("key", "concurrent", 20 * LEASE_SHARE, 0),)
    in_flight, most = [0], [0]
    lock = threading.Lock()
    checks = limiter._checks

    def watched(item: tuple[tuple[Scope, ...], str, int]) -> list[int]:
        leasing = item[2] > 1
        with lock:
            in_flight[0] += leasing
            most[0] = max(most[0], in_flight[0])
        try:
            return checks(item)
        finally:
            with lock:
                in_flight[0] -= leasing

    limiter._checks = watched  # type: ignore[assignment]
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            admitted = sum(1 for _ in pool.map(lambda _: limiter.admit(scopes), range(600)))
        assert most[0] == 1
        limiter.close()
        assert client.zcard(f"{prefix}ratelimit:key:concurrent:req") == admitted == 600
    finally:
        client.close()


def test_a_lease_check_whose_answer_is_lost_gives_back_what_redis_granted(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis runs a lease check and grants it, but the answer never arrives (a timeout): the request is refused (503,
    closed mode), and the admissions Redis counted for it leave the window with the next settlement Redis takes."""
    monkeypatch.setattr(ratelimit, "LEASE_SECONDS", 60.0)
    limiter, client, key, scopes = leasing_key(redis_url, redis_prefix, settle_interval=0.01)
    try:
        for _ in range(7):
            limiter.admit(scopes)  # leases of 1, 2 and 4, all used: the next check asks for 8
        assert client.zcard(key) == 7
        check = limiter._check

        def answer_lost(keys: list[str], args: list[int | str]) -> list[int]:
            check(keys, args)
            raise redis.TimeoutError("the answer never came")

        limiter._check = answer_lost  # type: ignore[method-assign]
        with pytest.raises(ServiceUnavailable):
            limiter.admit(scopes)
        limiter._check = check  # type: ignore[method-assign]
        assert client.zcard(key) == 7 + 8  # Redis counted the lease it granted
        eventually(lambda: client.zcard(key) == 7, 5, 0.02)  # given back once Redis is asked again (after 1 s)
    finally:
        limiter.close()
        client.close()
