"""An httpx transport over urllib3's connection pool, given to the provider SDKs (httpx's documented extension point).

The SDKs stay whole: they build each request (auth, headers, base URL, timeouts) and read each answer; only the last
step, the bytes on the wire, goes through urllib3. Why: httpcore checks every pooled connection with a `poll()`
before reusing it, which under gevent's patched `select` was ~11% of an llm worker's CPU under load; with this
transport the llm spent ~2.0 ms of CPU per request instead of ~2.8 (bench/README.md). Errors are raised as httpx's own
exceptions, so the SDKs map them to APITimeoutError/APIConnectionError as they always do.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx2
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    EmptyPoolError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

CHUNK_SIZE = 64 * 1024


class Urllib3Transport(httpx2.BaseTransport):
    """Keep-alive pools per provider host, no retries (the caller's router decides), streams read as they arrive."""

    def __init__(self, *, max_connections: int) -> None:
        # block=True: past max_connections a request waits for a free connection (httpx's "pool" timeout).
        self._pools = urllib3.PoolManager(num_pools=8, maxsize=max_connections, block=True, retries=False)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts = request.extensions.get("timeout") or {}
        timeout = urllib3.Timeout(connect=timeouts.get("connect"), read=timeouts.get("read"))
        url = request.url
        pool = self._pools.connection_from_host(url.host, url.port, scheme=url.scheme)
        try:
            answer = pool.urlopen(
                request.method,
                url.raw_path.decode("ascii"),
                body=request.read(),
                headers=dict(request.headers.multi_items()),
                timeout=timeout,
                pool_timeout=timeouts.get("pool"),
                preload_content=False,
                decode_content=False,
                redirect=False,
                assert_same_host=False,
            )
        except Urllib3Error as exc:
            raise _httpx_error(exc, request) from exc
        return httpx2.Response(
            answer.status,
            headers=list(answer.headers.items()),
            stream=_AnswerStream(answer, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (answer.reason or "").encode("latin-1")},
            request=request,
        )

    def close(self) -> None:
        self._pools.clear()


class _AnswerStream(httpx2.SyncByteStream):
    """The answer's body as it arrives; a finished answer's connection goes back to the pool, a cut one is closed."""

    def __init__(self, answer: urllib3.BaseHTTPResponse, request: httpx2.Request) -> None:
        self._answer = answer
        self._request = request
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        answer = self._answer
        try:
            if answer.chunked:
                yield from answer.read_chunked(CHUNK_SIZE, decode_content=False)
            else:
                yield from iter(lambda: answer.read1(CHUNK_SIZE, decode_content=False), b"")
        except Urllib3Error as exc:
            raise _httpx_error(exc, self._request) from exc
        self._done = True

    def close(self) -> None:
        if self._done:
            self._answer.release_conn()
        else:
            self._answer.close()


def _httpx_error(exc: Urllib3Error, request: httpx2.Request) -> httpx2.TransportError:
    """The httpx exception the SDKs expect for a urllib3 failure."""
    error_type: type[httpx2.TransportError]
    if isinstance(exc, NewConnectionError):  # first: urllib3 makes it a subclass of ConnectTimeoutError
        error_type = httpx2.ConnectError
    elif isinstance(exc, ConnectTimeoutError):
        error_type = httpx2.ConnectTimeout
    elif isinstance(exc, ReadTimeoutError):
        error_type = httpx2.ReadTimeout
    elif isinstance(exc, EmptyPoolError):
        error_type = httpx2.PoolTimeout
    elif isinstance(exc, ProtocolError):
        error_type = httpx2.RemoteProtocolError
    else:
        error_type = httpx2.NetworkError
    return error_type(str(exc), request=request)
