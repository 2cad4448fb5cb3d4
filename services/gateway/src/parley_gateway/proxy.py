"""The proxy: a thin WSGI layer in front of Flask that forwards the proxied prefixes without touching Flask.

Per request it routes by prefix, authenticates (cached), passes the body through as bytes (never parsed), and streams
the upstream's answer back chunk by chunk as it arrives. Everything else (probes, metrics, Swagger UI, 404s) is
Flask's. Measured in process: a trivial Flask route with the kit's hooks costs ~90 µs of CPU, the whole proxied
request (urllib3 round trip included) ~340 µs, so dispatching before Flask saves about a fifth per request.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import orjson
from urllib3.exceptions import HTTPError, ReadTimeoutError

from parley_kit import errors, tracing
from parley_kit.errors import BadRequest, GatewayTimeout, ParleyError, PayloadTooLarge, UpstreamError
from parley_kit.http import ServiceClient
from parley_kit.metrics import HTTP_SERVER_DURATION

from . import routing
from .credentials import EdgeAuthenticator
from .headers import API_CSP, SECURITY_HEADERS, client_response_headers, upstream_request_headers
from .metrics import AUTH_FAILURES, GATEWAY_OVERHEAD
from .routing import Route, Upstream

log = logging.getLogger(__name__)
access_log = logging.getLogger("parley.access")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

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
        fallback: WSGIApp,
        *,
        upstreams: Mapping[Upstream, ServiceClient],
        authenticator: EdgeAuthenticator,
        max_body_bytes: int,
        access_log_enabled: bool = True,
    ) -> None:
        self._fallback = fallback
        self._upstreams = dict(upstreams)
        self._auth = authenticator
        self._max_body = max_body_bytes
        self._access_log = access_log_enabled
        self._gevent = _gevent_active()

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
        if route.authenticate:
            token, waited = self._auth.access_token(environ.get("HTTP_AUTHORIZATION"), environ.get("HTTP_X_API_KEY"))
            headers["authorization"] = "Bearer " + token
        body = read_body(environ, self._max_body)
        target = upstream_target(environ)
        client = self._upstreams[route.upstream]

        sent = time.perf_counter()
        upstream = client.request(method, target, body=body, headers=headers, stream=True)
        content_length = upstream.headers.get("content-length")
        content_type = upstream.headers.get("content-type", "")
        if method == "HEAD" or upstream.status in (204, 304):
            payload: Iterable[bytes] = [_read_all(upstream, client)]
        elif content_length and content_length.isdigit() and int(content_length) <= INLINE_BODY_LIMIT:
            payload = [_read_all(upstream, client)]
        else:
            payload = Relay(
                upstream,
                sse=content_type.startswith("text/event-stream"),
                shape=route.shape,
                client_socket=environ.get("gunicorn.socket") if self._gevent else None,
            )
        received = time.perf_counter()

        status = upstream.status
        start_response(
            f"{status} {upstream.reason or _REASONS.get(status, 'Unknown')}",
            client_response_headers(upstream.headers.items(), request_id),
        )
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
        HTTP_SERVER_DURATION.labels(method if method in _METHODS else "OTHER", route.name, str(status)).observe(
            finished - started
        )
        if self._access_log:
            path = environ.get("PATH_INFO", "")
            access_log.info(
                "%s %s %s",
                method,
                path,
                status,
                extra={
                    "http.request.method": method,
                    "url.path": path,
                    "http.response.status_code": status,
                    "event.duration": int((finished - started) * 1e9),
                    "event.outcome": "success" if status < 400 else "failure",
                },
            )


class Relay:
    """Streams an upstream body to the client as each chunk arrives; closes the upstream the moment the client goes.

    The server calls `close()` when the client disconnects (a write failed) or the body is done. Under gevent a
    watcher greenlet also notices a hang-up while the upstream is quiet (no write to fail), so the upstream sees the
    disconnect at once rather than at its next chunk.
    """

    __slots__ = ("_chunks", "_client_gone", "_client_socket", "_done", "_shape", "_sse", "_upstream", "_watcher")

    def __init__(self, upstream: Any, *, sse: bool, shape: errors.ErrorShape, client_socket: Any = None) -> None:
        self._upstream = upstream
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
        if self._client_socket is not None:
            import gevent

            self._watcher = gevent.spawn(self._watch_client, self._client_socket)
        try:
            if upstream.chunked:
                chunks: Iterable[bytes] = upstream.read_chunked(CHUNK_SIZE, decode_content=False)
            else:
                chunks = iter(lambda: upstream.read1(CHUNK_SIZE, decode_content=False), b"")
            yield from chunks
            self._done = True
        except (HTTPError, OSError, ValueError) as exc:
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
        connection = getattr(self._upstream, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # a FIN now; the blocked read returns and the relay ends
            except OSError:
                pass

    def _finish(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.kill(block=False)
        if self._upstream is None:
            return
        upstream, self._upstream = self._upstream, None
        if self._done:
            upstream.release_conn()
        else:
            upstream.close()


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


def _read_all(upstream: Any, client: ServiceClient) -> bytes:
    """Read a short answer whole; a broken one becomes 502/504 (nothing has been sent to the client yet)."""
    try:
        data = upstream.read(decode_content=False)
    except HTTPError as exc:
        upstream.close()
        if isinstance(exc, ReadTimeoutError):
            raise GatewayTimeout(f"the {client.name} service did not answer in time") from exc
        raise UpstreamError(f"the {client.name} service closed the connection") from exc
    upstream.release_conn()
    return data


def _gevent_active() -> bool:
    """True in a gunicorn gevent worker (sockets patched): hang-up watchers are greenlets there."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))
