"""The worker's credentials: per batch owner, an act-as token so llm applies the owner's budget, obtained with the
worker's own service token (the kit's ServiceTokenSource). Cached until shortly before they expire."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from parley_kit.errors import UpstreamError
from parley_kit.service_auth import ServiceTokenSource, seconds

ACT_AS_PATH = "/auth/internal/act-as"


class ActAsRefused(Exception):
    """auth will not issue a token for this owner (user disabled, key revoked): the item cannot run."""


@dataclass(frozen=True, slots=True)
class _Cached:
    token: str
    renew_at: float


class ActingTokens:
    """Thread-safe cache of act-as tokens per (owner, key), renewed `margin` seconds before expiry."""

    def __init__(
        self, service_token: ServiceTokenSource, *, margin: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._service_token = service_token
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._users: dict[tuple[str, str | None], _Cached] = {}

    def for_user(self, user_id: str, key_id: str | None) -> str:
        """An access token acting for the user (through the given API key, so its limits apply too)."""
        cached = self._users.get((user_id, key_id))
        if cached is not None and cached.renew_at > self._clock():
            return cached.token
        status, body = self._service_token.call(ACT_AS_PATH, {"user_id": user_id, "key_id": key_id})
        if status in (400, 403, 404, 409, 422):
            raise ActAsRefused(f"auth refused to act for the batch owner ({status})")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise UpstreamError(f"auth act-as answered {status}")
        lifetime = seconds(body.get("expires_in"), default=60.0)
        cached = _Cached(body["access_token"], self._clock() + lifetime - min(self._margin, lifetime / 2))
        with self._lock:
            self._users[(user_id, key_id)] = cached
        return cached.token

    def forget(self, user_id: str, key_id: str | None) -> None:
        """Drop a user's token (llm rejected it) so the next call fetches a new one."""
        with self._lock:
            self._users.pop((user_id, key_id), None)
