"""Header filtering both ways: hop-by-hop headers dropped, client identity headers stripped, security headers added.

Works on WSGI environ keys (`HTTP_X_API_KEY`) so the hot path never builds a header object it would throw away.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# RFC 9110 §7.6.1 connection-specific headers, plus Host and Content-Length, which are rebuilt for the upstream.
HOP_BY_HOP = frozenset({"CONNECTION", "KEEP_ALIVE", "TRANSFER_ENCODING", "TE", "TRAILER", "UPGRADE", "HOST"})
# The trace headers are re-issued by the kit (a child span of the caller's trace), never copied.
TRACE = frozenset({"TRACEPARENT", "X_REQUEST_ID"})
# Headers a client could use to claim an identity; upstreams trust only the bearer token the edge sets.
IDENTITY = frozenset(
    {
        "X_API_KEY",
        "X_USER_ID",
        "X_USER",
        "X_USERID",
        "X_FORWARDED_USER",
        "X_FORWARDED_EMAIL",
        "X_FORWARDED_GROUPS",
        "X_FORWARDED_PREFERRED_USERNAME",
        "X_REMOTE_USER",
        "REMOTE_USER",
        "X_KEY_ID",
        "X_ROLES",
    }
)
IDENTITY_PREFIXES = ("X_PARLEY_", "X_AUTH_", "X_USER_", "X_REMOTE_", "X_FORWARDED_USER", "PROXY_", "X_ACT")

_DROPPED = HOP_BY_HOP | TRACE | IDENTITY
_DROPPED_WITH_AUTHORIZATION = _DROPPED | {"AUTHORIZATION"}

RESPONSE_DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-connection",
        # gunicorn writes its own; copies would be duplicates.
        "server",
        "date",
        # the gateway echoes its own request id.
        "x-request-id",
    }
)

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
# API answers are data, never documents: nothing in them may run or be framed. (Not on Swagger UI's pages.)
API_CSP = ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")


def is_identity_header(wsgi_name: str) -> bool:
    """Whether an `HTTP_*`-less WSGI header name (`X_PARLEY_USER`) could claim an identity."""
    return wsgi_name in IDENTITY or wsgi_name.startswith(IDENTITY_PREFIXES)


def _forwarded_name(key: str, dropped: frozenset[str]) -> str | None:
    """The lower-case header name for a WSGI key (`HTTP_X_FOO` → `x-foo`), or None when it must not be forwarded."""
    if key[:5] != "HTTP_":
        return None
    name = key[5:]
    if name in dropped or name.startswith(IDENTITY_PREFIXES):
        return None
    return name.replace("_", "-").lower()


# WSGI key → forwarded name, per policy: clients send the same few dozen header names, so each is decided once.
_NAME_CACHES: dict[frozenset[str], dict[str, str | None]] = {_DROPPED: {}, _DROPPED_WITH_AUTHORIZATION: {}}
_NAME_CACHE_LIMIT = 4096


def upstream_request_headers(environ: Mapping[str, Any], *, keep_authorization: bool) -> dict[str, str]:
    """The client's headers fit to forward: no hop-by-hop, identity or trace headers, Authorization only if kept."""
    dropped = _DROPPED if keep_authorization else _DROPPED_WITH_AUTHORIZATION
    cache = _NAME_CACHES[dropped]
    listed = environ.get("HTTP_CONNECTION")
    if listed and listed.lower() not in ("keep-alive", "close"):
        # RFC 9110: headers named in Connection are hop-by-hop too (rare: decided without the cache).
        dropped = dropped | {token.strip().upper().replace("-", "_") for token in listed.split(",")}
        cache = {}
    headers: dict[str, str] = {}
    for key, value in environ.items():
        try:
            name = cache[key]
        except KeyError:
            name = _forwarded_name(key, dropped)
            if len(cache) < _NAME_CACHE_LIMIT:
                cache[key] = name
        if name is not None:
            headers[name] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["content-type"] = content_type
    remote = environ.get("REMOTE_ADDR")
    if remote:
        prior = headers.get("x-forwarded-for")
        headers["x-forwarded-for"] = f"{prior}, {remote}" if prior else remote
    headers["x-forwarded-proto"] = environ.get("wsgi.url_scheme", "http")
    return headers


def client_response_headers(upstream: Iterable[tuple[str, str]], request_id: str | None) -> list[tuple[str, str]]:
    """The upstream's response headers minus hop-by-hop ones, plus the security headers and our request id."""
    headers = []
    cache_control = False
    for name, value in upstream:
        lowered = name.lower()
        if lowered in RESPONSE_DROPPED:
            continue
        cache_control = cache_control or lowered == "cache-control"
        headers.append((name, value))
    if not cache_control:
        headers.append(("Cache-Control", "no-store"))  # answers carry tokens and completions: never cache them
    headers.extend(SECURITY_HEADERS)
    headers.append(API_CSP)
    if request_id:
        headers.append(("x-request-id", request_id))
    return headers
