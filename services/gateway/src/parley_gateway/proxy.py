"""The proxy: a thin WSGI layer in front of Flask that forwards the proxied prefixes without touching Flask.

Per request it routes by prefix, authenticates (cached), passes the body through as bytes (never parsed), and streams
the upstream's answer back chunk by chunk as it arrives. Everything else (probes, metrics, Swagger UI, 404s) is
Flask's. Measured in process: a trivial Flask route with the kit's hooks costs ~90 µs of CPU, so dispatching before
Flask saves a good share of a proxied request. The hop itself is a `ForwardClient` (geventhttpclient).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from parley_kit import background, errors, logs, metrics, tracing
from parley_kit.errors import (
    BadRequest,
    GatewayTimeout,
    ParleyError,
    PayloadTooLarge,
    ServiceUnavailable,
    UpstreamError,
)
from parley_kit.forward import ForwardClient, ForwardResponse, Unreachable

from . import routing
from .credentials import EdgeAuthenticator
from .headers import API_CSP, SECURITY_HEADERS, client_response_headers, upstream_request_headers
from .metrics import AUTH_FAILURES, GATEWAY_OVERHEAD
from .ratelimit import DefaultLimits, RateLimiter, Scope, UsageMeter
from .routing import Route, Upstream

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication


log = logging.getLogger(__name__)


CHUNK_SIZE = 64 * 1024
# Answers with a Content-Length up to this size are read whole and returned in one write (no generator).
INLINE_BODY_LIMIT = 256 * 1024
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class Proxy:
    """WSGI app: proxied prefixes are forwarded here; every other path goes to `fallback` (the Flask app)."""

    def __init__(
        self,
        fallback: WSGIApplication,
        *,
        upstreams: Mapping[Upstream, ForwardClient],
        authenticator: EdgeAuthenticator,
        max_body_bytes: int,
        access_log_enabled: bool = True,
        limiter: RateLimiter | None = None,
        limits: DefaultLimits | None = None,
    ) -> None:
        self._fallback = fallback
        self._upstreams = dict(upstreams)
        self._auth = authenticator
        self._limiter = limiter if limits is not None else None
        self._limits = limits
        self._max_body = max_body_bytes
        self._access_log = access_log_enabled
        self._gevent = background.under_gevent()  # hang-up watchers are greenlets there

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request."""
        route = routing.match(environ.get("PATH_INFO") or "/")
        if route is None:
            return self._fallback(environ, start_response)
        started = time.perf_counter()
        context = tracing.start(environ.get("HTTP_TRACEPARENT"), environ.get("HTTP_X_REQUEST_ID"))
        try:
            return self._forward(route, environ, start_response, started, context.request_id)
        except ParleyError as error:
            return self._refuse(route, error, environ, start_response, started, context.request_id)
        except Exception:
            log.exception("proxy failed", extra={"url.path": environ.get("PATH_INFO")})
            return self._refuse(route, ParleyError(), environ, start_response, started, context.request_id)
        finally:
            tracing.clear()

    def _forward(
        self, route: Route, environ: dict[str, Any], start_response: StartResponse, started: float, request_id: str
    ) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        headers = upstream_request_headers(environ, keep_authorization=not route.authenticate)
        waited = 0.0
        token = None
        if route.authenticate:
            token, waited = self._auth.access_token(environ.get("HTTP_AUTHORIZATION"), environ.get("HTTP_X_API_KEY"))
            headers["authorization"] = "Bearer " + token
        body = read_body(environ, self._max_body)
        limit_headers: list[tuple[str, str]] = []
        token_scopes: tuple[Scope, ...] = ()
        if route.limited and token is not None and self._limiter is not None and self._limits is not None:
            scopes = self._limits.scopes(self._auth.principal(token))
            if scopes:  # no limit applies: no Redis call at all
                decision = self._limiter.admit(scopes)
                limit_headers, token_scopes = decision.headers, decision.token_scopes
        target = upstream_target(environ)
        client = self._upstreams[route.upstream]

        sent = time.perf_counter()
        try:
            upstream = client.request(method, target, body=body, headers=headers)
        except (OSError, ValueError) as exc:
            raise hop_error(route.upstream.value, exc) from exc
        status = upstream.status
        settlement = (
            Settlement(self._limiter, token_scopes, UsageMeter(len(body) if body else 0))
            if token_scopes and self._limiter is not None and status < 400
            else None
        )
        content_length = upstream.header("content-length")
        content_type = upstream.header("content-type") or ""
        if method == "HEAD" or status in (204, 304):
            payload: Iterable[bytes] = [_read_all(upstream, route.upstream.value)]
        elif content_length and content_length.isdigit() and int(content_length) <= INLINE_BODY_LIMIT:
            data = _read_all(upstream, route.upstream.value)
            payload = [data] if settlement is None else SettledBody(data, settlement)
        else:
            payload = Relay(
                upstream,
                sse=content_type.startswith("text/event-stream"),
                shape=route.shape,
                client_socket=environ.get("gunicorn.socket") if self._gevent else None,
                settlement=settlement,
            )
        received = time.perf_counter()

        response_headers = client_response_headers(upstream.headers, request_id)
        if limit_headers:
            response_headers.extend(limit_headers)
        start_response(f"{status} {upstream.reason or _REASONS.get(status, 'Unknown')}", response_headers)
        finished = time.perf_counter()
        GATEWAY_OVERHEAD.labels(route.upstream.value).observe(max(0.0, (sent - started) - waited + finished - received))
        self._observe(route, environ, status, started, finished)
        return payload

    def _refuse(
        self,
        route: Route,
        error: ParleyError,
        environ: dict[str, Any],
        start_response: StartResponse,
        started: float,
        request_id: str,
    ) -> Iterable[bytes]:
        """Answer an error in the route's shape, with the same security headers as a proxied answer."""
        if error.status == 401:
            AUTH_FAILURES.labels(error.code).inc()
        response = errors.error_response(route.shape, error)
        for name, value in SECURITY_HEADERS:
            response.headers[name] = value
        response.headers[API_CSP[0]] = API_CSP[1]
        response.headers["Cache-Control"] = "no-store"
        response.headers["x-request-id"] = request_id
        self._observe(route, environ, error.status, started, time.perf_counter())
        return response(environ, start_response)

    def _observe(self, route: Route, environ: dict[str, Any], status: int, started: float, finished: float) -> None:
        """RED metric by route name (bounded labels) and one ECS access line, as the kit writes for Flask routes."""
        method = environ["REQUEST_METHOD"]
        metrics.observe_request(method if method in _METHODS else "OTHER", route.name, status, finished - started)
        if self._access_log:
            logs.access(method, environ.get("PATH_INFO", ""), status, int((finished - started) * 1e9))


