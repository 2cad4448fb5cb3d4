"""Fault 5: a TCP proxy of our own between the gateway and llm, and between llm and its upstream, that adds latency
(requests still work) and cuts connections mid-request and mid-stream (a clean 502/503 in the API's shape or the
API's error event, the gateway stays healthy, the next request succeeds, nothing is charged twice)."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import requests

from parley_kit.testing import TokenMint, eventually

from .conftest import (
    OwnLlm,
    RawUpstream,
    TcpProxy,
    assert_anthropic_error,
    assert_openai_error,
    call,
    content_deltas,
    figure,
    final_error,
    post,
    query,
    sse,
    start_own_gateway,
    user_of,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Client, RunningPlatform


# --- llm → proxy → upstream ------------------------------------------------------------------------------------


@pytest.fixture
def proxy(upstream_proxy: TcpProxy) -> Iterator[TcpProxy]:
    """The llm → upstream proxy, back to clean after each test."""
    yield upstream_proxy
    upstream_proxy.latency, upstream_proxy._armed = 0.0, None


def test_latency_between_llm_and_upstream_slows_but_never_breaks(
    raw_llm: OwnLlm, proxy: TcpProxy, token_mint: TokenMint
) -> None:
    """0.2 s on every piece of data each way (well under the 1.5 s first-byte timeout): every call still answers."""
    proxy.latency = 0.2
    user = f"faults-lat-{uuid.uuid4().hex[:8]}"
    token = token_mint.mint(user)
    started = time.monotonic()
    answers = [call(raw_llm, token, api, "", stream=s) for api in ("openai", "anthropic") for s in (False, True)]
    elapsed = time.monotonic() - started
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200]
    assert content_deltas("openai", sse(answers[1])) == 16 and content_deltas("anthropic", sse(answers[3])) == 16
    assert [(row.status, row.output_tokens) for row in raw_llm.usage(user, 4)] == [("ok", 16)] * 4
    figure("proxy-llm-upstream-latency", added_s_per_hop=0.2, calls=4, ok=4, wall_s=round(elapsed, 2))


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_upstream_connection_cut_mid_stream_ends_with_the_error_event_charged_for_what_was_sent(
    raw_llm: OwnLlm, raw_upstream: RawUpstream, proxy: TcpProxy, token_mint: TokenMint, api: str
) -> None:
    user = f"faults-cut-{uuid.uuid4().hex[:8]}"
    token = token_mint.mint(user)
    before = raw_upstream.calls["ok"]
    proxy.arm("response", 1500)  # the headers and a few events, then RST
    response = call(raw_llm, token, api, "", stream=True)
    assert response.status_code == 200
    events = sse(response)
    final_error(api, events)
    sent = content_deltas(api, events)
    assert 0 < sent < 16, events
    assert raw_upstream.calls["ok"] - before == 1  # a stream that has started is never retried
    rows = raw_llm.usage(user)
    assert [(row.status, row.output_tokens) for row in rows] == [("error", sent)], rows
    again = call(raw_llm, token, api, "", stream=False)
    assert again.status_code == 200, again.text
    figure(f"proxy-llm-upstream-cut-stream-{api}", deltas_sent=sent, charged_output_tokens=rows[0].output_tokens)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_upstream_connection_cut_mid_request_is_retried_once(
    raw_llm: OwnLlm, raw_upstream: RawUpstream, proxy: TcpProxy, token_mint: TokenMint, api: str
) -> None:
    """The request never reached the upstream whole: our retry sends it again, and the client sees one answer."""
    user = f"faults-req-{uuid.uuid4().hex[:8]}"
    before = raw_upstream.calls["ok"]
    proxy.arm("request", 40)
    response = call(raw_llm, token_mint.mint(user), api, "", stream=False)
    assert response.status_code == 200, response.text
    assert proxy._armed is None  # the cut happened
    assert raw_upstream.calls["ok"] - before == 1  # the cut request was never answered upstream
    assert [(row.status, row.output_tokens) for row in raw_llm.usage(user)] == [("ok", 16)]
    figure(f"proxy-llm-upstream-cut-request-{api}", status=response.status_code, upstream_answers=1, charges=1)


# --- gateway → proxy → llm -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_llm_proxy(platform: RunningPlatform) -> Iterator[TcpProxy]:
    """A proxy in front of the platform's llm."""
    proxy = TcpProxy(platform.config.ports["llm"])
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def proxied_gateway(
    platform: RunningPlatform, gateway_llm_proxy: TcpProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway of our own whose llm is behind the proxy (auth and jobs are the platform's)."""
    log_dir = tmp_path_factory.mktemp("proxied-gateway")
    process, url = start_own_gateway(
        platform.platform.processes["gateway"].env,
        log_dir,
        PARLEY_LLM_URL=gateway_llm_proxy.url,
        GATEWAY_REDIS_PREFIX=f"{platform.config.redis_prefix}proxied-{uuid.uuid4().hex[:6]}:",
    )
    yield url
    process.stop(signum=signal.SIGINT)


@pytest.fixture
def gproxy(gateway_llm_proxy: TcpProxy) -> Iterator[TcpProxy]:
    """The gateway → llm proxy, back to clean after each test."""
    yield gateway_llm_proxy
    gateway_llm_proxy.latency, gateway_llm_proxy._armed = 0.0, None


def ledger(platform: RunningPlatform, client: Client) -> list[Any]:
    """The client's rows in the platform llm's ledger."""
    return query(
        platform.config.database_urls["llm"],
        "SELECT status, output_tokens FROM usage_records WHERE user_id = :user ORDER BY id",
        user=user_of(client.access_token),
    )


def healthy(gateway: str) -> bool:
    """The gateway process answers its liveness probe."""
    return requests.get(f"{gateway}/livez", timeout=10).status_code == 200


def test_latency_between_gateway_and_llm_slows_but_never_breaks(
    platform: RunningPlatform, proxied_gateway: str, gproxy: TcpProxy
) -> None:
    client = platform.new_client()
    gproxy.latency = 0.3
    started = time.monotonic()
    answers = [post(proxied_gateway, client, api, stream=s) for api in ("openai", "anthropic") for s in (False, True)]
    elapsed = time.monotonic() - started
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200], [a.text[:200] for a in answers]
    assert content_deltas("openai", sse(answers[1])) == 16 and content_deltas("anthropic", sse(answers[3])) == 16
    assert [status for status, _ in until_rows(platform, client, 4)] == ["ok"] * 4
    figure("proxy-gateway-llm-latency", added_s_per_hop=0.3, calls=4, ok=4, wall_s=round(elapsed, 2))


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_llm_answer_cut_before_the_gateway_reads_it_is_a_502_charged_once(
    platform: RunningPlatform, proxied_gateway: str, gproxy: TcpProxy, api: str
) -> None:
    """llm answered (and charged) but its answer never reached the gateway: a 502 in the API's shape, no retry by the
    gateway (a POST that ran must not run twice), one ledger row, and the gateway serves the next request."""
    client = platform.new_client()
    gproxy.arm("response", 0)
    response = post(proxied_gateway, client, api, stream=False)
    check = assert_openai_error if api == "openai" else assert_anthropic_error
    error = check(response, 502)
    assert gproxy._armed is None
    assert until_rows(platform, client, 1) == [("ok", 16)]  # llm's work, booked once
    assert healthy(proxied_gateway)
    assert post(proxied_gateway, client, api, stream=False).status_code == 200
    assert len(until_rows(platform, client, 2)) == 2
    figure(f"proxy-gateway-llm-cut-answer-{api}", status=502, error=error.get("code") or error.get("type"), charges=1)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_llm_stream_cut_mid_way_ends_with_the_error_event_charged_once(
    platform: RunningPlatform, proxied_gateway: str, gproxy: TcpProxy, api: str
) -> None:
    client = platform.new_client()
    gproxy.arm("response", 1200)
    # Paced so the cut lands mid-stream (llm cannot have finished before the proxy cuts).
    response = post(proxied_gateway, client, api, stream=True, text="slow stream #fake:chunk_delay_ms=20")
    assert response.status_code == 200
    events = sse(response)
    final_error(api, events)
    sent = content_deltas(api, events)
    assert sent < 16, events
    rows = until_rows(platform, client, 1)
    assert len(rows) == 1 and rows[0][0] in ("cancelled", "error"), rows  # booked once, as not completed
    assert healthy(proxied_gateway)
    assert post(proxied_gateway, client, api, stream=False).status_code == 200
    figure(f"proxy-gateway-llm-cut-stream-{api}", deltas_received=sent, ledger=rows)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_request_cut_on_its_way_to_llm_is_answered_cleanly_and_never_charged_twice(
    platform: RunningPlatform, proxied_gateway: str, gproxy: TcpProxy, api: str
) -> None:
    client = platform.new_client()
    gproxy.arm("request", 60)  # inside the request head: llm never sees a whole request
    response = post(proxied_gateway, client, api, stream=False)
    assert gproxy._armed is None
    if response.status_code != 200:  # retried (nothing reached llm) or refused: both are fine, a 500 is not
        (assert_openai_error if api == "openai" else assert_anthropic_error)(response, 502, 503)
    expected = 1 if response.status_code == 200 else 0
    assert len(until_rows(platform, client, expected)) == expected
    assert healthy(proxied_gateway)
    assert post(proxied_gateway, client, api, stream=False).status_code == 200
    figure(f"proxy-gateway-llm-cut-request-{api}", status=response.status_code, charges=expected)


def until_rows(platform: RunningPlatform, client: Client, count: int, seconds: float = 10) -> list[tuple[str, int]]:
    """The client's ledger rows once `count` are there (llm settles a cut call when it notices; then 1 s more to
    catch a duplicate that would follow)."""
    eventually(lambda: len(ledger(platform, client)) >= count, seconds=seconds)
    time.sleep(1)
    return [(row.status, row.output_tokens) for row in ledger(platform, client)]
