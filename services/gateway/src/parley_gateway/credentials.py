"""Authentication at the edge: a user JWT verified locally, or an API key exchanged once at auth and cached.

Everything here is per process and cheap on a hit: a dict lookup keyed by the SHA-256 of the key (the key itself is
never stored, logged or echoed). Revocation events drop cached entries at once; the TTL is only the fallback.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jwt

from parley_kit.errors import GatewayTimeout, ServiceUnavailable, Unauthorized, UpstreamError
from parley_kit.http import ServiceClient
from parley_kit.service_auth import ServiceTokenSource, seconds
from parley_kit.tokens import TokenVerifier

from .ratelimit import Principal

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-pl-"
_KEY_SHAPE = re.compile(r"sk-pl-[A-Za-z0-9_-]{16,128}")
MAX_TOKEN_LENGTH = 8192
# Codes auth's kit answers with when the *service token* (not the key) is the problem: refresh it and retry.
SERVICE_TOKEN_CODES = frozenset({"invalid_token", "token_expired", "missing_token"})
# A service token younger than this that gets a 401 is not the culprit: the key is (no refresh storm on sprays).
SERVICE_TOKEN_MIN_AGE = 10.0
# Principals remembered per token (a token's claims never change; the cache is emptied when full).
PRINCIPAL_CACHE_SIZE = 50_000
# How long a user revocation is remembered for JWTs issued before it (longer than any access token lives).
USER_REVOCATION_MEMORY = 3600.0


class CredentialKind(StrEnum):
    """What a presented credential looks like."""

    JWT = "jwt"
    API_KEY = "api_key"
    UNKNOWN = "unknown"


def classify(credential: str) -> CredentialKind:
    """A JWT has three dot-separated non-empty parts; a Parley API key starts with `sk-pl-`."""
    if credential.startswith(KEY_PREFIX):
        return CredentialKind.API_KEY
    if credential.count(".") == 2 and all(credential.split(".")):
        return CredentialKind.JWT
    return CredentialKind.UNKNOWN


def presented_credential(authorization: str | None, api_key: str | None) -> str:
    """The credential of `Authorization: Bearer …` (OpenAI clients) or else `x-api-key` (Anthropic clients)."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return value
        raise Unauthorized("the Authorization header must be 'Bearer <key or token>'", code="missing_credentials")
    if api_key and api_key.strip():
        return api_key.strip()
    raise Unauthorized("no API key or access token was sent", code="missing_credentials")


def key_digest(key: str) -> bytes:
    """The cache key for an API key: its SHA-256, so the cache never holds a usable secret as a key."""
    return hashlib.sha256(key.encode()).digest()


@dataclass(slots=True)
class CachedToken:
    """An access token obtained for an API key, with who it speaks for."""

    access_token: str
    expires_at: float  # time.monotonic()
    key_id: str | None
    user_id: str | None


class KeyCache:
    """API key digest → exchanged access token, indexed by key id and user id so events can drop them at once."""

    def __init__(self, *, ttl: float, refresh_margin: float, max_entries: int = 100_000) -> None:
        self._ttl = ttl
        self._margin = refresh_margin
        self._max_entries = max_entries
        self._entries: dict[bytes, CachedToken] = {}
        self._by_key: dict[str, set[bytes]] = {}
        self._by_user: dict[str, set[bytes]] = {}
        # When a key/user was last revoked: an exchange that started before it must not be cached afterwards.
        self._revoked_keys: dict[str, float] = {}
        self._revoked_users: dict[str, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes) -> str | None:
        """The cached access token, if still fresh."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry.expires_at <= time.monotonic():
            self._discard(digest)
            return None
        return entry.access_token

    def put(
        self,
        digest: bytes,
        *,
        access_token: str,
        expires_in: float,
        key_id: str | None,
        user_id: str | None,
        requested_at: float,
    ) -> bool:
        """Remember a token until shortly before it expires (at most the TTL); False when not cached."""
        lifetime = min(self._ttl, expires_in - min(self._margin, expires_in / 10))
        if lifetime <= 0:
            return False
        with self._lock:
            if (key_id and self._revoked_keys.get(key_id, float("-inf")) >= requested_at) or (
                user_id and self._revoked_users.get(user_id, float("-inf")) >= requested_at
            ):
                return False  # revoked while the exchange was in flight
            if len(self._entries) >= self._max_entries:
                self._evict_expired()
            self._discard_locked(digest)
            self._entries[digest] = CachedToken(access_token, requested_at + lifetime, key_id, user_id)
            if key_id:
                self._by_key.setdefault(key_id, set()).add(digest)
            if user_id:
                self._by_user.setdefault(user_id, set()).add(digest)
        return True

    def drop_key(self, key_id: str) -> int:
        """Forget every token obtained with this key; returns how many were dropped."""
        with self._lock:
            self._revoked_keys[key_id] = time.monotonic()
            self._prune_revocations()
            return self._drop_locked(self._by_key.get(key_id, set()))

    def drop_user(self, user_id: str) -> int:
        """Forget every token obtained for this user's keys; returns how many were dropped."""
        with self._lock:
            self._revoked_users[user_id] = time.monotonic()
            self._prune_revocations()
            return self._drop_locked(self._by_user.get(user_id, set()))

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()
            self._by_key.clear()
            self._by_user.clear()

    def _drop_locked(self, digests: set[bytes]) -> int:
        dropped = 0
        for digest in list(digests):
            dropped += self._discard_locked(digest)
        return dropped

    def _discard(self, digest: bytes) -> None:
        with self._lock:
            self._discard_locked(digest)

    def _discard_locked(self, digest: bytes) -> int:
        entry = self._entries.pop(digest, None)
        if entry is None:
            return 0
        for index, owner in ((self._by_key, entry.key_id), (self._by_user, entry.user_id)):
            if owner and (digests := index.get(owner)) is not None:
                digests.discard(digest)
                if not digests:
                    del index[owner]
        return 1

    def _evict_expired(self) -> None:
        now = time.monotonic()
        for digest in [d for d, entry in self._entries.items() if entry.expires_at <= now]:
            self._discard_locked(digest)
        while len(self._entries) >= self._max_entries:
            self._discard_locked(next(iter(self._entries)))

    def _prune_revocations(self) -> None:
        horizon = time.monotonic() - self._ttl
        for revoked in (self._revoked_keys, self._revoked_users):
            if len(revoked) > 1000:
                for name in [n for n, at in revoked.items() if at < horizon]:
                    del revoked[name]


