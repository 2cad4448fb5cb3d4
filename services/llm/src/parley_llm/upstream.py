"""The hop to the providers: each provider's wire (base URL, auth and version headers) as its SDK defines it, and
keep-alive pools that send the client's bytes and hand back the provider's, unparsed.

Each SDK is asked once per process, in a throwaway interpreter (`sdk_headers.py`), for the headers it sends; each
call then goes out on the kit's `ForwardClient` (geventhttpclient) to the configured base URL. Why not the SDK's own
`post`: it rebuilds the request, its headers and an httpx client round on every call, which with its transport was
~48% of an llm worker's CPU under load, for bytes we never let it parse (bench/README.md). Provider errors become
ParleyErrors safe to show a client.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

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
from parley_kit.forward import ForwardClient, ForwardResponse

from .catalog import Provider
from .settings import LlmSettings

log = logging.getLogger(__name__)

_BY_STATUS: dict[int, type[ParleyError]] = {404: NotFound, 409: Conflict, 413: PayloadTooLarge}


# Stands for the API key when the SDKs are asked for their headers; the real key replaces it in this process.
SDK_KEY_PLACEHOLDER = "parley-sdk-key-placeholder"
# Well inside gunicorn's worker timeout (30 s): a worker still booting past it is killed before this error is told.
SDK_HEADERS_TIMEOUT = 20.0


@functools.cache
def _sdk_headers_with_placeholder() -> dict[str, dict[str, str]]:
    """Each SDK's headers (its auth, version and identification headers), read once per process from a throwaway
    interpreter: importing the SDKs here would keep ~55 MB in every worker for a few header lines (the interpreter
    costs each worker start ~1 s of CPU instead). It finds the SDKs where this one does (same environment and
    PYTHONPATH); `-P` keeps the script's own folder, llm's modules, off its import path."""
    script = Path(__file__).with_name("sdk_headers.py")
    done = subprocess.run(
        [sys.executable, "-P", str(script), SDK_KEY_PLACEHOLDER],
        capture_output=True,
        timeout=SDK_HEADERS_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"could not read the provider SDKs' headers: {done.stderr.decode(errors='replace')[-800:]}")
    headers: dict[str, dict[str, str]] = json.loads(done.stdout)
    return headers


def sdk_headers(provider: Provider, api_key: str) -> dict[str, str]:
    """What the provider's SDK sends on every request with this API key."""
    return {
        name: value.replace(SDK_KEY_PLACEHOLDER, api_key)
        for name, value in _sdk_headers_with_placeholder()[provider.value].items()
    }


class Upstreams:
    """Per worker and provider: two pools (a stream waits `first_byte_timeout` per read, a whole answer
    `total_timeout`), no retries (the router's loop decides)."""

    def __init__(self, settings: LlmSettings) -> None:
        endpoints = {
            Provider.OPENAI: (settings.openai_base_url, settings.openai_api_key),
            Provider.ANTHROPIC: (settings.anthropic_base_url, settings.anthropic_api_key),
        }
        self._secrets = tuple(
            s
            for s in (
                settings.openai_api_key,
                settings.anthropic_api_key,
                settings.openai_base_url.rstrip("/"),
                settings.anthropic_base_url.rstrip("/"),
                urlsplit(settings.openai_base_url).hostname,
                urlsplit(settings.anthropic_base_url).hostname,
            )
            if s
        )
        self.total_timeout = settings.total_timeout
        self._pools: dict[tuple[Provider, bool], ForwardClient] = {
            (provider, stream): ForwardClient(
                base_url,
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.first_byte_timeout if stream else settings.total_timeout,
                max_connections=settings.worker_connections,
                headers=sdk_headers(provider, api_key),
                trace=False,  # our trace ids stay inside the platform
                egress=True,
            )
            for provider, (base_url, api_key) in endpoints.items()
            for stream in (False, True)
        }

    def complete(
        self, provider: Provider, path: str, content: bytes, *, headers: dict[str, str] | None = None
    ) -> bytes:
        """POST raw JSON bytes and read the whole answer (within `total_timeout` per read). Errors are ParleyErrors."""
        response = self.open(provider, path, content, stream=False, headers=headers)
        try:
            return response.read_all()
        except TimeoutError:
            raise _timed_out(provider) from None
        except OSError:
            raise _no_answer(UpstreamError, provider, "closed the connection", "upstream_cut") from None
        finally:
            response.close()

    def open(
        self, provider: Provider, path: str, content: bytes, *, stream: bool, headers: dict[str, str] | None = None
    ) -> ForwardResponse:
        """POST raw JSON bytes; a 2xx answer is returned with its body unread. Errors are ParleyErrors."""
        pool = self._pools[provider, stream]
        try:
            response = pool.request("POST", pool.path_prefix + path, body=content, headers=headers or {})
        except TimeoutError:
            raise _timed_out(provider) from None
        except ValueError:  # a header the client sent is not valid HTTP/1.1: the request is at fault, not the provider
            raise BadRequest("a request header cannot be sent on to the provider", code="invalid_header") from None
        except OSError:
            raise _no_answer(UpstreamError, provider, "is unreachable", "upstream_unreachable") from None
        if response.status >= 400:
            try:
                body = response.read_all()
            except OSError:
                body = b""
            finally:
                response.close()
            raise self.status_error(provider, response.status, body, response.header("retry-after"))
        return response

    def status_error(self, provider: Provider, status: int, body: bytes, retry_after: str | None) -> ParleyError:
        """The client-facing error for a provider's 4xx/5xx: its status (5xx → 502), its message minus secrets."""
        error = self._status_error(provider, status, body, retry_after)
        # The retry loop reads what the provider said, not what the client will see.
        error.upstream_status = status  # type: ignore[attr-defined]
        error.retry_after = _retry_after(retry_after)  # type: ignore[attr-defined]
        return error

    def _status_error(self, provider: Provider, status: int, body: bytes, retry_after: str | None) -> ParleyError:
        """Map one provider error answer to a ParleyError."""
        message, code = _provider_message(body)
        log.warning(
            "provider answered an error",
            extra={"gen_ai.provider.name": provider.value, "http.response.status_code": status, "error.code": code},
        )
        if status == 429:
            return RateLimited(
                self.redact(message) or "the provider is rate limiting requests",
                code=code or "rate_limit_exceeded",
                headers={"retry-after": retry_after} if retry_after is not None else {},
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
        for pool in self._pools.values():
            pool.close()


def _no_answer(error_type: type[ParleyError], provider: Provider, what: str, code: str) -> ParleyError:
    """A provider that gave no answer: the retry loop finds no status in it (0), only the failure."""
    error = error_type(f"the {provider.value} provider {what}", code=code)
    error.upstream_status = 0  # type: ignore[attr-defined]
    return error


def _timed_out(provider: Provider) -> ParleyError:
    """The provider gave no answer (or no more of it) within the read timeout."""
    return _no_answer(GatewayTimeout, provider, "did not answer in time", "upstream_timeout")


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
