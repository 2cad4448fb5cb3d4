"""The WSGI application: routing, authentication, control endpoints and response writing."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any, NamedTuple

from . import anthropic_api, openai_api
from . import knobs as knobs_mod
from .core import ApiError, Call, Response, Stats, drop, json_response
from .knobs import KnobError, Knobs

log = logging.getLogger("parley_fakeprovider")
StartResponse = Callable[..., Any]
Handler = Callable[[Call], Response]
_REASONS = {s.value: s.phrase for s in HTTPStatus} | {529: "Overloaded"}


class Api(NamedTuple):
    """How one provider API renders errors, checks keys and names its request-id header."""

    render_error: Callable[[ApiError], Response]
    authenticate: Callable[[Mapping[str, Any], str | None], None]
    request_id_header: str


OPENAI = Api(openai_api.error_response, openai_api.authenticate, "x-request-id")
ANTHROPIC = Api(anthropic_api.error_response, anthropic_api.authenticate, "request-id")
ROUTES: dict[tuple[str, str], tuple[Api, Handler]] = {
    ("POST", "/v1/chat/completions"): (OPENAI, openai_api.chat_completions),
    ("POST", "/v1/embeddings"): (OPENAI, openai_api.embeddings),
    ("GET", "/v1/models"): (OPENAI, openai_api.models),
    ("POST", "/v1/messages"): (ANTHROPIC, anthropic_api.messages),
    ("POST", "/v1/messages/count_tokens"): (ANTHROPIC, anthropic_api.count_tokens_endpoint),
}


def _looks_anthropic(environ: Mapping[str, Any]) -> bool:
    """Whether a request comes from an Anthropic client (it sends these headers)."""
    return "HTTP_ANTHROPIC_VERSION" in environ or "HTTP_X_API_KEY" in environ


class FakeProvider:
    """The fake OpenAI + Anthropic upstream as a WSGI callable, with per-process knobs and stats."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """Set start-up knobs from the environment overlaid with `config`."""
        config = dict(config or {})
        self._startup = knobs_mod.defaults(config)
        self._startup_key: str | None = config.get("api_key", os.environ.get("FAKE_PROVIDER_API_KEY")) or None
        self.stats = Stats()
        self.configure({})

    def configure(self, overrides: Mapping[str, Any]) -> None:
        """Replace the runtime overrides (``{}`` returns to the start-up values)."""
        typed = knobs_mod.parse_all({k: v for k, v in overrides.items() if k != "api_key"})
        self.knobs = Knobs(**{**self._startup, **typed})
        self.api_key = (overrides["api_key"] or None) if "api_key" in overrides else self._startup_key
        self.overrides = dict(overrides)

    def describe(self) -> dict[str, Any]:
        """The current configuration as JSON."""
        return {
            "knobs": dataclasses.asdict(self.knobs),
            "overrides": {k: v for k, v in self.overrides.items() if k != "api_key"},
            "api_key_required": self.api_key is not None,
        }

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Serve one WSGI request."""
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path == "/healthz" or path.startswith("/_fake/"):
            return self._send(self._control(method, path, environ), environ, start_response, None)
        api, handler = ROUTES.get((method, path), (None, None))
        if path == "/v1/models" and method == "GET" and _looks_anthropic(environ):
            api, handler = ANTHROPIC, anthropic_api.models
        if api is None:
            api = ANTHROPIC if _looks_anthropic(environ) or path.startswith("/v1/messages") else OPENAI
        self.stats.record_request(f"{method} {path}" if handler else "unknown", environ)
        try:
            if handler is None:
                raise ApiError(404, f"Invalid URL ({method} {path})" if api is OPENAI else None)
            api.authenticate(environ, self.api_key)
            response = handler(Call(environ, self.knobs, self.stats))
        except ApiError as err:
            response = api.render_error(err)
        except KnobError as err:
            response = api.render_error(ApiError(400, str(err)))
        except Exception:
            log.exception("fake provider failed on %s %s", method, path)
            response = api.render_error(ApiError(500))
        if not response.drop:
            self.stats.responses[str(response.status)] += 1
        return self._send(response, environ, start_response, api)

    def _send(
        self, response: Response, environ: dict[str, Any], start_response: StartResponse, api: Api | None
    ) -> Iterable[bytes]:
        """Start the response and return its body (a tracked generator for streams)."""
        if response.drop:
            drop(environ)
            # The server's write of this empty response then fails quietly on the closed socket.
            start_response("200 OK", [])
            return [b""]
        headers = [("Content-Type", response.content_type), *response.headers]
        if api is not None:
            headers.append((api.request_id_header, "req_" + os.urandom(12).hex()))
        status = f"{response.status} {_REASONS.get(response.status, 'Error')}"
        if isinstance(response.body, bytes):
            headers.append(("Content-Length", str(len(response.body))))
            start_response(status, headers)
            return [response.body]
        headers.append(("Cache-Control", "no-cache"))
        start_response(status, headers)
        return self.stats.track(response.body, environ)

    def _control(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        """Health check and the /_fake/* control endpoints (never authenticated, never counted)."""
        route = (method, path)
        if route == ("GET", "/healthz"):
            return json_response({"status": "ok"})
        if route == ("GET", "/_fake/stats"):
            return json_response(self.stats.snapshot())
        if route == ("POST", "/_fake/stats/reset"):
            self.stats.reset()
            return json_response(self.stats.snapshot())
        if route == ("GET", "/_fake/config"):
            return json_response(self.describe())
        if route == ("POST", "/_fake/config"):
            try:
                body = Call(environ, self.knobs, self.stats).json()
                self.configure(body)
            except (ApiError, KnobError) as err:
                return json_response({"error": {"message": str(err)}}, 400)
            return json_response(self.describe())
        return json_response({"error": {"message": f"no control endpoint {method} {path}"}}, 404)


def create_app(config: Mapping[str, Any] | None = None) -> FakeProvider:
    """Build a fresh fake provider WSGI application."""
    return FakeProvider(config)


__all__ = ["FakeProvider", "create_app"]