class KeyExchanger:
    """API key → a short-lived user access token from auth, cached per process; refused keys cached briefly."""

    def __init__(
        self,
        auth: ServiceClient,
        service_token: ServiceTokenSource,
        cache: KeyCache,
        *,
        timeout: tuple[float, float],
        rejected_ttl: float,
    ) -> None:
        self._auth = auth
        self._service_token = service_token
        self.cache = cache
        self._timeout = timeout
        self._rejected_ttl = rejected_ttl
        self._rejected: dict[bytes, float] = {}
        # Striped locks: concurrent first uses of one key make one exchange, not hundreds.
        self._locks = [threading.Lock() for _ in range(64)]

    def access_token(self, key: str) -> tuple[str, float]:
        """(access token, seconds spent waiting on auth) for a key; Unauthorized when auth refuses it."""
        digest = key_digest(key)
        token = self.cache.get(digest)
        if token is not None:
            return token, 0.0
        if not _KEY_SHAPE.fullmatch(key):
            raise Unauthorized("invalid API key", code="invalid_api_key")
        with self._locks[digest[0] % len(self._locks)]:
            token = self.cache.get(digest)
            if token is not None:
                return token, 0.0
            refused_until = self._rejected.get(digest)
            if refused_until is not None and refused_until > time.monotonic():
                raise Unauthorized("invalid API key", code="invalid_api_key")
            started = time.monotonic()
            try:
                return self._exchange(key, digest, started), time.monotonic() - started
            except Unauthorized:
                self._remember_refusal(digest)
                raise

    def _exchange(self, key: str, digest: bytes, started: float) -> str:
        for attempt in (1, 2):
            service_token = self._service_token.get()
            status, body = self._auth.json(
                "POST",
                "/auth/internal/key-exchange",
                json={"key": key},
                headers={"authorization": f"Bearer {service_token}"},
                timeout=self._timeout,
            )
            if status == 200:
                return self._accept(digest, body, started)
            if status == 401 and attempt == 1 and self._service_token_suspect(body):
                self._service_token.invalidate(service_token)
                continue
            if status in (401, 403, 404):
                raise Unauthorized("invalid API key", code="invalid_api_key")
            log.warning("key exchange failed at auth", extra={"http.response.status_code": status})
            if status == 503:  # auth is up but its database is not (a restart): the client may retry at once
                raise ServiceUnavailable("authentication is unavailable; retry shortly", headers={"Retry-After": "1"})
            if status == 504:
                raise GatewayTimeout("the auth service did not answer in time")
            raise UpstreamError("the auth service failed")
        raise Unauthorized("invalid API key", code="invalid_api_key")

    def _service_token_suspect(self, body: Any) -> bool:
        code = body.get("code") if isinstance(body, dict) else None
        return code in SERVICE_TOKEN_CODES or self._service_token.age > SERVICE_TOKEN_MIN_AGE

    def _accept(self, digest: bytes, body: Any, started: float) -> str:
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise UpstreamError("the auth service answered the key exchange with garbage")
        key_id, user_id = body.get("key_id"), body.get("user_id")
        self.cache.put(
            digest,
            access_token=body["access_token"],
            expires_in=seconds(body.get("expires_in"), default=60.0),
            key_id=str(key_id) if key_id is not None else None,
            user_id=str(user_id) if user_id is not None else None,
            requested_at=started,
        )
        return body["access_token"]

    def _remember_refusal(self, digest: bytes) -> None:
        if self._rejected_ttl <= 0:
            return
        now = time.monotonic()
        if len(self._rejected) >= 10_000:
            self._rejected = {d: until for d, until in self._rejected.items() if until > now}
            if len(self._rejected) >= 10_000:
                self._rejected.clear()
        self._rejected[digest] = now + self._rejected_ttl


