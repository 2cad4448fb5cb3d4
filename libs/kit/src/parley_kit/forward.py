"""A pooled keep-alive HTTP client on geventhttpclient, for the hops every request takes: gateway → service and
llm → provider.

geventhttpclient parses answers in C (llhttp) and sends a request's head and body in one write; on a hop it costs
well under half of urllib3's CPU per request (`bench/README.md`). Failures are raised as the few exceptions below,
which each caller turns into the error its own clients get (a service's 503, a provider's 502).
"""

from __future__ import annotations

import _socket  # the C resolver, never gevent's: for IP literals only (AI_NUMERICHOST)
import functools
import socket
import time
import urllib.request
import weakref
from collections.abc import Iterator, Mapping
from urllib.parse import SplitResult, urlsplit

from gevent import get_hub
from gevent.hub import Hub
from geventhttpclient import HTTPClient
from geventhttpclient.response import HTTPParseError, HTTPSocketPoolResponse

from . import tracing

CONNECT_ATTEMPTS = 3  # a refused connection sent nothing: safe to try again for any method (a restarting peer)
CONNECT_BACKOFF = 0.05


class HopError(ConnectionError):
    """The peer could not be reached, or its answer broke off."""


class Unreachable(HopError):
    """Every connection attempt was refused: nothing was sent."""


class BodyCut(HopError):
    """The connection ended before the answer did (no status line, or a body short of its framing)."""


class ForwardResponse:
    """An answer being read: status and headers now, the body whole or chunk by chunk as it arrives."""

    __slots__ = ("_response", "headers", "reason", "status")

    def __init__(self, response: HTTPSocketPoolResponse) -> None:
        self._response = response
        self.status = response.status_code
        self.reason = response.status_message or ""
        self.headers = list(response.items())

    def header(self, name: str) -> str | None:
        """A header's value (the last one, if repeated)."""
        value = self._response.get(name)
        return value[-1] if isinstance(value, list) else value

    def read_all(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        return b"".join(self.chunks())

    def chunks(self, limit: int = 64 * 1024) -> Iterator[bytes]:
        """The body as it arrives: whatever has come in, never waiting to fill a buffer. Raises `BodyCut`, or
        `TimeoutError` when the peer is silent for longer than the client's read timeout."""
        response = self._response
        buffered = response._body_buffer  # what llhttp has decoded so far (the response keeps no public view of it)
        while True:
            if buffered:
                chunk = bytes(buffered)
                del buffered[:]
                yield chunk
            if response.message_complete:
                return
            sock = response._sock
            if sock is None:
                raise BodyCut("the connection was released before the body ended")
            try:
                data = sock.recv(limit)
                response.feed(data)
            except HTTPParseError as exc:
                self.close()
                raise BodyCut(str(exc)) from exc
            except BaseException:
                self.close()
                raise
            if not data and not response.message_complete:
                self.close()
                raise BodyCut("the connection closed before the body ended")

    def abort(self) -> None:
        """Cut the connection now (a FIN the peer sees at once); a blocked read returns."""
        sock = self._response._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Give the connection back: to the pool when the body was read to its end, closed otherwise."""
        self._response.release()


class ForwardClient:
    """Keep-alive connections to one origin (http or https), at most `max_connections` at once.

    `trace` sends the W3C trace headers (inside the platform; not to a third party). `egress` is for calls that leave
    the platform: an egress proxy set in the environment (HTTP_PROXY, HTTPS_PROXY, NO_PROXY) is then used, as urllib
    and httpx would use it; hops inside the platform never go through it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        max_connections: int = 4000,
        headers: Mapping[str, str] | None = None,
        trace: bool = True,
        egress: bool = False,
    ) -> None:
        parsed = urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        https = parsed.scheme == "https"
        port = parsed.port or (443 if https else 80)
        proxy = _egress_proxy(parsed.scheme, parsed.hostname) if egress else None
        self.path_prefix = parsed.path.rstrip("/")  # a base URL's path (`…/v1`) goes in front of every target
        self._trace = trace
        self._new_client = functools.partial(
            HTTPClient,
            parsed.hostname,
            port,
            ssl=https,
            concurrency=max_connections,
            connection_timeout=connect_timeout,
            network_timeout=read_timeout,
            headers=dict(headers or {"User-Agent": "parley"}),
            proxy_host=proxy.hostname if proxy else None,
            proxy_port=(proxy.port or 80) if proxy else None,
            proxy_user=proxy.username if proxy else None,
            proxy_password=proxy.password if proxy else None,
        )
        # A pool per gevent hub, i.e. per OS thread: gevent's sockets and locks belong to the hub that made them. A
        # gevent worker has one (every greenlet shares it); a threaded server or test gets one per thread.
        self._clients: dict[Hub, HTTPClient] = weakref.WeakKeyDictionary()  # type: ignore[assignment]
        weakref.finalize(self, _close_all, self._clients)  # pooled sockets close with the client, as urllib3's do

    def _client(self) -> HTTPClient:
        hub = get_hub()
        client = self._clients.get(hub)
        if client is None:
            client = self._clients[hub] = self._new_client()
            _resolve_literal_in_place(client)
        return client

    def request(self, method: str, target: str, *, body: bytes | None, headers: dict[str, str]) -> ForwardResponse:
        """Send the request and read the answer's head. Raises `Unreachable`, `TimeoutError`, `BodyCut`, or
        `ValueError` for a header or target that is not valid HTTP/1.1."""
        if self._trace:
            sent_headers = tracing.outbound_headers()
            sent_headers.update(headers)
        else:
            sent_headers = headers
        client = self._client()
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                return ForwardResponse(client.request(method, target, body=body or b"", headers=sent_headers))
            except ConnectionRefusedError as exc:
                if attempt == CONNECT_ATTEMPTS:
                    raise Unreachable(str(exc)) from exc
                time.sleep(CONNECT_BACKOFF * attempt)
            except TimeoutError:
                raise
            except (HTTPParseError, OSError) as exc:
                raise BodyCut(str(exc) or type(exc).__name__) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        """Close every pooled connection."""
        _close_all(self._clients)


def _resolve_literal_in_place(client: HTTPClient) -> None:
    """A pool that connects to an IP literal gets its address without a lookup. gevent's default resolver sends every
    getaddrinfo, even of `127.0.0.1`, to its thread pool: a hand-off that waits for the GIL behind a busy hub, paid on
    each new connection (one per stream opened while the pooled ones are busy; ~8% of a worker's samples with 2,000
    streams held). Host names still go to the resolver."""
    pool = client._connection_pool  # geventhttpclient offers no resolver setting; the pool resolves per new socket
    try:
        addresses = _socket.getaddrinfo(
            pool._connection_host,
            pool._connection_port,
            0,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
            socket.AI_NUMERICHOST,
        )
    except (OSError, UnicodeError):  # a host name (or one only the resolver can judge): gevent resolves it, as before
        return
    pool._resolve = lambda: addresses


def _close_all(clients: Mapping[Hub, HTTPClient]) -> None:
    for client in list(clients.values()):
        client.close()


def _egress_proxy(scheme: str, host: str) -> SplitResult | None:
    """The proxy the environment names for this scheme and host (urllib's reading of *_PROXY and NO_PROXY)."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return urlsplit(proxy if "://" in proxy else "http://" + proxy)
