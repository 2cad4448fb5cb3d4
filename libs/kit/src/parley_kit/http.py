"""The one outbound HTTP client: pooled keep-alive connections, mandatory timeouts, safe retries, trace context.

Built on urllib3 directly (what `requests` wraps): the gateway → llm hop is on every request's hot path and
urllib3 costs a fraction of `requests` per call.
"""

from __future__ import annotations

from typing import Any

import orjson
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from . import tracing
from .errors import GatewayTimeout, ServiceUnavailable, UpstreamError

Response = urllib3.BaseHTTPResponse


class ServiceClient:
    """A pooled client for one base URL (another Parley service)."""

    def __init__(
        self,
        base_url: str,
        *,
        name: str,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        max_connections: int = 100,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        # Connection failures are safe to retry for any method (nothing was sent); reads only for idempotent ones.
        self._retries = urllib3.Retry(
            total=2,
            connect=2,
            read=2,
            status=0,
            other=0,
            redirect=0,
            allowed_methods=urllib3.Retry.DEFAULT_ALLOWED_METHODS,
            backoff_factor=0.05,
            raise_on_status=False,
        )
        self._pool = urllib3.connection_from_url(
            self.base_url, maxsize=max_connections, block=False, timeout=self._timeout, retries=self._retries
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: tuple[float, float] | None = None,
        stream: bool = False,
    ) -> Response:
        """Send a request; connection trouble becomes a Parley 503/504 error naming the service, never a hang."""
        sent_headers = tracing.outbound_headers()
        if json is not None:
            body = orjson.dumps(json)
            sent_headers["content-type"] = "application/json"
        if headers:
            sent_headers.update(headers)
        try:
            return self._pool.urlopen(
                method,
                path,
                body=body,
                headers=sent_headers,
                preload_content=not stream,
                decode_content=False,
                timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]) if timeout else self._timeout,
                assert_same_host=False,
            )
        except MaxRetryError as exc:
            raise self._translate(exc.reason) from exc
        except HTTPError as exc:
            raise self._translate(exc) from exc

    def json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Send a request and decode a JSON answer (None when the body is empty or not JSON)."""
        response = self.request(method, path, **kwargs)
        try:
            return response.status, orjson.loads(response.data) if response.data else None
        except orjson.JSONDecodeError:
            return response.status, None

    def _translate(self, exc: BaseException | None) -> Exception:
        if isinstance(exc, (NewConnectionError, ConnectTimeoutError)):
            return ServiceUnavailable(f"the {self.name} service is unreachable")
        if isinstance(exc, ReadTimeoutError):
            return GatewayTimeout(f"the {self.name} service did not answer in time")
        if isinstance(exc, ProtocolError):
            return UpstreamError(f"the {self.name} service closed the connection")
        return UpstreamError(f"the {self.name} service failed")
