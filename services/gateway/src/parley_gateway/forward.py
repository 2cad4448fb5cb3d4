"""The hop to the services behind the gateway, on geventhttpclient: the one outbound call on every proxied request.

geventhttpclient parses answers in C (llhttp) and sends a request's head and body in one write; on this hop it costs
well under half of urllib3's CPU per request (`bench/README.md`). Everything else the gateway sends (the key exchange
with auth, docs, probes) stays on the kit's `ServiceClient`.
"""

from __future__ import annotations

import socket
import time
import weakref
from collections.abc import Iterator
from urllib.parse import urlsplit

from geventhttpclient import HTTPClient
from geventhttpclient.response import HTTPParseError, HTTPSocketPoolResponse

from parley_kit import tracing
from parley_kit.errors import BadRequest, GatewayTimeout, ParleyError, ServiceUnavailable, UpstreamError

CONNECT_ATTEMPTS = 3  # a refused connection sent nothing: safe to try again for any method (a restarting service)
CONNECT_BACKOFF = 0.05


class BodyCut(ConnectionError):
    """The service's answer ended before its framing said it would (a cut connection, a broken chunk)."""


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
        """The body as it arrives: whatever has come in, never waiting to fill a buffer. Raises `BodyCut`."""
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
        """Cut the connection now (a FIN the service sees at once); a blocked read returns."""
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
    """A pooled keep-alive client for one service behind the gateway."""

    def __init__(
        self,
        base_url: str,
        *,
        name: str,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        max_connections: int = 4000,
    ) -> None:
        parsed = urlsplit(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"the gateway forwards over plain http inside the platform, not to {base_url!r}")
        self.name = name
        self._client = HTTPClient(
            parsed.hostname,
            parsed.port or 80,
            concurrency=max_connections,
            connection_timeout=connect_timeout,
            network_timeout=read_timeout,
            headers={"User-Agent": "parley-gateway"},
        )
        weakref.finalize(self, self._client.close)  # pooled sockets close with the client, as urllib3's do

    def request(self, method: str, target: str, *, body: bytes | None, headers: dict[str, str]) -> ForwardResponse:
        """Send the request; trouble reaching the service becomes a Parley 503/504/502 naming it, never a hang."""
        sent_headers = tracing.outbound_headers()
        sent_headers.update(headers)
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                return ForwardResponse(self._client.request(method, target, body=body or b"", headers=sent_headers))
            except ConnectionRefusedError as exc:
                if attempt == CONNECT_ATTEMPTS:
                    raise ServiceUnavailable(f"the {self.name} service is unreachable") from exc
                time.sleep(CONNECT_BACKOFF * attempt)
            except ValueError as exc:  # a header value or target that is not valid HTTP/1.1
                raise BadRequest(f"the request cannot be forwarded: {exc}") from exc
            except TimeoutError as exc:
                raise GatewayTimeout(f"the {self.name} service did not answer in time") from exc
            except (HTTPParseError, OSError) as exc:
                raise UpstreamError(f"the {self.name} service closed the connection") from exc
        raise ParleyError()  # unreachable: the last attempt returns or raises

    def close(self) -> None:
        """Close every pooled connection."""
        self._client.close()
