"""A service account's own access token (client credentials at auth), cached until shortly before it expires.

Used by every service that calls auth's internal endpoints: the gateway (key exchange) and the jobs worker (act-as).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .errors import ServiceUnavailable
from .http import ServiceClient

log = logging.getLogger(__name__)

SERVICE_TOKEN_PATH = "/auth/service-token"  # noqa: S105 - a route, not a secret


def seconds(value: object, *, default: float) -> float:
    """A positive number of seconds from a JSON field (`expires_in`), or the default."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


class ServiceTokenSource:
    """Fetches and caches the service token; one fetch at a time, renewed `margin` seconds before expiry."""

    def __init__(
        self,
        auth: ServiceClient,
        *,
        client_id: str,
        client_secret: str,
        margin: float = 30.0,
        timeout: tuple[float, float] | None = None,
    ) -> None:
        self._auth = auth
        self._credentials = {"client_id": client_id, "client_secret": client_secret}
        self._timeout = timeout
        self._margin = margin
        self._token: str | None = None
        self._expires_at = 0.0
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    @property
    def age(self) -> float:
        """Seconds since the current token was obtained."""
        return time.monotonic() - self._fetched_at

    def get(self) -> str:
        """A valid service token, fetched when missing or near expiry."""
        token = self._token
        if token is not None and time.monotonic() < self._expires_at:
            return token
        with self._lock:
            if self._token is not None and time.monotonic() < self._expires_at:
                return self._token
            return self._fetch()

    def invalidate(self, token: str) -> None:
        """Forget `token` (auth refused it), unless another caller already replaced it."""
        with self._lock:
            if self._token == token:
                self._token = None

    def call(self, path: str, payload: dict[str, Any], *, retry_on_401: bool = True) -> tuple[int, Any]:
        """POST to an internal auth endpoint with the service token; a 401 renews the token and retries once."""
        for attempt in (1, 2):
            token = self.get()
            status, body = self._auth.json(
                "POST", path, json=payload, timeout=self._timeout, headers={"authorization": f"Bearer {token}"}
            )
            if status == 401 and attempt == 1 and retry_on_401:
                self.invalidate(token)
                continue
            return status, body
        raise AssertionError("unreachable")

    def _fetch(self) -> str:
        status, body = self._auth.json("POST", SERVICE_TOKEN_PATH, json=self._credentials, timeout=self._timeout)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            # Our own credentials were refused or auth misbehaves: no client can do anything about it.
            log.error(
                "auth refused this service's credentials",
                extra={"http.response.status_code": status, "client_id": self._credentials["client_id"]},
            )
            raise ServiceUnavailable("authentication is unavailable")
        expires_in = seconds(body.get("expires_in"), default=300.0)
        now = time.monotonic()
        self._token = body["access_token"]
        self._fetched_at = now
        self._expires_at = now + expires_in - min(self._margin, expires_in / 10)
        return self._token