class Settlement:
    """Counts an answer's tokens against its rate-limit scopes once the answer is over (sent, or cut short)."""

    __slots__ = ("_limiter", "_scopes", "meter")

    def __init__(self, limiter: RateLimiter, scopes: tuple[Scope, ...], meter: UsageMeter) -> None:
        self._limiter: RateLimiter | None = limiter
        self._scopes = scopes
        self.meter = meter

    def done(self) -> None:
        """Settle once (later calls do nothing)."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            try:
                limiter.settle(self._scopes, self.meter.tokens)
            except Exception:
                log.exception("token settlement failed")


class SettledBody:
    """A short answer sent in one write; its tokens are settled when the server closes it (after sending)."""

    __slots__ = ("_data", "_settlement")

    def __init__(self, data: bytes, settlement: Settlement) -> None:
        self._data = data
        self._settlement = settlement
        settlement.meter.feed(data)

    def __iter__(self) -> Iterator[bytes]:
        return iter((self._data,))

    def __len__(self) -> int:
        return 1

    def close(self) -> None:
        """The answer is out: settle its tokens."""
        self._settlement.done()


class Relay:
    """Streams an upstream body to the client as each chunk arrives; closes the upstream the moment the client goes.

    The server calls `close()` when the client disconnects (a write failed) or the body is done. Under gevent a
    watcher greenlet also notices a hang-up while the upstream is quiet (no write to fail), so the upstream sees the
    disconnect at once rather than at its next chunk.
    """

    __slots__ = (
        "_chunks",
        "_client_gone",
        "_client_socket",
        "_done",
        "_settlement",
        "_shape",
        "_sse",
        "_upstream",
        "_watcher",
    )

    def __init__(
        self,
        upstream: ForwardResponse,
        *,
        sse: bool,
        shape: errors.ErrorShape,
        client_socket: Any = None,
        settlement: Settlement | None = None,
    ) -> None:
        self._upstream: ForwardResponse | None = upstream
        self._settlement = settlement
        self._sse = sse
        self._shape = shape
        self._client_socket = client_socket
        self._client_gone = False
        self._done = False
        self._watcher: Any = None
        self._chunks = self._relay()

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        """End the relay: a finished upstream connection goes back to the pool, an unfinished one is closed."""
        self._chunks.close()
        self._finish()

    def _relay(self) -> Iterator[bytes]:
        upstream = self._upstream
        assert upstream is not None
        if self._client_socket is not None:
            import gevent

            self._watcher = gevent.spawn(self._watch_client, self._client_socket)
        try:
            chunks = upstream.chunks(CHUNK_SIZE)
            if self._sse:
                chunks = whole_events(chunks)
            settlement = self._settlement
            if settlement is None:
                yield from chunks
            else:
                meter = settlement.meter
                for chunk in chunks:
                    meter.feed(chunk)  # usage comes in the last events: scanned as they pass, never held back
                    yield chunk
            self._done = True
        except OSError as exc:  # a cut body (BodyCut), a silent or reset service
            if self._client_gone:
                return
            log.warning("upstream stream broke", extra={"error.type": type(exc).__name__})
            if self._sse:
                yield stream_error_event(self._shape, UpstreamError("the upstream stream ended unexpectedly"))
            else:
                raise  # the server aborts the connection: a truncated body must not look complete
        finally:
            self._finish()

    def _watch_client(self, client_socket: socket.socket) -> None:
        """Wait until the client hangs up (EOF), then cut the upstream connection so its server sees it now."""
        from gevent.socket import wait_read

        try:
            wait_read(client_socket.fileno())
            if client_socket.recv(1, socket.MSG_PEEK):
                return  # the client sent more (pipelining): nothing to conclude
        except OSError:
            pass  # a dead socket is a departed client
        self._client_gone = True
        upstream = self._upstream
        if upstream is not None:
            upstream.abort()  # a FIN now; the blocked read returns and the relay ends

    def _finish(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.kill(block=False)
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            # Read to its end, the connection goes back to the pool; cut short, it is closed, first: the upstream
            # must hear of a disconnect before anything else is done.
            upstream.close()
        settlement, self._settlement = self._settlement, None
        if settlement is not None:
            settlement.done()


def whole_events(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """SSE bytes passed on as they arrive, but only up to the last complete event: a connection cut mid-event then
    leaves no half event in front of the error event (a client could parse neither). At the end, any rest as sent."""
    rest = b""
    for chunk in chunks:
        data = rest + chunk if rest else chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not end:  # no complete event yet
            rest = data
            continue
        rest = data[end:]
        yield data[:end]
    if rest:
        yield rest


def stream_error_event(shape: errors.ErrorShape, error: ParleyError) -> bytes:
    """A mid-stream error as the SDKs expect it: OpenAI `data: {"error": …}`, Anthropic `event: error`."""
    body = orjson.dumps(errors.error_body(shape, error))
    if shape is errors.ErrorShape.ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"


def read_body(environ: Mapping[str, Any], limit: int) -> bytes | None:
    """The request body as bytes (never parsed), 413 over `limit`, 400 when its length is a lie."""
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        try:
            size = int(length)
        except ValueError:
            raise BadRequest("invalid Content-Length header") from None
        if size < 0:
            raise BadRequest("invalid Content-Length header")
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        body = stream.read(size) if size else b""
        if len(body) != size:
            raise BadRequest("the request body ended before its Content-Length")
        return body
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        return body
    return None


def upstream_target(environ: Mapping[str, Any]) -> str:
    """The path and query for the upstream: the decoded path re-quoted (what the edge checked), query as sent."""
    path = quote(environ.get("PATH_INFO", "/").encode("latin-1"), safe=_PATH_SAFE)
    query = environ.get("QUERY_STRING")
    return f"{path}?{query}" if query else path


def hop_error(service: str, exc: Exception) -> ParleyError:
    """What the client is told when the hop to a service fails: 503 unreachable, 504 silent, 502 cut, 400 unsendable."""
    if isinstance(exc, Unreachable):
        return ServiceUnavailable(f"the {service} service is unreachable")
    if isinstance(exc, TimeoutError):
        return GatewayTimeout(f"the {service} service did not answer in time")
    if isinstance(exc, ValueError):  # a header value or target that is not valid HTTP/1.1
        return BadRequest(f"the request cannot be forwarded: {exc}")
    return UpstreamError(f"the {service} service closed the connection")


def _read_all(upstream: ForwardResponse, service: str) -> bytes:
    """Read a short answer whole; a broken one becomes 502/504 (nothing has been sent to the client yet)."""
    try:
        return upstream.read_all()
    except OSError as exc:
        raise hop_error(service, exc) from exc
    finally:
        upstream.close()
