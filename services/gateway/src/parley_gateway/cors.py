"""CORS at the edge: an allow-list of exact origins; preflights are answered here and never reach a service."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .headers import SECURITY_HEADERS

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication


ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
# What a browser client may read from an answer besides the CORS-safelisted headers.
EXPOSED_HEADERS = ", ".join(
    (
        "x-request-id",
        "retry-after",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    )
)
# Header names a preflight may ask for (RFC 9110 tokens, comma-separated): echoed back only when they look like that.
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")
DEFAULT_ALLOWED_HEADERS = "authorization, content-type, x-api-key, anthropic-version, x-request-id, traceparent"


class Cors:
    """WSGI middleware: answers preflights from allowed origins (204) and refuses others (403); on every other answer
    to an allowed origin, adds `Access-Control-Allow-Origin` and the exposed headers. Credentials (cookies) are not
    allowed: clients send keys and tokens in headers."""

    def __init__(self, app: WSGIApplication, *, origins: frozenset[str], max_age: int) -> None:
        self._app = app
        self._origins = origins
        self._max_age = str(max_age)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request."""
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            return self._app(environ, start_response)
        allowed = origin in self._origins
        if environ.get("REQUEST_METHOD") == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ:
            return self._preflight(environ, start_response, origin if allowed else None)
        if not allowed:
            return self._app(environ, start_response)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.extend(
                (
                    ("Access-Control-Allow-Origin", origin),
                    ("Access-Control-Expose-Headers", EXPOSED_HEADERS),
                    ("Vary", "Origin"),
                )
            )
            return start_response(status, headers, exc_info)

        return self._app(environ, start)

    def _preflight(self, environ: dict[str, Any], start_response: StartResponse, origin: str | None) -> list[bytes]:
        headers = [("Vary", "Origin"), ("Content-Length", "0"), *SECURITY_HEADERS]
        if origin is None:
            start_response("403 Forbidden", headers)
            return [b""]
        requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "").strip()
        headers += [
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Methods", ALLOWED_METHODS),
            (
                "Access-Control-Allow-Headers",
                requested if requested and _HEADER_LIST.match(requested) else DEFAULT_ALLOWED_HEADERS,
            ),
            ("Access-Control-Max-Age", self._max_age),
        ]
        start_response("204 No Content", headers)
        return [b""]
