"""The provider SDK clients (built once per worker) and their low-level `post`, with errors made safe to show.

We call the SDKs' own `post` with `cast_to=httpx2.Response`: the SDK adds auth, headers and the base URL, and we
skip its response models entirely, forwarding the provider's bytes. SDK retries are off (ours come later).
"""

from __future__ import annotations

import logging
import urllib.request
from typing import Any

import anthropic
import httpx2
import openai
import orjson

from parley_kit.errors import (
    BadRequest,
    Conflict,
    GatewayTimeout,
    NotFound,
    ParleyError,
    PayloadTooLarge,
    RateLimited,
    UpstreamError,
)

from .catalog import Provider
from .settings import LlmSettings
from .transport import Urllib3Transport

log = logging.getLogger(__name__)

_BY_STATUS: dict[int, type[ParleyError]] = {404: NotFound, 409: Conflict, 413: PayloadTooLarge}


class Upstreams:
    """One OpenAI and one Anthropic SDK client per worker, with explicit timeouts and no retries."""

    def __init__(self, settings: LlmSettings) -> None:
        self._secrets = tuple(
            s
            for s in (
                settings.openai_api_key,
                settings.anthropic_api_key,
                settings.openai_base_url.rstrip("/"),
                settings.anthropic_base_url.rstrip("/"),
                httpx2.URL(settings.openai_base_url).host,
                httpx2.URL(settings.anthropic_base_url).host,
            )
            if s
        )
        # read = the wait for the next byte: for streams the first chunk (and each gap); non-streams get the
        # total budget per request, since their first byte is the whole answer.
        self.stream_timeout = httpx2.Timeout(
            connect=settings.connect_timeout,
            read=settings.first_byte_timeout,
            write=settings.first_byte_timeout,
            pool=settings.connect_timeout,
        )
        self.whole_timeout = httpx2.Timeout(
            connect=settings.connect_timeout,
            read=settings.total_timeout,
            write=settings.first_byte_timeout,
            pool=settings.connect_timeout,
        )
        self.total_timeout = settings.total_timeout
        # httpx honours HTTP(S)_PROXY and ALL_PROXY only with its own transport: where an egress proxy is configured,
        # the SDKs keep httpx's (the urllib3 one is for the direct path).
        limits = httpx2.Limits(
            max_connections=settings.worker_connections,
            max_keepalive_connections=min(settings.worker_connections, 512),
        )
        transport = (
            None if urllib.request.getproxies() else Urllib3Transport(max_connections=settings.worker_connections)
        )
        self.openai = openai.OpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            organization=None,
            project=None,
            max_retries=0,
            timeout=self.stream_timeout,
            http_client=openai.DefaultHttpxClient(transport=transport, limits=limits, timeout=self.stream_timeout),
        )
        self.anthropic = anthropic.Anthropic(
            api_key=settings.anthropic_api_key,
            base_url=settings.anthropic_base_url,
            max_retries=0,
            timeout=self.stream_timeout,
            http_client=anthropic.DefaultHttpxClient(transport=transport, limits=limits, timeout=self.stream_timeout),
        )

    def post(
        self, provider: Provider, path: str, content: bytes, *, stream: bool, headers: dict[str, str] | None = None
    ) -> httpx2.Response:
        """POST raw JSON bytes to the provider; a stream's response is returned unread. Errors become ParleyErrors."""
        client: Any = self.openai if provider is Provider.OPENAI else self.anthropic
        options: dict[str, Any] = {"timeout": self.stream_timeout if stream else self.whole_timeout}
        if headers:
            options["headers"] = headers
        try:
            return client.post(path, cast_to=httpx2.Response, content=content, stream=stream, options=options)
        except (openai.APIStatusError, anthropic.APIStatusError) as exc:
            raise self.status_error(provider, exc.response) from None
        except (openai.APITimeoutError, anthropic.APITimeoutError):
            error: ParleyError = GatewayTimeout(
                f"the {provider.value} provider did not answer in time", code="upstream_timeout"
            )
        except (openai.APIConnectionError, anthropic.APIConnectionError):
            error = UpstreamError(f"the {provider.value} provider is unreachable", code="upstream_unreachable")
        error.upstream_status = 0  # type: ignore[attr-defined]
        raise error

    def status_error(self, provider: Provider, response: httpx2.Response) -> ParleyError:
        """The client-facing error for a provider's 4xx/5xx: its status (5xx → 502), its message minus secrets."""
        status = response.status_code
        error = self._status_error(provider, status, response)
        # The retry loop reads what the provider said, not what the client will see.
        error.upstream_status = status  # type: ignore[attr-defined]
        error.retry_after = _retry_after(response.headers.get("retry-after"))  # type: ignore[attr-defined]
        return error

    def _status_error(self, provider: Provider, status: int, response: httpx2.Response) -> ParleyError:
        """Map one provider error answer to a ParleyError."""
        message, code = _provider_message(response.content)
        log.warning(
            "provider answered an error",
            extra={"gen_ai.provider.name": provider.value, "http.response.status_code": status, "error.code": code},
        )
        if status == 429:
            headers = {"retry-after": response.headers["retry-after"]} if "retry-after" in response.headers else {}
            return RateLimited(
                self.redact(message) or "the provider is rate limiting requests",
                code=code or "rate_limit_exceeded",
                headers=headers,
            )
        if status in (401, 403):
            # The provider refused *our* key: the client's credentials are fine, so this is our (gateway) failure.
            return UpstreamError(
                f"the {provider.value} provider refused the gateway's credentials", code="upstream_auth"
            )
        if status >= 500:
            return UpstreamError(f"the {provider.value} provider failed (status {status})", code="upstream_error")
        error = _BY_STATUS.get(status, BadRequest)(
            self.redact(message) or f"the provider rejected the request ({status})"
        )
        error.code = code or error.code
        error.status = status
        return error

    def redact(self, text: str) -> str:
        """Remove our provider keys and URLs from a provider message before a client sees it."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text

    def close(self) -> None:
        """Close the pooled connections."""
        self.openai.close()
        self.anthropic.close()


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (the delta form; an HTTP date is treated as absent)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _provider_message(content: bytes) -> tuple[str, str | None]:
    """The message and code of an OpenAI- or Anthropic-shaped error body (empty when unreadable)."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return "", None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return "", None
    message = error.get("message")
    code = error.get("code") or error.get("type")
    return (str(message)[:1000] if message else ""), (str(code)[:64] if code else None)
