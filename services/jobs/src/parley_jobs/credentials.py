"""The worker's credentials: its own service token (client credentials at auth) and, per batch owner, an
act-as token so llm applies the owner's budget. Both cached until shortly before they expire."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from parley_kit.errors import UpstreamError
from parley_kit.http import ServiceClient

log = logging.getLogger(__name__)

SERVICE_TOKEN_PATH = "/auth/service-token"  # noqa: S105 - a route, not a secret
ACT_AS_PATH = "/auth/internal/act-as"


class ActAsRefused(Exception):
    """auth will not issue a token for this owner (user disabled, key revoked): the item cannot run."""


@dataclass(frozen=True, slots=True)
class _Cached:
    token: str
    renew_at: float


class ActingTokens:
    """Thread-safe cache of the service token and act-as tokens, renewed `margin` seconds before expiry."""

    def __init__(
        self,
        auth: ServiceClient,
        *,
        client_id: str,
        client_secret: str,
        margin: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth = auth
        self._client_id = client_id
        self._client_secret = client_secret
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._service: _Cached | None = None
        self._users: dict[tuple[str, str | None], _Cached] = {}

    def for_user(self, user_id: str, key_id: str | None) -> str:
        """An access token acting for the user (through the given API key, so its limits apply too)."""
        cached = self._users.get((user_id, key_id))
        if cached is not None and cached.renew_at > self._clock():
            return cached.token
        for attempt in (1, 2):
            status, body = self._auth.json(
                "POST",
                ACT_AS_PATH,
                json={"user_id": user_id, "key_id": key_id},
                headers={"Authorization": f"Bearer {self._service_token()}"},
            )
            if status == 401 and attempt == 1:
                self._service = None  # our own token expired or auth rotated keys: fetch a new one and retry
                continue
            break
        if status in (400, 403, 404, 409, 422):
            raise ActAsRefused(f"auth refused to act for the batch owner ({status})")
        cached = self._remember(status, body, "act-as")
        with self._lock:
            self._users[(user_id, key_id)] = cached
        return cached.token

    def forget(self, user_id: str, key_id: str | None) -> None:
        """Drop a user's token (llm rejected it) so the next call fetches a new one."""
        with self._lock:
            self._users.pop((user_id, key_id), None)

    def _service_token(self) -> str:
        cached = self._service
        if cached is not None and cached.renew_at > self._clock():
            return cached.token
        status, body = self._auth.json(
            "POST", SERVICE_TOKEN_PATH, json={"client_id": self._client_id, "client_secret": self._client_secret}
        )
        if status in (400, 401, 403):
            log.error("auth refused the jobs service account; check JOBS_CLIENT_ID / JOBS_CLIENT_SECRET")
        cached = self._remember(status, body, "service-token")
        self._service = cached
        return cached.token

    def _remember(self, status: int, body: object, what: str) -> _Cached:
        """A cache entry from auth's `{access_token, expires_in}`, or UpstreamError (the item is retried)."""
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise UpstreamError(f"auth {what} answered {status}")
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 60.0
        return _Cached(body["access_token"], self._clock() + lifetime - min(self._margin, lifetime / 2))