class UserRevocations:
    """Users disabled or whose password changed: their JWTs issued before that moment are refused at the edge. Users
    whose role changed: their JWTs carrying another role than the last one set are refused, whenever they were issued
    (a login that read the user before the change may sign its token after it)."""

    def __init__(self, memory: float = USER_REVOCATION_MEMORY) -> None:
        self._memory = memory
        # user id -> (revoked at, epoch seconds; the last whole `iat` second refused). `iat` has one-second resolution.
        self._since: dict[str, tuple[float, int]] = {}
        self._roles: dict[str, tuple[float, str]] = {}  # user id -> (set at, epoch seconds; the role set)

    def revoke(self, user_id: str, at: float | None = None, *, whole_second: bool = False) -> None:
        """Refuse this user's tokens issued before `at` (epoch seconds; now by default); `whole_second` refuses
        those issued in the second of `at` too. An earlier cut-off (an event arriving late) never lowers a later one."""
        now = time.time()
        at = at if at is not None else now
        self._since = {u: since for u, since in self._since.items() if since[0] > now - self._memory}
        cut = (at, int(at) if whole_second else int(at) - 1)
        held = self._since.get(user_id)
        self._since[user_id] = cut if held is None else (max(held[0], cut[0]), max(held[1], cut[1]))

    def set_role(self, user_id: str, role: str, at: float | None = None) -> None:
        """Refuse this user's tokens that carry another role than `role`, set at `at` (epoch seconds; now by
        default); a role set earlier (an event arriving late) does not replace a later one."""
        now = time.time()
        at = at if at is not None else now
        self._roles = {u: held for u, held in self._roles.items() if held[0] > now - self._memory}
        held = self._roles.get(user_id)
        if held is None or held[0] <= at:
            self._roles[user_id] = (at, role)

    def refuses(self, user_id: str, token: str) -> bool:
        """Whether a (verified) token of this user predates a revocation or carries a role since taken away."""
        revoked, role = self._since.get(user_id), self._roles.get(user_id)
        if revoked is None and role is None:
            return False
        forgotten = time.time() - self._memory
        claims = jwt.decode(token, options={"verify_signature": False})
        if role is not None and role[0] > forgotten and claims.get("roles") != [role[1]]:
            return True
        if revoked is None or revoked[0] < forgotten:
            return False
        issued_at = claims.get("iat")
        return not isinstance(issued_at, (int, float)) or issued_at <= revoked[1]


class EdgeAuthenticator:
    """Turns what a client presents into the bearer token forwarded upstream, or raises Unauthorized."""

    def __init__(self, verifier: TokenVerifier, exchanger: KeyExchanger, revocations: UserRevocations) -> None:
        self.verifier = verifier
        self.exchanger = exchanger
        self.revocations = revocations
        self._principals: dict[str, Principal] = {}

    def principal(self, token: str) -> Principal:
        """Who an accepted bearer token acts as, with its own `rpm`/`tpm` claims (decoded once per token).

        Only called with a token this gateway verified or got from auth itself, so its signature is not checked again.
        """
        known = self._principals.get(token)
        if known is not None:
            return known
        claims = jwt.decode(token, options={"verify_signature": False})
        key_id = claims.get("key_id")
        principal = Principal(
            user_id=str(claims.get("sub", "")),
            key_id=str(key_id) if key_id is not None else None,
            rpm=_limit_claim(claims.get("rpm")),
            tpm=_limit_claim(claims.get("tpm")),
        )
        if len(self._principals) >= PRINCIPAL_CACHE_SIZE:
            self._principals = {}
        self._principals[token] = principal
        return principal

    def access_token(self, authorization: str | None, api_key: str | None) -> tuple[str, float]:
        """(bearer token for the upstream, seconds spent waiting on auth)."""
        credential = presented_credential(authorization, api_key)
        kind = classify(credential)
        if kind is CredentialKind.API_KEY:
            return self.exchanger.access_token(credential)
        if kind is CredentialKind.JWT and len(credential) <= MAX_TOKEN_LENGTH:
            identity = self.verifier.verify(credential)
            if self.revocations.refuses(identity.subject, credential):
                raise Unauthorized("token revoked", code="token_revoked")
            return credential, 0.0
        raise Unauthorized("invalid API key or access token", code="invalid_credentials")


def _limit_claim(value: Any) -> int | None:
    """A limit claim (`rpm`, `tpm`) when it is a non-negative integer; anything else is ignored."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
